"""Helpers shared by the kernel test files: the error-bar comparison and the tiny-model loss match.

Plain functions, imported as `from kernel_checks import ...` (pytest's default rootdir import mode puts
tests/ on sys.path, under xdist workers too). Each test file keeps its own bars and passes them in.
"""
import importlib
import math

import torch

import kernels

from conftest import DEVICE


def report_mismatches(name, got, ref, bad, limit=5):
    """The first `limit` places where `bad` is set, got next to ref (a 0-dim result: its one value)."""
    if got.dim() == 0:
        return f"  {name}: got {got.item():+.8e} ref {ref.item():+.8e}"
    idx = bad.nonzero()[:limit].tolist()
    return "\n".join(f"  {name}{tuple(i)}: got {got[tuple(i)].item():+.6e} ref {ref[tuple(i)].item():+.6e}"
                     for i in idx)


def check_close(name, got, ref, torch_bf16=None, *, fp32_rel_rms, fp32_max_rel, abs_floor, bf16_factor=2.0):
    """got vs the fp32 reference ref.

    torch_bf16 None: fixed bars, RMS error <= fp32_rel_rms x RMS(ref) and max error <= fp32_max_rel x
    max|ref| (each + abs_floor). Otherwise torch_bf16 is the plain PyTorch bf16 result, and got's RMS and
    max errors may be at most bf16_factor x that path's (+ abs_floor). A failure names the first mismatches.
    """
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), (
        f"{name}: non-finite values\n" + report_mismatches(name, got, ref, ~torch.isfinite(got)))
    err = (got - ref).abs()
    rms = lambda t: t.pow(2).mean().sqrt().item() if t.numel() else 0.0
    amax = lambda t: t.abs().max().item() if t.numel() else 0.0
    err_rms, err_max = rms(got - ref), amax(err)
    if torch_bf16 is None:
        rms_bar = fp32_rel_rms * rms(ref) + abs_floor
        max_bar = fp32_max_rel * amax(ref) + abs_floor
    else:
        torch_err = torch_bf16.float() - ref
        rms_bar = bf16_factor * rms(torch_err) + abs_floor
        max_bar = bf16_factor * amax(torch_err) + abs_floor
    assert err_rms <= rms_bar and err_max <= max_bar, (
        f"{name}: rms error {err_rms:.3e} (bar {rms_bar:.3e}), max error {err_max:.3e} (bar {max_bar:.3e}), "
        f"max |ref| {amax(ref):.3e}; first mismatches:\n" + report_mismatches(name, got, ref, err > max_bar / 2))


# ---------------------------------------------------------------------------------------------------
# The tiny model trained a few steps with one backend: each kernel's wiring test
# ---------------------------------------------------------------------------------------------------
# kernels.<op> -> (module, its PyTorch path): what a wiring test holds fixed while its own kernel switches.
TORCH_PATHS = {"attention": ("kernels.attention", "attention_sdpa"), "mlp": ("kernels.mlp", "mlp_reference"),
               "mix_norm": ("kernels.norm", "mix_norm_reference"), "add_norm": ("kernels.norm", "add_norm_reference"),
               "rms_norm": ("kernels.norm", "rms_norm_reference"),
               "softcap_cross_entropy": ("kernels.head", "softcap_cross_entropy_reference")}


def hold_on_torch(monkeypatch, *ops):
    """Point kernels.<op> at its PyTorch path for this test, whatever the backend; ops kernels lacks are skipped."""
    for op in ops:
        if hasattr(kernels, op):
            module, name = TORCH_PATHS[op]
            monkeypatch.setattr(kernels, op, getattr(importlib.import_module(module), name))


def tiny_config(**overrides):
    """The tiny preset (defaults, not $ENV), with overrides."""
    from model.config import from_env

    return from_env(environ={}, preset="tiny", **overrides)


def reduced_tiny_config(steps):
    """The tiny preset on 2 sequences of 64 tokens, `steps` iterations with a 2-step warmdown."""
    return tiny_config(train_seq_len=64, train_batch_tokens=128, iterations=steps, warmdown_iters=2,
                       max_wallclock_seconds=0.0)


def spread_projections(net):
    """The zero-initialized output projections to N(0, 1/fan_in): zero, they leave dW_up = 0 in the first step."""
    for name, p in net.named_parameters():
        if name.endswith(("mlp.proj.weight", "attn.proj.weight")):
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))


class _FixedSGD(torch.optim.SGD):
    """SGD as TrainStep drives an optimizer, with no schedule: the LR stays fixed."""

    def set_schedule(self, step, multiplier):
        pass


def train_tiny_losses(backend, cfg=None, *, steps=3, optimizer="trainer", init=None, token_seed=1, sgd_lr=0.05):
    """The loss before each of `steps` optimizer steps of the tiny model (seed 0) on 2 random sequences of
    64 tokens (generator seed token_seed), with kernels.set_backend(backend) for the whole run.

    cfg: the model config (default reduced_tiny_config(steps)). init(net), if given, runs under no_grad
    after the build. Every step is the trainer's (train/step.py's TrainStep, without autocast): optimizer
    "trainer" with its Muon + AdamW, clipping and step schedule; "sgd" with plain SGD at sgd_lr and no
    clip, so no optimizer state can amplify rounding.
    """
    from model import build_model
    from train.step import Optimizers, TrainStep, lr_multiplier

    if optimizer not in ("trainer", "sgd"):
        raise ValueError(f"train_tiny_losses: optimizer={optimizer!r} must be 'trainer' or 'sgd'")
    cfg = cfg if cfg is not None else reduced_tiny_config(steps)
    kernels.set_backend(backend)
    try:
        torch.manual_seed(0)
        net = build_model(cfg).to(DEVICE)
        if init is not None:
            with torch.no_grad():
                init(net)
        if optimizer == "trainer":
            optimizers, clip = Optimizers(net, cfg, DEVICE), cfg.grad_clip_norm
        else:
            optimizers, clip = _FixedSGD(net.parameters(), lr=sgd_lr), 0.0
        gen = torch.Generator().manual_seed(token_seed)
        tokens = torch.randint(0, cfg.vocab_size, (steps, 2, 65), generator=gen).to(DEVICE)
        batches = zip(tokens[:, :, :-1], tokens[:, :, 1:])
        train_step = TrainStep(net, net, optimizers, lambda: next(batches), grad_clip_norm=clip, autocast=False)
        losses = []
        for step in range(steps):
            multiplier = lr_multiplier(step, 0.0, iterations=steps, warmdown_iters=2, max_wallclock_ms=None)
            losses.append(train_step(step, multiplier)[0])
    finally:
        kernels.set_backend(None)
    return losses


def assert_same_losses(triton_losses, torch_losses, rel_tol):
    """KERNELS=triton losses finite, the torch run's all different (the steps moved the model), and each
    within rel_tol of the torch run's."""
    assert all(math.isfinite(v) for v in triton_losses), triton_losses
    assert len(set(torch_losses)) == len(torch_losses)  # the steps did change the model
    for step, (a, b) in enumerate(zip(triton_losses, torch_losses)):
        assert abs(a - b) <= rel_tol * abs(b), f"step {step}: KERNELS=triton loss {a:.7f} vs KERNELS=torch {b:.7f}"


def compile_recording_graphs(fn):
    """torch.compile(fn, fullgraph=True) through AOTAutograd with compilers that record which ops each
    graph calls and run it eagerly (aot_eager-style, no inductor: quick on CPU). Returns (compiled, graphs),
    graphs filled on the first call: {"forward"/"backward": set of call_function target names}."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    return torch.compile(fn, fullgraph=True, backend=backend), graphs
