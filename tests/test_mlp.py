"""The fused leaky-ReLU^2 MLP kernel against its fp32 PyTorch reference.

Every case runs forward and backward and checks y, dx, dW_up and dW_down. fp32 runs its dots with
input_precision="ieee" and is held to fixed bars; bf16 is held to the plain PyTorch bf16 path: the
kernel's error against the fp32 reference may be at most twice that path's error. On a machine without
CUDA the kernels run in the Triton interpreter (tests/conftest.py).
"""
import dataclasses
import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.mlp import mlp_backward, mlp_forward, mlp_reference, mlp_triton
from kernel_checks import (assert_same_losses, check_close, compile_recording_graphs, hold_on_torch, spread_projections,
                           train_tiny_losses)

from conftest import DEVICE
from kernels.selftest import BARS
# the family's bars, defined once in kernels/selftest.py (the start-up self-test holds kernels to them too)
FP32_REL_RMS, FP32_MAX_REL, ABS_FLOOR, BF16_FACTOR = dataclasses.astuple(BARS["mlp"])
GRAD_NAMES = ("y", "dx", "dw_up", "dw_down")




def _inputs(lead, d, hidden, seed):
    """Realistic scales: activations O(1), weights ~N(0, 1/fan_in), upstream gradient O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen)
    w_up = torch.randn(hidden, d, generator=gen) / math.sqrt(d)
    w_down = torch.randn(d, hidden, generator=gen) / math.sqrt(hidden)
    dy = torch.randn(*lead, d, generator=gen)
    return [t.to(DEVICE) for t in (x, w_up, w_down, dy)]


def _run(fn, x, w_up, w_down, dy, slope, dtype):
    """y and the gradients of (x, w_up, w_down) for one op, every input cast to dtype first."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x, w_up, w_down)]
    y = fn(*leaves, slope)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# _check(name, got, ref, torch_bf16=None): this file's bars (fp32 fixed; bf16 at most BF16_FACTOR x PyTorch bf16's)
_check = functools.partial(check_close, fp32_rel_rms=FP32_REL_RMS, fp32_max_rel=FP32_MAX_REL, abs_floor=ABS_FLOOR,
                           bf16_factor=BF16_FACTOR)


def _compare_to_reference(lead, d, hidden, slope, dtype, seed=0):
    x, w_up, w_down, dy = _inputs(lead, d, hidden, seed)
    # The reference sees the same (rounded) inputs as the kernel, in fp32.
    rounded = [t.to(dtype).float() for t in (x, w_up, w_down, dy)]
    ref = _run(mlp_reference, *rounded, slope, torch.float32)
    out = _run(mlp_triton, x, w_up, w_down, dy, slope, dtype)
    baseline = (_run(mlp_reference, *rounded, slope, torch.bfloat16) if dtype == torch.bfloat16
                else [None] * 4)
    assert all(t.dtype == dtype for t in out), [t.dtype for t in out]
    for name, got, want, base in zip(GRAD_NAMES, out, ref, baseline):
        _check(name, got, want, base)


