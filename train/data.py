"""Token shards on disk and the streams that feed training and evaluation (SPEC 1).

A shard is a 1024-byte header of 256 little-endian int32 ([0] magic, [1] version, [2] token count N,
the rest zero) followed by N little-endian uint16 tokens; byte-compatible with the challenge's FineWeb
shards. Documents are packed as [BOS] + ids with no EOS and run across shard boundaries. A CaseOps
dataset also has one byte sidecar per val shard, `*_val_bytes_NNNNNN.bin` beside `*_val_NNNNNN.bin`:
the same format, value i the original UTF-8 bytes token i stands for (0 for BOS).

The streams: DistributedTokenLoader (plain contiguous [batch, seq_len] rows), PackedLoader (R1's training
stream: one packed row per rank and micro-batch, read from each shard's first BOS, with cu_seqlens cut at
document starts; prepared by worker threads) and ShuffledSequenceLoader (R1's GPTQ calibration rows at
shuffled starts, seeded by the rank); load_val_tokens for evaluation.

This module is a leaf: of the project it imports only model.io (the atomic write), never the model, the
training loop or quant/.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.io import write_atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")


class ShardError(ValueError):
    """Shards that cannot feed a run: a file not in the format above, a token id outside the vocab, too few
    val tokens for one evaluation window, no shard long enough for one batch. The message names the file(s)
    and what is wrong."""


def _read_header(path: Path) -> int:
    """Validate the header and the file size; return the token count."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file does not exist") from None
    if path.is_dir():
        raise ShardError(f"{path}: is a directory, not a shard file")
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: wrong magic {int(header[0])} in the header (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: file size {size} bytes does not match the header's token count {count} "
                         f"(expected {HEADER_BYTES} + 2*{count} = {HEADER_BYTES + 2 * count}); truncated or corrupt")
    return count


