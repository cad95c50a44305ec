"""The legality audit of an evaluation mode (issue 24 item 5): `python -m train.legality --artifact PATH`.

    python -m train.legality --artifact runs/<id>/final_model.int6.ptz [--mode sliding|doc|ttt] [--val PATH]
                             [--max-tokens N] [--positions K] [--seed S] [--atol A] [--no-repeat]

It runs one evaluation mode on the run's val tokens (or --val: a val shard or a folder of them) several times,
once as they are and once per perturbed copy, with an observer (train.evaluate.Observer) that records for every
scored target how often it was scored, its nll, the order it was scored in, and a fingerprint of the whole
predicted distribution (its log-probabilities times a fixed random [V, 8] matrix: any change of the distribution
moves it, memory 8 floats a target). The checks, the conditions records cite (DATA_EVAL.md section 5):

- causal after t (one per chosen position t): every token after t that is not yet scored when target t+1 is
  scored is replaced by another random id (document starts kept: BOS stays BOS and no other token becomes
  one); every target up to t+1 scored no later than t+1 must keep its distribution. For a stream evaluator
  (sliding windows, documents) that is every token after t and every target 1..t+1. Comparing distributions,
  not scores, is what catches a window that sees its own target (target t+1 is among the replaced tokens),
  and an adapter fitted to targets before they are scored.
- later document: every token of one later document but its BOS replaced; nothing scored before that
  document's first target (in both orders: stream position and scoring order) may change.
- scored once: every target 1..N-1 scored exactly once, in every evaluation (a single pass, no rescoring).
- full distribution: the logits a score came from span the whole vocabulary, are finite, and the score is
  -log_softmax(logits)[target] (the scored probability is one of a distribution normalized over every id).
- reported loss: the evaluator's val_loss is the mean of the scores it showed the observer.
- repeatable (unless --no-repeat): the unperturbed tokens twice give the same distributions; otherwise the
  causality checks would measure the evaluator's noise.

A target may thus depend on the tokens before it and on tokens already scored (test-time training on scored
tokens is legal; the order is the evaluator's own, as the observer sees it), never on a token not yet scored
and not before it. Exit status: 0 every check passed, 1 a violation (each failing check names the first
offending target), 2 bad input. An entry point, never part of a run (train/__main__.py does not import it).

The ttt mode is train.ttt.evaluate_ttt(model, val_tokens, luts, cfg, *, device, val_bytes=None, observe=None),
imported when asked for; every mode's evaluation starts from the artifact's weights and the same RNG seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

FINGERPRINT_DIM = 8
ATOL = 1e-5          # the largest change of a fingerprint (~ the RMS change of the log-probs) counted as none
NLL_ATOL = 1e-4      # nll vs -log_softmax(logits)[target], plus NLL_RTOL of it (both fp32, different reductions)
NLL_RTOL = 1e-5
LOSS_RTOL = 1e-6     # the reported val_loss vs the mean of the observed nll
OBSERVE_ROWS = 8192  # rows of logits turned into log-probs at a time (memory: rows x V fp32)
LATER_DOC_CANDIDATES = 64  # documents the later-document check picks from

Evaluate = Callable[[torch.Tensor, Callable], tuple]  # evaluate(tokens, observe) -> (val_loss, val_bpb)


class ModeUnavailable(ValueError):
    """The evaluation mode cannot be built in this checkout (train.ttt missing)."""


# ---------------------------------------------------------------- the observer

class Recorder:
    """An Observer (train.evaluate) that records, per target position of one evaluation: times scored, the
    fingerprint of the distribution it was first scored from and the index of the observe call that scored
    it; the sum of every observed nll; and the first breach of the full-distribution rules."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int, seed: int):
        n = tokens.numel()
        self.tokens, self.vocab_size, self.seed = tokens.cpu(), vocab_size, seed
        self.count = torch.zeros(n, dtype=torch.int32)
        self.step = torch.full((n,), -1, dtype=torch.int64)
        self.fingerprint = torch.full((n, FINGERPRINT_DIM), math.nan)
        self.calls = 0
        self.scores = 0
        self.nll_sum = 0.0                 # float64 sum of every observed nll
        self.outside: int | None = None    # a targets_at outside 1..n-1
        self.bad: tuple[int, str] | None = None  # (position, what) of the first breach of the distribution rules
        self.max_nll_error = 0.0
        self._proj: dict = {}

    def projection(self, width: int, device) -> torch.Tensor:
        """The fixed random [width, FINGERPRINT_DIM] float64 matrix (N(0, 1/width) entries; seeded, so every
        evaluation of an audit uses the same one). float64, so TF32 never rounds a fingerprint."""
        key = (width, str(device))
        if key not in self._proj:
            gen = torch.Generator().manual_seed(self.seed + 7919)
            proj = torch.randn(width, FINGERPRINT_DIM, generator=gen, dtype=torch.float64) / math.sqrt(width)
            self._proj[key] = proj.to(device)
        return self._proj[key]

    def _breach(self, position: int, what: str) -> None:
        if self.bad is None:
            self.bad = (position, what)

    def __call__(self, targets_at: torch.Tensor, logits: torch.Tensor, nll: torch.Tensor) -> None:
        with torch.no_grad():
            self._observe(targets_at.detach(), logits.detach(), nll.detach())
        self.calls += 1

    def _observe(self, targets_at, logits, nll) -> None:
        at = targets_at.reshape(-1).long().cpu()
        n = at.numel()
        first = int(at[0]) if n else -1
        if logits.ndim != 2 or logits.shape[0] != n or nll.reshape(-1).numel() != n:
            self._breach(first, f"observe got logits {tuple(logits.shape)} and nll {tuple(nll.shape)} for {n} "
                                f"targets (expected [{n}, {self.vocab_size}] and [{n}])")
            return
        nll = nll.reshape(-1)
        self.scores += n
        self.nll_sum += float(nll.double().sum())
        inside = (at >= 1) & (at < self.tokens.numel())
        if not bool(inside.all()):
            if self.outside is None:
                self.outside = int(at[~inside][0])
            at, logits, nll = at[inside], logits[inside.to(logits.device)], nll[inside.to(nll.device)]
            n = at.numel()
        width = logits.shape[1]
        if width != self.vocab_size and n:
            self._breach(int(at[0]), f"logits over {width} ids, the vocabulary has {self.vocab_size}")
        targets = self.tokens[at]
        proj = self.projection(width, logits.device)
        fingerprints, expected = [], []
        for lo in range(0, n, OBSERVE_ROWS):
            rows = logits[lo:lo + OBSERVE_ROWS].float()
            finite = torch.isfinite(rows).all(dim=1).cpu()
            if not bool(finite.all()):
                self._breach(int(at[lo:lo + OBSERVE_ROWS][~finite][0]), "logits not finite")
            logp = torch.log_softmax(rows, dim=-1)
            fingerprints.append((logp.double() @ proj).float().cpu())
            tgt = targets[lo:lo + OBSERVE_ROWS].to(rows.device)
            want = -logp.gather(1, tgt.clamp(max=width - 1)[:, None])[:, 0]
            expected.append(torch.where(tgt < width, want, torch.full_like(want, math.inf)).cpu())
        if n:
            scored = nll.float().cpu()
            expected = torch.cat(expected)
            error = (scored - expected).abs()
            error = torch.where(torch.isnan(error), torch.full_like(error, math.inf), error)
            self.max_nll_error = max(self.max_nll_error, float(error.max()))
            off = ~(error <= NLL_ATOL + NLL_RTOL * expected.abs())
            if bool(off.any()):
                k = int(off.nonzero()[0])
                self._breach(int(at[k]), f"its nll {float(scored[k]):.6g} is not -log_softmax(logits)[target] = "
                                         f"{float(expected[k]):.6g}")
        new = self.count[at] == 0
        self.count.index_add_(0, at, torch.ones(n, dtype=torch.int32))
        fresh = at[new]
        self.step[fresh] = self.calls
        if n:
            self.fingerprint[fresh] = torch.cat(fingerprints)[new]

    def changed(self, other: "Recorder") -> torch.Tensor:
        """Per target: how far other's predicted distribution is from this one's (the largest change of a
        fingerprint coordinate; inf where only one of them scored it; nan where neither did). Distributions,
        not scores: a replaced target token changes its score but must not change its distribution."""
        a, b = self.fingerprint, other.fingerprint
        diff = (a - b).abs().amax(dim=1)
        one_sided = torch.isnan(a).any(dim=1) ^ torch.isnan(b).any(dim=1)
        diff[one_sided] = math.inf
        return diff


