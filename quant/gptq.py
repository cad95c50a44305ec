"""The PyTorch reference quantizer (SPEC 5): O's per-row int6 scale rule, round-to-nearest, textbook GPTQ
with the original's variant as an option, int8 per-row quantization for the other large tensors, and R1's
SDClip GPTQ (int6 or int7, steps from each row's standard deviation).

Everything here runs in fp32 on whatever device the inputs are on. GPTQ itself lives with its Triton
kernel in kernels/gptq.py (kernels/ cannot import quant/): quantize_layer is its PyTorch reference
under the name quant has always used; calibration calls kernels.gptq_quantize_layer, which picks the
kernel or this reference by backend. tests/test_gptq.py checks the kernel against the reference (at most
0.1% of codes off by one, the layer objective within 1%).

Conventions: a weight is [rows, cols] = [out, in] (nn.Linear), a Hessian is [cols, cols] = XᵀX/n over
the layer's calibration inputs X [n, cols], codes are int8 in [-31, 31] for int6 ([-63, 63] for SDClip's
int7) and [-127, 127] for int8, and the dequantized weight is codes · scale[row]. Scales are rounded to
fp16 on return because that is how the artifact stores them: GPTQ then compensates for exactly the step
the loader will use.
"""
from __future__ import annotations

import torch

import kernels
from kernels.gptq import INVERSES, ORDERS, check_matrix as _check_matrix  # noqa: F401
from kernels.gptq import quantize_layer_reference as quantize_layer  # noqa: F401  (the name quant's callers use)

INT6_MAX = 31
INT8_MAX = 127
# O's candidates for the per-row clip: quantiles of |W_r| (1.0 = the row max).
SCALE_CANDIDATES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
INT8_CLIP_QUANTILE = 0.9999984


def _row_quantiles(sorted_a: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of rows sorted ascending, linear interpolation (torch.quantile's rule, without its size cap)."""
    if q >= 1.0:
        return sorted_a[:, -1]
    pos = q * (sorted_a.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, sorted_a.shape[1] - 1)
    frac = pos - lo
    return sorted_a[:, lo] * (1 - frac) + sorted_a[:, hi] * frac


def _to_stored(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to the fp16 the artifact stores, back in fp32."""
    return scale.to(torch.float16).float()


def quantize_rtn(weight: torch.Tensor, scale: torch.Tensor, qmax: int = INT6_MAX) -> torch.Tensor:
    """Round-to-nearest codes: clamp(round(W / s_row), -qmax, qmax) as int8."""
    w = weight.float()
    return torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [rows, cols] · scale [rows] in fp32."""
    return codes.float() * scale.float()[:, None]


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """O's int6 scale rule, one fp32 step per row (rounded to fp16 precision, as stored).

    For each candidate p in SCALE_CANDIDATES: clip_r = p-quantile of |W_r|, s_r = max(clip_r / 31, 1/31);
    keep per row the candidate whose round-to-nearest reconstruction has the lowest squared error.
    The 1/31 floor is on the step, so every row whose clip is below 1 gets step exactly 1/31: it is
    what kept O's blob small (most codes near zero compress well).
    """
    _check_matrix("weight", weight)
    w = weight.float()
    sorted_abs = w.abs().sort(dim=1).values
    best_err = None
    best_scale = None
    for p in SCALE_CANDIDATES:
        s = _to_stored(torch.clamp(_row_quantiles(sorted_abs, p) / INT6_MAX, min=1.0 / INT6_MAX))
        err = (w - dequantize(quantize_rtn(w, s), s)).square().sum(dim=1)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err  # ties keep the earlier (tighter) candidate
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
    return best_scale


def int8_row_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per row for large non-matrix tensors (embeddings, projections): (codes int8, scale fp32 [rows]).

    clip_r = the 99.99984th percentile of |W_r|, scale max(clip_r / 127, 1/127), codes = round(clip(W) / s).
    A 1-D tensor is treated as one row.
    """
    w = weight.float().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.float().reshape(1, -1)
    if not torch.isfinite(w).all():
        raise ValueError(f"weight: contains NaN or inf (shape {tuple(weight.shape)})")
    clip = _row_quantiles(w.abs().sort(dim=1).values, INT8_CLIP_QUANTILE)
    scale = _to_stored(torch.clamp(clip / INT8_MAX, min=1.0 / INT8_MAX))
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    return quantize_rtn(clipped, scale, INT8_MAX), scale


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Q) X||² / n = tr((W - Q) H (W - Q)ᵀ) with H = XᵀX / n (undamped); in float64."""
    d = (weight.double() - quantized.double())
    return float(((d @ hessian.double()) * d).sum())


def sdclip_scales(weight: torch.Tensor, clip_sigmas: float, bits: int) -> torch.Tensor:
    """R1's SDClip steps, fp16 [rows]: fp16(max(k·σ_r / clip_range, 1e-10)), clip_range = 2^(bits-1) - 1.

    σ_r is the Bessel-corrected std (divide by cols - 1) of row r of the fp32 weight as given; the step is
    computed in fp32 in that order and rounded to nearest even in fp16. A step below ~3e-8 (an all-zero
    row) rounds to 0: GPTQ codes such a row 0.
    """
    _check_matrix("weight", weight)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: SDClip codes are int2..int8")
    clip_range = 2 ** (bits - 1) - 1
    sigma = weight.float().std(dim=1)
    return (clip_sigmas * sigma / clip_range).clamp_min(1e-10).to(torch.float16)


def sdclip_quantize(weight: torch.Tensor, hessian: torch.Tensor, clip_sigmas: float, bits: int,
                    block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """R1's GPTQ with SDClip -> (codes int8 [rows, cols] in ±(2^(bits-1) - 1), scale fp16 [rows]).

    Steps fixed beforehand by sdclip_scales on the original weight; dead columns (diag H = 0) get diag 1
    and weight 0; H += 0.01·mean(diag H)·I with the mean over a contiguous copy of the diagonal, as R1 took
    it (a strided diagonal can sum in another order, 1 ulp off, and flip codes), so the damping is added
    here and the layer gets damping 0; then textbook GPTQ (descending diag, upper Cholesky of H⁻¹) through
    kernels.gptq_quantize_layer. Ties of diag H keep column order (R1's unstable argsort could differ there);
    a row whose fp16 step is 0 codes 0 (R1 divided by it; the row dequantizes to 0 either way).
    """
    scale = sdclip_scales(weight, clip_sigmas, bits)
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian: expected [{cols}, {cols}], got {tuple(hessian.shape)}")
    w = weight.float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(0.01 * torch.diag(h).mean())
    codes = kernels.gptq_quantize_layer(w, h, scale.float(), block_size=block_size, damping=0.0, order="descending",
                                        inverse="cholesky", code_limit=2 ** (bits - 1) - 1)
    return codes, scale
