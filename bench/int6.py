"""Bench entry `int6`: the fused int6 dequant-matmul against bf16 cuBLAS and dequantize-then-matmul.

Shapes: N = K = 8192 (the speed targets' shape), M from a decode step to a training-sized batch.
Providers (bf16 x on CUDA; fp32 on the CPU smoke, where bf16 is ~30x slower):
    triton   the fused kernel (kernels/int6.py), reading 0.75 byte per weight
    cublas   x @ Wᵀ with W already dequantized to bf16 (what an unquantized layer costs)
    eager    dequantize then matmul, every call (the plain PyTorch path of QuantLinear)
    compile  torch.compile of the eager path
Work: 2·M·N·K flops for every provider. Bytes, what each provider must move at the least:
    triton   x (M·K·e) + packed weight (3·N·row_bytes(K)) + scales (4·N) + y (M·N·e)
    cublas   x + bf16 weight (N·K·e) + y
    eager / compile: triton's bytes + the dequantized weight written and read once more (2·N·K·e)
with e the activation's element size. Targets (H100, unverified until a GPU session runs this):
M <= 16 at least 2.0x faster than cublas (ideal 16/6 = 2.67x), M = 98,304 within 1.10x of cublas.
"""
from __future__ import annotations

import torch

from bench.registry import Case, compile_baseline, register
from kernels.int6 import dequantize_int6, int6_matmul_torch, int6_matmul_triton, pack_int6_planes, row_bytes

GPU_MS = (1, 16, 128, 2048, 98304)
GPU_NK = 8192
SMOKE_MS = (1, 16)
SMOKE_N, SMOKE_K = 64, 96


def _layer(n: int, k: int, device: str):
    codes = torch.randint(-31, 32, (n, k), dtype=torch.int8, device=device)
    scale = torch.full((n,), 1.0 / 31, device=device) * (0.5 + torch.rand(n, device=device))
    return pack_int6_planes(codes), scale


@register("int6")
def cases(device: str, smoke: bool) -> list[Case]:
    ms, n, k = (SMOKE_MS, SMOKE_N, SMOKE_K) if smoke else (GPU_MS, GPU_NK, GPU_NK)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    e = torch.tensor([], dtype=dtype).element_size()
    packed, scale = _layer(n, k, device)
    w_dequant = dequantize_int6(packed, scale, k, dtype)   # cublas' weight, prepared once
    compiled = compile_baseline(int6_matmul_torch, device)
    out = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=dtype)
        flops = 2.0 * m * n * k
        io = m * k * e + m * n * e
        packed_bytes = 3 * n * row_bytes(k) + 4 * n
        shape = {"M": m, "N": n, "K": k}
        out += [
            Case("int6", "triton", "fwd", shape, lambda x=x: int6_matmul_triton(x, packed, scale, k),
                 flops=flops, bytes=io + packed_bytes),
            Case("int6", "cublas", "fwd", shape, lambda x=x: torch.matmul(x, w_dequant.t()),
                 flops=flops, bytes=io + n * k * e),
            Case("int6", "eager", "fwd", shape, lambda x=x: int6_matmul_torch(x, packed, scale, k),
                 flops=flops, bytes=io + packed_bytes + 2 * n * k * e),
            Case("int6", "compile", "fwd", shape, lambda x=x: compiled(x, packed, scale, k),
                 flops=flops, bytes=io + packed_bytes + 2 * n * k * e),
        ]
    return out
