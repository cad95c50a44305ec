"""`python -m quant.records`: the folder a pull request to the challenge adds, and the seeds' statistics.

    python -m quant.records export --run runs/<id> [--run ...] --name NAME [--track 10min|non_record]
                                   [--out DIR] [--author A --github-id G --blurb B] [--baseline LOG ...]
    python -m quant.records check FOLDER [--data-path P --tokenizer-path P]      (quant/records_check.py)
    python -m quant.records stats LOG ... [--baseline LOG ...]

export writes DIR/<track dir>/<YYYY-MM-DD>_<NAME>/ (DIR default: records/ at the repository root):
train_gpt.py (the one-file bundle of the counted packages, quant/bundle.py), submission.json, README.md,
requirements.txt and each seed's train.log copied verbatim as train_seed<N>.log. It writes them into
.<YYYY-MM-DD>_<NAME>.partial-<pid> beside that folder and renames it when complete, so a killed export leaves
no records folder, and the next export removes the partial one once its process is gone. Every run must have
finished, export step included, with the same configuration apart from SEED and a seed of its own. The
code bytes counted are the bundle's, for every seed. Each seed's artifact (runs/<id>/final_model.int6.ptz) is
accounted for by quant.ledger: its bytes by kind of stored value (bits per value, share of the parts' sum, each
kind compressed alone) go into README.md and submission.json's bytes_by_kind. author and github_id come from
the flags or the AUTHOR / GITHUB_ID environment variables; a missing one stays "" with a warning (never guessed).

stats reads each log's last `final_int6_<mode>_exact` line (the artifact's score: sliding_window, doc_isolated,
or with TTT_ENABLED=1 ttt_phased, whose eval time is the whole eval clock (decompression, dequantization, compile
warmup and the TTT loop) and goes into eval_time_s): mean and sample
std of val_loss and val_bpb and, against baseline logs, one-sided Welch t-tests of the improvement, for
the challenge's ">= 0.005 nats at p < 0.01" rule (in bpb too, at the candidate runs' own tokens per
byte) and as a plain difference. scipy is imported for this alone; no run imports this module.

Exit status: 0 done, 2 bad input (the message names the run or log and says what is wrong).
"""
from __future__ import annotations

import argparse
import datetime
import errno
import importlib.metadata
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from model.io import write_atomic

from .artifact import ARTIFACT_NAME, SIZE_LIMIT, ArtifactError
from .export import TIME_LIMIT_SECONDS

REPO = Path(__file__).resolve().parents[1]
TRACKS = {"10min": "track_10min_16mb", "non_record": "track_non_record_16mb"}
RULE_NATS = 0.005  # a new record must beat the last by at least this much val_loss ...
RULE_P = 0.01      # ... at this significance
REQUIREMENTS = ("torch", "triton", "numpy", "sentencepiece", "brotli", "constriction")
# config.json fields that say where a run was written, not how it trained
NOT_TRAINING = ("seed", "run_id", "runs_dir", "dry_run")
# left out of the README's command: SEED and PRESET are written first, paths are the reader's own
NOT_IN_COMMAND = ("SEED", "PRESET", "RUN_ID", "RUNS_DIR", "DRY_RUN", "DATA_PATH", "TOKENIZER_PATH")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# What a complete records folder holds besides its train_seed<N>.log files; submission.json is written last
FOLDER_FILES = ("train_gpt.py", "requirements.txt", "README.md", "submission.json")
# The folder an export writes before renaming it to its final name; the pid says whose it is
PARTIAL = re.compile(r"\..+\.partial-(?P<pid>\d+)")

# the artifact's score line, in either evaluation mode (train.evaluate.SCORE_NAMES)
# (with TTT_ENABLED=1 the test-time-trained score's line comes last: it is the run's score)
EXACT_LINE = re.compile(r"^final_int6_(?:sliding_window|doc_isolated|ttt_phased)_exact val_loss:(\S+) val_bpb:(\S+)\s*$",
                        re.M)
VERSIONS_LINE = re.compile(r"^versions: torch:(\S+) triton:(\S+) cuda:(\S+) gpu:(.+?)\s*$", re.M)


