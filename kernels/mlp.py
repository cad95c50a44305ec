"""Fused leaky-ReLU^2 MLP: y = W_down · leaky_relu(W_up · x, slope)^2.

This file holds the PyTorch reference; the Triton kernels, their launchers and the autograd op
live beside it (one file per kernel family).
"""
import torch
import torch.nn.functional as F


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """x [..., d], w_up [hidden, d], w_down [d, hidden]; act(u) = leaky_relu(u, slope)^2 (slope 0 = relu^2)."""
    pre = F.linear(x, w_up)
    return F.linear(F.leaky_relu(pre, slope).square(), w_down)
