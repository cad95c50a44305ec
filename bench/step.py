"""Bench entry `step`: one GPU's training step of the real 8-GPU run, measured as a whole.

What one rank does per step in `torchrun --nproc_per_node=8` with the `ouroboros` preset: forward and
backward of one 48 x 2048-token micro-batch (786,432 tokens / 8 GPUs, grad accumulation 8 // 8 = 1),
the global grad-norm clip, AdamW, and Muon with this rank's round-robin share of the matrices (1/8:
Newton-Schulz on every 8th matrix, then the flat-buffer all-reduce and every matrix's update). What
runs is the trainer's own step function (train/step.py's TrainStep) on one fixed synthetic batch; the
model is torch.compile'd as in the trainer; KERNELS=triton and KERNELS=torch are the two providers.

    python -m bench step                       # through the registry (do_bench; raise --rep-ms for more steps)
    python -m bench.step [--steps 50] [--muon-share all] [--kernels triton torch]

`python -m bench.step` times many steps with CUDA events after compile warm-up and reports the median,
p20/p80 and peak memory. Without CUDA both run the `tiny` preset at a small batch so that CI walks the
same code path; those are CPU (and Triton-interpreter) times, never GPU numbers.

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
from bench.flops import analytic_ledger
from bench.registry import Case, register
from model.cli import nonnegative_int, positive_int
from model.io import synchronize
from train.step import Optimizers, TrainingDiverged, TrainStep

WORLD_SIZE = 8            # the challenge's 8 x H100; one rank is benchmarked

# CPU smoke shapes: the tiny preset at a batch the Triton interpreter gets through in seconds. The
# interpreted kernels cost ~1 s per MLP call on a loaded 2-core machine, so the triton provider also
# cuts the depth to one flat block and one crawler loop (its shape says so).
SMOKE_BATCH = dict(batch_seqs=2, seq_len=64)
SMOKE_TRITON_DEPTH = dict(num_flat_layers=1, crawler_loops=1)


def gpu_config(**overrides) -> model.Config:
    """The `ouroboros` preset as the real run resolves it (the environment's seed variables apply)."""
    return model.from_env(preset="ouroboros", **overrides)


def smoke_config(**overrides) -> model.Config:
    """The `tiny` preset, ignoring the environment, so CI smoke is the same everywhere."""
    return model.from_env(environ={}, preset="tiny", **overrides)


def per_gpu_batch_seqs(cfg: model.Config, world_size: int = WORLD_SIZE) -> int:
    """Sequences in one rank's micro-batch: TRAIN_BATCH_TOKENS / (world x accum x seq_len), accum = 8 // world."""
    accum = cfg.grad_accum_steps or max(1, 8 // world_size)
    seqs, rest = divmod(cfg.train_batch_tokens, world_size * accum * cfg.train_seq_len)
    if rest or seqs < 1:
        raise model.ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} does not split into {world_size} ranks x "
                                f"{accum} micro-batches of whole {cfg.train_seq_len}-token sequences")
    return seqs


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
    ledger's record_function ranges itself.
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

    @property
    def tokens(self) -> int:
        return self.batch_seqs * self.seq_len

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
               seed: int = 0) -> BenchStep:
    """One rank's training step for `cfg` with KERNELS=`backend`.

    batch_seqs, seq_len: the micro-batch (default: one rank's share of TRAIN_BATCH_TOKENS at TRAIN_SEQ_LEN).
    muon_share: "rank" = Newton-Schulz on rank 0's 1/8 of the matrices (the real run), "all" = every matrix.
    compile_model: torch.compile as the trainer does (default: on CUDA only, as the trainer).
    """
    if backend not in kernels.BACKENDS:
        raise ValueError(f"build_step: backend={backend!r} is not one of {kernels.BACKENDS}")
    if muon_share not in ("rank", "all"):
        raise ValueError(f"build_step: muon_share={muon_share!r} must be 'rank' (1/{WORLD_SIZE} of the matrices) or 'all'")
    device = torch.device(device)
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
    gen = torch.Generator(device="cpu").manual_seed(seed)  # synthetic tokens: the GPU machine has no data
    ids = torch.randint(0, cfg.vocab_size, (batch_seqs, seq_len + 1), generator=gen).to(device)
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    train_step = TrainStep(forward, net, optimizers, lambda: batch, grad_clip_norm=cfg.grad_clip_norm)
    return BenchStep(cfg, backend, device, batch_seqs, seq_len, muon_world, compile_model, net, optimizers,
                     train_step)




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


# ---------------------------------------------------------------- the registry entry

def step_flops(cfg: model.Config, batch_seqs: int, seq_len: int, muon_share: str) -> float:
    """Analytical FLOPs of one step (bench/flops.py states the formulas)."""
    return analytic_ledger(cfg, batch_seqs, seq_len, muon_world_size=WORLD_SIZE if muon_share == "rank" else 1).flops


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
    parser.add_argument("--kernels", nargs="+", default=list(kernels.BACKENDS), choices=kernels.BACKENDS,
                        help="KERNELS backends to time (default: both)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (default: 50 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup-steps", type=nonnegative_int, default=None,
                        help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--muon-share", choices=("rank", "all"), default="rank",
                        help="rank: Newton-Schulz on rank 0's 1/8 of the matrices (default); all: every matrix")
    parser.add_argument("--batch-seqs", type=positive_int, default=None,
                        help="sequences per step (default: one GPU's share)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per sequence (default: TRAIN_SEQ_LEN)")
    parser.add_argument("--no-compile", action="store_true", help="eager model even on CUDA")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (atomically)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
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
    for backend in args.kernels:
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
        if "error" in run:
            print(f"step[{backend}]: ERROR {run['error']}", flush=True)
        else:
            peak = f"{run['peak_mem_mb']:.0f} MiB" if run["peak_mem_mb"] is not None else "n/a on CPU"
            print(f"step[{backend}]: {run['ms_median']:.2f} ms/step (p20 {run['ms_p20']:.2f}, p80 {run['ms_p80']:.2f}) "
                  f"over {steps} steps, {run['tokens_per_s']:,.0f} tokens/s, {run['tflops']:.1f} TFLOP/s (analytic FLOPs), "
                  f"peak {peak}, warm-up {run['warmup_s']:.1f} s", flush=True)
    if args.json:
        from model.io import write_atomic
        write_atomic(args.json, json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
