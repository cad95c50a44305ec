"""The step ledger: where one GPU's training step spends its time, measured and modelled.

    python -m bench.ledger [--steps 3] [--kernels torch] [--out bench/results/ledger_<gpu>.md]
    python -m bench.ledger --preset frontier [--segments full|documents] [--enable-looping-at 0.35]

Two tables, written beside the bench results:

1. Measured: torch.profiler over a few steps of bench.step's training step, every op's self time (CUDA
   kernel time on a GPU, CPU time without one) put in one group: attention, MLP, other linears, Muon
   (Newton-Schulz), embeddings + head + cross-entropy, norms and elementwise, communication, other.
   Ops are attributed by where they run, not by guessing from their names: every kernels op runs in a
   record_function range kernels::<op>, the training step (train/step.py) opens ledger::<phase> ranges,
   and module hooks add ranges for what has no kernels op (the embeddings, the other linears); a
   backward op takes the group of the forward op that created its autograd node (same sequence number).
   The profiled model is eager, so the attribution is exact (compiled regions drop the ranges); on CUDA
   the table also gives that eager step's wall time and the compiled step's median (what training runs).
2. Analytical, at the real shapes (`ouroboros`, 48 x 2048 tokens per GPU, Muon on rank 0's 1/8): each
   group's FLOPs and HBM bytes from the formulas in bench/flops.py, and its ideal time on an H100 at the
   datasheet (989 TFLOP/s, 3.35 TB/s) and at assumed achievable (798 TFLOP/s, 3.0 TB/s) ceilings:
   max(FLOPs / peak, bytes / BW). So even without a GPU the ledger says where an H100's time must go.

With `--preset frontier` (R1's model) both tables come twice, with the loop off and on (the measured one
at `frontier-tiny`'s smoke row on CPU, at the real row on CUDA), for one packed 98,304-token row per GPU
whose attention is causal within segments of at most 2048 tokens: by default all full 2048-token pieces
(the upper bound of the attention FLOPs), or `--segments documents`, the pieces of synthetic documents of
log-normal lengths (mean 957 tokens, R1's CaseOps val mean). Muon is R1's: banks sharded over 8 ranks with a
bf16 reduce-scatter and all-gather. Then the run: the two steps combined as the loop switches on at 35 %
of the training time (wall time / steps), each group's and part's share of it (Muon with its
communication, AdamW, the clip, the gates), and R1's measured numbers and the frontier's goals beside
the ideal (a measured ratio only from a GPU).

"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # kernel modules read this when imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from bench.flops import (ACHIEVABLE_TBPS, ACHIEVABLE_TFLOPS, DOC_LENGTH_SIGMA, ENABLE_LOOPING_AT,  # noqa: E402
                         GROUPS, MEAN_DOC_TOKENS, NVLINK_GBPS, PEAK_TBPS, PEAK_TFLOPS, AnalyticLedger, GroupCost,
                         analytic_ledger, bank_shapes, document_pieces, full_segments, mean_step_ms,
                         synthetic_document_lengths)
from model.cli import nonnegative_float, positive_float, positive_int  # noqa: E402
from model.blocks import MLP, Block  # noqa: E402
from model.gpt import GPT  # noqa: E402
from train.step import PROFILE_PREFIX as SCOPE_PREFIX  # noqa: E402  (the training step's phase ranges)

GROUP_LABELS = {"attention": "attention (core + XSA)", "mlp": "MLP (up, activation, down)", "other_linears": "other linears (q/k/v/out, bigram, inst)",
                "muon": "Muon (Newton-Schulz + update)", "embed_head_ce": "embeddings + head + cross-entropy",
                "norms_elementwise": "norms and elementwise", "communication": "communication", "other": "other (AdamW, clip, autograd)"}
# The group of each kernels op, whose calls run in a range kernels.PROFILE_PREFIX + <op> (kernels/__init__.py).
KERNEL_GROUPS = {"attention": "attention", "mlp": "mlp", "mix_norm": "norms_elementwise", "add_norm": "norms_elementwise",
                 "rms_norm": "norms_elementwise", "skip_mix_norm": "norms_elementwise",
                 "lane_update": "norms_elementwise", "softcap_cross_entropy": "embed_head_ce",
                 "gptq_quantize_layer": "other"}  # calibration, after training: never in a step


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
def instrumented(net: GPT):
    """Open ledger:: ranges for the parts of the model no kernels op covers while the block is active;
    removes every hook after.

    The kernels ops run in their own kernels::<op> ranges (KERNEL_GROUPS) and the step in its phase
    ranges. The hooks add embed_head_ce from the model's start to its first block (token and bigram
    embeddings, their norm, SmearGate) and other_linears around every nn.Linear outside an MLP. What is
    left in the forward (residuals, QK-norm, RoPE, skips) is `norms_elementwise`.
    """
    if not isinstance(net, GPT):
        raise TypeError(f"ledger: expected an eager GPT to instrument, got {type(net).__name__} "
                        "(profile the uncompiled model: compiled regions drop record_function ranges)")
    scopes = _Scopes()
    handles = [net.register_forward_pre_hook(lambda *_: scopes.push("embed_head_ce")),
               net.register_forward_hook(lambda *_: scopes.close_all())]
    for block in (m for m in net.modules() if isinstance(m, Block)):  # the first block closes the embedding span
        handles.append(block.register_forward_pre_hook(lambda *_: scopes.pop("embed_head_ce")))
    mlp_linears = {id(m) for mlp in net.modules() if isinstance(mlp, MLP) for m in mlp.modules()}
    for module in net.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in mlp_linears:
            handles.append(module.register_forward_pre_hook(lambda *_: scopes.push("other_linears")))
            handles.append(module.register_forward_hook(lambda *_: scopes.pop("other_linears")))
    try:
        yield
    finally:
        scopes.close_all()
        for h in handles:
            h.remove()


_PHASE_GROUP = {"muon": "muon", "adamw": "other", "clip": "other", "zero_grad": "other", "step": "other"}
_COMM_WORDS = ("all_reduce", "allreduce", "nccl", "gloo", "c10d::", "reduce_scatter", "all_gather")


def _range_scope(name: str) -> str | None:
    """A ledger:: range's name, a kernels:: range's group, None for any other event."""
    if name.startswith(SCOPE_PREFIX):
        return name[len(SCOPE_PREFIX):]
    if name.startswith(kernels.PROFILE_PREFIX):
        op = name[len(kernels.PROFILE_PREFIX):]
        if op not in KERNEL_GROUPS:
            raise KeyError(f"bench/ledger.py: the profile has a range {name!r} but KERNEL_GROUPS gives kernels "
                           f"op {op!r} no group: add it there")
        return KERNEL_GROUPS[op]
    return None


def _scope_of(event) -> tuple[str | None, object | None]:
    """(nearest ledger:: range name or kernels:: range group, nearest autograd evaluate_function ancestor)
    of a profiler event."""
    scope, node = None, None
    e = event
    while e is not None:
        if scope is None:
            scope = _range_scope(e.name)
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
    """torch.profiler over `steps` training steps of a bench.step.BenchStep built with compile_model=False."""
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

ANALYTIC_METHOD = (f"FLOPs and HBM bytes per group from the formulas in bench/flops.py; ideal time = max(FLOPs / peak, "
                   f"bytes / bandwidth) per group at the H100's datasheet ({PEAK_TFLOPS:g} TFLOP/s, {PEAK_TBPS:g} TB/s) and "
                   f"assumed achievable ({ACHIEVABLE_TFLOPS:g} TFLOP/s, {ACHIEVABLE_TBPS:g} TB/s) ceilings; communication "
                   f"is NVLink traffic at an assumed {NVLINK_GBPS:g} GB/s all-reduce bandwidth.")
PART_LABELS = {"muon_communication": "Muon's communication (in communication)", "adamw": "AdamW (in other)",
               "grad_clip": "grad-norm clip (in other)",
               "gates": "attention gate + SmearGate linears (in other linears, embeddings)"}


def measured_table(measured: MeasuredLedger) -> list[str]:
    lines = ["| group | ms/step | % |", "|---|---:|---:|"]
    pct = measured.percent()
    for grp in GROUPS:
        lines.append(f"| {GROUP_LABELS[grp]} | {measured.ms_per_step[grp]:.3f} | {pct[grp]:.1f} |")
    return lines + [f"| **total** | **{measured.total_ms:.3f}** | **100.0** |", ""]


def analytic_table(analytic: AnalyticLedger) -> list[str]:
    lines = ["| group | GFLOP | HBM MB | NVLink MB | ideal ms (datasheet) | ideal ms (achievable) | % of ideal (achievable) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total_achievable = analytic.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS)
    for grp in GROUPS:
        c = analytic.groups[grp]
        ms_achievable = c.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS)
        lines.append(f"| {GROUP_LABELS[grp]} | {c.flops / 1e9:,.1f} | {c.hbm_bytes / 1e6:,.1f} | {c.link_bytes / 1e6:,.1f} | "
                     f"{c.ideal_ms(PEAK_TFLOPS, PEAK_TBPS):.3f} | {ms_achievable:.3f} | "
                     f"{100 * ms_achievable / total_achievable:.1f} |")
    return lines + [f"| **total** | **{analytic.flops / 1e9:,.1f}** | **{analytic.hbm_bytes / 1e6:,.1f}** | "
                    f"**{sum(c.link_bytes for c in analytic.groups.values()) / 1e6:,.1f}** | "
                    f"**{analytic.ideal_ms(PEAK_TFLOPS, PEAK_TBPS):.3f}** | **{total_achievable:.3f}** | **100.0** |", ""]


def markdown(measured: MeasuredLedger | None, measured_what: str, analytic: AnalyticLedger, analytic_what: str,
             machine: str = "", timings: list[str] | None = None) -> str:
    lines = ["# Step ledger", ""] + ([machine, ""] if machine else [])
    if measured is not None:
        lines += [f"## Measured: {measured_what}", "",
                  f"torch.profiler self {measured.time_kind} per op, grouped by where the op ran (bench/ledger.py), "
                  f"mean over {measured.steps} profiled steps.", ""] + measured_table(measured)
        if timings:
            lines += [f"- {t}" for t in timings] + [""]
    lines += [f"## Analytical: {analytic_what}", "", ANALYTIC_METHOD, ""] + analytic_table(analytic)
    return "\n".join(lines) + "\n"


@dataclass
class LoopedRun:
    """The analytical ledgers of a looped model with its loop off and on, combined as the run switches it on
    at `enable_looping_at` of the training time."""
    off: AnalyticLedger
    on: AnalyticLedger
    enable_looping_at: float = ENABLE_LOOPING_AT

    def mean_ms(self, tflops: float = PEAK_TFLOPS, tbps: float = PEAK_TBPS) -> float:
        """The run's ideal mean step (wall time / steps), bench/flops.py mean_step_ms."""
        return mean_step_ms(self.off.ideal_ms(tflops, tbps), self.on.ideal_ms(tflops, tbps), self.enable_looping_at)

    def run_percent(self, cost_off: GroupCost, cost_on: GroupCost, tflops: float = ACHIEVABLE_TFLOPS,
                    tbps: float = ACHIEVABLE_TBPS) -> float:
        """A cost's share of the run's time: its share of each phase's step, weighted by the phase's share of the time."""
        f = self.enable_looping_at
        return 100.0 * (f * cost_off.ideal_ms(tflops, tbps) / self.off.ideal_ms(tflops, tbps)
                        + (1 - f) * cost_on.ideal_ms(tflops, tbps) / self.on.ideal_ms(tflops, tbps))


