"""The challenge metric, val_bpb: nats per token turned into bits per UTF-8 byte of text (SPEC 2).

    val_bpb = sum(nll_nats) / (ln 2 * sum(bytes)),   bytes(y | x) = base_bytes[y] + (leading space of y
                                                      unless the previous token x is a boundary)

summed in float64 over every scored target and all-reduced across ranks. With a CaseOps byte sidecar
(train/data.py load_val_bytes) a target's bytes are the sidecar's count of original UTF-8 bytes instead
of the lookup tables'. Three ways to cut the val stream: non-overlapping windows (cheap, used while
training), sliding windows (the Ouroboros entry's reported score: every target sees at least window -
stride tokens of context) and documents (EVAL_MODE=doc, R1's: spans of batch_seqs x window tokens, each one
row whose attention is cut at every BOS and every window tokens of a document). All three score every
target exactly once (R1's own evaluator drops up to 141,312 targets depending on the number of GPUs;
this one does not). `validate(model, ...)` is the one evaluation pass of a model (eval mode, no_grad, bf16
autocast on CUDA) that training, the export step and the eval benchmark run.

This module is a leaf: it imports nothing from the model, the training loop or quant/. The unigram
reference val_bpb is train/unigram.py's CLI (kept apart: it is not on a run's path, so not in the bundle).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

from train.data import document_segments

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

LEADING_SPACE = "\u2581"  # sentencepiece's "▁"
# The name of each evaluation mode in the run log's score lines (final_<name>, final_int6_<name>_exact).
SCORE_NAMES = {"sliding": "sliding_window", "doc": "doc_isolated"}
# observe(targets_at, logits, nll), called by every evaluator (these and train.ttt's) for each batch of scored
# targets: targets_at int64 [n], the index into val_tokens of each scored target token; logits [n, V], the
# (softcapped) logits its score came from, before any log_softmax; nll fp32 [n], the nll added to the sums.
# What train/legality.py's audit watches (causality, every target once, a full distribution). None: no cost.
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def build_byte_luts(sp, vocab_size: int):
    """(base_bytes int16, has_leading_space bool, is_boundary bool), each of length vocab_size.

    Control, unknown and unused ids count 0 bytes and are boundaries (a space after them is not text);
    byte-fallback pieces <0xNN> count 1; any other piece counts the UTF-8 length of its text without
    one leading "▁", which is counted per target only when the previous token is not a boundary.
    Ids the tokenizer does not have (vocab padded beyond sp.vocab_size()) are boundaries with 0 bytes.
    """
    sp_size = sp.vocab_size()
    if vocab_size < sp_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {sp_size} pieces")
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.ones(vocab_size, dtype=np.bool_)
    for i in range(sp_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(LEADING_SPACE):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return torch.from_numpy(base_bytes), torch.from_numpy(has_leading_space), torch.from_numpy(is_boundary)


def target_bytes(prev_ids: torch.Tensor, ids: torch.Tensor, luts) -> torch.Tensor:
    """Bytes of text each target id stands for, given the token before it (same shapes, int64)."""
    base_bytes, has_leading_space, is_boundary = luts
    space = has_leading_space[ids] & ~is_boundary[prev_ids]
    return base_bytes[ids].long() + space.long()


def sliding_windows(num_targets: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, length, first_scored_offset) per window over num_targets targets; every target scored once.

    Target t is token t + 1, predicted from tokens 0..t. A window feeds tokens [start, start + length)
    and predicts targets [start, start + length), scoring those from start + first_scored_offset. With
    stride None (or >= window) the windows are consecutive and score everything. Otherwise starts are
    0, S, 2S, ...; the first window scores all its targets and every later window scores from where the
    previous one stopped to its end, so a full window scores its last S targets (with >= window - S
    tokens of context), and windows near the end shorten their scored span instead of re-scoring the
    tail; windows left with nothing to score are dropped.
    """
    if num_targets < 1 or window < 1:
        raise ValueError(f"need num_targets >= 1 and window >= 1, got {num_targets} and {window}")
    if stride is None or stride >= window:
        return [(s, min(window, num_targets - s), 0) for s in range(0, num_targets, window)]
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    windows, scored_to = [], 0
    for start in range(0, num_targets, stride):
        end = min(start + window, num_targets)
        if end > scored_to:
            windows.append((start, end - start, scored_to - start))
            scored_to = end
        if end == num_targets:
            break
    return windows


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_val(val_tokens: torch.Tensor, luts, val_bytes: torch.Tensor | None) -> None:
    if val_tokens.ndim != 1 or val_tokens.numel() < 2:
        raise ValueError(f"val_tokens must be 1-D with at least 2 tokens, got shape {tuple(val_tokens.shape)}")
    vocab = luts[0].numel()
    low, high = int(val_tokens.min()), int(val_tokens.max())
    if low < 0 or high >= vocab:  # caught here: on CUDA an out-of-range id is a device-side assert, not a message
        raise ValueError(f"val_tokens hold ids in [{low}, {high}], outside the byte tables' vocab [0, {vocab}); "
                         f"were the val shards made with a different tokenizer?")
    if val_bytes is not None and val_bytes.shape != val_tokens.shape:
        raise ValueError(f"val_bytes {tuple(val_bytes.shape)} must hold one count per val token {tuple(val_tokens.shape)}")