# ---------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_reference_gradcheck_fp64(slope):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mlp_reference(*a, slope), (x, w_up, w_down))


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_reference_is_the_spec_formula(slope):
    # SPEC 3: act(u) = u^2 for u > 0 and (slope·u)^2 otherwise; y = W_down · act(W_up · x).
    x, w_up, w_down, _ = [t.double().cpu() for t in _inputs((9,), 8, 12, seed=4)]
    u = x @ w_up.t()
    act = torch.where(u > 0, u * u, (slope * u) ** 2)
    torch.testing.assert_close(mlp_reference(x, w_up, w_down, slope), act @ w_down.t(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The kernel against the reference
# ---------------------------------------------------------------------------------------------------
# Pairwise cover of M x slope x dtype (every pair of values appears in some row); d = 48 and hidden = 200
# are not multiples of any block size, hidden = 128 is (the unmasked path); one row has a [B, T, d] input.
PAIRWISE = [
    ((1,), 200, 0.0, torch.float32),
    ((1,), 128, 0.5, torch.bfloat16),
    ((37,), 200, 0.0, torch.bfloat16),
    ((37,), 200, 0.5, torch.float32),
    ((2, 128), 200, 0.5, torch.bfloat16),
    ((256,), 128, 0.0, torch.float32),
]


@pytest.mark.parametrize("lead, hidden, slope, dtype", PAIRWISE,
                         ids=[f"M{math.prod(c[0])}-h{c[1]}-slope{c[2]}-{str(c[3])[6:]}" for c in PAIRWISE])
def test_matches_reference(lead, hidden, slope, dtype):
    _compare_to_reference(lead, 48, hidden, slope, dtype)


def test_split_k_weight_gradient():
    """dW_down reduced over rows in fp32 partial sums (4 splits, the last one partial) equals one split."""
    x, w_up, w_down, dy = _inputs((250,), 48, 200, seed=5)
    slope = 0.5
    y, act = mlp_forward(x, w_up, w_down, slope)
    ref = _run(mlp_reference, x, w_up, w_down, dy, slope, torch.float32)
    one = mlp_backward(dy, x, act, w_up, w_down, slope, k_splits=1)
    four = mlp_backward(dy, x, act, w_up, w_down, slope, k_splits=4)
    _check("y", y, ref[0])
    for name, a, b, want in zip(GRAD_NAMES[1:], one, four, ref[1:]):
        _check(name, b, want)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}, 4 splits vs 1: {m}")


def test_strided_inputs():
    """Transposed views of x and both weights, and an expanded (stride 0) upstream gradient."""
    x, w_up, w_down, _ = _inputs((37,), 48, 200, seed=13)
    views = [t.t().contiguous().t() for t in (x, w_up, w_down)]  # same values, column-major storage
    assert all(v.stride(0) == 1 for v in views)
    leaves = [v.detach().requires_grad_() for v in views]
    mlp_triton(*leaves, 0.5).sum().backward()  # dy = ones expanded: strides (0, 0)
    ref = [t.detach().requires_grad_() for t in (x, w_up, w_down)]
    mlp_reference(*ref, 0.5).sum().backward()
    for name, got, want in zip(GRAD_NAMES[1:], leaves, ref):
        _check(name, got.grad, want.grad)


def test_act_is_leaky_relu_of_the_pre_activation():
    """What the forward keeps for backward is exactly leaky_relu(x · W_upᵀ) (and nothing larger)."""
    x, w_up, w_down, _ = _inputs((37,), 48, 200, seed=6)
    y, act = mlp_forward(x, w_up, w_down, 0.5)
    assert act.shape == (37, 200) and act.dtype == x.dtype
    _check("act", act, F.leaky_relu(x @ w_up.t(), 0.5))
    _check("y", y, mlp_reference(x, w_up, w_down, 0.5))


def test_zero_rows():
    x, w_up, w_down, _ = _inputs((0,), 48, 200, seed=7)
    x.requires_grad_(), w_up.requires_grad_(), w_down.requires_grad_()
    y = mlp_triton(x, w_up, w_down, 0.5)
    assert y.shape == (0, 48)
    y.sum().backward()
    assert x.grad.shape == (0, 48)
    assert torch.count_nonzero(w_up.grad) == 0 and torch.count_nonzero(w_down.grad) == 0


def _bad(**changes):
    x, w_up, w_down, _ = _inputs((4,), 16, 24, seed=8)
    args = dict(x=x, w_up=w_up, w_down=w_down, slope=0.5)
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(slope=-0.1), "slope=-0.1 must be a finite number >= 0"),
    (dict(slope=float("nan")), "slope=nan"),
    (dict(x=lambda a: a["x"][:, :15]), "x (4, 15) has d=15"),
    (dict(w_down=lambda a: a["w_down"].t()), "w_down (24, 16) must be [d, hidden] = (16, 24)"),
    (dict(w_up=lambda a: a["w_up"][0]), "w_up and w_down must be 2-D"),
    (dict(w_up=lambda a: a["w_up"].half()), "must share one dtype"),
    (dict(x=lambda a: a["x"].double(), w_up=lambda a: a["w_up"].double(), w_down=lambda a: a["w_down"].double()),
     "one dtype out of bfloat16/float32"),
])
def test_bad_inputs_are_named(changes, message):
    args = _bad(**changes)
    with pytest.raises(ValueError) as err:
        mlp_triton(**args)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------
