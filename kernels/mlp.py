"""Fused leaky-ReLU^2 MLP: y = W_down · leaky_relu(W_up · x, slope)^2.

One Triton GEMM kernel, C = op(A) · B with optional split-K, launched four times:

  forward   act  = leaky_relu(x · W_upᵀ, slope)           activation in the epilogue
            y    = act² · W_downᵀ                         A tile squared as it is loaded
  backward  dpre = (dy · W_down) ⊙ 2·act·(act > 0 ? 1 : slope)   derivative in the epilogue
            dW_downᵀ = (act²)ᵀ · dy                       split-K over the rows, A squared on load
            dx = dpre · W_up,  dW_up = dpreᵀ · x          cuBLAS (torch.mm), see below

`act` = leaky_relu(pre) is the only [M, hidden] tensor the forward keeps: act² is the hidden state and
d(act²)/dpre = 2·act·(1 if pre > 0 else slope), where pre > 0 exactly when act > 0 because slope >= 0
keeps the sign (with slope 0 the derivative is 0 wherever act is 0). A negative slope flips the sign,
so the sign of pre could not be recovered from act: it is rejected.

Why cuBLAS for dx and dW_up: they are plain GEMMs with nothing to fuse (no prologue, no epilogue), so a
Triton version can at best tie cuBLAS (measured elsewhere on the H100: cuBLAS ~800 TFLOP/s, Triton's
best GEMMs ~650-700). The four fused GEMMs are where Triton saves the elementwise passes.

Dtypes: bf16 or fp32, the same for x, w_up and w_down; fp32 accumulation; outputs in the input dtype.
Under autocast `mlp_triton` casts all three to the autocast dtype first, as F.linear would (the input
policy of kernels/_runtime.py, which also validates the inputs once per call).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """x [..., d], w_up [hidden, d], w_down [d, hidden]; act(u) = leaky_relu(u, slope)^2 (slope 0 = relu^2)."""
    pre = F.linear(x, w_up)
    return F.linear(leaky_relu_squared(pre, slope), w_down)


def leaky_relu_squared(h: torch.Tensor, slope: float) -> torch.Tensor:
    """The MLP's activation, leaky_relu(h, slope)^2; the model's unfused (calibration) path calls it too."""
    return F.leaky_relu(h, slope).square()


# ---------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------
EPILOGUE_NONE, EPILOGUE_LEAKY, EPILOGUE_LEAKY_GRAD = 0, 1, 2


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, act_ptr, slope, M, N, K, k_per_split, lda, ldb, ldc, ld_act, split_stride,
                 A_T: tl.constexpr, B_T: tl.constexpr, C_T: tl.constexpr,
                 SQUARE_A: tl.constexpr, EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[s] = op(A)[:, Ks] · B[Ks, :] over the K-slice Ks of split s = program_id(1).

    Layouts as in BLAS: A is [M, K] row-major with leading dimension lda, or its transpose when A_T
    (element [m, k] at m + k·lda); likewise B [K, N] and C [M, N]; act is [M, N] row-major. The
    contiguous dimension is a compile-time fact, so loads vectorize and the MMA gets the right operand
    layout. op(A) = A*A when SQUARE_A. EPILOGUE_LEAKY stores leaky_relu(C); EPILOGUE_LEAKY_GRAD stores
    C·2·act·(act > 0 ? 1 : slope).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # Grouped tile order: GROUP_M row-tiles share each column-tile while it is still in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * grid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * k_per_split
    k_end = min(K, k_start + k_per_split)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if A_T:
        a_ptrs = a_ptr + offs_m[:, None] + offs_k[None, :] * lda
        a_step = BLOCK_K * lda
    else:
        a_ptrs = a_ptr + offs_m[:, None] * lda + offs_k[None, :]
        a_step = BLOCK_K
    if B_T:
        b_ptrs = b_ptr + offs_k[:, None] + offs_n[None, :] * ldb
        b_step = BLOCK_K
    else:
        b_ptrs = b_ptr + offs_k[:, None] * ldb + offs_n[None, :]
        b_step = BLOCK_K * ldb

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - (k - k_start)
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SQUARE_A:
            a = a * a  # rounded to the operand dtype, like the reference's act² tensor
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    mask_c = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 1:
        acc = tl.where(acc > 0, acc, acc * slope)
    elif EPILOGUE == 2:
        act = tl.load(act_ptr + offs_m[:, None] * ld_act + offs_n[None, :], mask=mask_c, other=0.0).to(tl.float32)
        acc = acc * (2.0 * act * tl.where(act > 0, 1.0, slope))
    c_ptr += split.to(tl.int64) * split_stride  # int64: splits x M x N can pass 2**31
    if C_T:
        c_ptrs = c_ptr + offs_m[:, None] + offs_n[None, :] * ldc
    else:
        c_ptrs = c_ptr + offs_m[:, None] * ldc + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# ---------------------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------------------
def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# H100, bf16: large tiles so each K step feeds warpgroup MMAs (HGMMA); 128x256x64 at 3 stages and
# 128x128x64 at 4 stages stay under 227 KB of shared memory and, compiled for sm_90, under 255 registers
# without spills. The dact epilogue also holds an act tile: at 128x256 it spilled, so it keeps 128x128.
_BF16_CONFIGS = {
    "up": [_config(128, 256, 64, 8, 3), _config(256, 128, 64, 8, 3), _config(128, 128, 64, 8, 4)],
    "down": [_config(128, 256, 64, 8, 3), _config(256, 128, 64, 8, 3), _config(128, 128, 64, 8, 4)],
    "dact": [_config(128, 128, 64, 8, 4), _config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 3)],
    "dw_down": [_config(128, 256, 64, 8, 3), _config(256, 128, 64, 8, 3), _config(128, 128, 64, 8, 4)],
}
# fp32 with input_precision="ieee" runs on FMA units, not tensor cores: the correctness path, modest tiles.
# The dact epilogue's extra act tile spilled 24 B at 4 warps under triton 3.6.0 (the GPU image's), so its
# tile runs on 8 warps: half the registers per thread.
_FP32_CONFIGS = {launch: [_config(64, 64, 32, 8 if launch == "dact" else 4, 3)] for launch in _BF16_CONFIGS}
# Interpreter: ~3 ms per program and per K step whatever the block size, so few big blocks and one
# config (the autotuner then times nothing). The tests' odd sizes (d = 48, hidden = 200, M = 37) still
# leave partial blocks in every dimension and several K steps.
_INTERPRETER_CONFIGS = [_config(128, 128, 64, 4, 1)]


def _autotuned(configs):
    # The dtypes of the tensor arguments join the key automatically; M is left out so a new batch size
    # does not re-tune (the training shapes are fixed; other M run on the tuned tiles).
    return triton.autotune(configs=configs, key=["N", "K"])(_gemm_kernel)


_GEMM = {(launch, dtype): _autotuned(_INTERPRETER_CONFIGS if INTERPRET else table[launch])
         for dtype, table in ((torch.bfloat16, _BF16_CONFIGS), (torch.float32, _FP32_CONFIGS))
         for launch in table}
_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float32: "ieee"}  # tf32 is the default and a no-op for bf16
_SPLIT_K_ALIGN = 64      # each split covers a multiple of this many rows (a multiple of every BLOCK_K)
_SPLIT_K_MIN_ROWS = 1024  # below this a split is not worth its partial-sum traffic


def _layout(t: torch.Tensor):
    """(transposed, leading dimension, tensor) of a 2-D view, copied when neither dimension has stride 1."""
    if t.stride(1) == 1 or t.shape[1] == 1:  # (a stride-0 leading dimension, from expand, is fine too)
        return False, t.stride(0), t
    if t.stride(0) == 1 or t.shape[0] == 1:
        return True, t.stride(1), t
    t = t.contiguous()
    return False, t.stride(0), t


def _gemm(launch, a, b, c, *, square_a=False, epilogue=EPILOGUE_NONE, act=None, slope=0.0, splits=1):
    """c = op(a) · b on 2-D views (any layout with one unit stride); with splits > 1, c is [splits, M, N]
    (fp32 partial sums, one per K-slice). Returns the number of splits used."""
    M, K = a.shape
    N = b.shape[1]
    k_per_split = _SPLIT_K_ALIGN * triton.cdiv(triton.cdiv(K, splits), _SPLIT_K_ALIGN)
    splits = triton.cdiv(K, k_per_split)
    a_t, lda, a = _layout(a)
    b_t, ldb, b = _layout(b)
    split_stride = c.stride(0) if c.dim() == 3 else 0
    c_t, ldc, c_view = _layout(c[0] if c.dim() == 3 else c)
    assert c_view.data_ptr() == (c[0] if c.dim() == 3 else c).data_ptr(), "the output must be written in place"
    if act is None:
        act, ld_act = c, 0  # unused without EPILOGUE_LEAKY_GRAD
    else:
        act = act.contiguous()
        ld_act = act.stride(0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    _GEMM[launch, a.dtype][grid](a, b, c, act, float(slope), M, N, K, k_per_split, lda, ldb, ldc, ld_act,
                                 split_stride, A_T=a_t, B_T=b_t, C_T=c_t, SQUARE_A=square_a, EPILOGUE=epilogue,
                                 DOT_PRECISION=_DOT_PRECISION[a.dtype])
    return splits


def _weight_grad_splits(rows: int, out_rows: int, out_cols: int, device: torch.device) -> int:
    """Split-K count for a weight gradient reduced over `rows`: ~4 waves of 128x128 tiles on the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(out_rows, 128) * triton.cdiv(out_cols, 128)
    return max(1, min(triton.cdiv(rows, _SPLIT_K_MIN_ROWS), triton.cdiv(4 * sms, tiles)))


