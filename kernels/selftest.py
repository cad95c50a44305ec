"""The start-up self-test: each Triton op once, at a small shape, against its reference, before a run uses it.

A kernel that passes the CPU interpreter and compiles for sm_90 can still be wrong on a GPU (a Triton
version difference, a compiler bug). So before the first training step, evaluation or generation on the
triton backend, `run(device, ops)` calls every op in `ops` forward and backward in each dtype the run uses
(bf16 under autocast and fp32 on CUDA; fp32 on the CPU, where it runs through the interpreter) and compares
every output and gradient with the op's fp32 reference on the same inputs, with the kernel tests' bars:
fp32 fixed relative bars; bf16 at most twice the error of the op's PyTorch bf16 path (or of rounding the
reference to bf16, for a result the PyTorch path keeps in fp32) plus a floor of half a bf16 ulp of the
largest value, never tighter than the fp32 bars.

An op that fails or raises moves to its PyTorch path for the rest of the process (kernels.use_reference),
with one warning line naming the op, the dtype, the error and the measured difference; with
KERNELS_STRICT=1 the first failure raises SelfTestFailed instead. The returned record says where each op
runs ({"mlp": "triton", "attention": "torch (self-test: ...)", ...}); run logs and summary.json keep it.

An op is added by appending its Case(s) to CASES: a builder of small inputs, its PyTorch path, its fp32
reference and its bars (those of tests/test_<family>.py).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from kernels._runtime import tf32_matmuls

from kernels.attention import attention_reference, attention_sdpa
from kernels.head import softcap_cross_entropy_reference
from kernels.int6 import int6_matmul_reference, int6_matmul_torch, pack_int6_planes
from kernels.mlp import mlp_reference
from kernels.norm import (add_norm_reference, lane_update_reference, mix_norm_reference, rms_norm_reference,
                          skip_mix_norm_reference)

STRICT_ENV = kernels.STRICT_ENV
# What training runs; evaluation and generation of a quantized artifact add QUANT_OPS when QuantLinear is used.
TRAINING_OPS = ("mlp", "attention", "softcap_cross_entropy", "mix_norm", "add_norm", "rms_norm", "skip_mix_norm",
                "lane_update")
QUANT_OPS = ("int6_matmul",)
CALIBRATION_OPS = ("gptq_quantize_layer",)  # GPTQ in the export step (not for QUANT_METHOD=rtn)
BF16_REL_FLOOR = 2.0 ** -8  # bf16: half an ulp at 1, relative to the result's max |ref|
_log = logging.getLogger("kernels")


class SelfTestFailed(RuntimeError):
    """KERNELS_STRICT=1 and an op failed its self-test; the message is one line."""


@dataclass(frozen=True)
class Bars:
    """tests/test_<family>.py's bars: fp32 relative RMS and max errors, the bf16 factor, an absolute floor."""
    fp32_rel_rms: float
    fp32_max_rel: float
    abs_floor: float
    bf16_factor: float = 2.0


@dataclass(frozen=True)
class Case:
    """One call of `op` from kernels/<family>.py: build(gen, small) -> (leaves, constants), the call being
    fn(*leaves, *constants).

    Every floating leaf gets a gradient; `bf16_leaves` are the leaves the model holds in bf16 under autocast
    (activations, as matmul outputs are). The Triton entry is looked up as <family module>.<op>_triton on each
    run, as kernels/__init__ dispatches, and called as adapt(entry) when the op takes more than leaves and
    constants (a None argument, an output left out); torch_path and reference come adapted the same way.
    torch_path: the op's PyTorch path (the bf16 baseline); reference: the fp32 ground truth; names: the
    outputs, then the leaves' gradients."""
    op: str
    label: str
    family: str
    build: Callable
    torch_path: Callable
    reference: Callable
    names: tuple
    bars: Bars
    bf16_leaves: tuple = ()
    adapt: Callable | None = None


# ------------------------------------------------------------------------------------------- the inputs
# Realistic scales (activations O(1), weights ~N(0, 1/fan_in)); odd token counts so every kernel masks a
# partial tile. `small` (the CPU interpreter) keeps each kernel to a few programs; on CUDA the feature
# sizes are the default preset's, so the self-test compiles the kernels the run launches.