class RecordsError(ValueError):
    """A run or log that cannot go into a record; the message names it and says why."""


# ----------------------------------------------------------------------------------------------
# Reading runs and logs


def exact_score(log_text: str, where: str) -> tuple[float, float]:
    """(val_loss, val_bpb) of the log's last final_int6_<mode>_exact line: the run's score (TTT's when on)."""
    found = EXACT_LINE.findall(log_text)
    if not found:
        raise RecordsError(f"{where}: no `final_int6_sliding_window_exact val_loss:... val_bpb:...` line "
                           "(the export step of `python -m train` logs it after scoring the artifact)")
    loss, bpb = found[-1]
    return float(loss), float(bpb)


def logged_versions(log_text: str) -> dict | None:
    """{torch, triton, cuda (None if none), gpu} from the log's versions line, or None without one."""
    found = VERSIONS_LINE.search(log_text)
    if found is None:
        return None
    torch_v, triton_v, cuda, gpu = found.groups()
    return dict(torch=torch_v, triton=triton_v, cuda=None if cuda == "none" else cuda, gpu=gpu)


def installed_versions() -> dict:
    """The same keys as logged_versions, for this interpreter (a log from before the versions line)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(torch=importlib.metadata.version("torch"), triton=importlib.metadata.version("triton"),
                cuda=torch.version.cuda, gpu=gpu)


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordsError(f"{where}: cannot read {path.name}: {err}") from None


@dataclass(frozen=True)
class Run:
    """One finished run folder, as a record uses it."""
    folder: Path
    summary: dict
    config: dict
    log: str
    val_loss: float  # the artifact's score, as its train.log states it (8 decimals)
    val_bpb: float

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def export(self) -> dict:
        return self.summary["export"]

    @property
    def train_plus_calibration_s(self) -> float:
        return self.summary["train_time_ms"] / 1000 + self.export["calibration_seconds"]

    @property
    def versions(self) -> dict:
        return logged_versions(self.log) or installed_versions()


EXPORT_KEYS = ("model_bytes", "calibration_seconds", "roundtrip_val_bpb", "roundtrip_eval_seconds")


def read_run(folder) -> Run:
    """The run in `folder`; RecordsError if it is not a finished run with an exported artifact."""
    folder = Path(folder)
    where = f"run {folder}"
    missing = [name for name in ("summary.json", "train.log", "config.json") if not (folder / name).is_file()]
    if missing:
        raise RecordsError(f"{where}: no {' or '.join(missing)} (not a run folder, or the run has not finished)")
    summary = _read_json(folder / "summary.json", where)
    if summary.get("status") != "finished" or "error" in summary:
        why = summary.get("error") or f"status {summary.get('status')!r}"
        raise RecordsError(f"{where}: the run did not finish ({why})")
    export = summary.get("export") or {}
    absent = [key for key in EXPORT_KEYS if key not in export]
    if absent:
        raise RecordsError(f"{where}: summary.json has no export.{absent[0]}: the run's export step did not "
                           "finish (or ran before this version of the trainer); a record needs its artifact")
    config = _read_json(folder / "config.json", where)
    if "seed" not in config:
        raise RecordsError(f"{where}: config.json has no seed")
    log = (folder / "train.log").read_text()
    return Run(folder, summary, config, log, *exact_score(log, f"{where}/train.log"))


def check_runs(runs: list[Run]) -> None:
    """Seeds of one configuration: the same config.json apart from SEED (and where it was written), the
    same world size, every seed once."""
    if not runs:
        raise RecordsError("no runs given (--run runs/<id>, once per seed)")
    seeds = [run.seed for run in runs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise RecordsError(f"SEED={repeated[0]} is the seed of more than one run "
                           f"({', '.join(str(r.folder) for r in runs if r.seed == repeated[0])}): one run per seed")
    first = runs[0]
    for run in runs[1:]:
        a = {**first.config, "world_size": first.summary.get("world_size")}
        b = {**run.config, "world_size": run.summary.get("world_size")}
        differ = sorted(k for k in set(a) | set(b) if k not in NOT_TRAINING and a.get(k) != b.get(k))
        if differ:
            raise RecordsError(f"runs {first.folder} and {run.folder} differ in more than SEED: "
                               + ", ".join(f"{k.upper()}={a.get(k)!r} vs {b.get(k)!r}" for k in differ))


# ----------------------------------------------------------------------------------------------
# Statistics


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class Scores:
    """The artifact scores of a set of seeds, one per log."""
    logs: tuple[str, ...]
    val_loss: tuple[float, ...]
    val_bpb: tuple[float, ...]

    @classmethod
    def from_logs(cls, paths) -> "Scores":
        pairs = []
        for path in paths:
            try:
                text = Path(path).read_text()
            except OSError as err:
                raise RecordsError(f"log {path}: {err.strerror or err}") from None
            pairs.append(exact_score(text, f"log {path}"))
        return cls(tuple(map(str, paths)), tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @property
    def bpb_per_nat(self) -> float:
        """val_bpb / val_loss = tokens per byte / ln 2, from these runs' own numbers."""
        return statistics.fmean(b / l for l, b in zip(self.val_loss, self.val_bpb))


