"""`python -m train` / `torchrun --standalone --nproc_per_node=8 -m train`: one training run.

Configuration comes from PRESET and the seed command's environment variables (model/config.py).
DRY_RUN=1 prints the resolved configuration, the parameter count, the tokens per step and the data
found, then exits without training. Exit status: 0 done, 1 training diverged, the artifact is over
the 16,000,000-byte budget, (KERNELS_STRICT=1) a Triton op failed its start-up self-test, a disk filled up
(the checkpoint then lies in CHECKPOINT_FALLBACK_DIR) or a rank stopped answering for DIST_TIMEOUT_SECONDS,
2 bad configuration or missing data.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from kernels.selftest import SelfTestFailed
from model import ConfigError, build_model, count_parameters, from_env
from model.config import default_preset
from model.io import DiskFullError
from quant.artifact import OverBudgetError
from quant.export import export_run
from train.data import ShardError, load_shard, shard_paths
from train.trainer import CheckpointSaveError, RankLost, TrainingDiverged, grad_accum_steps_for, train


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


def dry_run(cfg) -> None:
    """Print what a run would use, touching nothing on disk."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for key, value in cfg.env_dict().items():
        _say(f"  {key}={value}")
    params = count_parameters(build_model(cfg))
    _say(f"model_params: {params:,}")
    try:
        accum = grad_accum_steps_for(cfg, world_size)
        local = cfg.train_batch_tokens // (world_size * accum)
        _say(f"tokens_per_step: {cfg.train_batch_tokens:,} = world_size {world_size} x grad_accum_steps {accum} x "
             f"{local // cfg.train_seq_len} sequences of {cfg.train_seq_len}")
    except ConfigError as err:
        _say(f"tokens_per_step: {cfg.train_batch_tokens:,} -- INVALID: {err}")
    for split in ("train", "val"):
        try:
            paths = shard_paths(cfg.data_path, split)
            tokens = sum(len(load_shard(p)) for p in paths)
            _say(f"data {split}: {len(paths)} shards, {tokens:,} tokens in {cfg.data_path}")
        except (FileNotFoundError, ShardError) as err:
            _say(f"data {split}: NOT READY -- {err}")
    tok = Path(cfg.tokenizer_path)
    _say(f"tokenizer: {tok} " + ("found" if tok.is_file() else "MISSING (run `python -m train.prepare`)"))
    _say("DRY_RUN=1: nothing trained")


def main() -> int:
    try:
        cfg = from_env()
    except ConfigError as err:
        _say(f"configuration error: {err}")
        return 2
    _say(preset_line(cfg))
    if cfg.dry_run:
        dry_run(cfg)
        return 0
    if torch.cuda.is_available():
        _say(f"device: {torch.cuda.get_device_name()}, bf16 autocast over fp32 master weights, "
             f"torch.compile(fullgraph={cfg.compile_fullgraph})")
    else:  # bf16 on CPU is ~30x slower than fp32, and compiling costs more than it saves on short runs
        _say(f"device: cpu ({torch.get_num_threads()} threads), fp32, no torch.compile")
    try:
        train(cfg, export_fn=export_run)
    except RankLost as err:  # said by every surviving rank: rank 0 may be the one that was lost
        print(f"error: {err}", flush=True)
        return 1
    except (TrainingDiverged, OverBudgetError, SelfTestFailed, DiskFullError, CheckpointSaveError) as err:
        _say(f"error: {err}")  # the message says what happened (how much, where the weights are)
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ShardError) as err:
        _say(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
