"""Bench entry `step`: one GPU's training step of the real 8-GPU run, measured as a whole.

What one rank does per step in `torchrun --nproc_per_node=8` with the `ouroboros` preset: forward and
backward of one 48 x 2048-token micro-batch (786,432 tokens / 8 GPUs, grad accumulation 8 // 8 = 1),
the global grad-norm clip, AdamW, and Muon with this rank's round-robin share of the matrices (1/8:
Newton-Schulz on every 8th matrix, then the flat-buffer all-reduce and every matrix's update). What
runs is the trainer's own step function (train/step.py's TrainStep) on one fixed synthetic batch; the
model is torch.compile'd as in the trainer; KERNELS=triton and KERNELS=torch are the two providers.

With `--preset frontier` (R1's model) the batch is what R1 gives one rank: one packed row of
TRAIN_BATCH_TOKENS / 8 = 98,304 tokens whose documents (BOS, id 1, at each start; log-normal lengths of
mean 957 tokens, bench/flops.py synthetic_document_lengths) are cut into attention segments by
train.data.document_segments (cu_seqlens). The step is measured with the loop off and on
(`recurrence_active`), and the run's mean step is the two combined as R1's switch at 35 % of the time
combines them (bench/flops.py mean_step_ms), beside R1's measured numbers and the frontier's goals.

    python -m bench step                       # through the registry (do_bench; raise --rep-ms for more steps)
    python -m bench.step [--steps 50] [--muon-share all] [--kernels triton torch]
    python -m bench.step --preset frontier [--mean-doc-tokens 957] [--enable-looping-at 0.35]

`python -m bench.step` times many steps with CUDA events after compile warm-up and reports the median,
p20/p80 and peak memory. Without CUDA it runs the preset's CPU-sized sibling (`tiny`, `frontier-tiny`)
at a small batch so that CI walks the same code path; those are CPU (and Triton-interpreter) times,
never GPU numbers.

Muon's share needs torch.distributed: a one-process group (gloo on CPU, NCCL on CUDA) is started when
none exists, so the optimizer runs exactly the trainer's code with rank 0 of 8. The all-reduce in it is
then a one-rank collective: the real 8-GPU communication is in the ledger's analytical model only.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # kernel modules read this when imported (python -m bench.step on CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
import model  # noqa: E402
from bench.flops import (DOC_LENGTH_SIGMA, ENABLE_LOOPING_AT, MEAN_DOC_TOKENS, analytic_ledger,  # noqa: E402
                         document_pieces, mean_step_ms, synthetic_document_lengths)
from bench.registry import Case, register  # noqa: E402
from model.blocks import BOS_ID  # noqa: E402
from model.cli import nonnegative_float, nonnegative_int, positive_float, positive_int  # noqa: E402
from model.io import synchronize  # noqa: E402
from train.data import document_segments  # noqa: E402
from train.step import Optimizers, TrainingDiverged, TrainStep  # noqa: E402

WORLD_SIZE = 8            # the challenge's 8 x H100; one rank is benchmarked
PRESETS = ("ouroboros", "frontier")
# The CPU-sized sibling each preset's smoke runs (same switches, CPU dimensions).
SMOKE_PRESETS = {"ouroboros": "tiny", "frontier": "frontier-tiny"}

# CPU smoke shapes: the tiny preset at a batch the Triton interpreter gets through in seconds. The
# interpreted kernels cost ~1 s per MLP call on a loaded 2-core machine, so the triton provider also
# cuts the depth to one flat block and one crawler loop (its shape says so).
SMOKE_BATCH = dict(batch_seqs=2, seq_len=64)
SMOKE_TRITON_DEPTH = dict(num_flat_layers=1, crawler_loops=1)
# frontier-tiny's smoke: its own packed row (TRAIN_BATCH_TOKENS / 8 = 256 tokens), documents short enough
# that the row holds several; under the interpreter 3 blocks (1 looped, 2 two-lane) keep every switch.
SMOKE_MEAN_DOC_TOKENS = 48.0
SMOKE_FRONTIER_TRITON_DEPTH = dict(num_layers=3, loop_start=1, loop_end=1, parallel_start_layer=2)

# R1 as it ran on 8 x H100 SXM (FlashAttention 3, PyTorch 2.9.1), and the frontier preset's goals on our
# kernels: benchmark goals, compared only with a measured GPU number.
R1_MEAN_MS = 121.7           # 3-seed mean
R1_UNLOOPED_MS = 96.0        # about, before the loop switches on
R1_LOOPED_MS = (139.0, 141.0)
R1_SEED42 = dict(steps=4945, seconds=599.5)
R1_PEAK_MIB = 41_717         # peak memory allocated per GPU
GOAL_MEAN_MS = 100.0         # the frontier preset on our kernels, mean over the run, 8 x H100
GOAL_PEAK_MIB = R1_PEAK_MIB


def gpu_config(preset: str = "ouroboros", **overrides) -> model.Config:
    """The preset as the real run resolves it (the environment's seed variables apply)."""
    return model.from_env(preset=preset, **overrides)


def smoke_config(preset: str = "tiny", **overrides) -> model.Config:
    """A CPU-sized preset (`tiny`, `frontier-tiny`), ignoring the environment, so CI smoke is the same everywhere."""
    return model.from_env(environ={}, preset=preset, **overrides)


def per_gpu_batch_seqs(cfg: model.Config, world_size: int = WORLD_SIZE) -> int:
    """Sequences in one rank's micro-batch: TRAIN_BATCH_TOKENS / (world x accum x seq_len), accum = 8 // world."""
    accum = cfg.grad_accum_steps or max(1, 8 // world_size)
    seqs, rest = divmod(cfg.train_batch_tokens, world_size * accum * cfg.train_seq_len)
    if rest or seqs < 1:
        raise model.ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} does not split into {world_size} ranks x "
                                f"{accum} micro-batches of whole {cfg.train_seq_len}-token sequences")
    return seqs


