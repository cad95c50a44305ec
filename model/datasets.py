"""The tokenized FineWeb datasets `python -m train.download --variant NAME` fetches, as plain data.

The config reads this table to derive DATA_PATH and TOKENIZER_PATH from VOCAB_SIZE and CASEOPS_ENABLED
without importing the downloader (and with it huggingface_hub). A download mirrors the hub repo's
`datasets/` root into data/, so a variant's shards are in data/datasets/<dataset>/ and its SentencePiece
model is data/tokenizers/<tokenizer_model> (DATA_EVAL.md 1.2-1.3).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Variant(NamedTuple):
    dataset: str          # shard folder below <root>/datasets/
    tokenizer_model: str  # SentencePiece model file below <root>/tokenizers/
    vocab_size: int
    caseops: bool         # text went through lossless_caps_caseops_v1; val bytes come from the sidecars

    def data_path(self, root="data") -> Path:
        return Path(root) / "datasets" / self.dataset

    def tokenizer_path(self, root="data") -> Path:
        return Path(root) / "tokenizers" / self.tokenizer_model


VARIANTS = {
    "sp1024": Variant("fineweb10B_sp1024", "fineweb_1024_bpe.model", 1024, False),
    "sp8192": Variant("fineweb10B_sp8192", "fineweb_8192_bpe.model", 8192, False),
    "sp8192_caseops": Variant("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                              "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", 8192, True),
}


def variant_for(vocab_size: int, caseops: bool) -> str | None:
    """The variant whose data fits VOCAB_SIZE and CASEOPS_ENABLED, or None when no download does."""
    return next((name for name, v in VARIANTS.items() if (v.vocab_size, v.caseops) == (vocab_size, bool(caseops))),
                None)
