"""Soft-capped tied-head cross-entropy without materializing full fp32 logits.

With h = RMSNorm(x) [N, d] (N = B·T tokens), E the tied embedding [V, d] and c the softcap:
    z = h · Eᵀ,  logits = c · tanh(z / c),  loss = mean_i (logsumexp(logits_i) − logits_i[y_i])   (fp32)

Forward, one Triton kernel over blocks of rows: for each V tile it forms the z tile with tl.dot over d,
applies the softcap, folds the tile into an online log-sum-exp and picks out the target logit. Only
lse (fp32, one per row) is kept for backward; the loss is the mean of the per-row losses.

Backward, per chunk of rows: a Triton kernel recomputes each z tile, forms
    dz = (softmax − onehot(y)) · (upstream grad / N) · (1 − tanh²(z / c))
and stores it in the input dtype (bf16 on the GPU); then cuBLAS computes dh = dz · E and accumulates
dE += dzᵀ · h (fp32 across chunks).

Why this split, in bytes at the training shapes (N = 98,304 tokens per GPU, d = 512; V = 1024, or 8192 for
the record R1): one fp32 [N, V] tensor is 403 MB at V = 1024 and 3.2 GB at V = 8192 (1.6 GB even in bf16),
and the eager path writes and re-reads several (z, z/c, tanh, logits, log-softmax, and their gradients):
>= 3 GB of HBM traffic per step at V = 1024, ~1 ms at 3 TB/s, for ~0.3 ms of GEMM work, and 8x both at
V = 8192. The fused forward reads h (101 MB bf16) and E (1 MB; 8.4 MB at V = 8192) and writes 0.8 MB,
whatever V is. For backward, a dz chunk of CHUNK_ROWS = 8192 rows is 8192·V·2 bytes of bf16: 16.8 MB at
V = 1024, written once and read by the two GEMMs while it still sits in the H100's 50 MB L2; 134 MB at
V = 8192, which does not fit, and need not: those GEMMs do 2·d = 1024 FLOPs per 2-byte dz element they
read, 512 FLOP/B against the H100's ~270 (800 TFLOP/s over 3 TB/s), so they stay compute-bound from HBM.
Fewer rows to keep the chunk in L2 would cost more there: at 1024 rows the dh GEMM has 32 output tiles
of 128x128 for 132 SMs, and dE's fp32 accumulation (the 8.4 MB bf16 product, plus a read and a write of
the 16.8 MB fp32 sum) would run 96 times instead of 12: 4.8 GB of traffic instead of 0.6 GB. So the
backward holds the forward's lse (4 bytes a row) and, while it runs, one dz chunk, the fp32 dE sum
(V·d·4 bytes) and its outputs; nothing of size [N, V].
The alternatives cost more: fusing dh into the dz kernel needs a [BLOCK_M, d] fp32 accumulator
(128·512·4 = 256 KB, the whole register file of an SM), so BLOCK_M would drop to 16-32 rows (no warpgroup
MMA) or d would be split with a recompute per slice; and dE is a reduction over all N rows, so per-block
fp32 partials would be V·d·4 bytes each (2 MB at V = 1024, 16.8 MB at V = 8192; 768 blocks of 128 rows)
or fp32 atomics on V·d addresses (contended and run-to-run nondeterministic). The two GEMMs have no
prologue or epilogue left to fuse once dz exists, so cuBLAS runs them at its full speed.

Targets outside [0, V) are rejected with a ValueError when the targets are on the CPU (a cheap check,
no device sync). On CUDA a host check would cost a device-to-host sync every step (and break CUDA
graphs), so there the kernel instead makes the loss, lse and every gradient NaN for such rows: a bad
target poisons the step visibly rather than being read out of bounds (no load is indexed by a target).

Dtypes: h and weight share one dtype, bf16 or fp32; the loss and lse are fp32; dh and dweight come
back in the input dtype. Under autocast `softcap_cross_entropy_triton` casts both to the autocast dtype
first, as F.linear would (the input policy of kernels/_runtime.py, which also validates the inputs once
per call). The torch path (KERNELS=torch) is `softcap_cross_entropy_reference`, the model's own
maths (F.linear, softcap, F.cross_entropy), so its numbers do not change.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy


def softcap_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    softcap: float) -> torch.Tensor:
    """h [..., d], weight [V, d], targets [...] int64 -> the mean fp32 cross-entropy of c·tanh(h·Eᵀ / c).

    Exactly the model's head maths (fp64 stays fp64, for gradcheck)."""
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[BLOCK_M, BLOCK_V] = h[offs_m, :] · E[offs_v, :]ᵀ in fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + offs_m[:, None] * stride_h + offs_d[None, :]
    w_ptrs = w_ptr + offs_v[None, :] * stride_w + offs_d[:, None]  # Eᵀ tile [BLOCK_D, BLOCK_V]
    z = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = offs_d < D - d0
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        z = tl.dot(h, w, z, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return z


# Logits are carried in log2 units, logit2 = log2(e)·c·tanh(z/c), as in kernels/attention.py, so the softmax's
# exponentials are bare exp2 (MUFU.EX2, no multiply in front); the host folds c into the two scales
# tanh_scale = −2·log2(e)/c and logit2_scale = c·log2(e) (_softcap_scales).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softcapped_tanh(z, tanh_scale):
    """tanh(z / c) for tanh_scale = −2·log2(e)/c: exp(−2|z|/c) as one exp2, which never overflows (no libdevice).

    Two MUFU ops per element (EX2 and the division's RCP); dividing z by c first cost a third. Why it counts:
    at d = 512 the z tile's MMA takes 2·512 / 4096 = 0.25 SM cycles per element on the H100, and MUFU issues
    16 results per SM cycle, so four MUFU ops per element (with the softmax's exp2) took as long as the MMA."""
    e = tl.exp2(tl.abs(z) * tanh_scale)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, loss_ptr, lse_ptr, N, V, D, stride_h, stride_w,
                    tanh_scale, logit2_scale, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: lse = logsumexp_v(c·tanh(z/c)) and loss = lse − logit[target] (NaN for a target outside [0, V))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    target = tl.load(targets_ptr + offs_m, mask=mask_m, other=0)
    valid = (target >= 0) & (target < V)
    target = target.to(tl.int32)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max and sum, log2 units
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                    DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
        logit2 = logit2_scale * _softcapped_tanh(z, tanh_scale)
        logit2 = tl.where(mask_v[None, :], logit2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logit2, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logit2 - new_max[:, None]), 1)
        row_max = new_max
        target_logit2 += tl.sum(tl.where(offs_v[None, :] == target[:, None], logit2, 0.0), 1)
    lse = row_max * _LN2 + tl.log(row_sum)  # row_sum is a sum of exp(logit − max): its log is in natural units
    lse = tl.where(valid, lse, float("nan"))
    tl.store(lse_ptr + offs_m, lse, mask=mask_m)
    tl.store(loss_ptr + offs_m, lse - target_logit2 * _LN2, mask=mask_m)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, grad_ptr, dz_ptr, N, V, D, stride_h, stride_w, stride_dz,
               tanh_scale, logit2_scale, inv_count, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz tile = (softmax − onehot) · grad / count · (1 − tanh²(z/c)), z recomputed; stored in dz's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < N
    mask_v = offs_v < V
    z = _z_tile(h_ptr, w_ptr, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D)
    target = tl.load(targets_ptr + offs_m, mask=mask_m, other=0).to(tl.int32)  # invalid rows have lse NaN
    lse2 = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0) * _LOG2E
    scale = tl.load(grad_ptr).to(tl.float32) * inv_count
    t = _softcapped_tanh(z, tanh_scale)
    prob = tl.exp2(logit2_scale * t - lse2[:, None])
    dlogit = prob - tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0)
    dz = dlogit * scale * (1.0 - t * t)
    tl.store(dz_ptr + offs_m[:, None] * stride_dz + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------------------
def _config(bm, bv, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


# H100, bf16. The z accumulator holds BLOCK_M·BLOCK_V fp32 values over the CTA's threads: 64 registers a thread
# at 128x128 on 8 warps, 128 at 128x256 on 8 warps or 64x256 on 4; the online softmax keeps a logit tile of the
# same size live for its row max, so 256-wide tiles reach ~250 of the 255 registers (bench/sm90.py: no spills).
# BLOCK_D sets only the shared memory of a pipeline stage, (BLOCK_M + BLOCK_V)·BLOCK_D·2 bytes, and the number of
# K steps (d / BLOCK_D = 8 at d = 512, BLOCK_D = 64). Each K step loads (BLOCK_M + BLOCK_V)·BLOCK_D·2 bytes
# from L2 for 2·BLOCK_M·BLOCK_V·BLOCK_D FLOPs: BLOCK_M·BLOCK_V / (BLOCK_M + BLOCK_V) FLOP/B, 64 at 128x128 and
# 85 at 128x256.
#
# Tuned at V = 1024: 128-row tiles so each K step feeds warpgroup MMAs, 3-4 stages of h/E tiles in shared. The
# forward's online-softmax state spilled at 128x64 with 4 warps, so that tile gets 8.
_SMALL_VOCAB_BF16 = {
    "forward": [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 8, 4), _config(64, 128, 64, 4, 4)],
    "dz": [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4)],
}
# From V = LARGE_VOCAB on (R1: V = 8192) a forward program loops over V / BLOCK_V tiles of its rows (64 tiles of
# 128 at V = 8192, against 8 at V = 1024), and V = 1024's choice must not move, so the forward gets candidates of
# its own: the widest tile that fits, 128x256 on 8 warps (fewest L2 bytes per FLOP; one CTA per SM); 64x256 on
# 4 warps (~250 registers x 128 threads is half the SM's register file and 4 stages take 80 KB of shared memory,
# so two CTAs share an SM and one's softmax runs under the other's MMA); and 128x128, V = 1024's first choice.
# A dz program is one [BLOCK_M, BLOCK_V] tile over the full d whatever V is (V only widens its grid) and its
# 256-wide tiles spill (8 B at 128x256 on 8 warps under triton 3.7.1, at 64x256 on 4 under 3.6 and 3.7.1), so
# dz keeps its list; the autotuner still times it again at each V.
LARGE_VOCAB = 4096
_LARGE_VOCAB_BF16 = {
    "forward": [_config(128, 256, 64, 8, 3), _config(64, 256, 32, 4, 4), _config(128, 128, 64, 8, 3)],
    "dz": _SMALL_VOCAB_BF16["dz"],
}
# fp32 with input_precision="ieee" runs on FMA units, not tensor cores: the correctness path, modest tiles.
_FP32_CONFIGS = {launch: [_config(64, 64, 32, 4, 3)] for launch in _SMALL_VOCAB_BF16}
_GPU_CONFIGS = {(torch.bfloat16, "small"): _SMALL_VOCAB_BF16, (torch.bfloat16, "large"): _LARGE_VOCAB_BF16,
                (torch.float32, "small"): _FP32_CONFIGS, (torch.float32, "large"): _FP32_CONFIGS}
