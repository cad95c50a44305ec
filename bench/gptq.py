"""Bench entry `gptq`: GPTQ of every int6 matrix of the `ouroboros` preset (SPEC 5 textbook options).

Providers: triton (kernels/gptq.py: in-block loop in Triton, lazy update on cuBLAS), eager (its
PyTorch reference quantize_layer_reference on the same device) and eager-cpu (the reference on the CPU, as a
run without a GPU would quantize). Inputs: random weights ~N(0, 1/fan_in) with the quantizer's row
scales, and one Hessian per input width from correlated random activations (GPTQ's cost does not
depend on the values). No flop or byte count: the in-block loop is latency-bound, neither
compute- nor memory-bound, so the number to read is ms (target: the whole model in < 1000 ms).
"""
from __future__ import annotations

import torch

from bench.registry import Case, register
from kernels.gptq import quantize_layer_reference, quantize_layer_triton
from model import build_model, from_env
from quant.calibrate import int6_layer_names
from quant.gptq import row_scales

PRESET = "ouroboros"
CALIBRATION_ROWS = 4096
SMOKE_SHAPES = ((16, 48), (24, 40))
SMOKE_BLOCK = 16


def _int6_shapes() -> list[tuple[int, int]]:
    """[rows, cols] of every matrix the quantizer stores int6 in the preset's model."""
    config = from_env(environ={}, preset=PRESET)
    net = build_model(config)
    state = net.state_dict()
    return [tuple(state[f"{name}.weight"].shape) for name in int6_layer_names(net, config.quant_small_numel)]


def _hessian(cols: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(CALIBRATION_ROWS, cols, generator=g) @ mix) * torch.exp(0.7 * torch.randn(cols, generator=g))
    return (x.T @ x / CALIBRATION_ROWS).to(device)


def _layers(shapes, device: str) -> list[tuple]:
    hessians = {cols: _hessian(cols, device, seed=cols) for cols in sorted({c for _, c in shapes})}
    layers = []
    for i, (rows, cols) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        w = (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(device)
        layers.append((w, hessians[cols], row_scales(w)))
    return layers


def _run_all(quantize, layers, block_size: int):
    return [quantize(w, h, s, block_size=block_size) for w, h, s in layers]


@register("gptq")
def cases(device: str, smoke: bool) -> list[Case]:
    if smoke:
        shapes, block, label = list(SMOKE_SHAPES), SMOKE_BLOCK, "smoke"
    else:
        shapes, block, label = _int6_shapes(), 128, PRESET
    layers = _layers(shapes, device)
    whole = {"model": label, "matrices": len(shapes), "block": block}
    out = [Case("gptq", "triton", "fwd", whole, lambda: _run_all(quantize_layer_triton, layers, block)),
           Case("gptq", "eager", "fwd", whole, lambda: _run_all(quantize_layer_reference, layers, block))]
    if device == "cuda":
        cpu_layers = [tuple(t.cpu() for t in layer) for layer in layers]
        out.append(Case("gptq", "eager-cpu", "fwd", whole, lambda: _run_all(quantize_layer_reference, cpu_layers, block)))
        # The largest single matrix (the crawler's MLP down-projection): where one layer's time goes.
        rows, cols = max(shapes, key=lambda s: s[0] * s[1])
        big = [layer for layer, shape in zip(layers, shapes) if shape == (rows, cols)][:1]
        one = {"model": label, "rows": rows, "cols": cols, "block": block}
        out += [Case("gptq", "triton", "fwd", one, lambda: _run_all(quantize_layer_triton, big, block)),
                Case("gptq", "eager", "fwd", one, lambda: _run_all(quantize_layer_reference, big, block))]
    return out