def packed_row_tokens(cfg: model.Config, world_size: int = WORLD_SIZE) -> int:
    """Tokens in one rank's packed row (R1's batch): TRAIN_BATCH_TOKENS / (world x accum); 98,304 for `frontier`."""
    return per_gpu_batch_seqs(cfg, world_size) * cfg.train_seq_len


def packed_batch(cfg: model.Config, doc_lengths: tuple[int, ...], seed: int = 0):
    """(x [1, T], y [1, T], cu_seqlens) of one synthetic packed row whose documents have `doc_lengths` (T = their
    sum): random ids in [2, vocab), BOS at every document start but the first (the row starts inside a
    document, as a rank's slice of the stream does); segments by train.data.document_segments at
    TRAIN_SEQ_LEN, as the trainer builds them. All on the CPU."""
    T = sum(doc_lengths)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (T + 1,), generator=gen)
    starts = torch.tensor(doc_lengths[:-1], dtype=torch.long).cumsum(0)
    ids[starts] = BOS_ID
    x, y = ids[:-1].view(1, T), ids[1:].view(1, T)
    return x, y, document_segments(x, cfg.train_seq_len)


# ---------------------------------------------------------------- the process group for Muon's share

_owned_group = False


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none exists (HashStore: no ports, no files), so Muon can run as rank 0 of 8."""
    global _owned_group
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    _owned_group = True
    atexit.register(release_process_group)


def release_process_group() -> None:
    """Destroy the group if this module started it (the tests call this; the CLI leaves it to exit)."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


# ---------------------------------------------------------------- one training step