# Interpreter: ~3 ms per program and per dot step whatever the size, so few big tiles and one config per
# launch; the large vocabulary's is 256 wide like its GPU forward tiles. The tests' odd sizes (V = 200 or 8100,
# d = 48) still leave partial tiles in V and d.
_INTERPRETER_CONFIGS = {"small": [_config(64, 128, 64, 4, 1)], "large": [_config(64, 256, 64, 4, 1)]}


def _vocab_class(V: int) -> str:
    """Which tile tables a vocabulary of V rows uses: "small" (tuned at V = 1024) or "large" (R1's 8192)."""
    return "large" if V >= LARGE_VOCAB else "small"


_KERNELS = {"forward": _forward_kernel, "dz": _dz_kernel}
# V and D key the tuning; N is left out so a new batch size does not re-tune.
_LAUNCH = {(launch, dtype, vocab): triton.autotune(
               configs=_INTERPRETER_CONFIGS[vocab] if INTERPRET else table[launch], key=["V", "D"])(_KERNELS[launch])
           for (dtype, vocab), table in _GPU_CONFIGS.items() for launch in _KERNELS}
_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float32: "ieee"}  # tf32 is the default and a no-op for bf16
# Backward rows per dz chunk: 8192·V·2 bytes of bf16, 16.8 MB at V = 1024 (it stays in the H100's L2) and 134 MB
# at V = 8192 (it does not, and need not: see the module docstring).
CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------------------------------
# Host checks and launchers
# ---------------------------------------------------------------------------------------------------
_DTYPES = (torch.bfloat16, torch.float32)
_INT32_LIMIT = 2 ** 31