def _randn(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


def _mlp_inputs(gen, small):
    m, d, hidden = (37, 48, 96) if small else (97, 512, 1536)
    return [_randn(gen, m, d), _randn(gen, hidden, d, std=d ** -0.5), _randn(gen, d, hidden, std=hidden ** -0.5)], (0.5,)


def _attention_inputs(xsa):
    def build(gen, small):
        b, t, hq, hkv, dh = (1, 37, 2, 1, 64) if small else (2, 131, 8, 4, 64)
        q_gain = 1.5 + 0.1 * _randn(gen, hq)
        return [_randn(gen, b, t, hq, dh), _randn(gen, b, t, hkv, dh), _randn(gen, b, t, hkv, dh), q_gain], (xsa,)
    return build


def _gated_segments_inputs(gen, small):
    """R1's attention: one packed row of segments (one of a single token, boundaries inside and at tiles, an empty
    one and the padding copies of T) with the sigmoid output gate, XSA on."""
    hq, hkv, dh, offsets = (2, 1, 64, [0, 17, 18, 45, 45]) if small else (8, 4, 64, [0, 100, 101, 128, 262, 262])
    t = offsets[-1]
    q_gain = 1.5 + 0.1 * _randn(gen, hq)
    gate = torch.sigmoid(_randn(gen, 1, t, hq))
    return ([_randn(gen, 1, t, hq, dh), _randn(gen, 1, t, hkv, dh), _randn(gen, 1, t, hkv, dh), q_gain, gate],
            (True, torch.tensor(offsets, dtype=torch.int32)))


def _gated_segments(fn):
    """The attention entry called with its leaves first (gate is a leaf, after the constant xsa in its signature)."""
    def call(q, k, v, q_gain, gate, xsa, cu_seqlens):
        return fn(q, k, v, q_gain, xsa, gate=gate, cu_seqlens=cu_seqlens)
    return call


def _head_inputs(gen, small):
    n, d, vocab = (37, 48, 200) if small else (97, 512, 1024)
    return [_randn(gen, n, d), _randn(gen, vocab, d, std=d ** -0.5)], (torch.randint(0, vocab, (n,), generator=gen), 30.0)


def _norm_inputs(op):
    def build(gen, small):
        m, d = (37, 48) if small else (97, 512)
        x = _randn(gen, m, d)
        if op == "mix_norm":
            return [x, _randn(gen, m, d), torch.stack((1 + 0.2 * _randn(gen, d), 0.5 * _randn(gen, d)))], (0.7,)
        if op == "add_norm":
            return [x, _randn(gen, m, d), 1 + 0.2 * _randn(gen, d)], (0.7,)
        return [x], (0.7,)
    return build


def _skip_inputs(gated):
    def build(gen, small):
        m, d = (37, 48) if small else (97, 512)
        mix = torch.stack((1 + 0.2 * _randn(gen, d), 0.5 * _randn(gen, d)))
        gate = [_randn(gen, d)] if gated else []  # both sides of 0: both of lerp's formulas
        return [_randn(gen, m, d), _randn(gen, m, d), 1 + 0.2 * _randn(gen, d), *gate, _randn(gen, m, d), mix], (0.7,)
    return build


def _skip_form(gated: bool, keep: str):
    """skip_mix_norm as the model calls it: gated or additive (no gate leaf), keeping x_in (a sequential slot)
    or merged (a two-lane slot); the outputs are the one kept, then h."""
    flags, index = {"x_in": ({"keep_merged": False}, 1), "merged": ({"keep_x_in": False}, 0)}[keep]

    def adapt(fn):
        def call(x, kept, weight, *rest):
            gate, (x0, mix, scale) = (rest[0], rest[1:]) if gated else (None, rest)
            out = fn(x, kept, weight, gate, x0, mix, scale, **flags)
            return out[index], out[2]
        return call
    grads = ("dx", "dkept", "dweight") + (("dgate",) if gated else ()) + ("dx0", "dmix")
    return dict(label=f"{'lerp' if gated else 'add'}, keep {keep}", build=_skip_inputs(gated),
                torch_path=adapt(skip_mix_norm_reference), reference=adapt(skip_mix_norm_reference),
                names=(keep, "h") + grads, adapt=adapt)


def _lane_inputs(gen, small):
    m, d = (37, 48) if small else (97, 512)
    lanes_and_branches = [_randn(gen, m, d) for _ in range(4)]
    return [*lanes_and_branches, 1 + 0.2 * _randn(gen, d), 1 + 0.2 * _randn(gen, d), 1.1 + 0.1 * _randn(gen, 2),
            1 + 0.2 * _randn(gen, 2, 2)], ()


def _int6_inputs(gen, small):
    m, k, n = (5, 70, 45) if small else (17, 512, 1536)
    codes = torch.randint(-32, 32, (n, k), generator=gen, dtype=torch.int8)
    scale = (1.0 / 31) * (0.5 + torch.rand(n, generator=gen))
    return [_randn(gen, m, k)], (pack_int6_planes(codes), scale, k)


# Each family's accuracy bars, the one definition: tests/test_<family>.py reads its bars from here too.
# fp32 ("ieee" dots) differs from the reference only in summation order; the floor covers values that are
# exactly zero in the reference (relu² dead units, T = 1 attention gradients, a ~0 scalar loss).
# lane_update's d(resid) and d(post) are sums over every element of the stream: there the fp32 reference's
# own summation error reaches ~1.2e-6 of the result (measured at 128 x 128), past the norms' 1e-6.
BARS = {"mlp": Bars(1e-5, 2.0 ** -14, 1e-6), "attention": Bars(1e-4, 2.0 ** -12, 1e-5),
        "head": Bars(1e-5, 2.0 ** -14, 1e-7), "norm": Bars(1e-6, 2.0 ** -18, 1e-6),
        "lane_update": Bars(1e-5, 2.0 ** -16, 1e-6), "int6": Bars(1e-5, 2.0 ** -16, 1e-6)}

CASES = [
    Case("mlp", "", "mlp", _mlp_inputs, mlp_reference, mlp_reference, ("y", "dx", "dw_up", "dw_down"),
         BARS["mlp"], bf16_leaves=(0,)),
    *(Case("attention", "xsa" if xsa else "no xsa", "attention", _attention_inputs(xsa), attention_sdpa,
           attention_reference, ("y", "dq", "dk", "dv", "dq_gain"), BARS["attention"], bf16_leaves=(0, 1, 2))
      for xsa in (False, True)),
    Case("attention", "xsa, gate, segments", "attention", _gated_segments_inputs, _gated_segments(attention_sdpa),
         _gated_segments(attention_reference), ("y", "dq", "dk", "dv", "dq_gain", "dgate"), BARS["attention"],
         bf16_leaves=(0, 1, 2, 4), adapt=_gated_segments),
    Case("softcap_cross_entropy", "", "head", _head_inputs, softcap_cross_entropy_reference,
         softcap_cross_entropy_reference, ("loss", "dh", "dweight"), BARS["head"], bf16_leaves=(0,)),
    Case("mix_norm", "", "norm", _norm_inputs("mix_norm"), mix_norm_reference, mix_norm_reference,
         ("x_in", "h", "dx", "dx0", "dmix"), BARS["norm"]),
    Case("add_norm", "", "norm", _norm_inputs("add_norm"), add_norm_reference, add_norm_reference,
         ("x_new", "h", "dx", "dbranch", "dgain"), BARS["norm"], bf16_leaves=(1,)),
    Case("rms_norm", "", "norm", _norm_inputs("rms_norm"), rms_norm_reference, rms_norm_reference,
         ("h", "dx"), BARS["norm"]),
    # the forms the model runs: R1's gated skips (sequential and two-lane slots) and the crawler's additive ones
    *(Case(op="skip_mix_norm", family="norm", bars=BARS["norm"], **_skip_form(gated, keep))
      for gated, keep in ((True, "x_in"), (True, "merged"), (False, "x_in"))),
    Case("lane_update", "", "norm", _lane_inputs, lane_update_reference, lane_update_reference,
         ("lane0", "lane1", "dlane0", "dlane1", "dattn_out", "dmlp_out", "dattn_scale", "dmlp_scale", "dresid",
          "dpost"), BARS["lane_update"], bf16_leaves=(2, 3)),
    Case("int6_matmul", "", "int6", _int6_inputs, int6_matmul_torch, int6_matmul_reference, ("y", "dx"),
         BARS["int6"], bf16_leaves=(0,)),
]


# ------------------------------------------------------------------------------------------- one comparison

def _run(fn, leaves, constants, upstream, autocast: bool):
    """fn's outputs and its leaves' gradients, backward from `upstream` (a list, or a function of the outputs
    that makes one), each cast to its output's dtype."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in leaves]
    with torch.enable_grad(), torch.autocast(leaves[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        outs = fn(*leaves, *constants)
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = upstream(outs) if callable(upstream) else upstream
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def _errors(got, ref):
    diff = got.float() - ref
    return diff.pow(2).mean().sqrt().item(), diff.abs().max().item()


def _mismatch(name, got, ref, baseline, bars: Bars) -> str | None:
    """None when got is within the bars of the fp32 ref, else what was measured against which bar.

    baseline None: fp32, the fixed bars. Otherwise bf16: at most bf16_factor x the error of the PyTorch
    path's result `baseline` (or of ref rounded to got's dtype, if that is larger) plus BF16_REL_FLOOR x
    max|ref|, and never a tighter bar than fp32's."""
    if got is None or got.shape != ref.shape:
        return f"{name}: shape {None if got is None else tuple(got.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values"
    ref_rms, ref_max = ref.pow(2).mean().sqrt().item(), ref.abs().max().item()
    rms_bar, max_bar = bars.fp32_rel_rms * ref_rms, bars.fp32_max_rel * ref_max
    if baseline is not None:
        base_rms, base_max = map(max, zip(_errors(baseline, ref), _errors(ref.to(got.dtype), ref)))
        rms_bar, max_bar = max(rms_bar, bars.bf16_factor * base_rms), max(max_bar, bars.bf16_factor * base_max)
        # Plus one bf16 rounding of the largest value: the reductions into a few numbers (d(q_gain), the
        # loss) make the 2x bar a coin toss at these small shapes, and a broken kernel is off by far more.
        rms_bar, max_bar = rms_bar + BF16_REL_FLOOR * ref_max, max_bar + BF16_REL_FLOOR * ref_max
    err_rms, err_max = _errors(got, ref)
    if err_rms <= rms_bar + bars.abs_floor and err_max <= max_bar + bars.abs_floor:
        return None
    return (f"{name}: rms error {err_rms:.3e} (bar {rms_bar + bars.abs_floor:.3e}), max error {err_max:.3e} "
            f"(bar {max_bar + bars.abs_floor:.3e}), max |ref| {ref_max:.3e}")


