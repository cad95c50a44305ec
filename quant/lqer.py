"""LQER as R1 ran it: a rank-r correction Â·B̂ ≈ E = W - Q·s of the quantized matrices with the largest ‖E‖_F,
stored as small integer factors and added back at load (W ← Q·s + Â·B̂).

E = U·diag(S)·Vᵀ (torch.linalg.svd, CPU fp32), A = U[:, :r]·S[:r] [rows, r], B = Vᵀ[:r] [r, cols], r = min(rank, len(S)).
- pack_asym (R1's run): A as INT2 in [-2, 1] with one fp16 scale max|A|/1.5; B as INT4 in [-8, 7] with one fp16
  scale max/7.5 per group of `group` consecutive row-major entries. The clamps are asymmetric, so the codes
  depend on torch's sign choice for each singular pair.
- pack_sym (R1's fallback when numel(B) % group != 0): A and B symmetric per row in ±(2^(bits-1) - 1).
Rounding is half to even; a step that is 0 in fp16 gives codes 0 (quant.scheme.step_codes).
"""
from __future__ import annotations

import torch

from .gptq import dequantize
from .scheme import step_codes, symmetric_row_codes


def _factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the rank-min(rank, len(S)) truncated SVD of error, in fp32 on CPU."""
    u, s, vh = torch.linalg.svd(error.float().cpu(), full_matrices=False)
    r = min(rank, s.numel())
    return u[:, :r] * s[:r], vh[:r]


def pack_asym(error: torch.Tensor, rank: int = 4, group: int = 64):
    """-> (qA int8 [rows, r], sA fp16 0-dim, qB int8 [r, cols], sB fp16 [r·cols / group]). Raises ValueError
    when r·cols is not a multiple of group (the caller then uses pack_sym)."""
    r = min(rank, *error.shape)
    if r * error.shape[1] % group:
        raise ValueError(f"LQER asymmetric pack: B [{r}, {error.shape[1]}] of error {tuple(error.shape)} "
                         f"does not split into groups of {group}")
    a, b = _factors(error, rank)
    sa = (a.abs().amax().clamp_min(1e-10) / 1.5).to(torch.float16)
    groups = b.reshape(-1, group)
    sb = (groups.abs().amax(dim=1).clamp_min(1e-10) / 7.5).to(torch.float16)
    return step_codes(a, sa, -2, 1), sa, step_codes(groups, sb[:, None], -8, 7).reshape(b.shape), sb


def pack_sym(error: torch.Tensor, rank: int = 4, factor_bits: int = 4):
    """-> (qA int8 [rows, r], sA fp16 [rows], qB int8 [r, cols], sB fp16 [r]): each row of A and of B with
    step fp16(max|row| (>= 1e-10) / rng), codes in ±rng, rng = 2^(factor_bits-1) - 1."""
    a, b = _factors(error, rank)
    rng = 2 ** (factor_bits - 1) - 1
    return *symmetric_row_codes(a, rng), *symmetric_row_codes(b, rng)


def correction(qA: torch.Tensor, sA: torch.Tensor, qB: torch.Tensor, sB: torch.Tensor) -> torch.Tensor:
    """Â·B̂ in fp32 [rows, cols] from either pack (a 0-dim sA marks the asymmetric one); the loader adds it to Q·s."""
    if sA.dim():
        return dequantize(qA, sA) @ dequantize(qB, sB)
    return (qA.float() * sA.float()) @ dequantize(qB.reshape(sB.numel(), -1), sB).reshape(qB.shape)


def top_k_by_error(errors: dict, k: int) -> list:
    """The k names with the largest ‖E‖_F (fp32, absolute), descending; equal norms keep dict order (stable sort)."""
    norms = {name: float(e.float().norm()) for name, e in errors.items()}
    return sorted(norms, key=norms.get, reverse=True)[:k]
