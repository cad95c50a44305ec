"""R1's GPTQ with SDClip (quant.gptq.sdclip_quantize, sdclip_scales) against QUANT.md's Q.2, written out here.

q2_reference and q2_scales follow Q.2 step by step and share no code with quant/ or kernels/: the steps in
fp32 (fp64 for σ) with the column loop spelled out; only the factorizations and the one matmul per block are
torch's, as R1's were. The layer has Student-t rows, a random SPD Hessian with dead columns and groups of tied
diagonal entries, an all-zero row and a constant row (both step 0 in fp16), 300 columns (blocks 128, 128, 44
or five of 64), outliers far past the clip, and a first-visited column whose every value is an exact half step
(round half to even decides its codes).

Bars: the fp16 steps bit for bit; the codes exactly, on both paths: KERNELS=torch (the reference GPTQ) and
KERNELS=triton (the kernel, under the interpreter on the CPU), the reference on the same device. Both run
Q.2's fp32 operations in Q.2's order: the kernel's column extraction is a sum of zeros and one value (exact),
and its lazy update, addmm_ with alpha -1, rounds on the CPU as the reference's product-then-subtract does
(measured: no code differs). On CUDA the Triton compiler may fuse the in-block update w -= e·u into FMAs,
which round once where PyTorch rounds twice: there the Triton codes get tests/test_gptq.py's bar (at most
0.1% off by one, none by more).
"""
import numpy as np
import pytest
import torch

import kernels
import kernels.gptq
from quant.gptq import sdclip_quantize, sdclip_scales

from conftest import DEVICE

ROWS, COLS = 70, 300
DEAD = [3, 17, 160, 299]
FIRST = 41                                  # the column with the largest diagonal: GPTQ visits it first
TIED = [[5, 6, 7, 8, 9], [50, 120, 200, 250], [100, 101]]   # equal diagonal entries of H
ZERO_ROW, CONST_ROW = 11, 12                # σ = 0: step 0 in fp16
OUTLIER_ROWS = [0, 20, 33, 42]
MAX_CODE_MISMATCH = 1e-3                    # the Triton kernel on CUDA only (FMA), as tests/test_gptq.py


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    kernels.set_backend(None)


def q2_scales(weight: torch.Tensor, clip_sigmas: float, bits: int) -> torch.Tensor:
    """Q.2 step 5: σ_r Bessel-corrected (fp64 sums, rounded to fp32), then in fp32 k·σ, / clip_range,
    max(·, 1e-10), and numpy's fp16 cast (round to nearest even)."""
    w = weight.double().cpu().numpy()
    sigma = np.sqrt(((w - w.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) / (w.shape[1] - 1)).astype(np.float32)
    step = np.float32(clip_sigmas) * sigma / np.float32(2 ** (bits - 1) - 1)
    return torch.from_numpy(np.maximum(step, np.float32(1e-10)).astype(np.float16))


def q2_reference(weight: torch.Tensor, hessian: torch.Tensor, clip_sigmas: float, bits: int, block_size: int = 128):
    """Q.2 steps 1-8 in fp32 -> (codes int8 [rows, cols], scale fp16 [rows]). A row whose step is 0 gets codes 0
    (R1 would divide by it; the row dequantizes to 0 either way). Ties of diag H keep column order."""
    clip_range = 2 ** (bits - 1) - 1
    scale = q2_scales(weight, clip_sigmas, bits).to(weight.device)
    s = scale.float()
    w = weight.float()
    rows, cols = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0                                      # 1
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(cols, device=h.device)   # 2: mean of a contiguous copy
    diag = torch.diag(h).tolist()
    perm = sorted(range(cols), key=lambda j: -diag[j])            # 3: descending; Python's sort is stable
    invperm = sorted(range(cols), key=lambda i: perm[i])
    perm_t = torch.tensor(perm, device=w.device)
    wp = w[:, perm_t].clone()
    wp[:, dead[perm_t]] = 0.0
    hp = h[perm_t][:, perm_t]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)   # 4
    q_all = torch.zeros(rows, cols, device=w.device)
    for i1 in range(0, cols, block_size):                           # 7
        i2 = min(i1 + block_size, cols)
        b = wp[:, i1:i2].clone()
        err = torch.zeros(rows, i2 - i1, device=w.device)
        for j in range(i2 - i1):
            q = torch.clamp(torch.round(b[:, j] / s), -clip_range, clip_range)
            q[s == 0] = 0.0
            q_all[:, i1 + j] = q
            e = (b[:, j] - q * s) / u[i1 + j, i1 + j]
            err[:, j] = e
            b[:, j:] -= e[:, None] * u[i1 + j, i1 + j:i2][None, :]
        wp[:, i2:] -= err @ u[i1:i2, i2:]
    return q_all[:, torch.tensor(invperm, device=w.device)].to(torch.int8), scale   # 8