def check_case(case: Case, device, bf16: bool, seed: int = 0) -> str | None:
    """Run one case on `device` (bf16: under bf16 autocast, else fp32); None if it passes, else the mismatch.
    Exceptions from the kernel propagate."""
    gen = torch.Generator().manual_seed(seed)
    leaves, constants = case.build(gen, device.type != "cuda")
    if bf16:  # values bf16 can hold, so the fp32 reference sees exactly what the kernel reads after its casts
        leaves = [t.to(torch.bfloat16).to(torch.float32) for t in leaves]
    leaves = [t.to(torch.bfloat16) if bf16 and i in case.bf16_leaves else t for i, t in enumerate(leaves)]
    leaves = [t.to(device) for t in leaves]
    constants = tuple(c.to(device) if isinstance(c, torch.Tensor) else c for c in constants)
    upstream = []

    def draw(outs):
        upstream.extend(torch.randn(tuple(o.shape), generator=gen).to(device) for o in outs)
        return upstream

    triton_entry = getattr(importlib.import_module(f"kernels.{case.family}"), f"{case.op}_triton")
    triton_entry = triton_entry if case.adapt is None else case.adapt(triton_entry)
    got = _run(triton_entry, leaves, constants, draw, autocast=bf16)
    # The reference gets the upstream gradients as the kernel's outputs received them (rounded to their dtype).
    upstream = [g.to(o.dtype).float() for o, g in zip(got, upstream)]
    ref = _run(case.reference, [t.float() for t in leaves], constants, upstream, autocast=False)
    baseline = _run(case.torch_path, leaves, constants, upstream, autocast=True) if bf16 else [None] * len(got)
    for name, g, r, b in zip(case.names, got, ref, baseline):
        failure = _mismatch(name, g, r, b, case.bars)
        if failure:
            return failure
    return None


