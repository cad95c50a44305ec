"""val_bpb: byte lookup tables, window layouts, and evaluate_bpb against direct full-sequence sums."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from train.evaluate import build_byte_luts, evaluate_bpb, evaluate_documents, sliding_windows, target_bytes
from train.unigram import unigram_log_probs
from train.prepare import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakePieces:
    """The part of SentencePieceProcessor that build_byte_luts reads, over hand-made pieces."""

    def __init__(self, pieces):
        self.pieces = pieces  # (piece, kind) with kind in normal | control | unknown | unused | byte

    def vocab_size(self):
        return len(self.pieces)

    def id_to_piece(self, i):
        return self.pieces[i][0]

    def is_control(self, i):
        return self.pieces[i][1] == "control"

    def is_unknown(self, i):
        return self.pieces[i][1] == "unknown"

    def is_unused(self, i):
        return self.pieces[i][1] == "unused"

    def is_byte(self, i):
        return self.pieces[i][1] == "byte"


PIECES = [("<pad>", "control"), ("<s>", "control"), ("</s>", "control"), ("<unk>", "unknown"),
          ("<0x41>", "byte"), ("<0xE2>", "byte"), ("▁the", "normal"), ("the", "normal"), ("▁", "normal"),
          ("é", "normal"), ("▁日本", "normal"), ("<reserved>", "unused")]
BOS, UNK, BYTE_A, SP_THE, THE, SPACE, E_ACUTE, SP_NIHON, UNUSED = 1, 3, 4, 6, 7, 8, 9, 10, 11


def test_luts_on_hand_made_pieces():
    base, lead, boundary = build_byte_luts(FakePieces(PIECES), vocab_size=14)  # 2 ids beyond the tokenizer
    assert base.dtype == torch.int16 and lead.dtype == boundary.dtype == torch.bool and base.numel() == 14
    assert base.tolist() == [0, 0, 0, 0, 1, 1, 3, 3, 0, 2, 6, 0, 0, 0]
    assert lead.tolist() == [False] * 6 + [True, False, True, False, True] + [False] * 3
    assert boundary.tolist() == [True] * 4 + [False] * 7 + [True] * 3
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_byte_luts(FakePieces(PIECES), vocab_size=5)


@pytest.mark.parametrize("prev, target, expected", [
    (BOS, SP_THE, 3),        # leading space after BOS: the document's first word, no space in the text
    (SP_THE, SP_THE, 4),     # after a normal token the space is text
    (THE, SPACE, 1),         # a bare "▁" piece is one byte of space
    (BOS, SPACE, 0),
    (BYTE_A, SP_NIHON, 7),   # byte pieces are text, not boundaries
    (UNK, SP_THE, 3),        # unknown is a boundary
    (UNUSED, SP_THE, 3),
    (THE, BOS, 0), (THE, UNK, 0), (E_ACUTE, BYTE_A, 1), (SP_THE, E_ACUTE, 2),
])
def test_target_bytes(prev, target, expected):
    luts = build_byte_luts(FakePieces(PIECES), vocab_size=12)
    assert target_bytes(torch.tensor([prev]), torch.tensor([target]), luts).tolist() == [expected]


@pytest.fixture(scope="module")
def small_tokenizer():
    words = ("the state of the union is strong and the people are free to choose their path while congress "
             "debates the budget for schools roads and defense in every year").split()
    rng = np.random.default_rng(0)
    paragraphs = [" ".join(rng.choice(words, size=30)).capitalize() + "." for _ in range(300)]
    paragraphs += ["Café au lait costs 3.50 dollars, 日本 is Japan."]  # rare characters: byte fallback
    return spm.SentencePieceProcessor(model_proto=train_tokenizer(paragraphs, vocab_size=320, seed=0))


def test_luts_count_every_byte_of_real_text(small_tokenizer):
    sp = small_tokenizer
    luts = build_byte_luts(sp, 320)
    texts = ["The union is strong.", "Café in 日本: 12 schools, 3 roads!", "  Spaces  inside   text "]
    assert any(sp.is_byte(i) for i in sp.encode(texts[1])), "the test needs byte-fallback pieces"
    ids, expected = [], 0
    for text in texts:
        doc = sp.encode(text)
        normalized = sp.decode(doc)
        expected += len(normalized.encode("utf-8")) - (1 if normalized.startswith(" ") else 0)
        ids += [BOS] + doc
    ids = torch.tensor(ids)
    assert target_bytes(ids[:-1], ids[1:], luts).sum().item() == expected


@pytest.mark.parametrize("num_targets, window, stride", [
    (1, 8, 2), (7, 8, 2), (8, 8, 3), (9, 8, 3), (100, 16, 4), (101, 16, 5), (202, 16, 16), (203, 16, None),
    (50, 16, 15), (64, 16, 1), (1000, 128, 64),
])
def test_sliding_windows_score_every_target_once(num_targets, window, stride):
    windows = sliding_windows(num_targets, window, stride)
    hits = np.zeros(num_targets, dtype=np.int64)
    for k, (start, length, first) in enumerate(windows):
        assert 0 < length <= window and 0 <= first < length and start + length <= num_targets
        if stride is None or stride >= window:
            assert first == 0 and start == k * window
        else:
            assert start % stride == 0
            assert k == 0 or first >= window - stride, "later windows score only targets with full context"
        hits[start + first:start + length] += 1
    assert hits.tolist() == [1] * num_targets, "every target, the tail included, is scored exactly once"


def test_sliding_windows_context():
    """Full windows score their last `stride` targets; target t of any later window has >= W - S context."""
    window, stride = 16, 4
    for start, length, first in sliding_windows(203, window, stride)[1:]:
        assert first >= window - stride
        if length == window:
            assert first == window - stride


# ---- evaluate_bpb on synthetic streams: compared with the direct sum over the whole sequence ----

V = 48


def _luts(seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (V,), generator=g).to(torch.int16)
    lead = torch.rand(V, generator=g) < 0.5
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:4] = True
    base[:4] = 0
    return base, lead, boundary


def _stream(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (n,), generator=g)
    tokens[torch.rand(n, generator=g) < 0.05] = 1  # documents start with BOS
    tokens[0] = 1
    return tokens


TABLES = torch.randn(3, V + 1, V, generator=torch.Generator().manual_seed(3))


def unigram_model(ids):
    return TABLES[0, :V].mean(0).expand(*ids.shape, V)


def two_back_model(ids):
    """Logits from the current and the previous input token (index V: no previous token in the window)."""
    prev = F.pad(ids, (1, 0), value=V)[:, :-1]
    return TABLES[1][ids] + TABLES[2][prev]


def _direct(model, tokens, luts):
    """Every target scored once, with the whole stream as context."""
    x, y = tokens[None, :-1], tokens[None, 1:]
    nll = F.cross_entropy(model(x)[0].double(), y[0], reduction="sum").item()
    return nll / y.numel(), nll / (math.log(2) * target_bytes(x[0], y[0], luts).sum().item())


@pytest.mark.parametrize("n, seq_len, stride, batch_seqs", [
    (203, 16, 5, 3), (203, 16, 4, 64), (64, 16, 15, 1), (17, 16, 1, 7), (10, 16, 4, 2),
])
def test_sliding_matches_full_context(n, seq_len, stride, batch_seqs):
    tokens, luts = _stream(n), _luts()
    for model in (unigram_model, two_back_model):
        loss, bpb = evaluate_bpb(model, tokens, luts, seq_len, stride, batch_seqs)
        ref_loss, ref_bpb = _direct(model, tokens, luts)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and bpb == pytest.approx(ref_bpb, rel=1e-6)


def test_context_free_model_same_bpb_sliding_and_non_overlapping():
    tokens, luts = _stream(331), _luts()
    non_overlapping = evaluate_bpb(unigram_model, tokens, luts, 32, None, 4)
    sliding = evaluate_bpb(unigram_model, tokens, luts, 32, 8, 5)
    assert sliding == pytest.approx(non_overlapping, rel=1e-9)
    assert evaluate_bpb(unigram_model, tokens, luts, 32, 32, 2) == pytest.approx(non_overlapping, rel=1e-9)
    # a model that reads context is hurt at non-overlapping window starts: the comparison has teeth
    ctx_non_overlapping = evaluate_bpb(two_back_model, tokens, luts, 32, None, 4)
    ctx_sliding = evaluate_bpb(two_back_model, tokens, luts, 32, 8, 5)
    assert abs(ctx_sliding[0] - ctx_non_overlapping[0]) > 1e-4
    assert ctx_sliding == pytest.approx(_direct(two_back_model, tokens, luts), rel=1e-6)


def segment_two_back_model(ids, cu_seqlens):
    """two_back_model that sees the previous token only inside its attention segment (cu_seqlens)."""
    at = torch.arange(ids.shape[1])
    segment = torch.searchsorted(cu_seqlens.long(), at, right=True) - 1
    same = F.pad(segment[1:] == segment[:-1], (1, 0), value=False)
    prev = torch.where(same, F.pad(ids, (1, 0), value=V)[:, :-1], torch.full_like(ids, V))
    return TABLES[1][ids] + TABLES[2][prev]


def _direct_documents(tokens, luts, seq_len, span, val_bytes=None):
    """Every target once, its context written out by hand: a segment starts at its span's first token (spans of
    `span` tokens) and at every BOS, and is cut every seq_len tokens counted from its own start."""
    ids = tokens.tolist()
    nll = byte_sum = 0.0
    segment_start = 0
    for p in range(len(ids) - 1):
        if ids[p] == 1 or p % span == 0:
            segment_start = p
        context_start = segment_start + (p - segment_start) // seq_len * seq_len
        prev = ids[p - 1] if p > context_start else V
        logits = TABLES[1][ids[p]] + TABLES[2][prev]
        nll += F.cross_entropy(logits.double()[None], torch.tensor([ids[p + 1]])).item()
        byte_sum += (val_bytes[p + 1].item() if val_bytes is not None else
                     target_bytes(tokens[p:p + 1], tokens[p + 1:p + 2], luts).item())
    return nll / (len(ids) - 1), nll / (math.log(2) * byte_sum)


@pytest.mark.parametrize("n, seq_len, batch_seqs", [(203, 16, 3), (203, 16, 64), (97, 8, 1), (17, 16, 2)])
def test_documents_cut_context_at_bos_pieces_and_spans(n, seq_len, batch_seqs):
    """EVAL_MODE=doc: R1's document-isolated score, every target once (a short last span included)."""
    tokens, luts = _stream(n), _luts()
    got = evaluate_documents(segment_two_back_model, tokens, luts, seq_len, batch_seqs)
    want = _direct_documents(tokens, luts, seq_len, seq_len * batch_seqs)
    assert got == pytest.approx(want, rel=1e-6)  # fp32 cross-entropy against the float64 reference
    # with no segments the same model reads across documents: the cut has teeth
    across = evaluate_documents(lambda ids, cu: two_back_model(ids), tokens, luts, seq_len, batch_seqs)
    assert abs(across[0] - got[0]) > 1e-4


