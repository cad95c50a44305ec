"""The PyTorch reference quantizer (SPEC 5): O's per-row int6 scale rule, round-to-nearest, textbook GPTQ
with the original's variant as an option, and int8 per-row quantization for the other large tensors.

Everything here runs in fp32 on whatever device the inputs are on. kernels/gptq.py is the Triton version
of quantize_layer; tests/test_gptq.py checks it against this reference (at most 0.1% of codes off by one,
the layer objective within 1%).

Conventions: a weight is [rows, cols] = [out, in] (nn.Linear), a Hessian is [cols, cols] = XᵀX/n over
the layer's calibration inputs X [n, cols], codes are int8 in [-31, 31] for int6 and [-127, 127] for
int8, and the dequantized weight is codes · scale[row]. Scales are rounded to fp16 on return because
that is how the artifact stores them: GPTQ then compensates for exactly the step the loader will use.
"""
from __future__ import annotations

import torch

from kernels.gptq import INVERSES, ORDERS

INT6_MAX = 31
INT8_MAX = 127
# O's candidates for the per-row clip: quantiles of |W_r| (1.0 = the row max).
SCALE_CANDIDATES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
INT8_CLIP_QUANTILE = 0.9999984


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [rows, cols] tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf (shape {tuple(t.shape)})")


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


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *, block_size: int = 128,
                   damping: float = 0.01, order: str = "descending", inverse: str = "cholesky") -> torch.Tensor:
    """GPTQ with per-row steps held fixed -> int8 codes [rows, cols] in [-31, 31].

    Textbook (the default): H += damping·mean(diag H)·I; columns visited in descending diag(H); U = the
    upper Cholesky factor of H⁻¹ (the inverse downdated as columns are fixed); lazy updates in blocks of
    `block_size` columns. inverse="plain" is the original's variant: it uses rows of the plain H⁻¹, never
    downdated (with block_size=64, damping=0.002, order="ascending" it is the original exactly).
    Dead columns (diag(H) = 0, the input never moves) get diag 1 and weight 0: they cannot matter.
    """
    _check_matrix("weight", weight)
    _check_matrix("hessian", hessian)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian: expected shape ({cols}, {cols}) for weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if scale.shape != (rows,):
        raise ValueError(f"scale: expected shape ({rows},) for weight {tuple(weight.shape)}, got {tuple(scale.shape)}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: must be one of {ORDERS}")
    if inverse not in INVERSES:
        raise ValueError(f"inverse={inverse!r}: must be one of {INVERSES}")
    if block_size <= 0:
        raise ValueError(f"block_size={block_size}: must be > 0")
    if not (scale > 0).all():
        raise ValueError("scale: every row step must be > 0")

    w = weight.float().clone()
    h = hessian.float().clone()
    s = scale.float()[:, None]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.diagonal(h).mean() * torch.eye(cols, device=h.device, dtype=h.dtype)

    if order == "none":
        perm = torch.arange(cols, device=w.device)
    else:
        perm = torch.argsort(torch.diagonal(h), descending=(order == "descending"), stable=True)
    w = w[:, perm]
    h = h[perm][:, perm]

    if inverse == "cholesky":
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(h_inv, upper=True)
    else:
        u = torch.linalg.inv(h)

    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)  # the last block may be partial
        wb = w[:, start:end].clone()
        ub = u[start:end, start:end]
        err = torch.zeros_like(wb)
        for j in range(end - start):
            col = wb[:, j]
            q = torch.clamp(torch.round(col / s[:, 0]), -INT6_MAX, INT6_MAX)
            codes[:, start + j] = q.to(torch.int8)
            e = (col - q * s[:, 0]) / ub[j, j]
            wb[:, j + 1:] -= e[:, None] * ub[j, j + 1:][None, :]
            err[:, j] = e
        w[:, end:] -= err @ u[start:end, end:]

    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out
