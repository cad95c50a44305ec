"""One training step: the code the trainer runs, bench/step.py times and the kernels' wiring tests train
with (SPEC 4). Its validation pass is train.evaluate.validate, which the export step (quant/) shares.

`TrainStep(...)(step, multiplier)` is one optimizer step: forward and backward over the micro-batches
(gradients averaged, or summed as the original did), the loss averaged over micro-batches and ranks, the
grad-norm clip, a finite check that stops before the weights change, the LR and Muon momentum schedule,
Muon + AdamW and zero_grad. Every phase runs in a profiler range PROFILE_PREFIX + <phase> (step, forward,
backward, clip, muon, adamw, zero_grad), so a profile of training says which phase an op belongs to
(bench/ledger.py groups by them); outside a profiler a range costs about a microsecond.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from model import param_groups
from model.config import Config
from train.evaluate import autocast_for
from train.muon import Muon, momentum_at

PROFILE_PREFIX = "ledger::"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message says where the last good weights are."""


def _phase(name: str):
    return torch.profiler.record_function(PROFILE_PREFIX + name)


# ----------------------------------------------------------------------------------------------
# The schedule and the optimizers


def lr_multiplier(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float | None) -> float:
    """The LR multiplier before step `step` (0-based), after `elapsed_ms` of timed training.

    Wall clock (max_wallclock_ms set): 1 until the time left is at most warmdown_iters average
    steps, then time_left / (warmdown_iters * avg_step_ms), reaching 0 at the cap. Step schedule
    (max_wallclock_ms None): 1, then linear to 0 over the last warmdown_iters of `iterations`.
    """
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms is None:
        start = max(iterations - warmdown_iters, 0)
        if step < start:
            return 1.0
        return max(iterations - step, 0) / warmdown_iters
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    if warmdown_ms <= 0 or remaining_ms > warmdown_ms:
        return 1.0
    return remaining_ms / warmdown_ms


class Optimizers:
    """Muon for the matrices, AdamW for embeddings and for scalars/vectors; one schedule for all.

    rank, world_size: this process's place in Muon's round robin (Newton-Schulz on every world_size-th
    matrix, then an all-reduce that needs a process group when world_size > 1).
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device | str, rank: int = 0,
                 world_size: int = 1):
        groups = param_groups(model)
        missing = {"matrix", "embed", "scalar"} - set(groups)
        if missing:
            raise ValueError(f"model.param_groups() lacks the groups {sorted(missing)}")
        seen = [id(p) for g in groups.values() for p in g]
        total = [id(p) for p in model.parameters() if p.requires_grad]
        if len(seen) != len(set(seen)) or set(seen) != set(total):
            raise ValueError(f"model.param_groups() must cover every trainable parameter exactly once "
                             f"({len(seen)} listed, {len(set(seen))} distinct, {len(total)} trainable)")
        self.cfg = cfg
        self.muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum_warmup_start,
                         weight_decay=cfg.muon_weight_decay, backend_steps=cfg.muon_backend_steps,
                         rank=rank, world_size=world_size)
        adam_groups = [dict(params=groups["embed"], lr=cfg.tied_embed_lr, base_lr=cfg.tied_embed_lr),
                       dict(params=groups["scalar"], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)]
        adam_groups = [g for g in adam_groups if g["params"]]
        self.adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                      weight_decay=cfg.adam_weight_decay, fused=torch.device(device).type == "cuda")
        for g in self.muon.param_groups:
            g["base_lr"] = cfg.matrix_lr
        self.all = (self.muon, self.adam)

    def set_schedule(self, step: int, multiplier: float) -> None:
        self.muon.param_groups[0]["momentum"] = momentum_at(
            step, self.cfg.muon_momentum_warmup_start, self.cfg.muon_momentum, self.cfg.muon_momentum_warmup_steps)
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * multiplier

    def step(self) -> None:
        with _phase("muon"):
            self.muon.step()
        with _phase("adamw"):
            self.adam.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list) -> None:
        for opt, s in zip(self.all, states):
            opt.load_state_dict(s)


# ----------------------------------------------------------------------------------------------
# The step and the validation pass


@dataclass
class TrainStep:
    """One optimizer step of `base_model`; call it with (step, multiplier) -> (mean loss, grad norm).

    model: what the forward runs (base_model itself, compiled, or DDP around it); base_model: the
    parameters that are clipped. optimizers: anything with set_schedule(step, multiplier), step() and
    zero_grad() (Optimizers in training). next_batch() -> (inputs, targets) of one micro-batch.
    grad_clip_norm <= 0: no clip (the norm is still computed for the finite check). world_size > 1: model
    is DDP, gradients are all-reduced on the last micro-batch only and the loss is averaged over ranks.
    autocast False: no bf16 autocast on CUDA either (the wiring tests compare fp32 paths).
    micro_batch_grads: "mean" (each micro-batch's loss / accum) or "sum" (plain backward per micro-batch, as the
    original: accum times the mean gradient before the clip), Config.micro_batch_grads.
    """
    model: Callable
    base_model: torch.nn.Module
    optimizers: object
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    accum: int = 1
    grad_clip_norm: float = 0.0
    world_size: int = 1
    autocast: bool = True
    micro_batch_grads: str = "mean"

    def __post_init__(self):
        if self.accum < 1:
            raise ValueError(f"TrainStep: accum={self.accum} micro-batches, need >= 1")
        if self.micro_batch_grads not in ("mean", "sum"):
            raise ValueError(f"TrainStep: micro_batch_grads={self.micro_batch_grads!r}, need 'mean' or 'sum'")
        self.device = next(self.base_model.parameters()).device

    def __call__(self, step: int, multiplier: float) -> tuple[float, float]:
        """Raises TrainingDiverged, with the gradients dropped, before a non-finite step touches the weights."""
        autocast = autocast_for(self.device) if self.autocast else contextlib.nullcontext()
        with _phase("step"):
            train_loss = torch.zeros((), device=self.device)
            for micro in range(self.accum):
                x, y = self.next_batch()
                if self.world_size > 1:  # all-reduce gradients only on the last micro batch
                    self.model.require_backward_grad_sync = micro == self.accum - 1
                with _phase("forward"), autocast:
                    loss = self.model(x, y)
                with _phase("backward"):
                    (loss if self.micro_batch_grads == "sum" else loss / self.accum).backward()
                train_loss += loss.detach().float()
            train_loss /= self.accum
            if self.world_size > 1:  # so every rank sees the same number and takes the same decision
                dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
                train_loss /= self.world_size
            with _phase("clip"):
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.base_model.parameters(), self.grad_clip_norm if self.grad_clip_norm > 0 else float("inf"))
                loss_value, norm_value = torch.stack([train_loss, grad_norm.float()]).tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                self.optimizers.zero_grad()
                raise TrainingDiverged(f"step {step + 1}: train_loss={loss_value} grad_norm={norm_value}")
            self.optimizers.set_schedule(step, multiplier)
            self.optimizers.step()
            with _phase("zero_grad"):
                self.optimizers.zero_grad()
        return loss_value, norm_value
