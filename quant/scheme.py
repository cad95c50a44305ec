"""The mixed quantization scheme (SPEC 5): which stored form each state-dict entry takes, and the entries as stored.

- attention and MLP matrices (`*.attn.c_q|c_k|c_v|proj.weight`, `*.mlp.fc|proj.weight`) above
  config.quant_small_numel elements: int6 codes in [-31, 31] (GPTQ or round-to-nearest, decided by the
  quantization method, quant/methods.py) with one fp16 step per row;
- every other tensor above the threshold (token embedding, bigram table and projection, instruction
  projections): int8 per row with the 99.99984th-percentile clip;
- everything at or below the threshold: fp16.

R1's int8-per-row attention gate (gate_int8_row, is_gate_row_tensor) is here too; its LQER is quant/lqer.py.

quant/artifact.py stores these QuantizedTensors in a file; quant/load.py builds a model from them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import gptq

KIND_INT6, KIND_INT8, KIND_FP16 = "int6", "int8", "fp16"
# R1's kinds (codes int8 with one fp16-valued step per row, like int6): int7 codes in [-63, 63], gate_int8 in [-127, 127]
KIND_INT7, KIND_GATE = "int7", "gate_int8"
CODE_KINDS = (KIND_INT6, KIND_INT7, KIND_INT8, KIND_GATE)
TIED_EMBEDDING = "tok_emb"  # GPTQ'd with the head input's Hessian under QUANT_METHOD=frontier (QUANT.md Q.1)

_INT6_NAME = re.compile(r"(^|\.)(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")


class ArtifactError(ValueError):
    """An artifact that cannot be read or written as asked (here: a state dict the scheme cannot store);
    the message names the file or the entry and what is wrong."""


@dataclass
class QuantizedTensor:
    """One state-dict entry as stored: int6/int7/int8/gate_int8 codes with fp16-precision row steps, or fp16
    values; a code kind may carry LQER factors (qA int8 [rows, r], sA fp16 0-dim (asymmetric) or [rows]
    (symmetric), qB int8 [r, cols], sB fp16 [numel(qB) / g] (asymmetric, groups of g) or [r] (symmetric)),
    whose product dequantize() adds."""
    kind: str
    shape: tuple
    codes: torch.Tensor | None = None   # int8 [rows, cols]
    scale: torch.Tensor | None = None   # fp32 [rows], values representable in fp16
    values: torch.Tensor | None = None  # fp16, original shape
    lqer: tuple | None = None           # (qA, sA, qB, sB): a low-rank correction added at dequantization (quant/lqer.py)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def dequantize(self) -> torch.Tensor:
        if self.kind == KIND_FP16:
            return self.values.float().reshape(self.shape)
        weight = gptq.dequantize(self.codes, self.scale)
        if self.lqer is not None:
            from .lqer import correction  # lqer imports this module

            weight = weight + correction(*self.lqer)
        return weight.reshape(self.shape)


def step_codes(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(round(x / step), lo, hi) as int8, half to even; step broadcasts against x. A step that fp16 flushed to
    0 (max/range < 2^-25) divides by 1 instead: there |x| <= max < 0.5, so the codes are 0, not x/0's NaN or ±range
    (R1's); they dequantize to 0 either way."""
    return torch.clamp(torch.round(x / torch.where(step == 0, 1, step.float())), lo, hi).to(torch.int8)


def symmetric_row_codes(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R1's symmetric per-row rule: s = fp16(max|row| (>= 1e-10) / qmax), codes clamp(round(w / s), ±qmax).
    -> (codes int8 [rows, cols], s fp16 [rows]); quant.gptq.dequantize gives codes · s[row] in fp32."""
    w = weight.float()
    scale = (w.abs().amax(dim=1).clamp_min(1e-10) / qmax).to(torch.float16)
    return step_codes(w, scale[:, None], -qmax, qmax), scale


def gate_int8_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R1's attention gate (one row per head), int8 per row with no Hessian: symmetric_row_codes at ±127."""
    return symmetric_row_codes(weight, 127)


def is_gate_row_tensor(name: str, tensor: torch.Tensor) -> bool:
    """Whether R1 stores this entry as gate_int8_row (its test, checked before the fp16 passthrough)."""
    return (torch.is_floating_point(tensor) and tensor.dim() == 2 and name.endswith(".attn_gate_w")
            and 32 <= tensor.numel() <= 8192)


def tensor_kind(name: str, numel: int, small_numel: int) -> str:
    """Which of the three stored forms a state-dict entry takes (SPEC 5)."""
    if numel <= small_numel:
        return KIND_FP16
    return KIND_INT6 if _INT6_NAME.search(name) else KIND_INT8


def quantize_state_dict(state_dict: dict, small_numel: int,
                        int6_codes: Callable[[str, torch.Tensor], tuple] | None = None) -> dict:
    """Apply the mixed scheme. int6_codes(name, weight) -> (codes, scale) quantizes one attention/MLP
    matrix (GPTQ with its Hessian); by default it is round-to-nearest with O's row scales."""
    out = {}
    for name, t in state_dict.items():
        if not torch.is_floating_point(t):
            raise ArtifactError(f"state dict entry {name!r} has dtype {t.dtype}: only floating tensors can be stored")
        on_device = t.detach().float()  # GPTQ runs where the model is
        t = on_device.cpu()
        if not torch.isfinite(t).all():  # fp16 would store NaN silently; the quantizers' errors lack the name
            raise ArtifactError(f"state dict entry {name!r} (shape {tuple(t.shape)}) contains NaN or inf: "
                                f"it cannot be stored")
        kind = tensor_kind(name, t.numel(), small_numel)
        if kind == KIND_FP16:
            out[name] = QuantizedTensor(kind, tuple(t.shape), values=t.to(torch.float16))
        elif kind == KIND_INT8:
            codes, scale = gptq.int8_row_quantize(t)
            out[name] = QuantizedTensor(kind, tuple(t.shape), codes=codes, scale=scale)
        else:
            if t.dim() != 2:
                raise ArtifactError(f"{name!r}: int6 matrices must be 2-D, got shape {tuple(t.shape)}")
            if int6_codes is None:
                scale = gptq.row_scales(t)
                codes = gptq.quantize_rtn(t, scale)
            else:
                codes, scale = int6_codes(name, on_device)
            codes, scale = codes.cpu(), scale.float().cpu()
            if codes.dtype != torch.int8 or codes.shape != t.shape or int(codes.abs().max()) > gptq.INT6_MAX:
                raise ArtifactError(f"{name!r}: int6 codes must be int8 {tuple(t.shape)} in [-31, 31]")
            out[name] = QuantizedTensor(kind, tuple(t.shape), codes=codes, scale=scale)
    return out


def dequantize_state_dict(quantized: dict) -> dict:
    return {name: q.dequantize() for name, q in quantized.items()}

