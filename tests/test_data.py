"""Shards on disk (format, corruption errors, atomic writes) and the training / validation streams."""
import os

import numpy as np
import pytest
import torch

from train.data import (HEADER_BYTES, MAGIC, VERSION, DistributedTokenLoader, ShardError, TokenStream,
                        document_segments, load_shard, load_val_bytes, load_val_tokens, shard_paths, sidecar_paths,
                        write_shard)


def _write_shards(folder, split, sizes, seed=0):
    """Shards of random tokens with the given sizes; returns the paths and all tokens concatenated."""
    rng = np.random.default_rng(seed)
    paths, chunks = [], []
    for k, n in enumerate(sizes):
        tokens = rng.integers(0, 1024, size=n, dtype=np.uint16)
        path = folder / f"toy_{split}_{k:06d}.bin"
        write_shard(path, tokens)
        paths.append(path)
        chunks.append(tokens)
    return paths, np.concatenate(chunks)


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 40000], dtype=np.int64)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, VERSION, tokens.size] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    loaded = load_shard(path)
    assert isinstance(loaded, np.memmap), "a shard must be memory-mapped, not read whole"
    assert loaded.dtype == np.uint16 and loaded.tolist() == tokens.tolist()
    write_shard(tmp_path / "empty.bin", [])
    assert load_shard(tmp_path / "empty.bin").size == 0


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10))
    with pytest.raises(ValueError, match="65535"):
        write_shard(path, np.array([1, 70000]))  # rejected before anything is written
    with pytest.raises(ValueError, match="1-D"):
        write_shard(path, np.zeros((2, 2), dtype=np.int64))
    assert load_shard(path).tolist() == list(range(10)), "a failed write must not touch the old file"
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]


def _corrupt(path, case):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4").copy()
    if case == "magic":
        header[0] = 12345
    elif case == "version":
        header[1] = 7
    elif case == "truncated":
        return bytes(raw[:-2])
    elif case == "extra bytes":
        return bytes(raw) + b"\0\0"
    elif case == "count":
        header[2] += 1
    elif case == "short header":
        return bytes(raw[:100])
    raw[:HEADER_BYTES] = header.tobytes()
    return bytes(raw)


@pytest.mark.parametrize("case, message", [
    ("magic", "wrong magic 12345"), ("version", "version 7"), ("truncated", "does not match"),
    ("extra bytes", "does not match"), ("count", "does not match"), ("short header", "shorter than"),
])
def test_corrupt_shard_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / "bad_train_000000.bin"
    write_shard(path, np.arange(50))
    path.write_bytes(_corrupt(path, case))
    with pytest.raises(ShardError, match=message) as err:
        load_shard(path)
    assert str(path) in str(err.value)
    with pytest.raises(ShardError, match="bad_train_000000"):  # the stream checks every shard up front
        TokenStream([path])


def test_shard_paths_sorted_and_clear_error(tmp_path):
    _write_shards(tmp_path, "train", [3, 3, 3])
    _write_shards(tmp_path, "val", [3])
    (tmp_path / "notes_train.txt").write_text("not a shard")
    assert [p.name for p in shard_paths(tmp_path, "train")] == [f"toy_train_{k:06d}.bin" for k in range(3)]
    assert [p.name for p in shard_paths(tmp_path, "val")] == ["toy_val_000000.bin"]
    with pytest.raises(FileNotFoundError, match="train.prepare") as err:
        shard_paths(tmp_path / "missing", "train")
    assert "missing" in str(err.value) and "train.download" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        shard_paths(tmp_path, "test")


def test_token_stream_is_sequential_and_wraps(tmp_path):
    paths, everything = _write_shards(tmp_path, "train", [7, 0, 5, 11])
    stream = TokenStream(list(reversed(paths)))  # sorted order, whatever order it is given
    taken = np.concatenate([stream.take(n) for n in (4, 9, 1, 20, 13)])
    expected = np.concatenate([everything] * 3)[:taken.size]
    assert taken.tolist() == expected.tolist()
    stream.reset()
    assert stream.take(30).tolist() == np.concatenate([everything] * 2)[:30].tolist()