@dataclass
class BenchStep:
    """A model, the trainer's optimizers and one fixed synthetic batch; `run()` is one training step.

    The step is the trainer's own (train/step.py's TrainStep), fed the same batch every time; it opens the
    ledger's record_function ranges itself. A packed row (batch_seqs 1) carries its attention segments:
    `segments` are their lengths, cu_seqlens their offsets.
    """
    cfg: model.Config
    backend: str
    device: torch.device
    batch_seqs: int
    seq_len: int
    muon_world_size: int
    compiled: bool
    net: torch.nn.Module = field(repr=False)
    optimizers: Optimizers = field(repr=False)
    train_step: TrainStep = field(repr=False)
    steps_run: int = 0
    cu_seqlens: torch.Tensor | None = field(default=None, repr=False)
    segments: tuple = ()

    @property
    def tokens(self) -> int:
        return self.batch_seqs * self.seq_len

    @property
    def recurrence_active(self) -> bool:
        return self.net.recurrence_active

    def set_recurrence(self, active: bool) -> None:
        """Which plan the model walks from the next step on (the trainer switches it once, at 35 % of the time);
        a compiled model recompiles for the new plan in its next step."""
        self.net.recurrence_active = bool(active)

    def run(self) -> float:
        """One training step under the chosen KERNELS backend at the full LR; returns the loss.

        Like the trainer, it reads the loss and grad norm back to the host once per step (that sync is part
        of the real step: it decides whether the step diverged).
        """
        kernels.set_backend(self.backend)
        try:
            loss_value, _ = self.train_step(self.steps_run, 1.0)
        except TrainingDiverged as err:
            raise TrainingDiverged(f"bench step ({self.backend}, {self.cfg.preset}) {err}") from err
        finally:
            kernels.set_backend(None)
        self.steps_run += 1
        return loss_value


def build_step(cfg: model.Config, backend: str, device: str | torch.device, batch_seqs: int | None = None,
               seq_len: int | None = None, muon_share: str = "rank", compile_model: bool | None = None,
               seed: int = 0, doc_lengths: tuple[int, ...] | None = None) -> BenchStep:
    """One rank's training step for `cfg` with KERNELS=`backend`.

    batch_seqs, seq_len: the micro-batch (default: one rank's share of TRAIN_BATCH_TOKENS at TRAIN_SEQ_LEN).
    doc_lengths: a packed row instead (R1's batch): one row of these documents, cut into attention segments
    (packed_batch); batch_seqs and seq_len are then 1 and their sum.
    muon_share: "rank" = Newton-Schulz on rank 0's 1/8 of the matrices (the real run), "all" = every matrix.
    compile_model: torch.compile as the trainer does (default: on CUDA only, as the trainer).
    """
    if backend not in kernels.BACKENDS:
        raise ValueError(f"build_step: backend={backend!r} is not one of {kernels.BACKENDS}")
    if muon_share not in ("rank", "all"):
        raise ValueError(f"build_step: muon_share={muon_share!r} must be 'rank' (1/{WORLD_SIZE} of the matrices) or 'all'")
    device = torch.device(device)
    if doc_lengths is not None:
        doc_lengths = tuple(int(n) for n in doc_lengths)
        if not doc_lengths or min(doc_lengths) < 1 or (batch_seqs or 1) != 1 or (seq_len or sum(doc_lengths)) != sum(doc_lengths):
            raise ValueError(f"build_step: a packed row is one sequence of its documents' tokens: doc_lengths "
                             f"{doc_lengths[:8]}{'...' if len(doc_lengths) > 8 else ''} (sum {sum(doc_lengths)}), "
                             f"batch_seqs={batch_seqs}, seq_len={seq_len}")
        batch_seqs, seq_len = 1, sum(doc_lengths)
    seq_len = seq_len or cfg.train_seq_len
    batch_seqs = batch_seqs or per_gpu_batch_seqs(cfg)
    if batch_seqs < 1 or seq_len < 2:
        raise ValueError(f"build_step: batch_seqs={batch_seqs}, seq_len={seq_len}: need >= 1 sequence of >= 2 tokens")
    kernels.set_backend(backend)  # fails here, with its own message, when triton has no CUDA and no interpreter
    kernels.set_backend(None)
    compile_model = device.type == "cuda" if compile_model is None else compile_model
    muon_world = WORLD_SIZE if muon_share == "rank" else 1
    if muon_world > 1:
        ensure_process_group(device)
    torch.manual_seed(seed)
    net = model.build_model(cfg).to(device)
    forward = torch.compile(net, dynamic=False, fullgraph=cfg.compile_fullgraph) if compile_model else net
    optimizers = Optimizers(net, cfg, device, world_size=muon_world)
    if doc_lengths is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)  # synthetic tokens: the GPU machine has no data
        ids = torch.randint(0, cfg.vocab_size, (batch_seqs, seq_len + 1), generator=gen).to(device)
        x, y, cu, segments = ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None, ()
    else:
        x, y, cu = (t.to(device) for t in packed_batch(cfg, doc_lengths, seed))
        segments = document_pieces(doc_lengths, cfg.train_seq_len)
    batch = (x, y) if cu is None else (x, y, cu)  # TrainStep hands cu_seqlens on to the model, as in training
    train_step = TrainStep(forward, net, optimizers, lambda: batch, grad_clip_norm=cfg.grad_clip_norm)
    return BenchStep(cfg, backend, device, batch_seqs, seq_len, muon_world, compile_model, net, optimizers,
                     train_step, cu_seqlens=cu, segments=segments)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset (None on CPU: no per-run allocator figure there)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def time_steps(step: BenchStep, steps: int, warmup_steps: int) -> dict:
    """Run `warmup_steps` untimed steps (torch.compile happens here), then time `steps` steps one by one.

    On CUDA each step is timed with CUDA events; on CPU with perf_counter. Returns median and p20/p80 ms,
    tokens/s, warm-up seconds and the peak memory of the timed steps.
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"time_steps: steps={steps}, warmup_steps={warmup_steps}: need >= 1 timed and >= 0 warm-up")
    device = step.device
    t0 = time.perf_counter()
    for _ in range(warmup_steps):
        step.run()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step.run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            loss = step.run()
            times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    median = statistics.median(times)
    return {"ms_median": median, "ms_p20": q[0], "ms_p80": q[3], "steps": steps, "warmup_steps": warmup_steps,
            "warmup_s": warmup_s, "tokens_per_s": step.tokens / (median * 1e-3), "peak_mem_mb": peak_memory_mb(device),
            "loss": loss}


def recurrence_runs(step: BenchStep, steps: int, warmup_steps: int,
                    enable_looping_at: float = ENABLE_LOOPING_AT) -> dict:
    """time_steps with the loop off, then on (the trainer's order; each state warms up, i.e. compiles, on its
    own), and the run's mean step: {"off": ..., "on": ..., "mean_ms": ..., "peak_mem_mb": ...}."""
    runs = {}
    for state, active in (("off", False), ("on", True)):
        step.set_recurrence(active)
        runs[state] = time_steps(step, steps, warmup_steps)
    runs["mean_ms"] = mean_step_ms(runs["off"]["ms_median"], runs["on"]["ms_median"], enable_looping_at)
    peaks = [runs[s]["peak_mem_mb"] for s in ("off", "on") if runs[s]["peak_mem_mb"] is not None]
    runs["peak_mem_mb"] = max(peaks) if peaks else None
    return runs


