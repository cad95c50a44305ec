"""Bench entry `ttt`: rank 0's share of R1's phased LoRA test-time training at evaluation, timed and projected.

R1's reported score (DATA_EVAL.md 4) scores 50,000 val documents (47,851,520 targets) in 782 batches of
up to 64 documents, longest batch first, chunk by chunk with per-document LoRA adapters, and pauses three
times for global SGD on documents already scored (130, 218 and 288 steps). Its seed-42 loop took 508.8 s
on 8 x H100 (scoring 424.4 s, global SGD 84.4 s), with the compile warmup (137.6 s) and decompression
(24.0 s) outside it. The issue's goal: the whole eval clock of quant/export.py evaluate_ttt_artifact
(decompress, dequantize, compile warmup, TTT) <= 400 s for the `frontier` preset, on 8 x H100.

The timed code is the real code. The model is built as evaluate_ttt_artifact builds it (dense, eval mode,
every weight frozen; random weights, since the cost does not depend on them), its TTT forward compiled
(dynamic shapes) and warmed by train.ttt.compile_warmup on CUDA; that warmup is timed on its own. Then a
few train.ttt.global_sgd steps of rank 0's share, timed per step after one untimed step: on one GPU,
GLOBAL_TTT_CHUNK_TOKENS / 8 tokens per step, the same 2 sequences of 2048 that rank 0 of 8 takes from
each 32,768-token chunk (the gradient all-reduce over 8 GPUs is not in it). Then a sample of the
batches of train.ttt.find_docs and batch_queue over a synthetic val stream, each through
train.ttt.score_batch with its Clock (score forward, adapter backward, optimizer), the adapters
prepared as evaluate_ttt prepares them (a warm A, a fresh set for the batch of 16): the longest batch
first, then one from the middle of each of equal strides through the rest of the queue (--fraction of
its batches, at least MIN_SAMPLE). --max-steps cuts a sampled batch to its documents' first chunks (it
then runs exactly that batch's first steps, but the last, which scores without training), so that a
short GPU call still starts with the longest batch.

The synthetic val stream (an assumption; the GPU machine has no data and the token values change no
cost): R1's 50,000 documents and 47,851,520 targets, document lengths (tokens, the trailing BOS
included) heavy-tailed: the 16 longest (R1's longest batch: 50,000 mod 64 documents) geometric from
30,339 to 97,114 tokens, the other 49,984 log-normal quantiles with sigma 1 (bench/flops.py's
DOC_LENGTH_SIGMA), scaled so the targets total R1's exactly. Trained on the documents R1's pauses kept
(the shortest 833, 1666, 2500 of 1296, 2128, 2960 scored), its phases take 122, 213 and 288 SGD steps
(R1: 130, 218, 288); 5,088 of its documents are longer than a 2048-token window. Random ids, a BOS at
each document start, the documents in a seeded random order, byte counts 1-4 per token.

Projection to 8 GPUs. Per part, a batch's seconds are fitted on the sampled batches as a·(steps) +
b·(size): score forward on (forwards, padded tokens forwarded), adapter backward on (training steps,
their tokens), optimizer on (training steps, training steps x adapter rows); a, b >= 0, least squares
of the relative error. Every batch of the queue is then projected from its own counts (bench-side
arithmetic on the document lengths, mirroring score_batch). Two 8-GPU estimates:
  even split  rank 0 does 1/8 of the projected queue, as a queue balanced perfectly over the ranks would
              give (the tokens split evenly when time follows tokens), plus 130 + 218 + 288 SGD steps
              (R1's) and the compile warmup;
  queue       the dynamic queue of train.ttt._Queue replayed with the projected batch times: 8 ranks
              claim batches in order, pause after their batch in flight once the scored documents reach
              a phase boundary, train on the shortest scored documents (the steps follow from those
              documents' lengths), go on; the clock ends with the last batch. No rank finishes before
              the longest batch does, which the even split ignores.
Decompression and dequantization are not timed here.

    python -m bench ttt                        # registry: one batch from the middle of the queue per call
    python -m bench.ttt_timing [--fraction 0.01] [--kernels triton torch] [--preset frontier]
                               [--max-steps N] [--sgd-steps 4] [--json PATH]

Without CUDA it is a smoke of `frontier-tiny` on a tiny synthetic stream (SMOKE_STREAM), every batch
timed, projected over that stream: CPU times, never GPU numbers.
"""
from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import torch

