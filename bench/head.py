"""Benchmarks of the fused soft-capped tied-head cross-entropy (kernels/head.py) at the training shapes.

Providers: "triton" (the fused kernels + chunked cuBLAS backward, kernels.softcap_cross_entropy on CUDA),
"eager" (softcap_cross_entropy_reference: F.linear, softcap, F.cross_entropy over fp32 [N, V] logits)
and "compile" (torch.compile of that reference).

FLOPs (GEMMs only, 2·M·N·K each; the softcap and softmax elementwise work is not counted), the same
for every provider: forward z = h·Eᵀ, 2·N·V·d; backward dh = dz·E and dE = dzᵀ·h, 4·N·V·d; fwd+bwd
6·N·V·d. The fused backward also recomputes z (another 2·N·V·d executed, not counted), so its
TFLOP/s is the useful rate, comparable across providers.

Bytes: what the op must move at the least, with s the element size of h and E: forward reads h and
E and the int64 targets, N·d·s + V·d·s + 8·N; backward also reads them and lse (4·N) and writes dh and
dE, 2·N·d·s + 2·V·d·s + 12·N; fwd+bwd the sum, less the second read of the targets. The eager path
moves several fp32 [N, V] tensors on top (403 MB each at V = 1024, 3.2 GB at V = 8192), which is what
the fused kernel saves.
Shapes: N = 48·2048 = 98,304 tokens per GPU, d = 512, bf16, at V = 1024 and at the record R1's V = 8192
(6·N·V·d = 2.47 TFLOP for fwd+bwd). R1's target: fwd+bwd at least 1.2x faster than "compile". As in
bench/mlp.py, one compiled reference serves both shapes, so Dynamo may trace the second with V dynamic.
The smoke shapes run V = 200 and V = 4096, the large-vocabulary tables (kernels.head.LARGE_VOCAB).
"""
import torch

from bench.registry import Case, compile_baseline, register
from kernels.head import softcap_cross_entropy_reference, softcap_cross_entropy_triton

SOFTCAP = 30.0  # LOGIT_SOFTCAP
GPU_SHAPES = [dict(N=98_304, d=512, V=1024), dict(N=98_304, d=512, V=8192)]
SMOKE_SHAPES = [dict(N=64, d=32, V=200), dict(N=16, d=32, V=4096)]


def _flops(mode: str, N: int, d: int, V: int) -> float:
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * N * V * d


def _bytes(mode: str, N: int, d: int, V: int, s: int) -> float:
    fwd = N * d * s + V * d * s + 8 * N
    bwd = 2 * N * d * s + 2 * V * d * s + 12 * N
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd - 8 * N}[mode]


def _shape_cases(device: str, dtype: torch.dtype, providers: dict, shape: dict) -> list[Case]:
    """The cases of one shape. A function of its own so each case's closures hold this shape's tensors
    (closures made in a loop over shapes would all see the last shape's)."""
    N, d, V = shape["N"], shape["d"], shape["V"]
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, generator=gen).to(dtype).requires_grad_()  # RMSNorm output: rms 1
    weight = (torch.randn(V, d, device=device, generator=gen) / d ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    inputs = (h, weight)
    out = []
    for provider, op in providers.items():
        def fwd(op=op):
            with torch.no_grad():
                return op(h, weight, targets, SOFTCAP)

        loss = op(h, weight, targets, SOFTCAP)  # the graph the "bwd" case replays (retain_graph)

        def bwd(loss=loss):
            return torch.autograd.grad(loss, inputs, retain_graph=True)

        def fwd_bwd(op=op):
            return torch.autograd.grad(op(h, weight, targets, SOFTCAP), inputs)

        for mode, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
            out.append(Case(kernel="head", provider=provider, mode=mode, shape=dict(shape), fn=fn,
                            flops=_flops(mode, N, d, V), bytes=_bytes(mode, N, d, V, h.element_size())))
    return out


@register("head")
def cases(device: str, smoke: bool) -> list[Case]:
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 is emulated: smoke in fp32
    providers = {"triton": softcap_cross_entropy_triton, "eager": softcap_cross_entropy_reference,
                 "compile": compile_baseline(softcap_cross_entropy_reference, device)}
    return [case for shape in (SMOKE_SHAPES if smoke else GPU_SHAPES)
            for case in _shape_cases(device, dtype, providers, shape)]
