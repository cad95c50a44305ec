"""GPTQ on the GPU: the in-block column loop in Triton, the lazy block update as a GEMM.

The math is the textbook GPTQ of the project's quantizer; `quantize_layer_reference` is its PyTorch
definition and the KERNELS=torch path (quant/gptq.py keeps the scale rule, round-to-nearest and int8, and
names the reference quantize_layer). With per-row scales s fixed beforehand, a code limit L (31 for int6,
63 for R1's int7) and U the upper Cholesky factor of the damped, permuted H⁻¹ (or H⁻¹ itself for the
original's "plain" variant):
    for each block of columns [b0, b1):
        for j in the block:   code_j = clamp(round(w_j / s), ±L)    (0 where s = 0)
                              e_j = (w_j − s·code_j) / U[j, j]
                              w_k −= e_j · U[j, k]        for the later columns k of the block
        W[:, b1:] −= E_block · U[b0:b1, b1:]
Rows are independent, so the Triton kernel runs the in-block loop over all rows in parallel, each
program holding a [BLOCK_R, block] slice of W in registers. The lazy update is a plain dense GEMM
(rows x block x rest) and runs as torch.addmm: cuBLAS is the fastest GEMM on the device and a Triton
GEMM here would only reproduce it. The damping, ordering and factorizations stay torch.linalg.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy

CODE_LIMIT = 31         # int6's codes; any limit up to INT8_CODE_LIMIT is a runtime argument of the kernel
INT8_CODE_LIMIT = 127   # codes are stored as int8
# GPTQ's column orders and inverse variants, defined here once: model/config.py (GPTQ_ORDER, GPTQ_INVERSE)
# and quant/gptq.py import them.
ORDERS = ("descending", "ascending", "none")
INVERSES = ("cholesky", "plain")
MAX_BLOCK = 256            # the block's slice of W lives in registers
_RINT_MAGIC = tl.constexpr(12582912.0)   # 1.5 · 2^23: adding and subtracting it rounds |v| < 2^22 to nearest even


def check_matrix(name: str, t: torch.Tensor) -> None:
    """A 2-D, finite matrix, or a ValueError naming it (the reference's check; quant.gptq's scale rule uses it too)."""
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [rows, cols] tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf (shape {tuple(t.shape)})")


def check_code_limit(where: str, code_limit) -> None:
    """The codes' bound: an int in [1, INT8_CODE_LIMIT], or a ValueError."""
    if not isinstance(code_limit, int) or not 1 <= code_limit <= INT8_CODE_LIMIT:
        raise ValueError(f"{where}: code_limit={code_limit!r} must be an int in [1, {INT8_CODE_LIMIT}]")


