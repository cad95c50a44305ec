"""PackedLoader (R1's packed training stream) and ShuffledSequenceLoader (R1's GPTQ calibration rows).

Each loader is compared token for token with an independent reference written here as plain Python loops,
straight from the rules as R1 ran them, on small synthetic shards built to hit every edge: junk before a
shard's first BOS, a shard one token too short for a global span, a shard without BOS, a batch that ends
exactly at a shard's end, the wrap after the last shard, and calibration lists running dry.
"""
import gc
import threading
import time
from contextlib import closing

import numpy as np
import pytest
import torch

from train.data import (PackedLoader, ShardError, ShuffledSequenceLoader, document_segments, first_bos,
                        write_shard)

BOS = 1


# ---------------------------------------------------------------- independent references (plain loops)

def reference_cu_seqlens(row, max_doc_len, pad_to=64):
    """cu_seqlens by the rule: BOS positions, 0 prepended unless the row starts with BOS, every document cut
    every max_doc_len tokens from its start, the length T appended, padded with T to a multiple of pad_to."""
    T = len(row)
    starts = [i for i, token in enumerate(row) if token == BOS]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else T
        piece = start
        while piece < end:
            bounds.append(piece)
            piece += max_doc_len
    bounds.append(T)
    while len(bounds) % pad_to:
        bounds.append(T)
    return bounds


def reference_span_starts(shards, global_span):
    """(shard index, cursor) of each call, forever: every shard in order from its first BOS, one global span
    after another while it fits (ending exactly at the shard's end included), then the next shard, wrapping."""
    while True:
        for index, tokens in enumerate(shards):
            bos_positions = [i for i, token in enumerate(tokens) if token == BOS]
            if not bos_positions:
                continue
            cursor = bos_positions[0]
            while cursor + global_span <= len(tokens):
                yield index, cursor
                cursor += global_span


def reference_packed(shards, world_size, tokens_per_rank, max_doc_len, calls):
    """Per call: (shard index, cursor, [(x, y, cu_seqlens) of every rank]) as lists."""
    span = tokens_per_rank + 1
    starts = reference_span_starts(shards, world_size * span)
    out = []
    for _ in range(calls):
        index, cursor = next(starts)
        ranks = []
        for r in range(world_size):
            piece = [int(t) for t in shards[index][cursor + r * span:cursor + (r + 1) * span]]
            x, y = piece[:-1], piece[1:]
            ranks.append((x, y, reference_cu_seqlens(x, max_doc_len)))
        out.append((index, cursor, ranks))
    return out


def reference_calibration_rows(owned_shards, rank, seq_len, n_rows):
    """Calibration rows (seq_len + 1 tokens each) of the rank that owns these shards, by the rule: PCG64(rank),
    per shard a phase and shuffled starts, a shard drawn by its remaining count, its last start popped, all
    lists rebuilt with the same rng once every one is empty."""
    rng = np.random.Generator(np.random.PCG64(rank))

    def build_lists():
        lists = []
        for tokens in owned_shards:
            n = len(tokens)
            max_phase = min(seq_len - 1, max(0, n - (seq_len + 1)))
            phase = rng.integers(max_phase + 1)
            n_seq = (n - 1 - phase) // seq_len
            lists.append([int(s) for s in phase + seq_len * rng.permutation(n_seq)])
        return lists

    lists = build_lists()
    rows, rebuilds = [], 0
    for _ in range(n_rows):
        if all(len(starts) == 0 for starts in lists):
            lists = build_lists()
            rebuilds += 1
        remaining = np.array([len(starts) for starts in lists], dtype=np.float64)
        which = rng.choice(len(owned_shards), p=remaining / remaining.sum())
        start = lists[which].pop()
        rows.append([int(t) for t in owned_shards[which][start:start + seq_len + 1]])
    return rows, rebuilds


# ---------------------------------------------------------------- synthetic shards

def _documents(rng, length, max_doc_len, dense=False):
    """`length` tokens of packed documents ([BOS] + ids), starting with a BOS; dense: many 1-3 token docs."""
    tokens = []
    while len(tokens) < length:
        doc_len = int(rng.integers(1, 4)) if dense or rng.random() < 0.25 else int(rng.integers(4, 3 * max_doc_len))
        tokens += [BOS] + rng.integers(2, 60000, size=doc_len - 1).tolist()
    return tokens[:length]


