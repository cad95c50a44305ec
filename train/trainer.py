"""The training loop (SPEC 4): DDP, Muon + AdamW, grad clip, warmdown, SWA, validation, the run folder.

`train(cfg)` runs one training run as configured and returns its summary; the step itself (forward,
backward, clip, optimizers) and the validation pass are train/step.py's. It works in one process and
under torchrun (NCCL on CUDA, gloo on CPU). Timing excludes compile warmup and validation, as in the
challenge. Every file that matters in the run folder (runs/<id>/) is written atomically.

Post-training work that belongs to quant/ (calibration, GPTQ, the artifact) runs through the
`export_fn` hook right after training; GPTQ_RESERVE_SECONDS of the wall-clock budget is kept for it.
"""
from __future__ import annotations

import datetime
import fcntl
import functools
import json
import os
import re
import resource
import secrets
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import triton
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from kernels import selftest
from kernels._runtime import tf32_matmuls
from model import ConfigError, build_model, count_parameters, save_checkpoint
from model.config import Config
from model.io import from_rank0, synchronize, temp_files, write_atomic
from model.schedule import block_schedule
from train.data import (DistributedTokenLoader, PackedLoader, ShardError, check_token_ids, load_val_bytes,
                        load_val_tokens, shard_paths)
from train.evaluate import SCORE_NAMES, autocast_for, build_byte_luts, validate
from train.step import EMA, Optimizers, TrainingDiverged, TrainStep, lr_multiplier, training_frac

SWA_START_MULTIPLIER = 0.2  # snapshots are taken once the LR multiplier falls below this


# ----------------------------------------------------------------------------------------------
# Pieces with no state: the GPTQ reserve, distributed setup, lost ranks, saving the weights


def default_gptq_reserve_seconds(cfg: Config, on_cuda: bool) -> float:
    """A fixed reserve for calibration + quantization: GPTQ_RESERVE_SECONDS when set, else (auto without a
    probe, e.g. a caller with its own export step) a constant for the machine.

    On an H100 the original's loop-aware calibration and GPTQ of the full model took 11.6 s: 15 s leaves
    margin; round-to-nearest (QUANT_METHOD=rtn) needs no calibration, a few seconds of quantization. On CPU
    (only with a wall clock set, the tiny preset runs by step) a tenth of the budget.
    """
    if cfg.gptq_reserve_seconds >= 0:
        return cfg.gptq_reserve_seconds
    if not on_cuda:
        return 0.1 * max(cfg.max_wallclock_seconds, 0.0)
    return 5.0 if cfg.quant_method == "rtn" else 15.0


class CalibrationBudget:
    """GPTQ_RESERVE_SECONDS=auto: the time training leaves for calibration + quantization, from this machine.

    The export step's probe (quant.export.calibration_probe, run before the timer) gives the calibration's
    forward tokens (samples x length x passes) and the quantization time it measured on the model's own layer
    shapes. Each step re-estimates: SAFETY x (forward tokens x the training forwards' measured time per token,
    scaled to the looped plan while recurrence is still off, + quantization) + MARGIN_S. A calibration forward
    (no grad, Hessian hooks) costs about what a training forward does; SAFETY covers the hooks and noise (a
    GPU's timings are steady; a shared CPU's vary with its load, so the trainer doubles it there).
    """
    SAFETY = 1.5
    MARGIN_S = 1.0

    def __init__(self, forward_tokens: int, quantize_seconds: float, looped_over_unlooped: float,
                 safety: float = SAFETY):
        self.forward_tokens, self.quantize_seconds, self.safety = forward_tokens, quantize_seconds, safety
        self.looped_over_unlooped = looped_over_unlooped
        self.forward_seconds = 0.0

    def seconds(self, forward_seconds_per_token: float | None, recurrence_active: bool) -> float:
        if forward_seconds_per_token is not None:  # calibration runs the looped plan (the final model's)
            scale = 1.0 if recurrence_active else self.looped_over_unlooped
            self.forward_seconds = self.forward_tokens * forward_seconds_per_token * scale
        return self.safety * (self.forward_seconds + self.quantize_seconds) + self.MARGIN_S

    def describe(self, seconds: float) -> str:
        return (f"{seconds:.1f}s = {self.safety:g} x (calibration forwards {self.forward_seconds:.1f}s for "
                f"{self.forward_tokens:,} tokens at the training forward's measured speed + quantization "
                f"{self.quantize_seconds:.1f}s probed) + {self.MARGIN_S:g}s")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    monitor: object = None          # the gloo group that check_ranks' monitored_barrier runs on
    timeout_seconds: float = 120.0  # DIST_TIMEOUT_SECONDS

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankLost(RuntimeError):
    """A rank stopped answering: a collective or a barrier waited DIST_TIMEOUT_SECONDS for it."""


class CalibrationOverran(RuntimeError):
    """Training plus calibration ended past MAX_WALLCLOCK_SECONDS: the artifact and summary are written, the
    run is marked non-compliant."""


