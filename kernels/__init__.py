"""The model's hot ops, each a PyTorch reference plus a Triton kernel, behind one dispatch.

KERNELS=torch|triton picks the implementation (default: triton with CUDA, torch without). On a
machine without CUDA, KERNELS=triton runs the kernels through the Triton interpreter, which must be
switched on with TRITON_INTERPRET=1 before this package is imported. An op whose kernel has not been
written yet falls back to its reference and says so once; so does, for the rest of the process, an op
that fails the start-up self-test (kernels/selftest.py, through use_reference).

Names, one rule: `kernels.<op>` is always an op's dispatching function (mlp, attention,
softcap_cross_entropy, mix_norm, add_norm, rms_norm, skip_mix_norm, lane_update,
gptq_quantize_layer), and a kernel family's module is only ever
reached as `from kernels.<family> import ...` (mlp, attention, head, norm, int6, gptq). Two families
share their op's name, so `kernels.mlp` and `kernels.attention` are the functions, never the modules;
`kernels.rms_norm` is the op (fused on the triton backend); where the model wants the plain PyTorch
RMSNorm that never dispatches (QK-norm, the embedding) it calls kernels.norm.rms_norm_reference by that
name. In a family module,
`<op>_triton` is the Triton entry point and `<op>_reference` the PyTorch path the torch backend runs
(attention's is `attention_sdpa`; its `attention_reference` is the tests' explicit fp32 ground truth).

Every `<op>_triton` entry applies the one input policy of kernels/_runtime.py (`input_policy`): the
autocast cast, one validation per call (the family's `_check_inputs`), the device check and the
layout; the dispatching functions here only pick the backend and call.
"""
import functools
import logging
import os

import torch

from ._runtime import INTERPRET, env_flag  # INTERPRET: read once, for every kernel family

if INTERPRET:  # before any kernel runs: bf16 and autotune fixes for the CPU interpreter
    from ._interpreter import apply as _apply_bf16_fix, apply_autotune as _apply_autotune_fix

    _apply_bf16_fix()
    _apply_autotune_fix()

from . import attention as _attention  # noqa: E402
from . import gptq as _gptq  # noqa: E402
from . import head as _head  # noqa: E402
from . import mlp as _mlp  # noqa: E402
from . import norm as _norm  # noqa: E402

BACKENDS = ("torch", "triton")
# Every dispatching function below runs inside a profiler range "kernels::<op>" (both backends), so a
# profile says which op an aten call or a Triton launch belongs to (bench/ledger.py groups by it). Outside
# a profiler a range costs about a microsecond; torch.compile traces through it.
PROFILE_PREFIX = "kernels::"
_log = logging.getLogger(__name__)
_backend = None
_fallback_noted = set()
# op -> why: ops that the start-up self-test (kernels/selftest.py) moved to their PyTorch path for this process.
_on_reference: dict[str, str] = {}


STRICT_ENV = "KERNELS_STRICT"


class BackendError(ValueError):
    """KERNELS names no backend, or one this machine cannot run, or KERNELS_STRICT is not a flag; entry points
    check both at start-up (backend(), strict())."""


def strict() -> bool:
    """KERNELS_STRICT: a Triton op that fails its start-up self-test stops the run instead of falling back."""
    try:
        return env_flag(STRICT_ENV)
    except ValueError as err:
        raise BackendError(str(err)) from None


def _resolve(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"KERNELS={name!r} is not one of {BACKENDS}")
    if name == "triton" and not torch.cuda.is_available() and not INTERPRET:
        raise BackendError("KERNELS=triton needs CUDA, or the Triton interpreter on CPU: set TRITON_INTERPRET=1 "
                           "in the environment before starting (it is read when kernels are defined), or use KERNELS=torch")
    return name


def backend() -> str:
    """The active backend: set_backend(), else $KERNELS, else triton with CUDA and torch without."""
    global _backend
    if _backend is None:
        _backend = _resolve(os.environ.get("KERNELS") or ("triton" if torch.cuda.is_available() else "torch"))
    return _backend


def set_backend(name: str | None) -> None:
    """Override $KERNELS for this process (None: read the environment again on next use)."""
    global _backend
    _backend = None if name is None else _resolve(name)


def use_reference(op: str, why: str | None) -> None:
    """Run `op` on its PyTorch path from now on, whatever the backend (why None: back to the backend's choice)."""
    if why is None:
        _on_reference.pop(op, None)
    else:
        _on_reference[op] = why


def uses_triton(op: str) -> bool:
    """Whether `op` runs its Triton kernel: the triton backend, and no use_reference() for it."""
    return backend() == "triton" and op not in _on_reference


def op_path(op: str) -> str:
    """Where `op` runs, for run logs: "triton", "torch", or "torch (<why use_reference() moved it>)"."""
    return "triton" if uses_triton(op) else f"torch ({_on_reference[op]})" if op in _on_reference else "torch"


