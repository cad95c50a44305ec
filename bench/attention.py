"""Bench entries `attention` and `attention_varlen`: the causal GQA flash-attention kernel with q_gain and XSA
against its baselines.

`attention` providers: triton (the kernel), eager (the explicit-softmax reference), compile (torch.compile of
that reference), sdpa (SDPA, flash backend on CUDA, plus eager q_gain and XSA: the model's torch path) and
fa3 (FlashAttention-3 plus the same eager q_gain and XSA) when flash_attn_interface is importable.

`attention_varlen` is R1's call (MODEL.md §2.6, §2.10): one packed row of 98,304 tokens cut into documents
and every 2,048 tokens within a document, with the output gate. Providers: triton; flex (FlexAttention with
a block mask of the segments, compiled on CUDA, plus eager q_gain, XSA and gate); fa3 (FlashAttention-3's
varlen entry, with the same eager extras) when flash_attn_interface is importable on CUDA, else a note
says why the row is missing. Without FlexAttention in this torch, or on the CPU (it has no backward
there), sdpa with a dense boolean mask (attention_sdpa) replaces flex, at T = 8,192 outside the smoke
(the dense mask of R1's row would take 9.6 GB).

FLOPs (the usual convention, XSA's and the gate's O(T·D) work not counted):
    forward = 4·B·Hq·T²·D / 2   (two T×T×D matmuls per head, halved for the causal mask);
              with segments the sum of that over the segments, B = 1
    backward = 2.5 × forward,  fwd+bwd = 3.5 × forward.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from bench.registry import Case, compile_baseline, register
from kernels.attention import _xsa, attention_reference, attention_sdpa, attention_triton, segment_bounds

try:  # FlashAttention-3 (Hopper); optional
    from flash_attn_interface import flash_attn_func as _fa3_func
except Exception:  # not installed, or built for another GPU
    _fa3_func = None
try:
    from flash_attn_interface import flash_attn_varlen_func as _fa3_varlen_func
except Exception:
    _fa3_varlen_func = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch before 2.5
    create_block_mask = flex_attention = None

R1_ROW = 98_304         # tokens per packed training row per GPU
R1_SEGMENT = 2_048      # longest segment: documents are cut every 2,048 tokens
R1_MEAN_DOCUMENT = 1_000  # assumed mean document length of the synthetic row, in tokens


def _fa3_attention(q, k, v, q_gain, xsa: bool):
    """FA3 with the same eager q_gain and XSA as the sdpa provider (FA3 takes [B, T, H, D] and GQA natively)."""
    q = q * q_gain.to(q.dtype).view(1, 1, -1, 1)
    out = _fa3_func(q, k, v, causal=True)
    y = out[0] if isinstance(out, tuple) else out
    return _xsa(y, v) if xsa else y


def _gated(y, v, xsa: bool, gate):
    return (_xsa(y, v) if xsa else y) * gate.to(y.dtype).unsqueeze(-1)


def _fa3_varlen_attention(q, k, v, q_gain, xsa: bool, gate, cu_seqlens, max_seqlen: int):
    """FA3's varlen entry on the packed row ([T, H, D], B = 1) with eager q_gain, XSA and gate."""
    q = q * q_gain.to(q.dtype).view(1, 1, -1, 1)
    out = _fa3_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    return _gated((out[0] if isinstance(out, tuple) else out).unsqueeze(0), v, xsa, gate)


def _flex_attention(q, k, v, q_gain, xsa: bool, gate, block_mask, flex):
    """FlexAttention ([B, H, T, D]) over the segments' block mask, with eager q_gain, XSA and gate."""
    q = q * q_gain.to(q.dtype).view(1, 1, -1, 1)
    y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             enable_gqa=True).transpose(1, 2)
    return _gated(y, v, xsa, gate)