def _gptq_failure(device, bf16: bool) -> str | None:
    """GPTQ's codes from the kernel against the reference on one small layer, with tests/test_gptq.py's bar:
    at most 0.1% of the codes off by one and none by more (fp32 only: calibration runs in fp32)."""
    from kernels.gptq import quantize_layer_reference, quantize_layer_triton

    gen = torch.Generator().manual_seed(0)
    rows, cols = (16, 40) if device.type != "cuda" else (64, 256)
    x = _randn(gen, 4 * cols, cols) * torch.exp(0.5 * _randn(gen, cols))  # channels of different scales
    hessian, weight = (x.T @ x / x.shape[0]).to(device), (0.05 * _randn(gen, rows, cols)).to(device)
    scale = (weight.abs().amax(1) / 31).to(torch.float16).float()  # a stored (fp16) row step
    options = dict(block_size=16, damping=0.01, order="descending", inverse="cholesky")
    diff = (quantize_layer_triton(weight, hessian, scale, **options).int()
            - quantize_layer_reference(weight, hessian, scale, **options).int()).abs()
    off = int((diff > 0).sum())
    if int(diff.max()) <= 1 and off <= 1e-3 * diff.numel():
        return None
    return f"codes: {off} of {diff.numel()} differ from the reference (max by {int(diff.max())})"


