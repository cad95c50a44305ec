"""The step ledger: where one GPU's training step spends its time, measured and modelled.

    python -m bench.ledger [--steps 3] [--kernels torch] [--out bench/results/ledger_<gpu>.md]

Two tables, written beside the bench results:

1. Measured: torch.profiler over a few steps of bench.step's training step, every op's self time (CUDA
   kernel time on a GPU, CPU time without one) put in one group: attention, MLP, other linears, Muon
   (Newton-Schulz), embeddings + head + cross-entropy, norms and elementwise, communication, other.
   Ops are attributed by where they run, not by guessing from their names: the profiled model carries
   record_function ranges (module hooks, and a wrapper around kernels.attention while profiling); a
   backward op takes the group of the forward op that created its autograd node (same sequence number).
   The profiled model is eager, so the attribution is exact (compiled regions drop the ranges); on CUDA
   the table also gives that eager step's wall time and the compiled step's median (what training runs).
2. Analytical, at the real shapes (`ouroboros`, 48 x 2048 tokens per GPU, Muon on rank 0's 1/8): each
   group's FLOPs and HBM bytes from the formulas below, and its ideal time on an H100 at the datasheet
   (989 TFLOP/s, 3.35 TB/s) and measured (798 TFLOP/s, 3.0 TB/s) ceilings: max(FLOPs / peak, bytes / BW).
   So even without a GPU the ledger says where an H100's time must go.

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

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

if not torch.cuda.is_available():  # kernel modules read this when imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
import model  # noqa: E402
from bench.step import SCOPE_PREFIX  # noqa: E402  (the ranges bench.step's training step opens)
from model.gpt import MLP, Block, CrawlerGPT  # noqa: E402

GROUPS = ("attention", "mlp", "other_linears", "muon", "embed_head_ce", "norms_elementwise", "communication", "other")
GROUP_LABELS = {"attention": "attention (core + XSA)", "mlp": "MLP (up, activation, down)", "other_linears": "other linears (q/k/v/out, bigram, inst)",
                "muon": "Muon (Newton-Schulz + update)", "embed_head_ce": "embeddings + head + cross-entropy",
                "norms_elementwise": "norms and elementwise", "communication": "communication", "other": "other (AdamW, clip, autograd)"}

# H100 SXM ceilings: datasheet and measured on the lent machine (bf16 8192^3 GEMM, device copy).
PEAK_TFLOPS, PEAK_TBPS = 989.0, 3.35
MEASURED_TFLOPS, MEASURED_TBPS = 798.0, 3.0
NVLINK_GBPS = 450.0  # assumed all-reduce bus bandwidth per GPU (NVLink 4: 900 GB/s both directions)
BF16, FP32 = 2, 4
NS_STEPS = 5


# ================================================================ the analytical model

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
        net = CrawlerGPT(cfg)
    return [tuple(p.shape) for p in model.param_groups(net)["matrix"]]


def parameter_counts(cfg: model.Config) -> dict:
    with torch.device("meta"):
        net = CrawlerGPT(cfg)
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


# ================================================================ the measured ledger

class _Scopes:
    """record_function ranges opened and closed from module hooks (a stack: hooks nest like calls)."""

    def __init__(self):
        self.stack: list[tuple[str, object]] = []

    def push(self, name: str) -> None:
        rf = torch.profiler.record_function(SCOPE_PREFIX + name)
        rf.__enter__()
        self.stack.append((name, rf))

    def pop(self, name: str) -> None:
        if self.stack and self.stack[-1][0] == name:
            self.stack.pop()[1].__exit__(None, None, None)

    def close_all(self) -> None:
        while self.stack:
            self.stack.pop()[1].__exit__(None, None, None)


@contextlib.contextmanager
def instrumented(net: CrawlerGPT):
    """Open ledger:: ranges around the model's parts while the block is active; removes every hook after.

    embed_head_ce spans from the model's start to its first block and from its last block to its end;
    MLP modules are `mlp`; every other nn.Linear is `other_linears`; kernels.attention is `attention`.
    What is left in the forward (norms, residuals, RoPE, skips) is `norms_elementwise`.
    """
    if not isinstance(net, CrawlerGPT):
        raise TypeError(f"ledger: expected an eager CrawlerGPT to instrument, got {type(net).__name__} "
                        "(profile the uncompiled model: compiled regions drop record_function ranges)")
    scopes = _Scopes()
    handles = []
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    order = list(net.flat_blocks[:net.config.num_encoder_layers]) + list(net.crawler_blocks) + \
        list(net.flat_blocks[net.config.num_encoder_layers:])
    last_block = order[-1]

    def add(module, name, pre=True, post=True):
        if pre:
            handles.append(module.register_forward_pre_hook(lambda *_: scopes.push(name)))
        if post:
            handles.append(module.register_forward_hook(lambda *_: scopes.pop(name)))

    add(net, "embed_head_ce")
    for block in blocks:  # the first block closes the embedding span
        handles.append(block.register_forward_pre_hook(lambda *_: scopes.pop("embed_head_ce")))
    handles.append(last_block.register_forward_hook(lambda *_: scopes.push("embed_head_ce")))
    mlp_linears = set()
    for module in net.modules():
        if isinstance(module, MLP):
            add(module, "mlp")
            mlp_linears.update(id(m) for m in module.modules())
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in mlp_linears:
            add(module, "other_linears")

    dispatch = kernels.attention

    def attention(*args, **kwargs):
        with torch.profiler.record_function(SCOPE_PREFIX + "attention"):
            return dispatch(*args, **kwargs)
    try:
        with mock.patch.object(kernels, "attention", attention):
            yield
    finally:
        scopes.close_all()
        for h in handles:
            h.remove()


_PHASE_GROUP = {"muon": "muon", "adamw": "other", "clip": "other", "zero_grad": "other", "step": "other"}
_COMM_WORDS = ("all_reduce", "allreduce", "nccl", "gloo", "c10d::", "reduce_scatter", "all_gather")


def _scope_of(event) -> tuple[str | None, object | None]:
    """(nearest ledger:: range name, nearest autograd evaluate_function ancestor) of a profiler event."""
    scope, node = None, None
    e = event
    while e is not None:
        if scope is None and e.name.startswith(SCOPE_PREFIX):
            scope = e.name[len(SCOPE_PREFIX):]
        if node is None and e.name.startswith("autograd::engine::evaluate_function"):
            node = e
        if scope is not None and (node is not None or scope != "backward"):
            break
        e = e.cpu_parent
    return scope, node


def assign_groups(events) -> list[tuple[object, str]]:
    """(event, group) for every profiler event: communication by name, else the ledger:: range it ran in;
    a backward op takes the group of the forward op whose autograd node it evaluates."""
    forward_group = {}   # (thread, sequence_nr) of forward ops -> group, for their backward
    pending = []
    for e in events:
        scope, node = _scope_of(e)
        if any(w in e.name.lower() for w in _COMM_WORDS):
            group = "communication"
        elif scope in GROUPS:
            group = scope
        elif scope == "forward":
            group = "norms_elementwise"  # in the forward but in no module range: residuals, norms, RoPE, skips
        elif scope == "backward" or (scope is None and node is not None):
            # On CUDA the autograd engine runs backward on its own thread, outside the ledger::backward range.
            group = None                 # decided once every forward op is known
        else:
            group = _PHASE_GROUP.get(scope, "other")
        if group is not None and scope not in ("backward", None) and e.sequence_nr >= 0:
            forward_group.setdefault((e.thread, e.sequence_nr), group)
        pending.append((e, group, node))
    out = []
    for e, group, node in pending:
        if group is None:  # autograd bookkeeping with no forward op (AccumulateGrad, the seed gradient): other
            key = (node.fwd_thread, node.sequence_nr) if node is not None else None
            group = forward_group.get(key, "other")
        out.append((e, group))
    return out


def _on_device(e) -> bool:
    return e.device_type != torch.autograd.DeviceType.CPU


def group_events(events, use_device: bool) -> dict[str, float]:
    """Time (µs) per group; every CPU op (use_device False) or every GPU kernel (True) lands in one group.

    CPU: each op's self CPU time, in the group of the range it ran in. GPU: each kernel's duration, in
    the group of the CPU op that launched it (its correlation id); kernels with no such op are `other`
    unless their name says communication. Kernels are counted once, as themselves, never also through
    the op's device total.
    """
    times = {g: 0.0 for g in GROUPS}
    host = [e for e in events if not _on_device(e)]
    assigned = assign_groups(host)
    if not use_device:
        for e, group in assigned:
            times[group] += e.self_cpu_time_total
        return times
    group_of_op = {e.id: group for e, group in assigned}
    for k in events:
        if not _on_device(k):
            continue
        if any(w in k.name.lower() for w in _COMM_WORDS):
            group = "communication"
        else:
            group = group_of_op.get(k.linked_correlation_id, "other")
        times[group] += k.time_range.elapsed_us()
    return times


@dataclass
class MeasuredLedger:
    ms_per_step: dict           # group -> ms per step
    steps: int
    time_kind: str              # "CUDA kernel time" or "CPU time"

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_step.values())

    def percent(self) -> dict:
        total = self.total_ms
        return {g: (100.0 * v / total if total > 0 else 0.0) for g, v in self.ms_per_step.items()}


def profile_step(step, steps: int = 3, warmup_steps: int = 1) -> MeasuredLedger:
    """torch.profiler over `steps` training steps of a bench.step.TrainingStep built with compile_model=False."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"profile_step: steps={steps} must be >= 1")
    cuda = step.device.type == "cuda"
    with instrumented(step.net):
        for _ in range(warmup_steps):
            step.run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step.run()
            if cuda:
                torch.cuda.synchronize()
    times = group_events(prof.events(), use_device=cuda)
    return MeasuredLedger({g: t / 1e3 / steps for g, t in times.items()}, steps,
                          "CUDA kernel time" if cuda else "CPU time")