def _junk(rng, length):
    return rng.integers(2, 60000, size=length).tolist()


def make_stream_shards(folder, global_span, max_doc_len, seed=0):
    """Five shards (lists and paths) for a global span g. In stream order:
    0: 7 junk tokens, then 2 spans and a 13-token tail that is dropped;
    1: 3 junk tokens, then g - 1 tokens, one short of a span: skipped whole;
    2: no BOS at all: skipped;
    3: BOS first, exactly 3 spans, the last ending at the shard's end (kept), with a dense stretch of tiny docs;
    4: 20 junk tokens, then 1.5 spans: one batch, the rest dropped; then the stream wraps to shard 0."""
    rng = np.random.default_rng(seed)
    g = global_span
    shards = [
        _junk(rng, 7) + _documents(rng, 2 * g + 13, max_doc_len),
        _junk(rng, 3) + _documents(rng, g - 1, max_doc_len),
        _junk(rng, 2 * g + 5),
        _documents(rng, g, max_doc_len) + _documents(rng, g, max_doc_len, dense=True)
        + _documents(rng, g, max_doc_len),
        _junk(rng, 20) + _documents(rng, g + g // 2, max_doc_len),
    ]
    paths = []
    for k, tokens in enumerate(shards):
        path = folder / f"toy_train_{k:06d}.bin"
        write_shard(path, tokens)
        paths.append(path)
    return paths, shards


def _loader_batches(loader, calls):
    out = []
    for _ in range(calls):
        x, y, cu = loader.next_batch()
        out.append((x[0].tolist(), y[0].tolist(), cu.tolist()))
    return out


# ---------------------------------------------------------------- segments

def test_document_segments_equal_the_rule():
    """document_segments (the loader's cu_seqlens) against the rule written as a loop, on random rows with
    dense and sparse BOS, and at the padding edges: 64 boundaries stay 64 entries, 65 become 128."""
    rng = np.random.default_rng(1)
    for _ in range(150):
        T = int(rng.integers(1, 300))
        bos_rate = rng.uniform(0, 0.5)
        row = np.where(rng.random(T) < bos_rate, BOS, rng.integers(2, 9, size=T)).tolist()
        for max_doc_len in (1, 3, 16, 64):
            cu = document_segments(torch.tensor(row), max_doc_len, bos_id=BOS)
            assert cu.dtype == torch.int32
            assert cu.tolist() == reference_cu_seqlens(row, max_doc_len), (row, max_doc_len)
    assert document_segments(torch.ones(63, dtype=torch.int64), 16).tolist() == list(range(63)) + [63]
    assert document_segments(torch.ones(64, dtype=torch.int64), 16).tolist() == list(range(64)) + [64] * 64
    # junk before the first BOS is its own segment, cut at max_doc_len too; a document is cut from its start
    row = [9] * 5 + [BOS] + [9] * 9
    assert document_segments(torch.tensor(row), 4).tolist() == [0, 4, 5, 9, 13] + [15] * 59


def test_first_bos_is_found_past_a_scan_chunk():
    tokens = np.zeros(3_000_000, dtype=np.uint16)
    assert first_bos(tokens) is None
    tokens[2_500_001] = BOS
    tokens[2_600_000] = BOS
    assert first_bos(tokens) == 2_500_001
    tokens[0] = BOS
    assert first_bos(tokens) == 0


# ---------------------------------------------------------------- the packed stream

@pytest.mark.parametrize("world_size, tokens_per_rank, max_doc_len", [(1, 200, 16), (3, 150, 24)])
def test_packed_stream_equals_reference_on_every_rank(tmp_path, world_size, tokens_per_rank, max_doc_len):
    """Every rank's x, y and cu_seqlens, call after call, through dropped tails, skipped shards, a batch ending
    exactly at a shard's end and two wraps to shard 0."""
    span = tokens_per_rank + 1
    g = world_size * span
    paths, shards = make_stream_shards(tmp_path, g, max_doc_len)
    calls = 15  # 6 calls per round of the five shards
    expected = reference_packed(shards, world_size, tokens_per_rank, max_doc_len, calls)
    visited = [(index, cursor) for index, cursor, _ in expected]
    assert visited[:6] == [(0, 7), (0, 7 + g), (3, 0), (3, g), (3, 2 * g), (4, 20)]  # the shards do what they say
    assert visited[6:12] == visited[:6] and visited[12:] == visited[:3]
    got = []
    for r in range(world_size):
        with closing(PackedLoader(reversed(paths), r, world_size, tokens_per_rank, max_doc_len, prefetch=True)) as loader:
            x, y, cu = loader.next_batch()
            assert x.shape == y.shape == (1, tokens_per_rank) and x.dtype == y.dtype == torch.int64
            assert cu.dtype == torch.int32 and cu.ndim == 1 and cu.numel() % 64 == 0
            loader.reset()
            got.append(_loader_batches(loader, calls))
    for call, (index, cursor, ranks) in enumerate(expected):
        chunk = shards[index][cursor:cursor + g]
        for r in range(world_size):
            x, y, cu = got[r][call]
            assert (x, y, cu) == tuple(ranks[r]), f"call {call}, rank {r}"
            # rank r's target at the end of its slice is the token between slices: an input of no rank
            gap = r * span + tokens_per_rank
            assert y[-1] == chunk[gap] and x == chunk[r * span:gap]
            if r + 1 < world_size:
                assert got[r + 1][call][0][0] == chunk[gap + 1]
    all_cu = [got[r][c][2] for r in range(world_size) for c in range(calls)]
    all_x = [got[r][c][0] for r in range(world_size) for c in range(calls)]
    assert any(len(cu) > 64 for cu in all_cu), "the dense shard must need a second 64-entry bucket"
    assert any(x[0] != BOS for x in all_x), "some row must start inside a document (0 prepended)"
    assert any(cu[0] == 0 and cu[1] == max_doc_len and BOS not in x[1:max_doc_len + 1]
               for x, cu in zip(all_x, all_cu)), "some document must be cut at max_doc_len"


def test_prefetch_never_changes_the_batches_and_reset_restarts(tmp_path):
    """prefetch on and off give the same batches, over shard boundaries and a wrap, and after reset()
    mid-stream both start again exactly like a new loader (and like the reference)."""
    world_size, tokens_per_rank, max_doc_len = 3, 80, 32
    paths, shards = make_stream_shards(tmp_path, world_size * (tokens_per_rank + 1), max_doc_len, seed=3)
    expected = reference_packed(shards, world_size, tokens_per_rank, max_doc_len, 14)
    want = [tuple(ranks[1]) for _, _, ranks in expected]
    runs = {}
    for prefetch in (True, False):
        with closing(PackedLoader(paths, 1, world_size, tokens_per_rank, max_doc_len, prefetch=prefetch)) as loader:
            before = _loader_batches(loader, 8)
            loader.reset()
            after = _loader_batches(loader, 14)
            loader.reset()
            loader.reset()  # twice in a row, before any batch
            again = _loader_batches(loader, 3)
        runs[prefetch] = before, after, again
        assert before == want[:8] and after == want and again == want[:3], f"prefetch={prefetch}"
    assert runs[True] == runs[False]


def test_no_shard_big_enough_is_a_shard_error_naming_the_files(tmp_path):
    short = tmp_path / "toy_train_000000.bin"
    write_shard(short, [BOS] + [5] * 100)
    with pytest.raises(ShardError, match=r"global span of 303 tokens.*toy_train_000000\.bin"):
        PackedLoader([short], 0, 3, 100, 32)
    # long enough by size, but the first BOS comes too late (or never): found when the worker gets there,
    # raised by next_batch in the caller's thread, and again on the next call
    late = tmp_path / "toy_train_000001.bin"
    write_shard(late, [5] * 250 + [BOS] + [5] * 100)
    none = tmp_path / "toy_train_000002.bin"
    write_shard(none, [5] * 400)
    for prefetch in (True, False):
        with closing(PackedLoader([short, late, none], 0, 3, 100, 32, prefetch=prefetch)) as loader:
            for _ in range(2):
                with pytest.raises(ShardError, match=r"303 tokens.*000000.*000001.*000002"):
                    loader.next_batch()


def test_a_worker_error_surfaces_in_next_batch_at_its_own_batch(tmp_path):
    """A shard corrupted after start-up fails the batch that reaches it, not an earlier one."""
    tokens_per_rank, max_doc_len = 50, 16
    for prefetch in (True, False):
        folder = tmp_path / f"prefetch_{prefetch}"
        folder.mkdir()
        paths, _ = make_stream_shards(folder, tokens_per_rank + 1, max_doc_len)
        with closing(PackedLoader(paths, 0, 1, tokens_per_rank, max_doc_len, prefetch=prefetch)) as loader:
            # batches 1-2 come from shard 0; shard 3 is first opened (or read ahead) for batch 3
            paths[3].write_bytes(paths[3].read_bytes()[:-2])
            loader.next_batch()
            loader.next_batch()
            with pytest.raises(ShardError, match=r"toy_train_000003\.bin.*truncated"):
                loader.next_batch()


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=3, world_size=3), "rank 3"),
    (dict(rank=-1, world_size=3), "rank -1"),
    (dict(rank=0, world_size=0), "rank 0"),
    (dict(tokens_per_rank=0), "tokens_per_rank"),
    (dict(max_doc_len=0), "max_doc_len"),
    (dict(files=[]), "at least one"),
])
def test_bad_arguments_are_value_errors(tmp_path, kwargs, message):
    path = tmp_path / "toy_train_000000.bin"
    write_shard(path, [BOS] * 500)
    args = dict(files=[path], rank=0, world_size=1, tokens_per_rank=64, max_doc_len=16) | kwargs
    with pytest.raises(ValueError, match=message):
        PackedLoader(**args)