def welch_greater(worse, better, margin: float = 0.0) -> dict | None:
    """One-sided Welch t-test of mean(worse) - mean(better) > margin: {t, df, p}; None with fewer than two
    values on a side (no variance to test against)."""
    if len(worse) < 2 or len(better) < 2:
        return None
    import numpy as np
    from scipy import stats

    res = stats.ttest_ind(np.asarray(worse, dtype=np.float64) - margin, np.asarray(better, dtype=np.float64),
                          equal_var=False, alternative="greater")
    return dict(t=float(res.statistic), df=float(res.df), p=float(res.pvalue))


def compare_scores(candidate: Scores, baseline: Scores) -> dict:
    """The candidate's improvement over the baseline (positive = lower loss) with its one-sided Welch
    tests: `rule_*` tests improvement > RULE_NATS (in bpb: RULE_NATS at the candidate's own tokens per
    byte), `plain_*` tests improvement > 0."""
    margin_bpb = RULE_NATS * candidate.bpb_per_nat
    rule = welch_greater(baseline.val_loss, candidate.val_loss, RULE_NATS)
    return dict(
        improvement_loss=statistics.fmean(baseline.val_loss) - statistics.fmean(candidate.val_loss),
        improvement_bpb=statistics.fmean(baseline.val_bpb) - statistics.fmean(candidate.val_bpb),
        tokens_per_byte=candidate.bpb_per_nat * math.log(2), margin_nats=RULE_NATS, margin_bpb=margin_bpb,
        rule_loss=rule, rule_bpb=welch_greater(baseline.val_bpb, candidate.val_bpb, margin_bpb),
        plain_loss=welch_greater(baseline.val_loss, candidate.val_loss),
        plain_bpb=welch_greater(baseline.val_bpb, candidate.val_bpb),
        passes=rule is not None and rule["p"] < RULE_P)


def _spread(values) -> str:
    mean, std = mean_std(values)
    return f"{mean:.8f}" + (f" ± {std:.8f}" if std is not None else " (one seed: no std)")


def _test(result: dict | None) -> str:
    if result is None:
        return "no test (needs at least 2 seeds on each side)"
    return f"t={result['t']:.3f} df={result['df']:.2f} p={result['p']:.3g}"


def stats_lines(candidate: Scores, baseline: Scores | None = None) -> list[str]:
    """What `stats` prints (and export's README quotes)."""
    lines = [f"seeds: {len(candidate.logs)}  val_loss {_spread(candidate.val_loss)}  "
             f"val_bpb {_spread(candidate.val_bpb)}"]
    if baseline is None:
        return lines
    c = compare_scores(candidate, baseline)
    lines += [
        f"baseline seeds: {len(baseline.logs)}  val_loss {_spread(baseline.val_loss)}  "
        f"val_bpb {_spread(baseline.val_bpb)}",
        f"improvement (one-sided Welch t-tests): val_loss {c['improvement_loss']:+.8f} nats ({_test(c['plain_loss'])})"
        f"  val_bpb {c['improvement_bpb']:+.8f} ({_test(c['plain_bpb'])})",
        f"rule: improvement >= {RULE_NATS} nats at p < {RULE_P}: {_test(c['rule_loss'])} -> "
        + ("passes" if c["passes"] else "does not pass"),
        f"rule in bpb: {RULE_NATS} nats = {c['margin_bpb']:.6f} bpb at these runs' {c['tokens_per_byte']:.6f} "
        f"tokens per byte: {_test(c['rule_bpb'])}",
    ]
    return lines


