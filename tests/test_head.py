"""The fused soft-capped tied-head cross-entropy (kernels/head.py) against its fp32 PyTorch reference.

Every case runs forward and backward and checks the loss, dh and dweight. fp32 runs its dots with
input_precision="ieee" and is held to fixed bars; bf16 is held to the plain PyTorch bf16 path: the
kernel's error against the fp32 reference may be at most twice that path's error. On a machine without
CUDA the kernels run in the Triton interpreter (tests/conftest.py).
"""
import dataclasses
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.head import (softcap_cross_entropy_backward, softcap_cross_entropy_forward,
                          softcap_cross_entropy_reference, softcap_cross_entropy_triton)
from kernel_checks import (assert_same_losses, check_close, compile_recording_graphs, hold_on_torch,
                           train_tiny_losses)

from conftest import DEVICE
from kernels.selftest import BARS
SOFTCAP = 30.0             # LOGIT_SOFTCAP
# the family's bars, defined once in kernels/selftest.py (the start-up self-test holds kernels to them too)
FP32_REL_RMS, FP32_MAX_REL, ABS_FLOOR, BF16_FACTOR = dataclasses.astuple(BARS["head"])
NAMES = ("loss", "dh", "dweight")




def _inputs(n, d, vocab, seed, weight_std=None):
    """h at the scale RMSNorm gives (rms 1); E ~ N(0, std) with std 1/sqrt(d) by default, so z is O(1)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * (weight_std if weight_std is not None else d ** -0.5)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def _run(fn, h, weight, targets, dtype, upstream=1.0):
    """(loss, dh, dweight) of one op with h and weight cast to dtype; the loss is scaled by `upstream`."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (h, weight)]
    loss = fn(leaves[0], leaves[1], targets, SOFTCAP)
    (loss * upstream).backward()
    return [loss.detach()] + [t.grad for t in leaves]


# _check(name, got, ref, torch_bf16=None): this file's bars (fp32 fixed; bf16 at most BF16_FACTOR x PyTorch bf16's)
_check = functools.partial(check_close, fp32_rel_rms=FP32_REL_RMS, fp32_max_rel=FP32_MAX_REL, abs_floor=ABS_FLOOR,
                           bf16_factor=BF16_FACTOR)


def _compare_to_reference(n, d, vocab, dtype, seed=0, weight_std=None, upstream=1.0):
    h, weight, targets = _inputs(n, d, vocab, seed, weight_std)
    rounded = [t.to(dtype).float() for t in (h, weight)]  # the reference sees the kernel's (rounded) inputs
    ref = _run(softcap_cross_entropy_reference, *rounded, targets, torch.float32, upstream)
    out = _run(softcap_cross_entropy_triton, h, weight, targets, dtype, upstream)
    baseline = (_run(softcap_cross_entropy_reference, *rounded, targets, torch.bfloat16, upstream)
                if dtype == torch.bfloat16 else [None] * 3)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0, (out[0].dtype, out[0].shape)
    assert out[1].dtype == dtype and out[2].dtype == dtype, (out[1].dtype, out[2].dtype)
    for name, got, want, base in zip(NAMES, out, ref, baseline):
        _check(name, got, want, base)


# ---------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------
def test_reference_gradcheck_fp64():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (3 * torch.randn(9, 6, generator=gen, dtype=torch.float64)).requires_grad_()  # reaches the softcap
    targets = torch.randint(0, 9, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda a, b: softcap_cross_entropy_reference(a, b, targets, 4.0), (h, weight))


def test_reference_is_the_spec_formula():
    # SPEC 3: logits = c·tanh(h·Eᵀ / c); loss = mean_i (log Σ_v exp(logits_iv) − logits_i,y_i), in fp64 here.
    h, weight, targets = [t.cpu() for t in _inputs(11, 8, 13, seed=4, weight_std=5.0)]
    h, weight = h.double(), weight.double()
    logits = SOFTCAP * torch.tanh(h @ weight.t() / SOFTCAP)
    want = (logits.exp().sum(1).log() - logits[torch.arange(11), targets]).mean()
    got = softcap_cross_entropy_reference(h, weight, targets, SOFTCAP)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The kernel against the reference
# ---------------------------------------------------------------------------------------------------
# Pairwise cover of N x vocab x dtype; d = 48 and V = 200 are not multiples of any block (partial tiles
# in V and d), V = 256 / d = 64 are (the unmasked path); N = 1 and 37 leave partial row blocks.
PAIRWISE = [
    (1, 48, 200, torch.float32),
    (1, 64, 256, torch.bfloat16),
    (37, 48, 200, torch.bfloat16),
    (37, 64, 256, torch.float32),
    (130, 48, 256, torch.bfloat16),
    (130, 64, 200, torch.float32),
]