def quantize_layer_reference(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *,
                             block_size: int = 128, damping: float = 0.01, order: str = "descending",
                             inverse: str = "cholesky", code_limit: int = CODE_LIMIT) -> torch.Tensor:
    """GPTQ with per-row steps held fixed -> int8 codes [rows, cols] in [-code_limit, code_limit], in fp32 on the
    inputs' device. A row whose step is 0 gets codes 0.

    Textbook (the default): H += damping·mean(diag H)·I; columns visited in descending diag(H); U = the
    upper Cholesky factor of H⁻¹ (the inverse downdated as columns are fixed); lazy updates in blocks of
    `block_size` columns. inverse="plain" is the original's variant: it uses rows of the plain H⁻¹, never
    downdated (with block_size=64, damping=0.002, order="ascending" it is the original exactly).
    Dead columns (diag(H) = 0, the input never moves) get diag 1 and weight 0: they cannot matter.
    """
    check_matrix("weight", weight)
    check_matrix("hessian", hessian)
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
    if not (scale >= 0).all():
        raise ValueError("scale: every row step must be >= 0")
    check_code_limit("quantize_layer_reference", code_limit)

    w = weight.float().clone()
    h = hessian.float().clone()
    s = scale.float()
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
        codes[:, start:end], err = gptq_block_reference(w[:, start:end], u[start:end, start:end], s, code_limit)
        w[:, end:] -= err @ u[start:end, end:]

    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def gptq_block_reference(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, code_limit: int = CODE_LIMIT):
    """The in-block loop in PyTorch: w [rows, B] (the block's columns), u [B, B] (U's diagonal block),
    scale [rows]. Returns (codes int8 [rows, B], err fp32 [rows, B]); the kernel computes the same."""
    w = w.float().clone()
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    err = torch.empty_like(w)
    live = scale > 0  # a step of 0 (an all-zero row's fp16 step) codes 0, without dividing by it
    step = torch.where(live, scale, 1.0)
    for j in range(w.shape[1]):
        q = torch.where(live, torch.clamp(torch.round(w[:, j] / step), -code_limit, code_limit), 0.0)
        e = (w[:, j] - scale * q) / u[j, j]
        w[:, j + 1:] -= e[:, None] * u[j, j + 1:][None, :]
        codes[:, j] = q.to(torch.int8)
        err[:, j] = e
    return codes, err


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, scale_ptr, codes_ptr, err_ptr, rows, width, col0, code_limit,
                       stride_w, stride_u, stride_codes, stride_err,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [col0, col0 + width) of W for rows [pid·BLOCK_R, +BLOCK_R): codes in ±code_limit (an fp32
    runtime value, so int6 and int7 share one compiled kernel) and scaled errors."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = offs_r < rows
    c_ok = cols < width
    row64 = offs_r.to(tl.int64)
    w = tl.load(w_ptr + row64[:, None] * stride_w + col0 + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0)
    s = tl.load(scale_ptr + offs_r, mask=r_ok, other=1.0)
    # tl.cast, not col0.to: Triton makes an int argument equal to 1 a constexpr, which has no .to
    u_rows = u_ptr + tl.cast(col0, tl.int64) * stride_u + col0
    for j in range(0, width):
        is_j = cols == j
        w_j = tl.sum(tl.where(is_j[None, :], w, 0.0), axis=1)
        # IEEE division (the default fp32 '/' on the GPU is approximate) so codes match the reference.
        # Clamping before rounding gives the same code (the limits are integers) and keeps |v| small
        # enough for the rounding trick below.
        v = tl.minimum(tl.maximum(tl.math.div_rn(w_j, s), -code_limit), code_limit)
        q = (v + _RINT_MAGIC) - _RINT_MAGIC   # round half to even, as torch.round
        u_jj = tl.load(u_rows + j * stride_u + j)
        e = tl.math.div_rn(w_j - s * q, u_jj)
        u_j = tl.load(u_rows + j * stride_u + cols, mask=c_ok & (cols > j), other=0.0)
        w -= e[:, None] * u_j[None, :]
        tl.store(codes_ptr + row64 * stride_codes + col0 + j, q.to(tl.int8), mask=r_ok)
        tl.store(err_ptr + row64 * stride_err + j, e, mask=r_ok)


# Rows per program: on the GPU small, so even a 256-row layer spreads over many SMs (each program's
# loop is latency-bound); under the interpreter large, since every program costs ~3 ms.
_BLOCK_R = 16
_NUM_WARPS = 4
_INTERPRET_BLOCK_R = 128
# The kernel's stand-in for a step of 0 (an all-zero row's fp16 step): every |w| < 2^127 divides to code 0 and
# code 0 times it is 0, so the row's codes and errors are the reference's, and the kernel needs no test for it
# (one costs ~40 registers).
_NO_STEP = torch.finfo(torch.float32).max


def _kernel_steps(scale: torch.Tensor) -> torch.Tensor:
    """The row steps as the kernel reads them: fp32, contiguous, _NO_STEP for 0."""
    return torch.where(scale > 0, scale.float(), _NO_STEP).contiguous()


def gptq_block_triton(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, code_limit: int = CODE_LIMIT):
    """The in-block loop in Triton on one standalone block (same contract as gptq_block_reference)."""
    rows, width = w.shape
    w = w.float().contiguous()
    codes = torch.empty(rows, width, dtype=torch.int8, device=w.device)
    err = torch.empty(rows, width, dtype=torch.float32, device=w.device)
    _launch_block(w, u.float().contiguous(), _kernel_steps(scale), codes, err, 0, width, width, code_limit)
    return codes, err


def _block_columns(block_size: int) -> int:
    """The kernel's column tile: a power of two >= 16 (every block of a layer, the partial last one too)."""
    return max(16, triton.next_power_of_2(block_size))


def _launch_block(w, u, scale, codes, err, col0: int, width: int, block_size: int, code_limit: int) -> None:
    if width > MAX_BLOCK:
        raise ValueError(f"gptq block of {width} columns is wider than the kernel's limit {MAX_BLOCK}")
    rows = w.shape[0]
    block_r = _INTERPRET_BLOCK_R if INTERPRET else _BLOCK_R
    block_c = _block_columns(block_size)
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        w, u, scale, codes, err, rows, width, col0, float(code_limit), w.stride(0), u.stride(0), codes.stride(0),
        err.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS)