# ================================================================ the table

def markdown(measured: MeasuredLedger | None, measured_what: str, analytic: AnalyticLedger, analytic_what: str,
             machine: str = "", timings: list[str] | None = None) -> str:
    lines = ["# Step ledger", ""] + ([machine, ""] if machine else [])
    if measured is not None:
        lines += [f"## Measured: {measured_what}", "",
                  f"torch.profiler self {measured.time_kind} per op, grouped by where the op ran (bench/ledger.py), "
                  f"mean over {measured.steps} profiled steps.", "",
                  "| group | ms/step | % |", "|---|---:|---:|"]
        pct = measured.percent()
        for grp in GROUPS:
            lines.append(f"| {GROUP_LABELS[grp]} | {measured.ms_per_step[grp]:.3f} | {pct[grp]:.1f} |")
        lines += [f"| **total** | **{measured.total_ms:.3f}** | **100.0** |", ""]
        if timings:
            lines += [f"- {t}" for t in timings] + [""]
    lines += [f"## Analytical: {analytic_what}", "",
              f"FLOPs and HBM bytes per group from the formulas in bench/ledger.py; ideal time = max(FLOPs / peak, "
              f"bytes / bandwidth) per group at the H100's datasheet ({PEAK_TFLOPS:g} TFLOP/s, {PEAK_TBPS:g} TB/s) and "
              f"measured ({MEASURED_TFLOPS:g} TFLOP/s, {MEASURED_TBPS:g} TB/s) ceilings; communication is NVLink "
              f"traffic at an assumed {NVLINK_GBPS:g} GB/s all-reduce bandwidth.", "",
              "| group | GFLOP | HBM MB | NVLink MB | ideal ms (datasheet) | ideal ms (measured) | % of ideal (measured) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    total_meas = analytic.ideal_ms(MEASURED_TFLOPS, MEASURED_TBPS)
    for grp in GROUPS:
        c = analytic.groups[grp]
        ms_meas = c.ideal_ms(MEASURED_TFLOPS, MEASURED_TBPS)
        lines.append(f"| {GROUP_LABELS[grp]} | {c.flops / 1e9:,.1f} | {c.hbm_bytes / 1e6:,.1f} | {c.link_bytes / 1e6:,.1f} | "
                     f"{c.ideal_ms(PEAK_TFLOPS, PEAK_TBPS):.3f} | {ms_meas:.3f} | {100 * ms_meas / total_meas:.1f} |")
    lines += [f"| **total** | **{analytic.flops / 1e9:,.1f}** | **{analytic.hbm_bytes / 1e6:,.1f}** | "
              f"**{sum(c.link_bytes for c in analytic.groups.values()) / 1e6:,.1f}** | "
              f"**{analytic.ideal_ms(PEAK_TFLOPS, PEAK_TBPS):.3f}** | **{total_meas:.3f}** | **100.0** |", ""]
    return "\n".join(lines) + "\n"


def default_out(cuda: bool) -> Path:
    from bench.report import RESULTS_DIR, environment, gpu_slug
    return RESULTS_DIR / (f"ledger_{gpu_slug(environment()['gpu'])}.md" if cuda else "ledger_cpu_tiny.md")


def main(argv=None) -> int:
    from model.io import write_atomic
    from bench.step import (SMOKE_BATCH, WORLD_SIZE, build_step, gpu_config, per_gpu_batch_seqs, smoke_config,
                            time_steps)

    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", choices=kernels.BACKENDS, default=None,
                        help="KERNELS backend of the profiled step (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--batch-seqs", type=int, default=None, help="sequences per step (default: one GPU's share; CPU: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: TRAIN_SEQ_LEN; CPU: 64)")
    parser.add_argument("--muon-share", choices=("rank", "all"), default="rank")
    parser.add_argument("--no-compiled", action="store_true",
                        help="on CUDA, skip timing the compiled step next to the profiled eager one")
    parser.add_argument("--analytic-only", action="store_true", help="skip the profiler; write the analytical table only")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (default: bench/results/ledger_<gpu>.md, or ledger_cpu_tiny.md on CPU)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    load = os.getloadavg()[0]
    real = gpu_config()
    real_seqs = per_gpu_batch_seqs(real)
    muon_world = WORLD_SIZE if args.muon_share == "rank" else 1
    analytic = analytic_ledger(real, real_seqs, real.train_seq_len, muon_world_size=muon_world)
    analytic_what = (f"`{real.preset}` at {real_seqs} x {real.train_seq_len} tokens per GPU, Muon on "
                     f"{'rank 0 of ' + str(WORLD_SIZE) if muon_world > 1 else 'every matrix'}, one of 8 H100s")
    measured, measured_what, timings = None, "", []
    if not args.analytic_only:
        cfg = real if cuda else smoke_config()
        seqs = args.batch_seqs or (real_seqs if cuda else SMOKE_BATCH["batch_seqs"])
        seq_len = args.seq_len or (cfg.train_seq_len if cuda else SMOKE_BATCH["seq_len"])
        backend = args.kernels or ("triton" if cuda else "torch")
        step = build_step(cfg, backend, device, seqs, seq_len, args.muon_share, compile_model=False)
        measured = profile_step(step, steps=args.steps)
        if cuda:  # kernel time leaves out launch gaps: the wall time of the same step, and of the compiled one
            eager = time_steps(step, steps=10, warmup_steps=0)
            del step
            timings.append(f"the same eager step, wall clock: {eager['ms_median']:.2f} ms/step median over 10 steps "
                           f"(kernel time above: {measured.total_ms:.2f} ms)")
            if not args.no_compiled:
                torch.cuda.empty_cache()
                compiled = build_step(cfg, backend, device, seqs, seq_len, args.muon_share, compile_model=True)
                result = time_steps(compiled, steps=20, warmup_steps=3)
                timings.append(f"the torch.compile'd step (what training runs): {result['ms_median']:.2f} ms/step median "
                               f"over 20 steps, peak {result['peak_mem_mb']:.0f} MiB; the analytical ideal below is "
                               f"{analytic.ideal_ms(MEASURED_TFLOPS, MEASURED_TBPS):.2f} ms at the measured ceilings")
        where = torch.cuda.get_device_name() if cuda else "CPU (fp32; not a GPU number)"
        measured_what = (f"`{cfg.preset}` at {seqs} x {seq_len} tokens, KERNELS={backend}, eager model, "
                         f"Muon on {'rank 0 of ' + str(WORLD_SIZE) if muon_world > 1 else 'every matrix'}, on {where}")
    from bench.report import environment
    env = environment()
    machine = (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}"
               + ("" if cuda else f"; {os.cpu_count()} CPU cores, load average {load:.1f} when profiling "
                                  "started (CPU ms are wall-clock per op and grow with the load: read the percentages)"))
    text = markdown(measured, measured_what, analytic, analytic_what, machine, timings)
    out = args.out or default_out(cuda)
    write_atomic(out, text)
    print(text)
    print(f"bench.ledger: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
