"""The model's parts: rotary tables, the embedding side (BigramHash, the two SmearGates), attention, MLP
and the block, sequential or two-lane. The model (model/gpt.py) assembles them along its schedule.

Every heavy op goes through kernels/ (`kernels.attention`, `kernels.mlp`, the fused norms), which picks
the Triton kernel or the PyTorch path.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.mlp import leaky_relu_squared
from kernels.norm import rms_norm_reference

from .config import Config, ConfigError

# The original's hash multipliers (SPEC 3).
BIGRAM_MUL_CURRENT, BIGRAM_MUL_PREVIOUS = 36313, 27191
BOS_ID = 1  # every document starts with it (R1's SmearGate never smears into it)


# ---------------------------------------------------------------- rotary embedding (partial, O's direction)

def bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to the nearest bf16 value (ties to even), still fp32. Rounded on the bits because
    torch.compile fuses x.to(torch.bfloat16).float() into nothing, which would drop the rounding."""
    bits = x.view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).view(torch.float32)


def rope_tables(seq_len: int, base: float, scale: float, rope_dims: int, device,
                inv_freq_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, rope_dims/2] of the angles t·inv_freq_i, inv_freq_i = base^(-2i/rope_dims) / scale
    (base^(-2i/rope_dims) rounded to bf16 first when inv_freq_bf16).

    Recomputed on every forward: it is a few thousand elements, and plain tensor maths keeps the model
    free of Python-side caches that torch.compile(fullgraph=True) would have to break on.
    """
    exponents = torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims
    inv_freq = 1.0 / (base ** exponents)
    if inv_freq_bf16:  # the original's model.bfloat16() rounded its inv_freq buffers (R1's too)
        inv_freq = bf16_rounded(inv_freq)
    inv_freq = inv_freq / scale
    # Elementwise product, not torch.outer, so CUDA autocast never lowers the angles to bf16.
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2·cos.size(-1) dims of x [B, T, H, D]; the rest pass through.

    Rotate-half within the rotary dims, in the original's direction: with x1, x2 the two halves,
    out1 = x1·cos + x2·sin, out2 = -x1·sin + x2·cos.
    """
    half = cos.size(-1)
    if half == 0:
        return x
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


# ---------------------------------------------------------------- embedding side

def bigram_buckets(ids: torch.Tensor, table_size: int) -> torch.Tensor:
    """Hash bucket of each (previous, current) token pair, in int32 as the original.

    Position t >= 1: (36313·id_t XOR 27191·id_{t-1}) mod (table_size - 1); position 0 of every
    sequence gets the reserved last bucket, table_size - 1.
    """
    ids = ids.to(torch.int32)
    pairs = torch.bitwise_xor(BIGRAM_MUL_CURRENT * ids[:, 1:], BIGRAM_MUL_PREVIOUS * ids[:, :-1])
    first = torch.full_like(ids[:, :1], table_size - 1)
    return torch.cat((first, pairs % (table_size - 1)), dim=1)


class BigramHash(nn.Module):
    """A hashed bigram table (zero init) projected to the model dim and scaled by a learned scalar."""

    def __init__(self, table_size: int, table_dim: int, model_dim: int):
        super().__init__()
        if table_size < 2:
            raise ConfigError(f"BIGRAM_VOCAB_SIZE={table_size}: needs at least 2 buckets (the last is reserved)")
        self.table_size = table_size
        self.embed = nn.Embedding(table_size, table_dim)
        self.proj = nn.Linear(table_dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(bigram_buckets(ids, self.table_size))) * self.scale