@pytest.mark.parametrize("n, d, vocab, dtype", PAIRWISE, ids=[f"N{c[0]}-d{c[1]}-V{c[2]}-{str(c[3])[6:]}"
                                                             for c in PAIRWISE])
def test_matches_reference(n, d, vocab, dtype):
    _compare_to_reference(n, d, vocab, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_width_and_vocab(dtype):
    """d = 512 and V = 1024 as in training: many V tiles folded into the online log-sum-exp, many d steps."""
    _compare_to_reference(100, 512, 1024, dtype, seed=15)


# R1's vocabulary, V = 8192, runs the large-vocabulary tables (V >= LARGE_VOCAB): a pairwise cover of
# N x d x V x dtype in five cases. V = 8100 = 31·256 + 164 leaves a partial last V tile (the interpreter's
# large-vocabulary tile is 256 wide); N = 130 spans three row blocks, the last partial; d = 48 a partial d tile.
LARGE_VOCAB_CASES = [
    (37, 48, 8100, torch.float32),
    (37, 64, 8192, torch.bfloat16),
    (130, 48, 8192, torch.bfloat16),
    (130, 64, 8100, torch.bfloat16),
    (130, 64, 8192, torch.float32),
]


@pytest.mark.parametrize("n, d, vocab, dtype", LARGE_VOCAB_CASES,
                         ids=[f"N{c[0]}-d{c[1]}-V{c[2]}-{str(c[3])[6:]}" for c in LARGE_VOCAB_CASES])
def test_large_vocab_matches_reference(n, d, vocab, dtype):
    _compare_to_reference(n, d, vocab, dtype, seed=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_width_at_r1_vocab(dtype):
    """d = 512 and V = 8192 as R1 trains: 32 V tiles of 256 in each row's online log-sum-exp, 8 d steps each."""
    _compare_to_reference(37, 512, 8192, dtype, seed=17)


def test_vocab_size_picks_the_tile_tables(monkeypatch):
    """V = 1024 launches the tables tuned for it and R1's V = 8192 the large-vocabulary ones (the class switches
    at LARGE_VOCAB); every GPU table offers one to three tiles per launch, the interpreter one."""
    from kernels import head

    assert [head._vocab_class(v) for v in (1024, head.LARGE_VOCAB - 1, head.LARGE_VOCAB, 8192)] == [
        "small", "small", "large", "large"]
    for table in head._GPU_CONFIGS.values():
        assert all(1 <= len(table[launch]) <= 3 for launch in head._KERNELS), table
    assert all(len(configs) == 1 for configs in head._INTERPRETER_CONFIGS.values())

    launched = []

    class Recorder:  # stands in for an autotuned kernel: notes which table's launch ran, then runs it
        def __init__(self, key):
            self.key, self.kernel = key, head._LAUNCH[key]

        def __getitem__(self, grid):
            launched.append(self.key)
            return self.kernel[grid]

    for key in list(head._LAUNCH):
        monkeypatch.setitem(head._LAUNCH, key, Recorder(key))
    for vocab in (1024, 8192):
        h, weight, targets = _inputs(5, 16, vocab, seed=18)
        loss, lse = softcap_cross_entropy_forward(h, weight, targets, SOFTCAP)
        softcap_cross_entropy_backward(torch.ones((), device=DEVICE), h, weight, targets, lse, SOFTCAP)
    assert launched == [("forward", torch.float32, "small"), ("dz", torch.float32, "small"),
                        ("forward", torch.float32, "large"), ("dz", torch.float32, "large")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturated_softcap_and_upstream_scale(dtype):
    """Logits pushed deep into the tanh (|z| up to ~100 against c = 30) and an upstream gradient of 0.37:
    the 1 − tanh² factor and the scaling of dz must both be right."""
    _compare_to_reference(37, 48, 200, dtype, seed=5, weight_std=4.0, upstream=0.37)


def test_lse_is_the_row_logsumexp():
    """What the forward keeps for backward is exactly logsumexp of each row's softcapped logits."""
    h, weight, targets = _inputs(37, 48, 200, seed=6)
    loss, lse = softcap_cross_entropy_forward(h, weight, targets, SOFTCAP)
    logits = SOFTCAP * torch.tanh(h @ weight.t() / SOFTCAP)
    assert lse.shape == (37,) and lse.dtype == torch.float32
    _check("lse", lse, torch.logsumexp(logits, 1))
    _check("loss", loss, F.cross_entropy(logits, targets))


def test_chunked_backward_matches_one_chunk():
    """dz formed 16 rows at a time (the last chunk partial), dweight summed over chunks in fp32, equals one chunk."""
    h, weight, targets = _inputs(70, 48, 200, seed=7)
    _, lse = softcap_cross_entropy_forward(h, weight, targets, SOFTCAP)
    grad = torch.tensor(1.0, device=DEVICE)
    one = softcap_cross_entropy_backward(grad, h, weight, targets, lse, SOFTCAP, chunk_rows=1 << 20)
    chunked = softcap_cross_entropy_backward(grad, h, weight, targets, lse, SOFTCAP, chunk_rows=16)
    ref = _run(softcap_cross_entropy_reference, h, weight, targets, torch.float32)
    for name, a, b, want in zip(NAMES[1:], one, chunked, ref[1:]):
        _check(name, b, want)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}, 16-row chunks vs one: {m}")


def test_strided_inputs_and_leading_dims():
    """h as a [B, T, d] view with a row stride wider than d, and a column-major weight."""
    h, weight, targets = _inputs(2 * 19, 48, 200, seed=8)
    padded = torch.zeros(2 * 19, 64, device=DEVICE)
    padded[:, :48] = h
    h_view = padded[:, :48].view(2, 19, 48)
    w_view = weight.t().contiguous().t()
    assert h_view.stride(1) == 64 and w_view.stride(0) == 1
    leaves = [t.detach().requires_grad_() for t in (h_view, w_view)]
    loss = softcap_cross_entropy_triton(leaves[0], leaves[1], targets.view(2, 19), SOFTCAP)
    loss.backward()
    ref = _run(softcap_cross_entropy_reference, h, weight, targets, torch.float32)
    _check("loss", loss.detach(), ref[0])
    _check("dh", leaves[0].grad.reshape(-1, 48), ref[1])
    _check("dweight", leaves[1].grad, ref[2])


def _bad(**changes):
    h, weight, targets = _inputs(4, 16, 24, seed=9)
    args = dict(h=h, weight=weight, targets=targets, softcap=SOFTCAP)
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(softcap=0.0), "softcap=0.0 must be a finite number > 0"),
    (dict(softcap=float("inf")), "softcap=inf"),
    (dict(h=lambda a: a["h"][:, :15]), "h must be [N, d] = [N, 16] to match weight (24, 16), got (4, 15)"),
    (dict(weight=lambda a: a["weight"][0]), "weight must be a non-empty 2-D [V, d] embedding, got (16,)"),
    (dict(targets=lambda a: a["targets"][:3]), "targets (3,) must have h's leading shape (4,)"),
    (dict(targets=lambda a: a["targets"].int()), "targets must be int64 token ids, got torch.int32"),
    (dict(weight=lambda a: a["weight"].half()), "must share one dtype"),
    (dict(h=lambda a: a["h"].double(), weight=lambda a: a["weight"].double()), "one dtype out of bfloat16/float32"),
    (dict(h=lambda a: a["h"][:0], targets=lambda a: a["targets"][:0]), "has no rows"),
])
def test_bad_inputs_are_named(changes, message):
    with pytest.raises(ValueError) as err:
        softcap_cross_entropy_triton(**_bad(**changes))
    assert message in str(err.value)