def reference_lines(measured_mean_ms: float | None = None, measured_peak_mib: float | None = None,
                    where: str = "", not_measured: str = "no GPU") -> list[str]:
    """R1's measured step and memory, the frontier's goals, and the measured ratio to them: only for a GPU number
    of the compiled step at the real row (else `not_measured` says why there is none)."""
    lines = [f"R1 measured (8 x H100 SXM, FlashAttention 3): {R1_MEAN_MS} ms/step mean over three seeds (seed 42: "
             f"{R1_SEED42['steps']:,} steps in {R1_SEED42['seconds']} s), about {R1_UNLOOPED_MS:.0f} ms before the "
             f"loop switches on and {R1_LOOPED_MS[0]:.0f}-{R1_LOOPED_MS[1]:.0f} ms after; peak {R1_PEAK_MIB:,} MiB "
             f"allocated per GPU.",
             f"Goals for `frontier` on our kernels: <= {GOAL_MEAN_MS:.0f} ms/step mean on 8 x H100, peak <= "
             f"{GOAL_PEAK_MIB:,} MiB per GPU."]
    if measured_mean_ms is None:
        lines.append(f"Measured against the goals: not measured ({not_measured}).")
    else:
        peak = ("" if measured_peak_mib is None else
                f", peak {measured_peak_mib:,.0f} MiB = {measured_peak_mib / GOAL_PEAK_MIB:.3f} x the goal")
        lines.append(f"Measured{' on ' + where if where else ''} (one rank's step; its collectives are one-rank): "
                     f"{measured_mean_ms:.2f} ms/step run mean = {measured_mean_ms / GOAL_MEAN_MS:.3f} x the goal, "
                     f"{measured_mean_ms / R1_MEAN_MS:.3f} x R1{peak}.")
    return lines