# ---------------------------------------------------------------- the report

@dataclasses.dataclass
class Check:
    name: str
    passed: bool | None          # None: skipped (nothing to check)
    covered: str                 # what it checked
    problem: str = ""            # the first violation, when it failed
    first: int | None = None     # the first offending target position

    def line(self) -> str:
        status = "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"
        text = f"{status}  {self.name}: {self.covered}"
        return text + (f"; VIOLATION: {self.problem}" if self.problem else "")


@dataclasses.dataclass
class AuditReport:
    tokens: int
    vocab_size: int
    evaluations: int
    val_loss: float
    val_bpb: float
    checks: list[Check]
    atol: float = ATOL

    @property
    def ok(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def lines(self) -> list[str]:
        out = [f"legality audit: {self.tokens:,} tokens, {self.tokens - 1:,} targets, vocab {self.vocab_size:,}, "
               f"{self.evaluations} evaluations, tolerance {self.atol:g}; unperturbed val_loss {self.val_loss:.6f} "
               f"val_bpb {self.val_bpb:.6f}"]
        out += [c.line() for c in self.checks]
        if self.ok:
            out.append(f"legality: PASS ({len(self.checks)} checks)")
        else:
            out.append(f"legality: FAIL ({len(self.failed)} of {len(self.checks)} checks: "
                       + ", ".join(c.name for c in self.failed) + ")")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# ---------------------------------------------------------------- the audit

@dataclasses.dataclass
class _Run:
    """What one evaluation showed the observer, for the checks that look at every evaluation."""
    what: str
    loss: float
    mean: float                             # the observed nll's mean
    scores: int
    max_nll_error: float
    miscount: tuple[int, str] | None        # the first target not scored exactly once
    bad: tuple[int, str] | None             # the first breach of the distribution rules

    @classmethod
    def of(cls, what: str, rec: Recorder, loss: float) -> "_Run":
        n = rec.tokens.numel()
        miscount = None
        wrong = (rec.count[1:] != 1).nonzero()[:, 0]
        if rec.outside is not None:
            miscount = (rec.outside, f"scored position {rec.outside}, outside the targets 1..{n - 1}")
        elif wrong.numel():
            p = int(wrong[0]) + 1
            miscount = (p, f"target {p} scored {int(rec.count[p])} times ({wrong.numel():,} targets not scored "
                           f"exactly once)")
        return cls(what, loss, rec.nll_sum / rec.scores if rec.scores else math.nan, rec.scores, rec.max_nll_error,
                   miscount, rec.bad)


def _replace(tokens: torch.Tensor, where: torch.Tensor, vocab_size: int, bos_id: int,
             gen: torch.Generator) -> torch.Tensor:
    """A copy of tokens with every position in `where` (bool) given another random id that is not bos_id."""
    out = tokens.clone()
    idx = where.nonzero()[:, 0]
    orig = tokens[idx]
    new = torch.randint(0, vocab_size, (idx.numel(),), generator=gen)
    for _ in range(1000):
        redo = (new == orig) | (new == bos_id)
        if not bool(redo.any()):
            break
        new[redo] = torch.randint(0, vocab_size, (int(redo.sum()),), generator=gen)
    out[idx] = new
    return out


def _order(rec: Recorder) -> torch.Tensor:
    """The observe call that scored each target, never-scored ones last (float, inf)."""
    step = rec.step.double()
    step[rec.step < 0] = math.inf
    return step


def _pick_positions(tokens: torch.Tensor, bos_id: int, positions, rng: np.random.Generator) -> list[int]:
    """The context positions t to perturb after: given, or K drawn one from each of K equal stretches of
    the stream, among those whose next token is not a BOS (so target t+1 is among the replaced tokens)."""
    n = tokens.numel()
    if not isinstance(positions, int):
        chosen = [int(t) for t in positions]
        for t in chosen:
            if not 0 <= t <= n - 2:
                raise ValueError(f"position {t} is outside 0..{n - 2} (a context position with a target after it)")
        return chosen
    candidates = (tokens[1:] != bos_id).nonzero()[:, 0].numpy()  # t with token t+1 not a BOS
    if positions <= 0 or candidates.size == 0:
        return []
    return sorted({int(rng.choice(part)) for part in np.array_split(candidates, min(positions, candidates.size))})


def _documents(tokens: torch.Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(BOS position, end) of every document that starts at a BOS after position 0 and has a token besides it."""
    n = tokens.numel()
    starts = (tokens == bos_id).nonzero()[:, 0].tolist()
    ends = starts[1:] + [n]
    return [(b, e) for b, e in zip(starts, ends) if b >= 1 and e - b >= 2]


def _compare(name: str, covered: str, base: Recorder, other: Recorder, protected: torch.Tensor,
             atol: float) -> Check:
    """Fail when a protected target's distribution moved by more than atol."""
    diff = base.changed(other)
    scored = ~torch.isnan(diff)
    kept = protected & scored
    moved = kept & (diff > atol)
    reach = int((~protected & scored & (diff > atol)).sum())
    biggest = float(diff[kept].max()) if bool(kept.any()) else 0.0
    covered += f": {int(kept.sum()):,} targets that must not change (largest change {biggest:.3g}); " \
               f"{reach:,} other targets changed"
    if bool(moved.any()):
        p = int(moved.nonzero()[0])
        return Check(name, False, covered, f"target {p} (token id {int(base.tokens[p])}) changed by "
                                           f"{float(diff[p]):.3g}, though every replaced token lies at or after it "
                                           f"and none was scored before it", first=p)
    return Check(name, True if bool(kept.any()) else None, covered)


def audit(evaluate: Evaluate, val_tokens: torch.Tensor, vocab_size: int, *, positions: int | Sequence[int] = 3,
          later_doc: int | str | None = "auto", bos_id: int = 1, seed: int = 0, repeat: bool = True,
          atol: float = ATOL, log: Callable[[str], None] | None = None) -> AuditReport:
    """Audit one evaluation mode. evaluate(tokens, observe) runs a whole evaluation of the int64 token stream
    `tokens` (same length as val_tokens), calling observe(targets_at, logits, nll) for every batch it scores,
    and returns (val_loss, val_bpb) (or an object with .val_loss and .val_bpb).

    positions: how many context positions t to perturb after (drawn with `seed`, one per stretch of the
    stream), or the positions themselves. later_doc: the BOS position of the later document to perturb,
    "auto" (the one whose check covers the most targets) or None (no such check). repeat: evaluate the
    unperturbed tokens twice and check they agree. Each evaluation starts from torch.manual_seed(seed) with
    the caller's RNG state kept. log: called with a line per evaluation. See the module docstring."""
    tokens = torch.as_tensor(val_tokens).detach().cpu().long().reshape(-1)
    n = tokens.numel()
    if n < 3:
        raise ValueError(f"the audit needs at least 3 tokens, got {n}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"tokens hold ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    runs: list[_Run] = []  # what each evaluation showed, kept small (the recorders are dropped)

    def run(stream: torch.Tensor, what: str) -> tuple[Recorder, float, float]:
        rec = Recorder(stream, vocab_size, seed)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            result = evaluate(stream.clone(), rec)
        loss, bpb = (result.val_loss, result.val_bpb) if hasattr(result, "val_loss") else result
        runs.append(_Run.of(what, rec, float(loss)))
        if log is not None:
            log(f"evaluation {len(runs)} ({what}): val_loss {float(loss):.6f}, {rec.scores:,} scores in "
                f"{rec.calls} batches")
        return rec, float(loss), float(bpb)

    base, val_loss, val_bpb = run(tokens, "the val tokens")
    order = _order(base)
    targets = torch.arange(n)
    checks: list[Check] = []

    if repeat:
        again, _, _ = run(tokens, "the val tokens again")
        diff = base.changed(again)
        scored = ~torch.isnan(diff)
        moved = scored & (diff > atol)
        biggest = float(diff[scored].max()) if bool(scored.any()) else 0.0
        covered = f"the val tokens twice: {int(scored.sum()):,} distributions (largest change {biggest:.3g})"
        if bool(moved.any()):
            p = int(moved.nonzero()[0])
            checks.append(Check("repeatable", False, covered, f"target {p} changed by {float(diff[p]):.3g} with "
                                f"nothing perturbed: the evaluator is not repeatable within {atol:g}, so the "
                                f"causality checks below measure its noise", first=p))
        else:
            checks.append(Check("repeatable", True, covered))

    for t in _pick_positions(tokens, bos_id, positions, rng):
        now = order[t + 1]
        where = (targets > t) & (tokens != bos_id) & (order >= now)
        stream = _replace(tokens, where, vocab_size, bos_id, gen)
        rec, _, _ = run(stream, f"tokens after {t} replaced")
        protected = (targets >= 1) & (targets <= t + 1) & (order <= now)
        checks.append(_compare(f"causal after t={t}", f"{int(where.sum()):,} tokens after {t} replaced "
                               f"(document starts kept)", base, rec, protected, atol))

    docs = _documents(tokens, bos_id)
    if later_doc is not None:
        if later_doc == "auto":
            pick = docs[::max(1, -(-len(docs) // LATER_DOC_CANDIDATES))] + docs[-1:]
            best, best_cover = None, -1
            for b, e in pick:
                first_scored = float(order[b + 1:e].min())
                cover = int(((targets >= 1) & (targets <= b + 1) & (order <= first_scored)).sum())
                if cover > best_cover:
                    best, best_cover = (b, e), cover
        else:
            b = int(later_doc)
            best = next(((s, e) for s, e in docs if s == b), None)
            if best is None:
                raise ValueError(f"later_doc={later_doc}: not the BOS position of a document after the first one "
                                 f"with a token after its BOS (the stream's BOS positions: "
                                 f"{(tokens == bos_id).nonzero()[:, 0].tolist()[:8]}...)")
        if best is None:
            checks.append(Check("later document", None, "no document after the first (no BOS past position 0)"))
        else:
            b, e = best
            where = (targets > b) & (targets < e)
            stream = _replace(tokens, where, vocab_size, bos_id, gen)
            rec, _, _ = run(stream, f"document at {b} replaced")
            first_scored = order[b + 1:e].min()
            protected = (targets >= 1) & (targets <= b + 1) & (order <= first_scored)
            checks.append(_compare("later document", f"the {e - b - 1:,} tokens of the document at {b}..{e - 1} "
                                   f"replaced (its BOS kept)", base, rec, protected, atol))

    # every target once, in every evaluation
    bad = next(((k, r) for k, r in enumerate(runs, 1) if r.miscount is not None), None)
    checks.append(Check("scored once", bad is None, f"targets 1..{n - 1:,} in each of {len(runs)} evaluations",
                        "" if bad is None else f"evaluation {bad[0]} ({bad[1].what}): {bad[1].miscount[1]}",
                        first=None if bad is None else bad[1].miscount[0]))

    # a full distribution: the logits' width, finite, nll = -log_softmax(logits)[target]
    bad = next(((k, r) for k, r in enumerate(runs, 1) if r.bad is not None), None)
    scores = sum(r.scores for r in runs)
    covered = (f"{scores:,} scores: logits over all {vocab_size:,} ids, finite, nll = -log_softmax(logits)[target] "
               f"(largest error {max(r.max_nll_error for r in runs):.3g})")
    if bad is not None:
        checks.append(Check("full distribution", False, covered, f"evaluation {bad[0]} ({bad[1].what}), target "
                            f"{bad[1].bad[0]}: {bad[1].bad[1]}", first=bad[1].bad[0]))
    else:
        checks.append(Check("full distribution", scores > 0, covered,
                            "" if scores else "nothing was observed: does the evaluator call observe?"))

    # the reported loss is the observed scores' mean
    bad = next(((k, r) for k, r in enumerate(runs, 1)
                if not abs(r.loss - r.mean) <= LOSS_RTOL * max(1.0, abs(r.mean))), None)
    checks.append(Check("reported loss", bad is None,
                        f"val_loss = mean observed nll in each of {len(runs)} evaluations",
                        "" if bad is None else f"evaluation {bad[0]} ({bad[1].what}) reported val_loss "
                        f"{bad[1].loss:.8g}, its observed scores average {bad[1].mean:.8g}: it sums scores it does "
                        f"not show"))
    return AuditReport(tokens=n, vocab_size=vocab_size, evaluations=len(runs), val_loss=val_loss, val_bpb=val_bpb,
                       checks=checks, atol=atol)


# ---------------------------------------------------------------- the modes

def _sliding(model, cfg, luts, *, device, val_bytes=None) -> Evaluate:
    """The reported sliding-window evaluation: windows of EVAL_SEQ_LEN every EVAL_STRIDE (train.evaluate.validate)."""
    from train.evaluate import validate

    return lambda tokens, observe: validate(
        model, model, tokens, luts, seq_len=cfg.eval_seq_len, stride=cfg.eval_stride, batch_seqs=cfg.eval_batch_seqs,
        device=device, mode="sliding", val_bytes=val_bytes, observe=observe)


def _doc(model, cfg, luts, *, device, val_bytes=None) -> Evaluate:
    """The document-isolated evaluation (EVAL_MODE=doc)."""
    from train.evaluate import validate

    return lambda tokens, observe: validate(
        model, model, tokens, luts, seq_len=cfg.eval_seq_len, stride=None, batch_seqs=cfg.eval_batch_seqs,
        device=device, mode="doc", val_bytes=val_bytes, observe=observe)


def _ttt(model, cfg, luts, *, device, val_bytes=None) -> Evaluate:
    """Test-time training: train.ttt.evaluate_ttt, imported here (the module may not exist yet)."""
    try:
        from train.ttt import evaluate_ttt
    except ModuleNotFoundError as err:
        if err.name != "train.ttt":
            raise
        raise ModeUnavailable("--mode ttt needs train/ttt.py (train.ttt.evaluate_ttt), which this checkout "
                              "does not have") from None
    except ImportError as err:
        raise ModeUnavailable(f"--mode ttt: train.ttt has no evaluate_ttt ({err})") from None

    def evaluate(tokens, observe):
        result = evaluate_ttt(model, tokens, luts, cfg, device=device, val_bytes=val_bytes, observe=observe)
        return result.val_loss, result.val_bpb
    return evaluate


# mode -> builder(model, cfg, luts, *, device, val_bytes) -> evaluate(tokens, observe) -> (val_loss, val_bpb)
MODES: dict[str, Callable[..., Evaluate]] = {"sliding": _sliding, "doc": _doc, "ttt": _ttt}


def evaluator(mode: str, model: torch.nn.Module, cfg, luts, *, device, val_bytes=None) -> Evaluate:
    """MODES[mode]'s evaluate, each call starting from the model's weights as they are now (an evaluation
    that trains, as TTT does, changes them)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {sorted(MODES)}")
    inner = MODES[mode](model, cfg, luts, device=device, val_bytes=val_bytes)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training

    def evaluate(tokens, observe):
        with torch.no_grad():
            model.load_state_dict(weights)
        model.train(was_training)
        return inner(tokens, observe)
    return evaluate


# ---------------------------------------------------------------- the command line

def keep_whole_documents(tokens: torch.Tensor, max_tokens: int, bos_id: int = 1) -> torch.Tensor:
    """The first max_tokens tokens (0: all), cut before the last BOS inside them when there is one after
    position 0 (so the stream ends at the end of a document)."""
    if max_tokens <= 0 or tokens.numel() <= max_tokens:
        return tokens
    head = tokens[:max_tokens + 1]  # a BOS right after the cut still ends the last document there
    starts = (head[1:] == bos_id).nonzero()[:, 0]
    return tokens[:int(starts[-1]) + 1] if starts.numel() else tokens[:max_tokens]


def load_val(path: str | Path, max_tokens: int, bos_id: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(tokens int64, byte sidecar counts or None, what was read) from a val shard or a folder of them,
    reading only the shards the first max_tokens tokens need."""
    from train.data import load_shard, load_val_bytes, shard_paths

    path = Path(path)
    paths = [path] if path.is_file() else shard_paths(path, "val")
    parts, used, total = [], [], 0
    for p in paths:
        part = load_shard(p)
        take = part if max_tokens <= 0 else part[:max_tokens + 1 - total]
        parts.append(np.asarray(take, dtype=np.int64))
        used.append(p)
        total += parts[-1].size
        if 0 < max_tokens < total:
            break
    tokens = keep_whole_documents(torch.from_numpy(np.concatenate(parts)), max_tokens, bos_id)
    # a shard not named *_val_* has no sidecar (sidecar_paths would take the shard itself for one)
    val_bytes = load_val_bytes(used, tokens.numel()) if all("_val_" in p.name for p in used) else None
    what = f"{len(used)} val shard{'s' if len(used) > 1 else ''} under {path if path.is_dir() else path.parent}"
    return tokens, val_bytes, what


def _luts(cfg):
    """The run's byte tables from its tokenizer; else 1 byte per token (val_bpb then is not the metric)."""
    from train.evaluate import build_byte_luts
    from train.trainer import load_tokenizer

    try:
        return build_byte_luts(load_tokenizer(cfg), cfg.vocab_size), f"bytes from {cfg.tokenizer_path}"
    except (FileNotFoundError, ValueError) as err:
        v = cfg.vocab_size
        unit = (torch.ones(v, dtype=torch.int16), torch.zeros(v, dtype=torch.bool), torch.zeros(v, dtype=torch.bool))
        return unit, f"1 byte per token (no tokenizer: {err}; val_bpb is not the metric, the checks do not use it)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.legality", description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True, help="the run's artifact (runs/<id>/final_model.int6.ptz)")
    parser.add_argument("--mode", choices=tuple(MODES), help="the evaluation to audit (default: the run's EVAL_MODE)")
    parser.add_argument("--val", help="a val shard, or the folder of the val shards (default: the run's DATA_PATH)")
    parser.add_argument("--max-tokens", type=int, default=65_536,
                        help="audit the first N val tokens, cut to whole documents (0: all; default 65,536)")
    parser.add_argument("--positions", type=int, default=3, help="context positions t to perturb after (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="picks the positions and the replacement ids")
    parser.add_argument("--atol", type=float, default=ATOL, help=f"largest change counted as none (default {ATOL:g})")
    parser.add_argument("--no-repeat", action="store_true", help="skip the second unperturbed evaluation")
    parser.add_argument("--bos-id", type=int, default=1)
    args = parser.parse_args(argv)

    from quant.load import load_model

    import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.max_tokens < 0 or args.positions < 0 or not args.atol >= 0:
            raise ValueError("--max-tokens, --positions and --atol must not be negative")
        kernels.backend()  # a bad KERNELS is bad input (kernels.BackendError is a ValueError)
        model, cfg = load_model(args.artifact, device=device)
        mode = args.mode or cfg.eval_mode
        tokens, val_bytes, source = load_val(args.val or cfg.data_path, args.max_tokens, args.bos_id)
        luts, bytes_from = _luts(cfg)
        evaluate = evaluator(mode, model, cfg, luts, device=device, val_bytes=val_bytes)
        if tokens.numel() < 3 or int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"{source}: {tokens.numel()} tokens with ids up to {int(tokens.max())}; the audit needs "
                             f"at least 3 tokens with ids below the vocabulary's {cfg.vocab_size}")
    except (FileNotFoundError, ValueError) as err:  # ArtifactError, ConfigError, ShardError, ModeUnavailable
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"legality: {args.artifact}, mode {mode} (seq_len {cfg.eval_seq_len}"
          + (f", stride {cfg.eval_stride}" if mode == "sliding" else "") + f") on {device}: {tokens.numel():,} "
          f"tokens from {source}; {bytes_from}", flush=True)
    report = audit(evaluate, tokens, cfg.vocab_size, positions=args.positions, bos_id=args.bos_id, seed=args.seed,
                   repeat=not args.no_repeat, atol=args.atol, log=lambda line: print(line, flush=True))
    print(report, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