# ---------------------------------------------------------------------------------------------------
# Host checks and launchers
# ---------------------------------------------------------------------------------------------------
_DTYPES = (torch.bfloat16, torch.float32)
_INT32_LIMIT = 2 ** 31


def _check_inputs(where, x, w_up, w_down, slope):
    """Raise ValueError naming the argument and shapes for anything the kernel does not support."""
    if not isinstance(slope, (int, float)) or isinstance(slope, bool) or not math.isfinite(slope) or slope < 0:
        raise ValueError(f"{where}: slope={slope!r} must be a finite number >= 0 (a negative slope flips the sign "
                         "of leaky_relu, so the backward could not recover the sign of the pre-activation)")
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have a last dimension d, got a scalar")
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError(f"{where}: w_up and w_down must be 2-D, got w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    hidden, d = w_up.shape
    if x.shape[-1] != d:
        raise ValueError(f"{where}: x {tuple(x.shape)} has d={x.shape[-1]} in its last dimension but w_up "
                         f"{tuple(w_up.shape)} expects d={d} (w_up is [hidden, d])")
    if tuple(w_down.shape) != (d, hidden):
        raise ValueError(f"{where}: w_down {tuple(w_down.shape)} must be [d, hidden] = ({d}, {hidden}) to match "
                         f"w_up {tuple(w_up.shape)}")
    if hidden == 0 or d == 0:
        raise ValueError(f"{where}: empty weights w_up {tuple(w_up.shape)}")
    dtypes = {"x": x.dtype, "w_up": w_up.dtype, "w_down": w_down.dtype}
    if len(set(dtypes.values())) != 1 or x.dtype not in _DTYPES:
        raise ValueError(f"{where}: x, w_up and w_down must share one dtype out of bfloat16/float32 (cast them, or "
                         f"run under autocast), got {dtypes}")
    devices = {"x": x.device, "w_up": w_up.device, "w_down": w_down.device}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: x, w_up and w_down must be on one device, got {devices}")
    rows = x.numel() // d
    if max(rows, d) * max(hidden, d) >= _INT32_LIMIT:
        raise ValueError(f"{where}: x {tuple(x.shape)} makes a [{rows}, {hidden}] hidden state of 2^31 elements or "
                         "more, beyond the kernel's 32-bit offsets: split the batch")


def mlp_forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float):
    """x [M, d] -> (y [M, d], act [M, hidden]) with act = leaky_relu(x · W_upᵀ, slope) kept for backward.

    Inputs as mlp_triton validated them (the launchers do not check again)."""
    M, d = x.shape
    hidden = w_up.shape[0]
    act = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    y = torch.empty(M, d, device=x.device, dtype=x.dtype)
    if M == 0:
        return y, act
    _gemm("up", x, w_up.t(), act, epilogue=EPILOGUE_LEAKY, slope=slope)
    _gemm("down", act, w_down.t(), y, square_a=True)
    return y, act