def load_shard(path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (a 100M-token shard is never read whole)."""
    path = Path(path)
    count = _read_header(path)
    if count == 0:  # numpy cannot memory-map zero bytes
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def write_shard(path, tokens) -> None:
    """Write tokens (1-D ints in [0, 65535]) as a shard, atomically: temp file in the same folder, then rename."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"write_shard({path}): tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ValueError(f"write_shard({path}): token ids must lie in [0, 65535] (uint16), "
                         f"got min {int(arr.min())} max {int(arr.max())}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    write_atomic(path, [header.tobytes(), arr.astype(TOKEN_DTYPE, copy=False).tobytes()])


def shard_paths(data_path, split: str) -> list[Path]:
    """Sorted `*_{split}_*.bin` shards in the folder data_path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = Path(data_path)
    if folder.is_file():
        raise FileNotFoundError(f"DATA_PATH={folder} is a file; DATA_PATH must be the folder that holds the "
                                f"*_train_*.bin and *_val_*.bin shards (here perhaps {folder.parent})")
    # the val byte sidecars (*_val_bytes_*) share the val shards' pattern and are not token shards
    paths = sorted(p for p in folder.glob(f"*_{split}_*.bin") if "_val_bytes_" not in p.name) \
        if folder.is_dir() else []
    if not paths:
        where = "does not exist" if not folder.is_dir() else f"has no *_{split}_*.bin shards"
        raise FileNotFoundError(
            f"data folder {folder} {where}. Build the embedded corpus with `python -m train.prepare` "
            f"(data/datasets/embedded_sp1024) or download FineWeb with `python -m train.download` "
            f"(data/datasets/fineweb10B_sp1024), then point DATA_PATH at that folder")
    return paths


def check_token_ids(paths, vocab_size: int, rank: int = 0, world_size: int = 1) -> None:
    """Raise ShardError naming the file and the token index of the first id >= vocab_size in the shards.

    At start-up, so a bad id stops the run before its first step rather than mid-run (training) or after
    it (validation). Each shard's max is one pass over its memmap; the position is looked for only in a bad
    shard. Under torch.distributed rank r scans paths[r::world_size] and every rank raises the same error
    (a malformed shard's ShardError too).
    """
    paths = [Path(p) for p in paths]
    bad = None  # (index in paths, message) of this rank's first bad shard
    for i in range(rank, len(paths), world_size):
        try:
            tokens = load_shard(paths[i])
        except ShardError as err:  # shared too: a rank that raised alone would leave the others waiting
            bad = (i, str(err))
            break
        if tokens.size and int(tokens.max()) >= vocab_size:
            position = int(np.argmax(tokens >= vocab_size))
            bad = (i, f"{paths[i]}: token id {int(tokens[position])} at token {position:,} is >= VOCAB_SIZE="
                      f"{vocab_size}; was this shard made with a different tokenizer?")
            break
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        found = [None] * world_size
        dist.all_gather_object(found, bad)
        bad = min((b for b in found if b is not None), default=None)
    if bad is not None:
        raise ShardError(bad[1])


class TokenStream:
    """Tokens of the shards in sorted order, read sequentially and wrapping around forever."""

    def __init__(self, paths):
        self.paths = sorted(Path(p) for p in paths)
        if not self.paths:
            raise ValueError("TokenStream needs at least one shard path")
        for p in self.paths:  # fail at start-up, not hours into a run
            _read_header(p)
        self.reset()

    def reset(self) -> None:
        self._file = 0
        self._pos = 0
        self._tokens = load_shard(self.paths[0])

    def _next_file(self) -> None:
        self._file = (self._file + 1) % len(self.paths)
        self._pos = 0
        self._tokens = load_shard(self.paths[self._file])

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (a uint16 copy), crossing shard boundaries and wrapping as needed."""
        out = np.empty(n, dtype=TOKEN_DTYPE)
        filled, empty_in_a_row = 0, 0
        while filled < n:
            available = len(self._tokens) - self._pos
            if available == 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.paths):
                    raise ShardError(f"every shard is empty: {[str(p) for p in self.paths]}")
                self._next_file()
                continue
            empty_in_a_row = 0
            k = min(available, n - filled)
            out[filled:filled + k] = self._tokens[self._pos:self._pos + k]
            filled += k
            self._pos += k
        return out


class DistributedTokenLoader:
    """Per step, one contiguous chunk of world_size * (local_tokens + 1) tokens; rank r takes slice r."""

    def __init__(self, paths, rank: int, world_size: int, device):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.stream = TokenStream(paths)

    def reset(self) -> None:
        """Back to the start of the stream (the trainer calls this after compile warmup)."""
        self.stream.reset()

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int):
        """(x, y) int64 [local_tokens // seq_len, seq_len] on the device, y = x shifted by one token."""
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if local_tokens < seq_len or local_tokens % seq_len:
            raise ValueError(f"global_tokens={global_tokens} / (world_size={self.world_size} * grad_accum_steps="
                             f"{grad_accum_steps}) = {local_tokens} tokens per micro-batch, which must be a "
                             f"positive multiple of seq_len={seq_len}")
        span = local_tokens + 1  # one extra token so the last target exists
        chunk = self.stream.take(self.world_size * span)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        else:
            local = local.to(self.device)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)


PREFETCH_BATCHES = 2        # batches the PackedLoader worker keeps ready ahead of the trainer (R1: two)
_BOS_SCAN_CHUNK = 1 << 20   # tokens per vectorized pass when looking for a shard's first BOS


def first_bos(tokens: np.ndarray, bos_id: int = 1) -> int | None:
    """Index of the first BOS in a shard, or None when it has none. Vectorized (np.flatnonzero) over chunks,
    so a 1e8-token memmap is read only up to its first BOS, never copied whole."""
    for begin in range(0, tokens.size, _BOS_SCAN_CHUNK):
        hits = np.flatnonzero(tokens[begin:begin + _BOS_SCAN_CHUNK] == bos_id)
        if hits.size:
            return begin + int(hits[0])
    return None


