"""Bench entry `eval`: sliding-window evaluation of one GPU's share of the real val set, timed.

The reported score is a sliding-window eval (window 2048, stride 64) over the 62,021,632 val targets
of FineWeb: 969,088 windows split over 8 GPUs, 121,136 per GPU. The original took 75-97 s for it on
8 x H100, about 2e16 forward FLOPs per GPU. The GPU machine has no data, so the tokens are synthetic;
the cost does not depend on their values. Rank 0's share is the first 1/8 of the windows, i.e. the
windows of the first (share - 1)·stride + window targets, so a single process evaluating that prefix
with train.evaluate.evaluate_bpb does exactly rank 0's work.

    python -m bench eval                       # registry: 1/128 of the share per call (do_bench)
    python -m bench.eval_timing [--fraction 1] [--kernels triton torch] [--batch-seqs 32]

`python -m bench.eval_timing` times the share (or a stated fraction of it, projected linearly: the
windows are all the same size, so time is linear in their count) after compile warm-up; the projection
is also the 8-GPU time of the full val set, since the ranks run in parallel. Without CUDA it is a smoke
of the `tiny` preset (CPU times, not GPU numbers).

FLOPs (forward only, the MFU convention): per token 2·(matmul parameters applied per token) + causal
attention 2·applications·T·d, times window·windows tokens (every window is padded to the full length).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # kernel modules read this when imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
import model  # noqa: E402
from bench.flops import model_flops_per_token  # noqa: E402
from bench.registry import Case, register  # noqa: E402
from model.cli import positive_float, positive_int  # noqa: E402
from model.io import synchronize  # noqa: E402
from train.evaluate import sliding_windows  # noqa: E402
from train.evaluate import validate  # noqa: E402

VAL_TARGETS = 62_021_632     # FineWeb's val shard kept at L = 2048, minus one (SPEC 2)
WORLD_SIZE = 8
REGISTRY_FRACTION = 128      # the registry case times 1/128 of the share: do_bench calls it many times
# CPU smoke: the tiny preset with short windows; the interpreted Triton kernels cost ~1 s per MLP call on
# a loaded 2-core machine, so the triton provider also runs one flat block and one crawler loop.
SMOKE_WINDOWS = 2
SMOKE_EVAL = dict(eval_seq_len=64, eval_stride=32)
SMOKE_TRITON_DEPTH = dict(num_flat_layers=1, crawler_loops=1)


def smoke_config(backend: str) -> model.Config:
    """The tiny preset (environment ignored) at SMOKE_EVAL windows, cut in depth for the interpreter."""
    return model.from_env(environ={}, preset="tiny", **SMOKE_EVAL,
                          **(SMOKE_TRITON_DEPTH if backend == "triton" else {}))


def total_windows(num_targets: int = VAL_TARGETS, window: int = 2048, stride: int = 64) -> int:
    """Windows of the sliding eval: starts 0, S, 2S, ... until one reaches the end ((M - W) / S + 1, rounded up)."""
    if num_targets <= window:
        return 1
    return -(-(num_targets - window) // stride) + 1


def share_windows(world_size: int = WORLD_SIZE, **kw) -> int:
    """Rank 0's windows: evaluate_bpb gives rank r the slice [r·n // w, (r + 1)·n // w)."""
    return total_windows(**kw) // world_size


def targets_for(windows: int, window: int, stride: int) -> int:
    """Targets whose sliding eval has exactly `windows` windows, all full-length."""
    return (windows - 1) * stride + window


def eval_flops(cfg: model.Config, windows: int, window: int) -> float:
    """Forward FLOPs of `windows` padded windows: tokens x (2·applied matmul params + 2·applications·T·d)."""
    # model_flops_per_token is forward + backward (6·P + 6·A·T·d): the forward is a third of each term.
    return windows * window * model_flops_per_token(cfg, window) / 3.0