class SmearGate(nn.Module):
    """The seed's static gate, after the embedding norm: out_t = (1 - σ(g))·h_t + σ(g)·h_{t-1}, h_{-1} = 0,
    a learned per-channel blend with the previous token."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate)
        previous = F.pad(h[:, :-1], (0, 0, 1, 0))
        return (1 - g) * h + g * previous


def input_smear(e: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """R1's SmearGate, before the embedding norm (MODEL.md §2.2): for t >= 1,
    h_t = e_t + (λ·σ(w·e_t[:window]) · e_{t-1}) · [id_t != BOS]; h_0 = e_0. The gate is a scalar per token
    from its own raw embedding; e_{t-1} is unsmeared, and a BOS token takes nothing from before it."""
    gate = lam * torch.sigmoid(F.linear(e[:, 1:, :weight.size(1)], weight))   # [B, T-1, 1]
    keep = (ids[:, 1:] != BOS_ID).unsqueeze(-1).to(e.dtype)
    return torch.cat((e[:, :1], e[:, 1:] + gate * e[:, :-1] * keep), dim=1)


# ---------------------------------------------------------------- attention and MLP

class Attention(nn.Module):
    """QK-normed, partially rotated GQA attention; q_gain, causal softmax, XSA and the optional per-head
    output gate (R1's sparse gate: σ(scale·W_g·x[:window]) per head, after XSA) happen in kernels.attention."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, xsa: bool,
                 gate_window: int = 0, gate_scale: float = 1.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        self.xsa = xsa
        self.gate_scale = float(gate_scale)
        if gate_window:
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, gate_window))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D]: projected, q and k RMS-normed and rotated, all in v's dtype
        (under CUDA autocast F.rms_norm returns fp32 while v is bf16). model/decode.py shares it.
        lora: a slot's test-time adapters (model/lora.py SlotLoRA), added to the raw projections."""
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:
            q, k, v = lora.add("q", x, q), lora.add("k", x, k), lora.add("v", x, v)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rope(rms_norm_reference(q), cos, sin)
        k = apply_rope(rms_norm_reference(k), cos, sin)
        return q.to(v.dtype), k.to(v.dtype), v

    def gate(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The output gate [B, T, Hq] from the attention's input x (None without one)."""
        if not hasattr(self, "attn_gate_w"):
            return None
        w = self.attn_gate_w
        return torch.sigmoid(self.gate_scale * F.linear(x[..., :w.size(1)], w)).to(dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, lora=None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin, lora)
        y = kernels.attention(q, k, v, self.q_gain, self.xsa, gate=self.gate(x, v.dtype), cu_seqlens=cu_seqlens)
        out = self.proj(y.flatten(2))
        return out if lora is None else lora.add("o", x, out)  # R1's O adapter reads the block input, not y


class MLP(nn.Module):
    """y = W_down · leaky_relu(W_up · x, slope)², fused in kernels.mlp (slope 0 = relu²)."""

    def __init__(self, dim: int, hidden: int, slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.slope = float(slope)
        self.unfused = False  # set by calibration_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unfused:  # calibration: each Linear's own forward runs, so hooks on fc and proj fire
            return self.proj(leaky_relu_squared(self.fc(x), self.slope))
        return kernels.mlp(x, self.fc.weight, self.proj.weight, self.slope)


# ---------------------------------------------------------------- the block

class Block(nn.Module):
    """x_in = m0⊙x + m1⊙x0;  x = x_in + a⊙Attn(RMSNorm(x_in)·s);  x = x + b⊙MLP(RMSNorm(x)·s),
    s = 1/sqrt(i+1) for physical block i (LN_SCALE; else 1). Two-lane in `forward_parallel`."""

    def __init__(self, config: Config, layer_idx: int, mlp_mult: float, slope: float, xsa: bool):
        super().__init__()
        dim = config.model_dim
        self.attn = Attention(dim, config.num_heads, config.num_kv_heads, config.qk_gain_init, xsa,
                              config.gate_window if config.sparse_attn_gate_enabled else 0,
                              config.sparse_attn_gate_scale)
        self.mlp = MLP(dim, int(mlp_mult * dim), slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # rows: x, x0
        # deeper blocks see smaller inputs (the original's rule, and R1's)
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if config.ln_scale else 1.0

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, skip: tuple | None = None, lora=None) -> torch.Tensor:
        """skip: (kept, weight, gate or None), a U-Net skip merged into x before the block (GPT.skip_for).
        lora: the slot's test-time adapters (model/lora.py), or None."""
        # Each residual update and the RMSNorm after it run as one fused pass (kernels/norm.py), the skip
        # merge included.
        if skip is None:
            x, h = kernels.mix_norm(x, x0, self.resid_mix, self.norm_scale)
        else:
            _, x, h = kernels.skip_mix_norm(x, *skip, x0, self.resid_mix, self.norm_scale, keep_merged=False)
        x, h = kernels.add_norm(x, self.attn(h, cos, sin, cu_seqlens, lora), self.attn_scale, self.norm_scale)
        return x + self.mlp_scale * self.mlp_out(h, lora)

    def mlp_out(self, h: torch.Tensor, lora) -> torch.Tensor:
        """The MLP on its normed input h, plus the slot's MLP adapter (a parallel path across the whole MLP)."""
        return self.mlp(h) if lora is None else lora.add("mlp", h, self.mlp(h))

    def forward_parallel(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, cu_seqlens: torch.Tensor | None, resid: torch.Tensor,
                         post: torch.Tensor, skip: tuple | None = None, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """R1's two-lane block (MODEL.md §2.8): the skip merges into lane0; attention reads lane0 (mixed with
        x0), the MLP reads lane1, and each lane takes both: lane_k <- resid[k]·lane_k + post[0,k]·A + post[1,k]·M,
        A and M scaled by attn_scale and mlp_scale (one fused pass, kernels.lane_update)."""
        if skip is None:
            _, h = kernels.mix_norm(lane0, x0, self.resid_mix, self.norm_scale)
        else:
            lane0, _, h = kernels.skip_mix_norm(lane0, *skip, x0, self.resid_mix, self.norm_scale, keep_x_in=False)
        attn = self.attn(h, cos, sin, cu_seqlens, lora)
        mlp = self.mlp_out(kernels.rms_norm(lane1, self.norm_scale), lora)
        return kernels.lane_update(lane0, lane1, attn, mlp, self.attn_scale, self.mlp_scale, resid, post)
