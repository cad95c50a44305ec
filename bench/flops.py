"""The analytical step model: FLOPs, HBM bytes and NVLink bytes per group of one rank's training step.

bench/ledger.py puts these next to the measured profile; bench/step.py and bench/eval_timing.py take
their FLOP counts from here. This module imports nothing from bench/.

The model walks the config's block schedule (model/schedule.py), so it covers both layouts: the crawler
(`ouroboros`: flat blocks around a looped crawler block) and looped layers (`frontier`, R1: blocks 3..5
repeated, recurrence_active picking the plan with the loop on or off), two-lane decoder blocks, gated
skips, R1's SmearGate and attention output gate, and document-isolated attention in a packed row.

Formulas (N = B·T tokens, d model dim, H query heads of hd dims, kv = KV heads·hd, V vocab, h hidden):
- A linear x[N, K]·Wᵀ → [N, M] costs forward 2·N·K·M, backward 4·N·K·M (dx and dW): 6·N·K·M in all;
  bytes: three GEMMs that each read both operands and write the output once in bf16: 3·2·(NK + KM + NM).
  Per block application: q, k, v, out-projection and the MLP's up and down; with R1's attention gate
  also x[:, :window] → H (a linear of window x H); a repeated block re-reads its weights every pass.
- Causal attention per application over a row cut into segments of lengths L_i (one segment of T when
  the row is not cut): forward 2·H·hd·Σ L_i² (QKᵀ and PV over each segment's lower triangle), backward
  2x forward (model FLOPs; a flash backward that recomputes QKᵀ executes 2.5x): 6·B·H·hd·Σ L_i².
  `attention_count="dense"` counts instead what a masked dense path executes whatever the mask: the
  full T x T of every row, 4·H·hd·T² forward and 12·H·hd·T² in all (the torch path with cu_seqlens).
  Bytes: q, k, v, o, do, dq, dk, dv once each in bf16 plus the fp32 log-sum-exp and delta rows.
- Muon, per matrix with m = min(rows, cols), n = max: 5 Newton-Schulz iterations of A = XXᵀ (2m²n),
  A² (2m³), (bA + cA²)X (2m²n): 5·(4m²n + 2m³) FLOPs; bytes per iteration 2·(3mn + 6m²) in bf16 (the
  fixed quintic and R1's Polar-Express tuples cost the same). Two optimizer layouts:
  round_robin (train/muon.py, with DDP): NS on every world-th matrix (rank `muon_rank`'s share); momentum
  + Nesterov 16 B per share element (fp32); the flat bf16 all-reduce of every update; every matrix's
  update applied, 10 B per element (read p fp32, update bf16, write p fp32).
  banked (R1, no DDP): the matrices of one shape form a bank (frontier: qo 22x512x512, kv 22x256x512,
  mlp_up 11x2048x512, mlp_down 11x512x2048), padded to a multiple of the world size (22 → 24, 11 → 16);
  the fp32 gradient is copied to a bf16 buffer (6 B per element), reduce-scattered in bf16, each rank
  runs NS on its ceil(count / world) slices of every bank, padding included (momentum, Nesterov and
  MuonEq-R row normalization in bf16: 12 B per slice element), the results are all-gathered in bf16 and
  every rank applies every update (10 B per element).
- Norms and elementwise (memory-bound, FLOPs not counted): per block application the forward reads and
  writes the fp32 residual stream and bf16 GEMM inputs as if each chain were fused into one pass:
  resid mix + RMSNorm (read x, x0; write x_in fp32 and its bf16 norm: 14 B per element of [N, d]),
  attention residual + RMSNorm (12 B), MLP residual (10 B), QK-norm + RoPE (read and write q and k in bf16:
  4·(d + kv) B per token). A two-lane application instead: mix + RMSNorm of lane0 (14 B), RMSNorm of lane1
  (read fp32, write bf16: 6 B), the lane update (read both lanes fp32 and both branches bf16, write both
  lanes: 20 B); the lanes' final mean 12 B once. Each U-Net skip merge (plain or gated) 12 B; a crawler
  loop's instruction residual 12 B; backward 2x forward.
- Embeddings + head + CE: the tied head is a linear (N, d, V); softcap + cross-entropy fused read the
  bf16 logits forward and read them / write their gradient backward: 6 B per logit; the token (and
  bigram) gathers and their scatter-add gradients 16·N·(d [+ bigram_dim]) B; the embedding's add +
  RMSNorm + SmearGate 36·N·d B (forward 3 fp32 passes, backward twice that); R1's SmearGate gate is a
  linear of window x 1 over the B·(T - 1) tokens that have a previous one.
- Communication (NVLink, not HBM): a ring all-reduce moves 2·(w-1)/w of the buffer per GPU, a
  reduce-scatter or an all-gather (w-1)/w. round_robin: DDP's fp32 gradients of every parameter and
  Muon's bf16 flat buffer of every matrix (all-reduces). banked: every bank's padded bf16 buffer
  reduce-scattered and all-gathered, tok_emb's bf16 gradient and the scalars' fp32 gradients all-reduced.
  The ideal time is at NVLINK_GBPS, an assumption stated in the table, with no overlap with compute.
- Other: AdamW on the embeddings and vectors (read p, g, m, v, write p, m, v in fp32: 28 B per
  parameter; banked: R1's tok_emb and its moments are bf16, 14 B) and the grad-norm clip (read every
  gradient, then scale it in place: 12 B per fp32 gradient, 6 B per bf16 one).

A ledger also keeps named parts (AnalyticLedger.parts), each already counted in its group, for what the
groups merge: Muon's communication, AdamW, the clip, the attention gate + SmearGate.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import model
from model.gpt import GPT
from model.schedule import CRAWLER, block_schedule

GROUPS = ("attention", "mlp", "other_linears", "muon", "embed_head_ce", "norms_elementwise", "communication", "other")
# Named sub-costs, each also counted in one of GROUPS (AnalyticLedger.parts).
PARTS = ("muon_communication", "adamw", "grad_clip", "gates")

# H100 SXM ceilings. Datasheet: dense bf16 tensor-core peak and HBM3 bandwidth. Achievable: typical
# published figures for a large bf16 GEMM and a device-to-device copy; assumptions, not measured here.
PEAK_TFLOPS, PEAK_TBPS = 989.0, 3.35
ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS = 798.0, 3.0
NVLINK_GBPS = 450.0  # assumed all-reduce bus bandwidth per GPU (NVLink 4: 900 GB/s both directions)
BF16, FP32 = 2, 4
NS_STEPS = 5
OPTIMIZER_LAYOUTS = ("round_robin", "banked")
ATTENTION_COUNTS = ("causal", "dense")

# R1's recurrence switch: the looped plan runs from this fraction of the training time on (TRAIN.md §3).
ENABLE_LOOPING_AT = 0.35
# Documents in a packed row: R1's CaseOps val split holds 47,851,521 tokens in 50,000 documents (957 per
# document on average); their spread is taken as log-normal with sigma 1 (median ~580 tokens), an
# assumption of this model, not a measured FineWeb figure.
MEAN_DOC_TOKENS = 47_851_521 / 50_000
DOC_LENGTH_SIGMA = 1.0


@dataclass
class GroupCost:
    flops: float = 0.0
    hbm_bytes: float = 0.0
    link_bytes: float = 0.0   # NVLink (communication only)

    def add(self, flops: float = 0.0, hbm_bytes: float = 0.0, link_bytes: float = 0.0) -> None:
        self.flops += flops
        self.hbm_bytes += hbm_bytes
        self.link_bytes += link_bytes

    def ideal_ms(self, tflops: float, tbps: float) -> float:
        """Roofline time of the group alone: max(compute, HBM traffic), plus NVLink traffic."""
        return 1e3 * (max(self.flops / (tflops * 1e12), self.hbm_bytes / (tbps * 1e12))
                      + self.link_bytes / (NVLINK_GBPS * 1e9))


@dataclass
class AnalyticLedger:
    batch_seqs: int
    seq_len: int
    muon_world_size: int
    world_size: int
    groups: dict = field(default_factory=lambda: {g: GroupCost() for g in GROUPS})
    recurrence_active: bool = True
    applications: int = 0                 # block applications in the plan that ran
    segments: tuple = ()                  # segment lengths of every row (() = one causal sequence per row)
    attention_count: str = "causal"
    optimizer_layout: str = "round_robin"
    parts: dict = field(default_factory=lambda: {p: GroupCost() for p in PARTS})

    @property
    def flops(self) -> float:
        return sum(g.flops for g in self.groups.values())

    @property
    def hbm_bytes(self) -> float:
        return sum(g.hbm_bytes for g in self.groups.values())

    def ideal_ms(self, tflops: float = PEAK_TFLOPS, tbps: float = PEAK_TBPS) -> float:
        return sum(g.ideal_ms(tflops, tbps) for g in self.groups.values())

    def add(self, group: str, flops: float = 0.0, hbm_bytes: float = 0.0, link_bytes: float = 0.0,
            part: str | None = None) -> None:
        """Count a cost in its group, and also in a named part when given."""
        self.groups[group].add(flops, hbm_bytes, link_bytes)
        if part is not None:
            self.parts[part].add(flops, hbm_bytes, link_bytes)


def linear_cost(tokens: int, fan_in: int, fan_out: int) -> tuple[float, float]:
    """(FLOPs, bytes) of a linear's forward and backward: 6·N·K·M and 3 bf16 GEMMs of 2·(NK + KM + NM) bytes."""
    return 6.0 * tokens * fan_in * fan_out, 3.0 * BF16 * (tokens * fan_in + fan_in * fan_out + tokens * fan_out)