def mlp_backward(dy: torch.Tensor, x: torch.Tensor, act: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 slope: float, k_splits: int | None = None):
    """Gradients (dx, dw_up, dw_down) from dy [M, d] and the forward's act [M, hidden].

    k_splits: split-K count for dW_down (None: enough programs for ~4 waves on the GPU). x, w_up and
    w_down are the forward's validated inputs, act its output; dy has y's shape and dtype (autograd).
    """
    M, d = x.shape
    hidden = w_up.shape[0]
    if M == 0:
        return x.new_zeros(x.shape), w_up.new_zeros(w_up.shape), w_down.new_zeros(w_down.shape)
    dpre = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    _gemm("dact", dy, w_down, dpre, epilogue=EPILOGUE_LEAKY_GRAD, act=act, slope=slope)
    dx = torch.mm(dpre, w_up)
    dw_up = torch.mm(dpre.t(), x)
    # dW_down = dyᵀ · act², computed as its transpose (act²)ᵀ · dy so that the squared operand is A (the
    # MMA operand that may come from registers) and written straight into dW_down's [d, hidden] layout.
    splits = _weight_grad_splits(M, hidden, d, x.device) if k_splits is None else max(1, int(k_splits))
    if splits == 1:
        dw_down = torch.empty(d, hidden, device=x.device, dtype=w_down.dtype)
        _gemm("dw_down", act.t(), dy, dw_down.t(), square_a=True)
    else:
        partial = torch.empty(splits, d, hidden, device=x.device, dtype=torch.float32)
        used = _gemm("dw_down", act.t(), dy, partial.transpose(1, 2), square_a=True, splits=splits)
        dw_down = partial[:used].sum(0).to(w_down.dtype)
    return dx, dw_up, dw_down