def _student_t(gen, shape, df=3):
    """Heavy-tailed values: z / sqrt(χ²_df / df)."""
    chi2 = torch.randn(*shape, df, generator=gen).square().sum(-1)
    return torch.randn(*shape, generator=gen) / (chi2 / df).sqrt()


def _layer(clip_sigmas: float, bits: int, seed: int = 0):
    """(W, H) with every case listed in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(COLS) + 0.3 * torch.randn(COLS, COLS, generator=gen) / COLS ** 0.5
    x = (torch.randn(4 * COLS, COLS, generator=gen) @ mix) * torch.exp(0.7 * torch.randn(COLS, generator=gen))
    x[:, DEAD] = 0.0
    x[:, FIRST] *= 30.0
    h = x.T @ x / x.shape[0]
    for group in TIED:  # raising a diagonal entry keeps H positive definite
        h[group, group] = h.diagonal()[group].max()
    w = 0.02 * _student_t(gen, (ROWS, COLS))
    for i, r in enumerate(OUTLIER_ROWS):  # one value ~17σ of its row (√(cols - 1) is the most one can be)
        w[r, 7 * r] = (-1) ** i * 1000 * w[r].std()
    w[ZERO_ROW] = 0.0
    w[CONST_ROW] = 0.01
    # FIRST's values at exact half steps: (m + 1/2)·s is exact in fp32 (s is fp16), and setting them moves σ
    # a little, so repeat until the steps hold still
    live = [r for r in range(ROWS) if r not in (ZERO_ROW, CONST_ROW)]
    half = torch.randint(-4, 4, (ROWS,), generator=gen).float() + 0.5
    for _ in range(10):
        s = q2_scales(w, clip_sigmas, bits).float()
        if torch.equal(w[live, FIRST], half[live] * s[live]):
            break
        w[live, FIRST] = half[live] * s[live]
    return w, h


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits,clip_sigmas,block_size", [(6, 11.5, 128), (7, 14.0, 128), (6, 13.0, 64)],
                         ids=["int6-mlp", "int7-embed", "int6-attn-b64"])
def test_sdclip_quantize_matches_q2(backend, bits, clip_sigmas, block_size, monkeypatch):
    w, h = _layer(clip_sigmas, bits)
    clip_range = 2 ** (bits - 1) - 1
    want_codes, want_scale = (t.cpu() for t in q2_reference(w.to(DEVICE), h.to(DEVICE), clip_sigmas, bits, block_size))
    # the layer holds what it should: half steps in FIRST, tied diagonals, a clamp that binds
    s = want_scale.float()
    live = s > 0
    assert int(live.sum()) == ROWS - 2
    assert torch.all((w[live, FIRST] / s[live]).frac().abs() == 0.5)
    assert int(h.diagonal().argmax()) == FIRST
    assert all(len(set(h.diagonal()[g].tolist())) == 1 for g in TIED)
    assert int((want_codes.abs() == clip_range).sum()) >= len(OUTLIER_ROWS)

    calls = []
    triton_layer = kernels.gptq.quantize_layer_triton
    monkeypatch.setattr(kernels.gptq, "quantize_layer_triton", lambda *a, **k: calls.append(1) or triton_layer(*a, **k))
    kernels.set_backend(backend)
    codes, scale = sdclip_quantize(w.to(DEVICE), h.to(DEVICE), clip_sigmas, bits, block_size=block_size)
    assert len(calls) == (backend == "triton")

    assert scale.dtype == torch.float16 and scale.shape == (ROWS,)
    assert torch.equal(scale.cpu().view(torch.int16), want_scale.view(torch.int16)), "steps differ from Q.2's"
    assert codes.dtype == torch.int8 and codes.shape == (ROWS, COLS)
    codes = codes.cpu()
    assert int(codes.abs().max()) == clip_range
    assert not codes[:, DEAD].any() and not codes[ZERO_ROW].any() and not codes[CONST_ROW].any()
    off = torch.nonzero(codes != want_codes)
    if backend == "triton" and DEVICE == "cuda":
        assert int((codes.int() - want_codes.int()).abs().max()) <= 1 and len(off) <= MAX_CODE_MISMATCH * codes.numel()
    else:
        assert len(off) == 0, (f"{len(off)} of {codes.numel()} codes differ from Q.2's; first at "
                               + ", ".join(f"{tuple(i)}: {int(codes[tuple(i)])} want {int(want_codes[tuple(i)])}"
                                           for i in off[:5].tolist()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits", [6, 7])
def test_codes_clamp_at_the_clip_range(backend, bits):
    # With H = I, GPTQ is round-to-nearest: the outliers (7.8σ, past a 6σ clip) take exactly ±clip_range.
    clip_range = 2 ** (bits - 1) - 1
    w = torch.linspace(-0.5, 0.5, 126).repeat(3, 1)
    w = torch.cat([w, torch.tensor([[10.0, -10.0]]).repeat(3, 1)], dim=1)
    kernels.set_backend(backend)
    codes, scale = sdclip_quantize(w.to(DEVICE), torch.eye(128, device=DEVICE), 6.0, bits)
    codes, s = codes.cpu(), scale.float().cpu()[:, None]
    assert torch.all(w[:, -2] / s > clip_range + 1)
    assert torch.all(codes[:, -2] == clip_range) and torch.all(codes[:, -1] == -clip_range)
    assert torch.equal(codes, torch.clamp(torch.round(w / s), -clip_range, clip_range).to(torch.int8))


def test_sdclip_scales_by_hand():
    def step(row, clip_sigmas, bits):
        return float(sdclip_scales(torch.tensor([row]), clip_sigmas, bits)[0])

    # Bessel: σ([1, 2, 3, 4]) = sqrt(5/3) = 1.290994; 13σ/31 = 0.5413844 -> fp16 1109·2^-11 (the
    # population σ, sqrt(5/4), would give 0.468853 -> 1920·2^-12)
    assert step([1.0, 2.0, 3.0, 4.0], 13.0, 6) == 1109 / 2048
    # σ([-d, 0, d]) = d exactly. k = clip_range makes the step d itself, an exact fp16 tie: to even
    for bits in (6, 7):
        k = 2.0 ** (bits - 1) - 1
        assert step([-(1 + 2 ** -11), 0.0, 1 + 2 ** -11], k, bits) == 1.0                   # down to even
        assert step([-(1 + 3 * 2 ** -11), 0.0, 1 + 3 * 2 ** -11], k, bits) == 1 + 2 ** -9    # up to even
    # the order: fp32(fp32(13σ) / 31) lands on the fp16 tie 0.0103111..., which rounds up to even; σ/31 first,
    # 13/31 first, or exact arithmetic stay below it
    sigma = float.fromhex("0x1.92d9d8p-6")
    assert step([-sigma, 0.0, sigma], 13.0, 6) == 0.01031494140625
    f32 = np.float32
    for other in (f32(13) * (f32(sigma) / f32(31)), (f32(13) / f32(31)) * f32(sigma), 13 * sigma / 31):
        assert float(np.float16(other)) == 0.01030731201171875
    # step 0: an all-zero or constant row (σ = 0: the clamp's 1e-10 is 0 in fp16), a +0
    zero = sdclip_scales(torch.tensor([[0.0] * 8, [0.25] * 8]), 14.0, 7)
    assert zero.view(torch.int16).tolist() == [0, 0]


def test_sdclip_scales_match_q2_on_many_rows():
    # 2^17 rows of very different sizes; the alternative orders of step 5 differ from Q.2's on a few of them
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1 << 17, 16, generator=gen) * torch.exp(2 * torch.randn(1 << 17, 1, generator=gen))
    for clip_sigmas, bits in ((13.0, 6), (11.5, 6), (14.0, 7), (12.85, 6)):
        got = sdclip_scales(w, clip_sigmas, bits)
        want = q2_scales(w, clip_sigmas, bits)
        assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), want.view(torch.int16))
    sigma = w.double().std(dim=1).float()
    other_order = (torch.tensor(13.0 / 31, dtype=torch.float32) * sigma).half()
    assert int((other_order != sdclip_scales(w, 13.0, 6)).sum()) > 0


def test_the_kernel_takes_the_code_limit_and_step_zero():
    # one block, steps with zeros, limit 63 and 31: the kernel's codes and errors equal the block reference's
    gen = torch.Generator().manual_seed(2)
    width = 50
    x = torch.randn(4 * width, width, generator=gen)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(x.T @ x / x.shape[0])), upper=True)
    w = 0.05 * _student_t(gen, (40, width))
    scale = (w.abs().amax(dim=1) / 80).half().float()  # every row has a value past either limit
    scale[[3, 27]] = 0.0
    for limit in (63, 31):
        codes, err = kernels.gptq.gptq_block_triton(w.to(DEVICE), u.to(DEVICE), scale.to(DEVICE), limit)
        want_codes, want_err = kernels.gptq.gptq_block_reference(w, u, scale, limit)
        assert torch.isfinite(err).all() and int(codes.abs().max()) == limit
        assert not codes[[3, 27]].any()
        if DEVICE == "cpu":
            assert torch.equal(codes, want_codes) and torch.equal(err, want_err)


def test_bad_arguments_are_rejected():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="bits=9"):
        sdclip_scales(w, 12.0, 9)
    with pytest.raises(ValueError, match=r"hessian: expected \[16, 16\]"):
        sdclip_quantize(w, torch.eye(15), 12.0, 6)
    for entry in (kernels.gptq.quantize_layer_reference, kernels.gptq.quantize_layer_triton):
        with pytest.raises(ValueError, match="code_limit=128"):
            entry(w, torch.eye(16), torch.ones(4), code_limit=128)
        with pytest.raises(ValueError, match=">= 0"):
            entry(w, torch.eye(16), -torch.ones(4))
