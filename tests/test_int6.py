"""The int6 layout and the fused dequant-matmul against their PyTorch references.

On a machine without CUDA the kernels run through the Triton interpreter (tests/conftest.py). The
torch.compile test uses backend "aot_eager": it traces the custom op and its autograd with
fullgraph=True without paying inductor's C++ build.
"""
import pytest
import torch

import kernels
from kernels import int6
from kernels.int6 import (QuantLinear, dequantize_int6, int6_matmul_reference, int6_matmul_torch, int6_matmul_triton,
                          pack_int6_planes, row_bytes, unpack_int6_planes)

from conftest import DEVICE


def _layer(n: int, k: int, seed: int, code_range: int = 31):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-code_range, code_range + 1, (n, k), generator=g, dtype=torch.int8)
    # Steps around the quantizer's 1/31 floor, varied per row.
    scale = (1.0 / 31) * (0.5 + torch.rand(n, generator=g))
    return codes.to(DEVICE), scale.to(DEVICE)


def _report(out: torch.Tensor, ref: torch.Tensor, what: str, limit: int = 5) -> str:
    diff = (out.float() - ref.float()).abs()
    idx = torch.nonzero(diff == diff.max())[:limit].tolist() if diff.numel() else []
    rows = [f"  at {i}: got {out.float()[tuple(i)].item():.8g}, want {ref.float()[tuple(i)].item():.8g}" for i in idx]
    return f"{what}: max |diff| {diff.max().item():.3g}, max |ref| {ref.abs().max().item():.3g}\n" + "\n".join(rows)


def _errors(out: torch.Tensor, ref: torch.Tensor):
    diff = out.double() - ref.double()
    rel_rms = (diff.square().mean().sqrt() / ref.double().square().mean().sqrt().clamp_min(1e-30)).item()
    return rel_rms, diff.abs().max().item()


def assert_fp32_close(out, ref, what):
    """fp32 kernel vs fp32 reference: only summation order differs."""
    assert torch.isfinite(out).all(), f"{what}: NaN/inf in the output"
    rel_rms, max_abs = _errors(out, ref)
    bar = ref.abs().max().item() * 2.0 ** -16
    assert rel_rms < 1e-5 and max_abs <= bar, _report(out, ref, what) + f"\n  rel RMS {rel_rms:.3g}, bar {bar:.3g}"


def assert_bf16_close(out, plain, ref, what):
    """bf16 kernel error vs the fp32 reference at most 2x the plain PyTorch bf16 path's (plus a tiny floor)."""
    assert torch.isfinite(out.float()).all(), f"{what}: NaN/inf in the output"
    k_rms, k_max = _errors(out.float(), ref)
    p_rms, p_max = _errors(plain.float(), ref)
    floor = ref.abs().max().item() * 2.0 ** -12
    assert k_rms <= 2 * p_rms + 1e-6 and k_max <= 2 * p_max + floor, (
        _report(out, ref, what) + f"\n  kernel rel RMS {k_rms:.3g} max {k_max:.3g}; plain bf16 rel RMS {p_rms:.3g} max {p_max:.3g}")


@pytest.fixture
def triton_backend():
    kernels.set_backend("triton")
    yield
    kernels.set_backend(None)


# ----------------------------------------------------------------------------- layout

def test_pack_unpack_round_trip_all_64_codes():
    # 5 rows x 77 columns (odd, not a multiple of 4): every code -32..31 appears in every row.
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.cat([torch.arange(-32, 32), torch.randint(-32, 32, (13,), generator=g)])[torch.randperm(77, generator=g)]
                         for _ in range(5)]).to(torch.int8)
    packed = pack_int6_planes(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, 5, row_bytes(77)) == (3, 5, 32)
    back = unpack_int6_planes(packed, 77)
    assert back.dtype == torch.int8 and torch.equal(back, codes), _report(back, codes, "unpack(pack(codes))")


def test_packed_bytes_follow_the_documented_layout():
    # The kernel decodes bytes by this contract: check it bit by bit, independently of unpack_int6_planes.
    codes, _ = _layer(3, 45, seed=1, code_range=32)
    codes = codes.clamp(-32, 31).cpu()
    packed = pack_int6_planes(codes).cpu()
    r = row_bytes(45)
    u = torch.full((3, 4 * r), 32, dtype=torch.int64)
    u[:, :45] = codes.long() + 32
    for n in range(3):
        for j in range(r):
            for p in range(3):
                byte = int(packed[p, n, j])
                assert byte & 63 == u[n, p * r + j], (n, j, p)
                assert (byte >> 6) & 3 == (u[n, 3 * r + j] >> (2 * p)) & 3, (n, j, p)