class CheckpointSaveError(RuntimeError):
    """The checkpoint is not in the run folder: at CHECKPOINT_FALLBACK_DIR instead, or (the message says) lost."""


def setup_distributed(timeout_seconds: float = 120.0) -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK (absent: one process) and start the process group, whose
    collectives give up after `timeout_seconds` (DIST_TIMEOUT_SECONDS) instead of torch's 30 minutes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    monitor = None
    if world_size > 1:
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if not dist.is_initialized():
            # torch._dynamo imported after the group exists keeps references to it: destroy_process_group
            # would then leave gloo's worker threads running into interpreter exit, where one can abort
            from torch import _dynamo  # noqa: F401
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None, timeout=timeout)
        # gloo's monitored_barrier names the ranks that did not arrive; NCCL has none, and a group of its own
        # stays usable after a collective of the main group timed out.
        monitor = dist.new_group(backend="gloo", timeout=timeout)
    env = DistEnv(rank, world_size, local_rank, device, monitor, timeout_seconds)
    check_ranks(env, "at start-up")
    return env


def check_ranks(env: DistEnv, where: str, timeout_seconds: float | None = None) -> None:
    """Wait until every rank gets here; after `timeout_seconds` (default DIST_TIMEOUT_SECONDS) raise RankLost
    naming the ranks that did not (rank 0 can tell; another rank hears only that rank 0 did not confirm)."""
    if not env.distributed:
        return
    timeout = env.timeout_seconds if timeout_seconds is None else timeout_seconds
    try:
        dist.monitored_barrier(env.monitor, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as err:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
        lost = (f"rank{'s' if ',' in found.group(1) else ''} {found.group(1).strip()} stopped answering" if found
                else "rank 0 did not confirm that every rank answered: rank 0 or a rank it names stopped answering")
        raise RankLost(f"rank {env.rank}, {where}: {lost} (no reply within {timeout:g}s; "
                       f"DIST_TIMEOUT_SECONDS={env.timeout_seconds:g})") from err


def _collective_failed(err: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo and NCCL raise plain RuntimeErrors naming themselves)."""
    if isinstance(err, RankLost):
        return False
    return isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "NCCL", "imed out"))


def shared_clock(env: DistEnv, elapsed_ms: float, cap_ms: float | None) -> tuple[float, float | None]:
    """(elapsed_ms, cap_ms) as rank 0 measured them, on every rank (R1 let each rank read its own clock, so ranks
    could differ in LR or in the step recurrence switched on). Without a wall clock the schedule is by step and
    nothing is exchanged."""
    if cap_ms is None or not env.distributed:
        return elapsed_ms, cap_ms
    clock = torch.tensor([elapsed_ms, cap_ms], dtype=torch.float64, device=env.device)
    dist.broadcast(clock, src=0)
    elapsed, cap = clock.tolist()
    return elapsed, cap


def warm_segment_buckets(model, loader, max_doc_len: int, device: torch.device) -> None:
    """Forward and backward once for each cu_seqlens length a packed row can take (64, 128, 192, 256 entries:
    up to 255 segments), so a compiled model has every graph before the timer; gradients are left to the caller."""
    x, y, _ = loader.next_batch()
    T = x.numel()
    cuts = torch.arange(0, T, max_doc_len, dtype=torch.int32, device=device)
    for entries in (64, 128, 192, 256):
        if cuts.numel() + 1 > entries:
            continue
        cu = torch.cat((cuts, cuts.new_full((entries - cuts.numel(),), T)))
        with autocast_for(device):
            loss = model(x, y, cu_seqlens=cu)
        loss.backward()


def grad_accum_steps_for(cfg: Config, world_size: int) -> int:
    accum = cfg.grad_accum_steps or 8 // world_size
    if accum < 1:
        raise ConfigError(f"GRAD_ACCUM_STEPS=0 means 8 // WORLD_SIZE, which is 0 for WORLD_SIZE={world_size}: "
                         "set GRAD_ACCUM_STEPS explicitly")
    micro = world_size * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % micro:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must be a multiple of WORLD_SIZE x "
                         f"GRAD_ACCUM_STEPS x TRAIN_SEQ_LEN = {world_size} x {accum} x {cfg.train_seq_len} = {micro}")
    return accum


def save_weights(model: torch.nn.Module, path: Path, cfg: Config, log) -> Path:
    """save_checkpoint at `path`; when that fails (a full disk), at CHECKPOINT_FALLBACK_DIR/ouroboros-<run id>/
    from the weights still in memory. Returns where they went; raises CheckpointSaveError when both fail."""
    try:
        save_checkpoint(model, path)
        log(f"saved: {path}")
        return path
    except OSError as err:
        first = err
    fallback = Path(cfg.checkpoint_fallback_dir) / f"ouroboros-{path.parent.name}" / path.name
    log(f"ERROR: {first}; saving the weights to CHECKPOINT_FALLBACK_DIR instead: {fallback}")
    try:
        save_checkpoint(model, fallback)
    except OSError as err:
        raise CheckpointSaveError(f"the trained weights are lost: {first}; and at CHECKPOINT_FALLBACK_DIR: {err}") \
            from err
    log(f"saved: {fallback} (CHECKPOINT_FALLBACK_DIR; {path} was not written)")
    return fallback


def save_weights_on_rank0(env: DistEnv, model: torch.nn.Module, path: Path, cfg: Config, log) -> Path:
    """Rank 0 saves (save_weights); every rank learns where the weights went, or stops with rank 0's error."""
    outcome = ("", "")
    if env.is_main:
        try:
            outcome = (str(save_weights(model, path, cfg, log)), "")
        except CheckpointSaveError as err:
            log(f"ERROR: {err}")
            outcome = ("", str(err))
    outcome = from_rank0(outcome)
    if outcome[1]:
        raise CheckpointSaveError(outcome[1])
    return Path(outcome[0])


def selftest_kernels(env: DistEnv, ops=selftest.TRAINING_OPS) -> dict[str, str]:
    """The start-up self-test of the Triton ops the run uses (kernels/selftest.py), returning where each op
    runs. Under DDP an op that failed on any rank moves to its PyTorch path on every rank: all run the same maths."""
    paths = selftest.run(env.device, ops)
    if env.distributed:
        every = [None] * env.world_size
        dist.all_gather_object(every, paths)
        for rank, theirs in enumerate(every):
            for op, path in theirs.items():
                if path.startswith("torch (") and kernels.uses_triton(op):
                    kernels.use_reference(op, f"rank {rank}: {path[len('torch ('):-1]}")
        paths = selftest.record(paths)
    return paths


# ----------------------------------------------------------------------------------------------
# SWA


class SnapshotAverage:
    """Uniform average of weight snapshots (SWA), accumulated in fp32 on the weights' device."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        if self.sums is None:
            self.sums = {k: v.detach().float().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self.sums[k].add_(v.detach().float())
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise RuntimeError("SnapshotAverage.average(): no snapshots were added")
        return {k: v / self.count for k, v in self.sums.items()}

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        avg = self.average()
        state = model.state_dict()
        model.load_state_dict({k: avg[k].to(state[k].dtype) for k in state})


# ----------------------------------------------------------------------------------------------
# Logging and the run folder


class RunLog:
    """Rank 0 prints each line and appends it to runs/<id>/train.log; other ranks stay quiet.

    While it is open it holds an exclusive lock on train.log, so a second run started in the same folder
    (the same RUN_ID) is refused instead of writing into this one; the lock goes with the process.
    """

    def __init__(self, path: Path | None, echo: bool = True):
        self.path = path
        self.echo = echo
        self._file = open(path, "a", buffering=1) if path is not None else None
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise FileExistsError(f"run folder {path.parent} is in use by another run (it holds the lock on "
                                      f"{path.name}): choose another RUN_ID") from None

    def __call__(self, line: str = "") -> None:
        if self.echo:
            print(line, flush=True)
        if self._file is not None:
            try:
                self._file.write(line + "\n")
            except OSError as err:  # a full disk: the run goes on, and the screen still gets every line
                self._file = None
                print(f"WARNING: {self.path}: {err}; the rest of this log is on screen only", flush=True)

    def appends(self) -> bool:
        """Whether train.log already held lines when this log opened it (a rerun in the same folder)."""
        return self._file is not None and self._file.tell() > 0

    def failed(self, err: BaseException) -> None:
        """Write why the run stopped, with the traceback, to train.log only (the caller tells the console)."""
        if self._file is None:
            return
        try:
            self._file.write(f"error: {type(err).__name__}: {err}\n" + "".join(traceback.format_exception(err)))
        except OSError:  # a full disk: the error itself still reaches the console
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_run_id(run_id: str) -> None:
    """RUN_ID names one folder directly inside RUNS_DIR: no path separators, not '.' or '..'."""
    if run_id in (".", "..") or any(sep in run_id for sep in ("/", "\\", "\0")):
        raise ConfigError(f"RUN_ID={run_id!r}: must name one folder inside RUNS_DIR (no '/', '\\', '..' or "
                          "absolute path)")


def new_run_dir(runs_dir: Path) -> Path:
    """A new folder runs/<UTC time to the second>-<4 random hex digits>/, made exclusively: runs started in
    the same second get folders of their own."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        run_dir = runs_dir / f"{stamp}-{secrets.token_hex(2)}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name for {runs_dir / stamp}-* after 100 tries")


def claim_run_dir(runs_dir: Path, run_id: str, echo: bool = True) -> RunLog:
    """Rank 0: make or reuse runs/<id>/ and open its locked train.log, returned.

    No RUN_ID: a new folder (new_run_dir). A RUN_ID may name a folder that a failed or killed run left
    (no summary.json or final_model.pt): the rerun appends to train.log under a marker line, after the temp
    files of killed writes are removed. A folder that holds a run, or one a live run holds, is refused.
    """
    try:
        if run_id:
            run_dir = runs_dir / run_id
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = new_run_dir(runs_dir)
    except OSError as err:  # a file in the way, no rights, a full disk
        raise ConfigError(f"RUNS_DIR={runs_dir}: cannot make a run folder there ({err})") from None
    log = RunLog(run_dir / "train.log", echo=echo)
    try:
        if (run_dir / "summary.json").exists() or (run_dir / "final_model.pt").exists():
            raise FileExistsError(held_run_message(run_dir))
        if log.appends():
            log(f"==== rerun {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC in {run_dir}: "
                "the lines above are an earlier attempt's ====")
        stale = temp_files(run_dir)
        for path in stale:  # this run holds the lock: no live write owns them
            path.unlink(missing_ok=True)
        if stale:
            log(f"removed {len(stale)} temp files left by killed writes: "
                + ", ".join(str(p.relative_to(run_dir)) for p in stale))
    except BaseException:
        log.close()
        raise
    return log


def finish_command(checkpoint: Path) -> str:
    """The one command that finishes a run stopped after its checkpoint: the export step on the saved weights."""
    return f"python -m quant --checkpoint {checkpoint}"


def held_run_message(run_dir: Path) -> str:
    """Why a RUN_ID is refused: the run its folder holds, and for one that stopped before its artifact was
    written and scored, the command that finishes it."""
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        status = "trained"  # no summary: killed right after the checkpoint
    if status == "trained":
        return (f"run folder {run_dir} holds a run that did not finish its export step; finish it with "
                f"`{finish_command(run_dir / 'final_model.pt')}`, or choose another RUN_ID")
    return f"run folder {run_dir} already holds a run (status {status!r}): choose another RUN_ID or remove it"


def resolve_run_dir(cfg: Config, env: DistEnv, echo: bool = True) -> tuple[Path, RunLog]:
    """runs/<id>/ and the run's log, on every rank: rank 0 claims the folder (claim_run_dir) and tells the
    others its name, or the error that stopped it, so that all ranks stop together."""
    check_run_id(cfg.run_id)
    claimed, log = None, RunLog(None, echo=False)
    if env.is_main:
        try:
            log = claim_run_dir(Path(cfg.runs_dir), cfg.run_id, echo)
            claimed = str(log.path.parent)
        except OSError as err:
            claimed = err
    claimed = from_rank0(claimed)
    if isinstance(claimed, BaseException):
        raise claimed
    return Path(claimed), log


def record_export(summary: dict, result: dict) -> dict:
    """The export step's result in a run's summary, as the trainer and `python -m quant --checkpoint` record it:
    the artifact's round-trip score (with TTT_ENABLED its TTT score, and the eval clock) becomes the summary's
    val_loss/val_bpb (float_val_loss/bpb keep the float's)."""
    summary["export"] = result
    if "roundtrip_val_bpb" in result:
        summary.update(val_loss=result["roundtrip_val_loss"], val_bpb=result["roundtrip_val_bpb"])
        if "ttt_val_bpb" in result:  # TTT_ENABLED: the test-time-trained score is the run's, as R1 reports it
            summary.update(val_loss=result["ttt_val_loss"], val_bpb=result["ttt_val_bpb"],
                           eval_clock=result["eval_clock"])
        if summary.get("status") == "trained":  # its artifact is written and scored: nothing is left to do
            summary["status"] = "finished"
            summary.pop("finish_command", None)
    return summary


def versions_line(device: torch.device) -> str:
    """What the run ran on, in the form reviewers read and `python -m quant.records export` copies."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"versions: torch:{torch.__version__} triton:{triton.__version__} cuda:{torch.version.cuda or 'none'} "
            f"gpu:{gpu}")


def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak memory (process max RSS): {rss_kib // 1024} MiB"


# ----------------------------------------------------------------------------------------------
# The loop


def load_tokenizer(cfg: Config):
    """The run's sentencepiece model; FileNotFoundError or ConfigError naming TOKENIZER_PATH otherwise."""
    import sentencepiece as spm

    path = Path(cfg.tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH={cfg.tokenizer_path}: no such file (run `python -m train.prepare` "
                                "for the embedded corpus, or point TOKENIZER_PATH at the FineWeb tokenizer)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path}: not a sentencepiece model ({err})") from None
    if sp.vocab_size() != cfg.vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path}: vocab size {sp.vocab_size()} "
                         f"!= VOCAB_SIZE={cfg.vocab_size}")
    return sp