# ----------------------------------------------------------------------------------------------
# The records folder


def bytes_by_kind(run: Run, code: int) -> list[dict] | None:
    """The run's artifact by kind of stored value, as `python -m quant.inspect` accounts for it (quant/ledger.py):
    [{kind, values, bytes (compressed alone), bits_per_value, share (of the parts' sum)}]; for an OUROPTZ
    artifact its categories and header, for a per-group one its kinds. None when the run folder has no artifact."""
    from .ledger import CATEGORIES, build_ledger

    path = run.folder / ARTIFACT_NAME
    if not path.is_file():
        return None
    try:
        led = build_ledger(path, project=False, code=code)
    except ArtifactError as err:
        raise RecordsError(f"run {run.folder}: {err}") from None
    rows = ([(label, n, size) for _, label, n, size in led.kinds] or
            [(label, led.values[k], led.bytes[k]) for k, label, _ in CATEGORIES] + [("header", 0, led.bytes["header"])])
    alone = sum(size for *_, size in rows)
    return [dict(kind=label, values=n, bytes=size, bits_per_value=round(8 * size / n, 4) if n else None,
                 share=round(size / alone, 4)) for label, n, size in rows]


def eval_seconds(export: dict) -> float:
    """The evaluation time a record reports: with TTT the eval clock's total (everything the score needs after
    training), else reading the artifact back and scoring it."""
    return export["eval_clock"]["total_s"] if "eval_clock" in export else export["roundtrip_eval_seconds"]


def submission(runs: list[Run], bundle: bytes, *, name: str, track: str, author: str, github_id: str,
               blurb: str, date: str, kinds: dict | None = None) -> dict:
    """submission.json: the keys recent accepted records use; each seed's total counts this bundle. kinds:
    {seed: bytes_by_kind(...)}, written as bytes_by_kind when given."""
    versions = runs[0].versions
    seed_results = {str(run.seed): dict(
        val_loss=run.val_loss, val_bpb=run.val_bpb, artifact_bytes=run.export["model_bytes"] + len(bundle),
        steps=run.summary["steps"], step_avg_ms=run.summary["step_avg_ms"],
        train_time_s=round(run.train_plus_calibration_s, 3),
        eval_time_s=round(eval_seconds(run.export), 3)) for run in runs}
    loss, loss_std = mean_std(run.val_loss for run in runs)
    bpb, bpb_std = mean_std(run.val_bpb for run in runs)
    train_max = max(r["train_time_s"] for r in seed_results.values())
    return dict(
        author=author, github_id=github_id, name=name, blurb=blurb, date=date,
        track=TRACKS[track].removeprefix("track_"),
        val_loss=round(loss, 8), val_bpb=round(bpb, 8),
        val_loss_std=None if loss_std is None else round(loss_std, 8),
        val_bpb_std=None if bpb_std is None else round(bpb_std, 8),
        seeds=[run.seed for run in runs], seed_results=seed_results,
        bytes_total=max(r["artifact_bytes"] for r in seed_results.values()), bytes_code=len(bundle),
        hardware=f"{runs[0].summary['world_size']}x {versions['gpu']}",
        pytorch_version=versions["torch"], triton_version=versions["triton"], cuda_version=versions["cuda"],
        compliance=dict(train_time_max_s=train_max,
                        eval_time_max_s=max(r["eval_time_s"] for r in seed_results.values()),
                        gptq_within_budget=train_max <= TIME_LIMIT_SECONDS),
        **({"bytes_by_kind": {str(seed): rows for seed, rows in kinds.items()}} if kinds else {}))