def test_row_bytes_is_aligned():
    for k in (1, 4, 63, 64, 65, 512, 1536, 3072, 8192):
        r = row_bytes(k)
        assert r % 16 == 0 and 4 * r >= k and 4 * (r - 16) < k, (k, r)


def test_bad_codes_and_packed_are_rejected():
    with pytest.raises(ValueError, match=r"\[-32, 31\].*max 32"):
        pack_int6_planes(torch.tensor([[0, 32]], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_int6_planes(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        pack_int6_planes(torch.zeros(3, dtype=torch.int8))
    packed = pack_int6_planes(torch.zeros(4, 40, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features=100 needs row_bytes=32"):
        unpack_int6_planes(packed, 100)


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_hot_activations_decode_the_weight_exactly(dtype):
    n, k = 70, 133
    codes, scale = _layer(n, k, seed=2, code_range=32)
    codes = codes.clamp(-32, 31)
    packed = pack_int6_planes(codes)
    eye = torch.eye(k, device=DEVICE, dtype=dtype)
    decoded = int6_matmul_triton(eye, packed, scale, k)            # row i = column i of W, i.e. Wᵀ
    want = dequantize_int6(packed, scale, k).t().to(dtype)        # codes · scale in fp32, rounded once
    assert torch.equal(decoded, want), _report(decoded, want, f"one-hot decode ({dtype})")


# Pairwise over M in {1, 5, 16, 200}, odd K and N, leading batch dims.
SHAPES = [((1,), 37, 101), ((5,), 131, 75), ((2, 8), 64, 257), ((200,), 33, 129)]


@pytest.mark.parametrize("lead,n,k", SHAPES)
def test_matmul_fp32_matches_reference(lead, n, k):
    codes, scale = _layer(n, k, seed=3)
    packed = pack_int6_planes(codes)
    x = torch.randn(*lead, k, device=DEVICE)
    out = int6_matmul_triton(x, packed, scale, k)
    ref = int6_matmul_reference(x, packed, scale, k)
    assert out.shape == (*lead, n) and out.dtype == torch.float32
    assert_fp32_close(out, ref, f"int6 matmul fp32 x{tuple(x.shape)} N={n}")


@pytest.mark.parametrize("lead,n,k", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_matmul_bf16_within_twice_the_plain_bf16_error(lead, n, k):
    codes, scale = _layer(n, k, seed=4)
    packed = pack_int6_planes(codes)
    x = torch.randn(*lead, k, device=DEVICE).bfloat16()
    out = int6_matmul_triton(x, packed, scale, k)
    assert out.dtype == torch.bfloat16
    ref = int6_matmul_reference(x.float(), packed, scale, k)
    plain = int6_matmul_torch(x, packed, scale, k)
    assert_bf16_close(out, plain, ref, f"int6 matmul bf16 x{tuple(x.shape)} N={n}")


def test_split_k_partial_sums(monkeypatch):
    # The GEMV-style path splits K over programs (on CUDA when the tiles do not fill the GPU); force it
    # here so the fp32 partial sums and their reduction run under the interpreter too.
    monkeypatch.setattr(int6, "_num_splits", lambda tiles, r, block_j, device: 3)
    k, n = 1000, 48
    codes, scale = _layer(n, k, seed=5)
    packed = pack_int6_planes(codes)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, k, device=DEVICE).to(dtype)
        out = int6_matmul_triton(x, packed, scale, k)
        ref = int6_matmul_reference(x.float(), packed, scale, k)
        if dtype == torch.float32:
            assert_fp32_close(out, ref, "split-K fp32")
        else:
            assert_bf16_close(out, int6_matmul_torch(x, packed, scale, k), ref, "split-K bf16")


def test_empty_batch():
    codes, scale = _layer(8, 20, seed=6)
    out = int6_matmul_triton(torch.empty(0, 20, device=DEVICE), pack_int6_planes(codes), scale, 20)
    assert out.shape == (0, 8)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("lead,n,k,dtype", [((5,), 131, 75, torch.float32), ((2, 8), 64, 257, torch.bfloat16),
                                            ((200,), 33, 129, torch.float32)])
def test_input_gradient(lead, n, k, dtype):
    codes, scale = _layer(n, k, seed=7)
    packed = pack_int6_planes(codes)
    x = torch.randn(*lead, k, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(*lead, n, device=DEVICE).to(dtype)
    int6_matmul_triton(x, packed, scale, k).backward(dy)
    x_ref = x.detach().float().requires_grad_()
    int6_matmul_reference(x_ref, packed, scale, k).backward(dy.float())
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(x.grad, x_ref.grad, "dx fp32")
    else:
        x_plain = x.detach().clone().requires_grad_()
        int6_matmul_torch(x_plain, packed, scale, k).backward(dy)
        assert_bf16_close(x.grad, x_plain.grad, x_ref.grad, "dx bf16")


def test_reference_gradcheck_fp64():
    codes, scale = _layer(6, 9, seed=8)
    packed = pack_int6_planes(codes).cpu()
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: int6_matmul_reference(t, packed, scale.cpu(), 9), (x,))


def test_custom_op_under_torch_compile_fullgraph():
    codes, scale = _layer(40, 70, seed=9)
    packed = pack_int6_planes(codes)
    x = torch.randn(4, 70, device=DEVICE, requires_grad=True)

    def f(t):
        return int6_matmul_triton(t, packed, scale, 70).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().clone().requires_grad_()
    loss_ref = int6_matmul_reference(x_ref, packed, scale, 70).square().sum()
    loss_ref.backward()
    assert_fp32_close(loss.detach().reshape(1), loss_ref.detach().reshape(1), "compiled loss")
    assert_fp32_close(grad, x_ref.grad, "compiled dx")


def test_launcher_errors_name_the_argument():
    codes, scale = _layer(8, 20, seed=10)
    packed = pack_int6_planes(codes)
    with pytest.raises(ValueError, match=r"x must have last dimension 20, got shape \(3, 21\)"):
        int6_matmul_triton(torch.randn(3, 21, device=DEVICE), packed, scale, 20)
    with pytest.raises(ValueError, match="x dtype torch.float16 is not supported"):
        int6_matmul_triton(torch.randn(3, 20, device=DEVICE).half(), packed, scale, 20)
    with pytest.raises(ValueError, match=r"scale must be float32 \[8\].*shape \(7,\)"):
        int6_matmul_triton(torch.randn(3, 20, device=DEVICE), packed, scale[:7], 20)


# ----------------------------------------------------------------------------- QuantLinear

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quant_linear_matches_reference(backend):
    codes, scale = _layer(48, 90, seed=11)
    layer = QuantLinear.from_codes(codes, scale)
    assert torch.equal(layer.codes(), codes)
    assert torch.equal(layer.weight, codes.float() * scale[:, None])
    x = torch.randn(2, 7, 90, device=DEVICE)
    kernels.set_backend(backend)
    try:
        out = layer(x)
    finally:
        kernels.set_backend(None)
    assert_fp32_close(out, int6_matmul_reference(x, layer.packed, layer.scale, 90), f"QuantLinear ({backend})")


def test_quant_linear_state_dict_round_trip_and_errors():
    codes, scale = _layer(12, 30, seed=12)
    layer = QuantLinear.from_codes(codes, scale)
    fresh = QuantLinear(30, 12, device=DEVICE)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.codes(), codes) and torch.equal(fresh.scale, scale.float())
    with pytest.raises(ValueError, match=r"codes shape \(12, 31\) does not match"):
        fresh.set_codes(torch.zeros(12, 31, dtype=torch.int8, device=DEVICE), scale)
    with pytest.raises(ValueError, match=r"scale shape \(11,\) must be \[12\]"):
        fresh.set_codes(codes, scale[:11])
    assert torch.equal(fresh.codes(), codes), "a rejected set_codes must leave the layer unchanged"


def test_quant_linear_follows_autocast(triton_backend):
    # Custom ops are not autocast by PyTorch: QuantLinear casts x as F.linear would (bf16 under CPU autocast).
    codes, scale = _layer(24, 40, seed=13)
    layer = QuantLinear.from_codes(codes, scale)
    x = torch.randn(3, 40, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    x_bf16 = x.bfloat16()
    ref = int6_matmul_reference(x_bf16.float(), layer.packed, layer.scale, 40)
    assert_bf16_close(out, int6_matmul_torch(x_bf16, layer.packed, layer.scale, 40), ref, "QuantLinear under autocast")