# ---------------------------------------------------------------- the registry entry

def step_flops(cfg: model.Config, batch_seqs: int, seq_len: int, muon_share: str, recurrence_active: bool = True,
               segments: tuple = ()) -> float:
    """Analytical FLOPs of one step (bench/flops.py states the formulas)."""
    return analytic_ledger(cfg, batch_seqs, seq_len, muon_world_size=WORLD_SIZE if muon_share == "rank" else 1,
                           recurrence_active=recurrence_active, segments=segments or None).flops


def _lazy_case_fn(build, warmup_steps: int):
    """The step is built and warmed up (compiled) on the first call, so listing cases allocates nothing."""
    holder = {}

    def fn():
        if "step" not in holder:
            holder["step"] = build()
            for _ in range(warmup_steps):
                holder["step"].run()
        return holder["step"].run()
    return fn


@register("step")
def cases(device: str, smoke: bool) -> list[Case]:
    out = []
    for backend in kernels.BACKENDS:
        if smoke:
            cfg = smoke_config(**(SMOKE_TRITON_DEPTH if backend == "triton" else {}))
            batch_seqs, seq_len, warmup = SMOKE_BATCH["batch_seqs"], SMOKE_BATCH["seq_len"], 0
        else:
            cfg = gpu_config()
            batch_seqs, seq_len, warmup = per_gpu_batch_seqs(cfg), cfg.train_seq_len, 3
        shape = dict(preset=cfg.preset, B=batch_seqs, T=seq_len, muon=f"1/{WORLD_SIZE}")
        if smoke and backend == "triton":
            shape["layers"] = f"{cfg.num_flat_layers}+{cfg.crawler_loops}"

        def build(cfg=cfg, backend=backend, batch_seqs=batch_seqs, seq_len=seq_len):
            return build_step(cfg, backend, device, batch_seqs, seq_len, muon_share="rank")
        out.append(Case(kernel="step", provider=backend, mode="fwd+bwd", shape=shape,
                        fn=_lazy_case_fn(build, warmup), flops=step_flops(cfg, batch_seqs, seq_len, "rank")))
    return out


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="ouroboros",
                        help="ouroboros (48 rows of 2048, default) or frontier (R1: one packed row, the loop off and "
                             "on); without CUDA their CPU siblings tiny and frontier-tiny")
    parser.add_argument("--kernels", nargs="+", default=None, choices=kernels.BACKENDS,
                        help="KERNELS backends to time (default: both; frontier on CUDA: triton, since the torch path "
                             "masks a dense T x T per row)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (default: 50 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup-steps", type=nonnegative_int, default=None,
                        help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--muon-share", choices=("rank", "all"), default="rank",
                        help="rank: Newton-Schulz on rank 0's 1/8 of the matrices (default); all: every matrix")
    parser.add_argument("--batch-seqs", type=positive_int, default=None,
                        help="sequences per step (default: one GPU's share; frontier: 1, its packed row)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per sequence (default: TRAIN_SEQ_LEN; frontier: the packed row's tokens, "
                             "TRAIN_BATCH_TOKENS / 8)")
    parser.add_argument("--mean-doc-tokens", type=positive_float, default=None,
                        help=f"frontier: mean document length in the synthetic row (default {MEAN_DOC_TOKENS:.0f}, R1's "
                             f"CaseOps val mean; CPU smoke {SMOKE_MEAN_DOC_TOKENS:.0f})")
    parser.add_argument("--doc-sigma", type=nonnegative_float, default=DOC_LENGTH_SIGMA,
                        help="frontier: sigma of the log-normal document lengths (default %(default)s)")
    parser.add_argument("--enable-looping-at", type=nonnegative_float, default=ENABLE_LOOPING_AT,
                        help="frontier: fraction of the training time after which the loop is on (default %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="eager model even on CUDA")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (atomically, after each run)")
    args = parser.parse_args(argv)
    if args.enable_looping_at > 1.0:
        parser.error(f"argument --enable-looping-at: must be a fraction of the training time in [0, 1], "
                     f"got {args.enable_looping_at:g}")
    if args.preset == "frontier" and (args.batch_seqs or 1) != 1:
        parser.error(f"--batch-seqs {args.batch_seqs}: the frontier's batch is one packed row")
    return args


