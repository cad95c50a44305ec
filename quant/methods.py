"""The quantization methods: how the int6 codes of the attention and MLP matrices are chosen (SPEC 5).

One class per method, registered under its QUANT_METHOD name. Calibrator.quantize, the export step
(which methods need calibration batches, which ones its comparison runs and how the gaps' ratios are
named) and `python -m quant --method` all read METHODS, so a new method is one class here plus its
name in model.config.QUANT_METHODS. The tensors that are not int6 matrices are stored the same way by
every method (quant/scheme.py).

Round-to-nearest uses O's row scales alone. GPTQ quantizes each matrix with the Hessian of its inputs,
collected over the float model. Loop-aware GPTQ: phase 1 collects every Hessian; the flat blocks are
quantized with them and their dequantized weights put in temporarily; phase 2 re-collects the crawler
block's Hessians, whose inputs now come from quantized flat blocks (as they will at evaluation); the
float weights come back; everything is quantized with its phase-1 Hessian except the crawler, which
uses phase 2's.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

from model.config import QUANT_METHODS

from . import gptq
from .frontier import frontier_quantize
from .scheme import TIED_EMBEDDING, quantize_state_dict

CRAWLER_PREFIX = "crawler_blocks."


class QuantMethod(ABC):
    """A way to quantize a model. `quantize(calibrator, state)` -> ({name: QuantizedTensor}, stats) for the
    float state dict of calibrator.model; stats: seconds (the work this method would do on its own) and
    objective ({int6 layer: its ||(W-Q)X||²/n "quantized" and "rtn", and the Hessian's "phase"}; empty
    without Hessians)."""

    name = ""
    calibrated = True  # needs calibration batches
    forward_passes = 1  # passes over the calibration batches (GPTQ_RESERVE_SECONDS=auto's estimate)

    def passes(self, layers: list[str]) -> int:
        """Passes over the calibration batches for a model with these int6 layers."""
        return self.forward_passes if self.calibrated else 0

    @abstractmethod
    def quantize(self, calibrator, state: dict) -> tuple[dict, dict]:
        """The quantized state dict and the stats described above."""


METHODS: dict[str, QuantMethod] = {}


def register(cls: type[QuantMethod]) -> type[QuantMethod]:
    """Class decorator: one instance of `cls` in METHODS under cls.name, which QUANT_METHOD must accept."""
    if cls.name not in QUANT_METHODS:
        raise ValueError(f"quantization method {cls.name!r}: add it to model.config.QUANT_METHODS {QUANT_METHODS}")
    METHODS[cls.name] = cls()
    return cls


def method_named(name: str) -> QuantMethod:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: must be one of {tuple(METHODS)}")
    return METHODS[name]


@register
class RoundToNearest(QuantMethod):
    name = "rtn"
    calibrated = False

    def quantize(self, calibrator, state: dict) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        quantized = quantize_state_dict(state, calibrator.small_numel)
        return quantized, {"seconds": time.perf_counter() - t0, "objective": {}}


@register
class GPTQ(QuantMethod):
    """GPTQ_ORDER / GPTQ_INVERSE / GPTQ_BLOCK_SIZE / GPTQ_DAMPING select the textbook or the original's variant."""
    name = "gptq"

    def hessians(self, calibrator, state: dict) -> tuple[dict, dict, float]:
        """({layer: H}, {layer: the phase H comes from}, seconds spent collecting them)."""
        return dict(calibrator.phase1()), {n: 1 for n in calibrator.layers}, calibrator.phase1_seconds

    def quantize(self, calibrator, state: dict) -> tuple[dict, dict]:
        hessians, phase_of, seconds = self.hessians(calibrator, state)
        objective = {}

        def int6(name: str, weight):
            nonlocal seconds
            layer = name[:-len(".weight")]
            codes, scale, took = calibrator.gptq_codes(layer, weight, hessians[layer], phase_of[layer])
            seconds += took  # once per layer: a cached result costs this method what it cost to compute
            h = hessians[layer].to(weight.device)
            objective[layer] = {
                "quantized": gptq.layer_objective(weight, gptq.dequantize(codes, scale), h),
                "rtn": gptq.layer_objective(weight, gptq.dequantize(gptq.quantize_rtn(weight, scale), scale), h),
                "phase": phase_of[layer],
            }
            return codes, scale

        quantized = quantize_state_dict(state, calibrator.small_numel, int6)
        return quantized, {"seconds": seconds, "objective": objective}


@register
class LoopAwareGPTQ(GPTQ):
    name = "loop_aware"

    def passes(self, layers: list[str]) -> int:  # a second pass for the crawler, over the quantized flat layers
        return 2 if any(n.startswith(CRAWLER_PREFIX) for n in layers) else 1

    def hessians(self, calibrator, state: dict) -> tuple[dict, dict, float]:
        hessians, phase_of, seconds = super().hessians(calibrator, state)
        crawler = [n for n in calibrator.layers if n.startswith(CRAWLER_PREFIX)]
        if not crawler:
            return hessians, phase_of, seconds
        flat = [n for n in calibrator.layers if n not in crawler]
        codes = {n: calibrator.gptq_codes(n, state[f"{n}.weight"].float(), hessians[n], 1) for n in flat}
        t0 = time.perf_counter()
        with calibrator.dequantized_weights({n: gptq.dequantize(c[0], c[1]) for n, c in codes.items()}):
            hessians.update(calibrator.collect(crawler))
        phase_of.update({n: 2 for n in crawler})
        return hessians, phase_of, seconds + time.perf_counter() - t0


@register
class Frontier(QuantMethod):
    """R1's scheme (QUANT.md Q.1-Q.3): one calibration pass over the float model with its recurrence on, each
    repeated block summing its passes into one H, the tied embedding's H from the head's input; then
    quant.frontier.frontier_quantize (SDClip GPTQ, int8 gate rows, fp16 small tensors, LQER)."""
    name = "frontier"

    def quantize(self, calibrator, state: dict) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        layers = calibrator.layers + ([TIED_EMBEDDING] if f"{TIED_EMBEDDING}.weight" in state else [])
        hessians = calibrator.collect(layers)
        quantized = frontier_quantize(state, hessians, calibrator.config)
        return quantized, {"seconds": time.perf_counter() - t0, "objective": {}}
