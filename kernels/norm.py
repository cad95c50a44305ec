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

Why this family was fused first: the choice followed the step ledger's analytic table (bench/ledger.py,
whose measured table needs a GPU run; bench/results/ledger_cpu_tiny.md) at the real shapes, 48 x 2048
tokens per GPU, d = 512, 9 flat blocks + 2 crawler loops. There "norms and elementwise" is the largest
group: 80.6 GB of HBM traffic per GPU per step, 24.1 ms at 3.35 TB/s (26.9 ms at the measured 3 TB/s), 44% of the
61.1 ms ideal step, ahead of the MLP's 24.7%. That ledger already counts each chain as one fused pass
(mix + norm 14 B per element of [N, d], residual add + norm 12 B), so it is the floor these kernels aim
at, not a saving over it; eager PyTorch moves several times that (each of mul, mul, add, rms_norm,
scale and the cast to bf16 reads and writes [N, d] on its own). What a GPU run must show is how close
the kernels come to 3 TB/s next to torch.compile's own fusion of the reference (bench/norm.py).

Dtypes: the residual stream (x, x0) and the parameters (mix, gain) share one dtype, fp32 or bf16; the
branch is that dtype or bf16 (an autocast matmul's output); h comes out in the residual dtype, or in
the autocast dtype when autocast is on (the input policy of kernels/_runtime.py hands the entries that
dtype, and validates their inputs once per call). RMSNorm's eps is torch.finfo(residual dtype).eps,
F.rms_norm's default. fp32 arithmetic inside; the residual output is rounded to its dtype before it is
normalized, as the reference normalizes the stored tensor.
"""

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


def _check_inputs(where: str, x: torch.Tensor, x0=None, mix=None, branch=None, gain=None, h_dtype=None):
    """Raise ValueError naming the argument, its shape and dtype for anything the kernels do not support.

    x [..., d] with x0 and mix [2, d] (mix_norm), with branch and gain [d] (add_norm), or alone (rms_norm)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{where}: x must be [..., d] with d >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d > MAX_D:
        raise ValueError(f"{where}: x {tuple(x.shape)} has d={d} > {MAX_D}: one program holds a whole row, "
                         f"wider rows would spill registers")
    if x.dtype not in _RESIDUAL_DTYPES:
        raise ValueError(f"{where}: x is {x.dtype}; the residual stream must be float32 or bfloat16")
    if x.numel() >= _INT32_LIMIT:
        raise ValueError(f"{where}: x {tuple(x.shape)} has 2^31 elements or more, beyond the kernel's 32-bit "
                         f"offsets: split the batch")
    named = {"x": x}
    # x0 is residual stream too; the branch may also be a bf16 matmul output (autocast)
    for name, other, allowed in (("x0", x0, (x.dtype,)), ("branch", branch, (x.dtype, torch.bfloat16))):
        if other is None:
            continue
        named[name] = other
        if other.shape != x.shape:
            raise ValueError(f"{where}: {name} {tuple(other.shape)} must have x's shape {tuple(x.shape)}")
        if other.dtype not in allowed:
            raise ValueError(f"{where}: {name} is {other.dtype}, x is {x.dtype}; {name} must be "
                             + " or ".join(str(t) for t in allowed))
    for name, vec, shape in (("mix", mix, (2, d)), ("gain", gain, (d,))):
        if vec is None:
            continue
        named[name] = vec
        if tuple(vec.shape) != shape:
            raise ValueError(f"{where}: {name} {tuple(vec.shape)} must be {shape} for x {tuple(x.shape)}")
        if vec.dtype != x.dtype:
            raise ValueError(f"{where}: {name} is {vec.dtype} but x is {x.dtype}: the parameters and the residual "
                             f"stream must share one dtype (the stream keeps the promoted dtype otherwise)")
    if h_dtype is not None and h_dtype not in (x.dtype, torch.bfloat16):
        raise ValueError(f"{where}: h_dtype={h_dtype} must be x's dtype ({x.dtype}) or torch.bfloat16")
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


# ---------------------------------------------------------------------------------------------------
# sm_90 compile check
# ---------------------------------------------------------------------------------------------------
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (residual dtype, branch dtype, h dtype) the launchers accept: fp32 stream with fp32 or bf16 (autocast)
# branch and h, or everything in bf16. MIX and NORM have no branch (other = x0 / unused: the residual dtype).
_VARIANTS = [(torch.float32, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
             (torch.float32, torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.bfloat16, torch.bfloat16)]
SM90_D = 512  # the training width; BLOCK_D = next_power_of_2(d) is a constexpr, so other widths compile anew


def sm90_configs() -> list[dict]:
    """Every (kernel x mode x dtype variant) at d = 512, for bench/sm90.py. No tensor cores: "hgmma" is False."""
    block_d = SM90_D
    tiles = {"fwd": _tile(block_d, interpret=False), "bwd": _tile(block_d, backward=True, interpret=False)}

    def config(name, kernel, direction, signature, **constexprs):
        tile = tiles[direction]
        return {"name": name, "kernel": kernel, "num_warps": tile["num_warps"], "num_stages": 1, "hgmma": False,
                "constexprs": {**constexprs, "BLOCK_M": tile["BLOCK_M"], "BLOCK_D": block_d},
                "divisible_by_16": ["D"], "signature": signature}

    out = []
    no_branch = [(r, h) for r, b, h in _VARIANTS if b == r]  # MIX and NORM: other has the stream dtype
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
    return out
