"""R1's checkpoint format (MODEL.md §4) to and from the `frontier` model.

R1 saves `torch.save(state_dict)` with its matrices in four banks (qo_bank [2L, d, d]: W_q then W_o,
kv_bank [2L, kv, d]: W_k then W_v, mlp_up_bank [L, hidden, d], mlp_down_bank [L, d, hidden]) and a bf16
tok_emb; every other key is named as ours. `from_record_state_dict` unbanks into our per-block names and
loads them; `to_record_state_dict` is the inverse, in R1's key order.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import from_env
from .gpt import GPT, CheckpointError, _load_exact, _unwrap

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
# Our name of each bank's slice: (bank, offset in units of L, name under blocks.{i}).
BANKED = (("qo_bank", 0, "attn.c_q.weight"), ("qo_bank", 1, "attn.proj.weight"), ("kv_bank", 0, "attn.c_k.weight"),
          ("kv_bank", 1, "attn.c_v.weight"), ("mlp_up_bank", 0, "mlp.fc.weight"), ("mlp_down_bank", 0, "mlp.proj.weight"))
BLOCK_KEYS = ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.attn_gate_w")
# R1's save order: the banks, the model-level tensors, every block's five, the SmearGate's weight last.
HEAD_KEYS = ("skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas", "smear_lambda",
             "tok_emb.weight")


def _bank_shapes(config) -> dict[str, tuple[int, ...]]:
    L, d, kv, hidden = config.num_layers, config.model_dim, config.num_kv_heads * config.head_dim, \
        int(config.mlp_mult * config.model_dim)
    return {"qo_bank": (2 * L, d, d), "kv_bank": (2 * L, kv, d), "mlp_up_bank": (L, hidden, d),
            "mlp_down_bank": (L, d, hidden)}


def from_record_state_dict(state_dict: Mapping, preset: str = "frontier") -> GPT:
    """The `preset` model (looped layers) carrying R1's banked state dict, in fp32. A bank or tensor that is
    missing, unexpected or mis-shaped is a CheckpointError naming it, its shape and the expected one."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_record_state_dict: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    config = from_env(environ={}, preset=preset)
    if config.use_crawler:
        raise CheckpointError(f"R1's state dict: preset {preset!r} is a crawler model, not looped layers")
    for name, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            raise CheckpointError(f"R1's state dict: {name} is a {type(tensor).__name__}, not a tensor")
    shapes = _bank_shapes(config)
    problems = [f"{bank} missing" for bank in BANKS if bank not in state_dict]
    problems += [f"{bank} {tuple(state_dict[bank].shape)} (expected {shape})" for bank, shape in shapes.items()
                 if bank in state_dict and tuple(state_dict[bank].shape) != shape]
    if problems:
        raise CheckpointError("R1's state dict: " + "; ".join(problems))
    L = config.num_layers
    flat = {name: tensor for name, tensor in state_dict.items() if name not in BANKS}
    for bank, offset, name in BANKED:
        for i in range(L):
            flat[f"blocks.{i}.{name}"] = state_dict[bank][offset * L + i]
    # fp32 copies: the model must not share the caller's storage, and tok_emb comes as bf16
    flat = {name: tensor.detach().to(torch.float32, copy=True) for name, tensor in flat.items()}
    return _load_exact(config, flat, "R1's state dict")


def to_record_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """R1's banked state dict of a looped-layers model, in R1's key order, tok_emb in bf16 (R1's dtype)."""
    model = _unwrap(model)
    if model.config.use_crawler:
        raise CheckpointError("to_record_state_dict: a crawler model has no R1 form (USE_CRAWLER=1)")
    ours = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}

    def take(name: str) -> torch.Tensor:
        if name not in ours:
            raise CheckpointError(f"to_record_state_dict: R1's format holds {name}, which this model lacks (one of "
                                  "R1's switches is off)")
        return ours.pop(name)

    L = model.config.num_layers
    out = {bank: torch.cat([torch.stack([take(f"blocks.{i}.{name}") for i in range(L)])
                            for b, _, name in BANKED if b == bank]) for bank in BANKS}
    for name in HEAD_KEYS:
        out[name] = take(name)
    out["tok_emb.weight"] = out["tok_emb.weight"].to(torch.bfloat16)
    for i in range(L):
        for name in BLOCK_KEYS:
            out[f"blocks.{i}.{name}"] = take(f"blocks.{i}.{name}")
    out["smear_gate.weight"] = take("smear_gate.weight")
    if ours:
        raise CheckpointError(f"to_record_state_dict: tensors R1's format has no place for: {sorted(ours)}")
    return out