def test_distributed_loader_slices_one_chunk(tmp_path):
    paths, everything = _write_shards(tmp_path, "train", [50, 31, 77])
    world, seq_len, accum = 2, 4, 2
    global_tokens = world * accum * 8  # 8 local tokens = 2 sequences of 4
    loaders = [DistributedTokenLoader(paths, r, world, "cpu") for r in range(world)]
    stream = np.concatenate([everything] * 4).astype(np.int64)
    pos = 0
    for step in range(12):  # long enough to cross both shard boundaries and wrap
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(global_tokens, seq_len, accum)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, seq_len)
            local = stream[pos + r * 9:pos + (r + 1) * 9]
            assert x.flatten().tolist() == local[:-1].tolist() and y.flatten().tolist() == local[1:].tolist()
        pos += world * 9
    for loader in loaders:
        loader.reset()
    x, _ = loaders[1].next_batch(global_tokens, seq_len, accum)
    assert x.flatten().tolist() == stream[9:17].tolist()
    with pytest.raises(ValueError, match="multiple of seq_len"):
        loaders[0].next_batch(global_tokens, 5, accum)
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(paths, 2, 2, "cpu")


def test_load_val_tokens_keeps_whole_windows(tmp_path):
    paths, everything = _write_shards(tmp_path, "val", [40, 27])
    for seq_len in (1, 8, 66):
        val = load_val_tokens(paths, seq_len)
        kept = ((everything.size - 1) // seq_len) * seq_len + 1
        assert val.dtype == torch.int64 and val.tolist() == everything[:kept].tolist()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_val_tokens(paths, 67)


def test_byte_sidecars_pair_with_their_val_shards(tmp_path):
    """A CaseOps dataset's `*_val_bytes_*` sidecars are never taken for val shards; each pairs with its shard by
    name, its counts cut with the val tokens; a sidecar of another length, or a missing one, is named."""
    paths, _ = _write_shards(tmp_path, "val", [40, 27])
    assert sidecar_paths(paths) == [] and load_val_bytes(paths, 60) is None
    counts = [np.arange(40) % 5, np.arange(27) % 3]
    for shard, c in zip(paths, counts):
        write_shard(shard.with_name(shard.name.replace("_val_", "_val_bytes_")), c)
    assert shard_paths(tmp_path, "val") == paths  # the sidecars match *_val_*.bin too, and are left out
    assert [p.name for p in sidecar_paths(paths)] == ["toy_val_bytes_000000.bin", "toy_val_bytes_000001.bin"]
    got = load_val_bytes(paths, 60)
    assert got.dtype == torch.int32 and got.tolist() == np.concatenate(counts)[:60].tolist()
    write_shard(tmp_path / "toy_val_bytes_000001.bin", np.zeros(26, dtype=np.int64))
    with pytest.raises(ShardError, match=r"toy_val_bytes_000001.bin: 26 byte counts for the 27 tokens of \S+toy_val_000001.bin"):
        load_val_bytes(paths, 60)
    (tmp_path / "toy_val_bytes_000001.bin").unlink()
    with pytest.raises(ShardError, match=r"toy_val_bytes_000001.bin: missing; the other val shards have byte sidecars"):
        load_val_bytes(paths, 60)


def test_document_segments_follow_r1s_rule():
    """cu_seqlens as R1 builds them (the independent reference's build_cu_seqlens): 0, every BOS, every max_len
    tokens of a document counted from its start, the length, padded to a multiple of pad_to entries."""
    import frontier_reference as ref

    assert document_segments(torch.tensor([5, 1, 7, 7, 7, 1, 9]), 2, pad_to=4).tolist() == [0, 1, 3, 5, 7, 7, 7, 7]
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, 4, (int(torch.randint(1, 200, (1,), generator=gen)),), generator=gen)
        for max_len in (1, 5, 48):
            assert torch.equal(document_segments(ids, max_len, pad_to=16),
                               ref.build_cu_seqlens(ids, max_len=max_len, pad_to=16))