def test_a_byte_sidecar_replaces_the_lookup_tables():
    """val_bytes (a CaseOps sidecar) is charged instead of the tables, in both modes: a sidecar holding the
    tables' own counts gives the same bpb, and other counts give their own."""
    tokens, luts = _stream(203), _luts()
    same = torch.cat((torch.zeros(1, dtype=torch.long), target_bytes(tokens[:-1], tokens[1:], luts))).to(torch.int32)
    assert evaluate_bpb(two_back_model, tokens, luts, 16, 5, 3, val_bytes=same) == \
        evaluate_bpb(two_back_model, tokens, luts, 16, 5, 3)
    assert evaluate_documents(segment_two_back_model, tokens, luts, 16, 3, val_bytes=same) == pytest.approx(
        evaluate_documents(segment_two_back_model, tokens, luts, 16, 3), rel=1e-12)
    other = torch.randint(1, 6, tokens.shape, generator=torch.Generator().manual_seed(9)).to(torch.int32)
    loss, bpb = evaluate_bpb(two_back_model, tokens, luts, 16, 5, 3, val_bytes=other)
    assert bpb == pytest.approx(loss * (tokens.numel() - 1) / (math.log(2) * other[1:].sum().item()), rel=1e-9)
    assert evaluate_documents(segment_two_back_model, tokens, luts, 16, 3, val_bytes=other) == pytest.approx(
        _direct_documents(tokens, luts, 16, 48, val_bytes=other), rel=1e-6)
    with pytest.raises(ValueError, match=r"val_bytes \(100,\) must hold one count per val token \(203,\)"):
        evaluate_bpb(two_back_model, tokens, luts, 16, 5, 3, val_bytes=other[:100])


