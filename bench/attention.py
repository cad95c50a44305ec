"""Bench entry `attention`: the causal GQA flash-attention kernel with q_gain and XSA against its baselines.

Providers: triton (the kernel), eager (the explicit-softmax reference), compile (torch.compile of that
reference), sdpa (SDPA, flash backend on CUDA, plus eager q_gain and XSA: the model's torch path) and
fa3 (FlashAttention-3 plus the same eager q_gain and XSA) when flash_attn_interface is importable.

FLOPs (the usual convention, XSA's O(T·D) work not counted):
    forward = 4·B·Hq·T²·D / 2   (two T×T×D matmuls per head, halved for the causal mask)
    backward = 2.5 × forward,  fwd+bwd = 3.5 × forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.registry import Case, compile_baseline, register
from kernels.attention import _xsa, attention_reference, attention_sdpa, attention_triton

try:  # FlashAttention-3 (Hopper); optional
    from flash_attn_interface import flash_attn_func as _fa3_func
except Exception:  # not installed, or built for another GPU
    _fa3_func = None


def _fa3_attention(q, k, v, q_gain, xsa: bool):
    """FA3 with the same eager q_gain and XSA as the sdpa provider (FA3 takes [B, T, H, D] and GQA natively)."""
    q = q * q_gain.to(q.dtype).view(1, 1, -1, 1)
    out = _fa3_func(q, k, v, causal=True)
    y = out[0] if isinstance(out, tuple) else out
    return _xsa(y, v) if xsa else y


def _forward_flops(B, T, Hq, D) -> float:
    return 4.0 * B * Hq * T * T * D / 2


def _mode_cases(provider, fn, shape, q, k, v, q_gain, dy, xsa, fwd_flops) -> list[Case]:
    leaves = (q, k, v, q_gain)

    def forward():
        return fn(q, k, v, q_gain, xsa)

    def forward_backward():
        return torch.autograd.grad(fn(q, k, v, q_gain, xsa), leaves, dy)

    # backward alone: one forward, made on the first (warm-up) call and kept while this case is timed,
    # its graph reused for each call; built lazily so only one provider's graph is alive at a time
    graph = {}

    def backward():
        if "y" not in graph:
            graph["y"] = fn(q, k, v, q_gain, xsa)
        return torch.autograd.grad(graph["y"], leaves, dy, retain_graph=True)

    return [Case("attention", provider, "fwd", shape, forward, flops=fwd_flops),
            Case("attention", provider, "bwd", shape, backward, flops=2.5 * fwd_flops),
            Case("attention", provider, "fwd+bwd", shape, forward_backward, flops=3.5 * fwd_flops)]


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
        q = torch.randn(B, T, Hq, D, device=device, generator=gen)
        # QK-normed inputs, as in the model
        q = F.rms_norm(q, (D,)).to(dtype).requires_grad_()
        k = F.rms_norm(torch.randn(B, T, Hkv, D, device=device, generator=gen), (D,)).to(dtype).requires_grad_()
        v = torch.randn(B, T, Hkv, D, device=device, generator=gen).to(dtype).requires_grad_()
        q_gain = torch.full((Hq,), 4.0, device=device, requires_grad=True)
        dy = torch.randn(B, T, Hq, D, device=device, generator=gen).to(dtype)
        for provider, fn in providers.items():
            out += _mode_cases(provider, fn, shape, q, k, v, q_gain, dy, bool(xsa), _forward_flops(B, T, Hq, D))
    return out