# ---------------------------------------------------------------------------------------------------
# The autograd op: custom ops with fakes, so torch.compile(fullgraph=True) traces them as single nodes
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("ouroboros::mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    return mlp_forward(x, w_up, w_down, slope)


@_mlp_op.register_fake
def _mlp_op_fake(x, w_up, w_down, slope):
    return x.new_empty(x.shape[0], x.shape[1]), x.new_empty(x.shape[0], w_up.shape[0])


@torch.library.custom_op("ouroboros::mlp_backward", mutates_args=())
def _mlp_backward_op(dy: torch.Tensor, x: torch.Tensor, act: torch.Tensor, w_up: torch.Tensor,
                     w_down: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_backward(dy, x, act, w_up, w_down, slope)


@_mlp_backward_op.register_fake
def _mlp_backward_op_fake(dy, x, act, w_up, w_down, slope):
    return x.new_empty(x.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)  # contiguous, as mm


def _setup_context(ctx, inputs, output):
    x, w_up, w_down, slope = inputs
    _, act = output
    ctx.mark_non_differentiable(act)
    ctx.save_for_backward(x, act, w_up, w_down)
    ctx.slope = slope


def _backward(ctx, dy, _dact):
    x, act, w_up, w_down = ctx.saved_tensors
    dx, dw_up, dw_down = torch.ops.ouroboros.mlp_backward(dy, x, act, w_up, w_down, ctx.slope)
    return dx, dw_up, dw_down, None


_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# Under autocast the model's fp32 master weights meet bf16 activations: all three are cast, as F.linear would.
@input_policy("mlp", _check_inputs, autocast=("x", "w_up", "w_down"))
def mlp_triton(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """The fused kernel behind kernels.mlp: x [..., d], w_up [hidden, d], w_down [d, hidden] -> [..., d]."""
    y, _ = torch.ops.ouroboros.mlp(x.reshape(-1, x.shape[-1]), w_up, w_down, float(slope))
    return y.view(x.shape)


# ---------------------------------------------------------------------------------------------------
# sm_90 compile check: every configuration the launchers can launch
# ---------------------------------------------------------------------------------------------------
# What each launch compiles to at the training shapes: (name, launch, A_T, B_T, C_T, SQUARE_A, EPILOGUE,
# output is fp32 partial sums).
_LAUNCHES = [
    ("up_leaky", "up", False, True, False, False, EPILOGUE_LEAKY, False),                # x · W_upᵀ
    ("down_square", "down", False, True, False, True, EPILOGUE_NONE, False),             # act² · W_downᵀ
    ("dact_leaky_grad", "dact", False, False, False, False, EPILOGUE_LEAKY_GRAD, False),  # dy · W_down
    ("dw_down", "dw_down", True, False, True, True, EPILOGUE_NONE, False),               # (act²)ᵀ · dy
    ("dw_down_split", "dw_down", True, False, True, True, EPILOGUE_NONE, True),          # the same, fp32 partials
]


def sm90_configs() -> list[dict]:
    """One entry per (launch x dtype x tile config) the GPU launchers can run, for bench/sm90.py.

    Every integer argument is a multiple of 16 at the training shapes (d = 512, hidden 1536/3072,
    M = 48·2048); Triton specializes on that, so the check compiles the same way.
    """
    out = []
    for dtype, table in ((torch.bfloat16, _BF16_CONFIGS), (torch.float32, _FP32_CONFIGS)):
        ty = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        for name, launch, a_t, b_t, c_t, square_a, epilogue, fp32_out in _LAUNCHES:
            if fp32_out and dtype == torch.float32:
                continue  # the same kernel as the unsplit fp32 launch
            for cfg in table[launch]:
                kw = cfg.kwargs
                ints = ["M", "N", "K", "k_per_split", "lda", "ldb", "ldc", "ld_act", "split_stride"]
                signature = {"a_ptr": f"*{ty}", "b_ptr": f"*{ty}", "c_ptr": "*fp32" if fp32_out else f"*{ty}",
                             "act_ptr": f"*{ty}", "slope": "fp32", **{arg: "i32" for arg in ints}}
                constexprs = dict(A_T=a_t, B_T=b_t, C_T=c_t, SQUARE_A=square_a, EPILOGUE=epilogue,
                                  DOT_PRECISION=_DOT_PRECISION[dtype], **kw)
                out.append({
                    "name": f"mlp_{name}_{ty}_{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"
                            f"_w{cfg.num_warps}s{cfg.num_stages}",
                    "kernel": _gemm_kernel, "signature": signature, "constexprs": constexprs,
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                    "hgmma": dtype == torch.bfloat16,  # the fp32 "ieee" path runs on FMA units by design
                    "divisible_by_16": ints,
                })
    return out
