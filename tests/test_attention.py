"""The causal GQA flash-attention kernel with q_gain and XSA against its fp32 PyTorch reference.

Every case runs forward and backward and checks y, dq, dk, dv and d(q_gain). fp32 is held to fixed
bars; bf16 to the PyTorch bf16 path (SDPA plus eager q_gain and XSA): the kernel's error against the
fp32 reference may be at most twice that path's error. On a machine without CUDA the kernels run in
the Triton interpreter (tests/conftest.py), with the same tile sizes the GPU launches.
"""
import dataclasses
import functools

import pytest
import torch

import kernels
from kernels.attention import (SUPPORTED_HEAD_DIMS, _launch_table, attention_reference, attention_sdpa,
                               attention_triton, sm90_configs)
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


def _run(fn, q, k, v, q_gain, dy, xsa, dtype):
    """y and the gradients of (q, k, v, q_gain) for one op, q/k/v/dy cast to dtype, q_gain kept fp32."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)] + [q_gain.detach().clone().requires_grad_()]
    y = fn(*leaves, xsa)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


# _check(name, got, ref, torch_bf16=None): this file's bars (fp32 fixed; bf16 at most BF16_FACTOR x PyTorch bf16's)
_check = functools.partial(check_close, fp32_rel_rms=FP32_REL_RMS, fp32_max_rel=FP32_MAX_REL, abs_floor=ABS_FLOOR,
                           bf16_factor=BF16_FACTOR)


def _compare_to_reference(B, T, Hq, Hkv, D, xsa, dtype, seed=0, zero_value_token=None):
    q, k, v, q_gain, dy = _inputs(B, T, Hq, Hkv, D, seed, zero_value_token)
    ref = _run(attention_reference, q, k, v, q_gain, dy, xsa, torch.float32)
    out = _run(attention_triton, q, k, v, q_gain, dy, xsa, dtype)
    baseline = _run(attention_sdpa, q, k, v, q_gain, dy, xsa, dtype) if dtype == torch.bfloat16 else [None] * 5
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[4].dtype == q_gain.dtype
    for name, got, want, base in zip(("y", "dq", "dk", "dv", "d_q_gain"), out, ref, baseline):
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


def test_opcheck_registrations():
    # Schema, fake (shapes/strides), and autograd registration of the custom ops.
    q, k, v, q_gain, _ = _inputs(1, 20, 2, 1, 64, seed=4)
    q, k, v, q_gain = (t.requires_grad_() for t in (q, k, v, q_gain))
    torch.library.opcheck(torch.ops.ouroboros.attention.default, (q, k, v, q_gain, True),
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
    # 2 dtypes x 2 head dims x (fwd, preprocess, dkdv with XSA on/off + dq) = 28
    assert len(configs) == 2 * len(SUPPORTED_HEAD_DIMS) * 7
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in SUPPORTED_HEAD_DIMS:
            table = _launch_table(dtype, head_dim, interpret=False)
            for kernel_name, cfg in table.items():
                tag = f"attention_{kernel_name}_{'bf16' if dtype == torch.bfloat16 else 'fp32'}_d{head_dim}"
                matching = [c for c in configs if c["name"].startswith(tag)]
                assert matching, tag
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
