"""Int6 weights in memory and the fused dequant-matmul y = x · (codes · scale_row)ᵀ.

Codes are the quantizer's integers in [-31, 31] (the layout holds all 64 values -32..31), one scale per
output row. The dequantized weight is never built: codes are exact in bf16, so the kernel multiplies x
by the raw codes with fp32 accumulation and applies the row scale once, in the epilogue.

Packed layout (chosen for the kernel; the on-disk encoding is quant/'s business and converts to this):
    packed: uint8 [3, N, row_bytes(K)], three byte planes, row_bytes(K) = ceil(K/4) rounded up to 16.
    Column c of row n lives in quarter q = c // R, slot j = c % R (R = row_bytes(K)). With u = code + 32:
        planes p = 0, 1, 2:  byte[p, n, j] = u(quarter p)  |  (bits 2p..2p+1 of u(quarter 3)) << 6
So 4 codes take 3 bytes (6 bits each, nothing wasted) and three of them decode with a single AND.
Why planes and quarters rather than 4 codes in 3 consecutive bytes: a tile of BLOCK_J slots is then
three contiguous [BLOCK_N, BLOCK_J] byte loads (128-bit vector loads; rows are 16-byte aligned
because row_bytes is a multiple of 16), and each quarter decodes to a dense [BLOCK_N, BLOCK_J] tile
that meets a contiguous slice of x in its own tl.dot. Consecutive-byte packing would need stride-3
byte gathers and an interleave to bring the 4 codes of a group back next to each other.

This file holds the references (pack_int6_planes / unpack_int6_planes / dequantize / matmul), the Triton
kernels (forward and dx), their launchers, the autograd op `ouroboros::int6_matmul`, `QuantLinear` and
`sm90_configs()`. Under autocast `int6_matmul_triton` casts x to the autocast dtype, as F.linear would
(the input policy of kernels/_runtime.py, which also validates the inputs once per call).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy

CODE_MIN, CODE_MAX = -32, 31     # what 6 bits hold; the quantizer uses [-31, 31]
CODE_OFFSET = 32                 # stored u = code + 32 in [0, 63]
ROW_ALIGN = 16                   # bytes: every plane row starts 16-byte aligned
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def row_bytes(in_features: int) -> int:
    """Bytes per row per plane: ceil(K / 4) rounded up to a multiple of 16 (padding codes are 0)."""
    quarter = -(-in_features // 4)
    return -(-quarter // ROW_ALIGN) * ROW_ALIGN


# ----------------------------------------------------------------------------- references (PyTorch)

def pack_int6_planes(codes: torch.Tensor) -> torch.Tensor:
    """int codes [N, K] in [-32, 31] -> packed uint8 [3, N, row_bytes(K)]: three byte planes, the layout in the
    module docstring (not quant/'s on-disk stream of 4 codes in 3 consecutive bytes)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int6_planes: codes must be 2-D [out_features, in_features], "
                         f"got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"pack_int6_planes: codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.numel() and (int(codes.min()) < CODE_MIN or int(codes.max()) > CODE_MAX):
        raise ValueError(f"pack_int6_planes: codes of shape {tuple(codes.shape)} must lie in [{CODE_MIN}, {CODE_MAX}], "
                         f"got min {int(codes.min())}, max {int(codes.max())}")
    n, k = codes.shape
    r = row_bytes(k)
    u = torch.full((n, 4 * r), CODE_OFFSET, dtype=torch.uint8, device=codes.device)
    u[:, :k] = (codes.to(torch.int16) + CODE_OFFSET).to(torch.uint8)
    u = u.view(n, 4, r)
    spread = u[:, 3]
    planes = [u[:, p] | (((spread >> (2 * p)) & 3) << 6) for p in range(3)]
    return torch.stack(planes, 0).contiguous()


def _check_packed(packed: torch.Tensor, in_features: int, where: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[0] != 3:
        raise ValueError(f"{where}: packed must be uint8 [3, out_features, row_bytes(in_features)], "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[2] != row_bytes(in_features):
        raise ValueError(f"{where}: packed has {packed.shape[2]} bytes per row, but in_features={in_features} "
                         f"needs row_bytes={row_bytes(in_features)} (shape {tuple(packed.shape)})")


def unpack_int6_planes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """packed uint8 [3, N, row_bytes(K)] -> int8 codes [N, K]; the exact inverse of pack_int6_planes."""
    _check_packed(packed, in_features, "unpack_int6_planes")
    top = packed >> 6
    spread = top[0] | (top[1] << 2) | (top[2] << 4)
    u = torch.cat([packed & 63, spread[None]], 0)                    # [4, N, R]: quarters
    n = packed.shape[1]
    return (u.permute(1, 0, 2).reshape(n, -1)[:, :in_features].to(torch.int8) - CODE_OFFSET)


def dequantize_int6(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight codes · scale_row, [N, K] in `dtype` (computed in fp32 unless dtype is fp64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (unpack_int6_planes(packed, in_features).to(compute) * scale.to(compute)[:, None]).to(dtype)


def int6_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., K] · dequant(W)ᵀ computed in fp32 (fp64 for fp64 x), returned in x's dtype: the kernel's ground truth."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.linear(x.to(compute), dequantize_int6(packed, scale, in_features, compute)).to(x.dtype)


def int6_matmul_torch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The plain PyTorch path (dequantize to x's dtype, then matmul): the CPU path and the bf16 baseline."""
    return F.linear(x, dequantize_int6(packed, scale, in_features, x.dtype))


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _to_code(u, TO_DTYPE: tl.constexpr):
    """u = code + 32 (uint8) -> code as TO_DTYPE, exactly."""
    if TO_DTYPE == tl.bfloat16:
        # bf16 bits 0x4300 | u are the number 128 + u (7 mantissa bits): an OR and a subtract instead of
        # an int->float convert, which runs at a fraction of the FMA rate and would compete with the
        # memory stream at small M.
        return (u.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 160.0
    else:
        return u.to(tl.float32) - 32.0


@triton.jit
def _int6_matmul_kernel(x_ptr, packed_ptr, scale_ptr, out_ptr,
                        M, N, K, R, slots_per_split, stride_xm, stride_om, stride_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[split, m, n] = scale[n] · Σ_{c in split} x[m, c] · code[n, c]; grid (M/N tiles, splits of the slots)."""
    pid = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    w_rows = packed_ptr + offs_n[:, None].to(tl.int64) * R
    plane = tl.cast(N, tl.int64) * R  # tl.cast: N == 1 (one output feature) arrives as a constexpr
    dtype = x_ptr.dtype.element_ty

    slot_begin = pid_split * slots_per_split
    slot_end = tl.minimum(slot_begin + slots_per_split, R)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)   # transposed: out[m, n] = acc[n, m]
    for j0 in range(slot_begin, slot_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < slot_end
        w_mask = n_ok[:, None] & j_ok[None, :]
        b0 = tl.load(w_rows + offs_j[None, :], mask=w_mask, other=0)
        b1 = tl.load(w_rows + plane + offs_j[None, :], mask=w_mask, other=0)
        b2 = tl.load(w_rows + 2 * plane + offs_j[None, :], mask=w_mask, other=0)
        w0 = _to_code(b0 & 63, dtype)
        w1 = _to_code(b1 & 63, dtype)
        w2 = _to_code(b2 & 63, dtype)
        w3 = _to_code((b0 >> 6) | ((b1 >> 6) << 2) | ((b2 >> 6) << 4), dtype)
        # Masked x is 0, so padding slots and masked-off codes contribute nothing. x is loaded
        # transposed [BLOCK_J, BLOCK_M]: the decoded weight is the dot's first operand, which Hopper's
        # warpgroup MMA reads straight from registers; only x goes through shared memory.
        xt_mask = j_ok[:, None] & m_ok[None, :]
        x0 = tl.load(x_cols + offs_j[:, None], mask=xt_mask & (offs_j[:, None] < K), other=0.0)
        x1 = tl.load(x_cols + (R + offs_j)[:, None], mask=xt_mask & ((R + offs_j)[:, None] < K), other=0.0)
        x2 = tl.load(x_cols + (2 * R + offs_j)[:, None], mask=xt_mask & ((2 * R + offs_j)[:, None] < K), other=0.0)
        x3 = tl.load(x_cols + (3 * R + offs_j)[:, None], mask=xt_mask & ((3 * R + offs_j)[:, None] < K), other=0.0)
        acc = tl.dot(w0, x0, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(w1, x1, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(w2, x2, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(w3, x3, acc, input_precision=DOT_PRECISION)

    scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * scale[:, None]
    out_ptrs = (out_ptr + pid_split.to(tl.int64) * stride_split + offs_m[None, :].to(tl.int64) * stride_om
                + offs_n[:, None])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _int6_matmul_dx_kernel(dy_ptr, packed_ptr, scale_ptr, dx_ptr,
                           M, N, K, R, stride_dym, stride_dxm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """dx[m, c] = Σ_n dy[m, n] · scale[n] · code[n, c]; each program owns one slot tile of all 4 quarters."""
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_ok = offs_m < M
    j_ok = offs_j < R
    plane = tl.cast(N, tl.int64) * R  # tl.cast: N == 1 (one output feature) arrives as a constexpr
    dtype = dy_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w_ptrs = packed_ptr + offs_n[:, None].to(tl.int64) * R + offs_j[None, :]
        w_mask = n_ok[:, None] & j_ok[None, :]
        b0 = tl.load(w_ptrs, mask=w_mask, other=0)
        b1 = tl.load(w_ptrs + plane, mask=w_mask, other=0)
        b2 = tl.load(w_ptrs + 2 * plane, mask=w_mask, other=0)
        # The scale varies along the reduction (n), so it goes into the weight tile: the same
        # dequantized values, rounded to dy's dtype, that the plain PyTorch path multiplies by.
        s = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
        w0 = ((b0 & 63).to(tl.float32) - 32.0) * s
        w1 = ((b1 & 63).to(tl.float32) - 32.0) * s
        w2 = ((b2 & 63).to(tl.float32) - 32.0) * s
        w3 = (((b0 >> 6) | ((b1 >> 6) << 2) | ((b2 >> 6) << 4)).to(tl.float32) - 32.0) * s
        acc0 = tl.dot(dy, w0.to(dtype), acc0, input_precision=DOT_PRECISION)
        acc1 = tl.dot(dy, w1.to(dtype), acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(dy, w2.to(dtype), acc2, input_precision=DOT_PRECISION)
        acc3 = tl.dot(dy, w3.to(dtype), acc3, input_precision=DOT_PRECISION)
    rows = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm
    out_dtype = dx_ptr.dtype.element_ty
    tl.store(rows + offs_j[None, :], acc0.to(out_dtype), mask=m_ok[:, None] & (j_ok & (offs_j < K))[None, :])
    tl.store(rows + (R + offs_j)[None, :], acc1.to(out_dtype),
             mask=m_ok[:, None] & (j_ok & (R + offs_j < K))[None, :])
    tl.store(rows + (2 * R + offs_j)[None, :], acc2.to(out_dtype),
             mask=m_ok[:, None] & (j_ok & (2 * R + offs_j < K))[None, :])
    tl.store(rows + (3 * R + offs_j)[None, :], acc3.to(out_dtype),
             mask=m_ok[:, None] & (j_ok & (3 * R + offs_j < K))[None, :])


# ----------------------------------------------------------------------------- launch configurations

# Forward tiles for bf16 x by M. BLOCK_J slots cover 4·BLOCK_J columns of K per iteration. Small M
# streams the weight (memory-bound, GEMV-like, split over K until the SMs are full); large M is a
# compute-bound GEMM tile. The weight bytes stream through shared memory (cp.async, num_stages deep)
# because R and slots_per_split are multiples of 16; the decoded tiles are the MMA's register operand.
# Sizes: the largest that compile for sm_90 without spills in every launch specialization (a 256-row
# tile spills when K is odd). Not yet timed on a GPU.
_FWD_BF16 = (  # (max M, BLOCK_M, BLOCK_N, BLOCK_J, GROUP_M, num_warps, num_stages, hgmma)
    (16, 16, 128, 32, 1, 8, 4, False),
    (128, 64, 128, 32, 1, 8, 3, True),
    (None, 128, 128, 32, 8, 8, 3, True),
)
# fp32 x is the exact CPU/test path; on a GPU it only has to be correct (ieee dot), so one small tile.
_FWD_FP32 = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_J=16, GROUP_M=1, num_warps=4, num_stages=1)
_DX = {torch.bfloat16: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_J=32, num_warps=4, num_stages=3),
       torch.float32: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_J=16, num_warps=4, num_stages=1)}
# Under the interpreter each program and loop iteration costs ~3 ms whatever its size: large tiles.
_INTERPRET_FWD = dict(BLOCK_N=64, BLOCK_J=64, GROUP_M=1, num_warps=4, num_stages=1)
_INTERPRET_DX = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_J=64, num_warps=4, num_stages=1)




def _forward_config(m: int, dtype: torch.dtype) -> dict:
    if INTERPRET:
        return dict(_INTERPRET_FWD, BLOCK_M=min(64, max(16, triton.next_power_of_2(m))))
    if dtype == torch.float32:
        return _FWD_FP32
    for max_m, bm, bn, bj, gm, warps, stages, _ in _FWD_BF16:
        if max_m is None or m <= max_m:
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_J=bj, GROUP_M=gm, num_warps=warps, num_stages=stages)
    raise AssertionError("unreachable: the last forward config has no M limit")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(tiles: int, r: int, block_j: int, device: torch.device) -> int:
    """Split the slots over programs until there are ~2 waves of them, keeping >= 4 iterations per split."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    max_splits = max(1, r // (4 * block_j))
    return max(1, min(-(-2 * sms // tiles), max_splits))


def _check_inputs(where: str, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
    _check_packed(packed, in_features, where)
    n = packed.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: x must have last dimension {in_features}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: x dtype {x.dtype} is not supported; use bfloat16 or float32")
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"{where}: scale must be float32 [{n}] (one per output row), "
                         f"got {scale.dtype} of shape {tuple(scale.shape)}")
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"{where}: x, packed and scale must be on one device, "
                         f"got {x.device}, {packed.device}, {scale.device}")


def _int6_matmul_launch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., K] -> [..., N]; every input contiguous, as int6_matmul_triton validated it."""
    n, r = packed.shape[1], packed.shape[2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    cfg = _forward_config(m, x.dtype)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    splits = _num_splits(tiles, r, cfg["BLOCK_J"], x.device)
    slots_per_split = triton.cdiv(triton.cdiv(r, splits), cfg["BLOCK_J"]) * cfg["BLOCK_J"]
    splits = triton.cdiv(r, slots_per_split)
    if splits == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:  # fp32 partial sums, reduced below: deterministic, unlike atomics
        out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _int6_matmul_kernel[(tiles, splits)](
        x2, packed, scale, out, m, n, in_features, r, slots_per_split, x2.stride(0), n, m * n,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"], GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*lead, n)


def _int6_matmul_dx_launch(dy: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """dy [..., N] (from autograd) -> dx [..., K]; packed and scale are the forward's."""
    n, r = packed.shape[1], packed.shape[2]
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, n)  # contiguous: _backward made it so
    m = dy2.shape[0]
    dx = torch.empty(m, in_features, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx.view(*lead, in_features)
    cfg = _INTERPRET_DX if INTERPRET else _DX[dy.dtype]
    precision = "ieee" if dy.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, cfg["BLOCK_J"]))
    _int6_matmul_dx_kernel[grid](
        dy2, packed, scale, dx, m, n, in_features, r, dy2.stride(0), dx.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"], DOT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx.view(*lead, in_features)


# ----------------------------------------------------------------------------- autograd op

@torch.library.custom_op("ouroboros::int6_matmul", mutates_args=())
def _int6_matmul_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    return _int6_matmul_launch(x, packed, scale, in_features)


@_int6_matmul_op.register_fake
def _(x, packed, scale, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[1])


@torch.library.custom_op("ouroboros::int6_matmul_dx", mutates_args=())
def _int6_matmul_dx_op(dy: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    return _int6_matmul_dx_launch(dy, packed, scale, in_features)


@_int6_matmul_dx_op.register_fake
def _(dy, packed, scale, in_features):
    return dy.new_empty(*dy.shape[:-1], in_features)


def _setup_context(ctx, inputs, output):
    _, packed, scale, in_features = inputs
    ctx.save_for_backward(packed, scale)
    ctx.in_features = in_features


def _backward(ctx, dy):
    packed, scale = ctx.saved_tensors
    # The codes and scales are fixed after quantization: only x gets a gradient.
    return _int6_matmul_dx_op(dy.contiguous(), packed, scale, ctx.in_features), None, None, None


_int6_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# Under autocast x is cast as F.linear would; the codes and the fp32 scales are not. The kernels index all
# three densely.
@input_policy("int6_matmul", _check_inputs, autocast=("x",), contiguous=("x", "packed", "scale"))
def int6_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """y = x · (codes · scale_row)ᵀ with the Triton kernel; x [..., K] bf16 or fp32 -> [..., N] in x's dtype."""
    return _int6_matmul_op(x, packed, scale, in_features)


# ----------------------------------------------------------------------------- module

class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is int6 codes with one fp32 scale per output row.

    Holds `packed` (uint8 [3, out, row_bytes(in)]) and `scale` (fp32 [out]) as buffers. Forward runs the
    Triton kernel when the kernels backend is "triton" (CUDA, or the interpreter) and the plain PyTorch
    dequantize-then-matmul otherwise. `.weight` gives the dequantized fp32 weight for code that reads it
    (the model's fused MLP passes fc.weight / proj.weight to kernels.mlp, so it still works, unfused).
    quant/ swaps it in for an nn.Linear with `QuantLinear.from_codes(codes, scale)`.
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"QuantLinear: in_features={in_features} and out_features={out_features} must be > 0")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.full((3, out_features, row_bytes(in_features)), CODE_OFFSET,
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor) -> "QuantLinear":
        """A layer from int codes [out, in] in [-32, 31] and per-row scales [out]."""
        if codes.dim() != 2:
            raise ValueError(f"QuantLinear.from_codes: codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
        layer = cls(codes.shape[1], codes.shape[0], device=codes.device)
        layer.set_codes(codes, scale)
        return layer

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.set_codes: codes shape {tuple(codes.shape)} does not match "
                             f"[out_features={self.out_features}, in_features={self.in_features}]")
        if tuple(scale.shape) != (self.out_features,):
            raise ValueError(f"QuantLinear.set_codes: scale shape {tuple(scale.shape)} must be [{self.out_features}]")
        if not torch.isfinite(scale).all():
            raise ValueError("QuantLinear.set_codes: scale has non-finite values")
        self.packed.copy_(pack_int6_planes(codes.to(self.packed.device)))
        self.scale.copy_(scale.to(device=self.scale.device, dtype=torch.float32))

    def codes(self) -> torch.Tensor:
        return unpack_int6_planes(self.packed, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int6(self.packed, self.scale, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The package's dispatch switch, looked up at call time so kernels/__init__ may import this module.
        from . import uses_triton

        scale = self.scale.float()   # a no-op unless the module was cast (.half() casts float buffers too)
        if uses_triton("int6_matmul"):
            return int6_matmul_triton(x, self.packed, scale, self.in_features)
        return int6_matmul_torch(x, self.packed, scale, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int6"


# ----------------------------------------------------------------------------- sm_90 compile check

def sm90_configs() -> list[dict]:
    """Every (kernel, tile, dtype, output) combination the launchers can launch on a GPU."""
    fwd_sig = {"x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32",
               "N": "i32", "K": "i32", "R": "i32", "slots_per_split": "i32", "stride_xm": "i32",
               "stride_om": "i32", "stride_split": "i32"}
    tiles = [(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_J=bj, GROUP_M=gm, num_warps=w, num_stages=st), "bf16", hg)
             for _, bm, bn, bj, gm, w, st, hg in _FWD_BF16] + [(_FWD_FP32, "fp32", False)]
    configs = []
    for cfg, x_t, hgmma in tiles:
        # Triton specializes integer arguments that are multiples of 16 at launch. R and slots_per_split
        # always are (and then the weight stream is pipelined through shared memory with cp.async);
        # K and x's row stride are for the model's layers, not for odd test shapes: compile both.
        alignments = [("k16", ["R", "slots_per_split", "K", "stride_xm"]), ("kodd", ["R", "slots_per_split"])]
        # Any tile may split K (when it has too few tiles to fill the GPU) and then writes fp32 partials.
        for out_t in sorted({x_t, "fp32"}):
            for align_name, aligned in alignments:
                configs.append({
                    "name": f"int6_matmul_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}j{cfg['BLOCK_J']}_{x_t}_out{out_t}_{align_name}",
                    "kernel": _int6_matmul_kernel,
                    "signature": dict(fwd_sig, x_ptr=f"*{x_t}", out_ptr=f"*{out_t}"),
                    "constexprs": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_J", "GROUP_M")}
                    | {"DOT_PRECISION": "ieee" if x_t == "fp32" else "tf32"},
                    "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "hgmma": hgmma,
                    "divisible_by_16": aligned,
                })
    # One output feature (N = 1) or one token (M = 1): Triton compiles an int argument equal to 1 as a constexpr.
    for base in [c for c in configs if c["name"].endswith("_outfp32_kodd")][:1]:
        configs.append(dict(base, name=base["name"] + "_m1n1", equal_to_1=["M", "N"]))
    for dtype, cfg in _DX.items():
        x_t = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        configs.append({
            "name": f"int6_matmul_dx_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}j{cfg['BLOCK_J']}_{x_t}",
            "kernel": _int6_matmul_dx_kernel,
            "signature": {"dy_ptr": f"*{x_t}", "packed_ptr": "*u8", "scale_ptr": "*fp32", "dx_ptr": f"*{x_t}",
                          "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_dym": "i32", "stride_dxm": "i32"},
            "constexprs": {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_J")}
            | {"DOT_PRECISION": "ieee" if x_t == "fp32" else "tf32"},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "hgmma": False,
            "divisible_by_16": ["R"],
        })
        configs.append(dict(configs[-1], name=configs[-1]["name"] + "_m1n1", equal_to_1=["M", "N"]))
    return configs
