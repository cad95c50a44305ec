"""`python -m quant --checkpoint runs/<id>/final_model.pt`: the export step of a training run, for a saved run.

Calibrates on the run's training shards, quantizes as the run's config says (or --method), writes
runs/<id>/final_model.int6.ptz next to the checkpoint, reads it back and prints the round-trip
sliding-window val_bpb next to the float one (and, with --compare, every method's gap). Evaluated on
the run's whole val set, the result goes into the run's summary.json as the trainer records it (the
other keys kept; a --val-tokens or --data-path evaluation leaves summary.json as it was).
On the triton backend the kernels it uses pass the start-up self-test first (kernels/selftest.py).
Exit status: 0 done, 1 the artifact is over 16,000,000 bytes (by how much is printed), (KERNELS_STRICT=1)
a Triton op failed its self-test or no space was left for the artifact, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kernels
from kernels import selftest
from model import CheckpointError, ConfigError, load_checkpoint
from model.cli import nonnegative_int
from model.io import DiskFullError, write_atomic
from train.data import ShardError, load_val_bytes, load_val_tokens, shard_paths
from train.evaluate import build_byte_luts
from train.trainer import load_tokenizer, record_export

from .artifact import ArtifactError, OverBudgetError
from .export import export_run
from .methods import METHODS


def record_in_summary(run_dir: Path, result: dict) -> str:
    """Put an export result into run_dir/summary.json (made if missing) atomically, keeping its other keys;
    returns what was done, for the console."""
    path = run_dir / "summary.json"
    try:
        # no summary (a run killed right after its checkpoint): the checkpoint is a trained run's
        summary = json.loads(path.read_text()) if path.exists() else {"run_id": run_dir.name, "status": "trained"}
        write_atomic(path, json.dumps(record_export(summary, result), indent=2))
    except (OSError, ValueError) as err:  # the artifact is written: say so, do not fail for the summary
        return f"warning: {path} not updated ({err})"
    return f"summary: {path} updated (export)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="runs/<id>/final_model.pt (model.save_checkpoint format)")
    parser.add_argument("--method", choices=tuple(METHODS), help="override the run's QUANT_METHOD")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                        help="also quantize with the other methods and print every method's gap "
                             "(default: only when the val set is small)")
    parser.add_argument("--data-path", help="shard folder (default: the run's DATA_PATH)")
    parser.add_argument("--tokenizer-path", help="sentencepiece model (default: the run's TOKENIZER_PATH)")
    parser.add_argument("--val-tokens", type=nonnegative_int, default=0,
                        help="evaluate on the first N val tokens only (0: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kernels.backend()  # a bad KERNELS or KERNELS_STRICT is bad input too (kernels.BackendError is a ValueError)
        kernels.strict()
        net = load_checkpoint(args.checkpoint, map_location=device)
        cfg = net.config
        if args.method:
            cfg = cfg.replace(quant_method=args.method)
        data_path = args.data_path or cfg.data_path
        # the trainer's checks: a missing file, not a sentencepiece model, or another vocab size
        sp = load_tokenizer(cfg.replace(tokenizer_path=args.tokenizer_path or cfg.tokenizer_path))
        luts = build_byte_luts(sp, cfg.vocab_size)
        val_paths = shard_paths(data_path, "val")
        val_tokens = load_val_tokens(val_paths, cfg.eval_seq_len)
        val_bytes = load_val_bytes(val_paths, val_tokens.numel())
        whole_val = val_tokens.numel()
        if args.val_tokens > 0:
            keep = max(1, (min(args.val_tokens, val_tokens.numel()) - 1) // cfg.eval_seq_len) * cfg.eval_seq_len + 1
            val_tokens = val_tokens[:keep]
            val_bytes = val_bytes[:keep] if val_bytes is not None else None
        train_paths = shard_paths(data_path, "train")
    except (CheckpointError, ConfigError, FileNotFoundError, ShardError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"quant: {args.checkpoint} on {device}: {val_tokens.numel() - 1:,} val targets, "
          f"method {cfg.quant_method}", flush=True)
    try:
        # The round trip loads the artifact with QuantLinear on CUDA (quant/load.py), so int6 runs there too.
        paths = selftest.run(device, selftest.TRAINING_OPS + selftest.CALIBRATION_OPS
                             + (selftest.QUANT_OPS if device.type == "cuda" else ()))
        print(selftest.record_line(paths), flush=True)
        run_dir = Path(args.checkpoint).parent
        result = export_run(net, cfg, run_dir, val_tokens=val_tokens, luts=luts, val_bytes=val_bytes,
                            train_paths=train_paths,
                            compare=args.compare, log=lambda line: print(line, flush=True))
    except (OverBudgetError, selftest.SelfTestFailed, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if val_tokens.numel() < whole_val or args.data_path not in (None, cfg.data_path):
        print(f"summary: {run_dir / 'summary.json'} left as it was (evaluated on "
              + ("part of the val set" if val_tokens.numel() < whole_val else f"--data-path {args.data_path}") + ")")
    else:
        print(record_in_summary(run_dir, result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