def _bpb(sums: torch.Tensor, world: int) -> tuple[float, float]:
    """(val_loss, val_bpb) from this rank's float64 [nll nats, bytes, scored targets], summed over ranks."""
    if world > 1:
        dist.all_reduce(sums)
    nll_sum, byte_sum, count = sums.tolist()
    if byte_sum <= 0:
        raise ValueError("the scored val targets stand for 0 bytes of text; check the byte lookup tables")
    return nll_sum / count, nll_sum / (math.log(2) * byte_sum)


@torch.no_grad()  # no_grad rather than inference_mode: tensors a model caches here stay usable in training
def evaluate_bpb(logits_fn, val_tokens: torch.Tensor, luts, seq_len: int, stride: int | None = None,
                 batch_seqs: int = 32, device="cpu", val_bytes: torch.Tensor | None = None,
                 observe: Observer | None = None) -> tuple[float, float]:
    """(val_loss in nats per scored token, val_bpb) of logits_fn over val_tokens.

    logits_fn(ids int64 [B, seq_len]) -> logits [B, seq_len, V] must be causal: every window is padded
    to seq_len at its end and the padded positions are never scored; B is the same for every batch.
    stride None or >= seq_len: non-overlapping windows; otherwise sliding windows with that stride (see
    sliding_windows). val_bytes: the bytes of each val token (a sidecar), charged instead of the lookup
    tables'. Under torch.distributed the windows are split over ranks and the float64 sums all-reduced.
    observe: called with every batch's scored targets (see Observer).
    """
    _check_val(val_tokens, luts, val_bytes)
    device = torch.device(device)
    windows = sliding_windows(val_tokens.numel() - 1, seq_len, stride)
    rank, world = _rank_and_world()
    mine = windows[rank * len(windows) // world:(rank + 1) * len(windows) // world]
    luts = tuple(t.to(device) for t in luts)
    last = val_tokens.numel() - 1
    offsets = torch.arange(seq_len, device=val_tokens.device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll nats, bytes, scored targets
    rows = min(batch_seqs, len(mine))
    for b in range(0, len(mine), batch_seqs):
        # Every batch is [rows, seq_len]: a short last batch is topped up with an unscored copy of its last
        # window, so a compiled model never sees a new shape (and never recompiles) at the end.
        chunk = mine[b:b + batch_seqs]
        chunk = chunk + [(chunk[-1][0], chunk[-1][1], chunk[-1][1])] * (rows - len(chunk))
        batch = torch.tensor(chunk, dtype=torch.long, device=val_tokens.device)
        starts, lengths, first_scored = batch[:, :1], batch[:, 1:2], batch[:, 2:3]
        positions = starts + offsets  # padded positions repeat the last token; they are never scored
        x = val_tokens[positions.clamp(max=last - 1)].to(device, non_blocking=True)
        y = val_tokens[(positions + 1).clamp(max=last)].to(device, non_blocking=True)
        scored = ((offsets >= first_scored) & (offsets < lengths)).to(device)
        logits = logits_fn(x)
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for ids of shape {tuple(x.shape)}; "
                             f"expected [{x.shape[0]}, {x.shape[1]}, vocab]")
        nll = F.cross_entropy(logits[scored].float(), y[scored], reduction="none")
        if observe is not None:
            observe((positions + 1)[scored.to(positions.device)], logits[scored], nll)
        sums[0] += nll.double().sum()  # per-token nll in fp32, summed in fp64 (sums do not depend on batching)
        if val_bytes is None:
            sums[1] += target_bytes(x[scored], y[scored], luts).sum().double()
        else:
            sums[1] += val_bytes[(positions + 1).clamp(max=last)].to(device)[scored].sum().double()
        sums[2] += scored.sum()
    return _bpb(sums, world)


@torch.no_grad()
def evaluate_documents(logits_fn, val_tokens: torch.Tensor, luts, seq_len: int, batch_seqs: int = 32,
                       device="cpu", val_bytes: torch.Tensor | None = None,
                       observe: Observer | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) with attention cut at documents, as R1 scores its diagnostic evaluation.

    The targets go in spans of batch_seqs x seq_len (the last span shorter), each fed as one row with
    logits_fn(ids [1, n], cu_seqlens) -> logits [1, n, V], whose segments start at the span's first token,
    at every BOS and every seq_len tokens of a document (train/data.py document_segments): context never
    crosses a BOS, and restarts at each span. Every target is scored once. Spans are split over ranks;
    the float64 sums are all-reduced. val_bytes and observe as in evaluate_bpb."""
    _check_val(val_tokens, luts, val_bytes)
    device = torch.device(device)
    targets = val_tokens.numel() - 1
    span = batch_seqs * seq_len
    starts = list(range(0, targets, span))
    rank, world = _rank_and_world()
    luts = tuple(t.to(device) for t in luts)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for start in starts[rank * len(starts) // world:(rank + 1) * len(starts) // world]:
        end = min(start + span, targets)
        x = val_tokens[start:end].to(device, non_blocking=True)
        y = val_tokens[start + 1:end + 1].to(device, non_blocking=True)
        logits = logits_fn(x[None], document_segments(x, seq_len))
        if logits.ndim != 3 or tuple(logits.shape[:2]) != (1, x.numel()):
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for ids of shape (1, {x.numel()}); "
                             f"expected [1, {x.numel()}, vocab]")
        nll = F.cross_entropy(logits[0].float(), y, reduction="none")
        if observe is not None:
            observe(torch.arange(start + 1, end + 1), logits[0], nll)
        sums[0] += nll.double().sum()
        if val_bytes is None:
            sums[1] += target_bytes(x, y, luts).sum().double()
        else:
            sums[1] += val_bytes[start + 1:end + 1].sum().double()
        sums[2] += end - start
    return _bpb(sums, world)


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA (the matrices run in bf16 there); nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validate(model: Callable, base_model: torch.nn.Module, val_tokens: torch.Tensor, luts, *, seq_len: int,
             stride: int | None, batch_seqs: int, device: torch.device, mode: str = "sliding",
             val_bytes: torch.Tensor | None = None, observe: Observer | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) of model's logits (called without targets) over val_tokens, in eval mode under
    no_grad and autocast; base_model returns to the mode it was in. mode "sliding": windows (stride None =
    non-overlapping); "doc": evaluate_documents (stride unused). val_bytes: a byte sidecar, else the tables.
    observe: passed on (see Observer)."""
    was_training = base_model.training
    base_model.eval()
    try:
        with torch.no_grad(), autocast_for(device):
            if mode == "doc":
                return evaluate_documents(lambda ids, cu: model(ids, cu_seqlens=cu), val_tokens, luts, seq_len,
                                          batch_seqs=batch_seqs, device=device, val_bytes=val_bytes, observe=observe)
            return evaluate_bpb(model, val_tokens, luts, seq_len, stride=stride, batch_seqs=batch_seqs, device=device,
                                val_bytes=val_bytes, observe=observe)
    finally:
        base_model.train(was_training)