def segments_label(segments: tuple, max_len: int, documents: str = "") -> str:
    """What the attention FLOPs assume about one row's segments."""
    squares = sum(n * n for n in segments)
    bound = squares / sum(n * n for n in full_segments(sum(segments), max_len))
    return (f"{len(segments)} segments of at most {max_len} tokens{' (' + documents + ')' if documents else ''}: "
            f"Σ L² = {squares:,}, {bound:.3f} of the full-{max_len}-pieces upper bound")


def run_table(run: LoopedRun) -> list[str]:
    """Per group and named part: ideal ms (achievable) with the loop off and on, and its share of the run."""
    f = run.enable_looping_at
    lines = [f"| group | ideal ms, loop off | ideal ms, loop on | % of the run (off for {f:.0%} of the time) |",
             "|---|---:|---:|---:|"]
    for grp in GROUPS:
        a, b = run.off.groups[grp], run.on.groups[grp]
        lines.append(f"| {GROUP_LABELS[grp]} | {a.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f} | "
                     f"{b.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f} | {run.run_percent(a, b):.1f} |")
    muon_off = GroupCost(run.off.groups["muon"].flops, run.off.groups["muon"].hbm_bytes,
                         run.off.parts["muon_communication"].link_bytes)
    muon_on = GroupCost(run.on.groups["muon"].flops, run.on.groups["muon"].hbm_bytes,
                        run.on.parts["muon_communication"].link_bytes)
    rows = [("Muon all in: Newton-Schulz, update and its communication", muon_off, muon_on)]
    rows += [(PART_LABELS[p], run.off.parts[p], run.on.parts[p]) for p in PART_LABELS]
    for label, a, b in rows:
        lines.append(f"| *{label}* | {a.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f} | "
                     f"{b.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f} | {run.run_percent(a, b):.1f} |")
    lines.append(f"| **step** | **{run.off.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f}** | "
                 f"**{run.on.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f}** | **run mean "
                 f"{run.mean_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.3f} ms** |")
    return lines + [""]