def _softcap_scales(softcap: float) -> tuple[float, float]:
    """The kernels' softcap constants (tanh_scale, logit2_scale) = (−2·log2(e)/c, c·log2(e))."""
    return -2.0 * math.log2(math.e) / softcap, softcap * math.log2(math.e)


def _check_inputs(where, h, weight, targets, softcap):
    """Raise ValueError naming the argument and its shape for anything the kernels do not support.

    h [..., d] and targets [...] as the caller passes them (the entry flattens them to [N, d] and [N])."""
    if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap)
            or softcap <= 0):
        raise ValueError(f"{where}: softcap={softcap!r} must be a finite number > 0 (LOGIT_SOFTCAP)")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"{where}: weight must be a non-empty 2-D [V, d] embedding, got {tuple(weight.shape)}")
    V, d = weight.shape
    if h.dim() < 1 or h.shape[-1] != d:
        raise ValueError(f"{where}: h must be [N, d] = [N, {d}] to match weight {tuple(weight.shape)}, "
                         f"got {tuple(h.shape)}")
    rows = h.numel() // d
    if rows == 0:
        raise ValueError(f"{where}: h {tuple(h.shape)} has no rows: the mean loss over zero tokens is undefined")
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"{where}: targets {tuple(targets.shape)} must have h's leading shape "
                         f"{tuple(h.shape[:-1])} (h is [..., d])")
    if targets.dtype != torch.int64:
        raise ValueError(f"{where}: targets must be int64 token ids, got {targets.dtype}")
    if h.dtype != weight.dtype or h.dtype not in _DTYPES:
        raise ValueError(f"{where}: h and weight must share one dtype out of bfloat16/float32 (cast them, or run "
                         f"under autocast), got h {h.dtype}, weight {weight.dtype}")
    devices = {"h": h.device, "weight": weight.device, "targets": targets.device}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: h, weight and targets must be on one device, got {devices}")
    if max(h.numel(), min(rows, CHUNK_ROWS) * V, weight.numel()) >= _INT32_LIMIT:
        raise ValueError(f"{where}: h {tuple(h.shape)} / weight {tuple(weight.shape)} reach 2^31 elements, beyond "
                         "the kernels' 32-bit offsets: split the batch")


