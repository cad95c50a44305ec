"""The fused residual + RMSNorm kernels (kernels/norm.py) against their fp32 PyTorch references.

Every case runs forward and backward and checks both outputs (the residual stream and h) and every
input gradient (dx, dx0, d(mix); dx, dbranch, d(gain); dx). Three precisions:
  fp32      everything fp32: fixed bars (summation order and FMA contraction are the only differences);
  bf16      everything bf16: at most twice the error of the same reference run by PyTorch in bf16;
  autocast  what the model runs on CUDA: fp32 stream and parameters, bf16 branch, under autocast, so h
            comes out bf16. fp32 results keep the fixed bars; a bf16 result may be at most twice the
            error of the fp32 reference rounded to bf16 (what the next matmul reads on the PyTorch path).
On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py).
"""
import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.norm import (add_norm_reference, add_norm_triton, mix_norm_reference, mix_norm_triton,
                          norm_backward, norm_forward, rms_norm_reference, rms_norm_triton, MODE_MIX)
from kernel_checks import (assert_same_losses, check_close, compile_recording_graphs, hold_on_torch,
                           train_tiny_losses)

from conftest import DEVICE
from kernels.selftest import BARS
# the family's bars, defined once in kernels/selftest.py (the start-up self-test holds kernels to them too)
FP32_REL_RMS, FP32_MAX_REL, ABS_FLOOR, BF16_FACTOR = dataclasses.astuple(BARS["norm"])


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more only fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# The three ops in one harness: inputs, names of the results and gradients
# ---------------------------------------------------------------------------------------------------
def _inputs(op, lead, d, seed):
    """Realistic scales: the residual stream, x0 and branch O(1); mix and gain near their inits (1, 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen)
    if op == "mix_norm":
        mix = torch.stack((1 + 0.2 * torch.randn(d, generator=gen), 0.5 * torch.randn(d, generator=gen)))
        tensors = [x, torch.randn(*lead, d, generator=gen), mix]
    elif op == "add_norm":
        tensors = [x, torch.randn(*lead, d, generator=gen), 1 + 0.2 * torch.randn(d, generator=gen)]
    else:
        tensors = [x]
    return [t.to(DEVICE) for t in tensors], 1.0 / math.sqrt(seed % 5 + 1)


OPS = {  # name -> (reference, kernel entry, names of outputs and input gradients)
    "mix_norm": (mix_norm_reference, mix_norm_triton, ("x_in", "h", "dx", "dx0", "dmix")),
    "add_norm": (add_norm_reference, add_norm_triton, ("x_new", "h", "dx", "dbranch", "dgain")),
    "rms_norm": (lambda x, s, eps=None: (rms_norm_reference(x, s, eps),), lambda x, s: (rms_norm_triton(x, s),),
                 ("h", "dx")),
}


def _run(fn, leaves, scale, upstream, autocast=False):
    """Outputs and input gradients of fn(*leaves, scale) with the given upstream gradients (cast to each
    output's dtype, as autograd would hand them over)."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        outs = fn(*leaves, scale)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check(name, got, ref, torch_bf16=None):
    """got vs the fp32 reference: fixed bars for fp32 results, 2x the PyTorch bf16 path's error for bf16 ones
    (torch_bf16 None for a bf16 result: the reference rounded to bf16 is that path)."""
    if got.dtype == torch.bfloat16 and torch_bf16 is None:
        torch_bf16 = ref.to(torch.bfloat16)
    check_close(name, got, ref, torch_bf16, fp32_rel_rms=FP32_REL_RMS, fp32_max_rel=FP32_MAX_REL, abs_floor=ABS_FLOOR,
                bf16_factor=BF16_FACTOR)


def _compare_to_reference(op, lead, d, precision, seed=0):
    reference, kernel, names = OPS[op]
    inputs, scale = _inputs(op, lead, d, seed)
    if precision == "bf16":
        leaves = [t.to(torch.bfloat16) for t in inputs]
    elif precision == "autocast" and op == "add_norm":
        leaves = [inputs[0], inputs[1].to(torch.bfloat16), inputs[2]]  # the branch is a bf16 matmul output
    else:
        leaves = inputs
    gen = torch.Generator().manual_seed(seed + 100)
    n_out = len(names) - len(leaves)
    upstream = [torch.randn(*lead, d, generator=gen).to(DEVICE) for _ in range(n_out)]
    out = _run(kernel, leaves, scale, upstream, autocast=precision == "autocast")
    # The reference sees exactly what the kernel saw: the same rounded inputs and upstream gradients.
    upstream = [g.to(o.dtype).float() for o, g in zip(out, upstream)]
    # bf16 inputs are normalized with bf16's eps (F.rms_norm's default for them), so the fp32 reference is too.
    eps = torch.finfo(leaves[0].dtype).eps
    ref = _run(lambda *a: reference(*a, eps=eps), [t.float() for t in leaves], scale, upstream)
    baseline = _run(reference, leaves, scale, upstream) if precision == "bf16" else [None] * len(names)
    expected = {"fp32": [torch.float32] * len(names), "bf16": [torch.bfloat16] * len(names),
                "autocast": [torch.float32] * (n_out - 1) + [torch.bfloat16] + [t.dtype for t in leaves]}[precision]
    assert [t.dtype for t in out] == expected, (names, [t.dtype for t in out])
    for name, got, want, base in zip(names, out, ref, baseline):
        _check(f"{op} {name}", got, want, base)


# ---------------------------------------------------------------------------------------------------
# The references themselves
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_reference_gradcheck_fp64(op):
    inputs, scale = _inputs(op, (3, 5), 6, seed=3)
    leaves = [t.double().cpu().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: OPS[op][0](*a, scale), leaves)


def test_references_are_the_spec_formulas():
    # SPEC 3: x_in = m0⊙x + m1⊙x0; h = x_in / sqrt(mean(x_in²) + eps) · s, eps = finfo(dtype).eps; the
    # attention residual x + a⊙branch normalized the same way.
    x, x0, mix = [t.double().cpu() for t in _inputs("mix_norm", (9,), 8, seed=4)[0]]
    s = 0.5
    eps = torch.finfo(torch.float64).eps
    norm = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    x_in = mix[0] * x + mix[1] * x0
    for got, want in zip(mix_norm_reference(x, x0, mix, s), (x_in, norm(x_in) * s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gain = mix[0]
    for got, want in zip(add_norm_reference(x, x0, gain, s), (x + gain * x0, norm(x + gain * x0) * s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms_norm_reference(x), norm(x), rtol=1e-12, atol=1e-12)


def test_torch_path_is_the_model_maths_bit_for_bit():
    """KERNELS=torch must not change the model's numbers: the references are the block's old expressions."""
    (x, x0, mix), s = _inputs("mix_norm", (4, 7), 32, seed=5)
    x_in, h = mix_norm_reference(x, x0, mix, s)
    assert torch.equal(x_in, mix[0] * x + mix[1] * x0)
    assert torch.equal(h, F.rms_norm(x_in, (32,)) * s)
    x_new, h2 = add_norm_reference(x_in, x0, mix[1], s)
    assert torch.equal(x_new, x_in + mix[1] * x0) and torch.equal(h2, F.rms_norm(x_new, (32,)) * s)
    assert torch.equal(rms_norm_reference(x), F.rms_norm(x, (32,)))


# ---------------------------------------------------------------------------------------------------
# The kernels against the references
# ---------------------------------------------------------------------------------------------------
# Pairwise cover of op x rows x d x precision (every pair of values appears in some row): d = 48 is no
# power of two (masked columns), 128 is; M = 1, 37 (one partial row block), 2 x 64, and 1000 rows,
# which makes every backward program loop over several row blocks.
PAIRWISE = [
    ("mix_norm", (1,), 48, "fp32"),
    ("mix_norm", (37,), 128, "bf16"),
    ("mix_norm", (2, 64), 48, "autocast"),
    ("mix_norm", (1000,), 128, "fp32"),
    ("add_norm", (1,), 128, "autocast"),
    ("add_norm", (37,), 48, "fp32"),
    ("add_norm", (2, 64), 128, "bf16"),
    ("add_norm", (1000,), 48, "autocast"),
    ("rms_norm", (1,), 48, "bf16"),
    ("rms_norm", (37,), 128, "autocast"),
    ("rms_norm", (2, 64), 128, "fp32"),
    ("rms_norm", (1000,), 48, "bf16"),
]


@pytest.mark.parametrize("op, lead, d, precision", PAIRWISE,
                         ids=[f"{c[0]}-M{math.prod(c[1])}-d{c[2]}-{c[3]}" for c in PAIRWISE])
def test_matches_reference(op, lead, d, precision):
    _compare_to_reference(op, lead, d, precision, seed=len(lead) + d)


def test_saved_rstd_and_partial_sums():
    """The forward keeps only rstd = 1/sqrt(mean(x_in²) + eps) per row (fp32); the backward's d(mix) is the
    same whether reduced by one program or by several grid-stride programs over 1000 rows."""
    (x, x0, mix), s = _inputs("mix_norm", (1000,), 48, seed=6)
    x_in, h, rstd = norm_forward(MODE_MIX, x, x0, mix, s, torch.float32)
    assert rstd.shape == (1000,) and rstd.dtype == torch.float32
    want = torch.rsqrt(x_in.double().pow(2).mean(-1) + torch.finfo(torch.float32).eps)
    _check("rstd", rstd, want.float())
    dx_in, dh = torch.randn_like(x), torch.randn_like(x)
    _, _, dmix = norm_backward(MODE_MIX, dx_in, dh, x, x0, mix, rstd, s)
    leaves = [t.clone().requires_grad_() for t in (x, x0, mix)]
    torch.autograd.backward(mix_norm_reference(*leaves, s), (dx_in, dh))
    _check("dmix", dmix, leaves[2].grad)
    # Four launches over 250 rows each, summed: a different split into programs, the same parameter gradient.
    pieces = [norm_backward(MODE_MIX, dx_in[i:i + 250], dh[i:i + 250], x[i:i + 250], x0[i:i + 250], mix,
                            rstd[i:i + 250], s)[2] for i in range(0, 1000, 250)]
    _check("dmix over 4 launches", sum(pieces), dmix)


def test_zero_rows():
    (x, b, gain), s = _inputs("add_norm", (0,), 48, seed=7)
    leaves = [t.requires_grad_() for t in (x, b, gain)]
    x_new, h = add_norm_triton(*leaves, s)
    assert x_new.shape == h.shape == (0, 48)
    (x_new.sum() + h.sum()).backward()
    assert leaves[0].grad.shape == (0, 48) and torch.count_nonzero(leaves[2].grad) == 0


def _bad(op, **changes):
    inputs, s = _inputs(op, (4,), 16, seed=8)
    names = {"mix_norm": ("x", "x0", "mix"), "add_norm": ("x", "branch", "gain"), "rms_norm": ("x",)}[op]
    args = dict(zip(names, inputs), scale=s)
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    return args


@pytest.mark.parametrize("op, changes, message", [
    ("mix_norm", dict(x0=lambda a: a["x0"][:, :15]), "mix_norm: x0 (4, 15) must have x's shape (4, 16)"),
    ("mix_norm", dict(mix=lambda a: a["mix"][0]), "mix_norm: mix (16,) must be (2, 16)"),
    ("mix_norm", dict(x0=lambda a: a["x0"].to(torch.bfloat16)), "x0 is torch.bfloat16, x is torch.float32"),
    ("add_norm", dict(gain=lambda a: a["gain"][:8]), "add_norm: gain (8,) must be (16,)"),
    ("add_norm", dict(branch=lambda a: a["branch"].half()), "branch is torch.float16"),
    ("add_norm", dict(gain=lambda a: a["gain"].to(torch.bfloat16)), "gain is torch.bfloat16 but x is torch.float32"),
    ("rms_norm", dict(x=lambda a: a["x"].double()), "rms_norm: x is torch.float64"),
    ("rms_norm", dict(x=lambda a: a["x"].new_zeros(2, 8192)), "d=8192 > 4096"),
])
def test_bad_inputs_are_named(op, changes, message):
    args = _bad(op, **changes)
    with pytest.raises(ValueError) as err:
        OPS[op][1](*args.values())
    assert message in str(err.value)


def test_entries_name_bad_shapes_of_any_rank():
    """The entries take [..., d] and validate once (the launchers below them trust what they pass): a
    scalar is named at the entry, whatever op it reaches."""
    (x, x0, mix), s = _inputs("mix_norm", (2, 4), 16, seed=12)
    with pytest.raises(ValueError, match=r"mix_norm: x must be \[\.\.\., d\] with d >= 1, got shape \(\)"):
        mix_norm_triton(x[0, 0, 0], x0[0, 0, 0], mix, s)
    with pytest.raises(ValueError, match=r"rms_norm: x must be \[\.\.\., d\] with d >= 1, got shape \(4, 0\)"):
        rms_norm_triton(x[0, :, :0], s)


# ---------------------------------------------------------------------------------------------------
# The ops: dispatch, custom op registration, torch.compile
# ---------------------------------------------------------------------------------------------------
def test_dispatch_follows_the_backend(monkeypatch):
    module = importlib.import_module("kernels.norm")
    for op in OPS:
        monkeypatch.setattr(module, f"{op}_triton", lambda *a, op=op: f"{op} triton")
        monkeypatch.setattr(module, f"{op}_reference", lambda *a, op=op: f"{op} torch")
    calls = []
    try:
        for backend in ("triton", "torch"):
            kernels.set_backend(backend)
            for op in OPS:
                inputs, s = _inputs(op, (3,), 16, seed=9)
                calls.append(getattr(kernels, op)(*inputs, s))
    finally:
        kernels.set_backend(None)
    assert calls == [f"{op} {backend}" for backend in ("triton", "torch") for op in OPS]


def test_custom_op_opcheck():
    """Schema, fakes, autograd registration and AOT dispatch of all six custom ops (torch.library.opcheck)."""
    ops = torch.ops.ouroboros
    (x, x0, mix), s = _inputs("mix_norm", (5,), 16, seed=10)
    (_, branch, gain), _ = _inputs("add_norm", (5,), 16, seed=10)
    dh = torch.randn_like(x)
    torch.library.opcheck(ops.mix_norm.default, (x.requires_grad_(), x0.requires_grad_(), mix.requires_grad_(), s,
                                                 torch.float32))
    torch.library.opcheck(ops.add_norm.default, (x, branch.requires_grad_(), gain.requires_grad_(), s, torch.float32))
    torch.library.opcheck(ops.rms_norm.default, (x, s, torch.float32))
    x, x0, mix, branch, gain = (t.detach() for t in (x, x0, mix, branch, gain))
    _, _, rstd = ops.mix_norm(x, x0, mix, s, torch.float32)
    torch.library.opcheck(ops.mix_norm_backward.default, (dh, dh, x, x0, mix, rstd, s))
    x_new, _, rstd = ops.add_norm(x, branch, gain, s, torch.float32)
    torch.library.opcheck(ops.add_norm_backward.default, (dh, dh, x_new, branch, gain, rstd, s))
    _, rstd = ops.rms_norm(x, s, torch.float32)
    torch.library.opcheck(ops.rms_norm_backward.default, (dh, x, rstd, s))


def test_torch_compile_fullgraph_traces_the_ops():
    """A block's norm chain under torch.compile(fullgraph=True): no graph break, each op one node in the
    forward and backward graphs, the same loss and gradients as eager.

    Backend: AOTAutograd with recording compilers and no inductor (aot_eager-style), to keep it quick on
    CPU; on CUDA the trainer compiles the same graphs with inductor.
    """
    def chain(x, x0, mix, gain):
        x, h = kernels.mix_norm(x, x0, mix, 0.5)
        x, h = kernels.add_norm(x, torch.tanh(h), gain, 0.5)
        return (kernels.rms_norm(x + h) * x0).square().mean()

    (x, x0, mix), _ = _inputs("mix_norm", (2, 19), 48, seed=11)
    gain = _inputs("add_norm", (1,), 48, seed=11)[0][2]
    torch._dynamo.reset()
    try:
        kernels.set_backend("triton")
        compiled, graphs = compile_recording_graphs(chain)
        leaves = [t.clone().requires_grad_() for t in (x, x0, mix, gain)]
        loss = compiled(*leaves)
        loss.backward()
        eager = [t.clone().requires_grad_() for t in (x, x0, mix, gain)]
        eager_loss = chain(*eager)
        eager_loss.backward()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    for op in OPS:
        assert f"ouroboros.{op}.default" in graphs["forward"], graphs["forward"]
        assert f"ouroboros.{op}_backward.default" in graphs["backward"], graphs["backward"]
    _check("loss", loss.detach(), eager_loss.detach())
    for name, a, b in zip(("dx", "dx0", "dmix", "dgain"), leaves, eager):
        _check(name, a.grad, b.grad)


# ---------------------------------------------------------------------------------------------------
# Wiring: the tiny model trains to the same losses with the norm kernels on and off
# ---------------------------------------------------------------------------------------------------
def _spread_off_inits(net):
    """Move the mix, scales and branches off their inits so every gradient is non-trivial (one pass over
    the parameters, both draws from the global RNG in parameter order)."""
    for name, p in net.named_parameters():
        if name.endswith(("mlp.proj.weight", "attn.proj.weight")):
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        elif name.endswith(("resid_mix", "attn_scale", "mlp_scale")):
            p.add_(0.1 * torch.randn_like(p))


def test_tiny_model_same_losses_with_triton_norms(monkeypatch):
    # Only the norms switch: attention, the MLP and the head's loss stay on their PyTorch paths in both
    # runs (they have their own wiring tests, and interpreted they would cost this test minutes).
    hold_on_torch(monkeypatch, "attention", "mlp", "softcap_cross_entropy")
    # Muon + AdamW as the trainer runs them.
    torch_losses = train_tiny_losses("torch", init=_spread_off_inits)
    triton_losses = train_tiny_losses("triton", init=_spread_off_inits)
    assert_same_losses(triton_losses, torch_losses, rel_tol=1e-5)
