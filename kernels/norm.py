"""The RMSNorm chains of every block, fused: residual-mix / residual-add, RMSNorm and scale in one pass.

Each block (model/gpt.py, SPEC 3) runs, with s = 1/sqrt(layer+1) and weightless RMSNorms:

    mix_norm:  x_in  = m0 ⊙ x + m1 ⊙ x0;        h  = rms_norm(x_in) · s    (resid_mix rows m0, m1)
               x     = x_in + a ⊙ Attn(h)
    add_norm:  x_new = x + b ⊙ branch;          h2 = rms_norm(x_new) · s   (branch = Attn(h), gain a)
               x     = x_new + mlp_scale ⊙ MLP(h2)   (the next block's mix_norm reads this x)

and the head normalizes once more (`rms_norm`: h = rms_norm(x) · s, s = 1). Each op reads its inputs
once and writes the residual stream and h once, with h already in the autocast dtype (bf16 on CUDA)
so the matmuls after it read half the bytes; the only thing kept for backward is rstd, one fp32 per
row. The backward is one pass as well, and reduces the parameter gradients (d(mix), d(gain)) as fp32
partial sums, one [d] row per program, summed on the host: no bf16 atomics, a deterministic order.

R1's decoder (MODEL.md §2.4, §2.8) adds two more, each one pass where the model ran 4-8 elementwise ops:

    skip_mix_norm:  merged = lerp(w ⊙ kept, x, σ(g))  (gated skips; x + w ⊙ kept without gates)
                    x_in, h = mix_norm(merged, x0)   (the next block's first chain)
    lane_update:    lane_k = r_k·lane_k + P[0,k]·(attn_scale ⊙ Attn) + P[1,k]·(mlp_scale ⊙ MLP),  k = 0, 1

A sequential slot goes on with x_in and a two-lane slot with merged (its lane0; the attention reads h,
its x_in is never used), so skip_mix_norm writes only the residual asked for: 18 B per element of [N, d]
forward (read x, kept, x0; write one residual and h), 30 B backward. Its backward recomputes merged and
x_in from x, kept and x0, which the gradients of w and g read anyway: it keeps the inputs and rstd.
lane_update moves 20 B per element forward (read both lanes and both bf16 branches, write both lanes)
and 32 B backward, keeps its inputs, and reduces d(attn_scale), d(mlp_scale), d(r) and d(P) through
per-program fp32 partials like the norms.

Why this family was fused first: the choice followed the step ledger's analytic table (bench/ledger.py,
whose measured table needs a GPU run; bench/results/ledger_cpu_tiny.md) at the real shapes, 48 x 2048
tokens per GPU, d = 512, 9 flat blocks + 2 crawler loops. There "norms and elementwise" is the largest
group: 80.6 GB of HBM traffic per GPU per step, 24.1 ms at 3.35 TB/s (26.9 ms at the measured 3 TB/s), 44% of the
61.1 ms ideal step, ahead of the MLP's 24.7%. That ledger already counts each chain as one fused pass
(mix + norm 14 B per element of [N, d], residual add + norm 12 B), so it is the floor these kernels aim
at, not a saving over it; eager PyTorch moves several times that (each of mul, mul, add, rms_norm,
scale and the cast to bf16 reads and writes [N, d] on its own). What a GPU run must show is how close
the kernels come to 3 TB/s next to torch.compile's own fusion of the reference (bench/norm.py).

Dtypes: the residual stream (x, x0, kept, the lanes) and the parameters (mix, gain, the skip weights and
gates, the branch scales, r and P) share one dtype, fp32 or bf16; a branch (add_norm's, lane_update's two)
is that dtype or bf16 (an autocast matmul's output); h comes out in the residual dtype, or in
the autocast dtype when autocast is on (the input policy of kernels/_runtime.py hands the entries that
dtype, and validates their inputs once per call). RMSNorm's eps is torch.finfo(residual dtype).eps,
F.rms_norm's default. fp32 arithmetic inside; the residual output is rounded to its dtype before it is
normalized, as the reference normalizes the stored tensor.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy


# ---------------------------------------------------------------------------------------------------
# PyTorch references: the exact maths of the model before fusion (the KERNELS=torch path)
# ---------------------------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, scale: float = 1.0, eps: float | None = None) -> torch.Tensor:
    """h = rms_norm(x) · scale over the last dim, weightless; eps None is finfo(x.dtype).eps (F.rms_norm's
    default, the model's choice). Tests of bf16 inputs pass bf16's eps to the fp32 reference."""
    h = F.rms_norm(x, (x.size(-1),), eps=eps)
    return h if scale == 1.0 else h * scale


def mix_norm_reference(x: torch.Tensor, x0: torch.Tensor, mix: torch.Tensor, scale: float,
                       eps: float | None = None):
    """(x_in, h): x_in = mix[0] ⊙ x + mix[1] ⊙ x0, h = rms_norm(x_in) · scale; x, x0 [..., d], mix [2, d]."""
    x_in = mix[0] * x + mix[1] * x0
    return x_in, F.rms_norm(x_in, (x_in.size(-1),), eps=eps) * scale


def add_norm_reference(x: torch.Tensor, branch: torch.Tensor, gain: torch.Tensor, scale: float,
                       eps: float | None = None):
    """(x_new, h): x_new = x + gain ⊙ branch, h = rms_norm(x_new) · scale; x, branch [..., d], gain [d]."""
    x_new = x + gain * branch
    return x_new, F.rms_norm(x_new, (x_new.size(-1),), eps=eps) * scale


def skip_mix_norm_reference(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                            x0: torch.Tensor, mix: torch.Tensor, scale: float, eps: float | None = None, *,
                            keep_merged: bool = True, keep_x_in: bool = True):
    """(merged, x_in, h): a U-Net skip merged into x (GPT.merge_skip), then the next block's mix_norm.

    merged = lerp(weight ⊙ kept, x, σ(gate)) with skip gates, else x + weight ⊙ kept (gate None); then
    (x_in, h) = mix_norm_reference(merged, x0, mix, scale). x, kept, x0 [..., d], weight and gate [d],
    mix [2, d]. The outputs not kept come back as None (the Triton path does not write them)."""
    weighted = weight * kept
    merged = x + weighted if gate is None else torch.lerp(weighted, x, torch.sigmoid(gate))
    x_in, h = mix_norm_reference(merged, x0, mix, scale, eps)
    return merged if keep_merged else None, x_in if keep_x_in else None, h


def lane_update_reference(lane0: torch.Tensor, lane1: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor,
                          attn_scale: torch.Tensor, mlp_scale: torch.Tensor, resid: torch.Tensor, post: torch.Tensor):
    """R1's two-lane update (MODEL.md §2.8) as Block.forward_parallel evaluates it, left to right:
    lane_k <- resid[k]·lane_k + post[0,k]·A + post[1,k]·M with A = attn_scale ⊙ attn_out, M = mlp_scale ⊙ mlp_out.

    lanes and branches [..., d], scales [d], resid [2], post [2, 2] (source: 0 attention, 1 MLP; lane)."""
    attn = attn_scale * attn_out
    mlp = mlp_scale * mlp_out
    return (resid[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp,
            resid[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp)


# ---------------------------------------------------------------------------------------------------
# The kernels: one forward and one backward, the chain picked by MODE
# ---------------------------------------------------------------------------------------------------
MODE_NORM, MODE_MIX, MODE_ADD = 0, 1, 2
_MODE_NAMES = {MODE_NORM: "rms_norm", MODE_MIX: "mix_norm", MODE_ADD: "add_norm"}


@triton.jit
def _rstd(res, D, eps):
    """1/sqrt(mean(res²) + eps) for each row of a [BLOCK_M, BLOCK_D] tile whose masked columns hold 0."""
    return 1.0 / tl.sqrt(tl.sum(res * res, axis=1) / D + eps)


@triton.jit
def _rms_norm_input_grad(res, rstd, g, D):
    """The gradient reaching res from h = res·rstd·scale (g = dh·scale): rstd·(g − r̂·mean(g·r̂)), r̂ = res·rstd."""
    r_hat = res * rstd[:, None]
    dot = tl.sum(g * r_hat, axis=1) / D
    return rstd[:, None] * (g - r_hat * dot[:, None])


@triton.jit
def _norm_fwd_kernel(x_ptr, other_ptr, vec_ptr, res_ptr, h_ptr, rstd_ptr, M, D, scale, eps,
                     MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M whole rows per program; every tensor is [M, D] row-major, vec is [2, D] (MIX) or [D] (ADD).

    NORM: res = x (not stored).  MIX: res = vec[0]·x + vec[1]·other.  ADD: res = x + vec·other.
    Then h = res · rstd · scale, rstd = 1/sqrt(mean(res²) + eps).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m = rows < M
    mask_d = cols < D
    mask = mask_m[:, None] & mask_d[None, :]
    offs = rows[:, None] * D + cols[None, :]  # 32-bit: M·D < 2^31 is checked on the host
    res = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:
        m0 = tl.load(vec_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        m1 = tl.load(vec_ptr + D + cols, mask=mask_d, other=0.0).to(tl.float32)
        x0 = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        res = m0[None, :] * res + m1[None, :] * x0
    elif MODE == 2:
        gain = tl.load(vec_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        branch = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        res = res + gain[None, :] * branch
    if MODE != 0:
        # Normalize the residual as stored (a no-op for fp32), as the reference normalizes its tensor.
        res = res.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + offs, res, mask=mask)
        res = res.to(tl.float32)
    rstd = _rstd(res, D, eps)
    h = res * rstd[:, None] * scale
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _norm_bwd_kernel(dres_ptr, dh_ptr, x_ptr, other_ptr, vec_ptr, rstd_ptr, dx_ptr, dother_ptr, dvec_ptr,
                     M, D, scale,
                     MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid-stride over blocks of BLOCK_M rows; each program writes its fp32 partial d(vec) rows.

    With r the normalized residual (recomputed for MIX, saved for ADD, x itself for NORM) and
    g = dh·scale, the gradient reaching r is  dr = dres + rstd·(g − r̂·mean(g·r̂)),  r̂ = r·rstd.
    NORM: dx = dr.  MIX: dx = m0·dr, dother = m1·dr, d(m0) += Σ dr·x, d(m1) += Σ dr·x0.
    ADD: dx = dr, dother = gain·dr, d(gain) += Σ dr·branch.  dvec is [programs, 2 or 1, D].
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    acc0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if MODE == 1:
        m0 = tl.load(vec_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        m1 = tl.load(vec_ptr + D + cols, mask=mask_d, other=0.0).to(tl.float32)
    elif MODE == 2:
        gain = tl.load(vec_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            x0 = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            res = (m0[None, :] * x + m1[None, :] * x0).to(dx_ptr.dtype.element_ty).to(tl.float32)
        else:
            res = x  # NORM: the input; ADD: the saved x_new
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)  # 0 on padding rows: they add nothing
        g = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        dr = _rms_norm_input_grad(res, rstd, g, D)
        if MODE != 0:
            dr += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            tl.store(dx_ptr + offs, (m0[None, :] * dr).to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dother_ptr + offs, (m1[None, :] * dr).to(dother_ptr.dtype.element_ty), mask=mask)
            acc0 += tl.sum(dr * x, axis=0)
            acc1 += tl.sum(dr * x0, axis=0)
        elif MODE == 2:
            branch = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dr.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dother_ptr + offs, (gain[None, :] * dr).to(dother_ptr.dtype.element_ty), mask=mask)
            acc0 += tl.sum(dr * branch, axis=0)
        else:
            tl.store(dx_ptr + offs, dr.to(dx_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(dvec_ptr + pid * 2 * D + cols, acc0, mask=mask_d)
        tl.store(dvec_ptr + pid * 2 * D + D + cols, acc1, mask=mask_d)
    elif MODE == 2:
        tl.store(dvec_ptr + pid * D + cols, acc0, mask=mask_d)


# ---------------------------------------------------------------------------------------------------
# The U-Net skip merged into the next block's mix + RMSNorm, and R1's two-lane update
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: the branch on the weight keeps the result exact at either end, as the reference's."""
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _skip_mix_norm_fwd_kernel(x_ptr, kept_ptr, weight_ptr, gate_ptr, x0_ptr, mix_ptr, merged_ptr, x_in_ptr, h_ptr,
                              rstd_ptr, M, D, scale, eps, GATED: tl.constexpr, STORE_MERGED: tl.constexpr,
                              STORE_X_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M whole rows per program; x, kept, x0 and the outputs [M, D] row-major, weight and gate [D], mix [2, D].

    merged = lerp(weight·kept, x, σ(gate)) (GATED) or x + weight·kept;  x_in = mix[0]·merged + mix[1]·x0;
    h = x_in · rstd · scale. merged and x_in are rounded to the stream's dtype before they are used, written
    or not (STORE_*), as the reference computes on the stored tensors.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_m = rows < M
    mask_d = cols < D
    mask = mask_m[:, None] & mask_d[None, :]
    offs = rows[:, None] * D + cols[None, :]  # 32-bit: M·D < 2^31 is checked on the host
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kept = tl.load(kept_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    weighted = weight[None, :] * kept
    if GATED:
        sig = tl.sigmoid(tl.load(gate_ptr + cols, mask=mask_d, other=0.0).to(tl.float32))
        merged = _lerp(weighted, x, sig[None, :])
    else:
        merged = x + weighted
    merged = merged.to(x_ptr.dtype.element_ty)
    if STORE_MERGED:
        tl.store(merged_ptr + offs, merged, mask=mask)
    m0 = tl.load(mix_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    m1 = tl.load(mix_ptr + D + cols, mask=mask_d, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_in = (m0[None, :] * merged.to(tl.float32) + m1[None, :] * x0).to(x_ptr.dtype.element_ty)
    if STORE_X_IN:
        tl.store(x_in_ptr + offs, x_in, mask=mask)
    x_in = x_in.to(tl.float32)
    rstd = _rstd(x_in, D, eps)
    h = x_in * rstd[:, None] * scale
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _skip_mix_norm_bwd_kernel(dmerged_ptr, dx_in_ptr, dh_ptr, x_ptr, kept_ptr, weight_ptr, gate_ptr, x0_ptr, mix_ptr,
                              rstd_ptr, dx_ptr, dkept_ptr, dx0_ptr, dvec_ptr, M, D, dvec_stride, scale,
                              GATED: tl.constexpr, HAS_DMERGED: tl.constexpr, HAS_DX_IN: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid-stride over blocks of BLOCK_M rows; merged and x_in are recomputed from x, kept and x0 (read anyway).

    dr, the gradient reaching x_in, is dx_in (HAS_DX_IN) plus the norm's, as in _norm_bwd_kernel; the gradient
    reaching merged is dm = mix[0]·dr + dmerged (HAS_DMERGED). dx0 = mix[1]·dr; with s = σ(gate), dx = s·dm and
    dkept = weight·(1−s)·dm (GATED), else dx = dm and dkept = weight·dm. Each program writes fp32 partial sums
    to the rows of dvec[pid] (row stride dvec_stride): d(mix[0]) = Σ dr·merged, d(mix[1]) = Σ dr·x0,
    d(weight) = Σ (1−s)·dm·kept (or Σ dm·kept) and, GATED, d(gate) = s(1−s)·Σ dm·(x − weight·kept).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    weight = tl.load(weight_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    m0 = tl.load(mix_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    m1 = tl.load(mix_ptr + D + cols, mask=mask_d, other=0.0).to(tl.float32)
    if GATED:
        sig = tl.sigmoid(tl.load(gate_ptr + cols, mask=mask_d, other=0.0).to(tl.float32))
    acc_m0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_m1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_weight = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        kept = tl.load(kept_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        weighted = weight[None, :] * kept
        if GATED:
            merged = _lerp(weighted, x, sig[None, :])
        else:
            merged = x + weighted
        merged = merged.to(dx_ptr.dtype.element_ty).to(tl.float32)
        x_in = (m0[None, :] * merged + m1[None, :] * x0).to(dx_ptr.dtype.element_ty).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)  # 0 on padding rows: they add nothing
        g = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
        dr = _rms_norm_input_grad(x_in, rstd, g, D)
        if HAS_DX_IN:
            dr += tl.load(dx_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx0_ptr + offs, (m1[None, :] * dr).to(dx0_ptr.dtype.element_ty), mask=mask)
        acc_m0 += tl.sum(dr * merged, axis=0)
        acc_m1 += tl.sum(dr * x0, axis=0)
        dm = m0[None, :] * dr
        if HAS_DMERGED:
            dm += tl.load(dmerged_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            acc_gate += tl.sum(dm * (x - weighted), axis=0)
            tl.store(dx_ptr + offs, (sig[None, :] * dm).to(dx_ptr.dtype.element_ty), mask=mask)
            dweighted = (1.0 - sig)[None, :] * dm
        else:
            tl.store(dx_ptr + offs, dm.to(dx_ptr.dtype.element_ty), mask=mask)
            dweighted = dm
        tl.store(dkept_ptr + offs, (weight[None, :] * dweighted).to(dkept_ptr.dtype.element_ty), mask=mask)
        acc_weight += tl.sum(dweighted * kept, axis=0)
    partials = dvec_ptr + pid * dvec_stride
    tl.store(partials + cols, acc_m0, mask=mask_d)
    tl.store(partials + D + cols, acc_m1, mask=mask_d)
    tl.store(partials + 2 * D + cols, acc_weight, mask=mask_d)
    if GATED:
        tl.store(partials + 3 * D + cols, acc_gate * sig * (1.0 - sig), mask=mask_d)


@triton.jit
def _lane_update_fwd_kernel(lane0_ptr, lane1_ptr, attn_ptr, mlp_ptr, attn_scale_ptr, mlp_scale_ptr, resid_ptr,
                            post_ptr, out0_ptr, out1_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_M whole rows per program; lanes, branches and outputs [M, D] row-major, scales [D], resid [2] and
    post [2, 2] row-major (source, lane). out_k = (resid[k]·lane_k + post[0,k]·A) + post[1,k]·M, the
    reference's order, with A = attn_scale·attn and M = mlp_scale·mlp: fp32 inside, rounded once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < M)[:, None] & mask_d[None, :]
    offs = rows[:, None] * D + cols[None, :]  # 32-bit: M·D < 2^31 is checked on the host
    attn_scale = tl.load(attn_scale_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    mlp_scale = tl.load(mlp_scale_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    attn = attn_scale[None, :] * tl.load(attn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mlp = mlp_scale[None, :] * tl.load(mlp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lane0 = tl.load(lane0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out0 = (tl.load(resid_ptr).to(tl.float32) * lane0 + tl.load(post_ptr).to(tl.float32) * attn
            + tl.load(post_ptr + 2).to(tl.float32) * mlp)
    tl.store(out0_ptr + offs, out0.to(out0_ptr.dtype.element_ty), mask=mask)
    lane1 = tl.load(lane1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out1 = (tl.load(resid_ptr + 1).to(tl.float32) * lane1 + tl.load(post_ptr + 1).to(tl.float32) * attn
            + tl.load(post_ptr + 3).to(tl.float32) * mlp)
    tl.store(out1_ptr + offs, out1.to(out1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lane_update_bwd_kernel(dout0_ptr, dout1_ptr, lane0_ptr, lane1_ptr, attn_ptr, mlp_ptr, attn_scale_ptr,
                            mlp_scale_ptr, resid_ptr, post_ptr, dlane0_ptr, dlane1_ptr, dattn_ptr, dmlp_ptr,
                            dscale_ptr, dscalar_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid-stride over blocks of BLOCK_M rows. With g_k = d(out_k): dlane_k = resid[k]·g_k,
    dA = post[0,0]·g0 + post[0,1]·g1, dM = post[1,0]·g0 + post[1,1]·g1, d(attn) = attn_scale·dA, d(mlp) = mlp_scale·dM.

    Every parameter gradient comes from six column sums over the rows, of attn·g0, attn·g1, mlp·g0, mlp·g1,
    lane0·g0 and lane1·g1: accumulated as whole tiles through the loop and reduced once at the end (no
    reduction across warps per block of rows). Each program writes its fp32 partials: dscale[pid] [2, D] =
    (post[0,0]·S_ag0 + post[0,1]·S_ag1, post[1,0]·S_mg0 + post[1,1]·S_mg1), and dscalar[pid] [6] =
    d(resid) = (ΣS_lg0, ΣS_lg1), then d(post) row-major = (Σattn_scale·S_ag0, Σattn_scale·S_ag1,
    Σmlp_scale·S_mg0, Σmlp_scale·S_mg1).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    attn_scale = tl.load(attn_scale_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    mlp_scale = tl.load(mlp_scale_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    r0 = tl.load(resid_ptr).to(tl.float32)
    r1 = tl.load(resid_ptr + 1).to(tl.float32)
    p00 = tl.load(post_ptr).to(tl.float32)
    p01 = tl.load(post_ptr + 1).to(tl.float32)
    p10 = tl.load(post_ptr + 2).to(tl.float32)
    p11 = tl.load(post_ptr + 3).to(tl.float32)
    acc_ag0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_ag1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_mg0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_mg1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_lg0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_lg1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        g0 = tl.load(dout0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g1 = tl.load(dout1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dlane0_ptr + offs, (r0 * g0).to(dlane0_ptr.dtype.element_ty), mask=mask)
        tl.store(dlane1_ptr + offs, (r1 * g1).to(dlane1_ptr.dtype.element_ty), mask=mask)
        d_attn = p00 * g0 + p01 * g1
        d_mlp = p10 * g0 + p11 * g1
        tl.store(dattn_ptr + offs, (attn_scale[None, :] * d_attn).to(dattn_ptr.dtype.element_ty), mask=mask)
        tl.store(dmlp_ptr + offs, (mlp_scale[None, :] * d_mlp).to(dmlp_ptr.dtype.element_ty), mask=mask)
        attn = tl.load(attn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mlp = tl.load(mlp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_ag0 += attn * g0
        acc_ag1 += attn * g1
        acc_mg0 += mlp * g0
        acc_mg1 += mlp * g1
        acc_lg0 += tl.load(lane0_ptr + offs, mask=mask, other=0.0).to(tl.float32) * g0
        acc_lg1 += tl.load(lane1_ptr + offs, mask=mask, other=0.0).to(tl.float32) * g1
    s_ag0 = tl.sum(acc_ag0, axis=0)
    s_ag1 = tl.sum(acc_ag1, axis=0)
    s_mg0 = tl.sum(acc_mg0, axis=0)
    s_mg1 = tl.sum(acc_mg1, axis=0)
    tl.store(dscale_ptr + pid * 2 * D + cols, p00 * s_ag0 + p01 * s_ag1, mask=mask_d)
    tl.store(dscale_ptr + pid * 2 * D + D + cols, p10 * s_mg0 + p11 * s_mg1, mask=mask_d)
    scalars = dscalar_ptr + pid * 6
    tl.store(scalars, tl.sum(tl.sum(acc_lg0, axis=0), axis=0))
    tl.store(scalars + 1, tl.sum(tl.sum(acc_lg1, axis=0), axis=0))
    tl.store(scalars + 2, tl.sum(attn_scale * s_ag0, axis=0))
    tl.store(scalars + 3, tl.sum(attn_scale * s_ag1, axis=0))
    tl.store(scalars + 4, tl.sum(mlp_scale * s_mg0, axis=0))
    tl.store(scalars + 5, tl.sum(mlp_scale * s_mg1, axis=0))


# ---------------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------------
MAX_D = 4096            # one program holds whole rows: wider rows would spill registers
_GPU_TILE_ELEMENTS = 2048  # rows per program x BLOCK_D (4 rows at d = 512)
_INTERPRETER_TILE_ELEMENTS = 8192  # ~2-3 ms per program under the interpreter: few, big programs
# Grid-stride backward: many more programs than fit on the GPU at once, so the last wave is a small
# tail; the cost is one fp32 partial row of d(mix)/d(gain) per program (16·132 programs x 2 x 512 x
# 4 B = 8.6 MB at d = 512, under 1% of the backward's 1.1 GB).
_BWD_PROGRAMS_PER_SM = 16
_INTERPRETER_BWD_PROGRAMS = 3


def _tile(block_d: int, backward: bool = False, interpret: bool = INTERPRET) -> dict:
    """BLOCK_M and num_warps for whole rows of BLOCK_D (a power of two).

    Not tuned on a GPU yet (none was available): the forward keeps ~16 fp32 values per thread per live
    tile at 4 warps (32-64 registers compiled for sm_90); the backward holds about twice as many live
    tiles, so it spreads the same tile over 8 warps to stay near 100 registers and keep occupancy up.
    """
    elements = _INTERPRETER_TILE_ELEMENTS if interpret else _GPU_TILE_ELEMENTS
    warps = 4 if block_d <= 1024 else 8
    if backward and block_d * max(1, elements // block_d) >= 2048:
        warps = 8
    return {"BLOCK_M": max(1, elements // block_d), "num_warps": warps}


def _bwd_programs(M: int, block_m: int, device: torch.device) -> int:
    blocks = triton.cdiv(M, block_m)
    if device.type != "cuda":
        return max(1, min(blocks, _INTERPRETER_BWD_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, _BWD_PROGRAMS_PER_SM * sms))


# ---------------------------------------------------------------------------------------------------
# Host checks and launchers
# ---------------------------------------------------------------------------------------------------
_RESIDUAL_DTYPES = (torch.float32, torch.bfloat16)
_INT32_LIMIT = 2 ** 31


def _check_inputs(where: str, x=None, x0=None, mix=None, branch=None, gain=None, h_dtype=None, kept=None,
                  weight=None, gate=None, keep_merged=True, keep_x_in=True, lane0=None, lane1=None, attn_out=None,
                  mlp_out=None, attn_scale=None, mlp_scale=None, resid=None, post=None):
    """Raise ValueError naming the argument, its shape and dtype for anything the kernels do not support.

    The stream tensor x [..., d] (lane0 for lane_update) with x0 and mix [2, d] (mix_norm), with branch and
    gain [d] (add_norm), alone (rms_norm), with kept, weight, gate [d] (or None), x0 and mix (skip_mix_norm);
    or lane0, lane1, attn_out, mlp_out [..., d], attn_scale, mlp_scale [d], resid [2] and post [2, 2]."""
    lead_name, lead = ("x", x) if x is not None else ("lane0", lane0)
    if lead.dim() < 1 or lead.shape[-1] == 0:
        raise ValueError(f"{where}: {lead_name} must be [..., d] with d >= 1, got shape {tuple(lead.shape)}")
    d = lead.shape[-1]
    if d > MAX_D:
        raise ValueError(f"{where}: {lead_name} {tuple(lead.shape)} has d={d} > {MAX_D}: one program holds a whole "
                         f"row, wider rows would spill registers")
    if lead.dtype not in _RESIDUAL_DTYPES:
        raise ValueError(f"{where}: {lead_name} is {lead.dtype}; the residual stream must be float32 or bfloat16")
    if lead.numel() >= _INT32_LIMIT:
        raise ValueError(f"{where}: {lead_name} {tuple(lead.shape)} has 2^31 elements or more, beyond the kernel's "
                         f"32-bit offsets: split the batch")
    named = {lead_name: lead}
    # x0, kept and lane1 are residual stream too; a branch may also be a bf16 matmul output (autocast)
    stream, matmul_out = (lead.dtype,), (lead.dtype, torch.bfloat16)
    for name, other, allowed in (("x0", x0, stream), ("kept", kept, stream), ("lane1", lane1, stream),
                                 ("branch", branch, matmul_out), ("attn_out", attn_out, matmul_out),
                                 ("mlp_out", mlp_out, matmul_out)):
        if other is None:
            continue
        named[name] = other
        if other.shape != lead.shape:
            raise ValueError(f"{where}: {name} {tuple(other.shape)} must have {lead_name}'s shape {tuple(lead.shape)}")
        if other.dtype not in allowed:
            raise ValueError(f"{where}: {name} is {other.dtype}, {lead_name} is {lead.dtype}; {name} must be "
                             + " or ".join(str(t) for t in allowed))
    if attn_out is not None and mlp_out.dtype != attn_out.dtype:
        raise ValueError(f"{where}: attn_out is {attn_out.dtype} but mlp_out is {mlp_out.dtype}: the two branches "
                         f"must share one dtype")
    for name, vec, shape in (("mix", mix, (2, d)), ("gain", gain, (d,)), ("weight", weight, (d,)),
                             ("gate", gate, (d,)), ("attn_scale", attn_scale, (d,)), ("mlp_scale", mlp_scale, (d,)),
                             ("resid", resid, (2,)), ("post", post, (2, 2))):
        if vec is None:
            continue
        named[name] = vec
        if tuple(vec.shape) != shape:
            raise ValueError(f"{where}: {name} {tuple(vec.shape)} must be {shape} for {lead_name} {tuple(lead.shape)}")
        if vec.dtype != lead.dtype:
            raise ValueError(f"{where}: {name} is {vec.dtype} but {lead_name} is {lead.dtype}: the parameters and the "
                             f"residual stream must share one dtype (the stream keeps the promoted dtype otherwise)")
    if h_dtype is not None and h_dtype not in (lead.dtype, torch.bfloat16):
        raise ValueError(f"{where}: h_dtype={h_dtype} must be {lead_name}'s dtype ({lead.dtype}) or torch.bfloat16")
    if not (keep_merged or keep_x_in):
        raise ValueError(f"{where}: keep_merged and keep_x_in are both False: keep the residual the slot goes on "
                         f"with (x_in for a sequential block, merged for a two-lane one)")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: every tensor must be on one device, got {devices}")


def norm_forward(mode: int, x: torch.Tensor, other: torch.Tensor | None, vec: torch.Tensor | None, scale: float,
                 h_dtype: torch.dtype):
    """Launch the forward on 2-D [M, d] tensors: (res [M, d] or None for NORM, h [M, d] h_dtype, rstd [M] fp32).

    Contiguous inputs, as the entries validated them (the launchers do not check again)."""
    M, D = x.shape
    other = x if other is None else other
    vec = x if vec is None else vec
    res = torch.empty_like(x) if mode != MODE_NORM else None
    h = torch.empty((M, D), device=x.device, dtype=h_dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return res, h, rstd
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d)
    _norm_fwd_kernel[(triton.cdiv(M, tile["BLOCK_M"]),)](
        x, other, vec, x if res is None else res, h, rstd, M, D, float(scale), torch.finfo(x.dtype).eps,
        MODE=mode, BLOCK_M=tile["BLOCK_M"], BLOCK_D=block_d, num_warps=tile["num_warps"])
    return res, h, rstd


def norm_backward(mode: int, dres: torch.Tensor | None, dh: torch.Tensor, x: torch.Tensor,
                  other: torch.Tensor | None, vec: torch.Tensor | None, rstd: torch.Tensor, scale: float):
    """Launch the backward on 2-D tensors: (dx, d(other) or None, d(vec) or None).

    x is the forward's x (NORM, MIX) or its output x_new (ADD); other is x0 (MIX) or branch (ADD): the
    forward's contiguous tensors, and rstd its output. dres and dh come from autograd, in any layout.
    """
    M, D = x.shape
    dh = dh.contiguous()
    other_t = x if other is None else other
    vec_t = x if vec is None else vec
    dres = dh if dres is None else dres.contiguous()
    dx = torch.empty_like(x)
    dother = torch.empty_like(other_t) if other is not None else None
    n_vec = {MODE_NORM: 0, MODE_MIX: 2, MODE_ADD: 1}[mode]
    if M == 0:
        dvec = None if vec is None else torch.zeros_like(vec)
        return dx, dother, dvec
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d, backward=True)
    programs = _bwd_programs(M, tile["BLOCK_M"], x.device)
    partials = torch.empty((programs, max(n_vec, 1), D), device=x.device, dtype=torch.float32)
    _norm_bwd_kernel[(programs,)](
        dres, dh, x, other_t, vec_t, rstd, dx, dx if dother is None else dother, partials, M, D, float(scale),
        MODE=mode, BLOCK_M=tile["BLOCK_M"], BLOCK_D=block_d, num_warps=tile["num_warps"])
    dvec = None if vec is None else partials.sum(0).reshape(vec.shape).to(vec.dtype)
    return dx, dother, dvec


def skip_mix_norm_forward(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                          x0: torch.Tensor, mix: torch.Tensor, scale: float, h_dtype: torch.dtype, keep_merged: bool,
                          keep_x_in: bool):
    """Launch the skip merge + mix + norm on 2-D [M, d] tensors: (merged, x_in, h, rstd [M] fp32), with an
    empty [0] tensor for an output not kept. Contiguous inputs, as the entry validated them."""
    M, D = x.shape
    merged = torch.empty_like(x) if keep_merged else x.new_empty(0)
    x_in = torch.empty_like(x) if keep_x_in else x.new_empty(0)
    h = torch.empty((M, D), device=x.device, dtype=h_dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return merged, x_in, h, rstd
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d)
    _skip_mix_norm_fwd_kernel[(triton.cdiv(M, tile["BLOCK_M"]),)](
        x, kept, weight, weight if gate is None else gate, x0, mix, merged if keep_merged else x,
        x_in if keep_x_in else x, h, rstd, M, D, float(scale), torch.finfo(x.dtype).eps,
        GATED=gate is not None, STORE_MERGED=keep_merged, STORE_X_IN=keep_x_in, BLOCK_M=tile["BLOCK_M"],
        BLOCK_D=block_d, num_warps=tile["num_warps"])
    return merged, x_in, h, rstd


def skip_mix_norm_backward(dmerged: torch.Tensor | None, dx_in: torch.Tensor | None, dh: torch.Tensor,
                           x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                           x0: torch.Tensor, mix: torch.Tensor, rstd: torch.Tensor, scale: float):
    """Launch the backward on 2-D tensors: (dx, dkept, dweight, dgate or None, dx0, dmix).

    dmerged / dx_in None: that output was not written (nothing flows back through it). x, kept, x0 and the
    parameters are the forward's contiguous inputs, rstd its output; the upstream gradients come in any layout."""
    M, D = x.shape
    dh = dh.contiguous()
    dmerged = None if dmerged is None else dmerged.contiguous()
    dx_in = None if dx_in is None else dx_in.contiguous()
    dx, dkept, dx0 = torch.empty_like(x), torch.empty_like(kept), torch.empty_like(x0)
    if M == 0:
        dgate = None if gate is None else torch.zeros_like(gate)
        return dx, dkept, torch.zeros_like(weight), dgate, dx0, torch.zeros_like(mix)
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d, backward=True)
    programs = _bwd_programs(M, tile["BLOCK_M"], x.device)
    # rows per program: d(mix[0]), d(mix[1]), d(weight), and d(gate) when gated
    partials = torch.empty((programs, 3 if gate is None else 4, D), device=x.device, dtype=torch.float32)
    _skip_mix_norm_bwd_kernel[(programs,)](
        x if dmerged is None else dmerged, x if dx_in is None else dx_in, dh, x, kept, weight,
        weight if gate is None else gate, x0, mix, rstd, dx, dkept, dx0, partials, M, D, partials.stride(0),
        float(scale), GATED=gate is not None, HAS_DMERGED=dmerged is not None, HAS_DX_IN=dx_in is not None,
        BLOCK_M=tile["BLOCK_M"], BLOCK_D=block_d, num_warps=tile["num_warps"])
    dmix = partials[:, :2].sum(0).to(mix.dtype)
    dweight = partials[:, 2].sum(0).to(weight.dtype)
    dgate = None if gate is None else partials[:, 3].sum(0).to(gate.dtype)
    return dx, dkept, dweight, dgate, dx0, dmix


def lane_update_forward(lane0: torch.Tensor, lane1: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor,
                        attn_scale: torch.Tensor, mlp_scale: torch.Tensor, resid: torch.Tensor, post: torch.Tensor):
    """Launch the two-lane update on 2-D [M, d] tensors: (new lane0, new lane1). Contiguous inputs."""
    M, D = lane0.shape
    out0, out1 = torch.empty_like(lane0), torch.empty_like(lane1)
    if M == 0:
        return out0, out1
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d)
    _lane_update_fwd_kernel[(triton.cdiv(M, tile["BLOCK_M"]),)](
        lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post, out0, out1, M, D,
        BLOCK_M=tile["BLOCK_M"], BLOCK_D=block_d, num_warps=tile["num_warps"])
    return out0, out1


def lane_update_backward(dout0: torch.Tensor, dout1: torch.Tensor, lane0: torch.Tensor, lane1: torch.Tensor,
                         attn_out: torch.Tensor, mlp_out: torch.Tensor, attn_scale: torch.Tensor,
                         mlp_scale: torch.Tensor, resid: torch.Tensor, post: torch.Tensor):
    """Launch the backward on 2-D tensors: (dlane0, dlane1, dattn_out, dmlp_out, dattn_scale, dmlp_scale, dresid,
    dpost). The upstream gradients come in any layout; the rest are the forward's contiguous inputs."""
    M, D = lane0.shape
    dout0, dout1 = dout0.contiguous(), dout1.contiguous()
    dlane0, dlane1 = torch.empty_like(lane0), torch.empty_like(lane1)
    dattn, dmlp = torch.empty_like(attn_out), torch.empty_like(mlp_out)
    if M == 0:
        return dlane0, dlane1, dattn, dmlp, *(torch.zeros_like(p) for p in (attn_scale, mlp_scale, resid, post))
    block_d = triton.next_power_of_2(D)
    tile = _tile(block_d, backward=True)
    programs = _bwd_programs(M, tile["BLOCK_M"], lane0.device)
    scale_partials = torch.empty((programs, 2, D), device=lane0.device, dtype=torch.float32)
    scalar_partials = torch.empty((programs, 6), device=lane0.device, dtype=torch.float32)
    _lane_update_bwd_kernel[(programs,)](
        dout0, dout1, lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post, dlane0, dlane1, dattn,
        dmlp, scale_partials, scalar_partials, M, D, BLOCK_M=tile["BLOCK_M"], BLOCK_D=block_d,
        num_warps=tile["num_warps"])
    return (dlane0, dlane1, dattn, dmlp, scale_partials[:, 0].sum(0).to(attn_scale.dtype),
            scale_partials[:, 1].sum(0).to(mlp_scale.dtype), scalar_partials[:, :2].sum(0).to(resid.dtype),
            scalar_partials[:, 2:].sum(0).view(2, 2).to(post.dtype))


# ---------------------------------------------------------------------------------------------------
# The autograd ops: custom ops with fakes, so torch.compile(fullgraph=True) traces each as one node
# ---------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _empty_rows(x, dtype=None):
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


@torch.library.custom_op("ouroboros::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, scale: float, h_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, rstd = norm_forward(MODE_NORM, _rows(x), None, None, scale, h_dtype)
    return h.view(x.shape), rstd


@_rms_norm_op.register_fake
def _(x, scale, h_dtype):
    return _empty_rows(x, h_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("ouroboros::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dh: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, scale: float) -> torch.Tensor:
    dx, _, _ = norm_backward(MODE_NORM, None, _rows(dh), _rows(x), None, None, rstd, scale)
    return dx.view(x.shape)


@_rms_norm_backward_op.register_fake
def _(dh, x, rstd, scale):
    return _empty_rows(x)


def _rms_norm_setup(ctx, inputs, output):
    x, scale, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, rstd)
    ctx.scale = scale


def _rms_norm_grad(ctx, dh, _drstd):
    x, rstd = ctx.saved_tensors
    return torch.ops.ouroboros.rms_norm_backward(dh, x, rstd, ctx.scale), None, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


@torch.library.custom_op("ouroboros::mix_norm", mutates_args=())
def _mix_norm_op(x: torch.Tensor, x0: torch.Tensor, mix: torch.Tensor, scale: float,
                 h_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_in, h, rstd = norm_forward(MODE_MIX, _rows(x), _rows(x0), mix, scale, h_dtype)
    return x_in.view(x.shape), h.view(x.shape), rstd


@_mix_norm_op.register_fake
def _(x, x0, mix, scale, h_dtype):
    return _empty_rows(x), _empty_rows(x, h_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("ouroboros::mix_norm_backward", mutates_args=())
def _mix_norm_backward_op(dx_in: torch.Tensor, dh: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
                          mix: torch.Tensor, rstd: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dx0, dmix = norm_backward(MODE_MIX, _rows(dx_in), _rows(dh), _rows(x), _rows(x0), mix, rstd, scale)
    return dx.view(x.shape), dx0.view(x.shape), dmix


@_mix_norm_backward_op.register_fake
def _(dx_in, dh, x, x0, mix, rstd, scale):
    return _empty_rows(x), _empty_rows(x0), torch.empty_like(mix, memory_format=torch.contiguous_format)


def _mix_norm_setup(ctx, inputs, output):
    x, x0, mix, scale, _ = inputs
    _, _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, x0, mix, rstd)  # x_in is recomputed: dmix needs x and x0 read anyway
    ctx.scale = scale


def _mix_norm_grad(ctx, dx_in, dh, _drstd):
    x, x0, mix, rstd = ctx.saved_tensors
    dx, dx0, dmix = torch.ops.ouroboros.mix_norm_backward(dx_in, dh, x, x0, mix, rstd, ctx.scale)
    return dx, dx0, dmix, None, None


_mix_norm_op.register_autograd(_mix_norm_grad, setup_context=_mix_norm_setup)


@torch.library.custom_op("ouroboros::add_norm", mutates_args=())
def _add_norm_op(x: torch.Tensor, branch: torch.Tensor, gain: torch.Tensor, scale: float,
                 h_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_new, h, rstd = norm_forward(MODE_ADD, _rows(x), _rows(branch), gain, scale, h_dtype)
    return x_new.view(x.shape), h.view(x.shape), rstd


@_add_norm_op.register_fake
def _(x, branch, gain, scale, h_dtype):
    return _empty_rows(x), _empty_rows(x, h_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("ouroboros::add_norm_backward", mutates_args=())
def _add_norm_backward_op(dx_new: torch.Tensor, dh: torch.Tensor, x_new: torch.Tensor, branch: torch.Tensor,
                          gain: torch.Tensor, rstd: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dbranch, dgain = norm_backward(MODE_ADD, _rows(dx_new), _rows(dh), _rows(x_new), _rows(branch), gain,
                                       rstd, scale)
    return dx.view(x_new.shape), dbranch.view(branch.shape), dgain


@_add_norm_backward_op.register_fake
def _(dx_new, dh, x_new, branch, gain, rstd, scale):
    return _empty_rows(x_new), _empty_rows(branch), torch.empty_like(gain, memory_format=torch.contiguous_format)


def _add_norm_setup(ctx, inputs, output):
    _, branch, gain, scale, _ = inputs
    x_new, _, rstd = output
    ctx.mark_non_differentiable(rstd)
    # x_new rather than x: the normalized tensor itself, and it stays alive as the residual stream anyway.
    ctx.save_for_backward(x_new, branch, gain, rstd)
    ctx.scale = scale


def _add_norm_grad(ctx, dx_new, dh, _drstd):
    x_new, branch, gain, rstd = ctx.saved_tensors
    dx, dbranch, dgain = torch.ops.ouroboros.add_norm_backward(dx_new, dh, x_new, branch, gain, rstd, ctx.scale)
    return dx, dbranch, dgain, None, None


_add_norm_op.register_autograd(_add_norm_grad, setup_context=_add_norm_setup)


@torch.library.custom_op("ouroboros::skip_mix_norm", mutates_args=())
def _skip_mix_norm_op(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor],
                      x0: torch.Tensor, mix: torch.Tensor, scale: float, h_dtype: torch.dtype, keep_merged: bool,
                      keep_x_in: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    merged, x_in, h, rstd = skip_mix_norm_forward(_rows(x), _rows(kept), weight, gate, _rows(x0), mix, scale, h_dtype,
                                                  keep_merged, keep_x_in)
    return (merged.view(x.shape) if keep_merged else merged, x_in.view(x.shape) if keep_x_in else x_in,
            h.view(x.shape), rstd)


@_skip_mix_norm_op.register_fake
def _(x, kept, weight, gate, x0, mix, scale, h_dtype, keep_merged, keep_x_in):
    return (_empty_rows(x) if keep_merged else x.new_empty(0), _empty_rows(x) if keep_x_in else x.new_empty(0),
            _empty_rows(x, h_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


@torch.library.custom_op("ouroboros::skip_mix_norm_backward", mutates_args=())
def _skip_mix_norm_backward_op(dmerged: torch.Tensor, dx_in: torch.Tensor, dh: torch.Tensor, x: torch.Tensor,
                               kept: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor],
                               x0: torch.Tensor, mix: torch.Tensor, rstd: torch.Tensor, scale: float,
                               keep_merged: bool, keep_x_in: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """dgate is an empty [0] tensor without a gate (an op returns tensors, not None)."""
    dx, dkept, dweight, dgate, dx0, dmix = skip_mix_norm_backward(
        _rows(dmerged) if keep_merged else None, _rows(dx_in) if keep_x_in else None, _rows(dh), _rows(x),
        _rows(kept), weight, gate, _rows(x0), mix, rstd, scale)
    return (dx.view(x.shape), dkept.view(kept.shape), dweight, weight.new_empty(0) if dgate is None else dgate,
            dx0.view(x0.shape), dmix)


@_skip_mix_norm_backward_op.register_fake
def _(dmerged, dx_in, dh, x, kept, weight, gate, x0, mix, rstd, scale, keep_merged, keep_x_in):
    contiguous = torch.contiguous_format
    return (_empty_rows(x), _empty_rows(kept), torch.empty_like(weight, memory_format=contiguous),
            weight.new_empty(0) if gate is None else torch.empty_like(gate, memory_format=contiguous),
            _empty_rows(x0), torch.empty_like(mix, memory_format=contiguous))


def _skip_mix_norm_setup(ctx, inputs, output):
    x, kept, weight, gate, x0, mix, scale, _, keep_merged, keep_x_in = inputs
    *_, rstd = output
    ctx.mark_non_differentiable(rstd)
    # merged and x_in are recomputed: the gradients of weight and gate need x and kept read anyway
    ctx.save_for_backward(x, kept, weight, gate, x0, mix, rstd)
    ctx.scale, ctx.keep_merged, ctx.keep_x_in = scale, keep_merged, keep_x_in


def _skip_mix_norm_grad(ctx, dmerged, dx_in, dh, _drstd):
    x, kept, weight, gate, x0, mix, rstd = ctx.saved_tensors
    dx, dkept, dweight, dgate, dx0, dmix = torch.ops.ouroboros.skip_mix_norm_backward(
        dmerged, dx_in, dh, x, kept, weight, gate, x0, mix, rstd, ctx.scale, ctx.keep_merged, ctx.keep_x_in)
    return dx, dkept, dweight, None if gate is None else dgate, dx0, dmix, None, None, None, None


_skip_mix_norm_op.register_autograd(_skip_mix_norm_grad, setup_context=_skip_mix_norm_setup)


@torch.library.custom_op("ouroboros::lane_update", mutates_args=())
def _lane_update_op(lane0: torch.Tensor, lane1: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor,
                    attn_scale: torch.Tensor, mlp_scale: torch.Tensor, resid: torch.Tensor,
                    post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out0, out1 = lane_update_forward(_rows(lane0), _rows(lane1), _rows(attn_out), _rows(mlp_out), attn_scale,
                                     mlp_scale, resid, post)
    return out0.view(lane0.shape), out1.view(lane1.shape)


@_lane_update_op.register_fake
def _(lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post):
    return _empty_rows(lane0), _empty_rows(lane1)


@torch.library.custom_op("ouroboros::lane_update_backward", mutates_args=())
def _lane_update_backward_op(dout0: torch.Tensor, dout1: torch.Tensor, lane0: torch.Tensor, lane1: torch.Tensor,
                             attn_out: torch.Tensor, mlp_out: torch.Tensor, attn_scale: torch.Tensor,
                             mlp_scale: torch.Tensor, resid: torch.Tensor, post: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dlane0, dlane1, dattn, dmlp, *dparams = lane_update_backward(
        _rows(dout0), _rows(dout1), _rows(lane0), _rows(lane1), _rows(attn_out), _rows(mlp_out), attn_scale,
        mlp_scale, resid, post)
    return (dlane0.view(lane0.shape), dlane1.view(lane1.shape), dattn.view(attn_out.shape),
            dmlp.view(mlp_out.shape), *dparams)


@_lane_update_backward_op.register_fake
def _(dout0, dout1, lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post):
    return (_empty_rows(lane0), _empty_rows(lane1), _empty_rows(attn_out), _empty_rows(mlp_out),
            *(torch.empty_like(p, memory_format=torch.contiguous_format) for p in (attn_scale, mlp_scale, resid, post)))


def _lane_update_setup(ctx, inputs, output):
    # every input: the lanes and branches for the parameter gradients, the parameters for the others
    ctx.save_for_backward(*inputs)


def _lane_update_grad(ctx, dout0, dout1):
    return torch.ops.ouroboros.lane_update_backward(dout0, dout1, *ctx.saved_tensors)


_lane_update_op.register_autograd(_lane_update_grad, setup_context=_lane_update_setup)


# ---------------------------------------------------------------------------------------------------
# Public entries (kernels/__init__.py dispatches to these)
# ---------------------------------------------------------------------------------------------------
# No input is cast under autocast (the residual stream stays fp32); h comes out in the autocast dtype,
# which the matmul after it would cast it to anyway: the policy passes that dtype as h_dtype.
@input_policy("rms_norm", _check_inputs, contiguous=("x",), autocast_output="h_dtype")
def rms_norm_triton(x: torch.Tensor, scale: float = 1.0, *, h_dtype: torch.dtype) -> torch.Tensor:
    """h = rms_norm(x) · scale, fused; x [..., d] -> h [..., d] (in the autocast dtype under autocast)."""
    return torch.ops.ouroboros.rms_norm(x, float(scale), h_dtype)[0]


@input_policy("mix_norm", _check_inputs, contiguous=("x", "x0", "mix"), autocast_output="h_dtype")
def mix_norm_triton(x: torch.Tensor, x0: torch.Tensor, mix: torch.Tensor, scale: float, *, h_dtype: torch.dtype):
    """(x_in, h) = (mix[0] ⊙ x + mix[1] ⊙ x0, rms_norm(x_in) · scale) in one pass; x, x0 [..., d], mix [2, d]."""
    x_in, h, _ = torch.ops.ouroboros.mix_norm(x, x0, mix, float(scale), h_dtype)
    return x_in, h


@input_policy("add_norm", _check_inputs, contiguous=("x", "branch", "gain"), autocast_output="h_dtype")
def add_norm_triton(x: torch.Tensor, branch: torch.Tensor, gain: torch.Tensor, scale: float, *,
                    h_dtype: torch.dtype):
    """(x_new, h) = (x + gain ⊙ branch, rms_norm(x_new) · scale) in one pass; x, branch [..., d], gain [d]."""
    x_new, h, _ = torch.ops.ouroboros.add_norm(x, branch, gain, float(scale), h_dtype)
    return x_new, h


@input_policy("skip_mix_norm", _check_inputs, contiguous=("x", "kept", "weight", "gate", "x0", "mix"),
              autocast_output="h_dtype")
def skip_mix_norm_triton(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                         x0: torch.Tensor, mix: torch.Tensor, scale: float, *, h_dtype: torch.dtype,
                         keep_merged: bool = True, keep_x_in: bool = True):
    """(merged, x_in, h) = (the skip merge, mix[0] ⊙ merged + mix[1] ⊙ x0, rms_norm(x_in) · scale) in one pass;
    merged = lerp(weight ⊙ kept, x, σ(gate)), or x + weight ⊙ kept with gate None. An output not kept is not
    written and comes back as None: a sequential block needs (x_in, h), a two-lane block (merged, h)."""
    merged, x_in, h, _ = torch.ops.ouroboros.skip_mix_norm(x, kept, weight, gate, x0, mix, float(scale), h_dtype,
                                                           keep_merged, keep_x_in)
    return merged if keep_merged else None, x_in if keep_x_in else None, h


@input_policy("lane_update", _check_inputs,
              contiguous=("lane0", "lane1", "attn_out", "mlp_out", "attn_scale", "mlp_scale", "resid", "post"))
def lane_update_triton(lane0: torch.Tensor, lane1: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor,
                       attn_scale: torch.Tensor, mlp_scale: torch.Tensor, resid: torch.Tensor, post: torch.Tensor):
    """(new lane0, new lane1) of R1's two-lane block in one pass: lane_k <- resid[k]·lane_k + post[0,k]·A +
    post[1,k]·M, A = attn_scale ⊙ attn_out, M = mlp_scale ⊙ mlp_out; the outputs in the lanes' dtype."""
    out0, out1 = torch.ops.ouroboros.lane_update(lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post)
    return out0, out1


# ---------------------------------------------------------------------------------------------------
# sm_90 compile check
# ---------------------------------------------------------------------------------------------------
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (residual dtype, branch dtype, h dtype) the launchers accept: fp32 stream with fp32 or bf16 (autocast)
# branch and h, or everything in bf16. MIX and NORM have no branch (other = x0 / unused: the residual dtype).
_VARIANTS = [(torch.float32, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
             (torch.float32, torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.bfloat16, torch.bfloat16)]
# What skip_mix_norm writes besides h (STORE_MERGED, STORE_X_IN): both, x_in alone (a sequential slot) or merged
# alone (a two-lane slot); its backward reads the gradients of the same ones (HAS_DMERGED, HAS_DX_IN).
_SKIP_KEEPS = {"both": (True, True), "x_in": (False, True), "merged": (True, False)}
# (lane dtype, branch dtype) of lane_update: fp32 lanes with fp32 or bf16 (autocast) branches, or all bf16.
_LANE_VARIANTS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
SM90_D = 512  # the training width; BLOCK_D = next_power_of_2(d) is a constexpr, so other widths compile anew


def sm90_configs() -> list[dict]:
    """Every (kernel x mode x dtype variant x constexpr switch) at d = 512, for bench/sm90.py. No tensor cores:
    "hgmma" is False."""
    block_d = SM90_D
    tiles = {"fwd": _tile(block_d, interpret=False), "bwd": _tile(block_d, backward=True, interpret=False)}

    def config(name, kernel, direction, signature, **constexprs):
        tile = tiles[direction]
        return {"name": name, "kernel": kernel, "num_warps": tile["num_warps"], "num_stages": 1, "hgmma": False,
                "constexprs": {**constexprs, "BLOCK_M": tile["BLOCK_M"], "BLOCK_D": block_d},
                "divisible_by_16": [n for n in ("D", "dvec_stride") if n in signature], "signature": signature}

    out = []
    no_branch = [(r, h) for r, b, h in _VARIANTS if b == r]  # MIX, NORM and skip_mix_norm: the stream dtype
    for mode, name in _MODE_NAMES.items():
        for res_t, other_t, h_t in _VARIANTS if mode == MODE_ADD else [(r, r, h) for r, h in no_branch]:
            r, o, hh = _TY[res_t], _TY[other_t], _TY[h_t]
            suffix = f"{r}" + (f"_branch_{o}" if mode == MODE_ADD else "") + f"_h_{hh}"
            out.append(config(f"norm_fwd_{name}_{suffix}", _norm_fwd_kernel, "fwd",
                              {"x_ptr": f"*{r}", "other_ptr": f"*{o}", "vec_ptr": f"*{r}", "res_ptr": f"*{r}",
                               "h_ptr": f"*{hh}", "rstd_ptr": "*fp32", "M": "i32", "D": "i32", "scale": "fp32",
                               "eps": "fp32"}, MODE=mode))
            out.append(config(f"norm_bwd_{name}_{suffix}", _norm_bwd_kernel, "bwd",
                              {"dres_ptr": f"*{r}" if mode != MODE_NORM else f"*{hh}", "dh_ptr": f"*{hh}",
                               "x_ptr": f"*{r}", "other_ptr": f"*{o}", "vec_ptr": f"*{r}", "rstd_ptr": "*fp32",
                               "dx_ptr": f"*{r}", "dother_ptr": f"*{o}", "dvec_ptr": "*fp32", "M": "i32", "D": "i32",
                               "scale": "fp32"}, MODE=mode))
    # skip_mix_norm: every stream tensor and parameter in the stream dtype (the launchers pass x for an output or
    # gradient they do not use, and weight for a missing gate)
    for res_t, h_t in no_branch:
        r, hh = _TY[res_t], _TY[h_t]
        stream = {name: f"*{r}" for name in ("x_ptr", "kept_ptr", "weight_ptr", "gate_ptr", "x0_ptr", "mix_ptr")}
        for gated in (True, False):
            for keep, (keep_merged, keep_x_in) in _SKIP_KEEPS.items():
                suffix = f"{'lerp' if gated else 'add'}_keep_{keep}_{r}_h_{hh}"
                out.append(config(f"skip_mix_norm_fwd_{suffix}", _skip_mix_norm_fwd_kernel, "fwd",
                                  {**stream, "merged_ptr": f"*{r}", "x_in_ptr": f"*{r}", "h_ptr": f"*{hh}",
                                   "rstd_ptr": "*fp32", "M": "i32", "D": "i32", "scale": "fp32", "eps": "fp32"},
                                  GATED=gated, STORE_MERGED=keep_merged, STORE_X_IN=keep_x_in))
                out.append(config(f"skip_mix_norm_bwd_{suffix}", _skip_mix_norm_bwd_kernel, "bwd",
                                  {"dmerged_ptr": f"*{r}", "dx_in_ptr": f"*{r}", "dh_ptr": f"*{hh}", **stream,
                                   "rstd_ptr": "*fp32", "dx_ptr": f"*{r}", "dkept_ptr": f"*{r}", "dx0_ptr": f"*{r}",
                                   "dvec_ptr": "*fp32", "M": "i32", "D": "i32", "dvec_stride": "i32", "scale": "fp32"},
                                  GATED=gated, HAS_DMERGED=keep_merged, HAS_DX_IN=keep_x_in))
    for lane_t, branch_t in _LANE_VARIANTS:
        r, b = _TY[lane_t], _TY[branch_t]
        params = {name: f"*{r}" for name in ("attn_scale_ptr", "mlp_scale_ptr", "resid_ptr", "post_ptr")}
        out.append(config(f"lane_update_fwd_{r}_branch_{b}", _lane_update_fwd_kernel, "fwd",
                          {"lane0_ptr": f"*{r}", "lane1_ptr": f"*{r}", "attn_ptr": f"*{b}", "mlp_ptr": f"*{b}",
                           **params, "out0_ptr": f"*{r}", "out1_ptr": f"*{r}", "M": "i32", "D": "i32"}))
        out.append(config(f"lane_update_bwd_{r}_branch_{b}", _lane_update_bwd_kernel, "bwd",
                          {"dout0_ptr": f"*{r}", "dout1_ptr": f"*{r}", "lane0_ptr": f"*{r}", "lane1_ptr": f"*{r}",
                           "attn_ptr": f"*{b}", "mlp_ptr": f"*{b}", **params, "dlane0_ptr": f"*{r}",
                           "dlane1_ptr": f"*{r}", "dattn_ptr": f"*{b}", "dmlp_ptr": f"*{b}", "dscale_ptr": "*fp32",
                           "dscalar_ptr": "*fp32", "M": "i32", "D": "i32"}))
    return out
