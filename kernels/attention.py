"""Causal GQA attention with a per-head q_gain, XSA ("exclusive self attention"), an optional per-head
output gate and optional document isolation ("varlen" segments).

Inputs are already QK-normed and rotated: q [B, T, Hq, D], k and v [B, T, Hkv, D], Hq a multiple of
Hkv (query head h reads KV head h // (Hq // Hkv)). The op computes, per query head,
    y = softmax((q_gain[h] · q) kᵀ / sqrt(D), causal) v
and, when xsa is on, removes from y the component along the token's own normalized value:
    y ← y − (y·v̂) v̂,  v̂ = v_t / max(||v_t||, 1e-12).
With `gate` [B, T, Hq] (the caller's sigmoid values) the result is then scaled per token and head:
y[b, t, h, :] ← gate[b, t, h] · y[b, t, h, :]. With `cu_seqlens` (int32 [n + 1], cumulative segment
offsets into the time axis of one packed row, B = 1) a query sees only the keys of its own segment:
attention is causal within each segment and nothing crosses a boundary; empty segments are no-ops.
This file holds the PyTorch references, the Triton kernels (forward, and a three-kernel backward),
their launchers, the autograd op `ouroboros::attention` and `attention_triton`, which kernels/ dispatches to.
Under autocast `attention_triton` casts q, k, v and gate to the autocast dtype first, as SDPA does (the
input policy of kernels/_runtime.py, which also validates the inputs once per call and makes them contiguous).
"""

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._runtime import INTERPRET, input_policy


