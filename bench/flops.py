"""The analytical step model: FLOPs, HBM bytes and NVLink bytes per group of one rank's training step.

bench/ledger.py puts these next to the measured profile; bench/step.py and bench/eval_timing.py take
their FLOP counts from here. This module imports nothing from bench/.

Formulas (N = B·T tokens, d model dim, H query heads of hd dims, kv = KV heads·hd, V vocab, h hidden):
- A linear x[N, K]·Wᵀ → [N, M] costs forward 2·N·K·M, backward 4·N·K·M (dx and dW): 6·N·K·M in all;
  bytes: three GEMMs that each read both operands and write the output once in bf16: 3·2·(NK + KM + NM).
- Causal attention per application: forward 2·B·H·T²·hd (QKᵀ and PV over the lower triangle),
  backward 2x forward (model FLOPs; a flash backward that recomputes QKᵀ executes 2.5x): 6·B·H·T²·hd;
  bytes: q, k, v, o, do, dq, dk, dv once each in bf16 plus the fp32 log-sum-exp and delta rows.
- Muon, per matrix of this rank's share with m = min(rows, cols), n = max: 5 Newton-Schulz iterations
  of A = XXᵀ (2m²n), A² (2m³), (bA + cA²)X (2m²n): 5·(4m²n + 2m³) FLOPs; bytes per iteration
  2·(3mn + 6m²) in bf16; momentum + Nesterov 16 B per share element (fp32); applying every matrix's
  update 10 B per element (read p fp32, update bf16, write p fp32).
- Norms and elementwise (memory-bound, FLOPs not counted): per block application the forward reads and
  writes the fp32 residual stream and bf16 GEMM inputs as if each chain were fused into one pass:
  resid mix + RMSNorm (read x, x0; write x_in fp32 and its bf16 norm: 14 B per element of [N, d]),
  attention residual + RMSNorm (12 B), MLP residual (10 B), QK-norm + RoPE (read and write q and k in bf16:
  4·(d + kv) B per token); each U-Net skip 12 B; backward 2x forward.
- Embeddings + head + CE: the tied head is a linear (N, d, V); softcap + cross-entropy fused read the
  bf16 logits forward and read them / write their gradient backward: 6 B per logit; the token and
  bigram gathers and their scatter-add gradients 16·N·(d + bigram_dim) B; the embedding's add + RMSNorm
  + SmearGate 36·N·d B (forward 3 fp32 passes, backward twice that).
- Communication (NVLink, not HBM): ring all-reduce moves 2·(w-1)/w of the buffer per GPU: DDP's fp32
  gradients of every parameter, and Muon's bf16 flat buffer of every matrix; its ideal time is at
  NVLINK_GBPS, an assumption stated in the table.
- Other: AdamW on the embeddings and vectors (read p, g, m, v, write p, m, v in fp32: 28 B per
  parameter) and the grad-norm clip (read every gradient, then scale it in place: 12 B per parameter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import model
from model.gpt import GPT

GROUPS = ("attention", "mlp", "other_linears", "muon", "embed_head_ce", "norms_elementwise", "communication", "other")

# H100 SXM ceilings. Datasheet: dense bf16 tensor-core peak and HBM3 bandwidth. Achievable: typical
# published figures for a large bf16 GEMM and a device-to-device copy; assumptions, not measured here.
PEAK_TFLOPS, PEAK_TBPS = 989.0, 3.35
ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS = 798.0, 3.0
NVLINK_GBPS = 450.0  # assumed all-reduce bus bandwidth per GPU (NVLink 4: 900 GB/s both directions)
BF16, FP32 = 2, 4
NS_STEPS = 5


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

    @property
    def flops(self) -> float:
        return sum(g.flops for g in self.groups.values())

    @property
    def hbm_bytes(self) -> float:
        return sum(g.hbm_bytes for g in self.groups.values())

    def ideal_ms(self, tflops: float = PEAK_TFLOPS, tbps: float = PEAK_TBPS) -> float:
        return sum(g.ideal_ms(tflops, tbps) for g in self.groups.values())


def linear_cost(tokens: int, fan_in: int, fan_out: int) -> tuple[float, float]:
    """(FLOPs, bytes) of a linear's forward and backward: 6·N·K·M and 3 bf16 GEMMs of 2·(NK + KM + NM) bytes."""
    return 6.0 * tokens * fan_in * fan_out, 3.0 * BF16 * (tokens * fan_in + fan_in * fan_out + tokens * fan_out)