def looped_markdown(measured: dict, measured_what: str, run: LoopedRun, analytic_what: str, machine: str = "",
                    timings: list[str] | None = None, references: list[str] | None = None) -> str:
    """The ledger of a looped model (`frontier`): measured (per loop state, when profiled), the analytical tables
    with the loop off and on, the run's mean and each group's share of it, then the reference numbers."""
    lines = ["# Step ledger", ""] + ([machine, ""] if machine else [])
    if measured:
        lines += [f"## Measured: {measured_what}", ""]
        for state, led in measured.items():
            lines += [f"### recurrence {state}", "",
                      f"torch.profiler self {led.time_kind} per op, grouped by where the op ran (bench/ledger.py), "
                      f"mean over {led.steps} profiled steps.", ""] + measured_table(led)
        if timings:
            lines += [f"- {t}" for t in timings] + [""]
    f = run.enable_looping_at
    lines += [f"## Analytical: {analytic_what}", "", ANALYTIC_METHOD, ""]
    for state, led, share in (("off", run.off, f), ("on", run.on, 1 - f)):
        lines += [f"### recurrence {state}: {led.applications} block applications ({share:.0%} of the training time)",
                  ""] + analytic_table(led)
    lines += [f"### the run: loop on from {f:.0%} of the time",
              "", f"Ideal mean step (wall time / steps = 1 / ({f:g} / off + {1 - f:g} / on)): "
              f"{run.mean_ms():.2f} ms at the datasheet ceilings, "
              f"{run.mean_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.2f} ms at the achievable ones. Per group (and, in "
              f"italics, parts already inside a group) at the achievable ceilings:", ""] + run_table(run)
    if references:
        lines += ["## Reference and goals", ""] + [f"- {r}" for r in references] + [""]
    return "\n".join(lines) + "\n"


