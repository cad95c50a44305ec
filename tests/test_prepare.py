"""The embedded corpus: deterministic builds, a clean val split by document, reuse, and the real corpus."""
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from train.data import load_shard, load_val_tokens, shard_paths
from train.evaluate import build_byte_luts, target_bytes
from train.prepare import BOS_ID, build_corpus, corpus_documents, main

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=400, seed=5, max_val_tokens=3000, shard_tokens=20_000, progress=False)


@pytest.fixture(scope="module")
def few_documents():
    """A few short speeches and about 150 articles: ~300 KB, enough to train a 400-piece tokenizer."""
    docs = corpus_documents()
    speeches = sorted((d for d in docs if d.source == "sotu"), key=lambda d: len(d.text))[:4]
    articles = [d for d in docs if d.source == "wikipedia"][::64]
    return speeches + articles


def _build(root, documents, **overrides):
    settings = {**SMALL, **overrides}
    return build_corpus(documents, root / "datasets" / "embedded_sp400", root / "tokenizers" / "embedded_400_bpe.model",
                        **settings)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith(".lock")}


def _documents_in(paths):
    """Split a split's token stream at BOS into documents (lists of ids)."""
    tokens = np.concatenate([load_shard(p) for p in paths]).tolist()
    starts = [i for i, t in enumerate(tokens) if t == BOS_ID]
    assert starts and starts[0] == 0, "every split starts with a document's BOS"
    return [tokens[a + 1:b] for a, b in zip(starts, starts[1:] + [len(tokens)])]


def test_same_inputs_same_bytes(tmp_path, few_documents):
    first = _build(tmp_path / "a", few_documents)
    second = _build(tmp_path / "b", few_documents)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    shard_names = [n for n in files_a if n.endswith(".bin")]
    assert len(shard_names) >= 3 and "tokenizers/embedded_400_bpe.model" in files_a
    for name in shard_names + ["tokenizers/embedded_400_bpe.model"]:
        assert files_a[name] == files_b[name], f"{name} differs between two identical builds"
    assert (first.train_tokens, first.val_tokens) == (second.train_tokens, second.val_tokens)
    other_seed = _build(tmp_path / "c", few_documents, seed=6)
    assert _files(tmp_path / "c")["datasets/embedded_sp400/embedded_val_000000.bin"] != \
        files_a["datasets/embedded_sp400/embedded_val_000000.bin"], "the seed picks the val documents"
    assert other_seed.val_tokens <= SMALL["max_val_tokens"]


def test_val_split_is_by_whole_document(tmp_path, few_documents):
    summary = _build(tmp_path, few_documents)
    folder = tmp_path / "datasets" / "embedded_sp400"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizers" / "embedded_400_bpe.model"))
    assert sp.vocab_size() == 400 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2 and sp.unk_id() == 3
    val = [sp.decode(d) for d in _documents_in(shard_paths(folder, "val"))]
    train = [sp.decode(d) for d in _documents_in(shard_paths(folder, "train"))]
    expected = sorted(sp.decode(sp.encode(d.text)) for d in few_documents)
    assert sorted(val + train) == expected, "every document lands whole in exactly one split"
    assert not set(val) & set(train)
    assert 0.7 * SMALL["max_val_tokens"] < summary.val_tokens <= SMALL["max_val_tokens"]
    assert summary.val_tokens == sum(load_shard(p).size for p in shard_paths(folder, "val"))
    sources_in_order = ["sotu" if d in {sp.decode(sp.encode(x.text)) for x in few_documents[:4]} else "wiki"
                        for d in train]
    assert sources_in_order != sorted(sources_in_order) and sources_in_order != sorted(sources_in_order)[::-1], \
        "train documents are shuffled so the sequential stream mixes the sources"


def test_reuse_force_and_rebuild(tmp_path, few_documents):
    first = _build(tmp_path, few_documents)
    folder = tmp_path / "datasets" / "embedded_sp400"
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = _build(tmp_path, few_documents)
    assert again.reused and not first.reused and again.train_tokens == first.train_tokens
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp, "a reused build writes nothing"
    assert not _build(tmp_path, few_documents, force=True).reused
    # a damaged shard or a change of settings means the stamp no longer matches: rebuilt, not trusted
    victim = shard_paths(folder, "train")[0]
    victim.write_bytes(victim.read_bytes()[:-2])
    assert not _build(tmp_path, few_documents).reused and load_shard(victim).size > 0
    fewer = _build(tmp_path, few_documents, shard_tokens=200_000)
    assert not fewer.reused and [p.name for p in shard_paths(folder, "train")] == fewer.train_shards == \
        ["embedded_train_000000.bin"], "shards of the previous build are removed"


def test_bad_inputs(tmp_path, few_documents):
    with pytest.raises(ValueError, match="at least one document"):
        _build(tmp_path, [])
    with pytest.raises(ValueError, match="max_val_tokens=5"):
        _build(tmp_path, few_documents, max_val_tokens=5)
    with pytest.raises(ValueError, match="cannot train a 270-piece tokenizer"):  # fewer pieces than characters
        _build(tmp_path, few_documents, vocab_size=270)
    with pytest.raises(SystemExit):
        main(["--out-root", str(tmp_path), "--val-tokens", "0"])