if not torch.cuda.is_available():  # kernel modules read this when imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
import model  # noqa: E402
from bench.eval_timing import synthetic_luts  # noqa: E402
from bench.flops import DOC_LENGTH_SIGMA  # noqa: E402
from bench.registry import Case, register  # noqa: E402
from model.cli import nonnegative_int, positive_float, positive_int  # noqa: E402
from model.io import synchronize, write_atomic  # noqa: E402
from model.lora import TTTLoRA  # noqa: E402
from train import ttt  # noqa: E402

WORLD_SIZE = 8
PRESETS = ("frontier",)
PARTS = ("score_forward", "adapter_backward", "optimizer")  # score_batch's Clock parts


@dataclass(frozen=True)
class StreamSpec:
    """A synthetic val stream: documents, their targets in all, and the longest batch's length range."""
    name: str
    docs: int
    targets: int
    longest: tuple[int, int]            # shortest and longest document of the longest batch, in tokens
    phase_steps: tuple[int, ...] = ()   # the SGD steps per phase to project (R1's); () = the replayed queue's


# DATA_EVAL.md 4.2, 4.6, 4.7 and 6 (R1, seed 42, 8 x H100)
R1_STREAM = StreamSpec("R1", docs=50_000, targets=47_851_520, longest=(30_339, 97_114), phase_steps=(130, 218, 288))
R1_SCORING_S = 424.4
R1_GLOBAL_SGD_S = 84.4
R1_LOOP_S = 508.8           # the eval time R1 reported: the loop alone
R1_WARMUP_S = 137.6         # not in R1's eval time
GOAL_EVAL_CLOCK_S = 400.0   # the goal: the whole eval clock, 8 x H100

# CPU smoke: frontier-tiny (batches of 16 documents, chunks of 128, windows of 256) on 40 documents: two
# batches of 16 and the 8 longest (up to 3 full windows); under the interpreter 3 blocks keep every switch.
SMOKE_STREAM = StreamSpec("smoke", docs=40, targets=6_000, longest=(300, 700))
SMOKE_TRITON_DEPTH = dict(num_layers=3, loop_start=1, loop_end=1, parallel_start_layer=2)
SMOKE_SGD_STEPS = 2
MIN_SAMPLE = 3                # batches timed at least: the fit has two coefficients per part
DEFAULT_FRACTION = 0.01       # of the 782 batches on CUDA: 8, the longest (~4 % of the queue's tokens) first
DEFAULT_SGD_STEPS = 4


def gpu_config(preset: str = "frontier") -> model.Config:
    """The preset as a real evaluation resolves it (the environment applies, e.g. TTT_COMPILE=0)."""
    return model.from_env(preset=preset)


def smoke_config(backend: str) -> model.Config:
    """frontier-tiny, environment ignored, cut in depth for the Triton interpreter."""
    return model.from_env(environ={}, preset="frontier-tiny", **(SMOKE_TRITON_DEPTH if backend == "triton" else {}))


# ---------------------------------------------------------------- the synthetic val stream

def document_lengths(spec: StreamSpec, batch_size: int, sigma: float = DOC_LENGTH_SIGMA) -> list[int]:
    """Document lengths in tokens (each counts its own BOS and the next document's: targets + 1), ascending,
    summing to spec.targets + spec.docs: the last batch's documents (docs mod batch_size of them)
    geometric over spec.longest, the others log-normal quantiles exp(sigma·z) at z = Φ⁻¹((r + ½) / docs),
    scaled to the rest of the total; rounding's remainder goes one token each to the longest of them."""
    top = spec.docs % batch_size or batch_size
    lo, hi = spec.longest
    longest = [round(lo * (hi / lo) ** (i / max(1, top - 1))) for i in range(top)]
    normal = NormalDist()
    weights = [math.exp(sigma * normal.inv_cdf((r + 0.5) / spec.docs)) for r in range(spec.docs - top)]
    rest, total_weight = spec.targets + spec.docs - sum(longest), sum(weights)
    body = [max(2, round(rest * w / total_weight)) for w in weights]
    remainder = rest - sum(body)
    for i in range(abs(remainder)):
        body[-1 - i % len(body)] += 1 if remainder > 0 else -1
    if body[-1] > lo or min(body) < 2:
        raise ValueError(f"{spec.name}: the log-normal body ({min(body)}..{body[-1]} tokens) must lie in [2, {lo}]")
    return body + longest