@pytest.mark.skipif(DEVICE != "cpu", reason="the host check runs for CPU targets; on CUDA the kernel gives NaN")
@pytest.mark.parametrize("bad_value", [-1, 24])
def test_targets_out_of_range_are_rejected_on_the_cpu(bad_value):
    args = _bad()
    args["targets"][2] = bad_value
    with pytest.raises(ValueError) as err:
        softcap_cross_entropy_triton(**args)
    assert "targets must lie in [0, V) = [0, 24)" in str(err.value) and "first bad rows [2]" in str(err.value)


def test_kernel_poisons_rows_with_out_of_range_targets():
    """The device-side guard (what CUDA relies on): such a row's loss, lse and gradients are NaN, the others
    are not. The kernel is called directly here, past the CPU host check."""
    from kernels.head import _DOT_PRECISION, _LAUNCH, _softcap_scales

    h, weight, targets = _inputs(5, 16, 24, seed=10)
    targets[1], targets[3] = 24, -2
    lse = torch.empty(5, device=DEVICE)
    row_loss = torch.empty(5, device=DEVICE)
    _LAUNCH["forward", torch.float32, "small"][lambda meta: (1,)](
        h, weight, targets, row_loss, lse, 5, 24, 16, h.stride(0), weight.stride(0), *_softcap_scales(SOFTCAP),
        DOT_PRECISION=_DOT_PRECISION[torch.float32])
    bad = torch.tensor([False, True, False, True, False], device=DEVICE)
    assert torch.isnan(row_loss[bad]).all() and torch.isnan(lse[bad]).all(), (row_loss, lse)
    assert torch.isfinite(row_loss[~bad]).all() and torch.isfinite(lse[~bad]).all(), (row_loss, lse)
    logits = SOFTCAP * torch.tanh(h[~bad] @ weight.t() / SOFTCAP)
    _check("lse", lse[~bad], torch.logsumexp(logits, 1))


