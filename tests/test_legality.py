"""The legality audit (train/legality.py): it passes the sliding, non-overlapping and document evaluations, a
legal score-then-update test-time trainer, and catches planted violations: a window that sees its target, a
rescored token, an adapter step before scoring, a distribution not normalized over the whole vocabulary."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import build_model, from_env
from train.data import write_shard
from train.evaluate import evaluate_bpb, validate
from train.legality import MODES, ModeUnavailable, audit, evaluator, keep_whole_documents, main

REPO = Path(__file__).resolve().parents[1]
PINNED_ARTIFACT = REPO / "tests" / "pins" / "tiny_run.int6.ptz"  # the tiny preset, vocab 1024
VOCAB, BOS = 96, 1
# 1 byte per token: the audit never reads the bytes
LUTS = (torch.ones(VOCAB, dtype=torch.int16), torch.zeros(VOCAB, dtype=torch.bool),
        torch.zeros(VOCAB, dtype=torch.bool))


def documents(count: int, seed: int, vocab: int = VOCAB, lengths=(4, 40)) -> torch.Tensor:
    """A stream of `count` BOS-led documents of random ids in [2, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(count):
        length = int(torch.randint(*lengths, (1,), generator=gen))
        ids += [BOS] + torch.randint(2, vocab, (length,), generator=gen).tolist()
    return torch.tensor(ids)


def tiny_model():
    """(model, config): a 1-block tiny-preset model at vocab 96 with random weights, the zero-initialized
    projections made random too so every position reads its context."""
    torch.set_num_threads(1)
    cfg = from_env(environ={}, preset="tiny", vocab_size=VOCAB, model_dim=32, num_heads=1, num_kv_heads=1,
                   num_flat_layers=1, crawler_loops=1, bigram_vocab_size=64, bigram_dim=16, inst_dim=8,
                   eval_seq_len=32, eval_stride=8, eval_batch_seqs=4)
    torch.manual_seed(0)
    net = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() and float(p.abs().max()) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval(), cfg


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def stream():
    return documents(10, seed=1)[:260]


def check(report, name):
    return next(c for c in report.checks if c.name.startswith(name))


@pytest.mark.parametrize("mode, stride", [("sliding", 8), ("sliding", None), ("doc", None)])
def test_the_evaluations_pass(tiny, stream, mode, stride):
    net, cfg = tiny
    cfg = cfg.replace(eval_stride=stride or cfg.eval_seq_len)
    report = audit(evaluator(mode, net, cfg, LUTS, device="cpu"), stream, VOCAB, positions=3, seed=0)
    assert report.ok, str(report)
    names = [c.name for c in report.checks]
    assert names[0] == "repeatable" and sum(n.startswith("causal after t=") for n in names) == 3
    assert {"later document", "scored once", "full distribution", "reported loss"} <= set(names)
    assert report.evaluations == 6 and all(c.passed for c in report.checks), str(report)
    for c in report.checks:
        if c.name.startswith("causal after") or c.name == "later document":
            assert " 0 other targets changed" not in c.covered, "the perturbation must reach the model"
    text = str(report)
    assert text.splitlines()[-1] == f"legality: PASS ({len(report.checks)} checks)"
    assert f"targets 1..{stream.numel() - 1}" in text


def test_observe_sees_exactly_what_is_summed(tiny, stream):
    """The evaluators' observe: every scored target once, its logits' rows and the nll added to the sums."""
    net, cfg = tiny
    for mode in ("sliding", "doc"):
        seen = []
        loss, _ = validate(net, net, stream, LUTS, seq_len=32, stride=8, batch_seqs=4, device="cpu", mode=mode,
                           observe=lambda at, logits, nll: seen.append((at, logits, nll)))
        at = torch.cat([s[0] for s in seen])
        assert at.dtype == torch.int64 and sorted(at.tolist()) == list(range(1, stream.numel()))
        assert all(s[1].shape == (s[0].numel(), VOCAB) and s[2].dtype == torch.float32 for s in seen)
        nll = torch.cat([s[2] for s in seen])
        assert abs(nll.double().mean().item() - loss) < 1e-9
        expected = torch.cat([F.cross_entropy(s[1].float(), stream[s[0]], reduction="none") for s in seen])
        torch.testing.assert_close(nll, expected)
        assert validate(net, net, stream, LUTS, seq_len=32, stride=8, batch_seqs=4, device="cpu", mode=mode)[0] == loss


def test_a_window_that_sees_its_target(tiny, stream):
    net, _ = tiny

    def peeking(tokens, observe):  # the input shifted one ahead: the logits predicting token p read token p
        return evaluate_bpb(lambda ids: net(torch.roll(ids, -1, dims=1)), tokens, LUTS, 32, stride=8, batch_seqs=4,
                            observe=observe)
    report = audit(peeking, stream, VOCAB, positions=[100], repeat=False)
    assert not report.ok
    causal = check(report, "causal after t=100")
    assert causal.passed is False and causal.first == 101, causal.line()  # target t+1, the one it saw
    assert check(report, "later document").passed is False
    assert check(report, "scored once").passed and check(report, "full distribution").passed
    assert "FAIL  causal after t=100" in str(report) and str(report).splitlines()[-1].startswith("legality: FAIL")


def _sliding(net, tokens, observe):
    return evaluate_bpb(net, tokens, LUTS, 32, stride=8, batch_seqs=4, observe=observe)


@pytest.mark.parametrize("shown", [True, False])
def test_a_rescored_token(tiny, stream, shown):
    """Target 7 scored a second time (a second pass over it): the count catches it when the evaluator shows
    the second score; the reported loss gives it away when it does not."""
    net, _ = tiny

    def rescoring(tokens, observe):
        total, count = [0.0], [0]

        def tee(at, logits, nll):
            total[0] += float(nll.double().sum())
            count[0] += nll.numel()
            observe(at, logits, nll)
        _sliding(net, tokens, tee)
        with torch.no_grad():
            logits = net(tokens[None, :8])[0, 6:7]
        nll = F.cross_entropy(logits, tokens[7:8], reduction="none")
        if shown:
            observe(torch.tensor([7]), logits, nll)
        loss = (total[0] + float(nll)) / (count[0] + 1)
        return loss, loss
    report = audit(rescoring, stream, VOCAB, positions=1, later_doc=None, repeat=False)
    assert not report.ok
    once, reported = check(report, "scored once"), check(report, "reported loss")
    if shown:
        assert once.passed is False and once.first == 7 and "scored 2 times" in once.problem and reported.passed
    else:
        assert once.passed and reported.passed is False and "does not show" in reported.problem
    assert check(report, "causal after").passed and check(report, "full distribution").passed


def toy_ttt(net, *, update_first: bool, chunk: int = 12, lr: float = 2.0):
    """A test-time trainer in the shape of R1's: documents longest first, each in chunks of `chunk` targets
    predicted from its own prefix; a logit bias (SLOT-like, shared by every document, carried on) takes one
    SGD step on each chunk's targets. update_first: the step comes before the chunk is scored (illegal);
    else after (score before update: legal)."""
    def evaluate(tokens, observe):
        n = tokens.numel()
        starts = (tokens == BOS).nonzero()[:, 0].tolist()
        # a document's targets run up to the next BOS (R1's docs), the last one's to the end
        docs = [(b, e) for b, e in zip(starts, starts[1:] + [n - 1]) if e > b]
        if starts[0] > 0:
            docs.insert(0, (0, starts[0]))
        docs.sort(key=lambda d: d[1] - d[0], reverse=True)
        bias = torch.zeros(VOCAB, requires_grad=True)
        total, count = 0.0, 0
        for b, e in docs:
            with torch.no_grad():
                logits_all = net(tokens[None, b:e])[0]  # position i predicts token b + i + 1
            for lo in range(0, e - b, chunk):
                hi = min(lo + chunk, e - b)
                ys = tokens[b + lo + 1:b + hi + 1]

                def step():
                    loss = F.cross_entropy(logits_all[lo:hi] + bias, ys)
                    (grad,) = torch.autograd.grad(loss, bias)
                    with torch.no_grad():
                        bias.sub_(lr * grad)
                if update_first:
                    step()
                with torch.no_grad():
                    logits = logits_all[lo:hi] + bias
                    nll = F.cross_entropy(logits, ys, reduction="none")
                observe(torch.arange(b + lo + 1, b + hi + 1), logits, nll)
                total += float(nll.double().sum())
                count += nll.numel()
                if not update_first:
                    step()
        return total / count, total / count
    return evaluate


def test_score_before_update_passes_in_its_own_order(tiny, stream):
    """Legal test-time training, even out of stream order (longest document first): a target may depend on
    every token scored before it."""
    net, _ = tiny
    report = audit(toy_ttt(net, update_first=False), stream, VOCAB, positions=3, seed=1)
    assert report.ok, str(report)
    assert all(" 0 targets unchanged" not in c.covered for c in report.checks), str(report)


def test_an_adapter_step_before_scoring(tiny, stream):
    net, _ = tiny
    report = audit(toy_ttt(net, update_first=True), stream, VOCAB, positions=3, seed=1, repeat=False)
    assert not report.ok
    failed = [c for c in report.checks if c.passed is False]
    assert failed and all(c.name.startswith("causal after") or c.name == "later document" for c in failed), str(report)
    for c in failed:
        if c.name.startswith("causal after t="):
            t = int(c.name.split("=")[1])
            assert c.first is not None and c.first <= t + 1


@pytest.mark.parametrize("how", ["subset", "narrow"])
def test_a_distribution_not_over_the_whole_vocabulary(tiny, stream, how):
    """Scores from a softmax over half the ids (the target always among them): shown with the full logits,
    the nll is not theirs; shown with the subset's, the width is not the vocabulary's."""
    net, _ = tiny

    def half(tokens, observe):
        def partial(at, logits, nll):
            keep = torch.arange(VOCAB) < VOCAB // 2
            y = tokens[at]
            masked = logits.masked_fill(~(keep[None, :] | (torch.arange(VOCAB)[None, :] == y[:, None])), -torch.inf)
            sub = F.cross_entropy(masked, y, reduction="none")
            observe(at, logits if how == "subset" else logits[:, :VOCAB // 2], sub)
            totals.append(sub)
        totals = []
        _sliding(net, tokens, partial)
        loss = float(torch.cat(totals).double().mean())
        return loss, loss
    report = audit(half, stream, VOCAB, positions=1, later_doc=None, repeat=False)
    full = check(report, "full distribution")
    assert full.passed is False and full.first == 1, str(report)
    assert ("is not -log_softmax(logits)[target]" if how == "subset" else "logits over 48 ids") in full.problem
    assert check(report, "scored once").passed and check(report, "reported loss").passed


def test_positions_and_documents_are_chosen_within_the_stream(stream):
    seen = []

    def uniform(tokens, observe):  # context-free: passes everything, changes nothing
        n = tokens.numel()
        logits = torch.zeros(n - 1, VOCAB)
        nll = F.cross_entropy(logits, tokens[1:], reduction="none")
        observe(torch.arange(1, n), logits, nll)
        seen.append(tokens)
        return float(nll.mean()), 0.0
    report = audit(uniform, stream, VOCAB, positions=4, seed=3)
    assert report.ok and report.evaluations == 1 + 1 + 4 + 1
    for tokens in seen:
        assert torch.equal(tokens == BOS, stream == BOS), "document starts are kept, and no token becomes a BOS"
    assert "; 0 other targets changed" in check(report, "causal after").covered  # it ignores its context
    with pytest.raises(ValueError, match="outside the vocabulary"):
        audit(uniform, stream, 50)
    with pytest.raises(ValueError, match="not the BOS position"):
        audit(uniform, stream, VOCAB, later_doc=5, positions=0, repeat=False)


def test_keep_whole_documents():
    tokens = torch.tensor([1, 5, 6, 1, 7, 8, 9, 1, 4])
    assert keep_whole_documents(tokens, 0).tolist() == tokens.tolist()
    assert keep_whole_documents(tokens, 6).tolist() == [1, 5, 6]
    assert keep_whole_documents(tokens, 7).tolist() == [1, 5, 6, 1, 7, 8, 9]  # the BOS after the cut ends it
    assert keep_whole_documents(torch.tensor([1, 5, 6, 7, 8]), 3).tolist() == [1, 5, 6]  # one long document


def test_ttt_mode_is_wired_or_named(tiny):
    net, cfg = tiny
    assert set(MODES) == {"sliding", "doc", "ttt"}
    try:
        import train.ttt  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModeUnavailable, match="train/ttt.py"):
            evaluator("ttt", net, cfg, LUTS, device="cpu")
    else:
        assert callable(evaluator("ttt", net, cfg, LUTS, device="cpu"))


def test_the_run_does_not_import_the_audit():
    from quant.bundle import bundled_modules

    modules = bundled_modules(REPO)
    assert "train.evaluate" in modules and "train.legality" not in modules


def test_cli_on_the_pinned_artifact(tmp_path, capsys):
    val = documents(30, seed=2, vocab=1024, lengths=(10, 60))
    write_shard(tmp_path / "audit_val_000000.bin", val.numpy().astype(np.uint16))
    argv = ["--artifact", str(PINNED_ARTIFACT), "--val", str(tmp_path), "--max-tokens", "600", "--positions", "2"]
    assert main(argv + ["--mode", "sliding"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"legality: {PINNED_ARTIFACT}, mode sliding (seq_len 256, stride 256) on cpu:")
    kept = int(re.search(r" on cpu: ([\d,]+) tokens from ", lines[0]).group(1).replace(",", ""))
    assert kept <= 600 and val[kept] == BOS, "cut to whole documents"
    assert sum(line.startswith("PASS  causal after t=") for line in lines) == 2
    for name in ("repeatable", "later document", "scored once", "full distribution", "reported loss"):
        assert any(line.startswith(f"PASS  {name}:") for line in lines), name
    assert lines[-1] == "legality: PASS (7 checks)"
    assert main(argv + ["--mode", "doc", "--no-repeat"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "legality: PASS (6 checks)"


def test_cli_bad_input(tmp_path):
    run = subprocess.run([sys.executable, "-m", "train.legality", "--artifact", str(tmp_path / "none.ptz")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.ptz'}: no such artifact"]
    assert main(["--artifact", str(PINNED_ARTIFACT), "--val", str(tmp_path)]) == 2  # no val shards there
    try:
        import train.ttt  # noqa: F401
    except ModuleNotFoundError:  # until train/ttt.py exists, --mode ttt says so
        write_shard(tmp_path / "audit_val_000000.bin", documents(3, seed=2).numpy().astype(np.uint16))
        assert main(["--artifact", str(PINNED_ARTIFACT), "--val", str(tmp_path), "--mode", "ttt"]) == 2