@dataclass
class ValStream:
    tokens: torch.Tensor       # int64, as train.data.load_val_tokens gives
    val_bytes: torch.Tensor    # int32 byte counts, as the CaseOps sidecar gives
    lengths: list[int]         # ascending


def synthetic_stream(spec: StreamSpec, vocab_size: int, batch_size: int, seed: int = 0) -> ValStream:
    """The stream of `spec`'s documents in a seeded random order: a BOS at each document's start (a document
    ends on the next one's BOS), random ids in [2, vocab) elsewhere; targets + 1 tokens."""
    lengths = document_lengths(spec, batch_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen)
    targets = torch.tensor(lengths, dtype=torch.long)[order] - 1
    tokens = torch.randint(2, vocab_size, (spec.targets + 1,), generator=gen)
    tokens[torch.cumsum(targets, 0) - targets] = ttt.BOS_ID
    val_bytes = torch.randint(1, 5, (spec.targets + 1,), generator=gen, dtype=torch.int32)
    return ValStream(tokens, val_bytes, lengths)


# ---------------------------------------------------------------- what score_batch does, counted

@dataclass(frozen=True)
class BatchWork:
    """score_batch's work on one batch, counted from its documents' lengths as score_batch walks them."""
    forwards: int          # chunk steps x forwards per step (one, or TTT_GRAD_STEPS where it trains)
    forward_tokens: int    # the padded ids those forwards read: rows still reading x window width
    train_steps: int       # backward + AdamW steps
    train_tokens: int      # the ids their forwards read
    adapter_rows: int      # documents in the batch: AdamW steps every row's adapters

    def features(self, part: str) -> tuple[float, float]:
        """(count, size) whose linear combination fits the part's seconds."""
        return {"score_forward": (self.forwards, self.forward_tokens),
                "adapter_backward": (self.train_steps, self.train_tokens),
                "optimizer": (self.train_steps, self.train_steps * self.adapter_rows)}[part]


