"""R1's mixed quantization (QUANT.md Q.2-Q.3), QUANT_METHOD=frontier: which stored form each entry takes.

In state-dict order: the attention gate rows int8 per row (GATED_ATTN_QUANT_GATE); tensors of at most
QUANT_SMALL_NUMEL elements (and any that is not a 2-D matrix) fp16; every other matrix SDClip GPTQ with its
group's k and bits (the tied embedding int7 with the head input's Hessian). Then LQER: the LQER_TOP_K tensors
with the largest ||W - Q s||_F get a rank-LQER_RANK correction, packed asymmetrically (INT2 A, INT4 B in
groups) when the groups divide B, else symmetrically.
"""
from __future__ import annotations

import torch

from . import gptq, lqer
from .scheme import KIND_FP16, KIND_GATE, TIED_EMBEDDING, QuantizedTensor, gate_int8_row, is_gate_row_tensor


def clip_sigmas_and_bits(name: str, cfg) -> tuple[float, int]:
    """(k, bits) of a GPTQ'd tensor, by the first group its name falls in (QUANT.md Q.2's table)."""
    if TIED_EMBEDDING in name:
        return cfg.embed_clip_sigmas, cfg.embed_bits
    if ".mlp." in name:
        return cfg.mlp_clip_sigmas, cfg.matrix_bits
    if ".attn." in name:
        return cfg.attn_clip_sigmas, cfg.matrix_bits
    return cfg.matrix_clip_sigmas, cfg.matrix_bits


def frontier_quantize(state_dict: dict, hessians: dict, cfg) -> dict:
    """{name: QuantizedTensor} of `state_dict` under R1's scheme. hessians: {layer (name less ".weight"): H};
    a matrix without one is quantized with H = I (GPTQ then rounds to nearest). The tied embedding is read as
    bf16, as R1 keeps it."""
    out, errors = {}, {}
    for name, t in state_dict.items():
        w = t.detach().float()
        shape = tuple(w.shape)
        if cfg.gated_attn_quant_gate and is_gate_row_tensor(name, w):
            codes, scale = gate_int8_row(w.cpu())
            out[name] = QuantizedTensor(KIND_GATE, shape, codes=codes, scale=scale.float())
        elif w.dim() != 2 or w.numel() <= cfg.quant_small_numel:
            out[name] = QuantizedTensor(KIND_FP16, shape, values=w.cpu().to(torch.float16))
        else:
            if name.startswith(TIED_EMBEDDING):
                w = w.bfloat16().float()
            k, bits = clip_sigmas_and_bits(name, cfg)
            hessian = hessians.get(name.removesuffix(".weight"))
            if hessian is None:
                hessian = torch.eye(w.shape[1], device=w.device)
            codes, scale = gptq.sdclip_quantize(w, hessian.to(w.device), k, bits)
            codes, scale = codes.cpu(), scale.float().cpu()
            out[name] = QuantizedTensor(f"int{bits}", shape, codes=codes, scale=scale)
            errors[name] = w.cpu() - gptq.dequantize(codes, scale)
    if cfg.lqer_enabled:
        for name in lqer.top_k_by_error(errors, cfg.lqer_top_k):
            factors = None
            if cfg.lqer_asym_enabled:
                try:
                    factors = lqer.pack_asym(errors[name], cfg.lqer_rank, cfg.lqer_asym_group)
                except ValueError:  # the groups do not divide B: R1's symmetric fallback
                    pass
            out[name].lqer = factors or lqer.pack_sym(errors[name], cfg.lqer_rank, cfg.lqer_factor_bits)
    return out