class PackedLoader:
    """R1's training stream (its DocumentPackingLoader): each rank's micro-batch is one packed row of
    tokens_per_rank tokens, with attention segments at every document start.

    Shards are read in sorted order, each from its first BOS (the head of a shard continues the previous
    shard's last document and is never trained on; a shard without BOS is skipped). A call takes the next
    global span of world_size * (tokens_per_rank + 1) stream tokens; rank r keeps slice r, inputs its first
    tokens_per_rank tokens and targets its last, so the token between two ranks' slices is a target of rank r
    and an input of no rank. When the span does not fit in the rest of the shard (cursor + span > size;
    ending exactly at the end is kept), the rest is dropped and the loader moves on to the next shard, wrapping
    to shard 0 after the last. No RNG: the stream depends only on the files and the shapes.

    With prefetch, one worker thread builds the next PREFETCH_BATCHES batches in stream order, opening the next
    shard when a batch needs it (R1 reads shards in a second thread; a memmap makes opening one cheap), so
    prefetch changes when work is done, never which tokens a call returns. A worker's exception is raised by
    next_batch in the caller's thread, and again by every later call until reset().
    """

    def __init__(self, files, rank: int, world_size: int, tokens_per_rank: int, max_doc_len: int = 2048, *,
                 bos_id: int = 1, device="cpu", prefetch: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: rank {rank} must lie in [0, world_size={world_size})")
        if tokens_per_rank <= 0 or max_doc_len <= 0:
            raise ValueError(f"PackedLoader: tokens_per_rank ({tokens_per_rank}) and max_doc_len ({max_doc_len}) "
                             "must be positive")
        self.files = sorted(Path(p) for p in files)
        if not self.files:
            raise ValueError("PackedLoader needs at least one shard path")
        self.rank, self.world_size = rank, world_size
        self.tokens_per_rank, self.max_doc_len, self.bos_id = tokens_per_rank, max_doc_len, bos_id
        self.span = tokens_per_rank + 1                  # one extra token so the last target exists
        self.global_span = world_size * self.span
        self.device = torch.device(device)
        # fail at start-up on a malformed shard, or when no shard is even long enough for one span
        if max(_read_header(p) for p in self.files) < self.global_span:
            raise ShardError(self._too_short())
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="PackedLoader") if prefetch else None
        self._pending = deque()                          # futures of the prepared batches, in stream order
        self._closed = False
        self.reset()

    def _too_short(self) -> str:
        return (f"no training shard holds one global span of {self.global_span:,} tokens (world_size "
                f"{self.world_size} x (tokens_per_rank {self.tokens_per_rank:,} + 1)) from its first BOS (id "
                f"{self.bos_id}): {[str(p) for p in self.files]}")

    def reset(self) -> None:
        """Back to shard 0's first BOS, as a new loader (the trainer calls this after its compile warmup)."""
        if self._closed:
            raise RuntimeError("PackedLoader.reset after close()")
        for future in self._pending:
            future.cancel()
        wait(self._pending)  # the batch being built finishes before the state it reads is replaced
        self._pending.clear()
        self._shard, self._tokens, self._cursor, self._error = -1, None, None, None
        if self._pool is not None:
            self._pending.extend(self._pool.submit(self._produce) for _ in range(PREFETCH_BATCHES))

    def _produce(self):
        """The next (span tokens, cu_seqlens) of this rank, on the CPU (pinned for a CUDA device)."""
        if self._error is not None:
            raise self._error
        try:
            tried = 0
            while self._cursor is None or self._cursor + self.global_span > self._tokens.size:
                if tried == len(self.files):
                    raise ShardError(self._too_short())
                self._shard = (self._shard + 1) % len(self.files)
                self._tokens = load_shard(self.files[self._shard])
                self._cursor = first_bos(self._tokens, self.bos_id)
                tried += 1
            begin = self._cursor + self.rank * self.span
            local = torch.from_numpy(self._tokens[begin:begin + self.span].astype(np.int64))
            self._cursor += self.global_span
        except BaseException as err:
            self._error = err
            raise
        segments = document_segments(local[:-1], self.max_doc_len, self.bos_id)
        if self.device.type == "cuda":
            local, segments = local.pin_memory(), segments.pin_memory()
        return local, segments

    def next_batch(self):
        """(x, y, cu_seqlens): x, y int64 [1, tokens_per_rank] and cu_seqlens int32, on the device."""
        if self._closed:
            raise RuntimeError("PackedLoader.next_batch after close()")
        if self._pool is None:
            local, segments = self._produce()
        else:
            future = self._pending.popleft()
            self._pending.append(self._pool.submit(self._produce))
            local, segments = future.result()
        pinned = self.device.type == "cuda"
        local, segments = local.to(self.device, non_blocking=pinned), segments.to(self.device, non_blocking=pinned)
        return local[:-1].view(1, -1), local[1:].view(1, -1), segments

    def close(self) -> None:
        """Stop the worker thread (also when the loader is garbage-collected: the pool's thread then exits)."""
        if not self._closed and self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
        self._closed = True