def batch_work(docs: list[ttt.Doc], cfg, trim_rows: bool = True) -> BatchWork:
    """What score_batch runs on `docs` (a batch, shortest first), step by step as it walks the chunks; trim_rows
    as score_batch's (False: a compiled forward, every row every step)."""
    chunks = sorted(-(-d.targets // cfg.ttt_chunk_size) for d in docs)
    forwards = forward_tokens = train_steps = train_tokens = 0
    for k in range(chunks[-1]):
        rows = len(chunks) - bisect.bisect_right(chunks, k) if trim_rows else len(chunks)  # who reads chunk k
        width = min(cfg.ttt_chunk_size * (k + 1), cfg.ttt_eval_seq_len)
        steps = cfg.ttt_grad_steps if chunks[-1] > k + 1 else 0  # a document with a later chunk trains
        forwards += max(1, steps)
        forward_tokens += max(1, steps) * rows * width
        train_steps += steps
        train_tokens += steps * rows * width
    return BatchWork(forwards, forward_tokens, train_steps, train_tokens, len(docs))


def cut_docs(docs: list[ttt.Doc], steps: int, chunk: int) -> list[ttt.Doc]:
    """Every document cut to at most `steps` chunks: score_batch then runs the batch's first steps - 1 chunk
    steps exactly (same rows, windows and training) and a last one that scores without training."""
    return [ttt.Doc(d.start, min(d.length, steps * chunk + 1)) for d in docs]


def sample_positions(queue_len: int, count: int) -> list[int]:
    """Queue positions to time: 0 (the longest batch), then the middle of each of count - 1 equal strides
    through the rest."""
    count = min(count, queue_len)
    stride = (queue_len - 1) / max(1, count - 1)
    return [0] + [1 + int((i + 0.5) * stride) for i in range(count - 1)]


# ---------------------------------------------------------------- the model and the timed code

class TTTBench:
    """The TTT model as evaluate_ttt_artifact builds it, a synthetic val stream's batches and queue, and
    timers for its batches (train.ttt.score_batch) and global SGD steps (train.ttt.global_sgd)."""

    def __init__(self, cfg: model.Config, backend: str, device, stream: ValStream, seed: int = 0):
        self.cfg, self.backend, self.device, self.stream = cfg, backend, torch.device(device), stream
        kernels.set_backend(backend)  # fails here, with its own message, if the backend cannot run
        kernels.set_backend(None)
        torch.manual_seed(seed)
        self.net = model.build_model(cfg).to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.forward = self.net
        self.docs = ttt.find_docs(stream.tokens, ttt.BOS_ID)  # all of them, as R1 (VAL_DOC_FRACTION=1)
        self.batches, self.queue = ttt.batch_queue(self.docs, cfg.ttt_batch_size)
        if sorted(d.length for d in self.docs) != stream.lengths:  # the construction and train.ttt must agree
            raise AssertionError("TTTBench: find_docs does not see the stream's documents")
        self.luts = tuple(t.to(self.device) for t in synthetic_luts(cfg.vocab_size, seed))
        self.val_bytes = stream.val_bytes if cfg.caseops_enabled else None
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.reusable: TTTLoRA | None = None   # the batch-size adapter set, reused as evaluate_ttt reuses it
        self.warm_a = None

    @property
    def trim_rows(self) -> bool:
        """As evaluate_ttt: finished rows leave the forward unless it is compiled (a new row count recompiles)."""
        return self.forward is self.net

    def _adapters(self, rows: int, seed: int) -> TTTLoRA:
        cfg = self.cfg
        return TTTLoRA(self.net, rows, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, cfg.ttt_k_lora, cfg.ttt_o_lora,
                       cfg.ttt_mlp_lora, generator=torch.Generator(self.device).manual_seed(seed), device=self.device)

    def warm_up(self) -> float | None:
        """evaluate_ttt_artifact's compile: on CUDA with TTT_COMPILE, torch.compile(dynamic=True) and
        train.ttt.compile_warmup. Its seconds, or None where it does not compile (the CPU)."""
        if self.device.type != "cuda" or not self.cfg.ttt_compile:
            return None
        kernels.set_backend(self.backend)
        try:
            synchronize(self.device)
            t0 = time.perf_counter()
            self.forward = torch.compile(self.net, dynamic=True)
            ttt.compile_warmup(self.forward, self.net, self.cfg, self.device)
            return time.perf_counter() - t0
        finally:
            kernels.set_backend(None)

    def time_batch(self, position: int, max_steps: int | None = None) -> dict:
        """Queue entry `position` through score_batch, timed by its Clock. As in evaluate_ttt, preparing the
        adapters (a warm A, or a fresh set for a batch of another size) and keeping the warm A after are
        charged to score_forward."""
        batch = self.batches[self.queue[position]]
        docs = [self.docs[i] for i in batch]
        cut = max_steps is not None and batch_work(docs, self.cfg).forwards > max_steps
        if cut:
            docs = cut_docs(docs, max_steps, self.cfg.ttt_chunk_size)
        kernels.set_backend(self.backend)
        try:
            clock = ttt.Clock(self.device)
            if len(batch) == self.cfg.ttt_batch_size:
                if self.reusable is None:
                    self.reusable = self._adapters(len(batch), self.cfg.seed)
                lora = self.reusable
                if self.warm_a is not None and self.cfg.ttt_warm_start_a:
                    lora.load_a_state(self.warm_a)
                else:
                    lora.reset_A(torch.Generator(self.device).manual_seed(self.cfg.seed + position))
            else:
                lora = self._adapters(len(batch), self.cfg.seed + position)
            ttt.score_batch(self.forward, lora, self.cfg, docs, self.stream.tokens, self.luts, self.val_bytes,
                            self.sums, self.device, clock, trim_rows=self.trim_rows)
            if lora is self.reusable:
                self.warm_a = lora.a_state()
            clock.lap("score_forward")
        finally:
            kernels.set_backend(None)
        return dict(position=position, batch=self.queue[position], docs=len(batch), cut=cut,
                    work=asdict(batch_work(docs, self.cfg, self.trim_rows)),
                    seconds={p: clock.seconds.get(p, 0.0) for p in PARTS})

    def sgd_stream(self, length: int) -> torch.Tensor:
        """`length` tokens of what the first global phase trains on when it pauses as soon as the queue's first
        batches reach its boundary: the boundary's shortest of their documents (by batch, row), concatenated
        as train.ttt._pause does; repeated if shorter."""
        cfg = self.cfg
        boundaries = ttt.phase_boundaries(len(self.docs), cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
        boundary = boundaries[0] if boundaries and boundaries[0] else cfg.ttt_batch_size
        scored = []
        for j in self.queue:
            scored += [(j, row, i) for row, i in enumerate(self.batches[j])]
            if len(scored) >= boundary:
                break
        kept = [self.docs[i] for _, _, i in sorted(scored)[:boundary]]
        stream = torch.cat([self.stream.tokens[d.start:d.start + d.length] for d in kept])
        return stream.repeat(-(-length // stream.numel()))[:length]

    def time_global_sgd(self, steps: int) -> float:
        """Seconds per global SGD step of rank 0's share (one GPU: GLOBAL_TTT_CHUNK_TOKENS / WORLD_SIZE tokens per
        step, the 2 sequences rank 0 of 8 takes), after one untimed step. The model's weights change."""
        share = self.cfg.replace(global_ttt_chunk_tokens=self.cfg.global_ttt_chunk_tokens // WORLD_SIZE)
        size = share.global_ttt_chunk_tokens
        stream = self.sgd_stream(size * (steps + 1) + 1)   # global_sgd skips the last chunk
        kernels.set_backend(self.backend)
        try:
            ttt.global_sgd(self.net, stream[:2 * size + 1], share, self.device)  # first-call autotune, cuBLAS setup
            synchronize(self.device)
            t0 = time.perf_counter()
            done = ttt.global_sgd(self.net, stream, share, self.device)
            synchronize(self.device)
            seconds = time.perf_counter() - t0
        finally:
            kernels.set_backend(None)
        if done != steps:
            raise AssertionError(f"time_global_sgd: {done} steps ran, {steps} asked")
        return seconds / steps


# ---------------------------------------------------------------- projection

def fit_part(features: list[tuple[float, float]], seconds: list[float]) -> tuple[float, float]:
    """(a, b) >= 0 minimising the relative error of a·count + b·size over the timed batches, i.e. the sum of
    (a·u + b·v - 1)² over (u, v) = (count, size) / seconds: both by the normal equations, else the one
    that fits better alone."""
    rows = [(c / t, s / t) for (c, s), t in zip(features, seconds) if t > 0]

    def error(a: float, b: float) -> float:
        return sum((a * u + b * v - 1) ** 2 for u, v in rows)
    uu, uv, vv = (sum(u * u for u, _ in rows), sum(u * v for u, v in rows), sum(v * v for _, v in rows))
    u1, v1 = sum(u for u, _ in rows), sum(v for _, v in rows)
    det = uu * vv - uv * uv
    if det > 1e-9 * uu * vv:  # the two columns are not (nearly) proportional
        a, b = (u1 * vv - v1 * uv) / det, (v1 * uu - u1 * uv) / det
        if a >= 0 and b >= 0:
            return a, b
    alone = ([(u1 / uu, 0.0)] if uu > 0 else []) + ([(0.0, v1 / vv)] if vv > 0 else [])
    return min(alone, key=lambda ab: error(*ab), default=(0.0, 0.0))


def replay_queue(entry_seconds: list[float], entries: list[tuple[int, list[int]]], boundaries: list[int],
                 sgd_step_s: float, chunk_tokens: int, world: int = WORLD_SIZE) -> tuple[float, list[dict]]:
    """train.ttt._Queue's dynamic schedule on `world` ranks with known batch times: (the clock at the last
    batch's end, per phase the documents scored at the pause, trained on, and the SGD steps). entries: per
    queue entry, its batch index and its documents' lengths by row. A rank that finishes a batch counts its
    documents (until the last phase); once they reach the phase's boundary every rank pauses after its
    batch in flight (one with nothing left waits); the phase trains on the boundary's first scored
    documents by (batch, row), i.e. the shortest, ceil((tokens - 1) / chunk_tokens) - 1 steps, and every
    rank goes on."""
    clock, claimed, counted, phase, phases = 0.0, 0, 0, 0, []
    while True:
        ranks = [(clock, r, None) for r in range(world)]   # (free at, rank, the entry it just finished)
        end, pause = clock, False
        while ranks:
            free_at, rank, finished = heapq.heappop(ranks)
            end = max(end, free_at)
            if finished is not None and phase < len(boundaries):
                counted += len(entries[finished][1])
                pause = pause or counted >= boundaries[phase]
            if pause or claimed == len(entry_seconds):
                continue                                    # this rank pauses, or has nothing left
            heapq.heappush(ranks, (free_at + entry_seconds[claimed], rank, claimed))
            claimed += 1
        if phase == len(boundaries):
            return end, phases
        scored = sorted((batch, row, length) for batch, lengths in entries[:claimed]
                        for row, length in enumerate(lengths))
        tokens = sum(length for *_, length in scored[:boundaries[phase]])
        steps = max(0, -(-(tokens - 1) // chunk_tokens) - 1)
        phases.append(dict(scored=len(scored), trained=min(len(scored), boundaries[phase]), steps=steps))
        clock = end + steps * sgd_step_s
        phase += 1


def project(bench: TTTBench, timed: list[dict], sgd_step_s: float, warmup_s: float | None,
            phase_steps: tuple[int, ...]) -> dict:
    """The 8-GPU estimates from the timed batches: per part a fit, every queue entry projected, the even split
    and the replayed queue (see the module docstring)."""
    cfg = bench.cfg
    fits = {part: fit_part([tuple(BatchWork(**t["work"]).features(part)) for t in timed],
                           [t["seconds"][part] for t in timed]) for part in PARTS}
    entry_work = [batch_work([bench.docs[i] for i in bench.batches[j]], cfg, bench.trim_rows) for j in bench.queue]
    entry_parts = [{part: sum(c * f for c, f in zip(fits[part], work.features(part))) for part in PARTS}
                   for work in entry_work]
    entry_seconds = [sum(parts.values()) for parts in entry_parts]
    boundaries = ttt.phase_boundaries(len(bench.docs), cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    entries = [(j, [bench.docs[i].length for i in bench.batches[j]]) for j in bench.queue]
    queue_clock, phases = replay_queue(entry_seconds, entries, boundaries, sgd_step_s, cfg.global_ttt_chunk_tokens)
    steps = phase_steps or tuple(p["steps"] for p in phases)
    even = {part: sum(p[part] for p in entry_parts) / WORLD_SIZE for part in PARTS}
    even["scoring"] = sum(even[part] for part in PARTS)
    even["global_sgd"] = sgd_step_s * sum(steps)
    warm = warmup_s or 0.0
    return dict(fits={part: list(f) for part, f in fits.items()}, even_split=even, sgd_steps=list(steps),
                longest_batch_s=entry_seconds[0], queue=dict(loop_s=queue_clock, phases=phases),
                eval_clock=dict(even_split=even["scoring"] + even["global_sgd"] + warm, queue=queue_clock + warm))


# ---------------------------------------------------------------- one backend, the table

def run_backend(cfg: model.Config, backend: str, device, stream: ValStream, spec: StreamSpec, fraction: float,
                max_steps: int | None, sgd_steps: int, log=print) -> dict:
    """Warm up, time the SGD steps and the sample, project: the result's dict (its `table` in markdown). The
    cheap numbers come first and every one is logged as it comes, so a run killed early still tells them."""
    bench = TTTBench(cfg, backend, device, stream)
    warmup_s = bench.warm_up()
    log(f"ttt[{backend}]: compile warmup " + ("not run (evaluate_ttt_artifact compiles on CUDA only)"
                                             if warmup_s is None else f"{warmup_s:.1f} s"))
    sgd_step_s = bench.time_global_sgd(sgd_steps)  # the weights it changes change no cost
    log(f"ttt[{backend}]: global SGD {sgd_step_s * 1e3:.1f} ms/step (rank 0's share, {sgd_steps} steps)")
    count = max(MIN_SAMPLE, round(fraction * len(bench.queue)))
    timed = []
    for position in sample_positions(len(bench.queue), count):
        graphs = _compiled_graphs()
        t = bench.time_batch(position, max_steps)
        t["graphs_compiled"] = _compiled_graphs() - graphs  # its time includes compiling them
        timed.append(t)
        log(f"ttt[{backend}]: queue position {position} (batch {t['batch']}, {t['docs']} docs, "
            f"{t['work']['forwards']} steps{', cut' if t['cut'] else ''}, {t['work']['forward_tokens']:,} tokens, "
            f"{t['graphs_compiled']} graphs compiled): " + " ".join(f"{p} {s:.3f}s" for p, s in t["seconds"].items()))
    result = dict(backend=backend, preset=cfg.preset, device=_device_name(device), stream=spec.name,
                  docs=len(bench.docs), targets=sum(d.targets for d in bench.docs), batches=len(bench.queue),
                  fraction=len(timed) / len(bench.queue), max_steps=max_steps, warmup_s=warmup_s, timed=timed,
                  sgd_steps_timed=sgd_steps, sgd_step_s=sgd_step_s,
                  measured={part: sum(t["seconds"][part] for t in timed) for part in PARTS},
                  **project(bench, timed, sgd_step_s, warmup_s, spec.phase_steps))
    result["table"] = table(result, gpu=torch.device(device).type == "cuda")
    return result


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _s(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def table(r: dict, gpu: bool) -> str:
    """The result as markdown: the parts, measured and projected seconds, R1's, the goal."""
    even, steps = r["even_split"], r["sgd_steps"]
    cut = " (cut to their first steps)" if any(t["cut"] for t in r["timed"]) else ""
    where = (f"{r['device']}, KERNELS={r['backend']}, preset {r['preset']}" if gpu else
             f"CPU smoke, not GPU numbers: KERNELS={r['backend']}, preset {r['preset']}; projected over the smoke stream")
    lines = [f"{where}: {len(r['timed'])} of {r['batches']} batches timed{cut} ({r['fraction']:.3g} of the queue; "
             f"{r['docs']:,} documents, {r['targets']:,} targets, {r['stream']} stream), {r['sgd_steps_timed']} global "
             f"SGD steps. Projected: rank 0's even 1/8 share of the fitted queue on 8 GPUs.", "",
             "| part | measured s | projected s, 8 GPUs | R1 seed 42, 8 x H100 |", "|---|---|---|---|"]
    rows = [("score forward", r["measured"]["score_forward"], even["score_forward"], ""),
            ("adapter backward", r["measured"]["adapter_backward"], even["adapter_backward"], ""),
            ("optimizer", r["measured"]["optimizer"], even["optimizer"], ""),
            ("scoring: the three parts", sum(r["measured"].values()), even["scoring"], f"{R1_SCORING_S}"),
            (f"global SGD ({r['sgd_steps_timed']} steps; {'+'.join(map(str, steps))} projected)",
             r["sgd_step_s"] * r["sgd_steps_timed"], even["global_sgd"], f"{R1_GLOBAL_SGD_S} (130+218+288 steps)"),
            ("compile warmup", r["warmup_s"], r["warmup_s"], f"{R1_WARMUP_S} (outside R1's eval time)")]
    lines += [f"| {name} | {_s(m)} | {_s(p)} | {ref} |" for name, m, p, ref in rows]
    clock = r["eval_clock"]
    lines += [f"| **eval clock, even split** | | **{_s(clock['even_split'])}** | {R1_LOOP_S} loop + {R1_WARMUP_S} warmup |",
              f"| **eval clock, queue replayed** | | **{_s(clock['queue'])}** | |", ""]
    phases = ", ".join(f"{p['scored']} scored / {p['trained']} trained / {p['steps']} steps" for p in r["queue"]["phases"])
    lines.append(f"Queue replayed on 8 ranks with the projected batch times: phases {phases or 'none'} "
                 f"(R1: 1296/833/130, 2128/1666/218, 2960/2500/288); the longest batch alone {_s(r['longest_batch_s'])} s.")
    lines.append("Not timed here: decompression and dequantization (R1: 24.0 s), the 8-GPU gradient all-reduce "
                 "of global SGD.")
    compiled = [t for t in r["timed"] if t["graphs_compiled"]]
    if compiled:  # the real evaluation compiles them too, once; the fit spreads their time over the queue
        lines.append(f"torch.compile compiled {sum(t['graphs_compiled'] for t in compiled)} graphs while batches were "
                     f"timed (at queue positions {', '.join(str(t['position']) for t in compiled)}): those times "
                     "include compiling, and the projection spreads it over the whole queue.")
    if gpu:
        best = min(clock.values())
        lines.append(f"Goal: eval clock <= {GOAL_EVAL_CLOCK_S:.0f} s on 8 x H100: projected {_s(clock['even_split'])} s "
                     f"(even split) / {_s(clock['queue'])} s (queue), decompression not counted: "
                     + ("within it" if max(clock.values()) <= GOAL_EVAL_CLOCK_S else
                        "not met" if best > GOAL_EVAL_CLOCK_S else "met by the even split only") + ".")
    else:
        lines.append(f"Goal: eval clock <= {GOAL_EVAL_CLOCK_S:.0f} s on 8 x H100: not measured (no GPU).")
    return "\n".join(lines) + "\n"


def summary_line(results: dict) -> str:
    """One line per backend for gpu-check's overview."""
    parts = []
    for backend, r in results.items():
        if "error" in r:
            parts.append(f"{backend}: {r['error'][:200]}")
            continue
        clock = r["eval_clock"]
        warmup = "no compile warmup" if r["warmup_s"] is None else f"compile warmup {r['warmup_s']:.1f} s"
        parts.append(f"{backend}: eval clock {clock['even_split']:.1f} s even split / {clock['queue']:.1f} s queue "
                     f"(goal {GOAL_EVAL_CLOCK_S:.0f}), {warmup}, {len(r['timed'])} batches timed")
    return "; ".join(parts)


# ---------------------------------------------------------------- registry, CLI

@register("ttt")
def cases(device: str, smoke: bool) -> list[Case]:
    """One batch from the middle of the queue through score_batch per call (compiled and warmed first on CUDA).
    The smoke runs the torch provider only: the interpreted Triton kernels take ~30 s for one such batch."""
    out = []
    for backend in ("torch",) if smoke else kernels.BACKENDS:
        cfg, spec = (smoke_config(backend), SMOKE_STREAM) if smoke else (gpu_config(), R1_STREAM)
        holder = {}

        def fn(cfg=cfg, spec=spec, backend=backend, holder=holder):
            if "bench" not in holder:  # built on the first call, so listing cases allocates nothing
                stream = synthetic_stream(spec, cfg.vocab_size, cfg.ttt_batch_size)
                holder["bench"] = TTTBench(cfg, backend, device, stream)
                holder["bench"].warm_up()
            bench = holder["bench"]
            return bench.time_batch(len(bench.queue) // 2)
        out.append(Case(kernel="ttt", provider=backend, mode="fwd+bwd", fn=fn,
                        shape=dict(preset=cfg.preset, stream=spec.name, batch="queue_middle")))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ttt_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=positive_float, default=None,
                        help=f"part of the queue's batches to time, at least {MIN_SAMPLE} (default: {DEFAULT_FRACTION} "
                             f"on CUDA, every batch of the smoke stream without)")
    parser.add_argument("--kernels", nargs="+", choices=kernels.BACKENDS, default=None,
                        help="default: both on CUDA; torch without (the interpreted triton smoke takes minutes)")
    parser.add_argument("--preset", choices=PRESETS, default="frontier")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="time at most this many chunk steps of a sampled batch (its first ones; default: all)")
    parser.add_argument("--sgd-steps", type=positive_int, default=None,
                        help=f"global SGD steps timed (default: {DEFAULT_SGD_STEPS} on CUDA, {SMOKE_SGD_STEPS} without)")
    parser.add_argument("--json", type=Path, default=None, help="write the results (and the tables) here")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="the synthetic stream's seed")
    args = parser.parse_args(argv)
    if args.fraction is not None and args.fraction > 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1]")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    spec = R1_STREAM if cuda else SMOKE_STREAM
    fraction = args.fraction or (DEFAULT_FRACTION if cuda else 1.0)
    sgd_steps = args.sgd_steps or (DEFAULT_SGD_STEPS if cuda else SMOKE_SGD_STEPS)
    if not cuda:
        print("bench.ttt_timing: no CUDA: a smoke of frontier-tiny on a tiny synthetic stream on CPU (not GPU numbers)")
    results, status = {}, 0
    for backend in args.kernels or (list(kernels.BACKENDS) if cuda else ["torch"]):
        cfg = gpu_config(args.preset) if cuda else smoke_config(backend)
        try:
            stream = synthetic_stream(spec, cfg.vocab_size, cfg.ttt_batch_size, args.seed)
            results[backend] = run_backend(cfg, backend, device, stream, spec, fraction, args.max_steps, sgd_steps)
            print(results[backend]["table"], flush=True)
        except Exception as exc:  # the other backend still runs
            results[backend] = dict(error=f"{type(exc).__name__}: {exc}")
            print(f"ttt[{backend}]: ERROR {results[backend]['error']}", flush=True)
            status = 1
        finally:
            if cuda:
                torch.cuda.empty_cache()
    if args.json:
        tables = "\n".join(f"### KERNELS={b}\n\n" + r.get("table", f"ERROR: {r.get('error')}\n") for b, r in results.items())
        write_atomic(args.json, json.dumps(dict(runs=results, summary=summary_line(results), table=tables), indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