def newton_schulz_cost(rows: int, cols: int, steps: int = NS_STEPS) -> tuple[float, float]:
    """(FLOPs, bytes) of Newton-Schulz on one matrix: steps·(4m²n + 2m³), steps·2·(3mn + 6m²), m = min, n = max."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m ** 3), steps * BF16 * (3.0 * m * n + 6.0 * m * m)


def matrix_shapes(cfg: model.Config) -> list[tuple[int, int]]:
    """Muon's matrices in the optimizer's order (round-robin sharding follows it), from a meta-device model."""
    with torch.device("meta"):
        net = GPT(cfg)
    return [tuple(p.shape) for p in model.param_groups(net)["matrix"]]


def parameter_counts(cfg: model.Config) -> dict:
    with torch.device("meta"):
        net = GPT(cfg)
    groups = model.param_groups(net)
    return {name: sum(p.numel() for p in params) for name, params in groups.items()}


def analytic_ledger(cfg: model.Config, batch_seqs: int, seq_len: int, muon_world_size: int = 8,
                    world_size: int = 8, muon_rank: int = 0) -> AnalyticLedger:
    """FLOPs and HBM/NVLink bytes per group of one rank's step (formulas in the module docstring)."""
    led = AnalyticLedger(batch_seqs, seq_len, muon_world_size, world_size)
    g = led.groups
    B, T, N = batch_seqs, seq_len, batch_seqs * seq_len
    d, H, hd = cfg.model_dim, cfg.num_heads, cfg.head_dim
    kv = cfg.num_kv_heads * hd
    V = cfg.vocab_size
    apps = [int(cfg.mlp_mult * d)] * cfg.num_flat_layers + [int(cfg.crawler_mlp_mult * d)] * cfg.crawler_loops

    for hidden in apps:  # one block application: flat block or one crawler loop
        for fan_in, fan_out in ((d, hidden), (hidden, d)):
            g["mlp"].add(*linear_cost(N, fan_in, fan_out))
        for fan_out in (d, kv, kv):  # q, k, v
            g["other_linears"].add(*linear_cost(N, d, fan_out))
        g["other_linears"].add(*linear_cost(N, d, d))  # out-projection
        attn_fwd = 2.0 * B * H * T * T * hd
        qo = N * H * hd
        fwd_bytes = BF16 * (2 * qo + 2 * N * kv) + FP32 * N * H
        bwd_bytes = BF16 * (3 * qo + 2 * N * kv) + 2 * FP32 * N * H + BF16 * (qo + 2 * N * kv)
        g["attention"].add(3.0 * attn_fwd, fwd_bytes + bwd_bytes)
        fwd_elem = N * d * (14 + 12 + 10) + 4 * N * (d + kv)
        g["norms_elementwise"].add(0.0, 3.0 * fwd_elem)
    skips = min(cfg.num_encoder_layers, cfg.num_decoder_layers)
    g["norms_elementwise"].add(0.0, 3.0 * skips * 12 * N * d)

    g["other_linears"].add(*linear_cost(N, cfg.bigram_dim, d))
    if cfg.inst_dim > 0:
        for _ in range(cfg.crawler_loops):
            g["other_linears"].add(*linear_cost(N, d, cfg.inst_dim))
            g["other_linears"].add(*linear_cost(N, cfg.inst_dim, d))
        g["norms_elementwise"].add(0.0, 3.0 * cfg.crawler_loops * 12 * N * d)  # x + up(proj(x))

    head = g["embed_head_ce"]
    head.add(*linear_cost(N, d, V))
    head.add(0.0, 6.0 * N * V)                          # softcap + CE, fused, forward and backward
    head.add(0.0, 16.0 * N * (d + cfg.bigram_dim))      # gathers and scatter-add gradients
    head.add(0.0, 36.0 * N * d)                         # add + RMSNorm + SmearGate of the embedding

    shapes = matrix_shapes(cfg)
    share = [s for i, s in enumerate(shapes) if i % muon_world_size == muon_rank]
    for rows, cols in share:
        g["muon"].add(*newton_schulz_cost(rows, cols))
        g["muon"].add(0.0, 16.0 * rows * cols)          # momentum + Nesterov (fp32)
    matrix_params = sum(r * c for r, c in shapes)
    g["muon"].add(0.0, 10.0 * matrix_params)            # every matrix's update applied

    counts = parameter_counts(cfg)
    all_params = sum(counts.values())
    g["other"].add(0.0, 28.0 * (counts["embed"] + counts["scalar"]) + 12.0 * all_params)
    if world_size > 1:
        ring = 2.0 * (world_size - 1) / world_size
        g["communication"].add(link_bytes=ring * FP32 * all_params)
    if muon_world_size > 1:
        ring = 2.0 * (muon_world_size - 1) / muon_world_size
        g["communication"].add(link_bytes=ring * BF16 * matrix_params)
    return led


def model_flops_per_token(cfg: model.Config, seq_len: int) -> float:
    """The MFU convention: 6·(matmul parameters applied per token) + causal attention 6·applications·T·d."""
    d = cfg.model_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    applied = 0
    for hidden in [int(cfg.mlp_mult * d)] * cfg.num_flat_layers + [int(cfg.crawler_mlp_mult * d)] * cfg.crawler_loops:
        applied += 2 * d * d + 2 * d * kv + 2 * d * hidden
    applied += cfg.bigram_dim * d + d * cfg.vocab_size + 2 * cfg.crawler_loops * d * cfg.inst_dim
    applications = cfg.num_flat_layers + cfg.crawler_loops
    return 6.0 * applied + 6.0 * applications * seq_len * d