def newton_schulz_cost(rows: int, cols: int, steps: int = NS_STEPS) -> tuple[float, float]:
    """(FLOPs, bytes) of Newton-Schulz on one matrix: steps·(4m²n + 2m³), steps·2·(3mn + 6m²), m = min, n = max."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m ** 3), steps * BF16 * (3.0 * m * n + 6.0 * m * m)


def attention_forward_flops(heads: int, head_dim: int, batch_seqs: int, seq_len: int,
                            segments: Sequence[int] = (), count: str = "causal") -> float:
    """Forward FLOPs of one attention application (QKᵀ and PV; backward is twice this).

    causal: 2·B·H·hd·Σ L_i² over the segments of each row (each segment's lower triangle, the model-FLOP
    convention L²/2 per segment; no segments: one of seq_len). dense: 4·B·H·hd·T², the full T x T a
    masked dense path computes whatever its mask."""
    if count not in ATTENTION_COUNTS:
        raise ValueError(f"attention count {count!r} is not one of {ATTENTION_COUNTS}")
    if count == "dense":
        return 4.0 * batch_seqs * heads * head_dim * seq_len * seq_len
    squares = sum(float(n) * n for n in segments) if segments else float(seq_len) * seq_len
    return 2.0 * batch_seqs * heads * head_dim * squares


def full_segments(tokens: int, max_len: int) -> tuple[int, ...]:
    """The attention upper bound of a packed row: max_len pieces end to end (the last the remainder).
    Σ L² under L <= max_len and Σ L = tokens is largest there (the square is convex)."""
    whole, rest = divmod(tokens, max_len)
    return (max_len,) * whole + ((rest,) if rest else ())


def document_pieces(doc_lengths: Sequence[int], max_len: int) -> tuple[int, ...]:
    """The attention segments of a packed row of documents (R1's rule, train.data.document_segments): each
    document cut every max_len tokens from its start."""
    return tuple(piece for n in doc_lengths for piece in full_segments(n, max_len))


def synthetic_document_lengths(tokens: int, mean_tokens: float = MEAN_DOC_TOKENS, sigma: float = DOC_LENGTH_SIGMA,
                               seed: int = 0) -> tuple[int, ...]:
    """Lengths (summing to `tokens`) of the documents one packed row holds, for a synthetic row.

    Each length is drawn log-normal with mean `mean_tokens` (median mean·e^(-σ²/2)), at least 2 tokens
    (every document holds BOS and one token). The row starts inside a document, as a rank's slice of the
    stream does: the first length is a uniformly drawn tail of one draw; the last document is cut at the
    row's end. Deterministic given the seed (Python's Mersenne Twister), on every machine.
    """
    if tokens < 1 or mean_tokens < 2 or sigma < 0:
        raise ValueError(f"synthetic_document_lengths: tokens={tokens}, mean_tokens={mean_tokens}, sigma={sigma}: "
                         "need >= 1 token, a mean of >= 2 and sigma >= 0")
    rng = random.Random(seed)
    mu = math.log(mean_tokens) - sigma * sigma / 2

    def draw() -> int:
        return max(2, round(rng.lognormvariate(mu, sigma)))
    lengths = [rng.randint(1, draw())]
    while sum(lengths) < tokens:
        lengths.append(draw())
    lengths[-1] -= sum(lengths) - tokens
    return tuple(lengths)


def matrix_shapes(cfg: model.Config) -> list[tuple[int, int]]:
    """Muon's matrices in the optimizer's order (round-robin sharding follows it), from a meta-device model."""
    with torch.device("meta"):
        net = GPT(cfg)
    return [tuple(p.shape) for p in model.param_groups(net)["matrix"]]


def bank_shapes(cfg: model.Config) -> list[tuple[int, int, int]]:
    """R1's Muon banks, (count, rows, cols): the matrices of one shape, in order of first appearance.
    For the frontier: c_q + out-proj (22 x 512x512), c_k + c_v (22 x 256x512), MLP up and down (11 each)."""
    counts: dict[tuple[int, int], int] = {}
    for shape in matrix_shapes(cfg):
        counts[shape] = counts.get(shape, 0) + 1
    return [(n, rows, cols) for (rows, cols), n in counts.items()]


def parameter_counts(cfg: model.Config) -> dict:
    with torch.device("meta"):
        net = GPT(cfg)
    groups = model.param_groups(net)
    return {name: sum(p.numel() for p in params) for name, params in groups.items()}


def analytic_ledger(cfg: model.Config, batch_seqs: int, seq_len: int, muon_world_size: int = 8,
                    world_size: int = 8, muon_rank: int = 0, *, recurrence_active: bool = True,
                    segments: Sequence[int] | None = None, attention_count: str = "causal",
                    optimizer_layout: str | None = None) -> AnalyticLedger:
    """FLOPs and HBM/NVLink bytes per group of one rank's step (formulas in the module docstring).

    recurrence_active: which plan of the block schedule runs (the crawler's loops / R1's loop on, or off).
    segments: the lengths of the attention segments of every row (they sum to seq_len); None: each row one
    causal sequence. attention_count: "causal" (model FLOPs) or "dense" (a masked dense path's T x T).
    optimizer_layout: "round_robin" (train/muon.py with DDP) or "banked" (R1's sharded banks); None: the
    crawler's round_robin, the looped layout's banked (R1's recipe). muon_rank: the round-robin share
    (banked shares are all the same size).
    """
    layout = optimizer_layout or ("round_robin" if cfg.use_crawler else "banked")
    if layout not in OPTIMIZER_LAYOUTS:
        raise ValueError(f"analytic_ledger: optimizer_layout={layout!r} is not one of {OPTIMIZER_LAYOUTS}")
    segments = tuple(int(n) for n in segments) if segments else ()
    if segments and (sum(segments) != seq_len or min(segments) < 0):
        raise ValueError(f"analytic_ledger: segments sum to {sum(segments)}, not seq_len={seq_len} "
                         "(they are the lengths of one row's attention segments)")
    schedule = block_schedule(cfg, recurrence_active)
    led = AnalyticLedger(batch_seqs, seq_len, muon_world_size, world_size, recurrence_active=recurrence_active,
                         applications=len(schedule), segments=segments, attention_count=attention_count,
                         optimizer_layout=layout)
    B, T, N = batch_seqs, seq_len, batch_seqs * seq_len
    d, H, hd = cfg.model_dim, cfg.num_heads, cfg.head_dim
    kv = cfg.num_kv_heads * hd
    V = cfg.vocab_size
    window = cfg.gate_window

    for slot in schedule:  # one block application
        hidden = int((cfg.crawler_mlp_mult if slot.kind == CRAWLER else cfg.mlp_mult) * d)
        for fan_in, fan_out in ((d, hidden), (hidden, d)):
            led.add("mlp", *linear_cost(N, fan_in, fan_out))
        for fan_out in (d, kv, kv):  # q, k, v
            led.add("other_linears", *linear_cost(N, d, fan_out))
        led.add("other_linears", *linear_cost(N, d, d))  # out-projection
        if cfg.sparse_attn_gate_enabled:  # σ(scale·W_g·x[:window]) per head
            led.add("other_linears", *linear_cost(N, window, H), part="gates")
        attn_fwd = attention_forward_flops(H, hd, B, T, segments, attention_count)
        qo = N * H * hd
        fwd_bytes = BF16 * (2 * qo + 2 * N * kv) + FP32 * N * H
        bwd_bytes = BF16 * (3 * qo + 2 * N * kv) + 2 * FP32 * N * H + BF16 * (qo + 2 * N * kv)
        led.add("attention", 3.0 * attn_fwd, fwd_bytes + bwd_bytes)
        per_element = (14 + 6 + 20) if slot.parallel else (14 + 12 + 10)
        led.add("norms_elementwise", 0.0, 3.0 * (N * d * per_element + 4 * N * (d + kv)))
        if slot.inst is not None:  # x + up_k(proj(x))
            led.add("other_linears", *linear_cost(N, d, cfg.inst_dim))
            led.add("other_linears", *linear_cost(N, cfg.inst_dim, d))
            led.add("norms_elementwise", 0.0, 3.0 * 12 * N * d)
    skips = sum(slot.skip is not None for slot in schedule)
    led.add("norms_elementwise", 0.0, 3.0 * skips * 12 * N * d)
    if any(slot.parallel for slot in schedule):  # the lanes' mean after the last slot
        led.add("norms_elementwise", 0.0, 3.0 * 12 * N * d)

    has_bigram = cfg.bigram_vocab_size > 0
    if has_bigram:
        led.add("other_linears", *linear_cost(N, cfg.bigram_dim, d))
    led.add("embed_head_ce", *linear_cost(N, d, V))
    led.add("embed_head_ce", 0.0, 6.0 * N * V)                                       # softcap + CE, fused
    led.add("embed_head_ce", 0.0, 16.0 * N * (d + (cfg.bigram_dim if has_bigram else 0)))  # gathers, scatter-adds
    led.add("embed_head_ce", 0.0, 36.0 * N * d)                                      # add + RMSNorm + SmearGate
    if cfg.smear_gate_enabled:  # R1's gate, on every token but each row's first
        led.add("embed_head_ce", *linear_cost(B * (T - 1), window, 1), part="gates")

    counts = parameter_counts(cfg)
    if layout == "round_robin":
        _round_robin_optimizer(led, cfg, counts, muon_world_size, world_size, muon_rank)
    else:
        _banked_optimizer(led, cfg, counts, muon_world_size)
    return led


def _round_robin_optimizer(led: AnalyticLedger, cfg: model.Config, counts: dict, muon_world_size: int,
                           world_size: int, muon_rank: int) -> None:
    """train/muon.py under DDP: NS on this rank's every world-th matrix, fp32 grads and the flat update all-reduced."""
    shapes = matrix_shapes(cfg)
    share = [s for i, s in enumerate(shapes) if i % muon_world_size == muon_rank]
    for rows, cols in share:
        led.add("muon", *newton_schulz_cost(rows, cols))
        led.add("muon", 0.0, 16.0 * rows * cols)          # momentum + Nesterov (fp32)
    matrix_params = sum(r * c for r, c in shapes)
    led.add("muon", 0.0, 10.0 * matrix_params)            # every matrix's update applied
    all_params = sum(counts.values())
    led.add("other", 0.0, 28.0 * (counts["embed"] + counts["scalar"]), part="adamw")
    led.add("other", 0.0, 12.0 * all_params, part="grad_clip")
    if world_size > 1:
        ring = 2.0 * (world_size - 1) / world_size
        led.add("communication", link_bytes=ring * FP32 * all_params)
    if muon_world_size > 1:
        ring = 2.0 * (muon_world_size - 1) / muon_world_size
        led.add("communication", link_bytes=ring * BF16 * matrix_params, part="muon_communication")


def _banked_optimizer(led: AnalyticLedger, cfg: model.Config, counts: dict, world: int) -> None:
    """R1's optimizer (TRAIN.md §2): per-rank clip, banks reduce-scattered and all-gathered in bf16 with NS on
    this rank's slices, tok_emb's bf16 and the scalars' fp32 gradients all-reduced, bf16 tok_emb AdamW."""
    for count, rows, cols in bank_shapes(cfg):
        slices = -(-count // world)                       # this rank's matrices of the bank, padding included
        for _ in range(slices):
            led.add("muon", *newton_schulz_cost(rows, cols))
        led.add("muon", 0.0, 12.0 * slices * rows * cols)  # momentum, Nesterov, row normalization (bf16)
        led.add("muon", 0.0, (6.0 + 10.0) * count * rows * cols)  # grad to bf16; every update applied
        if world > 1:  # reduce-scatter + all-gather of the padded bf16 bank
            led.add("communication", link_bytes=2.0 * (world - 1) / world * BF16 * slices * world * rows * cols,
                    part="muon_communication")
    embed, scalar = counts["embed"], counts["scalar"]
    led.add("other", 0.0, 14.0 * embed + 28.0 * scalar, part="adamw")
    led.add("other", 0.0, 6.0 * embed + 12.0 * (counts["matrix"] + scalar), part="grad_clip")
    if world > 1:
        led.add("communication", link_bytes=2.0 * (world - 1) / world * (BF16 * embed + FP32 * scalar))


def mean_step_ms(unlooped_ms: float, looped_ms: float, enable_looping_at: float = ENABLE_LOOPING_AT) -> float:
    """The run's mean step time (wall time / steps) when the first `enable_looping_at` of the time runs
    unlooped steps and the rest looped ones: 1 / (f / unlooped + (1 - f) / looped). R1's ≈96 and ≈140 ms
    give 120.6 ms; it measured 121.3 ms (599.6 s / 4,945 steps)."""
    if not 0.0 <= enable_looping_at <= 1.0 or unlooped_ms <= 0 or looped_ms <= 0:
        raise ValueError(f"mean_step_ms: unlooped_ms={unlooped_ms}, looped_ms={looped_ms}, "
                         f"enable_looping_at={enable_looping_at}: need positive times and a fraction in [0, 1]")
    return 1.0 / (enable_looping_at / unlooped_ms + (1.0 - enable_looping_at) / looped_ms)


def model_flops_per_token(cfg: model.Config, seq_len: int, recurrence_active: bool = True) -> float:
    """The MFU convention: 6·(matmul parameters applied per token) + causal attention 6·applications·T·d."""
    d = cfg.model_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    schedule = block_schedule(cfg, recurrence_active)
    applied = 0
    for slot in schedule:
        hidden = int((cfg.crawler_mlp_mult if slot.kind == CRAWLER else cfg.mlp_mult) * d)
        applied += 2 * d * d + 2 * d * kv + 2 * d * hidden
        if slot.inst is not None:
            applied += 2 * d * cfg.inst_dim
        if cfg.sparse_attn_gate_enabled:
            applied += cfg.gate_window * cfg.num_heads
    applied += (cfg.bigram_dim * d if cfg.bigram_vocab_size > 0 else 0) + d * cfg.vocab_size
    applied += cfg.gate_window if cfg.smear_gate_enabled else 0
    return 6.0 * applied + 6.0 * len(schedule) * seq_len * d