def _segments_block_mask(cu_seqlens, T: int, device: str):
    """FlexAttention's block mask of causal attention within each segment (one packed row)."""
    starts = segment_bounds(cu_seqlens, T)[0]  # a segment's start names it

    def causal_in_segment(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (starts[q_idx] == starts[kv_idx])

    return create_block_mask(causal_in_segment, None, None, T, T, device=device)


def r1_cu_seqlens(T: int, max_len: int, mean_document: float, seed: int, device: str) -> torch.Tensor:
    """R1's segments of one packed row (MODEL.md §2.10), on documents of exponentially distributed lengths:
    every document start, and a cut every max_len tokens within a document, then T, padded with copies of T to
    a multiple of 64 entries."""
    gen = torch.Generator().manual_seed(seed)
    starts, position = [], 0
    while position < T:
        length = max(1, round(-mean_document * torch.rand((), generator=gen).log().item()))
        starts += range(position, min(position + length, T), max_len)
        position += length
    offsets = starts + [T]
    offsets += [T] * (-len(offsets) % 64)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _forward_flops(B, T, Hq, D) -> float:
    return 4.0 * B * Hq * T * T * D / 2


def _mode_cases(kernel, provider, run, leaves, shape, dy, fwd_flops) -> list[Case]:
    """fwd, bwd and fwd+bwd cases of run() (the op on its inputs, once) with gradients wrt `leaves`."""
    def forward_backward():
        return torch.autograd.grad(run(), leaves, dy)

    # backward alone: one forward, made on the first (warm-up) call and kept while this case is timed,
    # its graph reused for each call; built lazily so only one provider's graph is alive at a time
    graph = {}

    def backward():
        if "y" not in graph:
            graph["y"] = run()
        return torch.autograd.grad(graph["y"], leaves, dy, retain_graph=True)

    return [Case(kernel, provider, "fwd", shape, run, flops=fwd_flops),
            Case(kernel, provider, "bwd", shape, backward, flops=2.5 * fwd_flops),
            Case(kernel, provider, "fwd+bwd", shape, forward_backward, flops=3.5 * fwd_flops)]


def _inputs(B, T, Hq, Hkv, D, dtype, device, gen):
    """QK-normed q and k, as in the model; v plain; q_gain 4.0 (fp32); dy."""
    q = F.rms_norm(torch.randn(B, T, Hq, D, device=device, generator=gen), (D,)).to(dtype).requires_grad_()
    k = F.rms_norm(torch.randn(B, T, Hkv, D, device=device, generator=gen), (D,)).to(dtype).requires_grad_()
    v = torch.randn(B, T, Hkv, D, device=device, generator=gen).to(dtype).requires_grad_()
    q_gain = torch.full((Hq,), 4.0, device=device, requires_grad=True)
    dy = torch.randn(B, T, Hq, D, device=device, generator=gen).to(dtype)
    return q, k, v, q_gain, dy


@register("attention")
def cases(device: str, smoke: bool) -> list[Case]:
    if smoke:  # interpreter: one small shape, fp32 (bf16 on the CPU is ~30x slower)
        shapes, dtype = [dict(B=1, T=64, Hq=2, Hkv=1, D=64, xsa=1)], torch.float32
    else:  # the model's attention at training shape (48 sequences of 2048 per GPU), XSA on and off
        shapes = [dict(B=48, T=2048, Hq=8, Hkv=4, D=64, xsa=1), dict(B=48, T=2048, Hq=8, Hkv=4, D=64, xsa=0)]
        dtype = torch.bfloat16
    providers = {"triton": attention_triton, "sdpa": attention_sdpa, "eager": attention_reference,
                 "compile": compile_baseline(attention_reference, device)}
    if _fa3_func is not None and device == "cuda":
        providers["fa3"] = _fa3_attention
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        B, T, Hq, Hkv, D, xsa = (shape[k] for k in ("B", "T", "Hq", "Hkv", "D", "xsa"))
        q, k, v, q_gain, dy = _inputs(B, T, Hq, Hkv, D, dtype, device, gen)
        for provider, fn in providers.items():
            out += _mode_cases("attention", provider, functools.partial(fn, q, k, v, q_gain, bool(xsa)),
                               (q, k, v, q_gain), shape, dy, _forward_flops(B, T, Hq, D))
    return out


@register("attention_varlen")
def varlen_cases(device: str, smoke: bool) -> list[Case]:
    flex_here = flex_attention is not None and device == "cuda"  # FlexAttention has no backward on the CPU
    if smoke:  # interpreter: a short row of short segments, fp32
        T, max_len, mean_document, Hq, Hkv, dtype = 256, 64, 50, 2, 1, torch.float32
    else:
        T, max_len, mean_document, Hq, Hkv, dtype = R1_ROW, R1_SEGMENT, R1_MEAN_DOCUMENT, 8, 4, torch.bfloat16
        if not flex_here:  # the dense-mask fallback cannot hold R1's row
            T = 8_192
    D = 64
    cu_seqlens = r1_cu_seqlens(T, max_len, mean_document, seed=0, device=device)
    lengths = cu_seqlens.diff()
    shape = dict(T=T, Hq=Hq, Hkv=Hkv, D=D, segments=int((lengths > 0).sum()), max_len=max_len, xsa=1, gate=1)
    fwd_flops = sum(_forward_flops(1, int(n), Hq, D) for n in lengths.tolist())

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, q_gain, dy = _inputs(1, T, Hq, Hkv, D, dtype, device, gen)
    gate = torch.sigmoid(torch.randn(1, T, Hq, device=device, generator=gen)).to(dtype).requires_grad_()
    runs = {"triton": functools.partial(attention_triton, q, k, v, q_gain, True, gate=gate, cu_seqlens=cu_seqlens)}
    if flex_here:
        runs["flex"] = functools.partial(_flex_attention, q, k, v, q_gain, True, gate,
                                         _segments_block_mask(cu_seqlens, T, device),
                                         torch.compile(flex_attention, dynamic=False))
    else:
        runs["sdpa"] = functools.partial(attention_sdpa, q, k, v, q_gain, True, gate=gate, cu_seqlens=cu_seqlens)
    if _fa3_varlen_func is not None and device == "cuda":
        runs["fa3"] = functools.partial(_fa3_varlen_attention, q, k, v, q_gain, True, gate, cu_seqlens, max_len)
    else:
        why = "not on CUDA" if device != "cuda" else "flash_attn_interface is not importable"
        print(f"bench attention_varlen: no fa3 row ({why})", file=sys.stderr)
    out = []
    for provider, run in runs.items():
        out += _mode_cases("attention_varlen", provider, run, (q, k, v, q_gain, gate), shape, dy, fwd_flops)
    return out