# Ops whose result is codes, not a differentiable tensor: their own check instead of a Case.
CODE_CHECKS = {"gptq_quantize_layer": _gptq_failure}


# ------------------------------------------------------------------------------------------- the self-test

def record(ops) -> dict[str, str]:
    """Where each op runs now: {"mlp": "triton", "attention": "torch (self-test: ...)", ...}."""
    return {op: kernels.op_path(op) for op in ops}


def record_line(paths: dict[str, str]) -> str:
    """The record as one run-log line: "kernels: mlp:triton  attention:torch (self-test: ...)  ..."."""
    return "kernels: " + "  ".join(f"{op}:{path}" for op, path in paths.items())


def run(device, ops=TRAINING_OPS, *, strict: bool | None = None) -> dict[str, str]:
    """Self-test `ops` on `device` when they run on Triton; a failing op moves to its PyTorch path (one
    warning line), or raises SelfTestFailed with strict (default: kernels.strict(), $KERNELS_STRICT). Returns
    record(ops).

    Nothing runs for ops already on the PyTorch path (KERNELS=torch). On CUDA both dtypes the run uses are
    checked (bf16 autocast and fp32), TF32 off; on the CPU fp32 only. The global RNG is not touched."""
    device = torch.device(device)
    strict = kernels.strict() if strict is None else strict
    known = {c.op for c in CASES} | set(CODE_CHECKS)
    unknown = set(ops) - known
    if unknown:
        raise ValueError(f"kernels.selftest.run: no self-test for {sorted(unknown)}; known: {sorted(known)}")
    modes = (("bf16", True), ("fp32", False)) if device.type == "cuda" else (("fp32", False),)
    with tf32_matmuls(False):  # fp32 references are fp32
        for op in ops:
            if not kernels.uses_triton(op):
                continue
            failure = _first_failure([c for c in CASES if c.op == op] or [op], device,
                                     modes if op not in CODE_CHECKS else (("fp32", False),))
            if failure is None:
                continue
            line = f"kernels: {op} failed its start-up self-test in {failure}"
            if strict:
                raise SelfTestFailed(f"{line} ({STRICT_ENV}=1)")
            _log.warning("%s; it runs on its PyTorch path for the rest of the process", line)
            kernels.use_reference(op, f"self-test: {failure}")
    return record(ops)


def _first_failure(cases, device, modes) -> str | None:
    """'<dtype>[ <case>]: <what>' for the first case that raises or misses its bars, else None."""
    for dtype, bf16 in modes:
        for case in cases:
            label = case.label if isinstance(case, Case) else ""
            where = f"{dtype} ({label})" if label else dtype
            try:
                failure = (check_case(case, device, bf16) if isinstance(case, Case)
                           else CODE_CHECKS[case](device, bf16))
            except Exception as err:  # a kernel that raises is as unusable as one that is wrong
                failure = f"raised {type(err).__name__}: {err}"
            if failure is not None:
                return f"{where}: " + " ".join(failure.split())  # one line, whatever the message held
    return None
