"""Test setup: on a machine without CUDA, every Triton kernel runs through the interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here, before any test
module imports kernels/. Models and references run in fp32 on the CPU (bf16 there is ~30x slower).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one core; more threads per worker only fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