class ShuffledSequenceLoader:
    """R1's GPTQ calibration batches: rows of seq_len + 1 tokens at shuffled, phase-shifted starts.

    Rank r owns sorted(files)[r::world_size] and draws from numpy Generator(PCG64(r)), seeded by the rank so
    the calibration data does not depend on SEED. Each owned file gets a random phase and the list of starts
    phase + seq_len * permutation; a row picks a file with probability proportional to its remaining starts
    and pops that file's last start. When every list is empty they are all rebuilt, continuing the same rng.
    Rows cross documents; there are no segments.
    """

    def __init__(self, files, rank: int, world_size: int, seq_len: int, seqs_per_batch: int, *, device="cpu"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShuffledSequenceLoader: rank {rank} must lie in [0, world_size={world_size})")
        if seq_len <= 0 or seqs_per_batch <= 0:
            raise ValueError(f"ShuffledSequenceLoader: seq_len ({seq_len}) and seqs_per_batch ({seqs_per_batch}) "
                             f"must be positive")
        all_files = sorted(Path(p) for p in files)
        self.files = all_files[rank::world_size]
        if not self.files:
            raise ShardError(f"rank {rank} of world_size {world_size} owns no shard: there are only "
                             f"{len(all_files)} ({[str(p) for p in all_files]})")
        self.seq_len, self.seqs_per_batch = seq_len, seqs_per_batch
        self.device = torch.device(device)
        self._tokens = [load_shard(p) for p in self.files]
        if all(t.size < seq_len + 1 for t in self._tokens):
            sizes = [f"{p} ({t.size} tokens)" for p, t in zip(self.files, self._tokens)]
            raise ShardError(f"rank {rank}'s shards are all shorter than one sequence of seq_len + 1 = "
                             f"{seq_len + 1} tokens: {sizes}")
        self._rng = np.random.Generator(np.random.PCG64(rank))
        self._build_start_lists()

    def _build_start_lists(self) -> None:
        self._starts = []
        for tokens in self._tokens:
            max_phase = min(self.seq_len - 1, max(0, tokens.size - (self.seq_len + 1)))
            phase = int(self._rng.integers(max_phase + 1))
            n_seq = max(0, (tokens.size - 1 - phase) // self.seq_len)
            self._starts.append((phase + self.seq_len * self._rng.permutation(n_seq)).tolist())

    def _next_start(self) -> tuple[int, int]:
        remaining = np.array([len(s) for s in self._starts], dtype=np.float64)
        if not remaining.any():
            self._build_start_lists()
            remaining = np.array([len(s) for s in self._starts], dtype=np.float64)
        file = int(self._rng.choice(len(self._starts), p=remaining / remaining.sum()))
        return file, self._starts[file].pop()

    def next_batch(self):
        """(x, y) int64 [seqs_per_batch, seq_len] on the device, y = x shifted by one token."""
        rows = np.empty((self.seqs_per_batch, self.seq_len + 1), dtype=np.int64)
        for row in rows:
            file, start = self._next_start()
            row[:] = self._tokens[file][start:start + self.seq_len + 1]
        rows = torch.from_numpy(rows)
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def sidecar_paths(val_paths) -> list[Path]:
    """The byte sidecar of each val shard (`*_val_NNNNNN.bin` -> `*_val_bytes_NNNNNN.bin`), [] when none has
    one; ShardError when only some have, naming the first without."""
    pairs = [(p, p.with_name(p.name.replace("_val_", "_val_bytes_", 1))) for p in map(Path, val_paths)]
    present = [side.is_file() for _, side in pairs]
    if any(present) and not all(present):
        missing = next(side for (_, side), there in zip(pairs, present) if not there)
        raise ShardError(f"{missing}: missing; the other val shards have byte sidecars, so every one must")
    return [side for _, side in pairs] if all(present) and pairs else []


def load_val_bytes(val_paths, kept: int) -> torch.Tensor | None:
    """The val tokens' original byte counts from the sidecars (int32, cut to the `kept` tokens
    load_val_tokens keeps), or None without sidecars. A sidecar whose header or length disagrees with its val
    shard is a ShardError naming both files."""
    sides = sidecar_paths(val_paths)
    if not sides:
        return None
    parts = []
    for shard, side in zip(val_paths, sides):
        counts = load_shard(side)
        tokens = _read_header(Path(shard))
        if counts.size != tokens:
            raise ShardError(f"{side}: {counts.size} byte counts for the {tokens} tokens of {shard}; a sidecar "
                             f"holds one count per token of its val shard")
        parts.append(counts)
    return torch.from_numpy(np.concatenate(parts)[:kept].astype(np.int32))


def document_segments(ids: torch.Tensor, max_len: int, bos_id: int = 1, pad_to: int = 64) -> torch.Tensor:
    """R1's attention segments of one packed row (cu_seqlens, int32): a segment starts at 0 and at every
    BOS, and again every max_len tokens counted from its document's start; then the row's length, the
    offsets padded with copies of it to a multiple of pad_to entries (empty segments, no-ops)."""
    T = ids.numel()
    at = torch.arange(T, device=ids.device)
    starts = torch.where(ids.reshape(-1) == bos_id, at, torch.zeros_like(at))
    doc_start = starts.cummax(0).values                 # each token's document start (0 before the first BOS)
    cut = ((at - doc_start) % max_len == 0)              # a document start, or max_len tokens into one
    offsets = torch.cat((at[cut], torch.tensor([T], device=ids.device))).to(torch.int32)
    padded = -(-offsets.numel() // pad_to) * pad_to
    return torch.cat((offsets, offsets.new_full((padded - offsets.numel(),), T)))


def load_val_tokens(paths, seq_len: int) -> torch.Tensor:
    """All val tokens as int64, cut to ((N - 1) // seq_len) * seq_len + 1 so every window is whole."""
    paths = sorted(Path(p) for p in paths)
    if not paths:
        raise ValueError("load_val_tokens needs at least one val shard path")
    tokens = np.concatenate([load_shard(p) for p in paths])
    usable = usable_val_tokens(paths, tokens.size, seq_len)
    return torch.from_numpy(tokens[:usable].astype(np.int64))


def usable_val_tokens(paths, count: int, seq_len: int) -> int:
    """How many of the val shards' `count` tokens load_val_tokens keeps: ((count - 1) // seq_len) * seq_len + 1;
    ShardError when that is not even one window."""
    usable = ((count - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"val shards {[str(p) for p in paths]} hold {count} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}, one evaluation window (EVAL_SEQ_LEN={seq_len} is longer than the val set)")
    return usable + 1