def requirements_text(versions: dict) -> str:
    """requirements.txt: torch and triton as the run logged them, the rest as installed here."""
    pins = dict(torch=versions["torch"].split("+")[0], triton=versions["triton"])
    lines = [f"# torch and triton as the run used them (train.log's versions line: torch {versions['torch']}, "
             f"CUDA {versions['cuda'] or 'none'}); the others as installed where the record was exported"]
    for package in REQUIREMENTS:
        if package not in pins:
            try:
                pins[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pins[package] = None
        lines.append(package if pins[package] is None else f"{package}=={pins[package]}")
    return "\n".join(lines) + "\n"


def run_command(config: dict, world_size: int) -> str:
    """The command that trains one seed from the folder: the settings that differ from the preset's."""
    from model.config import Config, from_env

    cfg = Config.from_dict(config)
    preset = from_env(environ={}, preset=cfg.preset).env_dict()
    changed = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.env_dict().items()
               if k not in NOT_IN_COMMAND and v != preset[k]]
    launch = "python train_gpt.py" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py"
    return " ".join([f"SEED=<seed> PRESET={cfg.preset}", *changed, launch])


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}" + (plural if n != 1 else "")


def readme_text(sub: dict, runs: list[Run], stats: list[str] | None) -> str:
    """README.md of the records folder, from the runs."""
    first = runs[0]
    cfg = first.config
    world_size = first.summary["world_size"]
    code = sub["bytes_code"]
    step_avgs = [run.summary["step_avg_ms"] for run in runs]
    rows = [f"| {s} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | {r['steps']} | "
            f"{r['step_avg_ms']:.2f} | {r['train_time_s']:.1f} | {r['eval_time_s']:.1f} |"
            for s, r in sub["seed_results"].items()]
    std = "" if sub["val_bpb_std"] is None else f" ± {sub['val_bpb_std']:.8f}"
    lines = [
        f"# {sub['name']}", "",
        *([sub["blurb"], ""] if sub["blurb"] else []),
        f"The Ouroboros stack (Triton kernels, model, training loop and int6 quantizer) as one file, "
        f"`train_gpt.py`, trained with the `{cfg['preset']}` preset: {first.summary['params']:,} parameters, "
        + (f"{cfg['num_flat_layers']} flat transformer blocks around one shared block looped "
           f"{cfg['crawler_loops']} times" if cfg.get("use_crawler", 1) else
           f"{cfg['num_layers']} blocks with {cfg['loop_start']}..{cfg['loop_end']} looped {cfg['num_loops']} more "
           f"times") + f", model dim {cfg['model_dim']}, vocabulary {cfg['vocab_size']}; the "
        f"artifact is `{cfg['quant_method']}`-quantized in the `{cfg.get('compressor', 'ouroptz')}` container. "
        f"{_count(len(runs), 'seed')} on {sub['hardware']} "
        f"(torch {sub['pytorch_version']}, triton {sub['triton_version']}, CUDA {sub['cuda_version'] or 'none'}).",
        "",
        f"**val_bpb {sub['val_bpb']:.8f}{std}** (val_loss {sub['val_loss']:.8f}): the artifact read back and "
        + ("scored with phased LoRA test-time training, every chunk scored before the adapters learn from it "
           "(`final_int6_ttt_phased_exact` in each log; its eval time is the whole eval clock: decompression, "
           "dequantization, compile warmup and the TTT loop)." if cfg.get("ttt_enabled") else
           f"scored with attention cut at every document start and every {cfg['eval_seq_len']} tokens "
           f"(`final_int6_doc_isolated_exact` in each log)." if cfg.get("eval_mode") == "doc" else
           f"scored with sliding windows of {cfg['eval_seq_len']} tokens, stride {cfg['eval_stride']} "
           f"(`final_int6_sliding_window_exact` in each log)."), "",
        "## Command", "",
        f"For each seed, from this folder, with DATA_PATH and TOKENIZER_PATH set to the shards and tokenizer "
        f"(the runs used `{cfg['data_path']}` and `{cfg['tokenizer_path']}`) and RUNS_DIR to where runs/<id>/ "
        "goes:", "",
        "```", run_command(cfg, world_size), "```", "",
        "## Seeds", "",
        "| seed | val_loss | val_bpb | artifact bytes | steps | step_avg ms | train + calibration s | eval s |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "## Sizes", "",
        f"`train_gpt.py` is {code:,} B, the code counted for every seed. Artifact (model) bytes: "
        + ", ".join(f"seed {run.seed} {run.export['model_bytes']:,} B" for run in runs)
        + f"; the largest total is {sub['bytes_total']:,} B, {SIZE_LIMIT - sub['bytes_total']:,} B under "
          f"the {SIZE_LIMIT:,} B limit.", "",
        *kind_lines(sub.get("bytes_by_kind") or {}),
        "## Step time", "",
        f"{statistics.fmean(step_avgs):.2f} ms per step on average (seeds: "
        + ", ".join(f"{v:.2f}" for v in step_avgs) + f" ms), {first.summary['tokens_per_step']:,} tokens "
        f"per step on {_count(world_size, 'process', 'es')}; training + calibration at most "
        f"{sub['compliance']['train_time_max_s']:.1f} s and evaluation at most "
        f"{sub['compliance']['eval_time_max_s']:.1f} s, against {TIME_LIMIT_SECONDS} s each.", "",
    ]
    if stats:
        lines += ["## Against the baseline", "", "```", *stats, "```", ""]
    return "\n".join(lines)