def _check_inputs(where, weight, hessian, scale, block_size, damping, order, inverse, code_limit) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D [rows, cols], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{where}: hessian must be [{cols}, {cols}] for weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if tuple(scale.shape) != (rows,):
        raise ValueError(f"{where}: scale must be [{rows}] (one per row of weight {tuple(weight.shape)}), "
                         f"got {tuple(scale.shape)}")
    if not (weight.device == hessian.device == scale.device):
        raise ValueError(f"{where}: weight, hessian and scale must be on one device, "
                         f"got {weight.device}, {hessian.device}, {scale.device}")
    if not 1 <= block_size <= MAX_BLOCK:
        raise ValueError(f"{where}: block_size={block_size} must be in [1, {MAX_BLOCK}]")
    if not damping >= 0:
        raise ValueError(f"{where}: damping={damping} must be >= 0")
    if order not in ORDERS:
        raise ValueError(f"{where}: order={order!r} must be one of {ORDERS}")
    if inverse not in INVERSES:
        raise ValueError(f"{where}: inverse={inverse!r} must be one of {INVERSES}")
    for name, t in (("weight", weight), ("hessian", hessian), ("scale", scale)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {name} {tuple(t.shape)} has non-finite values")
    if not (scale >= 0).all():
        raise ValueError(f"{where}: scale {tuple(scale.shape)} must be >= 0 everywhere (min {float(scale.min())})")
    check_code_limit(where, code_limit)


@input_policy("quantize_layer_triton", _check_inputs)
def quantize_layer_triton(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, *, block_size: int = 128,
                          damping: float = 0.01, order: str = "descending", inverse: str = "cholesky",
                          code_limit: int = CODE_LIMIT) -> torch.Tensor:
    """GPTQ of one layer with fixed per-row scales -> int8 codes [rows, cols] in [-code_limit, code_limit].

    weight [rows, cols], hessian [cols, cols] (XᵀX/n), scale [rows]: the contract of
    quantize_layer_reference. Runs wherever the tensors are (CUDA, or the interpreter on CPU).
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    if order == "none":
        perm = torch.arange(cols, device=w.device)
    else:
        perm = torch.argsort(h.diagonal(), descending=order == "descending", stable=True)
    w = w[:, perm].contiguous()
    h = h[perm][:, perm]
    if inverse == "cholesky":
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        u = torch.linalg.cholesky(h_inv, upper=True)
    else:  # the original's variant: rows of H⁻¹ itself, never downdated
        u = torch.linalg.inv(h)
    u = u.contiguous()
    s = _kernel_steps(scale.detach())

    codes = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    err = torch.empty(rows, min(block_size, cols), dtype=torch.float32, device=w.device)
    for col0 in range(0, cols, block_size):
        col1 = min(col0 + block_size, cols)
        block_err = err[:, :col1 - col0]
        _launch_block(w, u, s, codes, block_err, col0, col1 - col0, block_size, code_limit)
        if col1 < cols:
            w[:, col1:].addmm_(block_err, u[col0:col1, col1:], alpha=-1.0)
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def sm90_configs() -> list[dict]:
    """The block kernel at every column tile a block_size in [1, 256] maps to (128: textbook, 64: the original;
    the code limit, 31 or 63, is a runtime argument, so no variant per limit), and block_size=1, whose launches
    pass col0 = 1 (and width = 1), which Triton compiles as constexprs."""
    return [{
        "name": f"gptq_block_r{_BLOCK_R}_c{block_c}" + ("_block_size1" if ones else ""),
        "kernel": _gptq_block_kernel,
        "signature": {"w_ptr": "*fp32", "u_ptr": "*fp32", "scale_ptr": "*fp32", "codes_ptr": "*i8", "err_ptr": "*fp32",
                      "rows": "i32", "width": "i32", "col0": "i32", "code_limit": "fp32", "stride_w": "i32",
                      "stride_u": "i32", "stride_codes": "i32", "stride_err": "i32"},
        "constexprs": {"BLOCK_R": _BLOCK_R, "BLOCK_C": block_c},
        "num_warps": _NUM_WARPS, "num_stages": 1, "hgmma": False,
        "equal_to_1": ["col0", "width"] if ones else [],
    } for block_c, ones in ((16, True), (16, False), (32, False), (64, False), (128, False), (256, False))]
