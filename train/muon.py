"""Muon: momentum SGD whose update for each weight matrix is orthogonalized by Newton-Schulz (SPEC 4).

For each 2-D matrix: b <- mu*b + g; g <- g + mu*b (Nesterov); U = NS5(g) * sqrt(max(1, rows/cols));
p <- p * (1 - lr*wd); p <- p - lr*U. Under torch.distributed each rank orthogonalizes every
world_size-th matrix (round robin) and one all-reduce of a flat buffer hands every rank all updates,
so the ranks' weights stay identical while the Newton-Schulz work is split.

This file imports nothing from the project: it is a leaf the training loop uses.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

# Quintic coefficients chosen to push singular values towards 1 quickly, not to converge exactly:
# after 5 steps they land roughly in [0.7, 1.2], which is what Muon wants from the update.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize a 2-D matrix: X = G/(||G||_F+eps), then `steps` times
    X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation (transposed if rows > cols).

    Runs in bf16 on CUDA (the tensor cores) and fp32 elsewhere (bf16 on CPU is ~30x slower).
    Returns a tensor of grad's shape in the compute dtype.
    """
    if grad.ndim != 2:
        raise ValueError(f"newton_schulz5: expected a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = NS_COEFFS
    X = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:  # A = XX^T is then the small (cols x cols) Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


def momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon momentum ramp: linear from `start` at step 0 to `end` at `warmup_steps`, then constant."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


class Muon(torch.optim.Optimizer):
    """Muon over a list of 2-D parameters (see the module docstring).

    lr, momentum and weight_decay live in the param group so the training loop can ramp them.
    `rank`/`world_size` default to torch.distributed's when it is initialized, else (0, 1).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 backend_steps: int = 5, nesterov: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        params = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or p.ndim != 2:
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"Muon: parameter {i} has shape {shape}; Muon only takes 2-D matrices "
                                 "(put vectors and embeddings in AdamW)")
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"Muon: bad hyperparameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, backend_steps=backend_steps,
                        nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            device = params[0].device
            # bf16 on CUDA halves the all-reduce; the update is bf16 from Newton-Schulz there anyway.
            flat = torch.zeros(sum(p.numel() for p in params), device=device,
                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            offset = 0
            for i, p in enumerate(params):
                n = p.numel()
                if i % self.world_size == self.rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(g)
                    g = g.add(buf, alpha=mu) if group["nesterov"] else buf
                    update = newton_schulz5(g, steps=group["backend_steps"])
                    update = update * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                    flat[offset:offset + n] = update.flatten()
                offset += n
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                n = p.numel()
                if p.grad is not None:  # DDP gives every rank the same set of grads, so all ranks agree
                    update = flat[offset:offset + n].view_as(p).to(p.dtype)
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(update, alpha=-lr)
                offset += n
        return loss