def synthetic_luts(vocab_size: int, seed: int = 0):
    """Byte lookup tables shaped like build_byte_luts' (1-4 bytes per id, some with a leading space)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (vocab_size,), generator=gen, dtype=torch.int16)
    space = torch.rand(vocab_size, generator=gen) < 0.3
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    boundary[:4] = True  # pad, bos, eos, unk
    base[:4] = 0
    return base, space, boundary


class EvalRun:
    """A model and synthetic val tokens for `windows` sliding windows; `run()` evaluates them once."""

    def __init__(self, cfg: model.Config, backend: str, device, windows: int, batch_seqs: int,
                 compile_model: bool | None = None, seed: int = 0):
        if windows < 1 or batch_seqs < 1:
            raise ValueError(f"EvalRun: windows={windows}, batch_seqs={batch_seqs}: both must be >= 1")
        self.cfg, self.backend, self.device = cfg, backend, torch.device(device)
        self.window, self.stride = cfg.eval_seq_len, cfg.eval_stride
        self.windows, self.batch_seqs = windows, batch_seqs
        kernels.set_backend(backend)  # fails here, with its own message, if the backend cannot run
        kernels.set_backend(None)
        torch.manual_seed(seed)
        self.net = model.build_model(cfg).to(self.device).eval()
        compile_model = self.device.type == "cuda" if compile_model is None else compile_model
        self.forward = torch.compile(self.net, dynamic=False, fullgraph=cfg.compile_fullgraph) if compile_model else self.net
        gen = torch.Generator().manual_seed(seed)
        targets = targets_for(windows, self.window, self.stride)
        self.tokens = torch.randint(0, cfg.vocab_size, (targets + 1,), generator=gen)
        self.luts = synthetic_luts(cfg.vocab_size, seed)
        got = len(sliding_windows(targets, self.window, self.stride))
        if got != windows:  # the arithmetic above and train.evaluate must agree
            raise AssertionError(f"EvalRun: {targets} targets give {got} windows, expected {windows}")

    def run(self, tokens: torch.Tensor | None = None) -> tuple[float, float]:
        """(val_loss, val_bpb) over the windows, under KERNELS=backend (bf16 autocast on CUDA)."""
        kernels.set_backend(self.backend)
        try:  # the trainer's validation pass
            return validate(self.forward, self.net, self.tokens if tokens is None else tokens, self.luts,
                            seq_len=self.window, stride=self.stride, batch_seqs=self.batch_seqs, device=self.device)
        finally:
            kernels.set_backend(None)

    def warm_up(self) -> None:
        """One batch of windows through the model (torch.compile happens here, at the timed batch shape)."""
        self.run(self.tokens[:targets_for(self.batch_seqs, self.window, self.stride) + 1])




@register("eval")
def cases(device: str, smoke: bool) -> list[Case]:
    out = []
    for backend in kernels.BACKENDS:
        if smoke:
            cfg = smoke_config(backend)
            windows, batch, fraction = SMOKE_WINDOWS, SMOKE_WINDOWS, "smoke"
        else:
            cfg = model.from_env(preset="ouroboros")
            share = share_windows(window=cfg.eval_seq_len, stride=cfg.eval_stride)
            windows, batch, fraction = share // REGISTRY_FRACTION, cfg.eval_batch_seqs, f"1/{REGISTRY_FRACTION}"
        shape = dict(preset=cfg.preset, windows=windows, W=cfg.eval_seq_len, S=cfg.eval_stride, batch=batch,
                     share=fraction)
        if smoke and backend == "triton":
            shape["layers"] = f"{cfg.num_flat_layers}+{cfg.crawler_loops}"
        holder = {}

        def fn(cfg=cfg, backend=backend, windows=windows, batch=batch, holder=holder):
            if "run" not in holder:  # built and compiled on the first call, so listing cases allocates nothing
                holder["run"] = EvalRun(cfg, backend, device, windows, batch)
                if not smoke:
                    holder["run"].warm_up()
            return holder["run"].run()
        out.append(Case(kernel="eval", provider=backend, mode="fwd", shape=shape, fn=fn,
                        flops=eval_flops(cfg, windows, cfg.eval_seq_len)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=positive_float, default=None,
                        help="part of one GPU's share to time, projected linearly (default: 1 on CUDA)")
    parser.add_argument("--kernels", nargs="+", choices=kernels.BACKENDS, default=list(kernels.BACKENDS))
    parser.add_argument("--batch-seqs", type=positive_int, default=None,
                        help="windows per forward (default: EVAL_BATCH_SEQS)")
    parser.add_argument("--windows", type=positive_int, default=None, help="exact window count (overrides --fraction)")
    args = parser.parse_args(argv)
    if args.fraction is not None and args.fraction > 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1]")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    share = share_windows(window=2048, stride=64)  # the real share, whatever preset runs
    if args.windows:
        windows = args.windows
    elif cuda:
        windows = max(1, round(share * (args.fraction or 1.0)))
    else:
        print("bench.eval_timing: no CUDA: a smoke of the tiny preset on CPU (not a GPU number)")
        windows = SMOKE_WINDOWS
    batch = args.batch_seqs or (model.from_env(preset="ouroboros").eval_batch_seqs if cuda else SMOKE_WINDOWS)
    fraction = windows / share
    print(f"bench.eval_timing: {windows} windows, batch {batch}: {fraction:.4g} of one GPU's share of {share} "
          f"windows ({total_windows()} in all)")
    status = 0
    for backend in args.kernels:
        cfg = model.from_env(preset="ouroboros") if cuda else smoke_config(backend)
        try:
            run = EvalRun(cfg, backend, device, windows, batch)
            t0 = time.perf_counter()
            run.warm_up()
            synchronize(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            loss, bpb = run.run()
            synchronize(device)
            seconds = time.perf_counter() - t0
            tflops = eval_flops(cfg, windows, cfg.eval_seq_len) / seconds / 1e12
            line = (f"eval[{backend}]: {cfg.preset} (layers {cfg.num_flat_layers}+{cfg.crawler_loops}, window "
                    f"{cfg.eval_seq_len}, stride {cfg.eval_stride}): {seconds:.2f} s for {windows} windows ({tflops:.1f} TFLOP/s), warm-up {warm:.1f} s, "
                    f"val_loss {loss:.3f} on random tokens")
            if cuda:
                line += (f"; projected to the full share (= 8-GPU wall time of the whole val set): "
                         f"{seconds / fraction:.1f} s (measured on {fraction:.4g} of it, scaled linearly)")
            print(line, flush=True)
            del run
        except Exception as exc:  # the other backend still runs
            print(f"eval[{backend}]: ERROR {type(exc).__name__}: {exc}", flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
