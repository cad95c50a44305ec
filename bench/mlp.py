"""Benchmarks of the fused leaky-ReLU^2 MLP (kernels/mlp.py) at the training shapes.

Providers: "triton" (the fused kernels, kernels.mlp on CUDA), "eager" (mlp_reference), "compile"
(torch.compile of mlp_reference) and "cublas": the two GEMMs alone, without the activation (autograd
runs four GEMMs backward), i.e. the GEMM floor the fused kernel is held to.

FLOPs (a GEMM is 2·M·N·K; the activation's elementwise work is not counted): forward two GEMMs,
4·M·d·hidden; backward four (dA, dx, dW_up, dW_down), 8·M·d·hidden; fwd+bwd 12·M·d·hidden.
Shapes: M = 48·2048 = 98,304 tokens per GPU, d = 512, hidden 1536 (flat blocks) and 3072 (crawler).
"""
import torch
import torch.nn.functional as F

from bench.registry import Case, compile_baseline, register
from kernels.mlp import mlp_reference, mlp_triton

SLOPE = 0.5  # the seed command's MLP_LEAKY_SLOPE
GPU_SHAPES = [dict(M=98_304, d=512, hidden=1536), dict(M=98_304, d=512, hidden=3072)]
SMOKE_SHAPES = [dict(M=64, d=32, hidden=48)]


def _gemms_only(x, w_up, w_down, slope):
    return F.linear(F.linear(x, w_up), w_down)


def _flops(mode: str, M: int, d: int, hidden: int) -> float:
    return {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[mode] * M * d * hidden


@register("mlp")
def cases(device: str, smoke: bool) -> list[Case]:
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 is emulated: smoke in fp32
    providers = {"triton": mlp_triton, "eager": mlp_reference,
                 "compile": compile_baseline(mlp_reference, device), "cublas": _gemms_only}
    out = []
    for shape in SMOKE_SHAPES if smoke else GPU_SHAPES:
        M, d, hidden = shape["M"], shape["d"], shape["hidden"]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, d, device=device, generator=gen).to(dtype).requires_grad_()
        w_up = (torch.randn(hidden, d, device=device, generator=gen) / d ** 0.5).to(dtype).requires_grad_()
        w_down = (torch.randn(d, hidden, device=device, generator=gen) / hidden ** 0.5).to(dtype).requires_grad_()
        dy = torch.randn(M, d, device=device, generator=gen).to(dtype)
        inputs = (x, w_up, w_down)
        for provider, op in providers.items():
            def fwd(op=op):
                with torch.no_grad():
                    return op(x, w_up, w_down, SLOPE)

            y = op(x, w_up, w_down, SLOPE)  # the graph the "bwd" case replays (retain_graph)

            def bwd(y=y):
                return torch.autograd.grad(y, inputs, dy, retain_graph=True)

            def fwd_bwd(op=op):
                return torch.autograd.grad(op(x, w_up, w_down, SLOPE), inputs, dy)

            for mode, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
                out.append(Case(kernel="mlp", provider=provider, mode=mode, shape=dict(shape), fn=fn,
                                flops=_flops(mode, M, d, hidden)))
    return out