# The op: dispatch, custom op registration, torch.compile, autocast
# ---------------------------------------------------------------------------------------------------
def test_dispatch_follows_the_backend(monkeypatch):
    module = importlib.import_module("kernels.mlp")  # `kernels.mlp` itself is the dispatching function
    monkeypatch.setattr(module, "mlp_triton", lambda *a: "triton")
    monkeypatch.setattr(module, "mlp_reference", lambda *a: "torch")
    x, w_up, w_down, _ = _inputs((3,), 16, 24, seed=9)
    try:
        kernels.set_backend("triton")
        calls = [kernels.mlp(x, w_up, w_down, 0.5)]
        kernels.set_backend("torch")
        calls.append(kernels.mlp(x, w_up, w_down, 0.5))
    finally:
        kernels.set_backend(None)
    assert calls == ["triton", "torch"]


def test_custom_op_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch with dynamic shapes of both custom ops,
    checked by torch.library.opcheck."""
    x, w_up, w_down, dy = _inputs((5,), 16, 24, seed=10)
    torch.library.opcheck(torch.ops.ouroboros.mlp.default,
                          (x.requires_grad_(), w_up.requires_grad_(), w_down.requires_grad_(), 0.5))
    x, w_up, w_down = x.detach(), w_up.detach(), w_down.detach()
    _, act = torch.ops.ouroboros.mlp(x, w_up, w_down, 0.5)
    torch.library.opcheck(torch.ops.ouroboros.mlp_backward.default, (dy, x, act, w_up, w_down, 0.5))


def test_torch_compile_fullgraph_traces_the_ops():
    """fullgraph=True (no graph break), the custom ops as single nodes in the forward and backward graphs.

    Backend aot_eager-style (AOTAutograd with recording compilers, no inductor): on CPU it keeps the
    test quick; on CUDA the trainer compiles the same graphs with inductor.
    """
    def block(x, w_up, w_down):
        return (x + kernels.mlp(F.rms_norm(x, (x.shape[-1],)), w_up, w_down, 0.5)).square().mean()

    x, w_up, w_down, _ = _inputs((2, 19), 48, 200, seed=11)
    torch._dynamo.reset()
    try:
        kernels.set_backend("triton")
        compiled, graphs = compile_recording_graphs(block)
        leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
        loss = compiled(*leaves)
        loss.backward()
        eager = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
        eager_loss = block(*eager)
        eager_loss.backward()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    assert "ouroboros.mlp.default" in graphs["forward"], graphs["forward"]
    assert "ouroboros.mlp_backward.default" in graphs["backward"], graphs["backward"]
    _check("loss", loss.detach(), eager_loss.detach())
    for name, a, b in zip(GRAD_NAMES[1:], leaves, eager):
        _check(name, a.grad, b.grad)


def test_autocast_casts_the_fp32_weights():
    """Under autocast (as the model runs on CUDA) fp32 master weights meet the kernel as bf16; gradients
    come back fp32, within 2x of what F.linear under the same autocast gets."""
    x, w_up, w_down, dy = _inputs((37,), 48, 200, seed=12)
    ref = _run(mlp_reference, x, w_up, w_down, dy, 0.5, torch.float32)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*args)
        return run

    out = _run(under_autocast(mlp_triton), x, w_up, w_down, dy, 0.5, torch.float32)
    base = _run(under_autocast(mlp_reference), x, w_up, w_down, dy, 0.5, torch.float32)
    assert out[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in out[1:])
    for name, got, want, b in zip(GRAD_NAMES, out, ref, base):
        _check(name, got, want, b)


# ---------------------------------------------------------------------------------------------------
# Wiring: the tiny model trains to the same losses with the kernels on and off
# ---------------------------------------------------------------------------------------------------
def test_tiny_model_same_losses_with_triton_kernels(monkeypatch):
    # Only the MLP switches: attention stays on its PyTorch path in both runs (its kernel has its own
    # wiring test, and under the interpreter it would cost this test ~2 more minutes).
    hold_on_torch(monkeypatch, "attention")
    # Muon + AdamW as the trainer runs them; the zero-initialized projections spread so dW_up moves.
    torch_losses = train_tiny_losses("torch", init=spread_projections)
    triton_losses = train_tiny_losses("triton", init=spread_projections)
    assert_same_losses(triton_losses, torch_losses, rel_tol=1e-5)