def looped_run(cfg, tokens: int, segments: tuple, muon_world: int, enable_looping_at: float) -> LoopedRun:
    """The analytical ledgers of one rank's packed row with the loop off and on."""
    off, on = (analytic_ledger(cfg, 1, tokens, muon_world_size=muon_world, recurrence_active=active, segments=segments)
               for active in (False, True))
    return LoopedRun(off, on, enable_looping_at)


def default_out(cuda: bool, preset: str = "ouroboros") -> Path:
    from bench.report import RESULTS_DIR, environment, gpu_slug
    suffix = "" if preset == "ouroboros" else f"_{preset}"
    return RESULTS_DIR / (f"ledger_{gpu_slug(environment()['gpu'])}{suffix}.md" if cuda else f"ledger_cpu_tiny{suffix}.md")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("ouroboros", "frontier"), default="ouroboros",
                        help="ouroboros (default) or frontier (R1: a packed row, the loop off and on; CPU: frontier-tiny)")
    parser.add_argument("--kernels", choices=kernels.BACKENDS, default=None,
                        help="KERNELS backend of the profiled step (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--steps", type=positive_int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--batch-seqs", type=positive_int, default=None,
                        help="sequences per step (default: one GPU's share; CPU: 2)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per sequence (default: TRAIN_SEQ_LEN; CPU: 64); frontier: the profiled packed row")
    parser.add_argument("--muon-share", choices=("rank", "all"), default="rank")
    parser.add_argument("--segments", choices=("full", "documents"), default="full",
                        help="frontier's analytical attention: every segment a full TRAIN_SEQ_LEN piece (the upper "
                             "bound, default) or synthetic documents (log-normal lengths, --mean-doc-tokens)")
    parser.add_argument("--mean-doc-tokens", type=positive_float, default=MEAN_DOC_TOKENS,
                        help="frontier: mean document length of --segments documents (default %(default).0f, R1's "
                             "CaseOps val mean)")
    parser.add_argument("--doc-sigma", type=nonnegative_float, default=DOC_LENGTH_SIGMA,
                        help="frontier: sigma of the log-normal document lengths (default %(default)s)")
    parser.add_argument("--enable-looping-at", type=nonnegative_float, default=ENABLE_LOOPING_AT,
                        help="frontier: fraction of the training time after which the loop is on (default %(default)s)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="on CUDA, skip timing the compiled step next to the profiled eager one")
    parser.add_argument("--analytic-only", action="store_true", help="skip the profiler; write the analytical table only")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (default: bench/results/ledger_<gpu>[_frontier].md, or "
                             "ledger_cpu_tiny[_frontier].md on CPU)")
    args = parser.parse_args(argv)
    if args.enable_looping_at > 1.0:
        parser.error(f"argument --enable-looping-at: must be a fraction of the training time in [0, 1], "
                     f"got {args.enable_looping_at:g}")
    return args


def _machine(cuda: bool, load: float) -> str:
    from bench.report import environment
    env = environment()
    return (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}"
            + ("" if cuda else f"; {os.cpu_count()} CPU cores, load average {load:.1f} when profiling "
                               "started (CPU ms are wall-clock per op and grow with the load: read the percentages)"))