def _proto_fields(buf: bytes) -> dict:
    """{field number: last value} of one protobuf message (varint -> int, fixed32 -> float, bytes -> bytes)."""
    fields, i = {}, 0

    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], i = varint(i)
        elif wire == 5:
            fields[number], i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wire == 1:
            fields[number], i = buf[i:i + 8], i + 8
        else:
            assert wire == 2, f"unexpected wire type {wire}"
            n, i = varint(i)
            fields[number], i = buf[i:i + n], i + n
    return fields


def test_tokenizer_settings_in_the_model_file(prepared_corpus):
    """The SPEC 1 trainer settings, read from the serialized model (field numbers of sentencepiece_model.proto;
    protobuf itself is not a dependency). Behaviour alone cannot show e.g. character_coverage."""
    model = _proto_fields(Path(prepared_corpus.tokenizer_path).read_bytes())
    trainer, normalizer = _proto_fields(model[2]), _proto_fields(model[3])
    assert trainer[3] == 2, "model_type BPE"
    assert trainer[4] == 1024 and trainer[10] == pytest.approx(0.999, abs=1e-7)  # vocab_size, character_coverage
    assert (trainer[35], trainer[25], trainer[33]) == (1, 1, 0), "byte_fallback on, split_digits on, hard_vocab_limit off"
    assert (trainer[43], trainer[41], trainer[42], trainer[40]) == (0, 1, 2, 3), "ids pad 0, bos 1, eos 2, unk 3"
    assert normalizer[1] == b"nmt_nfkc" and normalizer[3] == 0, "nmt_nfkc normalization, add_dummy_prefix off"


def test_real_corpus_and_unigram_reference(prepared_corpus, capsys):
    """The full embedded corpus (built once per session, reused from `make train`) and the CLI reference."""
    s = prepared_corpus
    main(["--out-root", str(Path(s.dataset_dir).parents[1])])  # reuses the build and prints its summary
    printed = capsys.readouterr().out
    assert "reused" in printed and f"val {s.val_tokens:,}" in printed and "bytes per token" in printed
    assert s.documents["sotu"]["train"] + s.documents["sotu"]["val"] == 249
    assert s.documents["wikipedia"]["train"] + s.documents["wikipedia"]["val"] > 9_900
    assert s.documents["sotu"]["val"] > 0 and s.documents["wikipedia"]["val"] > 0, "val draws from both sources"
    assert 2.5 < s.bytes_per_token < 3.0 and 40_000 < s.val_tokens <= 50_000 and s.train_tokens > 5_000_000
    assert len(shard_paths(s.dataset_dir, "train")) == len(s.train_shards) >= 5
    out = subprocess.run([sys.executable, "-m", "train.unigram", "--data-path", s.dataset_dir,
                          "--tokenizer-path", s.tokenizer_path], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    bpb = float(re.search(r"^val_bpb:([0-9.]+)$", out, re.M).group(1))
    # the same number computed directly: add-one unigram over the train shards, every val target once
    counts = np.ones(1024)
    for path in shard_paths(s.dataset_dir, "train"):
        counts += np.bincount(load_shard(path), minlength=1024)
    log_p = np.log(counts / counts.sum())
    val = load_val_tokens(shard_paths(s.dataset_dir, "val"), 2048)
    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=s.tokenizer_path), 1024)
    nll = -log_p[val[1:].numpy()].sum()
    assert bpb == pytest.approx(nll / (math.log(2) * target_bytes(val[:-1], val[1:], luts).sum().item()), abs=6e-5)
    assert 2.5 < bpb < 4.0


def test_caseops_corpus_charges_every_original_byte(prepared_caseops_corpus):
    """--variant sp8192_caseops: CaseOps text with the operators at ids 4-7, and a val byte sidecar whose counts
    for each document sum to the document's original UTF-8 bytes (the corpus texts carry no leading or trailing
    whitespace, the only bytes no token stands for); the unigram reference scores with those counts."""
    from train import caseops
    from train.data import sidecar_paths

    s = prepared_caseops_corpus
    assert s.caseops and s.vocab_size == 8192 and 40_000 < s.val_tokens <= 50_000
    sp = spm.SentencePieceProcessor(model_file=s.tokenizer_path)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS) and sp.vocab_size() == 8192
    val = shard_paths(s.dataset_dir, "val")
    tokens = np.concatenate([load_shard(p) for p in val])
    counts = np.concatenate([load_shard(p) for p in sidecar_paths(val)]).astype(np.int64)
    assert counts.size == tokens.size and not counts[tokens == BOS_ID].any()
    by_first_ids = {tuple(sp.encode(caseops.encode(d.text))[:64]): d.text for d in corpus_documents()}
    starts = [*np.flatnonzero(tokens == BOS_ID), tokens.size]
    for a, b in zip(starts[:-1], starts[1:]):
        text = by_first_ids[tuple(tokens[a + 1:min(a + 65, b)].tolist())]
        assert counts[a:b].sum() == len(text.encode("utf-8"))
    out = subprocess.run([sys.executable, "-m", "train.unigram", "--data-path", s.dataset_dir, "--tokenizer-path",
                          s.tokenizer_path, "--vocab-size", "8192", "--seq-len", "256"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "(bytes from the val byte sidecars)" in out and 1.5 < float(re.search(r"val_bpb:([0-9.]+)", out)[1]) < 4.0