def _loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("PackedLoader")]


def test_close_reset_and_garbage_collection_leave_no_threads(tmp_path):
    paths, _ = make_stream_shards(tmp_path, 65, 16)
    assert not _loader_threads(), "an earlier test left PackedLoader threads running"
    loader = PackedLoader(paths, 0, 1, 64, 16)
    for _ in range(3):
        loader.next_batch()
        loader.reset()
    assert _loader_threads()
    loader.close()
    loader.close()
    assert not _loader_threads(), "close() must join the worker threads"
    with pytest.raises(RuntimeError, match="close"):
        loader.next_batch()

    loader = PackedLoader(paths, 0, 1, 64, 16)
    loader.next_batch()
    del loader
    gc.collect()
    deadline = time.monotonic() + 10
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _loader_threads(), "a garbage-collected loader must stop its threads"


# ---------------------------------------------------------------- calibration rows

def _calibration_shards(folder, lengths, seed=5):
    rng = np.random.default_rng(seed)
    paths, shards = [], []
    for k, n in enumerate(lengths):
        tokens = rng.integers(0, 60000, size=n).tolist()
        path = folder / f"toy_train_{k:06d}.bin"
        write_shard(path, tokens)
        paths.append(path)
        shards.append(tokens)
    return paths, shards


@pytest.mark.parametrize("rank", [0, 1])
def test_shuffled_sequences_equal_reference_through_rebuilds(tmp_path, rank):
    """Rank r of 2 owns sorted files r, r+2, ...; rows match the reference over several exhaustions of the
    start lists (rank 1 owns a 37-token file and one shorter than a sequence: 1-2 rows per round)."""
    world_size, seq_len, seqs_per_batch, batches = 2, 16, 4, 20
    paths, shards = _calibration_shards(tmp_path, [200, 37, 90, 10, 150])
    owned = shards[rank::world_size]
    expected, rebuilds = reference_calibration_rows(owned, rank, seq_len, seqs_per_batch * batches)
    assert rebuilds >= 2, "the test must exhaust and rebuild the start lists"
    loader = ShuffledSequenceLoader(reversed(paths), rank, world_size, seq_len, seqs_per_batch)
    assert loader.files == paths[rank::world_size]
    got = []
    for _ in range(batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (seqs_per_batch, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        got += torch.cat((x, y[:, -1:]), dim=1).tolist()
    assert got == expected


def test_shuffled_sequences_errors(tmp_path):
    paths, _ = _calibration_shards(tmp_path, [200, 37])
    with pytest.raises(ShardError, match="rank 2 of world_size 3 owns no shard"):
        ShuffledSequenceLoader(paths, 2, 3, 16, 4)
    with pytest.raises(ShardError, match=r"shorter than one sequence of seq_len \+ 1 = 65.*000001"):
        ShuffledSequenceLoader(paths, 1, 2, 64, 4)
    with pytest.raises(ValueError, match="rank 2"):
        ShuffledSequenceLoader(paths, 2, 2, 16, 4)
    with pytest.raises(ValueError, match="seq_len"):
        ShuffledSequenceLoader(paths, 0, 1, 0, 4)