def _check_target_values(targets, V, where):
    """On the CPU, where it costs no device sync: every target must index a row of weight. A check of values,
    not of shapes, so it runs in the op's body at run time (a traced entry cannot read tensor values)."""
    if targets.device.type == "cpu" and targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= V:
            bad = ((targets < 0) | (targets >= V)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"{where}: targets must lie in [0, V) = [0, {V}) (V = weight.shape[0]), got values in "
                             f"[{low}, {high}]; first bad rows {bad}")


def softcap_cross_entropy_forward(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float):
    """h [N, d], weight [V, d], targets [N] -> (mean loss fp32 scalar, lse [N] fp32 kept for backward).

    Inputs as softcap_cross_entropy_triton validated them (contiguous); only the target values are checked here."""
    _check_target_values(targets, weight.shape[0], "softcap_cross_entropy")
    N, D = h.shape
    V = weight.shape[0]
    lse = torch.empty(N, device=h.device, dtype=torch.float32)
    row_loss = torch.empty(N, device=h.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)
    _LAUNCH["forward", h.dtype, _vocab_class(V)][grid](h, weight, targets, row_loss, lse, N, V, D, h.stride(0),
                                                       weight.stride(0), *_softcap_scales(softcap),
                                                       DOT_PRECISION=_DOT_PRECISION[h.dtype])
    return row_loss.mean(), lse


def softcap_cross_entropy_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   lse: torch.Tensor, softcap: float, chunk_rows: int = CHUNK_ROWS):
    """(dh, dweight) for upstream grad (a scalar) of the mean loss; dz is formed chunk_rows rows at a time.

    h, weight, targets are the forward's (validated, contiguous) inputs and lse its output."""
    N, D = h.shape
    V = weight.shape[0]
    if chunk_rows < 1:
        raise ValueError(f"softcap_cross_entropy_backward: chunk_rows={chunk_rows} must be >= 1")
    grad = grad.reshape(1).to(torch.float32)  # read on the device by the kernel: no host sync
    dh = torch.empty_like(h)
    dweight = torch.zeros(V, D, device=h.device, dtype=torch.float32)
    rows = min(chunk_rows, N)
    dz = torch.empty(rows, V, device=h.device, dtype=h.dtype)
    kernel = _LAUNCH["dz", h.dtype, _vocab_class(V)]
    for start in range(0, N, rows):
        end = min(N, start + rows)
        h_chunk, dz_chunk = h[start:end], dz[:end - start]
        grid = lambda meta: (triton.cdiv(end - start, meta["BLOCK_M"]), triton.cdiv(V, meta["BLOCK_V"]))
        kernel[grid](h_chunk, weight, targets[start:end], lse[start:end], grad, dz_chunk, end - start, V, D,
                     h.stride(0), weight.stride(0), dz_chunk.stride(0), *_softcap_scales(softcap), 1.0 / N,
                     DOT_PRECISION=_DOT_PRECISION[h.dtype])
        torch.mm(dz_chunk, weight, out=dh[start:end])
        dweight += torch.mm(dz_chunk.t(), h_chunk)  # fp32 accumulation across chunks
    return dh, dweight.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# The autograd op: custom ops with fakes, so torch.compile(fullgraph=True) traces them as single nodes
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("ouroboros::softcap_cross_entropy", mutates_args=())
def _softcap_ce_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return softcap_cross_entropy_forward(h, weight, targets, softcap)