def test_padding_is_never_scored_and_windows_are_uniform():
    tokens, luts = _stream(50), _luts()
    shapes = []

    def spy(ids):
        shapes.append(tuple(ids.shape))
        return unigram_model(ids)

    result = evaluate_bpb(spy, tokens, luts, 16, 4, batch_seqs=4)  # 49 targets: 10 windows, the last short
    assert len(sliding_windows(49, 16, 4)) == 10
    assert shapes == [(4, 16)] * 3, "every batch has one shape: windows padded to seq_len, the last batch topped up"
    assert result == pytest.approx(_direct(unigram_model, tokens, luts), rel=1e-6), "nothing padded is scored"
    with pytest.raises(ValueError, match="logits_fn returned shape"):
        evaluate_bpb(lambda ids: unigram_model(ids)[:, :-1], tokens, luts, 16)


def test_out_of_vocab_val_tokens_are_named():
    tokens, luts = _stream(50), _luts()
    tokens[7] = V  # one id past the byte tables, e.g. val shards of a bigger vocab
    with pytest.raises(ValueError, match=rf"val_tokens hold ids in \[1, {V}\], outside .* vocab \[0, {V}\)"):
        evaluate_bpb(unigram_model, tokens, luts, 16, 4)


def test_unigram_log_probs():
    arrays = [np.array([0, 1, 1, 2], dtype=np.uint16), np.array([2, 2], dtype=np.uint16)]
    counts = np.array([1, 2, 3, 0]) + 1.0  # add-one smoothing
    got = unigram_log_probs(arrays, 4, chunk_tokens=3)
    assert got.tolist() == pytest.approx(np.log(counts / counts.sum()).tolist(), rel=1e-6)


DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path[:0] = [sys.argv[2], sys.argv[3]]  # the tests folder and the repo root
    from test_evaluate import _luts, _stream, two_back_model
    from train.evaluate import evaluate_bpb

    def run(rank, folder):
        from torch import _dynamo  # noqa: F401  before the group, as train.trainer.setup_distributed does (see there)
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
        seen = set()  # distinct windows: a topped-up last batch repeats one

        def counting_model(ids):
            seen.update(tuple(row) for row in ids.tolist())
            return two_back_model(ids)

        result = evaluate_bpb(counting_model, _stream(203), _luts(), 16, 5, 3)
        open(f"{folder}/rank{rank}.json", "w").write(json.dumps({"result": result, "windows": len(seen)}))
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.spawn(run, args=(sys.argv[1],), nprocs=2)
""")


def test_two_ranks_give_the_single_process_result(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent), str(REPO_ROOT)],
                   cwd=REPO_ROOT,
                   check=True, timeout=240, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_bpb(two_back_model, _stream(203), _luts(), 16, 5, 3)
    for rank in ranks:  # each rank evaluated its share of the windows and both report the all-reduced result
        assert rank["result"] == pytest.approx(list(single), rel=1e-12)
        assert 0 < rank["windows"] < len(sliding_windows(202, 16, 5))
    assert ranks[0]["windows"] + ranks[1]["windows"] == len(sliding_windows(202, 16, 5))