def _triton_impl(module, op: str):
    """The op's Triton entry point when the triton backend is active, the kernel exists and the self-test has
    not moved the op to its reference; else None (the dispatching function then calls the op's PyTorch path)."""
    if not uses_triton(op):
        return None
    impl = getattr(module, f"{op}_triton", None)
    if impl is None and op not in _fallback_noted:
        _fallback_noted.add(op)
        _log.warning("kernels: no Triton kernel for %r yet, using its PyTorch reference", op)
    return impl


def _profiled(dispatch):
    """Run the dispatching function inside the profiler range PROFILE_PREFIX + its name."""
    name = PROFILE_PREFIX + dispatch.__name__

    @functools.wraps(dispatch)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(name):
            return dispatch(*args, **kwargs)
    return wrapper


@_profiled
def mlp(x, w_up, w_down, slope: float):
    """y = W_down · leaky_relu(W_up · x, slope)^2; x [..., d], w_up [hidden, d], w_down [d, hidden]."""
    impl = _triton_impl(_mlp, "mlp") or _mlp.mlp_reference
    return impl(x, w_up, w_down, slope)


@_profiled
def attention(q, k, v, q_gain, xsa: bool, gate=None, cu_seqlens=None):
    """Causal GQA attention with q_gain, optional XSA, an optional output gate [B, T, Hq] (applied after XSA) and
    optional segments (cu_seqlens int32 [n + 1] into one packed row, B = 1); q [B, T, Hq, D], k, v [B, T, Hkv, D]
    -> [B, T, Hq, D]."""
    impl = _triton_impl(_attention, "attention") or _attention.attention_sdpa
    return impl(q, k, v, q_gain, xsa, gate=gate, cu_seqlens=cu_seqlens)


@_profiled
def softcap_cross_entropy(h, weight, targets, softcap: float):
    """Mean fp32 cross-entropy of softcap·tanh(h·weightᵀ / softcap); h [..., d], weight [V, d], targets [...] int64."""
    impl = _triton_impl(_head, "softcap_cross_entropy") or _head.softcap_cross_entropy_reference
    return impl(h, weight, targets, softcap)


@_profiled
def mix_norm(x, x0, mix, scale: float):
    """(x_in, h): x_in = mix[0]⊙x + mix[1]⊙x0, h = RMSNorm(x_in)·scale; x, x0 [..., d], mix [2, d].

    The Triton path returns h in the autocast dtype when autocast is on (the next matmul's input)."""
    impl = _triton_impl(_norm, "mix_norm") or _norm.mix_norm_reference
    return impl(x, x0, mix, scale)


@_profiled
def add_norm(x, branch, gain, scale: float):
    """(x_new, h): x_new = x + gain⊙branch, h = RMSNorm(x_new)·scale; x, branch [..., d], gain [d]."""
    impl = _triton_impl(_norm, "add_norm") or _norm.add_norm_reference
    return impl(x, branch, gain, scale)


@_profiled
def rms_norm(x, scale: float = 1.0):
    """Weightless RMSNorm over the last dim times scale (eps: F.rms_norm's default)."""
    impl = _triton_impl(_norm, "rms_norm") or _norm.rms_norm_reference
    return impl(x, scale)


@_profiled
def skip_mix_norm(x, kept, weight, gate, x0, mix, scale: float, *, keep_merged: bool = True, keep_x_in: bool = True):
    """(merged, x_in, h): a U-Net skip merged into x, merged = lerp(weight⊙kept, x, σ(gate)) (or x + weight⊙kept,
    gate None), then the next block's mix_norm of merged; x, kept, x0 [..., d], weight, gate [d], mix [2, d].

    An output not kept is None (the Triton path does not write it): a sequential slot keeps x_in, a two-lane
    slot merged."""
    impl = _triton_impl(_norm, "skip_mix_norm") or _norm.skip_mix_norm_reference
    return impl(x, kept, weight, gate, x0, mix, scale, keep_merged=keep_merged, keep_x_in=keep_x_in)


@_profiled
def lane_update(lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post):
    """R1's two-lane update: lane_k <- resid[k]·lane_k + post[0,k]·(attn_scale⊙attn_out) + post[1,k]·(mlp_scale⊙mlp_out)
    in one pass; lanes and branches [..., d], scales [d], resid [2], post [2, 2] (source, lane)."""
    impl = _triton_impl(_norm, "lane_update") or _norm.lane_update_reference
    return impl(lane0, lane1, attn_out, mlp_out, attn_scale, mlp_scale, resid, post)


@_profiled
def gptq_quantize_layer(weight, hessian, scale, *, block_size: int, damping: float, order: str, inverse: str,
                        code_limit: int = _gptq.CODE_LIMIT):
    """GPTQ of one layer with fixed row steps -> int8 codes in [-code_limit, code_limit] (31: int6, 63: int7; a row
    whose step is 0 codes 0); weight [rows, cols], hessian [cols, cols], scale [rows]."""
    # keyed by the dispatcher's name, so the self-test's record and use_reference() name the op as callers do
    impl = _gptq.quantize_layer_triton if uses_triton("gptq_quantize_layer") else _gptq.quantize_layer_reference
    return impl(weight, hessian, scale, block_size=block_size, damping=damping, order=order, inverse=inverse,
                code_limit=code_limit)
