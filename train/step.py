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
import time
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


def training_frac(step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float | None) -> float:
    """How far training is before step `step` (0-based): elapsed_ms / max_wallclock_ms with a wall clock,
    step / iterations without one (MAX_WALLCLOCK_SECONDS <= 0, R1's fixed-step mode). R1's schedule and its
    recurrence switch read this fraction (TRAIN.md 3)."""
    if max_wallclock_ms is None:
        return step / iterations
    return elapsed_ms / max_wallclock_ms


def lr_multiplier(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int = 0,
                  max_wallclock_ms: float | None, warmdown_frac: float = 0.0, min_lr: float = 0.0) -> float:
    """The LR multiplier before step `step` (0-based), after `elapsed_ms` of timed training, floored at min_lr.

    warmdown_frac > 0 (R1, WARMDOWN_FRAC): 1 while training_frac < 1 - warmdown_frac, then
    (1 - frac) / warmdown_frac. Otherwise the Ouroboros entry's WARMDOWN_ITERS form. Wall clock
    (max_wallclock_ms set): 1 until the time left is at most warmdown_iters average steps, then
    time_left / (warmdown_iters * avg_step_ms), reaching 0 at the cap. Step schedule (max_wallclock_ms
    None): 1, then linear to 0 over the last warmdown_iters of `iterations`.
    """
    if warmdown_frac > 0:
        frac = training_frac(step, elapsed_ms, iterations=iterations, max_wallclock_ms=max_wallclock_ms)
        if frac < 1.0 - warmdown_frac:
            return 1.0
        return max((1.0 - frac) / warmdown_frac, min_lr)
    return max(_warmdown_iters_multiplier(step, elapsed_ms, iterations, warmdown_iters, max_wallclock_ms), min_lr)


def _warmdown_iters_multiplier(step, elapsed_ms, iterations, warmdown_iters, max_wallclock_ms) -> float:
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


