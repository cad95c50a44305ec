"""The causal GQA flash-attention kernel with q_gain, XSA, the output gate and segments against its fp32
PyTorch reference.

Every case runs forward and backward and checks y, dq, dk, dv, d(q_gain) and, with a gate, d(gate). fp32
is held to fixed bars; bf16 to the PyTorch bf16 path (SDPA plus eager q_gain, XSA and gate, with a dense
mask for segments): the kernel's error against the fp32 reference may be at most twice that path's
error. On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py), with
the same tile sizes the GPU launches.
"""
import dataclasses
import functools

import pytest
import torch

import kernels
from kernels.attention import (SUPPORTED_HEAD_DIMS, _launch_table, attention_reference, attention_sdpa,
                               attention_triton, segment_bounds, sm90_configs)
from kernel_checks import check_close, tiny_config, train_tiny_losses

from conftest import DEVICE
from kernels.selftest import BARS
# the family's bars, defined once in kernels/selftest.py (the start-up self-test holds kernels to them too)
FP32_REL_RMS, FP32_MAX_REL, ABS_FLOOR, BF16_FACTOR = dataclasses.astuple(BARS["attention"])


def _inputs(B, T, Hq, Hkv, D, seed, zero_value_token=None):
    """Activations O(1) like QK-normed q, k; q_gain spread over [1, 5] (both ends included)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen)
    k = torch.randn(B, T, Hkv, D, generator=gen)
    v = torch.randn(B, T, Hkv, D, generator=gen)
    q_gain = torch.linspace(1.0, 5.0, Hq)[torch.randperm(Hq, generator=gen)]
    dy = torch.randn(B, T, Hq, D, generator=gen)
    if zero_value_token is not None:  # ||v_t|| = 0: XSA's normalization clamps at eps
        v[:, zero_value_token] = 0.0
    return [t.to(DEVICE) for t in (q, k, v, q_gain, dy)]


def _gate(B, T, Hq, seed):
    """Sigmoid values as the model's gate makes them, spread over (0, 1)."""
    return torch.sigmoid(2 * torch.randn(B, T, Hq, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def _cu(offsets):
    return torch.tensor(offsets, dtype=torch.int32, device=DEVICE)


def _run(fn, q, k, v, q_gain, dy, xsa, dtype, gate=None, cu_seqlens=None):
    """y and the gradients of (q, k, v, q_gain[, gate]) for one op, q/k/v/gate/dy cast to dtype, q_gain kept fp32."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)] + [q_gain.detach().clone().requires_grad_()]
    options = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    if gate is not None:
        leaves.append(gate.to(dtype).detach().requires_grad_())
        options["gate"] = leaves[-1]
    y = fn(*leaves[:4], xsa, **options)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# _check(name, got, ref, torch_bf16=None): this file's bars (fp32 fixed; bf16 at most BF16_FACTOR x PyTorch bf16's)
_check = functools.partial(check_close, fp32_rel_rms=FP32_REL_RMS, fp32_max_rel=FP32_MAX_REL, abs_floor=ABS_FLOOR,
                           bf16_factor=BF16_FACTOR)


def _compare_to_reference(B, T, Hq, Hkv, D, xsa, dtype, seed=0, zero_value_token=None, gate=False, cu_seqlens=None):
    q, k, v, q_gain, dy = _inputs(B, T, Hq, Hkv, D, seed, zero_value_token)
    options = dict(gate=_gate(B, T, Hq, seed) if gate else None, cu_seqlens=cu_seqlens)
    ref = _run(attention_reference, q, k, v, q_gain, dy, xsa, torch.float32, **options)
    out = _run(attention_triton, q, k, v, q_gain, dy, xsa, dtype, **options)
    baseline = (_run(attention_sdpa, q, k, v, q_gain, dy, xsa, dtype, **options) if dtype == torch.bfloat16
                else [None] * len(out))
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[4].dtype == q_gain.dtype
    names = ("y", "dq", "dk", "dv", "d_q_gain") + (("d_gate",) if gate else ())
    assert len(out) == len(names) and (not gate or out[5].dtype == dtype)
    for name, got, want, base in zip(names, out, ref, baseline):
        _check(name, got, want, base)


# Pairwise cover of T x B x Hkv x XSA x dtype (every pair of values appears in some row), Hq = 8, D = 64.
PAIRWISE = [
    # T,  B, Hkv, xsa,  dtype
    (1,   1, 4,   True,  torch.float32),
    (1,   3, 8,   False, torch.bfloat16),
    (63,  1, 8,   True,  torch.bfloat16),
    (63,  3, 4,   False, torch.float32),
    (200, 1, 4,   False, torch.bfloat16),
    (200, 3, 8,   True,  torch.float32),
]


@pytest.mark.parametrize("T,B,Hkv,xsa,dtype", PAIRWISE,
                         ids=[f"T{t}-B{b}-Hkv{h}-{'xsa' if x else 'noxsa'}-{str(d)[6:]}" for t, b, h, x, d in PAIRWISE])
def test_matches_reference(T, B, Hkv, xsa, dtype):
    _compare_to_reference(B, T, 8, Hkv, 64, xsa, dtype, seed=T + B + Hkv)


def test_long_sequence():
    # One long T: many key blocks per query block (both loop phases, ragged last tile); few heads keep it quick.
    _compare_to_reference(1, 1000, 2, 1, 64, True, torch.bfloat16, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_128(dtype):
    _compare_to_reference(1, 150, 4, 2, 128, True, dtype, seed=11)


def test_xsa_zero_value_vector():
    # A token whose value is exactly zero: v̂ = 0 through the eps clamp, no NaN, gradients still match.
    _compare_to_reference(2, 70, 4, 2, 64, True, torch.float32, seed=3, zero_value_token=5)


def test_non_contiguous_inputs():
    # q, k, v as views into one fused projection output (strided along heads), as a model might pass them.
    B, T, Hq, Hkv, D = 2, 33, 4, 2, 64
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, generator=gen).to(DEVICE)
    q_gain = torch.linspace(1.0, 5.0, Hq).to(DEVICE)
    dy = torch.randn(B, T, Hq, D, generator=gen).to(DEVICE)

    def run(fn):
        leaf = qkv.clone().requires_grad_()
        q, k, v = leaf.split([Hq, Hkv, Hkv], dim=2)
        assert not q.is_contiguous()
        y = fn(q, k, v, q_gain, True)
        y.backward(dy)
        return y.detach(), leaf.grad

    (y, grad), (y_ref, grad_ref) = run(attention_triton), run(attention_reference)
    _check("y", y, y_ref)
    _check("d_qkv", grad, grad_ref)


def test_autocast_runs_the_bf16_kernel():
    # Like SDPA, the op follows autocast: fp32 inputs inside autocast run the bf16 kernel.
    q, k, v, q_gain, _ = _inputs(1, 20, 2, 1, 64, seed=9)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = attention_triton(q, k, v, q_gain, True)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_gain, True))


# Segment layouts (cu_seqlens) against the interpreter's tiles (forward and dq: 128 query rows over 64
# and 32 keys; dk/dv: 64 keys over 32 query rows):
# "short" (T = 200, not a multiple of any tile): boundaries inside a block (37, 38), a segment of one
# token, boundaries exactly at a 64-key block (64) and a 128-row block (128), an empty segment in the
# middle and R1's padding (copies of T) at the end.
# "long" (T = 300): one segment over several query and key blocks, so every kernel runs all three
# phases (segment-masked, unmasked, diagonal), and a query block that holds two segments.
SEGMENTS = {"short": [0, 37, 38, 64, 128, 128, 200, 200, 200], "long": [0, 5, 260, 300]}

# Pairwise cover of segments x GQA ratio x XSA x gate x dtype, Hq = 4, D = 64 (without segments and
# gate the cases above), checked with a covering script when written.
VARLEN = [
    # segments, Hkv, xsa,  gate,  dtype
    (None,    4,   True,  True,  torch.float32),
    (None,    2,   False, True,  torch.bfloat16),
    ("short", 4,   False, False, torch.bfloat16),
    ("short", 2,   True,  True,  torch.float32),
    ("short", 4,   True,  True,  torch.bfloat16),
    ("short", 2,   False, False, torch.float32),
    ("long",  4,   True,  False, torch.float32),
    ("long",  2,   False, True,  torch.bfloat16),
    ("long",  2,   True,  False, torch.bfloat16),
    ("long",  4,   False, True,  torch.float32),
]


@pytest.mark.parametrize("segments,Hkv,xsa,gate,dtype", VARLEN,
                         ids=[f"{s or 'nosegments'}-Hkv{h}-{'xsa' if x else 'noxsa'}-{'gate' if g else 'nogate'}-"
                              f"{str(d)[6:]}" for s, h, x, g, d in VARLEN])
def test_gate_and_segments_match_reference(segments, Hkv, xsa, gate, dtype):
    if segments is None:  # the gate alone, on a batch of rows
        _compare_to_reference(2, 70, 4, Hkv, 64, xsa, dtype, seed=Hkv + xsa, gate=gate)
    else:
        offsets = SEGMENTS[segments]
        _compare_to_reference(1, offsets[-1], 4, Hkv, 64, xsa, dtype, seed=Hkv + xsa, gate=gate,
                              cu_seqlens=_cu(offsets))


def test_segments_block_every_gradient_across_a_boundary():
    # A loss on one segment's outputs reaches exactly nothing in the other segments: masked
    # probabilities are exact zeros, so their gradients are too.
    offsets = SEGMENTS["long"]
    q, k, v, q_gain, dy = _inputs(1, offsets[-1], 2, 1, 64, seed=12)
    dy[:, :offsets[1]] = 0.0
    dy[:, offsets[2]:] = 0.0
    _, dq, dk, dv, _, _ = _run(attention_triton, q, k, v, q_gain, dy, True, torch.float32, gate=_gate(1, 300, 2, 12),
                               cu_seqlens=_cu(offsets))
    outside = torch.ones(offsets[-1], dtype=torch.bool, device=DEVICE)
    outside[offsets[1]:offsets[2]] = False
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert grad[:, outside].abs().max().item() == 0.0, f"{name} leaks across a segment boundary"
        assert grad[:, ~outside].abs().max().item() > 0.0, f"{name} is zero inside the segment"


@pytest.mark.parametrize("offsets", [[0, 150], [0, 150, 150, 150]], ids=["one-segment", "padded"])
def test_one_segment_is_plain_causal_attention(offsets):
    q, k, v, q_gain, dy = _inputs(1, 150, 2, 1, 64, seed=13)
    gate = _gate(1, 150, 2, 13)
    plain = _run(attention_triton, q, k, v, q_gain, dy, True, torch.float32, gate=gate)
    varlen = _run(attention_triton, q, k, v, q_gain, dy, True, torch.float32, gate=gate, cu_seqlens=_cu(offsets))
    for name, got, want in zip(("y", "dq", "dk", "dv", "d_q_gain", "d_gate"), varlen, plain):
        _check(name, got, want)


def test_reference_segments_equal_separate_runs():
    # The independent definition of document isolation: each segment run on its own, then concatenated.
    offsets = SEGMENTS["short"]
    q, k, v, q_gain, _ = _inputs(1, offsets[-1], 4, 2, 16, seed=14)
    gate = _gate(1, offsets[-1], 4, 14)
    joined = attention_reference(q, k, v, q_gain, True, gate=gate, cu_seqlens=_cu(offsets))
    pieces = [attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], q_gain, True, gate=gate[:, a:b])
              for a, b in zip(offsets[:-1], offsets[1:]) if b > a]
    assert (joined - torch.cat(pieces, dim=1)).abs().max().item() < 1e-6


@pytest.mark.parametrize("offsets", [[0, 5, 16, 20, 36, 40, 52, 64], [0, 3, 19, 30, 31, 47, 60, 76, 92, 100],
                                     [0, 9, 18, 27, 36, 37, 37, 37], [0, 40, 64]])
def test_torch_path_banded_or_dense_equals_separate_runs(offsets):
    """attention_sdpa with segments: banded (chunks of the longest segment L, each seeing the one before) when
    L <= T / 4, dense otherwise (the last case); both equal each segment run on its own, forward and backward."""
    T = offsets[-1]
    q, k, v, q_gain, _ = _inputs(2, T, 4, 2, 16, seed=15)
    gate = _gate(2, T, 4, 15)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    joined = attention_sdpa(q, k, v, q_gain, True, gate=gate, cu_seqlens=_cu(offsets))
    pieces = torch.cat([attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], q_gain, True, gate=gate[:, a:b])
                        for a, b in zip(offsets[:-1], offsets[1:]) if b > a], dim=1)
    assert (joined - pieces).abs().max().item() < 1e-5  # fp32 rounding, q_gain up to 5
    dy = torch.randn_like(joined)
    for got, want in zip(torch.autograd.grad(joined, (q, k, v), dy), torch.autograd.grad(pieces, (q, k, v), dy)):
        assert (got - want).abs().max().item() < 1e-5


def test_segment_bounds_per_token():
    bounds = segment_bounds(_cu([0, 2, 2, 5, 6, 6]), 6).tolist()
    assert bounds == [[0, 0, 2, 2, 2, 5], [2, 2, 5, 5, 5, 6]]


def test_reference_gate_and_segments_gradcheck():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q_gain = torch.tensor([1.5, 5.0], dtype=torch.float64, requires_grad=True)
    gate = torch.rand(1, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda *a: attention_reference(*a[:4], True, gate=a[4], cu_seqlens=cu),
                                    (q, k, v, q_gain, gate))


def test_reference_xsa_gradcheck():
    # The reference is the ground truth for the kernel's v̂ gradient, so check it against finite differences.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 4, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q_gain = torch.tensor([1.5, 5.0], dtype=torch.float64, requires_grad=True)
    for xsa in (True, False):
        assert torch.autograd.gradcheck(lambda *a: attention_reference(*a, xsa), (q, k, v, q_gain))


def test_reference_xsa_removes_own_value_component():
    # XSA's definition, checked directly: the output is orthogonal to the token's own value vector.
    q, k, v, q_gain, _ = _inputs(2, 9, 4, 2, 16, seed=5)
    y = attention_reference(q, k, v, q_gain, True)
    v_hat = torch.nn.functional.normalize(v.repeat_interleave(2, dim=2).double(), dim=-1)
    y_plain = attention_reference(q, k, v, q_gain, False)
    assert (y.double() * v_hat).sum(-1).abs().max().item() < 1e-6 * y_plain.abs().max().item()
    # what was removed is exactly the projection of the plain output on v̂
    removed = (y_plain.double() * v_hat).sum(-1, keepdim=True) * v_hat
    assert (y_plain.double() - y.double() - removed).abs().max().item() < 1e-6
    assert removed.abs().max().item() > 1e-2  # and it was not nothing


def test_compiled_custom_op_fullgraph():
    # backend "aot_eager": traces through the fake and the registered autograd without inductor's ~20 s compile.
    q, k, v, q_gain, dy = _inputs(2, 40, 4, 2, 64, seed=2)
    eager = _run(attention_triton, q, k, v, q_gain, dy, True, torch.float32)
    torch._dynamo.reset()
    compiled_fn = torch.compile(attention_triton, fullgraph=True, backend="aot_eager")
    compiled = _run(compiled_fn, q, k, v, q_gain, dy, True, torch.float32)
    for name, a, b in zip(("y", "dq", "dk", "dv", "d_q_gain"), compiled, eager):
        assert torch.equal(a, b), f"{name}: compiled differs from eager by {(a - b).abs().max().item():.3e}"


def test_compiled_custom_op_fullgraph_with_gate_and_segments():
    # segment_bounds and the checks trace into the graph: no host sync, no graph break
    q, k, v, q_gain, dy = _inputs(1, 100, 2, 1, 64, seed=15)
    options = dict(gate=_gate(1, 100, 2, 15), cu_seqlens=_cu([0, 30, 31, 100, 100]))
    eager = _run(attention_triton, q, k, v, q_gain, dy, True, torch.float32, **options)
    torch._dynamo.reset()
    compiled_fn = torch.compile(attention_triton, fullgraph=True, backend="aot_eager")
    compiled = _run(compiled_fn, q, k, v, q_gain, dy, True, torch.float32, **options)
    for name, a, b in zip(("y", "dq", "dk", "dv", "d_q_gain", "d_gate"), compiled, eager):
        assert torch.equal(a, b), f"{name}: compiled differs from eager by {(a - b).abs().max().item():.3e}"


def test_opcheck_registrations():
    # Schema, fake (shapes/strides), and autograd registration of the custom ops.
    q, k, v, q_gain, _ = _inputs(1, 20, 2, 1, 64, seed=4)
    q, k, v, q_gain = (t.requires_grad_() for t in (q, k, v, q_gain))
    torch.library.opcheck(torch.ops.ouroboros.attention.default, (q, k, v, q_gain, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    gate = _gate(1, 20, 2, 4).requires_grad_()
    segments = segment_bounds(_cu([0, 7, 20]), 20)
    torch.library.opcheck(torch.ops.ouroboros.attention.default, (q, k, v, q_gain, True, gate, segments),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dispatch_picks_kernel():
    q, k, v, q_gain, _ = _inputs(1, 17, 2, 1, 64, seed=6)
    try:
        kernels.set_backend("triton")
        via_dispatch = kernels.attention(q, k, v, q_gain, True)
        kernels.set_backend("torch")
        via_torch = kernels.attention(q, k, v, q_gain, True)
    finally:
        kernels.set_backend(None)
    assert torch.equal(via_dispatch, attention_triton(q, k, v, q_gain, True))
    _check("y(torch backend)", via_torch, attention_reference(q, k, v, q_gain, True))


def test_dispatch_passes_gate_and_segments():
    q, k, v, q_gain, _ = _inputs(1, 17, 2, 1, 64, seed=6)
    options = dict(gate=_gate(1, 17, 2, 6), cu_seqlens=_cu([0, 9, 17]))
    try:
        kernels.set_backend("triton")
        via_dispatch = kernels.attention(q, k, v, q_gain, True, **options)
        kernels.set_backend("torch")
        via_torch = kernels.attention(q, k, v, q_gain, True, **options)
    finally:
        kernels.set_backend(None)
    assert torch.equal(via_dispatch, attention_triton(q, k, v, q_gain, True, **options))
    _check("y(torch backend)", via_torch, attention_reference(q, k, v, q_gain, True, **options))


def test_autocast_casts_the_gate():
    q, k, v, q_gain, _ = _inputs(1, 20, 2, 1, 64, seed=9)
    gate = _gate(1, 20, 2, 9)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = attention_triton(q, k, v, q_gain, True, gate=gate)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_gain, True,
                                           gate=gate.bfloat16()))


@pytest.mark.parametrize("B,offsets,dtype,message", [
    (1, [0, 4, 8], torch.int64, r"cu_seqlens must be int32 .* got torch.int64"),
    (1, [0, 6, 4, 8], torch.int32, r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 4 < cu_seqlens\[1\] = 6"),
    (1, [0, 4, 7], torch.int32, r"cu_seqlens must run from 0 to T = 8 .* cu_seqlens\[-1\] = 7"),
    (1, [1, 4, 8], torch.int32, r"cu_seqlens must run from 0 to T = 8 .* cu_seqlens\[0\] = 1"),
    (2, [0, 4, 8], torch.int32, r"cu_seqlens packs segments into one row, so q must have B = 1; got q \(2, 8, 4, 64\)"),
    (1, [[0, 8]], torch.int32, r"cu_seqlens must be 1-D \[n \+ 1\] .* got shape \(1, 2\)"),
    (1, [8], torch.int32, r"cu_seqlens must be 1-D \[n \+ 1\] with n >= 1 segments, got shape \(1,\)"),
])
def test_bad_cu_seqlens_raise_clear_errors(B, offsets, dtype, message):
    q = torch.randn(B, 8, 4, 64, device=DEVICE)
    k = torch.randn(B, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        attention_triton(q, k, k, torch.ones(4, device=DEVICE), True,
                         cu_seqlens=torch.tensor(offsets, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 8, 2), torch.float32, r"gate must be \[B, T, Hq\] = \(1, 8, 4\) .* got \(1, 8, 2\)"),
    ((1, 8, 4), torch.float64, r"gate must have q's dtype and device \(torch.float32 on .*\), got torch.float64"),
])
def test_bad_gate_raises_clear_errors(shape, dtype, message):
    q = torch.randn(1, 8, 4, 64, device=DEVICE)
    k = torch.randn(1, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        attention_triton(q, k, k, torch.ones(4, device=DEVICE), True,
                         gate=torch.rand(shape, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("change,message", [
    (dict(D=32), r"head_dim D=32 .*not supported"),
    (dict(Hq=6, Hkv=4), r"Hq=6 .* multiple of KV heads Hkv=4"),
    (dict(gain_shape=(3,)), r"q_gain must have shape \(4,\).* got \(3,\)"),
    (dict(k_dtype=torch.float64), r"share one dtype.*k torch.float64"),
    (dict(k_T=9), r"k/v \(1, 9, 2, 64\) must match q \(1, 8, 4, 64\)"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    D, Hq, Hkv = change.get("D", 64), change.get("Hq", 4), change.get("Hkv", 2)
    q = torch.randn(1, 8, Hq, D, device=DEVICE)
    k = torch.randn(1, change.get("k_T", 8), Hkv, D, device=DEVICE, dtype=change.get("k_dtype", torch.float32))
    v = k.clone()
    q_gain = torch.ones(change.get("gain_shape", (Hq,)), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        attention_triton(q, k, v, q_gain, True)


def test_batch_times_heads_over_the_cuda_grid_limit_is_refused_on_the_host():
    """B·Hq programs sit in grid dimension 1, which CUDA caps at 65,535: a clear error, not a launch failure."""
    q = torch.zeros(8192, 1, 8, 64, device=DEVICE)  # 65,536 (batch, head) pairs
    k = torch.zeros(8192, 1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"batch x query heads = 8192 x 8 = 65536 .* exceeds CUDA's 65,535"):
        attention_triton(q, k, k, torch.ones(8, device=DEVICE), False)


def test_sm90_configs_cover_every_launch():
    configs = sm90_configs()
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names))
    # 2 dtypes x 2 head dims x (fwd: XSA x gate x segments, preprocess: XSA x gate, dkdv: XSA x segments,
    # dq: segments) = 2 x 2 x (8 + 4 + 4 + 2) = 72
    assert len(configs) == 2 * len(SUPPORTED_HEAD_DIMS) * 18
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in SUPPORTED_HEAD_DIMS:
            for segments in (False, True):
                table = _launch_table(dtype, head_dim, interpret=False, segments=segments)
                for kernel_name, cfg in table.items():
                    tag = f"attention_{kernel_name}_{'bf16' if dtype == torch.bfloat16 else 'fp32'}_d{head_dim}"
                    matching = [c for c in configs if c["name"].startswith(tag)
                                and c["constexprs"].get("HAS_SEGMENTS", False) == segments]
                    assert matching or (segments and kernel_name == "preprocess"), tag
                    for c in matching:
                        assert c["num_warps"] == cfg["num_warps"] and c["num_stages"] == cfg["num_stages"]
                        assert all(c["constexprs"][key] == val for key, val in cfg.items() if key.startswith("BLOCK_"))
                        assert set(c["signature"]) | set(c["constexprs"]) == set(c["kernel"].arg_names)


def _spread_zero_weights(net):
    """Zero-initialized projections would hide attention from the first step: N(0, 0.02), seeded per size."""
    for p in net.parameters():
        if p.dim() == 2 and not p.any():
            p.normal_(0.0, 0.02, generator=torch.Generator(device=p.device).manual_seed(p.numel()))


def test_tiny_model_same_losses_with_triton_kernels():
    # The `tiny` model trained 3 steps (2 sequences of 64 tokens, plain SGD so no optimizer state can
    # amplify rounding) with KERNELS=triton and KERNELS=torch: the same losses within fp32 rounding.
    def losses(backend):
        return train_tiny_losses(backend, tiny_config(), optimizer="sgd", sgd_lr=0.05, init=_spread_zero_weights,
                                 token_seed=0)

    with_triton, with_torch = losses("triton"), losses("torch")
    assert with_torch[0] != with_torch[2], "training did not move the loss"
    for step, (a, b) in enumerate(zip(with_triton, with_torch)):
        assert abs(a - b) <= 2e-5 * abs(b), f"step {step}: loss {a:.7f} with triton kernels, {b:.7f} with torch"
