"""Hessians from calibration inputs, and the Calibrator every quantization method (quant/methods.py) runs on.

H = XᵀX / n for each int6 matrix, X its inputs over every calibration token, collected by forward
pre-hooks on the uncompiled model inside `model.calibration_mode` (there each MLP runs fc and proj
through their own forward instead of the fused kernel, so their hooks fire). The shared crawler block
runs once per loop, so its hooks fire once per loop: its Hessians accumulate over every loop.
GPTQ runs through kernels.gptq_quantize_layer: the Triton kernel with KERNELS=triton, else the reference.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch

import kernels
from model import calibration_mode

from . import gptq
from .methods import method_named
from .scheme import KIND_INT6, TIED_EMBEDDING, tensor_kind


class HessianAccumulator:
    """Running XᵀX and row count per layer name; `hessians()` gives XᵀX / n."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
            self.counts[name] = 0
        self.sums[name].addmm_(x.T, x)
        self.counts[name] += x.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        return {name: s / self.counts[name] for name, s in self.sums.items()}


def int6_layer_names(model: torch.nn.Module, small_numel: int) -> list[str]:
    """Modules whose weights are stored int6 (names without '.weight'), in state-dict order."""
    return [name[:-len(".weight")] for name, p in model.state_dict().items()
            if name.endswith(".weight") and tensor_kind(name, p.numel(), small_numel) == KIND_INT6]


def collect_hessians(model: torch.nn.Module, forward: Callable[[torch.Tensor], object],
                     batches: Iterable[torch.Tensor], layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Run forward(batch) for every calibration batch with pre-hooks on `layers`; returns {layer: H}."""
    layers = list(layers)
    modules = dict(model.named_modules())
    modules[TIED_EMBEDDING] = modules.get("head_input")  # the tied head's input: the final norm's output
    unknown = [n for n in layers if modules.get(n) is None]
    if unknown:
        raise KeyError(f"calibration: the model has no modules {unknown}")
    acc = HessianAccumulator()
    handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: acc.add(n, args[0])) for n in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), calibration_mode(model):
            for batch in batches:
                forward(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    silent = [n for n in layers if n not in acc.sums]
    if silent:
        raise RuntimeError(f"calibration saw no inputs for {silent}: their hooks never fired "
                           f"(a compiled model, or a forward that bypasses these modules?)")
    return acc.hessians()


class Calibrator:
    """Quantizes one model by any registered method, sharing the phase-1 Hessians and GPTQ results between them.

    forward(batch) runs the model on one calibration batch (e.g. under autocast); batches are reused
    by every phase. Each method's `seconds` counts only the work that method would do on its own.
    """

    def __init__(self, model: torch.nn.Module, config, forward: Callable[[torch.Tensor], object], batches: list):
        self.model, self.config, self.forward, self.batches = model, config, forward, list(batches)
        self.small_numel = config.quant_small_numel
        self.layers = int6_layer_names(model, self.small_numel)
        self.options = dict(block_size=config.gptq_block_size, damping=config.gptq_damping,
                            order=config.gptq_order, inverse=config.gptq_inverse)
        self._phase1: dict | None = None
        self.phase1_seconds = 0.0
        self._codes: dict[tuple, tuple] = {}  # (layer, phase) -> (codes, scale, seconds)

    def quantize(self, method: str) -> tuple[dict, dict]:
        """({name: QuantizedTensor}, stats): the method's stats (QuantMethod) with its name as stats["method"]."""
        handler = method_named(method)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}  # phase 2 edits weights in place
        quantized, stats = handler.quantize(self, state)
        return quantized, {"method": method, **stats}

    def collect(self, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        return collect_hessians(self.model, self.forward, self.batches, layers)

    def phase1(self) -> dict:
        """Every int6 layer's Hessian over the float model (computed once, `phase1_seconds` records how long)."""
        if self._phase1 is None:
            t0 = time.perf_counter()
            self._phase1 = self.collect(self.layers)
            self.phase1_seconds = time.perf_counter() - t0
        return self._phase1

    def gptq_codes(self, layer: str, weight: torch.Tensor, hessian: torch.Tensor, phase: int) -> tuple:
        """(codes, scale, seconds) of GPTQ for `layer` with the Hessian of `phase`, computed once per (layer, phase)."""
        key = (layer, phase)
        if key not in self._codes:
            t0 = time.perf_counter()
            try:
                scale = gptq.row_scales(weight)
                codes = kernels.gptq_quantize_layer(weight, hessian.to(weight.device), scale, **self.options)
            except ValueError as err:  # gptq's messages name the argument; say which layer it was
                raise ValueError(f"{layer} (phase {phase}): {err}") from None
            self._codes[key] = (codes, scale, time.perf_counter() - t0)
        return self._codes[key]

    @contextlib.contextmanager
    def dequantized_weights(self, weights: dict):
        """Temporarily replace layers' weights (phase 2 of loop-aware calibration); always restores them."""
        modules = dict(self.model.named_modules())
        originals = {n: modules[n].weight.detach().clone() for n in weights}
        try:
            with torch.no_grad():
                for n, w in weights.items():
                    modules[n].weight.copy_(w.to(modules[n].weight.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, w in originals.items():
                    modules[n].weight.copy_(w)


def objective_summary(stats: dict) -> str:
    """One line: the method's / round-to-nearest's layer-objective ratio in total and its range over layers."""
    obj = stats.get("objective") or {}
    if not obj:
        return f"{stats['method']}: no layer objectives (no Hessians)"
    ratios = [v["quantized"] / v["rtn"] for v in obj.values() if v["rtn"] > 0]
    total = sum(v["quantized"] for v in obj.values()) / max(sum(v["rtn"] for v in obj.values()), 1e-30)
    return (f"{stats['method']}: layer objective ||(W-Q)X||^2 {stats['method']}/rtn total {total:.3f}, per layer "
            f"{min(ratios):.3f}..{max(ratios):.3f} over {len(obj)} int6 matrices")
