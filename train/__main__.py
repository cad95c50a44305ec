"""`python -m train` / `torchrun --standalone --nproc_per_node=8 -m train`: one training run.

Configuration comes from PRESET and the seed command's environment variables (model/config.py); a
variable that looks like a misspelt one of them is a warning, or with STRICT_ENV=1 an error.
DRY_RUN=1 prints the resolved configuration, the parameter count, the tokens per step, the data found
and the tokenizer, then exits without training: 0 when a run could start, 2 when something is NOT READY.
Exit status: 0 done, 1 training diverged, the artifact is over the 16,000,000-byte budget, calibration
ended past the wall clock (the run is marked non-compliant in summary.json),
(KERNELS_STRICT=1) a Triton op failed its start-up self-test, a disk filled up (the checkpoint then lies
in CHECKPOINT_FALLBACK_DIR) or a rank stopped answering for DIST_TIMEOUT_SECONDS, 2 bad input
(configuration, KERNELS, data, tokenizer), said in one line before any step runs.
"""
from __future__ import annotations

import os
import sys

import torch

import kernels
from kernels.selftest import SelfTestFailed
from model import ConfigError, from_env
from model.config import check_variable_names, default_preset
from model.schedule import block_schedule, describe
from model.io import DiskFullError
from quant.artifact import OverBudgetError
from quant.export import calibration_probe, export_run
from train.data import ShardError, check_token_ids, load_shard, load_val_bytes, shard_paths, usable_val_tokens
from train.trainer import (CalibrationOverran, CheckpointSaveError, RankLost, TrainingDiverged, check_model_fits,
                           grad_accum_steps_for, load_tokenizer, parameter_count, train)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(text: str = "") -> None:
    if _is_main_process():
        print(text, flush=True)


def preset_line(cfg) -> str:
    if os.environ.get("PRESET", "").strip():
        return f"preset: {cfg.preset} (PRESET={cfg.preset} is set)"
    name, why = default_preset()
    return f"preset: {cfg.preset} (PRESET not set; {why} -> {name})"


def dry_run(cfg) -> bool:
    """Print what a run would use, touching nothing on disk; True when a run could start."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ready = True
    for key, value in cfg.env_dict().items():
        _say(f"  {key}={value}")
    _say(f"kernels: {kernels.backend()}")
    _say(f"model_params: {parameter_count(cfg):,}")
    for on in (True, False):
        lines = describe(block_schedule(cfg, recurrence_active=on))
        if on or lines != describe(block_schedule(cfg)):
            _say(f"block schedule, recurrence {'on' if on else 'off'} ({len(lines)} slots):")
            for line in lines:
                _say(f"  {line}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    try:
        check_model_fits(cfg, device)
    except ConfigError as err:
        _say(f"memory: NOT READY -- {err}")
        ready = False
    try:
        accum = grad_accum_steps_for(cfg, world_size)
        local = cfg.train_batch_tokens // (world_size * accum)
        _say(f"tokens_per_step: {cfg.train_batch_tokens:,} = world_size {world_size} x grad_accum_steps {accum} x "
             f"{local // cfg.train_seq_len} sequences of {cfg.train_seq_len}")
    except ConfigError as err:
        _say(f"tokens_per_step: {cfg.train_batch_tokens:,} -- INVALID: {err}")
        ready = False
    for split in ("train", "val"):
        try:
            paths = shard_paths(cfg.data_path, split)
            check_token_ids(paths, cfg.vocab_size)  # the run's start-up checks, on this one process
            tokens = sum(len(load_shard(p)) for p in paths)
            sidecars = ""
            if split == "val":
                kept = usable_val_tokens(paths, tokens, cfg.eval_seq_len)
                if load_val_bytes(paths, kept) is not None:
                    sidecars = ", with byte sidecars"
                elif cfg.caseops_enabled:
                    raise ShardError("CASEOPS_ENABLED=1 but the val shards have no byte sidecars (*_val_bytes_*.bin)")
            _say(f"data {split}: {len(paths)} shards, {tokens:,} tokens in {cfg.data_path}{sidecars}")
        except (FileNotFoundError, ShardError) as err:
            _say(f"data {split}: NOT READY -- {err}")
            ready = False
    try:
        load_tokenizer(cfg)
        _say(f"tokenizer: {cfg.tokenizer_path} found")
    except (FileNotFoundError, ConfigError) as err:
        _say(f"tokenizer: NOT READY -- {err}")
        ready = False
    _say("DRY_RUN=1: nothing trained" + ("" if ready else "; NOT READY, see above"))
    return ready


def main() -> int:
    try:
        typos = check_variable_names()
        cfg = from_env()
        kernels.backend()  # KERNELS and KERNELS_STRICT now, not at the first forward after the run folder exists
        kernels.strict()
    except (ConfigError, kernels.BackendError) as err:
        _say(f"configuration error: {err}")
        return 2
    for line in typos:
        _say(f"warning: {line}")
    _say(preset_line(cfg))
    if cfg.dry_run:
        return 0 if dry_run(cfg) else 2
    if torch.cuda.is_available():
        _say(f"device: {torch.cuda.get_device_name()}, bf16 autocast over fp32 master weights, "
             f"torch.compile(fullgraph={cfg.compile_fullgraph})")
    else:  # bf16 on CPU is ~30x slower than fp32, and compiling costs more than it saves on short runs
        _say(f"device: cpu ({torch.get_num_threads()} threads), fp32, no torch.compile")
    try:
        train(cfg, export_fn=export_run, calibration_probe=calibration_probe)
    except RankLost as err:  # said by every surviving rank: rank 0 may be the one that was lost
        print(f"error: {err}", flush=True)
        return 1
    except (TrainingDiverged, OverBudgetError, SelfTestFailed, DiskFullError, CheckpointSaveError,
            CalibrationOverran) as err:
        _say(f"error: {err}")  # the message says what happened (how much, where the weights are)
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ShardError) as err:
        _say(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