# Training holds fp32 weights, their gradients and optimizer state (Muon: one buffer; Adam: two) at the least:
# a floor under what a model needs, activations not counted.
TRAINING_BYTES_PER_PARAMETER = 12


def parameter_count(cfg: Config) -> int:
    """The model's parameters, from its shapes alone (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on `device` (the GPU's free memory; the CPU's MemAvailable); None when
    it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024  # kB
    except (OSError, ValueError, KeyError):
        return None


def check_model_fits(cfg: Config, device: torch.device) -> int:
    """ConfigError, before any folder or tensor exists, when the model's weights, gradients and optimizer
    state alone would not fit in `device`'s free memory; returns the parameter count."""
    params = parameter_count(cfg)
    need, free = TRAINING_BYTES_PER_PARAMETER * params, available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"MODEL_DIM={cfg.model_dim}: the model's {params:,} parameters need {need / 2**30:,.1f} "
                          f"GiB for weights, gradients and optimizer state; {free / 2**30:,.1f} GiB is free on "
                          f"{device.type}")
    return params


def train(cfg: Config, export_fn: Callable | None = None, echo: bool = True,
          calibration_probe: Callable | None = None) -> dict:
    """Run one training run; returns the summary that is also written to runs/<id>/summary.json.

    export_fn(model, cfg, run_dir, **context) -> dict, if given, runs right after training on the final
    float weights (rank 0 and the others alike); a "calibration_seconds" key in its result is checked
    against the GPTQ_RESERVE_SECONDS reservation, and its "roundtrip_val_loss/bpb" (the artifact's score)
    become the summary's val_loss/val_bpb (the float model's stay as float_val_loss/bpb).
    calibration_probe(model, cfg) -> {"forward_tokens", "quantize_seconds"} (quant.export.calibration_probe) lets
    GPTQ_RESERVE_SECONDS=auto estimate the export step's calibration time from this machine (CalibrationBudget).
    """
    env = setup_distributed(cfg.dist_timeout_seconds)
    try:
        # TF32 for the fp32 paths that remain on CUDA (the matrices run bf16 under autocast), for this run
        # only: a process that goes on after it (a test worker, a notebook) gets its own flags back.
        with tf32_matmuls(env.device.type == "cuda"):
            return _train(cfg, env, export_fn, echo, calibration_probe)
    except RuntimeError as err:
        if env.distributed and _collective_failed(err):
            # The survivors time out at about the same moment: a short barrier finds the rank that is missing.
            what = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).splitlines() or [""])[0])  # less gloo's source line
            check_ranks(env, f"after a collective failed ({what[:160]})", min(env.timeout_seconds, 10.0))
        raise
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, env: DistEnv, export_fn, echo: bool, calibration_probe=None) -> dict:
    accum = grad_accum_steps_for(cfg, env.world_size)
    check_model_fits(cfg, env.device)
    run_dir, log = resolve_run_dir(cfg, env, echo=echo and env.is_main)
    progress = {"training": False}
    try:  # from here on a failure is written to the run's train.log too
        return _train_in(run_dir, log, cfg, env, export_fn, accum, progress, calibration_probe)
    except BaseException as err:
        log.failed(err)
        if env.is_main and not cfg.run_id and not progress["training"]:
            # A start that failed left nothing but its log in a folder named for it: remove the folder (the
            # error is on the console). With RUN_ID the folder stays, with the error in its train.log.
            log.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        log.close()


