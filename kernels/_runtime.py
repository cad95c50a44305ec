"""What every kernel family needs to know about where it runs (no Triton kernels here).

INTERPRET is read once, when kernels/ is imported: TRITON_INTERPRET=1 must be set before that, because
@triton.jit reads it when a kernel is defined.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_device(where: str, name: str, device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter; say which when neither."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    raise ValueError(f"{where}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                     f"before kernels/ is imported), got {name} on {device}")