class EMA:
    """Exponential moving average of every floating-point state-dict entry, kept in fp32 (R1's EMA, TRAIN.md 3):
    E <- decay*E + (1-decay)*W after every optimizer step, no bias correction, started from the weights given.
    `load_into` replaces the live weights, each cast to its own dtype (a bf16 embedding is rounded)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA: decay={decay} must lie in (0, 1)")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        shadow = list(self.shadow.values())
        live = [state[k].detach().float() for k in self.shadow]
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, live, alpha=1.0 - self.decay)

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))


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
        on_cuda = torch.device(device).type == "cuda"
        # R1's Polar-Express Muon keeps its momentum in bf16 on the GPU (TRAIN.md 2); fp32 on CPU
        self.muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum_warmup_start,
                         weight_decay=cfg.muon_weight_decay, backend_steps=cfg.muon_backend_steps,
                         rank=rank, world_size=world_size, row_normalize=cfg.muon_row_normalize, ns=cfg.muon_ns,
                         momentum_dtype=torch.bfloat16 if on_cuda and cfg.muon_ns == "polar" else None)
        embed_wd = cfg.embed_weight_decay if cfg.embed_weight_decay >= 0 else cfg.adam_weight_decay
        adam_groups = [dict(params=groups["embed"], lr=cfg.tied_embed_lr, base_lr=cfg.tied_embed_lr,
                            weight_decay=embed_wd),
                       dict(params=groups["scalar"], lr=cfg.scalar_lr, base_lr=cfg.scalar_lr,
                            weight_decay=cfg.adam_weight_decay)]
        adam_groups = [g for g in adam_groups if g["params"]]
        self.adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                      weight_decay=cfg.adam_weight_decay, fused=on_cuda)
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
    zero_grad() (Optimizers in training). next_batch() -> (inputs, targets) of one micro-batch, or
    (inputs, targets, cu_seqlens) from the packed loader: the model is then called with cu_seqlens=.
    grad_clip_norm <= 0: no clip (the norm is still computed for the finite check). world_size > 1: model
    is DDP, gradients are all-reduced on the last micro-batch only and the loss is averaged over ranks.
    grad_clip_mode "global" clips the rank-averaged gradient; "local" (R1) clips each rank's own gradient
    before the average (no DDP reduction then: one flat fp32 all-reduce after the clip; R1 averages in bf16)
    and reports the mean of the ranks' norms. With one rank both are the same.
    autocast False: no bf16 autocast on CUDA either (the wiring tests compare fp32 paths).
    micro_batch_grads: "mean" (each micro-batch's loss / accum) or "sum" (plain backward per micro-batch, as the
    original: accum times the mean gradient before the clip), Config.micro_batch_grads.
    forward_seconds_per_token: the recent forwards' measured time per token (CUDA events on a GPU), which
    the trainer's calibration budget scales to the calibration's tokens; None before the first step.
    """
    model: Callable
    base_model: torch.nn.Module
    optimizers: object
    next_batch: Callable[[], tuple]
    accum: int = 1
    grad_clip_norm: float = 0.0
    world_size: int = 1
    autocast: bool = True
    micro_batch_grads: str = "mean"
    grad_clip_mode: str = "global"

    FORWARD_WINDOW = 20  # steps whose forward times are averaged

    def __post_init__(self):
        if self.accum < 1:
            raise ValueError(f"TrainStep: accum={self.accum} micro-batches, need >= 1")
        if self.micro_batch_grads not in ("mean", "sum"):
            raise ValueError(f"TrainStep: micro_batch_grads={self.micro_batch_grads!r}, need 'mean' or 'sum'")
        if self.grad_clip_mode not in ("global", "local"):
            raise ValueError(f"TrainStep: grad_clip_mode={self.grad_clip_mode!r}, need 'global' or 'local'")
        self.device = next(self.base_model.parameters()).device
        self._forward_times: list[tuple[float, int]] = []  # (seconds, tokens) per step, the last FORWARD_WINDOW

    @property
    def forward_seconds_per_token(self) -> float | None:
        if not self._forward_times:
            return None
        return sum(t for t, _ in self._forward_times) / sum(n for _, n in self._forward_times)

    def __call__(self, step: int, multiplier: float) -> tuple[float, float]:
        """Raises TrainingDiverged, with the gradients dropped, before a non-finite step touches the weights."""
        autocast = autocast_for(self.device) if self.autocast else contextlib.nullcontext()
        local_clip = self.grad_clip_mode == "local" and self.world_size > 1
        on_cuda = self.device.type == "cuda"
        timers, tokens = [], 0
        with _phase("step"):
            train_loss = torch.zeros((), device=self.device)
            for micro in range(self.accum):
                x, y, *segments = self.next_batch()
                kwargs = {"cu_seqlens": segments[0]} if segments else {}
                if self.world_size > 1:  # all-reduce gradients only on the last micro batch (never: local clip)
                    self.model.require_backward_grad_sync = micro == self.accum - 1 and not local_clip
                timer = _ForwardTimer(on_cuda)
                with _phase("forward"), autocast, timer:
                    loss = self.model(x, y, **kwargs)
                timers.append(timer)
                tokens += y.numel()
                with _phase("backward"):
                    (loss if self.micro_batch_grads == "sum" else loss / self.accum).backward()
                train_loss += loss.detach().float()
            train_loss /= self.accum
            if local_clip:
                with _phase("clip"):
                    grad_norm = self._clip()
                    stats = torch.stack([train_loss, grad_norm.float()])
                    dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # a non-finite norm on any rank shows in the sum
                    average_gradients(self.base_model, self.world_size)
                    loss_value, norm_value = (stats / self.world_size).tolist()
            else:
                if self.world_size > 1:  # so every rank sees the same number and takes the same decision
                    dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
                    train_loss /= self.world_size
                with _phase("clip"):
                    grad_norm = self._clip()
                    loss_value, norm_value = torch.stack([train_loss, grad_norm.float()]).tolist()
            # the host has waited for the step's work above: every timer's events are complete
            self._forward_times = (self._forward_times + [(sum(t.seconds() for t in timers), tokens)])[
                -self.FORWARD_WINDOW:]
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                self.optimizers.zero_grad()
                raise TrainingDiverged(f"step {step + 1}: train_loss={loss_value} grad_norm={norm_value}")
            self.optimizers.set_schedule(step, multiplier)
            self.optimizers.step()
            with _phase("zero_grad"):
                self.optimizers.zero_grad()
        return loss_value, norm_value

    def _clip(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(
            self.base_model.parameters(), self.grad_clip_norm if self.grad_clip_norm > 0 else float("inf"))


class _ForwardTimer:
    """Wall time of a block: CUDA events on a GPU (read once the host has synchronized), the host clock on CPU."""

    def __init__(self, on_cuda: bool):
        self.on_cuda = on_cuda

    def __enter__(self):
        if self.on_cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.on_cuda:
            self.end.record()
        else:
            self.elapsed = time.perf_counter() - self.t0

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1000.0 if self.on_cuda else self.elapsed


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Replace every gradient by its mean over the ranks: one all-reduce of a flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(averaged)