# ---------------------------------------------------------------------------------------------------
# The op: dispatch, custom op registration, torch.compile, autocast
# ---------------------------------------------------------------------------------------------------
def test_dispatch_follows_the_backend(monkeypatch):
    module = importlib.import_module("kernels.head")
    monkeypatch.setattr(module, "softcap_cross_entropy_triton", lambda *a: "triton")
    monkeypatch.setattr(module, "softcap_cross_entropy_reference", lambda *a: "torch")
    h, weight, targets = _inputs(3, 16, 24, seed=11)
    try:
        kernels.set_backend("triton")
        calls = [kernels.softcap_cross_entropy(h, weight, targets, SOFTCAP)]
        kernels.set_backend("torch")
        calls.append(kernels.softcap_cross_entropy(h, weight, targets, SOFTCAP))
    finally:
        kernels.set_backend(None)
    assert calls == ["triton", "torch"]


def test_custom_op_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (torch.library.opcheck)."""
    h, weight, targets = _inputs(5, 16, 24, seed=12)
    torch.library.opcheck(torch.ops.ouroboros.softcap_cross_entropy.default,
                          (h.clone().requires_grad_(), weight.clone().requires_grad_(), targets, SOFTCAP))
    _, lse = torch.ops.ouroboros.softcap_cross_entropy(h, weight, targets, SOFTCAP)
    grad = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.ouroboros.softcap_cross_entropy_backward.default,
                          (grad, h, weight, targets, lse, SOFTCAP))


def test_torch_compile_fullgraph_traces_the_ops():
    """fullgraph=True (no graph break), the custom ops as single nodes in the forward and backward graphs.

    Backend: AOTAutograd with recording compilers and no inductor (aot_eager-style), to keep the CPU
    test quick; on CUDA the trainer compiles the same graphs with inductor.
    """
    def head(x, weight, targets):
        return kernels.softcap_cross_entropy(F.rms_norm(x, (x.shape[-1],)), weight, targets, SOFTCAP)

    h, weight, targets = _inputs(2 * 19, 48, 200, seed=13)
    h, targets = h.view(2, 19, 48), targets.view(2, 19)
    torch._dynamo.reset()
    try:
        kernels.set_backend("triton")
        compiled, graphs = compile_recording_graphs(head)
        leaves = [t.clone().requires_grad_() for t in (h, weight)]
        loss = compiled(*leaves, targets)
        loss.backward()
        eager = [t.clone().requires_grad_() for t in (h, weight)]
        kernels.set_backend("torch")
        eager_loss = head(*eager, targets)
        eager_loss.backward()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    assert "ouroboros.softcap_cross_entropy.default" in graphs["forward"], graphs["forward"]
    assert "ouroboros.softcap_cross_entropy_backward.default" in graphs["backward"], graphs["backward"]
    _check("loss", loss.detach(), eager_loss.detach())
    for name, a, b in zip(NAMES[1:], leaves, eager):
        _check(name, a.grad, b.grad)


@pytest.mark.parametrize("entry", ["dispatch", "op"])
def test_autocast_casts_the_fp32_weight(entry):
    """Under autocast (as the model runs on CUDA) the fp32 master embedding meets the kernel as bf16, cast
    by the entry's input policy whether it is reached through kernels.softcap_cross_entropy or called
    directly; the loss stays fp32 and the gradients come back fp32, within 2x of the reference under the
    same autocast."""
    h, weight, targets = _inputs(37, 48, 200, seed=14)
    fn = kernels.softcap_cross_entropy if entry == "dispatch" else softcap_cross_entropy_triton
    ref = _run(softcap_cross_entropy_reference, h, weight, targets, torch.float32)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*args)
        return run

    try:
        kernels.set_backend("triton")
        out = _run(under_autocast(fn), h, weight, targets, torch.float32)
    finally:
        kernels.set_backend(None)
    base = _run(under_autocast(softcap_cross_entropy_reference), h, weight, targets, torch.float32)
    assert out[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in out[1:])
    for name, got, want, b in zip(NAMES, out, ref, base):
        _check(name, got, want, b)


# ---------------------------------------------------------------------------------------------------
# Wiring: the tiny model trains to the same losses with the head kernel on and off
# ---------------------------------------------------------------------------------------------------
def test_tiny_model_same_losses_with_triton_head(monkeypatch):
    # Only the head switches: every other op is held on its PyTorch path in both runs (each kernel has its
    # own wiring test, and under the interpreter they would cost this test minutes).
    hold_on_torch(monkeypatch, "attention", "mlp", "mix_norm", "add_norm", "rms_norm")
    torch_losses = train_tiny_losses("torch")  # Muon + AdamW as the trainer runs them, default init
    triton_losses = train_tiny_losses("triton")
    assert_same_losses(triton_losses, torch_losses, rel_tol=1e-5)