@_softcap_ce_op.register_fake
def _softcap_ce_op_fake(h, weight, targets, softcap):
    return h.new_empty((), dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("ouroboros::softcap_cross_entropy_backward", mutates_args=())
def _softcap_ce_backward_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            lse: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return softcap_cross_entropy_backward(grad, h, weight, targets, lse, softcap)


@_softcap_ce_backward_op.register_fake
def _softcap_ce_backward_op_fake(grad, h, weight, targets, lse, softcap):
    return torch.empty_like(h, memory_format=torch.contiguous_format), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    h, weight, targets, softcap = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(h, weight, targets, lse)
    ctx.softcap = softcap


def _backward(ctx, grad, _dlse):
    h, weight, targets, lse = ctx.saved_tensors
    dh, dweight = torch.ops.ouroboros.softcap_cross_entropy_backward(grad, h, weight, targets, lse, ctx.softcap)
    return dh, dweight, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


# Under autocast the fp32 master embedding meets bf16 activations: both are cast, as F.linear would (targets
# stay int64). The kernels read rows of h and weight with unit stride along d.
@input_policy("softcap_cross_entropy", _check_inputs, autocast=("h", "weight"),
              contiguous=("h", "weight", "targets"))
def softcap_cross_entropy_triton(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float) -> torch.Tensor:
    """The fused kernel behind kernels.softcap_cross_entropy: h [..., d], weight [V, d], targets [...] int64
    -> the mean fp32 loss (a scalar)."""
    loss, _ = torch.ops.ouroboros.softcap_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                                        float(softcap))
    return loss


# ---------------------------------------------------------------------------------------------------
# sm_90 compile check: every configuration the launchers can launch
# ---------------------------------------------------------------------------------------------------
def sm90_configs() -> list[dict]:
    """One entry per (kernel x dtype x tile config) the GPU launchers can run, for bench/sm90.py: both
    vocabulary classes' tables, a tile that both list compiled once (the code does not depend on V).

    At the training shapes V = 1024 or 8192, d = 512, N = 98,304 and their strides are multiples of 16.
    """
    out = {}
    for (dtype, _), table in _GPU_CONFIGS.items():
        ty = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        for launch, kernel in _KERNELS.items():
            if launch == "forward":
                signature = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                             "lse_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                             "stride_w": "i32", "tanh_scale": "fp32", "logit2_scale": "fp32"}
                ints = ["N", "V", "D", "stride_h", "stride_w"]
            else:
                signature = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "targets_ptr": "*i64", "lse_ptr": "*fp32",
                             "grad_ptr": "*fp32", "dz_ptr": f"*{ty}", "N": "i32", "V": "i32", "D": "i32",
                             "stride_h": "i32", "stride_w": "i32", "stride_dz": "i32", "tanh_scale": "fp32",
                             "logit2_scale": "fp32", "inv_count": "fp32"}
                ints = ["N", "V", "D", "stride_h", "stride_w", "stride_dz"]
            for cfg in table[launch]:
                kw = cfg.kwargs
                name = (f"head_{launch}_{ty}_{kw['BLOCK_M']}x{kw['BLOCK_V']}x{kw['BLOCK_D']}"
                        f"_w{cfg.num_warps}s{cfg.num_stages}")
                out[name] = {
                    "name": name, "kernel": kernel, "signature": signature,
                    "constexprs": dict(DOT_PRECISION=_DOT_PRECISION[dtype], **kw),
                    "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                    "hgmma": dtype == torch.bfloat16,  # the fp32 "ieee" path runs on FMA units by design
                    "divisible_by_16": ints,
                }
    return list(out.values())
