"""Causal GQA attention with a per-head q_gain and XSA ("exclusive self attention").

Inputs are already QK-normed and rotated: q [B, T, Hq, D], k and v [B, T, Hkv, D], Hq a multiple of
Hkv (query head h reads KV head h // (Hq // Hkv)). The op computes, per query head,
    y = softmax((q_gain[h] · q) kᵀ / sqrt(D), causal) v
and, when xsa is on, removes from y the component along the token's own normalized value:
    y ← y − (y·v̂) v̂,  v̂ = v_t / max(||v_t||, 1e-12).
This file holds the PyTorch references; the Triton kernels, launchers and autograd op live beside them.
"""
import torch
import torch.nn.functional as F


def _xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y [B, T, Hq, D], v [B, T, Hkv, D]: subtract from each head's output its own-value component."""
    group = y.shape[2] // v.shape[2]
    v_hat = F.normalize(v, dim=-1, eps=1e-12).repeat_interleave(group, dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def attention_reference(q, k, v, q_gain, xsa: bool):
    """Explicit fp32 softmax: the ground truth the kernel is tested against. Returns y [B, T, Hq, D] in q's dtype."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    qf = q.float() * q_gain.float().view(1, 1, Hq, 1)
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) / D ** 0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = torch.einsum("bhts,bshd->bthd", probs, vf)
    if xsa:
        y = _xsa(y, v.float())
    return y.to(q.dtype)


def attention_sdpa(q, k, v, q_gain, xsa: bool):
    """The eager PyTorch path: SDPA (flash backend on CUDA) plus eager q_gain and XSA."""
    Hq = q.shape[2]
    q = q * q_gain.to(q.dtype).view(1, 1, Hq, 1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True).transpose(1, 2)
    return _xsa(y, v) if xsa else y