def main(argv=None) -> int:
    from model.io import write_atomic
    from bench.step import (SMOKE_BATCH, WORLD_SIZE, build_step, gpu_config, per_gpu_batch_seqs, smoke_config,
                            time_steps)

    args = parse_args(argv)
    if args.preset == "frontier":
        return frontier_main(args)
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
                               f"{analytic.ideal_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.2f} ms at the achievable ceilings")
        where = torch.cuda.get_device_name() if cuda else "CPU (fp32; not a GPU number)"
        measured_what = (f"`{cfg.preset}` at {seqs} x {seq_len} tokens, KERNELS={backend}, eager model, "
                         f"Muon on {'rank 0 of ' + str(WORLD_SIZE) if muon_world > 1 else 'every matrix'}, on {where}")
    text = markdown(measured, measured_what, analytic, analytic_what, _machine(cuda, load), timings)
    out = args.out or default_out(cuda)
    write_atomic(out, text)
    print(text)
    print(f"bench.ledger: wrote {out}")
    return 0


def frontier_main(args: argparse.Namespace) -> int:
    """--preset frontier: the analytical ledger of one rank's 98,304-token packed row with the loop off and on,
    the run's mean, R1's numbers and the goals; profiled (both loop states) unless --analytic-only: on CUDA
    `frontier` at its real row, on CPU `frontier-tiny` at its smoke row."""
    from model.io import write_atomic
    from bench.step import (R1_MEAN_MS, SMOKE_FRONTIER_TRITON_DEPTH, SMOKE_MEAN_DOC_TOKENS, SMOKE_PRESETS, WORLD_SIZE,
                            build_step, gpu_config, packed_row_tokens, recurrence_runs, reference_lines, smoke_config)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    load = os.getloadavg()[0]
    real = gpu_config("frontier")
    tokens, max_len = packed_row_tokens(real), real.train_seq_len
    if args.segments == "full":
        segments = full_segments(tokens, max_len)
        documents = "the upper bound: every segment a full piece"
    else:
        segments = document_pieces(synthetic_document_lengths(tokens, args.mean_doc_tokens, args.doc_sigma), max_len)
        documents = f"synthetic documents, log-normal lengths of mean {args.mean_doc_tokens:.0f} tokens, sigma {args.doc_sigma:g}"
    muon_world = WORLD_SIZE if args.muon_share == "rank" else 1
    run = looped_run(real, tokens, segments, muon_world, args.enable_looping_at)
    analytic_what = (f"`{real.preset}`, one packed row of {tokens:,} tokens per GPU (one of 8 H100s), attention "
                     f"causal within {segments_label(segments, max_len, documents)}; R1's optimizer: Muon's "
                     f"{len(bank_shapes(real))} banks sharded over {muon_world} ranks (bf16 reduce-scatter, Newton-Schulz "
                     f"on this rank's slices, bf16 all-gather), no DDP")
    measured, measured_what, timings, mean_ms, peak = {}, "", [], None, None
    if not args.analytic_only:
        backend = args.kernels or ("triton" if cuda else "torch")
        if cuda and backend == "torch" and not args.seq_len:
            print(f"bench.ledger: KERNELS=torch masks a dense T x T per row with cu_seqlens: not runnable at {tokens:,} "
                  "tokens; profile --kernels triton (or a short --seq-len)", file=sys.stderr)
            return 2
        if cuda:
            cfg, mean_doc = real, args.mean_doc_tokens
        else:
            cfg = smoke_config(SMOKE_PRESETS["frontier"], **(SMOKE_FRONTIER_TRITON_DEPTH if backend == "triton" else {}))
            mean_doc = SMOKE_MEAN_DOC_TOKENS
        row = args.seq_len or packed_row_tokens(cfg)
        docs = synthetic_document_lengths(row, mean_doc, args.doc_sigma)
        step = build_step(cfg, backend, device, muon_share=args.muon_share, doc_lengths=docs, compile_model=False)
        for state, active in (("off", False), ("on", True)):
            step.set_recurrence(active)
            measured[state] = profile_step(step, steps=args.steps)
        del step
        if cuda and not args.no_compiled and row == tokens:  # the goals' setting: the compiled step at the real row
            torch.cuda.empty_cache()
            compiled = build_step(cfg, backend, device, muon_share=args.muon_share, doc_lengths=docs, compile_model=True)
            runs = recurrence_runs(compiled, steps=20, warmup_steps=3, enable_looping_at=args.enable_looping_at)
            mean_ms, peak = runs["mean_ms"], runs["peak_mem_mb"]
            timings.append(f"the torch.compile'd step (what training runs): {runs['off']['ms_median']:.2f} ms/step with "
                           f"the loop off, {runs['on']['ms_median']:.2f} ms on, run mean {mean_ms:.2f} ms; peak "
                           f"{peak:.0f} MiB; the analytical ideal below is {run.mean_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS):.2f} "
                           f"ms at the achievable ceilings")
        where = torch.cuda.get_device_name() if cuda else "CPU (fp32; not a GPU number)"
        measured_what = (f"`{cfg.preset}`, one packed row of {row:,} tokens in {len(docs)} documents "
                         f"({len(document_pieces(docs, cfg.train_seq_len))} segments), KERNELS={backend}, eager model, "
                         f"Muon on {'rank 0 of ' + str(WORLD_SIZE) if muon_world > 1 else 'every matrix'}, on {where}")
    ideal = run.mean_ms(ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS)
    references = reference_lines(mean_ms, peak, torch.cuda.get_device_name() if cuda else "",
                                 "no GPU" if not cuda else "the compiled step at the real row was not timed")
    references.insert(2, f"This ledger's ideal run mean at the achievable ceilings: {ideal:.2f} ms/step "
                         f"(R1 measured {R1_MEAN_MS / ideal:.2f} x it).")
    text = looped_markdown(measured, measured_what, run, analytic_what, _machine(cuda, load), timings, references)
    out = args.out or default_out(cuda, "frontier")
    write_atomic(out, text)
    print(text)
    print(f"bench.ledger: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