def _train_in(run_dir: Path, log: RunLog, cfg: Config, env: DistEnv, export_fn, accum: int, progress: dict,
              calibration_probe=None) -> dict:
    device = env.device
    on_cuda = device.type == "cuda"

    torch.manual_seed(cfg.seed)
    if on_cuda:
        torch.cuda.manual_seed_all(cfg.seed)

    # --- data ---
    sp = load_tokenizer(cfg)
    train_paths = shard_paths(cfg.data_path, "train")
    val_paths = shard_paths(cfg.data_path, "val")
    t0 = time.perf_counter()
    check_token_ids(train_paths + val_paths, cfg.vocab_size, env.rank, env.world_size)
    log(f"data: every token id < VOCAB_SIZE={cfg.vocab_size} in {len(train_paths) + len(val_paths)} shards (checked "
        f"in {time.perf_counter() - t0:.1f}s" + (f", split over {env.world_size} ranks)" if env.distributed else ")"))
    val_tokens = load_val_tokens(val_paths, cfg.eval_seq_len)
    luts = build_byte_luts(sp, cfg.vocab_size)
    val_bytes = load_val_bytes(val_paths, val_tokens.numel())  # a CaseOps sidecar's counts, else the tables'
    if cfg.caseops_enabled and val_bytes is None:
        raise ShardError(f"CASEOPS_ENABLED=1 but the val shards in {cfg.data_path} have no byte sidecars "
                         "(*_val_bytes_*.bin): CaseOps text must be scored against its original bytes")
    log(f"val bytes: {'the byte sidecars' if val_bytes is not None else 'the tokenizer lookup tables'}; "
        f"eval mode: {cfg.eval_mode}")
    if cfg.train_loader == "packed":  # one row of whole documents per micro-batch, attention cut at each BOS
        loader = PackedLoader(train_paths, env.rank, env.world_size, cfg.train_batch_tokens // (env.world_size * accum),
                              max_doc_len=cfg.train_seq_len, device=device)
        next_batch = loader.next_batch
    else:
        loader = DistributedTokenLoader(train_paths, env.rank, env.world_size, device)
        next_batch = functools.partial(loader.next_batch, cfg.train_batch_tokens, cfg.train_seq_len, accum)

    # --- model ---
    try:
        base_model = build_model(cfg).to(device)
    except RuntimeError as err:  # check_model_fits passed, but the memory was not there after all
        if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)):
            raise
        raise ConfigError(f"the model ({parameter_count(cfg):,} parameters) could not be allocated on {device}: "
                          f"{str(err).splitlines()[0]}") from None
    n_params = count_parameters(base_model)
    compiled = torch.compile(base_model, dynamic=False, fullgraph=cfg.compile_fullgraph) if on_cuda else base_model
    model = DDP(compiled, device_ids=[env.local_rank] if on_cuda else None,
                broadcast_buffers=False) if env.distributed else compiled
    optimizers = Optimizers(base_model, cfg, device, rank=env.rank, world_size=env.world_size)
    run_step = TrainStep(model, base_model, optimizers, next_batch, accum=accum, grad_clip_norm=cfg.grad_clip_norm,
                         world_size=env.world_size, micro_batch_grads=cfg.micro_batch_grads,
                         grad_clip_mode=cfg.grad_clip_mode)
    # ENABLE_LOOPING_AT > 0: the model trains its plan without recurrence until that fraction of training
    looping_at = cfg.enable_looping_at if cfg.enable_looping_at > 0 else None
    base_model.recurrence_active = looping_at is None

    wall_clock = cfg.max_wallclock_seconds > 0
    budget = None  # GPTQ_RESERVE_SECONDS=auto with the export step's probe: re-estimated every step
    if wall_clock and export_fn is not None and calibration_probe is not None and cfg.gptq_reserve_seconds < 0:
        t0 = time.perf_counter()
        probe = calibration_probe(base_model, cfg)
        plans = [len(block_schedule(cfg, recurrence_active=on)) for on in (True, False)]
        budget = CalibrationBudget(probe["forward_tokens"], probe["quantize_seconds"], plans[0] / plans[1],
                                   CalibrationBudget.SAFETY * (1 if on_cuda else 2))
        log(f"gptq_reserve: auto; quantization probed in {time.perf_counter() - t0:.1f}s")
    reserve_s = default_gptq_reserve_seconds(cfg, on_cuda) if wall_clock and export_fn is not None else 0.0
    if budget is not None:
        reserve_s = budget.seconds(None, base_model.recurrence_active)
    if wall_clock and cfg.max_wallclock_seconds - reserve_s <= 0:
        raise ConfigError(f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds} leaves no training time after "
                         f"GPTQ_RESERVE_SECONDS={reserve_s:g}")

    if env.is_main:
        write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    log(f"run: {run_dir}  preset:{cfg.preset}  device:{device}  world_size:{env.world_size}  grad_accum_steps:{accum}")
    log(versions_line(device))
    log(f"model_params:{n_params}  train_shards:{len(train_paths)}  val_tokens:{val_tokens.numel() - 1}  "
        f"tokens_per_step:{cfg.train_batch_tokens}  seq_len:{cfg.train_seq_len}")
    warmdown = (f"warmdown over the last {cfg.warmdown_frac:g} of the time, floor {cfg.min_lr:g}" if cfg.warmdown_frac > 0
                else f"warmdown {cfg.warmdown_iters} avg steps" if wall_clock else
                f"warmdown over the last {cfg.warmdown_iters}")
    reserve_text = "auto" if budget is not None else f"{reserve_s:g}s"
    log("schedule: " + (f"wall clock {cfg.max_wallclock_seconds:g}s minus gptq reserve {reserve_text}, {warmdown}, "
                         f"iterations cap {cfg.iterations}" if wall_clock else
                         f"by step: {cfg.iterations} iterations, {warmdown}")
        + (f", recurrence from {looping_at:g} of training" if looping_at is not None else ""))
    log(f"lrs: matrix {cfg.matrix_lr} embed {cfg.tied_embed_lr} scalar {cfg.scalar_lr}  "
        f"grad_clip:{cfg.grad_clip_norm} ({cfg.grad_clip_mode})  swa_every:{cfg.swa_every}  ema:{cfg.ema_decay:g}  "
        f"muon:{cfg.muon_ns}{' row-normalized' if cfg.muon_row_normalize else ''}  loader:{cfg.train_loader}  "
        f"seed:{cfg.seed}")
    t0 = time.perf_counter()
    # Before the first step traces or runs any kernel; GPTQ too when the export step will calibrate.
    kernel_paths = selftest_kernels(env, selftest.TRAINING_OPS
                                    + (selftest.CALIBRATION_OPS if cfg.quant_method != "rtn" else ()))
    log(selftest.record_line(kernel_paths) + f"  (self-test {time.perf_counter() - t0:.1f}s)")

    # --- compile warmup: real steps on each plan the run will use (without, then with recurrence when it switches
    # on mid-run) and, for packed rows, every cu_seqlens length bucket; then weights, optimizer state (Muon's
    # momentum included, unlike R1) and data go back to where they were ---
    if cfg.warmup_steps > 0:
        initial_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        initial_opt = optimizers.state_dict()
        t0 = time.perf_counter()
        for active in ((False, True) if looping_at is not None else (base_model.recurrence_active,)):
            base_model.recurrence_active = active
            if cfg.train_loader == "packed":
                warm_segment_buckets(model, loader, cfg.train_seq_len, device)
                optimizers.zero_grad()
            for i in range(cfg.warmup_steps):
                run_step(0, 1.0)
        synchronize(device)
        base_model.recurrence_active = looping_at is None
        base_model.load_state_dict(initial_model)
        optimizers.load_state_dict(initial_opt)
        loader.reset()
        log(f"warmup: {cfg.warmup_steps} steps" + (" on each plan (recurrence off, on)" if looping_at is not None else "")
            + (" and the cu_seqlens buckets" if cfg.train_loader == "packed" else "")
            + f" in {time.perf_counter() - t0:.1f}s, then weights, optimizer state (Muon's momentum too) and data "
            "stream reset")
        del initial_model, initial_opt
    ema = EMA(base_model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def validate_now(stride):  # `compiled` is the model itself on CPU
        return validate(compiled, base_model, val_tokens, luts, seq_len=cfg.eval_seq_len, stride=stride,
                        mode=cfg.eval_mode, val_bytes=val_bytes,
                        batch_seqs=cfg.eval_batch_seqs, device=device)

    swa = SnapshotAverage()
    losses: list[float] = []
    val_history: list[dict] = []
    training_time_ms = 0.0
    stop_after_step = None
    step = 0
    looping_from = None  # (step, train_time_ms) at which recurrence switched on

    def time_cap_ms() -> float | None:  # the training part of the wall clock; auto: re-estimated from this run
        nonlocal reserve_s
        if not wall_clock:
            return None
        if budget is not None:
            reserve_s = budget.seconds(run_step.forward_seconds_per_token, base_model.recurrence_active)
        return 1000.0 * max(cfg.max_wallclock_seconds - reserve_s, 0.0)
    status = "finished"
    progress["training"] = True  # from here a failure leaves a run folder worth keeping
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    while True:
        last_step = step == cfg.iterations or (stop_after_step is not None and step >= stop_after_step)
        if (cfg.val_loss_every > 0 and step > 0 and step % cfg.val_loss_every == 0) or (last_step and step > 0):
            synchronize(device)
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            val_loss, val_bpb = validate_now(None)
            val_history.append(dict(step=step, val_loss=val_loss, val_bpb=val_bpb))
            log(f"step:{step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
            synchronize(device)
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < cfg.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{cfg.iterations}")
            break

        # one clock for every rank (rank 0's), so all take the same LR and switch recurrence on the same step
        elapsed_ms, max_wallclock_ms = shared_clock(env, training_time_ms + 1000.0 * (time.perf_counter() - t0),
                                                    time_cap_ms())
        frac = training_frac(step, elapsed_ms, iterations=cfg.iterations, max_wallclock_ms=max_wallclock_ms)
        if looping_at is not None and not base_model.recurrence_active and frac >= looping_at:
            base_model.recurrence_active = True
            looping_from = (step, elapsed_ms)
            log(f"recurrence: on from step {step} (fraction {frac:.3f} of training, train_time:{elapsed_ms:.0f}ms)")
        multiplier = lr_multiplier(step, elapsed_ms, iterations=cfg.iterations, warmdown_iters=cfg.warmdown_iters,
                                   max_wallclock_ms=max_wallclock_ms, warmdown_frac=cfg.warmdown_frac,
                                   min_lr=cfg.min_lr)
        try:
            loss_value, _ = run_step(step, multiplier)
        except TrainingDiverged as err:
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            status = "diverged"
            message = str(err)
            break
        if ema is not None:
            ema.update(base_model)
        losses.append(loss_value)
        step += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        if cfg.swa_every > 0 and multiplier < SWA_START_MULTIPLIER and step % cfg.swa_every == 0:
            swa.add(base_model)
        if step <= 10 or (cfg.train_log_every > 0 and step % cfg.train_log_every == 0):
            log(f"step:{step}/{cfg.iterations} train_loss:{loss_value:.4f} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / step:.2f}ms lr_mult:{multiplier:.3f}")
        if wall_clock and stop_after_step is None:
            reached = torch.tensor(int(approx_ms >= max_wallclock_ms), device=device)
            if env.distributed:  # ranks' clocks differ slightly: stop together
                dist.all_reduce(reached, op=dist.ReduceOp.MAX)
            if reached.item():
                stop_after_step = step

    log(f"train_stop: train_time_s:{training_time_ms / 1000:.3f} steps:{step}")
    if budget is not None:
        log(f"gptq_reserve: auto {budget.describe(reserve_s)}")
    log(peak_memory_line(device))
    summary = dict(run_id=run_dir.name, preset=cfg.preset, status=status, steps=step, iterations=cfg.iterations,
                   train_time_ms=round(training_time_ms, 1),
                   step_avg_ms=round(training_time_ms / max(step, 1), 3), params=n_params,
                   tokens_per_step=cfg.train_batch_tokens, world_size=env.world_size, grad_accum_steps=accum,
                   device=str(device), kernels=kernel_paths, train_losses=losses, val_history=val_history)

    if status == "diverged":
        # The failing step was never applied: the weights in memory are those after the last good step.
        path = save_weights_on_rank0(env, base_model, run_dir / "last_good_model.pt", cfg, log)
        if env.is_main:
            summary["error"] = message
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        text = (f"training stopped: non-finite loss at {message}; the last good weights (after step {step}) "
                f"are kept in {path}")
        log(text)
        log.close()
        raise TrainingDiverged(text)

    if ema is not None:  # after the last validation on the live weights, as R1
        ema.load_into(base_model)
        log(f"ema: loaded the exponential moving average of the weights (decay {cfg.ema_decay:g}, {step} updates)")
    if not base_model.recurrence_active:  # the model's function is the looped plan: evaluate and quantize that
        base_model.recurrence_active = True
        log(f"recurrence: never reached ENABLE_LOOPING_AT={cfg.enable_looping_at:g} of training; on from here for "
            "evaluation and quantization")
    summary.update(recurrence_from_step=looping_from[0] if looping_from else None,
                   recurrence_from_ms=round(looping_from[1], 1) if looping_from else None,
                   ema_decay=cfg.ema_decay, gptq_reserve_s=round(reserve_s, 3), gptq_reserve_auto=budget is not None)
    if swa.count:
        swa.load_into(base_model)
        log(f"swa: loaded the average of {swa.count} snapshots (every {cfg.swa_every} steps once lr_mult < "
            f"{SWA_START_MULTIPLIER})")
    summary["swa_snapshots"] = swa.count
    check_ranks(env, "before saving the checkpoint")
    checkpoint = save_weights_on_rank0(env, base_model, run_dir / "final_model.pt", cfg, log)
    # "trained" until the export step has written and scored the artifact (record_export makes it "finished"):
    # a run stopped in between says so, and which command finishes it; val_loss/val_bpb appear only with
    # the artifact's score (float_val_* are the float model's)
    summary.update(status="trained", checkpoint=str(checkpoint), finish_command=finish_command(checkpoint))

    def write_summary():
        if env.is_main:
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))

    write_summary()

    # --- the final score of the float model: sliding window ---
    t_eval = time.perf_counter()
    val_loss, val_bpb = validate_now(cfg.eval_stride)
    eval_ms = 1000.0 * (time.perf_counter() - t_eval)
    log(f"final_{SCORE_NAMES[cfg.eval_mode]} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
        f"seq_len:{cfg.eval_seq_len} stride:{cfg.eval_stride} eval_time:{eval_ms:.0f}ms")
    summary.update(float_val_loss=val_loss, float_val_bpb=val_bpb, eval_time_ms=round(eval_ms, 1))
    write_summary()  # a failing export still leaves the run's numbers behind

    # --- the export step (quant/): its calibration time counts against the wall clock, which is why
    # training stopped GPTQ_RESERVE_SECONDS early; serialization and compression come after the cap ---
    overran = None
    if export_fn is None:  # no artifact asked for: the float model's score is the run's
        summary.update(status="finished", val_loss=val_loss, val_bpb=val_bpb)
        del summary["finish_command"]
    else:
        try:
            result = export_fn(base_model, cfg, run_dir, env=env, log=log, train_paths=train_paths,
                               val_tokens=val_tokens, luts=luts, val_bytes=val_bytes, reserve_seconds=reserve_s,
                               float_val=(val_loss, val_bpb), train_seconds=training_time_ms / 1000) or {}
        except Exception as err:
            summary["error"] = f"export step failed: {err}"
            write_summary()
            raise
        record_export(summary, result)
        calib = result.get("calibration_seconds")
        if budget is not None and calib is not None:
            log(f"gptq_reserve: calibration took {calib:.1f}s of the {reserve_s:.1f}s estimated")
            summary["calibration_estimate_s"] = round(reserve_s, 3)
        if (calib is not None and wall_clock and calib > reserve_s
                and training_time_ms / 1000 + calib > cfg.max_wallclock_seconds):
            # Stopped by the clock, training ended reserve_s before the cap, so a longer calibration ends
            # past it; a run that ended at ITERATIONS earlier may use the time it left unused.
            overran = (f"calibration took {calib:.1f}s > GPTQ_RESERVE_SECONDS={reserve_s:g}s (training "
                       f"{training_time_ms / 1000:.1f}s of MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:g}): "
                       f"raise GPTQ_RESERVE_SECONDS")
            summary["error"] = f"calibration overran the wall clock: {overran}"
            summary["compliant"] = False  # over the challenge's training time: not a valid submission
            log(f"ERROR: {summary['error']}")
    write_summary()
    log(f"summary: {run_dir / 'summary.json'}")
    log.close()
    if overran:
        raise CalibrationOverran(f"calibration overran the wall clock: {overran}")
    if checkpoint.parent != run_dir:  # the run finished: only its checkpoint lies elsewhere
        raise CheckpointSaveError(f"the run finished, but its checkpoint could not be written in {run_dir} (see "
                                  f"above): the weights are in {checkpoint}")
    return summary