def _xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y [B, T, Hq, D], v [B, T, Hkv, D]: subtract from each head's output its own-value component."""
    group = y.shape[2] // v.shape[2]
    v_hat = F.normalize(v, dim=-1, eps=1e-12).repeat_interleave(group, dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def _segment_index(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[T] int64: the segment of each token, the last i with cu_seqlens[i] <= t (so never an empty one)."""
    tokens = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def segment_bounds(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """int32 [2, T]: each token's segment start (row 0) and end (row 1, exclusive), what the kernels read.

    Torch ops on cu_seqlens' device, no host sync: torch.compile traces it into the model's graph."""
    index = _segment_index(cu_seqlens, T)
    return torch.stack((cu_seqlens[index], cu_seqlens[index + 1]))


def _visible(T: int, cu_seqlens, device) -> torch.Tensor:
    """[T, T] bool: query t sees key s (causal, and inside t's segment when cu_seqlens is given)."""
    visible = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if cu_seqlens is not None:
        index = _segment_index(cu_seqlens, T)
        visible &= index[:, None] == index[None, :]
    return visible


def attention_reference(q, k, v, q_gain, xsa: bool, gate=None, cu_seqlens=None):
    """Explicit fp32 softmax (fp64 for fp64 inputs, for gradcheck): the ground truth the kernel is tested
    against. Returns y [B, T, Hq, D] in q's dtype."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc) * q_gain.to(acc).view(1, 1, Hq, 1)
    kf = k.to(acc).repeat_interleave(group, dim=2)
    vf = v.to(acc).repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) / D ** 0.5
    probs = scores.masked_fill(~_visible(T, cu_seqlens, q.device), float("-inf")).softmax(dim=-1)
    y = torch.einsum("bhts,bshd->bthd", probs, vf)
    if xsa:
        y = _xsa(y, v.to(acc))
    if gate is not None:
        y = y * gate.to(acc).unsqueeze(-1)
    return y.to(q.dtype)


def attention_sdpa(q, k, v, q_gain, xsa: bool, gate=None, cu_seqlens=None):
    """The eager PyTorch path: SDPA (flash backend on CUDA) plus eager q_gain, XSA and gate. With
    cu_seqlens: a block-diagonal causal mask, dense [T, T] (no flash backend, O(T²) memory) or, outside
    torch.compile when the longest segment L is at most T / 4, banded (_banded_segment_attention: O(T·L))."""
    T, Hq = q.shape[1], q.shape[2]
    q = q * q_gain.to(q.dtype).view(1, 1, Hq, 1)
    longest = 0 if cu_seqlens is None or torch.compiler.is_compiling() else int(cu_seqlens.diff().max())
    if 0 < longest <= T // 4:
        y = _banded_segment_attention(q, k, v, cu_seqlens, longest)
    else:
        mask = None if cu_seqlens is None else _visible(T, cu_seqlens, q.device)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=True).transpose(1, 2)
    if xsa:
        y = _xsa(y, v)
    return y if gate is None else y * gate.to(y.dtype).unsqueeze(-1)


def _banded_segment_attention(q, k, v, cu_seqlens, L: int):
    """Segment-causal SDPA when no segment is longer than L: queries in chunks of L see only their own chunk
    and the one before (a segment that ends in chunk c starts at most L - 1 tokens earlier), so the row costs
    T·2L scores instead of T². Padding tokens form their own segment; the chunk before the first is never
    visible."""
    B, T, Hq, D = q.shape
    n = -(-T // L)
    index = F.pad(_segment_index(cu_seqlens, T), (0, n * L - T), value=-1).view(n, L)
    keys_index = torch.cat((torch.full_like(index[:1], -2), index), 0)           # chunk -1: never visible
    keys_index = torch.cat((keys_index[:-1], keys_index[1:]), 1)                 # [n, 2L]: previous + own chunk
    position = torch.arange(2 * L, device=q.device)
    mask = (index[:, :, None] == keys_index[:, None, :]) & (position[None, :] <= position[:L, None] + L)

    def chunks(t, with_previous):
        t = F.pad(t, (0, 0, 0, 0, 0, n * L - T)).view(B, n, L, t.shape[2], D)
        if with_previous:
            t = torch.cat((torch.cat((torch.zeros_like(t[:, :1]), t[:, :-1]), 1), t), 2)
        return t.flatten(0, 1).transpose(1, 2)                                     # [B·n, H, L or 2L, D]

    y = F.scaled_dot_product_attention(chunks(q, False), chunks(k, True), chunks(v, True),
                                       attn_mask=mask.repeat(B, 1, 1).unsqueeze(1), enable_gqa=True)
    return y.transpose(1, 2).reshape(B, n * L, Hq, D)[:, :T]


# --------------------------------------------------------------------------------------------------
# Triton kernels
#
# Scores live in log2 units inside the kernels: s2 = (q·k) · q_gain[h] / sqrt(D) · log2(e), so the
# softmax uses exp2 and the saved log-sum-exp (LSE) is in log2 units too. q_gain and 1/sqrt(D) are
# folded into one scale per head, applied to the fp32 scores rather than to q, so bf16 q is never
# re-rounded after the gain.
#
# Causal block skipping: a query block [m0, m0 + BLOCK_M) only visits key blocks up to its diagonal;
# key blocks strictly below the diagonal need no mask, so each loop runs in two phases (unmasked,
# then the diagonal blocks with the causal and T masks), three with segments (below).
#
# Segments (HAS_SEGMENTS): SEGMENTS is int32 [2, T], each token's segment start and end
# (segment_bounds). Token m sees key n iff start(m) <= n <= m. Starts never decrease along t, so a
# query block needs keys only from its first row's start; below its last row's start some rows see a
# key and others do not, so those key blocks get the segment mask, the ones above it up to the
# diagonal run unmasked, and the diagonal blocks get both masks. The dk/dv kernel walks the same
# range from the key side with the segment ends: query m sees key n iff n <= m < end(n). A row that
# has seen no key yet (its segment begins further on) keeps a running max of -inf, which the masked
# phases guard so that exp2 does not make NaN.
#
# The gate (HAS_GATE) scales y after XSA. The forward also stores the output before the gate, y_pre:
# the backward needs it for d gate = rowsum(dy · y_pre) and, as y without a gate, for softmax's delta
# and XSA; dividing y by the gate instead would fail where the gate underflows.
#
# XSA backward without storing the pre-XSA output o: y = P o with P = I - v̂v̂ᵀ symmetric, so
#   dL/do = P dy,   dL/dv̂ = -(o·v̂) dy - (dy·v̂) o,   rowsum(dL/do · o) = rowsum(dy · y),
# and o itself is y + c·v̂ with c = o·v̂, one fp32 scalar per row saved by the forward. Softmax's
# delta is computed as rowsum(dO · o) from the dO as stored (bf16-rounded), which keeps it consistent
# with the dO the dk/dv and dq kernels read (measured: lower d(q_gain) error than rowsum(dy · y)).
# With a gate, dy is gate · (the incoming gradient) in all of this.
# --------------------------------------------------------------------------------------------------
_LOG2E = tl.constexpr(1.4426950408889634)
_NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps in the reference


@triton.jit
def _segment_key_range(SEGMENTS, row_start, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows [row_start, row_start + BLOCK_M): the first key block any of them sees, and the first
    from which every row sees every key below the diagonal (both multiples of BLOCK_N)."""
    first_start = tl.load(SEGMENTS + row_start)
    last_start = tl.load(SEGMENTS + tl.minimum(row_start + BLOCK_M, T) - 1)
    return first_start // BLOCK_N * BLOCK_N, tl.minimum(tl.cdiv(last_start, BLOCK_N) * BLOCK_N, row_start)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, seg_start, start_n, T, row_stride, scale2,
               D: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, SEGMENT_MASK: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_offs = offs_n[:, None] * row_stride + offs_d[None, :]
    if DIAGONAL:
        col_ok = offs_n < T
        k = tl.load(k_base + kv_offs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_offs, mask=col_ok[:, None], other=0.0)
    else:  # strictly below the diagonal: every key is < T
        k = tl.load(k_base + kv_offs)
        v = tl.load(v_base + kv_offs)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale2
    if DIAGONAL:
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
        s = tl.where(visible, s, float("-inf"))
    if SEGMENT_MASK:
        s = tl.where(offs_n[None, :] >= seg_start[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SEGMENT_MASK:  # rows with no visible key so far: subtract 0, so p and alpha are 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q, K, V, QGAIN, GATE, SEGMENTS, Y, Y_PRE, LSE, XDOT, T, HQ, HKV, GROUP, sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, XSA: tl.constexpr,
                     HAS_GATE: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Writes y, the LSE, (XSA) c = o·v̂ and
    (gate) the output before the gate."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_rows = HQ * D  # element stride between tokens
    kv_rows = HKV * D
    q_ptrs = Q + b * T * q_rows + h * D + offs_m[:, None] * q_rows + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    scale2 = tl.load(QGAIN + h).to(tl.float32) * sm_scale * _LOG2E
    k_base = K + b * T * kv_rows + hk * D
    v_base = V + b * T * kv_rows + hk * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    diag_lo = pid_m * BLOCK_M
    if HAS_SEGMENTS:
        seg_start = tl.load(SEGMENTS + offs_m, mask=row_ok, other=0)
        lo, full_lo = _segment_key_range(SEGMENTS, diag_lo, T, BLOCK_M, BLOCK_N)
        for start_n in range(lo, full_lo, BLOCK_N):
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows,
                                       scale2, D, BLOCK_N, False, True)
    else:  # one segment from 0
        seg_start = tl.zeros([BLOCK_M], tl.int32)
        full_lo = 0
    for start_n in range(full_lo, diag_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows,
                                   scale2, D, BLOCK_N, False, False)
    for start_n in range(diag_lo, tl.minimum(diag_lo + BLOCK_M, T), BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows,
                                   scale2, D, BLOCK_N, True, HAS_SEGMENTS)
    acc = acc / l_i[:, None]
    stat_start = b * HQ * T + h * T  # LSE and c are [B, HQ, T]
    tl.store(LSE + stat_start + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    if XSA:  # fused epilogue: remove the component along the token's own normalized value
        v_own = tl.load(v_base + offs_m[:, None] * kv_rows + offs_d[None, :], mask=row_ok[:, None],
                        other=0.0).to(tl.float32)
        v_hat = v_own / tl.maximum(tl.sqrt(tl.sum(v_own * v_own, 1)), _NORM_EPS)[:, None]
        c = tl.sum(acc * v_hat, 1)
        acc = acc - c[:, None] * v_hat
        tl.store(XDOT + stat_start + offs_m, c, mask=row_ok)
    y_offs = b * T * q_rows + h * D + offs_m[:, None] * q_rows + offs_d[None, :]
    if HAS_GATE:  # after XSA; the backward reads the output before the gate
        tl.store(Y_PRE + y_offs, acc.to(Y_PRE.dtype.element_ty), mask=row_ok[:, None])
        gate = tl.load(GATE + b * T * HQ + offs_m * HQ + h, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
    tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_preprocess_kernel(DY, Y, V, GATE, XDOT, DO, DELTA, DVX, DGATE, T, HQ, HKV, GROUP,
                                D: tl.constexpr, BLOCK_M: tl.constexpr, XSA: tl.constexpr,
                                HAS_GATE: tl.constexpr):
    """One program: BLOCK_M tokens of one (batch, KV head), looping over the query heads that share it.

    Y is the output before the gate. delta = rowsum(dy·y) for softmax's backward; with XSA or a gate
    also dO (the gradient wrt the pre-XSA output: P · gate · dy), with XSA the v̂ path's gradient into
    v, summed over the group without atomics, and with a gate d gate = rowsum(dy · y).
    """
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    hk = pid_bk % HKV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_rows = HQ * D
    kv_rows = HKV * D
    # 64-bit scalar starts, 32-bit tile offsets: keeps the per-element address maths small
    kv_start = b * T * kv_rows + hk * D
    kv_tile = offs_m[:, None] * kv_rows + offs_d[None, :]
    q_tile = offs_m[:, None] * q_rows + offs_d[None, :]
    if XSA:
        v_own = tl.load(V + kv_start + kv_tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
        v_norm = tl.sqrt(tl.sum(v_own * v_own, 1))
        inv_norm = 1.0 / tl.maximum(v_norm, _NORM_EPS)
        v_hat = v_own * inv_norm[:, None]
        dv_hat = tl.zeros([BLOCK_M, D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_start = b * T * q_rows + h * D
        dy = tl.load(DY + q_start + q_tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
        y = tl.load(Y + q_start + q_tile, mask=row_ok[:, None], other=0.0).to(tl.float32)
        stat_start = b * HQ * T + h * T
        if HAS_GATE:  # [B, T, HQ]
            gate_offs = b * T * HQ + offs_m * HQ + h
            tl.store(DGATE + gate_offs, tl.sum(dy * y, 1).to(DGATE.dtype.element_ty), mask=row_ok)
            dy = dy * tl.load(GATE + gate_offs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if XSA:
            c = tl.load(XDOT + stat_start + offs_m, mask=row_ok, other=0.0)
            dy_v = tl.sum(dy * v_hat, 1)
            d_pre = (dy - dy_v[:, None] * v_hat).to(DO.dtype.element_ty)
            tl.store(DO + q_start + q_tile, d_pre, mask=row_ok[:, None])
            o = y + c[:, None] * v_hat  # the pre-XSA output, rebuilt
            tl.store(DELTA + stat_start + offs_m, tl.sum(d_pre.to(tl.float32) * o, 1), mask=row_ok)
            dv_hat -= c[:, None] * dy + dy_v[:, None] * o
        elif HAS_GATE:
            d_pre = dy.to(DO.dtype.element_ty)
            tl.store(DO + q_start + q_tile, d_pre, mask=row_ok[:, None])
            tl.store(DELTA + stat_start + offs_m, tl.sum(d_pre.to(tl.float32) * y, 1), mask=row_ok)
        else:
            tl.store(DELTA + stat_start + offs_m, tl.sum(dy * y, 1), mask=row_ok)
    if XSA:  # through v̂ = v / max(||v||, eps): project out v̂ unless the clamp is active
        radial = tl.sum(dv_hat * v_hat, 1)
        tangential = tl.where((v_norm > _NORM_EPS)[:, None], dv_hat - radial[:, None] * v_hat, dv_hat)
        tl.store(DVX + kv_start + kv_tile, tangential * inv_norm[:, None], mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, seg_end, start_m, T, q_rows,
                    scale2, scale, D: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                    SEGMENT_MASK: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_t = tl.load(q_base + offs_m[None, :] * q_rows + offs_d[:, None], mask=row_ok[None, :], other=0.0)
    # LSE = +inf past T makes p exactly 0 on rows that do not exist
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    p_t = tl.math.exp2(tl.dot(k, q_t, input_precision="ieee") * scale2 - lse[None, :])
    if DIAGONAL:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    if SEGMENT_MASK:
        p_t = tl.where(offs_m[None, :] < seg_end[:, None], p_t, 0.0)
    do = tl.load(do_base + offs_m[:, None] * q_rows + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
    ds_t = p_t * (dp_t - delta[None, :]) * scale  # gradient wrt the natural-unit scores
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision="ieee")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, QGAIN, SEGMENTS, DO, LSE, DELTA, DVX, DK, DV, T, HQ, HKV, GROUP, sm_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, XSA: tl.constexpr,
                          HAS_SEGMENTS: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, KV head); loops over the group's query heads so that
    dk and dv are summed in registers (no atomics), then adds the XSA v̂ gradient."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    hk = pid_bk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < T
    q_rows = HQ * D
    kv_rows = HKV * D
    kv_start = b * T * kv_rows + hk * D
    kv_tile = offs_n[:, None] * kv_rows + offs_d[None, :]
    k = tl.load(K + kv_start + kv_tile, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_start + kv_tile, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    diag_lo = pid_n * BLOCK_N
    diag_hi = tl.minimum(diag_lo + BLOCK_N, T)
    if HAS_SEGMENTS:
        # Ends never decrease along t: every key of the block is seen by the queries below the first
        # key's end, some keys by the queries up to the last key's end, no key by any query after it.
        seg_end = tl.load(SEGMENTS + T + offs_n, mask=col_ok, other=0)
        full_hi = tl.maximum(tl.load(SEGMENTS + T + diag_lo) // BLOCK_M * BLOCK_M, diag_hi)
        seen_hi = tl.load(SEGMENTS + T + diag_hi - 1)
    else:  # one segment up to T
        seg_end = tl.full([BLOCK_N], T, tl.int32)
        full_hi = T
    for g in range(GROUP):
        h = hk * GROUP + g
        scale = tl.load(QGAIN + h).to(tl.float32) * sm_scale
        scale2 = scale * _LOG2E
        q_base = Q + b * T * q_rows + h * D
        do_base = DO + b * T * q_rows + h * D
        lse_base = LSE + b * HQ * T + h * T
        delta_base = DELTA + b * HQ * T + h * T
        for start_m in range(diag_lo, diag_hi, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, seg_end, start_m,
                                     T, q_rows, scale2, scale, D, BLOCK_M, True, HAS_SEGMENTS)
        for start_m in range(diag_hi, full_hi, BLOCK_M):
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, seg_end, start_m,
                                     T, q_rows, scale2, scale, D, BLOCK_M, False, False)
        if HAS_SEGMENTS:
            for start_m in range(full_hi, seen_hi, BLOCK_M):
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, seg_end,
                                         start_m, T, q_rows, scale2, scale, D, BLOCK_M, False, True)
    if XSA:
        dv += tl.load(DVX + kv_start + kv_tile, mask=col_ok[:, None], other=0.0)
    tl.store(DK + kv_start + kv_tile, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_start + kv_tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows, scale2,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, SEGMENT_MASK: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_offs = offs_n[:, None] * kv_rows + offs_d[None, :]
    if DIAGONAL:
        col_ok = offs_n < T
        k = tl.load(k_base + kv_offs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_offs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + kv_offs)
        v = tl.load(v_base + kv_offs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * scale2 - lse[:, None])
    if DIAGONAL:
        p = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T), p, 0.0)
    if SEGMENT_MASK:
        p = tl.where(offs_n[None, :] >= seg_start[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, QGAIN, SEGMENTS, DO, LSE, DELTA, DQ, GAIN_PARTS, T, HQ, HKV, GROUP, sm_scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Writes dq and this block's fp32
    partial of d(q_gain) = rowsum(dq_unscaled · q) / sqrt(D), reduced on the host (no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q_rows = HQ * D
    kv_rows = HKV * D
    q_start = b * T * q_rows + h * D
    q_tile = offs_m[:, None] * q_rows + offs_d[None, :]
    q = tl.load(Q + q_start + q_tile, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_start + q_tile, mask=row_ok[:, None], other=0.0)
    stat_start = b * HQ * T + h * T
    lse = tl.load(LSE + stat_start + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_start + offs_m, mask=row_ok, other=0.0)
    gain = tl.load(QGAIN + h).to(tl.float32)
    scale2 = gain * sm_scale * _LOG2E
    k_base = K + b * T * kv_rows + hk * D
    v_base = V + b * T * kv_rows + hk * D
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    diag_lo = pid_m * BLOCK_M
    if HAS_SEGMENTS:
        seg_start = tl.load(SEGMENTS + offs_m, mask=row_ok, other=0)
        lo, full_lo = _segment_key_range(SEGMENTS, diag_lo, T, BLOCK_M, BLOCK_N)
        for start_n in range(lo, full_lo, BLOCK_N):
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows, scale2,
                               D, BLOCK_N, False, True)
    else:  # one segment from 0
        seg_start = tl.zeros([BLOCK_M], tl.int32)
        full_lo = 0
    for start_n in range(full_lo, diag_lo, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows, scale2,
                           D, BLOCK_N, False, False)
    for start_n in range(diag_lo, tl.minimum(diag_lo + BLOCK_M, T), BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, offs_m, seg_start, start_n, T, kv_rows, scale2,
                           D, BLOCK_N, True, HAS_SEGMENTS)
    gain_part = tl.sum(tl.sum(q.to(tl.float32) * dq, 1), 0) * sm_scale
    tl.store(GAIN_PARTS + pid_bh * tl.num_programs(0) + pid_m, gain_part)
    tl.store(DQ + q_start + q_tile, (dq * (gain * sm_scale)).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Launch configurations: one table, used by the launchers and by sm90_configs().
# Chosen by compiling for sm_90 on a CPU machine (python -m bench.sm90; no H100 was available to
# time them): every configuration compiles with no spills or local memory, and the bf16 matrix
# kernels use HGMMA. bf16: 128-row query tiles over 64-key steps forward with 8 warps (two
# warpgroups of 64 rows); backward with 32 query rows per step in dk/dv and 32 keys per step in dq,
# so the wide side (k, v, dk, dv or q, do, dq) stays in registers. fp32 ("ieee" dots on CUDA cores,
# for tests) gets small tiles. The interpreter runs the bf16 tiles for both dtypes: they are what
# the model runs on the GPU, so the CPU tests exercise the production masking and loop bounds, and
# bigger tiles are cheaper to interpret. BLOCK_N divides BLOCK_M (fwd, dq) and BLOCK_M divides
# BLOCK_N (dk/dv): the diagonal phase must start on a tile boundary.
# --------------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)


def _launch_table(dtype: torch.dtype, head_dim: int, interpret: bool = INTERPRET, segments: bool = False) -> dict:
    """kernel name -> {constexpr tile sizes, num_warps, num_stages} for one dtype and head dim (and whether
    the launch has segments)."""
    d64 = head_dim == 64
    pre = dict(BLOCK_M=32 if d64 else 16, num_warps=4 if d64 else 8, num_stages=1)
    if dtype == torch.bfloat16 or interpret:
        if d64:  # dk/dv with segments: a third loop, which spills at 3 stages on triton 3.6
            return {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), "preprocess": pre,
                    "dkdv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2 if segments else 3),
                    "dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)}
        # head_dim 128 (not used by the model)
        return {"fwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2), "preprocess": pre,
                "dkdv": dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1),
                "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)}
    warps = 4 if d64 else 8
    # With segments the backward kernels' third loop makes ptxas spill a few registers at the plain fp32
    # settings (triton 3.6 and 3.7.1); 8 warps with these stages compile clean.
    return {"fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=warps, num_stages=2), "preprocess": pre,
            "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=8 if segments else warps, num_stages=1 if segments else 2),
            "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8 if segments else warps, num_stages=3 if segments else 2)}


def _tiles(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}


def _launch_opts(cfg: dict) -> dict:
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


CUDA_GRID_Y_LIMIT = 65_535


def _check_inputs(where, q, k, v, q_gain, gate=None, cu_seqlens=None) -> None:
    """Every shape, dtype and device rule the kernels rely on (the interpreter would not catch a violation)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_gain", q_gain)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"{where}: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    Hkv = k.shape[2]
    if B < 1 or T < 1 or Hq < 1 or Hkv < 1:
        raise ValueError(f"{where}: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{where}: query heads Hq={Hq} (q {tuple(q.shape)}) must be a multiple of KV heads "
                         f"Hkv={Hkv} (k {tuple(k.shape)})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{where}: head_dim D={D} (q {tuple(q.shape)}) is not supported by the Triton kernel; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if q_gain.shape != (Hq,):
        raise ValueError(f"{where}: q_gain must have shape ({Hq},) (one gain per query head of q "
                         f"{tuple(q.shape)}), got {tuple(q_gain.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: q, k, v must share one dtype out of {SUPPORTED_DTYPES}; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if not q_gain.dtype.is_floating_point:
        raise ValueError(f"{where}: q_gain must be floating point, got {q_gain.dtype}")
    devices = {t.device for t in (q, k, v, q_gain)}
    if len(devices) != 1:
        raise ValueError(f"{where}: q, k, v, q_gain must be on one device, got q {q.device}, k {k.device}, "
                         f"v {v.device}, q_gain {q_gain.device}")
    # Grid dimension 1 holds batch x heads (B·Hq programs), and CUDA caps that dimension at 65,535.
    if B * Hq > CUDA_GRID_Y_LIMIT:
        raise ValueError(f"{where}: batch x query heads = {B} x {Hq} = {B * Hq} (q {tuple(q.shape)}) exceeds CUDA's "
                         f"{CUDA_GRID_Y_LIMIT:,} programs in grid dimension 1: split the batch")
    # Offsets past the batch are computed in int64; within one sequence they stay int32.
    if T * Hq * D >= 2 ** 31:
        raise ValueError(f"{where}: one sequence of q {tuple(q.shape)} has {T * Hq * D} elements, more than "
                         "the kernel's int32 offsets allow")
    if gate is not None:
        _check_gate(where, q, gate)
    if cu_seqlens is not None:
        _check_cu_seqlens(where, q, cu_seqlens)


def _check_gate(where, q, gate) -> None:
    if not isinstance(gate, torch.Tensor):
        raise ValueError(f"{where}: gate must be a tensor or None, got {type(gate).__name__}")
    if gate.shape != q.shape[:3]:
        raise ValueError(f"{where}: gate must be [B, T, Hq] = {tuple(q.shape[:3])} (one value per token and query "
                         f"head of q {tuple(q.shape)}), got {tuple(gate.shape)}")
    if gate.dtype != q.dtype or gate.device != q.device:
        raise ValueError(f"{where}: gate must have q's dtype and device ({q.dtype} on {q.device}), got {gate.dtype} "
                         f"on {gate.device}")


def _check_cu_seqlens(where, q, cu_seqlens) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{where}: cu_seqlens must be a tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device:
        raise ValueError(f"{where}: cu_seqlens must be int32 on q's device {q.device}, got {cu_seqlens.dtype} on "
                         f"{cu_seqlens.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{where}: cu_seqlens must be 1-D [n + 1] with n >= 1 segments, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    B, T = q.shape[:2]
    if B != 1:
        raise ValueError(f"{where}: cu_seqlens packs segments into one row, so q must have B = 1; got q "
                         f"{tuple(q.shape)}")
    # Reading the offsets is a host sync, which a compiled graph must not have: there the caller's
    # construction of cu_seqlens is trusted, and eager calls (tests, the self-test) check the values.
    if torch.compiler.is_compiling():
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"{where}: cu_seqlens must run from 0 to T = {T} (q {tuple(q.shape)}), got "
                         f"cu_seqlens[0] = {offsets[0]}, cu_seqlens[-1] = {offsets[-1]}")
    drop = next((i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]), None)
    if drop is not None:
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing, got cu_seqlens[{drop}] = {offsets[drop]} < "
                         f"cu_seqlens[{drop - 1}] = {offsets[drop - 1]}")


def attention_forward(q, k, v, q_gain, xsa: bool, gate=None, segments=None):
    """Launch the forward kernel. Returns (y [B, T, Hq, D] in q's dtype, LSE [B, Hq, T] fp32 in log2 units,
    c = o·v̂ [B, Hq, T] fp32 when xsa else an empty tensor, y before the gate when gate is given else an
    empty tensor). q, k, v, gate contiguous, segments = segment_bounds(cu_seqlens, T), as attention_triton
    passes them; a tensor a launch does not use is passed as a dummy pointer of the same type each time."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    gain = q_gain.detach().float().contiguous()
    y = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    xdot = torch.empty((B, Hq, T) if xsa else (0,), dtype=torch.float32, device=q.device)
    y_pre = torch.empty_like(q) if gate is not None else q.new_empty((0,))
    cfg = _launch_table(q.dtype, D, segments=segments is not None)["fwd"]
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
    _attn_fwd_kernel[grid](q, k, v, gain, y if gate is None else gate, lse if segments is None else segments, y,
                           y if gate is None else y_pre, lse, xdot if xsa else lse, T, Hq, Hkv, Hq // Hkv, D ** -0.5,
                           D=D, XSA=bool(xsa), HAS_GATE=gate is not None, HAS_SEGMENTS=segments is not None,
                           **_tiles(cfg), **_launch_opts(cfg))
    return y, lse, xdot, y_pre


def attention_backward(dy, q, k, v, q_gain, y, lse, xdot, xsa: bool, gate=None, segments=None):
    """Launch the three backward kernels. Returns (dq, dk, dv, d(q_gain), d gate) in the inputs' dtypes,
    d gate an empty tensor without a gate.

    q, k, v, q_gain, lse, xdot, gate, segments are what the forward took and returned (contiguous), y the
    output before the gate; dy comes from autograd."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    dy = dy.to(q.dtype).contiguous()
    gain = q_gain.detach().float().contiguous()
    table = _launch_table(q.dtype, D, segments=segments is not None)

    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    # Without XSA or a gate the gradient wrt the pre-XSA output is dy itself.
    d_pre = torch.empty_like(q) if xsa or gate is not None else dy
    dv_xsa = torch.empty((B, T, Hkv, D), dtype=torch.float32, device=q.device) if xsa else delta
    d_gate = torch.empty_like(gate) if gate is not None else q.new_empty((0,))
    cfg = table["preprocess"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * Hkv)](
        dy, y, v, dy if gate is None else gate, xdot if xsa else delta, d_pre, delta, dv_xsa,
        dy if gate is None else d_gate, T, Hq, Hkv, group,
        D=D, XSA=bool(xsa), HAS_GATE=gate is not None, **_tiles(cfg), **_launch_opts(cfg))

    bounds = lse if segments is None else segments
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    cfg = table["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, gain, bounds, d_pre, lse, delta, dv_xsa, dk, dv, T, Hq, Hkv, group, D ** -0.5,
        D=D, XSA=bool(xsa), HAS_SEGMENTS=segments is not None, **_tiles(cfg), **_launch_opts(cfg))

    dq = torch.empty_like(q)
    cfg = table["dq"]
    n_blocks = triton.cdiv(T, cfg["BLOCK_M"])
    gain_parts = torch.empty((B, Hq, n_blocks), dtype=torch.float32, device=q.device)
    _attn_bwd_dq_kernel[(n_blocks, B * Hq)](
        q, k, v, gain, bounds, d_pre, lse, delta, dq, gain_parts, T, Hq, Hkv, group, D ** -0.5,
        D=D, HAS_SEGMENTS=segments is not None, **_tiles(cfg), **_launch_opts(cfg))
    d_gain = gain_parts.sum(dim=(0, 2)).to(q_gain.dtype)
    return dq, dk, dv, d_gain, d_gate


# --------------------------------------------------------------------------------------------------
# The autograd op: ouroboros::attention (forward, returns y plus what backward needs) with its
# backward as a second custom op; both have fakes so torch.compile(fullgraph=True) traces them.
# The op takes the segments as segment_bounds(cu_seqlens, T), computed once by attention_triton
# and saved for the backward.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("ouroboros::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_gain: torch.Tensor, xsa: bool,
                  gate: torch.Tensor | None = None, segments: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, q_gain, xsa, gate, segments)


@_attention_op.register_fake
def _attention_fake(q, k, v, q_gain, xsa, gate=None, segments=None):
    B, T, Hq, _ = q.shape
    stats = (B, Hq, T)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(stats, dtype=torch.float32),
            q.new_empty(stats if xsa else (0,), dtype=torch.float32),
            torch.empty_like(q, memory_format=torch.contiguous_format) if gate is not None else q.new_empty((0,)))


@torch.library.custom_op("ouroboros::attention_backward", mutates_args=())
def _attention_backward_op(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_gain: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, xdot: torch.Tensor,
                           xsa: bool, gate: torch.Tensor | None = None, segments: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dy, q, k, v, q_gain, y, lse, xdot, xsa, gate, segments)


@_attention_backward_op.register_fake
def _attention_backward_fake(dy, q, k, v, q_gain, y, lse, xdot, xsa, gate=None, segments=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(q_gain),
            torch.empty_like(gate, memory_format=torch.contiguous_format) if gate is not None else q.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, q_gain, xsa, gate, segments = inputs
    y, lse, xdot, y_pre = output
    # the output before the gate: y itself without one
    ctx.save_for_backward(q, k, v, q_gain, y if gate is None else y_pre, lse, xdot, gate, segments)
    ctx.xsa = xsa


def _backward(ctx, dy, _d_lse, _d_xdot, _d_y_pre):
    q, k, v, q_gain, y, lse, xdot, gate, segments = ctx.saved_tensors
    dq, dk, dv, d_gain, d_gate = torch.ops.ouroboros.attention_backward(dy, q, k, v, q_gain, y, lse, xdot, ctx.xsa,
                                                                         gate, segments)
    return dq, dk, dv, d_gain, None, None if gate is None else d_gate, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# Under autocast q, k, v and gate run the bf16 kernel, as SDPA would (the fp32 path runs without tensor
# cores); q_gain keeps its dtype (the kernels read it as fp32).
@input_policy("attention", _check_inputs, autocast=("q", "k", "v", "gate"),
              contiguous=("q", "k", "v", "gate", "cu_seqlens"))
def attention_triton(q, k, v, q_gain, xsa: bool, gate=None, cu_seqlens=None):
    """Causal GQA flash attention with q_gain, fused XSA and output gate, optionally document-isolated;
    q [B, T, Hq, D], k, v [B, T, Hkv, D], gate [B, T, Hq], cu_seqlens int32 [n + 1] (B = 1) -> y [B, T, Hq, D]."""
    segments = None if cu_seqlens is None else segment_bounds(cu_seqlens, q.shape[1])
    return torch.ops.ouroboros.attention(q, k, v, q_gain, bool(xsa), gate, segments)[0]


def sm90_configs() -> list[dict]:
    """Every kernel configuration the launchers can launch (dtype x head dim x the XSA, gate and segment
    switches each kernel has), for the sm_90 compile check. Tensor-core kernels on bf16 must use Hopper's
    warpgroup MMA. Pointers a launch does not use get the dummy types the launchers pass."""
    out = []
    kernels = {"fwd": (_attn_fwd_kernel, ("XSA", "HAS_GATE", "HAS_SEGMENTS")),
               "preprocess": (_attn_bwd_preprocess_kernel, ("XSA", "HAS_GATE")),
               "dkdv": (_attn_bwd_dkdv_kernel, ("XSA", "HAS_SEGMENTS")), "dq": (_attn_bwd_dq_kernel, ("HAS_SEGMENTS",))}
    # every other pointer has the inputs' dtype; SEGMENTS is int32, or the LSE as a dummy without segments
    types = {"T": "i32", "HQ": "i32", "HKV": "i32", "GROUP": "i32", "sm_scale": "fp32", "QGAIN": "*fp32",
             "LSE": "*fp32", "XDOT": "*fp32", "DELTA": "*fp32", "DVX": "*fp32", "GAIN_PARTS": "*fp32",
             "SEGMENTS": "*fp32"}
    for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        for head_dim in SUPPORTED_HEAD_DIMS:
            for name, (kernel, switches) in kernels.items():
                for values in itertools.product((False, True), repeat=len(switches)):
                    on = dict(zip(switches, values))
                    segments = on.get("HAS_SEGMENTS", False)
                    cfg = _launch_table(dtype, head_dim, interpret=False, segments=segments)[name]
                    constexprs = {"D": head_dim, **_tiles(cfg), **on}
                    signature = {a: "*i32" if a == "SEGMENTS" and segments else types.get(a, ty)
                                 for a in kernel.arg_names if a not in constexprs}
                    tag = ("" if "XSA" not in on else "_xsa" if on["XSA"] else "_noxsa") + \
                        ("_gate" if on.get("HAS_GATE") else "") + ("_varlen" if segments else "")
                    out.append({
                        "name": f"attention_{name}_{ty[1:]}_d{head_dim}{tag}",
                        "kernel": kernel,
                        "signature": signature,
                        "constexprs": constexprs,
                        "num_warps": cfg["num_warps"],
                        "num_stages": cfg["num_stages"],
                        "hgmma": dtype == torch.bfloat16 and name != "preprocess",
                    })
    return out
