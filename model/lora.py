"""Per-document LoRA adapters for test-time training (R1's BatchedTTTLoRA, DATA_EVAL.md 4.4).

Row b of a batch is one document with its own adapters: Δ_b(u) = (α/r)·B_b·(A_b·u), A_b [r, in] and
B_b [out, r] in fp32, A ~ U(±1/√in), B = 0. Every slot of the schedule (a virtual layer: a looped or
repeated block gets its own) has Q, K, V on the block's normed input n (added to the raw projections,
before the QK-norm and RoPE), O on n (added after the out-projection), MLP on the normed MLP input m (added
to the MLP's output); the head's adapter reads the final norm's output and adds to the logits before the
softcap. The model takes them through its one forward path (`GPT.forward(ids, lora=...)`), so every block
kind, lane and gate of the model is the one TTT runs; with B = 0 the forward is the plain one, bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class BatchedLinearLoRA(nn.Module):
    """Δ(u) = scale·(u·Aᵀ)·Bᵀ per row: u [n, T, in] -> [n, T, out], A [n, r, in], B [n, out, r]."""

    def __init__(self, rows: int, in_features: int, out_features: int, rank: int, scale: float,
                 generator: torch.Generator | None = None, device=None):
        super().__init__()
        self.scale = float(scale)
        self.first_row = 0  # rows before it are left out of the forward (TTTLoRA.use_rows)
        self.A = nn.Parameter(torch.empty(rows, rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(rows, out_features, rank, device=device))
        self.reset_A(generator)

    @torch.no_grad()
    def reset_A(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.A.size(-1))
        self.A.uniform_(-bound, bound, generator=generator)  # a generator on A's device

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a, b = self.A[self.first_row:], self.B[self.first_row:]
        return self.scale * ((u @ a.transpose(1, 2).to(u.dtype)) @ b.transpose(1, 2).to(u.dtype))


class SlotLoRA(nn.Module):
    """The adapters of one schedule slot: q, k, v, o (on the block's normed input) and mlp (on the MLP's)."""

    def __init__(self, rows: int, dim: int, kv_dim: int, rank: int, scale: float, k: bool, o: bool, mlp: bool,
                 generator: torch.Generator | None, device):
        super().__init__()
        outs = {"q": dim, "k": kv_dim if k else 0, "v": kv_dim, "o": dim if o else 0, "mlp": dim if mlp else 0}
        self.adapters = nn.ModuleDict({name: BatchedLinearLoRA(rows, dim, out, rank, scale, generator, device)
                                       for name, out in outs.items() if out})

    def add(self, name: str, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus adapter `name` applied to u (y itself when this slot has no such adapter)."""
        adapter = self.adapters[name] if name in self.adapters else None
        return y if adapter is None else y + adapter(u).to(y.dtype)


class TTTLoRA(nn.Module):
    """Adapters for `rows` documents over every slot of a model's schedule with recurrence on, and the head."""

    def __init__(self, model: nn.Module, rows: int, rank: int, alpha: float, k: bool = True, o: bool = True,
                 mlp: bool = True, generator: torch.Generator | None = None, device=None):
        super().__init__()
        cfg = model.config
        scale = alpha / rank
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.rows = rows
        self.num_slots = len(model.schedules[True])
        self.slots = nn.ModuleList(SlotLoRA(rows, cfg.model_dim, kv_dim, rank, scale, k, o, mlp, generator, device)
                                   for _ in range(self.num_slots))
        self.head = BatchedLinearLoRA(rows, cfg.model_dim, cfg.vocab_size, rank, scale, generator, device)

    def adapters(self) -> list[BatchedLinearLoRA]:
        return [m for m in self.modules() if isinstance(m, BatchedLinearLoRA)]

    def use_rows(self, first: int) -> None:
        """The forward's ids are rows first.. of the batch (the documents still being read: the shortest finish
        first, so finished rows are a prefix). Their adapters keep their state and still take weight decay."""
        for adapter in self.adapters():
            adapter.first_row = first

    @torch.no_grad()
    def reset_B(self) -> None:
        for adapter in self.adapters():
            adapter.B.zero_()

    @torch.no_grad()
    def reset_A(self, generator: torch.Generator | None) -> None:
        for adapter in self.adapters():
            adapter.reset_A(generator)

    def a_state(self) -> list[torch.Tensor]:
        """Copies of every A (a warm start carried to a later batch)."""
        return [adapter.A.detach().clone() for adapter in self.adapters()]

    @torch.no_grad()
    def load_a_state(self, state: list[torch.Tensor]) -> None:
        for adapter, a in zip(self.adapters(), state, strict=True):
            adapter.A.copy_(a)
