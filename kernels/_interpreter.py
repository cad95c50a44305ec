"""Fixes for the Triton interpreter (TRITON_INTERPRET=1) so kernels can be tested on a CPU.

The stock interpreter keeps bf16 values as raw uint16 bit patterns: bf16 arithmetic, comparisons,
tl.sum and tl.dot give garbage, bf16 constants raise on triton <= 3.8, and fp32 -> bf16 truncates
instead of rounding to nearest even. `apply()` does bf16 maths in fp32 and rounds like the GPU.
`apply_autotune()` lets @triton.autotune with several configs run without a GPU driver (it times
each config with a wall clock). Neither changes anything on a GPU: both only patch interpreter
classes, and are only called when TRITON_INTERPRET=1. Tested on triton 3.7.1, 3.8.0, 3.9.0.
"""
import time

import numpy as np
import triton.language as tl
from triton.runtime import autotuner as _autotuner
from triton.runtime import interpreter as _interp

_BF16 = tl.bfloat16


def _as_f32(handle):
    """TensorHandle data as numpy, bf16 bit patterns widened to fp32."""
    if handle.dtype.scalar == _BF16:
        return (np.asarray(handle.data).astype(np.uint32) << 16).view(np.float32)
    return handle.data


def _to_bf16_bits(x):
    """fp32 numpy -> bf16 bit patterns, round-to-nearest-even like the GPU (NaN stays NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def apply():
    builder, handle_cls = _interp.InterpreterBuilder, _interp.TensorHandle
    if getattr(builder, "_ouroboros_bf16_patched", False):
        return
    orig_binary, orig_unary, orig_dot = builder.binary_op, builder.unary_op, builder.create_dot
    orig_cast, orig_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def binary_op(self, lhs, rhs, op):
        if _BF16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return orig_binary(self, lhs, rhs, op)
        out = op(_as_f32(lhs), _as_f32(rhs))
        if out.dtype == np.bool_:
            return handle_cls(out, tl.int1)
        return handle_cls(_to_bf16_bits(out), _BF16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar == _BF16:
            return handle_cls(_to_bf16_bits(op(_as_f32(arg))), _BF16)
        return orig_unary(self, arg, op)

    def create_dot(self, a, b, acc, *args, **kwargs):
        if _BF16 in (a.dtype.scalar, b.dtype.scalar):
            a, b = handle_cls(_as_f32(a), tl.float32), handle_cls(_as_f32(b), tl.float32)
        return orig_dot(self, a, b, acc, *args, **kwargs)

    def cast_impl(self, src, dst):
        src_t, dst_t = src.dtype.scalar, dst.scalar
        if dst_t == _BF16 and src_t != _BF16:
            return handle_cls(_to_bf16_bits(np.asarray(_as_f32(src)).astype(np.float32)), _BF16)
        if src_t == _BF16 and dst_t != _BF16:
            return handle_cls(_as_f32(src).astype(_interp._get_np_dtype(dst_t)), dst_t)
        return orig_cast(self, src, dst)

    def fp_to_fp(self, src, dst, rounding):
        if _BF16 in (src.dtype.scalar, dst.scalar):
            return cast_impl(self, src, dst)
        return orig_fp_to_fp(self, src, dst, rounding)

    builder.binary_op, builder.unary_op, builder.create_dot = binary_op, unary_op, create_dot
    builder.cast_impl, builder.create_fp_to_fp = cast_impl, fp_to_fp
    builder.get_bf16 = lambda self, v: handle_cls(_to_bf16_bits(np.array([v], np.float32)), _BF16)
    for name in ("create_fp_ext", "create_fp_trunc", "create_si_to_fp", "create_ui_to_fp",
                 "create_fp_to_si", "create_fp_to_ui"):
        setattr(builder, name, lambda self, src, dst: cast_impl(self, src, dst))

    orig_sum = _interp.ReduceOps.sum

    def reduce_sum(self, inp):
        if inp.dtype.scalar != _BF16:
            return orig_sum(self, inp)
        total = np.asarray(np.sum(_as_f32(inp.handle), axis=self.axis, keepdims=self.keep_dims), np.float32)
        if total.shape:
            return self.to_tensor(_to_bf16_bits(total.reshape(-1)).reshape(total.shape), inp.dtype)
        return self.to_tensor(_to_bf16_bits(total.reshape(1))[0], inp.dtype)

    _interp.ReduceOps.sum = reduce_sum
    builder._ouroboros_bf16_patched = True


def apply_autotune():
    def wall_clock_bench(kernel_call, quantiles=None, **_):
        start = time.perf_counter()
        kernel_call()
        ms = (time.perf_counter() - start) * 1e3
        return [ms, ms, ms] if quantiles else ms

    _autotuner.Autotuner.do_bench = property(lambda self: self._do_bench or wall_clock_bench)
