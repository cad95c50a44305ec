"""`python -m train.unigram`: the reference val_bpb of a unigram model fitted on the train shards.

A model that ignores context entirely scores this; every trained model should beat it. It is scored by
train/evaluate.py's metric (non-overlapping windows unless --stride), like the trainer's validation, with
the val byte sidecars' counts when the data has them (CaseOps).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from model.cli import positive_int
from model.config import Config
from train.data import load_shard, load_val_bytes, load_val_tokens, shard_paths
from train.evaluate import build_byte_luts, evaluate_bpb
from train.trainer import load_tokenizer

def unigram_log_probs(token_arrays, vocab_size: int, chunk_tokens: int = 1 << 24) -> torch.Tensor:
    """Add-one smoothed log-probabilities of each id over the given token arrays (memmaps read in chunks)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for tokens in token_arrays:
        for i in range(0, tokens.size, chunk_tokens):
            chunk = np.asarray(tokens[i:i + chunk_tokens])
            if chunk.size and int(chunk.max()) >= vocab_size:
                raise ValueError(f"token id {int(chunk.max())} in the train shards is >= vocab_size {vocab_size}")
            counts += np.bincount(chunk, minlength=vocab_size)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.unigram", description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", default=os.environ.get("DATA_PATH") or "data/datasets/embedded_sp1024")
    parser.add_argument("--tokenizer-path",
                        default=os.environ.get("TOKENIZER_PATH") or "data/tokenizers/embedded_1024_bpe.model")
    parser.add_argument("--vocab-size", type=positive_int, default=1024)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="sliding-window stride (default: non-overlapping)")
    args = parser.parse_args(argv)
    try:
        # the trainer's checks: a missing file, not a sentencepiece model, or another vocab size
        sp = load_tokenizer(Config(tokenizer_path=args.tokenizer_path, vocab_size=args.vocab_size))
        luts = build_byte_luts(sp, args.vocab_size)
        log_probs = unigram_log_probs((load_shard(p) for p in shard_paths(args.data_path, "train")), args.vocab_size)
        val_paths = shard_paths(args.data_path, "val")
        val_tokens = load_val_tokens(val_paths, args.seq_len)
        val_bytes = load_val_bytes(val_paths, val_tokens.numel())
    except (FileNotFoundError, ValueError) as e:  # ConfigError and ShardError are ValueErrors; each names its file
        print(f"train.unigram: {e}", file=sys.stderr)
        return 2

    def unigram_logits(ids):
        return log_probs.expand(*ids.shape, -1)

    val_loss, val_bpb = evaluate_bpb(unigram_logits, val_tokens, luts, args.seq_len, args.stride, val_bytes=val_bytes)
    print(f"unigram model on {args.data_path}: {val_tokens.numel() - 1} val targets, val_loss:{val_loss:.4f}"
          + (" (bytes from the val byte sidecars)" if val_bytes is not None else ""))
    print(f"val_bpb:{val_bpb:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