def kind_lines(kinds: dict) -> list[str]:
    """README.md's table of submission.json's bytes_by_kind ([] without one)."""
    if not kinds:
        return []
    rows = [f"| {seed} | {r['kind']} | {r['values']:,} | {r['bytes']:,} | "
            f"{'' if r['bits_per_value'] is None else format(r['bits_per_value'], '.3f')} | {r['share']:.2%} |"
            for seed, table in kinds.items() for r in table]
    return ["Each artifact by kind of stored value (`python -m quant.inspect`; each kind compressed alone, its share "
            "of their sum):", "", "| seed | kind | values | bytes alone | bits/value | share |",
            "|---|---|---|---|---|---|", *rows, ""]


def missing_files(folder: Path) -> list[str]:
    """What `folder` lacks of a complete records folder (FOLDER_FILES and at least one seed's log)."""
    missing = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    if not any(folder.glob("train_seed*.log")):
        missing.insert(1, "train_seed<N>.log")
    return missing


def refuse_existing(folder: Path) -> None:
    """RecordsError if `folder` holds anything: an export is never written over another, finished or not."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    missing = missing_files(folder)
    if missing:
        raise RecordsError(f"{folder} exists but is not a complete export (no {', '.join(missing)}), e.g. one "
                           "killed while writing it: remove it and export again")
    raise RecordsError(f"{folder} already exists: choose another --name or remove it")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # an earlier process with our pid (in a container, every run may be pid 1)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_partial_exports(parent: Path, warn=print) -> None:
    """Remove the .<name>.partial-<pid> folders in `parent` whose process is gone (exports killed before
    they completed); those of live processes, which may be writing them, are left alone."""
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        found = PARTIAL.fullmatch(path.name)
        if found is None or not path.is_dir():
            continue
        if _alive(int(found["pid"])):
            warn(f"left {path} alone: process {found['pid']}, which may be exporting into it, is running")
            continue
        shutil.rmtree(path)
        warn(f"removed {path}: an unfinished export (killed before it completed)")


def export_records(runs, name: str, track: str, out, bundle: bytes, *, author: str | None = None,
                   github_id: str | None = None, blurb: str = "", baseline=None, date: str | None = None,
                   warn=print) -> Path:
    """Write out/<track dir>/<date>_<name>/ from the run folders `runs` (one per seed) and the bundle's
    bytes (train_gpt.py). author/github_id None: from AUTHOR/GITHUB_ID, else "" with a warning.
    baseline: log paths to test the improvement against (README.md). warn: prints the warnings and each
    partial folder of a killed export that this one removes. Returns the folder."""
    if not SAFE_NAME.fullmatch(name):
        raise RecordsError(f"--name {name!r}: use letters, digits and . _ + - only (it names a folder)")
    if track not in TRACKS:
        raise RecordsError(f"--track {track!r}: choose one of {', '.join(TRACKS)}")
    records = [read_run(folder) for folder in runs]
    check_runs(records)
    date = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    folder = Path(out) / TRACKS[track] / f"{date}_{name}"
    refuse_existing(folder)
    author = os.environ.get("AUTHOR", "") if author is None else author
    github_id = os.environ.get("GITHUB_ID", "") if github_id is None else github_id
    for key, value, flag, env in (("author", author, "--author", "AUTHOR"),
                                  ("github_id", github_id, "--github-id", "GITHUB_ID")):
        if not value:
            warn(f"warning: no {key}: submission.json keeps \"\" (pass {flag} or set {env})")
    stats = None
    if baseline:
        stats = stats_lines(Scores.from_logs([run.folder / "train.log" for run in records]),
                            Scores.from_logs(baseline))
    kinds = {run.seed: bytes_by_kind(run, len(bundle)) for run in records}
    for run in records:
        if kinds[run.seed] is None:
            warn(f"warning: run {run.folder} has no {ARTIFACT_NAME}: no bytes by kind for seed {run.seed}")
    sub = submission(records, bundle, name=name, track=track, author=author, github_id=github_id,
                     blurb=blurb, date=date, kinds={s: rows for s, rows in kinds.items() if rows is not None})
    if track == "10min" and max(sub["compliance"]["train_time_max_s"], sub["compliance"]["eval_time_max_s"]) \
            > TIME_LIMIT_SECONDS:
        warn(f"warning: training + calibration or evaluation took over {TIME_LIMIT_SECONDS} s: this is no "
             "10-minute-track record (--track non_record)")
    if sub["bytes_total"] > SIZE_LIMIT:
        warn(f"warning: {sub['bytes_total']:,} B is over the {SIZE_LIMIT:,} B limit")
    remove_partial_exports(folder.parent, warn)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True)
    try:
        write_atomic(partial / "train_gpt.py", bundle)
        for run in records:
            write_atomic(partial / f"train_seed{run.seed}.log", (run.folder / "train.log").read_bytes())
        write_atomic(partial / "requirements.txt", requirements_text(records[0].versions))
        write_atomic(partial / "README.md", readme_text(sub, records, stats))
        write_atomic(partial / "submission.json", json.dumps(sub, indent=2) + "\n")
        try:
            os.rename(partial, folder)  # replaces an empty folder, never one with files
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            refuse_existing(folder)  # another export finished first
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.records", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the records folder of one or more seeds' runs")
    ex.add_argument("--run", action="append", required=True, metavar="runs/<id>", help="a finished run; once per seed")
    ex.add_argument("--name", required=True, help="the folder's name after its date")
    ex.add_argument("--track", choices=tuple(TRACKS), default="10min")
    ex.add_argument("--out", default=str(REPO / "records"), help="where the track folders go (default: records/)")
    ex.add_argument("--author", help="default: $AUTHOR")
    ex.add_argument("--github-id", help="default: $GITHUB_ID")
    ex.add_argument("--blurb", default="", help="one or two sentences for submission.json and README.md")
    ex.add_argument("--baseline", nargs="+", metavar="LOG", help="the previous record's logs: the README tests against them")
    st = sub.add_parser("stats", help="mean and std of the logs' scores; Welch t-tests against a baseline")
    st.add_argument("logs", nargs="+", metavar="LOG")
    st.add_argument("--baseline", nargs="+", metavar="LOG")
    # check parses its own arguments (quant/records_check.py), --help included
    sub.add_parser("check", add_help=False, help="run a records folder's train_gpt.py alone and check it")
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        from quant.records_check import main as check_main

        return check_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "stats":
            baseline = Scores.from_logs(args.baseline) if args.baseline else None
            print("\n".join(stats_lines(Scores.from_logs(args.logs), baseline)))
            return 0
        from quant.bundle import build_bundle

        folder = export_records(args.run, args.name, args.track, args.out, build_bundle(), author=args.author,
                                github_id=args.github_id, blurb=args.blurb, baseline=args.baseline,
                                warn=lambda line: print(line, file=sys.stderr))
    except RecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"records: wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
