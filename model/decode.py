"""KV-cached incremental forward of the model, for generation.

    cache = KVCache(net, batch_size=1, max_len=prompt_len + new_tokens)
    logits = decode_step(net, prompt_ids, cache)        # prefill: [B, prompt_len, vocab]
    logits = decode_step(net, next_ids[:, None], cache) # then one token (or any chunk) at a time

decode_step gives the logits model(ids) gives at the same positions (tests/test_generate.py checks it at
every position), reusing the model's own code: its embedding (GPT.embed), each block's own forward and
two-lane forward (its residual mixes, norms and MLP, so kernels.mlp / QuantLinear dispatch is unchanged),
the skips, instructions and lanes of GPT.run_blocks, and the tied head. What is new here is only what a
cache changes:

- attention over the cached keys and values (an explicit fp32 softmax with q_gain, GQA, XSA and the
  output gate in PyTorch: at decode time there is one query row per sequence, so a fused kernel buys
  little);
- the first new token's bigram bucket and smear blends, which need the previous token's id, its
  embedding and its normalized embedding, kept in the cache (GPT.embed's `before`).

With `documents=True` (a model trained document-isolated, as R1) a BOS token starts a new context for its
row: its keys and every later query see nothing before it, as model(ids, cu_seqlens) with segments at the
BOS tokens computes; positions keep counting.

The order of block applications is the model's own schedule (model.schedule). One cache slot per slot of
it, at the slot's position: a repeated block sees different inputs on every pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .blocks import BOS_ID, Attention
from .gpt import GPT, _unwrap


class KVCache:
    """Preallocated keys and values of every block application, plus what the next token's embedding needs.

    k[p], v[p]: [batch, max_len, kv_heads, head_dim] for the schedule's slot at position p (forward order).
    `length` tokens are filled. The RoPE tables for max_len positions are built once here, one per distinct
    Rope of the schedule (the model's own rope_tables). documents: a BOS token starts a fresh context for
    its row (`context_start`, the first position each row attends to).
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, device=None, dtype=None,
                 documents: bool = False):
        model = _unwrap(model)
        cfg = model.config
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache: batch_size={batch_size} and max_len={max_len} must be > 0")
        ref = model.tok_emb.weight
        device = torch.device(device) if device is not None else ref.device
        # Keys and values come out of the projections in the activation dtype (bf16 under CUDA autocast).
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.batch_size, self.max_len = batch_size, max_len
        self.num_slots = len(model.schedule)
        shape = (self.num_slots, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.ropes = model.rope_tables(max_len, device)
        self.documents = documents
        self.length = 0
        self.context_start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last: tuple | None = None  # GPT.embed's record of the last token fed

    def reset(self) -> None:
        """Forget every token (the buffers are reused; stale entries past `length` are never read)."""
        self.length = 0
        self.context_start.zero_()
        self.last = None


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_new: torch.Tensor, q_gain: torch.Tensor,
                     xsa: bool, start: int, context: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of n new queries at positions start..start+n-1 over keys/values 0..start+n-1, in fp32.

    q [B, n, Hq, D]; k, v [B, start + n, Hkv, D] (cache contents, new tokens included); v_new [B, n, Hkv, D]
    the new tokens' own values (for XSA); context [B, n]: the first key position each query may see (None:
    0). Same maths as kernels/attention.py's reference.
    """
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores and softmax, also under CUDA autocast
        return _cached_attention_fp32(q, k, v, v_new, q_gain, xsa, start, context)


def _cached_attention_fp32(q, k, v, v_new, q_gain, xsa: bool, start: int, context) -> torch.Tensor:
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    # [B, Hkv, group, n, D]: each KV head serves its group of query heads without copying keys.
    qf = (q.float() * q_gain.float().view(1, 1, Hq, 1)).view(B, n, Hkv, group, D).permute(0, 2, 3, 1, 4)
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]   # [B, Hkv, 1, L, D]
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    scores = qf @ kf.transpose(-1, -2) / D ** 0.5     # [B, Hkv, group, n, L]
    keys_at = torch.arange(k.shape[1], device=q.device)
    visible = keys_at[None, :] <= (start + torch.arange(n, device=q.device))[:, None]   # causal, [n, L]
    if context is not None:  # [B, n, L]: nothing before the query's document
        visible = visible & (keys_at[None, None, :] >= context[:, :, None])
        visible = visible[:, None, None]                                                # [B, 1, 1, n, L]
    y = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ vf             # [B, Hkv, group, n, D]
    y = y.permute(0, 3, 1, 2, 4)                                                       # [B, n, Hkv, group, D]
    if xsa:  # remove the component along the token's own normalized value (its KV head's)
        v_hat = F.normalize(v_new.float(), dim=-1, eps=1e-12)[:, :, :, None, :]
        y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    return y.reshape(B, n, Hq, D)


class _CachedAttention:
    """Stands in for a block's Attention during one decode step: Attention.qkv (its projections, QK-norm and
    RoPE), then appends k, v to the cache slot and attends over everything cached."""

    def __init__(self, attn: Attention, cache: KVCache, slot: int, context: torch.Tensor | None):
        self.attn, self.cache, self.slot, self.context = attn, cache, slot, context

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens=None, lora=None) -> torch.Tensor:
        if lora is not None:
            raise ValueError("decode_step runs without test-time adapters")
        a, cache = self.attn, self.cache
        q, k, v = a.qkv(x, cos, sin)
        start, end = cache.length, cache.length + x.shape[1]
        cache.k[self.slot, :, start:end] = k
        cache.v[self.slot, :, start:end] = v
        y = cached_attention(q, cache.k[self.slot, :, :end], cache.v[self.slot, :, :end], v, a.q_gain, a.xsa, start,
                             self.context)
        gate = a.gate(x, y.dtype)
        if gate is not None:
            y = y * gate[..., None]
        return a.proj(y.to(v.dtype).flatten(2))


class _BlockWithCache:
    """The block as its own forward sees it, except that `attn` is the cached attention.

    Block.forward and Block.forward_parallel run with this in place of `self`, so the block's residual
    maths (mix_norm, add_norm, its scales, its MLP, its lanes) is the model's own code, not a copy that
    could drift from it.
    """

    def __init__(self, block: nn.Module, attn: _CachedAttention):
        self._block, self.attn = block, attn

    def __getattr__(self, name):
        return getattr(self._block, name)

    def __call__(self, *args):
        return type(self._block).forward(self, *args)

    def forward_parallel(self, *args):
        return type(self._block).forward_parallel(self, *args)


def _check_step(model: GPT, ids: torch.Tensor, cache: KVCache) -> None:
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"decode_step: ids_new must be [batch, n_new] with n_new >= 1, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_step: ids_new must be int32/int64 token ids, got {ids.dtype}")
    if ids.shape[0] != cache.batch_size:
        raise ValueError(f"decode_step: ids_new has batch {ids.shape[0]}, the cache was built for {cache.batch_size}")
    if cache.length + ids.shape[1] > cache.max_len:
        raise ValueError(f"decode_step: {ids.shape[1]} new tokens after {cache.length} cached exceed the cache's "
                         f"max_len={cache.max_len}; build a KVCache with a larger max_len")
    vocab = model.config.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"decode_step: token ids must lie in [0, {vocab}), got min {int(ids.min())}, "
                         f"max {int(ids.max())}")


@torch.no_grad()
def decode_step(model: nn.Module, ids_new: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed ids_new [B, n_new] after the cache's tokens; returns fp32 softcapped logits [B, n_new, vocab].

    Equal to model(all ids so far)[:, -n_new:]; appends to the cache (cache.length grows by n_new).
    """
    model = _unwrap(model)
    cfg = model.config
    _check_step(model, ids_new, cache)
    n, start = ids_new.shape[1], cache.length
    end = start + n

    # The bigram and both smears look one token back: the embedding continues from the cached last token.
    x0, last = model.embed(ids_new, cache.last)
    context = None
    if cache.documents:  # each position's document start: the latest BOS at or before it, else the row's
        positions = torch.arange(start, end, device=ids_new.device).expand_as(ids_new)
        bos_at = torch.where(ids_new == BOS_ID, positions, torch.zeros_like(positions))
        context = torch.maximum(bos_at.cummax(dim=1).values, cache.context_start[:, None])
        cache.context_start = context[:, -1].clone()

    ropes = {rope: (cos[start:end], sin[start:end]) for rope, (cos, sin) in cache.ropes.items()}
    x = model.run_blocks(x0, x0, ropes, lambda slot: _BlockWithCache(
        model.block(slot), _CachedAttention(model.block(slot).attn, cache, slot.position, context)))

    cache.length = end
    cache.last = last
    logits = F.linear(kernels.rms_norm(x), model.tok_emb.weight).float()
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