def _print_run(label: str, run: dict, steps: int) -> None:
    if "error" in run:
        print(f"step[{label}]: ERROR {run['error']}", flush=True)
        return
    peak = f"{run['peak_mem_mb']:.0f} MiB" if run["peak_mem_mb"] is not None else "n/a on CPU"
    print(f"step[{label}]: {run['ms_median']:.2f} ms/step (p20 {run['ms_p20']:.2f}, p80 {run['ms_p80']:.2f}) "
          f"over {steps} steps, {run['tokens_per_s']:,.0f} tokens/s, {run['tflops']:.1f} TFLOP/s (analytic FLOPs), "
          f"peak {peak}, warm-up {run['warmup_s']:.1f} s", flush=True)


def _write(path: Path | None, result: dict) -> None:
    if path:
        from model.io import write_atomic
        write_atomic(path, json.dumps(result, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.preset == "frontier":
        return frontier_main(args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        cfg = gpu_config()
        torch.backends.cuda.matmul.allow_tf32 = True
        batch_seqs, seq_len = args.batch_seqs or per_gpu_batch_seqs(cfg), args.seq_len or cfg.train_seq_len
    else:
        print("bench.step: no CUDA: the tiny preset on CPU (CPU / Triton-interpreter times, not GPU numbers; "
              f"the triton provider runs {SMOKE_TRITON_DEPTH} under the interpreter)")
        cfg = smoke_config()
        batch_seqs = args.batch_seqs or SMOKE_BATCH["batch_seqs"]
        seq_len = args.seq_len or SMOKE_BATCH["seq_len"]
    steps = args.steps or (50 if cuda else 3)
    warmup = args.warmup_steps if args.warmup_steps is not None else (5 if cuda else 1)
    result = {"preset": cfg.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "batch_seqs": batch_seqs, "seq_len": seq_len, "tokens_per_step": batch_seqs * seq_len,
              "muon_share": args.muon_share, "compiled": cuda and not args.no_compile,
              "flops_per_step": step_flops(cfg, batch_seqs, seq_len, args.muon_share), "runs": {}}
    status = 0
    for backend in args.kernels or list(kernels.BACKENDS):
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        if not cuda and backend == "triton":
            cfg = smoke_config(**SMOKE_TRITON_DEPTH)
        try:
            step = build_step(cfg, backend, device, batch_seqs, seq_len, args.muon_share,
                              compile_model=cuda and not args.no_compile)
            run = time_steps(step, steps, warmup)
            run["tflops"] = result["flops_per_step"] / (run["ms_median"] * 1e-3) / 1e12
            del step
        except Exception as exc:  # the other backend still runs
            run, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
        result["runs"][backend] = run
        _print_run(backend, run, steps)
        _write(args.json, result)
    return status


def frontier_main(args: argparse.Namespace) -> int:
    """--preset frontier: per backend, the step with the loop off and on, and the run's mean step.

    JSON: runs["<backend>, recurrence off|on"] as for ouroboros (each with its own analytic FLOPs), and
    frontier[<backend>] = {mean_ms, peak_mem_mb, goal ratios when on CUDA}; written after every run, so a
    kill keeps what finished."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backends = args.kernels or (["triton"] if cuda else list(kernels.BACKENDS))
    if cuda:
        cfg = gpu_config("frontier")
        torch.backends.cuda.matmul.allow_tf32 = True
        mean_doc = args.mean_doc_tokens or MEAN_DOC_TOKENS
    else:
        cfg = smoke_config(SMOKE_PRESETS["frontier"])
        mean_doc = args.mean_doc_tokens or SMOKE_MEAN_DOC_TOKENS
        print(f"bench.step: no CUDA: the frontier-tiny preset on CPU (CPU / Triton-interpreter times, not GPU numbers; "
              f"the triton provider runs {SMOKE_FRONTIER_TRITON_DEPTH} under the interpreter)")
    tokens = args.seq_len or packed_row_tokens(cfg)
    docs = synthetic_document_lengths(tokens, mean_doc, args.doc_sigma)
    segments = document_pieces(docs, cfg.train_seq_len)
    steps = args.steps or (50 if cuda else 3)
    warmup = args.warmup_steps if args.warmup_steps is not None else (5 if cuda else 1)
    result = {"preset": cfg.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "batch_seqs": 1, "seq_len": tokens, "tokens_per_step": tokens, "muon_share": args.muon_share,
              "compiled": cuda and not args.no_compile,
              "documents": dict(count=len(docs), mean_tokens=mean_doc, sigma=args.doc_sigma),
              "segments": dict(count=len(segments), max_len=cfg.train_seq_len,
                               sum_squares=sum(n * n for n in segments)),
              "enable_looping_at": args.enable_looping_at, "runs": {}, "frontier": {}}
    # The goals are for the compiled step at the real row: only such a GPU number is compared with them.
    not_measured = ("no GPU" if not cuda else "eager model" if args.no_compile else
                    f"a {tokens:,}-token row, not {packed_row_tokens(cfg):,}" if tokens != packed_row_tokens(cfg) else "")
    comparable = not not_measured
    status = 0
    for backend in backends:
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        run_cfg = cfg.replace(**SMOKE_FRONTIER_TRITON_DEPTH) if not cuda and backend == "triton" else cfg
        label = f"{backend}, recurrence off"
        try:
            if cuda and backend == "torch" and not args.seq_len:
                raise ValueError("KERNELS=torch masks a dense T x T per row with cu_seqlens: not runnable at "
                                 f"{tokens:,} tokens (use triton, or a short --seq-len)")
            step = build_step(run_cfg, backend, device, muon_share=args.muon_share, doc_lengths=docs,
                              compile_model=cuda and not args.no_compile)
            for state, active in (("off", False), ("on", True)):
                label = f"{backend}, recurrence {state}"
                step.set_recurrence(active)
                run = time_steps(step, steps, warmup)
                flops = step_flops(run_cfg, 1, tokens, args.muon_share, active, segments)
                run.update(flops_per_step=flops, tflops=flops / (run["ms_median"] * 1e-3) / 1e12)
                result["runs"][label] = run
                _print_run(label, run, steps)
                _write(args.json, result)
            del step
            off, on = (result["runs"][f"{backend}, recurrence {s}"] for s in ("off", "on"))
            summary = {"mean_ms": mean_step_ms(off["ms_median"], on["ms_median"], args.enable_looping_at),
                       "peak_mem_mb": None if off["peak_mem_mb"] is None else max(off["peak_mem_mb"], on["peak_mem_mb"])}
            if comparable:
                summary.update(goal_ratio=summary["mean_ms"] / GOAL_MEAN_MS, r1_ratio=summary["mean_ms"] / R1_MEAN_MS,
                               peak_goal_ratio=summary["peak_mem_mb"] / GOAL_PEAK_MIB)
            summary["reference"] = reference_lines(summary["mean_ms"] if comparable else None, summary["peak_mem_mb"],
                                                   result["device"], not_measured)
            result["frontier"][backend] = summary
            print(f"step[{backend}]: run mean {summary['mean_ms']:.2f} ms/step with the loop on from "
                  f"{args.enable_looping_at:.0%} of the time{'' if cuda else ' (CPU, not a GPU number)'}", flush=True)
            for line in summary["reference"]:
                print(f"  {line}", flush=True)
        except Exception as exc:  # the other backend still runs
            result["runs"][label] = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
            _print_run(label, result["runs"][label], steps)
        _write(args.json, result)
    return status


if __name__ == "__main__":
    sys.exit(main())
