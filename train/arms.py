"""`python -m train.arms FILE.toml`: an ablation, arms x seeds, each run its own `python -m train`, and its report.

    python -m train.arms FILE.toml [--out DIR] [--dry-run] [--only ARM ...] [--nproc N] [--greedy CANDIDATES.toml]

FILE.toml (every key is optional but `seeds` and the arms; an unknown key is refused):

    title = "BigramHash off"        # the report's heading (default: the file's name)
    preset = "tiny"                 # the base preset; an arm may set PRESET in its env for its own runs
    seeds = [1, 2]                  # each arm runs once per seed (SEED)
    steps = 500                     # the budget: ITERATIONS=500 MAX_WALLCLOCK_SECONDS=0 (fixed steps) ...
    # wallclock_seconds = 600       # ... or MAX_WALLCLOCK_SECONDS=600; neither: each preset's own
    nproc = 1                       # processes per run: torchrun --nproc_per_node=N when N > 1 (--nproc wins)
    seconds_per_run = 90            # the time estimate until the experiment has timed runs of its own
    env = { EVAL_STRIDE = "256" }   # shared overrides: the variables `python -m train` reads, by their names

    [[arm]]
    name = "control"                # letters, digits, '.', '_', '-': it names the arm's run folders
    control = true                  # exactly one arm: the one every other arm is compared with
    expect = "2.0042 +- 0.002"      # optional pin of its mean round-trip val_bpb ("2.0042 ± 0.002" too, or
                                    # { value = 2.0042, tol = 0.002, metric = "float_val_bpb" }): flagged on drift
    [[arm]]
    name = "no-bigram"
    env = { BIGRAM_VOCAB_SIZE = 0 } # values: strings, numbers, true/false, lists of numbers (1,2 -> "1,2")
    seconds_per_run = 80            # this arm's own estimate

Every variable is checked before anything runs: an unknown name (with the known one it resembles), a value the
configuration refuses (model/config.py, the same check `python -m train` makes), two arms with one name, no
control or two, a budget given twice, missing data: one line, exit 2. SEED, RUN_ID, RUNS_DIR and DRY_RUN are
the tool's. Variables that `python -m train` reads are not taken from the shell that starts the experiment
(the file decides; a note names any it drops); the rest of the environment is passed on.

The experiment folder DIR (default runs/arms/<file name>/): experiment.toml (the file as last run);
runs/<arm>-s<seed>/, each run's RUNS_DIR/RUN_ID (train.log, config.json, summary.json, the artifact), with
output.log (what its command printed) and arms.json (its variables, its resolved configuration, its key and
how it ended); the report after every run: report.md, report.csv (per arm), runs.csv (per run), report.json,
curves.png, scores.png (train/arms_report.py); attic/ (the logs of runs that were replaced).

Resuming: the same command again skips every run whose folder holds a finished run with the same key: the
resolved configuration (less where it is written), the tool's run switches (KERNELS...), the process count,
and the code a run imports (the modules of the submission bundle, quant/bundle.py bundled_modules) with the
torch and triton versions. A run that failed, was interrupted or whose key changed is run again (its logs go
to attic/ first). A run whose key matches a finished run under another name (greedy rounds) uses that run.
One failed run never stops the others: its row says failed, with the last line its command printed.

--greedy CANDIDATES.toml: forward selection from the arm `base` (default: the control) of FILE.toml:

    base = "control"                # optional
    noise_sigmas = 1.0              # optional: how many noise units a gain must exceed
    [[candidate]]
    name = "ema"
    env = { EMA_DECAY = 0.99, SWA_EVERY = 0 }

Each round runs the current best and every remaining candidate on top of it, for every seed, and keeps the
candidate with the lowest mean round-trip val_bpb if it beats the current best by more than the noise:
noise_sigmas x the pooled sample std of the round's seeds x sqrt(1/n_best + 1/n_candidate). It stops when no
candidate does or none is left. Each round has its report in DIR/greedy-<name>/round-<k>/, and
DIR/greedy-<name>/greedy.md the rounds' decisions.

Exit status: 0 every run finished (--dry-run: the plan could start), 1 a run failed, 2 bad input before
anything ran (said in one line), 130 interrupted (rerun the command to resume). Not on the run path: no run
imports this module (the submission bundle walks imports from train/__main__.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from model.config import ENV_ALIASES, PRESETS, TYPO_SIMILARITY, Config, ConfigError, from_env
from model.io import write_atomic

from .arms_report import METRICS, ArmInfo, Expect, RunRow, finished_summary, read_summary, write_report

REPO = Path(__file__).resolve().parents[1]
# Set by the tool for each run; a file may not set them.
SET_BY_ARMS = {"SEED": "each run's seed comes from `seeds`", "RUN_ID": "each run's folder is DIR/runs/<arm>-s<seed>",
               "RUNS_DIR": "each run's folder is DIR/runs/<arm>-s<seed>", "DRY_RUN": "use --dry-run"}
# Variables a run reads besides the settings; they go into the run's key.
RUN_SWITCHES = ("KERNELS", "KERNELS_STRICT", "STRICT_ENV")
VARIABLES = frozenset({f.name.upper() for f in fields(Config)} - set(SET_BY_ARMS)
                      | set(ENV_ALIASES.values()) | {"SKIP_GPTQ", "LOOP_AWARE_GPTQ"} | set(RUN_SWITCHES))
TOP_KEYS = ("title", "preset", "seeds", "steps", "wallclock_seconds", "nproc", "seconds_per_run", "env", "arm")
ARM_KEYS = ("name", "env", "control", "expect", "seconds_per_run")
CANDIDATES_KEYS = ("base", "noise_sigmas", "candidate")
CANDIDATE_KEYS = ("name", "env")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # no '+': greedy rounds join names with it
# Config fields that say where a run is written, not what it computes: left out of the key
KEY_EXCLUDED = ("run_id", "runs_dir", "dry_run", "checkpoint_fallback_dir")
# A wall-clock run's estimate without a measured or given one: the cap, plus start-up, compile warmup, the final
# evaluation and the export step (a guess: no GPU run has measured them yet)
WALLCLOCK_OVERHEAD_S = 180.0
_NUMBER = r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
EXPECT_TEXT = re.compile(rf"^\s*([-+]?{_NUMBER})\s*(?:\+-|±|\+/-)\s*({_NUMBER})\s*$")
STEP_LINE = re.compile(r"\bstep:(\d+)/(\d+) train_loss:\S+ train_time:(\d+)ms")


class ArmsError(ValueError):
    """A bad experiment or candidates file, or a folder in use: one line, exit 2."""


class Interrupted(Exception):
    """SIGTERM: stop as Ctrl-C does (the running command is stopped, the report written)."""


# ---------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Arm:
    name: str
    env: dict
    control: bool = False
    expect: Expect | None = None
    seconds_per_run: float | None = None

    def overrides(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.env.items())


@dataclass(frozen=True)
class Experiment:
    path: Path
    text: bytes
    title: str
    preset: str | None
    seeds: tuple
    env: dict          # shared variables, the budget included
    arms: tuple
    nproc: int
    seconds_per_run: float | None

    @property
    def control(self) -> Arm:
        return next(a for a in self.arms if a.control)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


@dataclass(frozen=True)
class Candidates:
    path: Path
    text: bytes
    base: str
    noise_sigmas: float
    candidates: tuple  # Arms (name, env)


def _read_toml(path) -> tuple[Path, bytes, dict]:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ArmsError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ArmsError(f"{path}: not valid TOML: {err}") from None
    return path, text, data


def _keys(table: dict, allowed, where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1, cutoff=0.6)
        raise ArmsError(f"{where}: unknown key {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                 f"; the keys are {', '.join(allowed)}"))


def _number(value, where: str, *, integer: bool = False, positive: bool = True):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)) \
            or (positive and not value > 0):
        raise ArmsError(f"{where}: {value!r} is not a{' positive' if positive else ''} "
                        f"{'whole number' if integer else 'number'}")
    return value


def check_variable(name: str, where: str) -> None:
    if name in SET_BY_ARMS:
        raise ArmsError(f"{where}: {name} is set by python -m train.arms ({SET_BY_ARMS[name]})")
    if name not in VARIABLES:
        close = difflib.get_close_matches(name.upper(), sorted(VARIABLES), n=1, cutoff=TYPO_SIMILARITY)
        raise ArmsError(f"{where}: {name} is not a variable `python -m train` reads"
                        + (f" (did you mean {close[0]}?)" if close else " (model/config.py lists them)"))


def env_text(name: str, value, where: str) -> str:
    """A TOML value as the environment variable's text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in value):
        return ",".join(repr(v) for v in value)
    raise ArmsError(f"{where}: {name} = {value!r}: give a string, a number, true/false or a list of numbers")


def env_table(table, where: str) -> dict:
    if not isinstance(table, dict):
        raise ArmsError(f"{where}: env must be a table, e.g. env = {{ MODEL_DIM = 256 }}")
    out = {}
    for name, value in table.items():
        check_variable(name, where)
        out[name] = env_text(name, value, where)
    return out


def parse_expect(value, where: str) -> Expect:
    if isinstance(value, str):
        found = EXPECT_TEXT.match(value)
        if not found:
            raise ArmsError(f"{where}: expect = {value!r}: write \"VALUE +- TOL\" (or ±), e.g. \"1.52365 +- 0.002\"")
        return Expect(float(found[1]), float(found[2]))
    if isinstance(value, dict):
        _keys(value, ("value", "tol", "metric"), f"{where}: expect")
        if "value" not in value or "tol" not in value:
            raise ArmsError(f"{where}: expect needs value and tol, e.g. {{ value = 1.52365, tol = 0.002 }}")
        metric = value.get("metric", "val_bpb")
        if metric not in METRICS:
            raise ArmsError(f"{where}: expect metric {metric!r}: one of {', '.join(METRICS)}")
        return Expect(float(_number(value["value"], f"{where}: expect value", positive=False)),
                      float(_number(value["tol"], f"{where}: expect tol", positive=False)), metric)
    raise ArmsError(f"{where}: expect = {value!r}: write \"VALUE +- TOL\" or {{ value = ..., tol = ... }}")


def _name(value, where: str, seen: set) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ArmsError(f"{where}: name {value!r}: use letters, digits and . _ - (it names folders)")
    if value in seen:
        raise ArmsError(f"{where}: two are named {value!r}: names must differ")
    seen.add(value)
    return value


def load_experiment(path, nproc: int | None = None) -> Experiment:
    """The experiment file, checked (ArmsError: one line); the configurations are resolved by plan()."""
    path, text, data = _read_toml(path)
    where = str(path)
    _keys(data, TOP_KEYS, where)
    preset = data.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ArmsError(f"{where}: preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise ArmsError(f"{where}: seeds must be a list of whole numbers, e.g. seeds = [1, 2]")
    for seed in seeds:
        _number(seed, f"{where}: seeds", integer=True, positive=False)
    if len(set(seeds)) != len(seeds):
        raise ArmsError(f"{where}: seeds {seeds}: each seed once")
    env = env_table(data.get("env", {}), f"{where}: env")
    if "steps" in data and "wallclock_seconds" in data:
        raise ArmsError(f"{where}: give the budget once: steps or wallclock_seconds")
    budget_vars = [k for k in ("ITERATIONS", "MAX_WALLCLOCK_SECONDS") if k in env]
    if "steps" in data:
        if budget_vars:
            raise ArmsError(f"{where}: steps and env {budget_vars[0]} both set the budget: give it once")
        env.update(ITERATIONS=str(_number(data["steps"], f"{where}: steps", integer=True)), MAX_WALLCLOCK_SECONDS="0")
    if "wallclock_seconds" in data:
        if "MAX_WALLCLOCK_SECONDS" in env:
            raise ArmsError(f"{where}: wallclock_seconds and env MAX_WALLCLOCK_SECONDS both set the budget: give it "
                            "once")
        env["MAX_WALLCLOCK_SECONDS"] = repr(_number(data["wallclock_seconds"], f"{where}: wallclock_seconds"))
    if nproc is None:
        nproc = _number(data.get("nproc", 1), f"{where}: nproc", integer=True)
    seconds = data.get("seconds_per_run")
    if seconds is not None:
        seconds = float(_number(seconds, f"{where}: seconds_per_run"))
    tables = data.get("arm")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ArmsError(f"{where}: no arms: add [[arm]] tables (name, env, and control = true on one)")
    arms, names = [], set()
    for i, table in enumerate(tables, 1):
        arm_where = f"{where}: arm {table.get('name', i)!r}"
        _keys(table, ARM_KEYS, arm_where)
        name = _name(table.get("name"), f"{where}: arm {i}", names)
        control = table.get("control", False)
        if not isinstance(control, bool):
            raise ArmsError(f"{arm_where}: control must be true or false")
        arm_seconds = table.get("seconds_per_run")
        arms.append(Arm(name, env_table(table.get("env", {}), arm_where), control,
                        parse_expect(table["expect"], arm_where) if "expect" in table else None,
                        None if arm_seconds is None else float(_number(arm_seconds, f"{arm_where}: seconds_per_run"))))
    controls = [a.name for a in arms if a.control]
    if len(controls) != 1:
        raise ArmsError(f"{where}: " + ("no arm has control = true: mark the one the others are compared with"
                                        if not controls else f"{len(controls)} arms have control = true "
                                        f"({', '.join(controls)}): mark one"))
    title = data.get("title", path.stem)
    return Experiment(path, text, str(title), preset, tuple(seeds), env, tuple(arms), nproc, seconds)


def load_candidates(path, exp: Experiment) -> Candidates:
    path, text, data = _read_toml(path)
    where = str(path)
    _keys(data, CANDIDATES_KEYS, where)
    base = data.get("base", exp.control.name)
    if base not in [a.name for a in exp.arms]:
        raise ArmsError(f"{where}: base {base!r} is not an arm of {exp.path} ({', '.join(a.name for a in exp.arms)})")
    sigmas = float(_number(data.get("noise_sigmas", 1.0), f"{where}: noise_sigmas", positive=False))
    tables = data.get("candidate")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ArmsError(f"{where}: no candidates: add [[candidate]] tables (name, env)")
    names, found = set(), []
    for i, table in enumerate(tables, 1):
        c_where = f"{where}: candidate {table.get('name', i)!r}"
        _keys(table, CANDIDATE_KEYS, c_where)
        name = _name(table.get("name"), f"{where}: candidate {i}", names)
        env = env_table(table.get("env", {}), c_where)
        if not env:
            raise ArmsError(f"{c_where}: sets nothing (give it an env)")
        found.append(Arm(name, env))
    if len(exp.seeds) < 2:
        raise ArmsError(f"{exp.path}: --greedy needs at least 2 seeds: the noise a gain must beat is measured from "
                        "them")
    return Candidates(path, text, base, sigmas, tuple(found))


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunPlan:
    arm: str
    seed: int
    run_id: str
    env: dict        # every variable its command sets
    config: Config
    key: str
    nproc: int

    def command(self) -> list[str]:
        if self.nproc == 1:
            return [sys.executable, "-m", "train"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                "-m", "train"]

    def shell(self) -> str:
        launch = "python -m train" if self.nproc == 1 else \
            f"torchrun --standalone --nproc_per_node={self.nproc} -m train"
        return " ".join(f"{k}={v}" for k, v in self.env.items()) + " " + launch


_code_hash: str | None = None


def code_hash() -> str:
    """The code a run executes: every module `python -m train` imports (the submission bundle's modules), and the
    torch and triton versions. Editing a report, a test or this tool leaves it alone."""
    global _code_hash
    if _code_hash is None:
        from quant.bundle import bundled_modules

        digest = hashlib.sha256()
        for name, path in bundled_modules(REPO).items():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        for package in ("torch", "triton"):
            try:
                digest.update(f"{package}={importlib.metadata.version(package)}\0".encode())
            except importlib.metadata.PackageNotFoundError:
                digest.update(f"{package}=none\0".encode())
        _code_hash = digest.hexdigest()[:16]
    return _code_hash


def run_key(cfg: Config, switches: dict, nproc: int) -> str:
    values = {k: v for k, v in cfg.to_dict().items() if k not in KEY_EXCLUDED}
    blob = json.dumps(dict(config=values, switches=switches, nproc=nproc, code=code_hash()), sort_keys=True,
                      default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve(exp: Experiment, arm: Arm, seed: int, runs_dir: Path) -> RunPlan:
    """The run (arm, seed): its variables and the configuration `python -m train` will resolve from them."""
    import kernels
    from kernels._runtime import parse_flag
    from train.trainer import grad_accum_steps_for

    where = f"{exp.path}: arm {arm.name!r}"
    run_id = f"{arm.name}-s{seed}"
    env = {"PRESET": exp.preset} if exp.preset else {}
    env.update(exp.env)
    env.update(arm.env)
    if not env.get("PRESET"):
        raise ArmsError(f"{where}: no preset: set preset = \"...\" at the top of the file or PRESET in the arm's env")
    env.update(SEED=str(seed), RUNS_DIR=str(runs_dir), RUN_ID=run_id)
    try:
        cfg = from_env(environ=env)
        grad_accum_steps_for(cfg, exp.nproc)
        if env.get("KERNELS", "").strip() and env["KERNELS"].strip() not in kernels.BACKENDS:
            raise ConfigError(f"KERNELS={env['KERNELS']!r} is not one of {kernels.BACKENDS}")
        for flag in ("KERNELS_STRICT", "STRICT_ENV"):
            if env.get(flag, "").strip():
                try:
                    parse_flag(flag, env[flag])
                except ValueError as err:
                    raise ConfigError(str(err)) from None
    except ConfigError as err:
        raise ArmsError(f"{where}: {err}") from None
    switches = {k: env[k] for k in RUN_SWITCHES if k in env}
    return RunPlan(arm.name, seed, run_id, env, cfg, run_key(cfg, switches, exp.nproc), exp.nproc)


def plan(exp: Experiment, arms, runs_dir: Path) -> list[RunPlan]:
    """Every (arm, seed), seed by seed: after the first seed every arm has a score to read."""
    return [resolve(exp, arm, seed, runs_dir) for seed in exp.seeds for arm in arms]


def data_problems(plans: list[RunPlan]) -> list[str]:
    """What is missing for each distinct data path and tokenizer the runs use (one line each)."""
    from train.data import shard_paths

    problems, seen = [], set()
    for p in plans:
        cfg = p.config
        if (cfg.data_path, cfg.tokenizer_path) in seen:
            continue
        seen.add((cfg.data_path, cfg.tokenizer_path))
        for split in ("train", "val"):
            try:
                shard_paths(cfg.data_path, split)
            except FileNotFoundError as err:
                problems.append(f"arm {p.arm!r}: {err}")
                break
        if not Path(cfg.tokenizer_path).is_file():
            problems.append(f"arm {p.arm!r}: TOKENIZER_PATH={cfg.tokenizer_path}: no such file")
    return problems


# ---------------------------------------------------------------------------------------------- the folder


class ExperimentFolder:
    """DIR: its runs/, attic/ and reports. lock() holds DIR/.lock for this process: one tool per folder."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.runs = self.root / "runs"
        self._lock = None

    def lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise ArmsError(f"{self.root} is in use by another python -m train.arms (pid {pid}): wait for it, or "
                            "give this one another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def meta(self, run_id: str) -> dict | None:
        try:
            return json.loads((self.runs / run_id / "arms.json").read_text())
        except (OSError, ValueError):
            return None

    def finished_by_key(self) -> dict[str, str]:
        """{key: run id} of the finished runs in runs/."""
        found = {}
        if self.runs.is_dir():
            for folder in sorted(self.runs.iterdir()):
                meta = self.meta(folder.name)
                if meta and meta.get("key") and finished_summary(folder) is not None:
                    found.setdefault(meta["key"], folder.name)
        return found

    def row(self, p: RunPlan, finished: dict[str, str] | None = None) -> RunRow:
        """Where run p stands: finished (here or under another name), failed, interrupted or pending."""
        finished = self.finished_by_key() if finished is None else finished
        own = self.runs / p.run_id
        meta = self.meta(p.run_id)
        result = (meta or {}).get("result") or {}
        base = dict(run_id=p.run_id, arm=p.arm, seed=p.seed)
        if meta and meta.get("key") == p.key:
            summary = finished_summary(own)
            if summary is not None:
                note = "" if summary.get("compliant", True) else f"non-compliant: {summary.get('error', '')}"
                return RunRow(**base, status="finished", folder=own, note=note, seconds=result.get("seconds"),
                              summary=summary)
        other = finished.get(p.key)
        if other and other != p.run_id:
            return RunRow(**base, status="finished", folder=self.runs / other, note=f"the same run as {other}",
                          summary=finished_summary(self.runs / other) or {})
        if meta and meta.get("key") == p.key:
            if not result:
                return RunRow(**base, status="interrupted", folder=own, summary=read_summary(own),
                              note="stopped before it ended (killed, or the machine went down): runs again")
            last = result.get("last_line") or "(no output)"
            return RunRow(**base, status="failed", folder=own, seconds=result.get("seconds"),
                          summary=read_summary(own), note=f"exit {result.get('returncode')}: {last}")
        if meta:
            return RunRow(**base, status="pending", note="its configuration or code changed since it ran: runs again")
        return RunRow(**base, status="pending")

    def clear(self, run_id: str, wait_s: float = 60.0) -> None:
        """Move a run folder's logs and summaries to attic/<run id>-<UTC time>/ and remove the folder. A run
        still holding its train.log (one whose tool was killed, on its way out) gets `wait_s` to end."""
        folder = self.runs / run_id
        if not folder.exists():
            return
        deadline = time.monotonic() + wait_s
        while _in_use(folder / "train.log"):
            if time.monotonic() > deadline:
                raise ArmsError(f"run {run_id} is still running in {folder} (a process holds its train.log): "
                                "stop it, then rerun")
            time.sleep(0.5)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        attic = self.root / "attic" / f"{run_id}-{stamp}"
        attic.mkdir(parents=True, exist_ok=True)
        for name in ("arms.json", "output.log", "train.log", "summary.json", "config.json"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, attic / name)
        shutil.rmtree(folder)

    def write_meta(self, p: RunPlan, result: dict | None = None) -> None:
        meta = dict(arm=p.arm, seed=p.seed, run_id=p.run_id, key=p.key, code=code_hash(), nproc=p.nproc,
                    command=p.shell(), env=p.env, config=p.config.to_dict(),
                    started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if result is not None:
            meta = dict(self.meta(p.run_id) or meta, result=result)
        write_atomic(self.runs / p.run_id / "arms.json", json.dumps(meta, indent=1, default=list) + "\n")


def _in_use(path: Path) -> bool:
    """Whether a live run holds `path` (a train.log: RunLog keeps an exclusive flock on it)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# ---------------------------------------------------------------------------------------------- running


def _die_with_parent() -> None:
    """In the child: a SIGTERM when the tool dies (Linux), so a killed experiment leaves no run behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the child then outlives a SIGKILLed tool
        pass


def subprocess_launcher(command: list[str], env: dict, on_line: Callable[[str], None]) -> int:
    """Run the command, each output line to on_line; returns its exit status. Stopped with the tool."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", preexec_fn=_die_with_parent)
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def child_environment(p: RunPlan) -> dict:
    """The tool's environment less the variables a run reads, then the run's own; PYTHONPATH puts this checkout
    first, so the run imports the code the key hashed."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k not in SET_BY_ARMS and
           not k.startswith(("TORCHELASTIC_",)) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                       if x])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(p.env)
    return env


def dropped_shell_variables() -> list[str]:
    return sorted(k for k in os.environ if k in VARIABLES or k in SET_BY_ARMS)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line over the runs: a bar, the current run's step, the ETA. In place on a terminal; elsewhere a line
    when a run starts or ends and every 30 s."""

    def __init__(self, total: int, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.run = None
        self.last_print = 0.0

    def begin(self, p: RunPlan, estimate: float | None, later: list[float | None]) -> None:
        self.run, self.estimate, self.later = p, estimate, later
        self.started = time.monotonic()
        self.first_step = None
        self.step = self.steps = None
        self.frac = 0.0
        self._show(force=True)

    def line(self, text: str) -> None:
        found = STEP_LINE.search(text)
        if not found or self.run is None:
            return
        self.step, self.steps, train_ms = int(found[1]), int(found[2]), int(found[3])
        if self.first_step is None:
            self.first_step = time.monotonic()
        cap = self.run.config.max_wallclock_seconds
        self.frac = min(1.0, max(self.step / self.steps, train_ms / (1000 * cap) if cap > 0 else 0.0))
        self._show()

    def end(self, counted: bool = True) -> None:
        self.done += counted
        self.run = None
        self._show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def skip(self) -> None:
        self.done += 1

    def eta(self) -> float | None:
        if self.run is None:
            return 0.0
        elapsed = time.monotonic() - self.started
        current = None if self.estimate is None else max(self.estimate - elapsed, 0.0)
        if self.first_step is not None and self.frac > 0:
            by_rate = (time.monotonic() - self.first_step) / self.frac * (1 - self.frac)
            current = by_rate if current is None else max(current, by_rate)
        if current is None or any(x is None for x in self.later):
            return None
        return current + sum(self.later)

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < (0.25 if self.tty else 30.0):
            return
        self.last_print = now
        width = 24
        filled = int(width * (self.done + (self.frac if self.run else 0)) / max(self.total, 1))
        text = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs"
        if self.run is not None:
            step = f" step {self.step}/{self.steps}" if self.step is not None else " starting"
            text += f"  {self.run.run_id}{step}  ETA {_clock(self.eta())}"
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:160])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def estimates(plans: list[RunPlan], exp: Experiment, arms: dict[str, Arm], folder: ExperimentFolder) \
        -> dict[str, tuple[float | None, str]]:
    """{run id: (seconds, where the number comes from)}: this experiment's timed runs of the arm, else the file's
    seconds_per_run (the arm's, then the top's), else a wall-clock budget plus WALLCLOCK_OVERHEAD_S."""
    timed: dict[str, list[float]] = {}
    if folder.runs.is_dir():
        for run in folder.runs.iterdir():
            meta = folder.meta(run.name) or {}
            seconds = (meta.get("result") or {}).get("seconds")
            if seconds and finished_summary(run) is not None:
                timed.setdefault(meta.get("arm"), []).append(seconds)
    out = {}
    for p in plans:
        arm = arms.get(p.arm)
        if timed.get(p.arm):
            out[p.run_id] = (sum(timed[p.arm]) / len(timed[p.arm]), f"{len(timed[p.arm])} timed runs of the arm")
        elif arm is not None and arm.seconds_per_run:
            out[p.run_id] = (arm.seconds_per_run, "the arm's seconds_per_run")
        elif exp.seconds_per_run:
            out[p.run_id] = (exp.seconds_per_run, "seconds_per_run")
        elif p.config.max_wallclock_seconds > 0:
            out[p.run_id] = (p.config.max_wallclock_seconds + WALLCLOCK_OVERHEAD_S,
                             f"the wall clock + {WALLCLOCK_OVERHEAD_S:g} s (a guess)")
        else:
            out[p.run_id] = (None, "no estimate: set seconds_per_run")
    return out


class Runner:
    """Runs plans one after another in an experiment folder, skipping finished ones; report() after each."""

    def __init__(self, exp: Experiment, folder: ExperimentFolder, launcher=None, out=None):
        self.exp, self.folder = exp, folder
        self.launcher = launcher or subprocess_launcher
        self.out = out or sys.stdout
        self.current: str | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def rows(self, plans: list[RunPlan]) -> list[RunRow]:
        finished = self.folder.finished_by_key()
        rows = []
        for p in plans:
            row = self.folder.row(p, finished)
            if p.run_id == self.current and row.status != "finished":
                row = dataclasses.replace(row, status="running", note="")
            rows.append(row)
        return rows

    def execute(self, plans: list[RunPlan], arms: dict[str, Arm], report: Callable[[], None]) -> dict[str, str]:
        """Run every plan not yet finished; returns {run id: status}."""
        todo = [p for p in plans if self.folder.row(p).status != "finished"]
        progress = Progress(len(plans))
        progress.done = len(plans) - len(todo)
        if len(todo) < len(plans):
            self.say(f"skipping {len(plans) - len(todo)} finished runs (same configuration and code)")
        statuses = {}
        for i, p in enumerate(todo):
            if self.folder.row(p).status == "finished":  # an earlier run of this loop had the same key
                progress.skip()
                statuses[p.run_id] = "finished"
                continue
            self.folder.clear(p.run_id)
            self.folder.write_meta(p)
            self.current = p.run_id
            report()
            guesses = estimates(plans, self.exp, arms, self.folder)
            progress.begin(p, guesses[p.run_id][0], [guesses[q.run_id][0] for q in todo[i + 1:]])
            output = self.folder.runs / p.run_id / "output.log"
            last = [""]
            started = time.monotonic()
            with open(output, "w", buffering=1, errors="replace") as log:
                def on_line(text: str) -> None:
                    log.write(text + "\n")
                    if text.strip():
                        last[0] = text.strip()
                    progress.line(text)
                try:
                    code = self.launcher(p.command(), child_environment(p), on_line)
                except BaseException:
                    log.write("==== interrupted: python -m train.arms stopped this run ====\n")
                    progress.end(counted=False)
                    self.current = None
                    raise
            seconds = time.monotonic() - started
            self.folder.write_meta(p, dict(returncode=code, seconds=round(seconds, 1), last_line=last[0][:500],
                                           ended=datetime.datetime.now(datetime.timezone.utc).isoformat(
                                               timespec="seconds")))
            self.current = None
            row = self.folder.row(p)
            statuses[p.run_id] = row.status
            progress.end()
            if row.status == "finished":
                self.say(f"{p.run_id}: finished, val_bpb {row.summary['val_bpb']:.4f} ({_clock(seconds)})")
            else:
                self.say(f"{p.run_id}: FAILED ({row.note}); the others go on (its output: {output})")
            report()
        return statuses


# ---------------------------------------------------------------------------------------------- the modes


def _header(exp: Experiment, plans: list[RunPlan], extra: list[str] = ()) -> list[str]:
    budgets = sorted({budget(p.config) for p in plans})
    shared = " ".join(f"{k}={v}" for k, v in exp.env.items()) or "none"
    return [f"File `{exp.path}`; base preset `{exp.preset or '(each arm its own)'}`; seeds "
            f"{', '.join(map(str, exp.seeds))}; budget {'; '.join(budgets)}; {exp.nproc} process"
            f"{'es' if exp.nproc > 1 else ''} per run; shared variables: {shared}; code {code_hash()}.", *extra]


def budget(cfg: Config) -> str:
    if cfg.max_wallclock_seconds > 0:
        return f"{cfg.max_wallclock_seconds:g} s wall clock"
    return f"{cfg.iterations} steps"


def arm_infos(arms) -> list[ArmInfo]:
    return [ArmInfo(a.name, a.control, a.overrides(), a.expect) for a in arms]


def print_plan(exp: Experiment, arms, plans: list[RunPlan], folder: ExperimentFolder, out) -> float | None:
    """The plan as --dry-run prints it; returns the estimated seconds of the runs left (None: unknown)."""
    from train.trainer import parameter_count

    say = lambda text="": print(text, file=out)  # noqa: E731
    arm_map = {a.name: a for a in arms}
    guesses = estimates(plans, exp, arm_map, folder)
    finished = folder.finished_by_key()
    left = [p for p in plans if folder.row(p, finished).status != "finished"]
    say(f"plan: {exp.path} -> {folder.root}: {len(arms)} arms x {len(exp.seeds)} seeds = {len(plans)} runs, "
        f"{exp.nproc} process{'es' if exp.nproc > 1 else ''} each")
    width = max(len(a.name) for a in arms) + 2
    say(f"  {'arm':<{width}}{'preset':<26}{'params':>12}  {'budget':<18}{'est/run':>9}  overrides")
    for arm in arms:
        p = next(q for q in plans if q.arm == arm.name)
        mark = "*" if arm.control else " "
        say(f"{mark} {arm.name:<{width}}{p.config.preset:<26}{parameter_count(p.config):>12,}  {budget(p.config):<18}"
            f"{_clock(guesses[p.run_id][0]):>9}  {arm.overrides() or '-'}"
            + (f"  expect {arm.expect.text()}" if arm.expect else ""))
    say("  (* the control)")
    say(f"seeds: {', '.join(map(str, exp.seeds))}; shared: "
        f"{' '.join(f'{k}={v}' for k, v in exp.env.items()) or 'none'}")
    total = [guesses[p.run_id][0] for p in left]
    known = sum(t for t in total if t is not None)
    sources = sorted({guesses[p.run_id][1] for p in left})
    say(f"runs: {len(left)} to run, {len(plans) - len(left)} finished (skipped)")
    unknown = sum(t is None for t in total)
    if unknown == len(left) and left:
        say(f"estimated time: unknown for the {len(left)} runs left ({'; '.join(sources)})")
    else:
        say(f"estimated time: {_clock(known)}" + (f" + {unknown} runs without an estimate" if unknown else "")
            + f" for the {len(left)} runs left ({'; '.join(sources) or 'nothing to run'})")
    return None if unknown else known


def _report_fn(exp, arms, plans, runner: Runner, folder: Path, title: str, extra: list[str] = ()):
    infos = arm_infos(arms)
    header = _header(exp, plans, extra)

    def report():
        return write_report(folder, title, infos, runner.rows(plans), header)
    return report


def _final_lines(report: dict) -> list[str]:
    lines = [*report["pins"]]
    for a in report["arms"]:
        if a["val_bpb"]:
            c = a["vs_control"]
            vs = "control" if a["control"] else ("" if c is None else
                                                 f"{-c['improvement_bpb']:+.4f} vs control"
                                                 + (f", p {c['plain_bpb']['p']:.3g}" if c["plain_bpb"] else ""))
            sd = a["val_bpb"][1]
            lines.append(f"  {a['rank']}. {a['name']:<28} val_bpb {a['val_bpb'][0]:.4f}"
                         + (f" ± {sd:.4f}" if sd is not None else "") + f"  (n={a['n']})  {vs}")
    return lines


def run_arms(exp: Experiment, folder: ExperimentFolder, only: list[str] | None, launcher=None, out=None) -> int:
    out = out or sys.stdout
    arms = list(exp.arms)
    plans = plan(exp, arms, folder.runs)
    selected = [p for p in plans if not only or p.arm in only]
    runner = Runner(exp, folder, launcher, out)
    report = _report_fn(exp, arms, plans, runner, folder.root, exp.title)
    write_atomic(folder.root / "experiment.toml", exp.text)
    try:
        statuses = runner.execute(selected, {a.name: a for a in arms}, report)
    finally:
        final = report()
    print(f"report: {folder.root / 'report.md'}", file=out)
    for line in _final_lines(final):
        print(line, file=out)
    failed = [r for r, s in statuses.items() if s != "finished"]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)} (rerun the command to run them again)", file=out)
    return 1 if failed else 0


def _merged(*envs: dict) -> dict:
    out = {}
    for env in envs:
        out.update(env)
    return out


def decide(report: dict, best: str, sigmas: float) -> dict:
    """The round's decision: the candidate with the lowest mean, kept when its gain over the best beats the noise."""
    arms = {a["name"]: a for a in report["arms"]}
    pooled_num = sum((a["n"] - 1) * a["val_bpb"][1] ** 2 for a in arms.values() if a["n"] >= 2)
    pooled_df = sum(a["n"] - 1 for a in arms.values() if a["n"] >= 2)
    pooled = math.sqrt(pooled_num / pooled_df) if pooled_df else None
    base = arms[best]
    rows = []
    for name, a in arms.items():
        if name == best or not a["n"] or not base["n"]:
            continue
        gain = base["val_bpb"][0] - a["val_bpb"][0]
        noise = None if pooled is None else sigmas * pooled * math.sqrt(1 / base["n"] + 1 / a["n"])
        c = a["vs_control"]
        rows.append(dict(name=name, val_bpb=a["val_bpb"], n=a["n"], gain=gain, noise=noise,
                         p=c["plain_bpb"]["p"] if c and c["plain_bpb"] else None))
    out = dict(best=best, best_val_bpb=base["val_bpb"], best_n=base["n"], pooled_std=pooled, candidates=rows,
               kept=None)
    if not base["n"]:
        out["why"] = f"`{best}` has no finished run: nothing to compare with"
    elif pooled is None:
        out["why"] = "no arm has two finished seeds: the noise cannot be measured"
    elif not rows:
        out["why"] = "no candidate has a finished run"
    else:
        top = max(rows, key=lambda r: r["gain"])
        if top["gain"] > top["noise"]:
            out["kept"] = top["name"]
            out["why"] = f"`{top['name']}` gains {top['gain']:.4f} bpb > noise {top['noise']:.4f}"
        else:
            out["why"] = (f"the best candidate `{top['name']}` gains {top['gain']:+.4f} bpb, not more than the noise "
                          f"{top['noise']:.4f}")
    return out


def greedy_markdown(exp: Experiment, cands: Candidates, rounds: list[dict], final: dict) -> str:
    lines = [f"# Greedy forward selection: {exp.title}", "",
             f"From arm `{cands.base}` of `{exp.path}` over the candidates of `{cands.path}`. Each round runs the "
             "current best and every remaining candidate on top of it; the candidate with the lowest mean round-trip "
             f"val_bpb is kept if its gain beats the noise: {cands.noise_sigmas:g} x the pooled sample std of the "
             "round's seeds x sqrt(1/n_best + 1/n_candidate). p is the one-sided Welch t-test that the candidate "
             "is better than the current best (quant.records).", ""]
    for k, r in enumerate(rounds, 1):
        best = r["best_val_bpb"]
        lines += [f"## Round {k}: current best `{r['best']}`"
                  + (f", val_bpb {best[0]:.4f} (n={r['best_n']})" if best else ""), "",
                  f"Decision: {'kept `' + r['kept'] + '`' if r['kept'] else 'stop'}: {r['why']}. "
                  f"[report](round-{k}/report.md)", "",
                  "| candidate | val_bpb | n | gain vs best | noise | p |", "|---|---|---|---|---|---|"]
        for c in sorted(r["candidates"], key=lambda c: -c["gain"]):
            sd = c["val_bpb"][1]
            lines.append(f"| `{c['name']}` | {c['val_bpb'][0]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
                         + f" | {c['n']} | {c['gain']:+.4f} | "
                         + ("–" if c["noise"] is None else f"{c['noise']:.4f}") + " | "
                         + ("–" if c["p"] is None else f"{c['p']:.3g}") + " |")
        lines += [*[f"- `{s}`: skipped ({why})" for s, why in r.get("skipped", [])], ""]
    lines += ["## Result", "", f"`{final['name']}`: {final['overrides'] or 'the base arm unchanged'}", ""]
    return "\n".join(lines)


def run_greedy(exp: Experiment, cands: Candidates, folder: ExperimentFolder, launcher=None, out=None) -> int:
    out = out or sys.stdout
    gdir = folder.root / f"greedy-{cands.path.stem}"
    gdir.mkdir(parents=True, exist_ok=True)
    write_atomic(folder.root / "experiment.toml", exp.text)
    write_atomic(gdir / "candidates.toml", cands.text)
    base = exp.arm(cands.base)
    accepted: list[Arm] = []
    remaining = list(cands.candidates)
    rounds: list[dict] = []
    failed = 0
    runner = Runner(exp, folder, launcher, out)
    while True:
        k = len(rounds) + 1
        label = "+".join([base.name] + [c.name for c in accepted])
        best = Arm(label, _merged(base.env, *(c.env for c in accepted)), True, None, base.seconds_per_run)
        arms, plans, skipped = [best], plan(exp, [best], folder.runs), []
        for c in remaining:
            arm = Arm(f"{label}+{c.name}", _merged(best.env, c.env), seconds_per_run=base.seconds_per_run)
            try:
                plans += plan(exp, [arm], folder.runs)
                arms.append(arm)
            except ArmsError as err:
                skipped.append((c.name, str(err).split(": ", 2)[-1]))
        plans.sort(key=lambda p: (exp.seeds.index(p.seed), [a.name for a in arms].index(p.arm)))
        print(f"greedy round {k}: best `{label}`, {len(arms) - 1} candidates, {len(plans)} runs", file=out)
        report = _report_fn(exp, arms, plans, runner, gdir / f"round-{k}", f"{exp.title}: greedy round {k}",
                            [f"Greedy round {k} over `{cands.path}`: the control is the current best `{label}`."])
        try:
            statuses = runner.execute(plans, {a.name: a for a in arms}, report)
        finally:
            final_report = report()
        failed += sum(s != "finished" for s in statuses.values())
        decision = decide(final_report, label, cands.noise_sigmas)
        decision["skipped"] = skipped
        rounds.append(decision)
        print(f"round {k}: " + (f"kept {decision['kept']}" if decision["kept"] else "stop") + f": {decision['why']}",
              file=out)
        kept = decision["kept"]
        if kept:
            kept_arm = next(c for c in remaining if f"{label}+{c.name}" == kept)
            accepted.append(kept_arm)
            remaining.remove(kept_arm)
        result_name = "+".join([base.name] + [c.name for c in accepted])
        final = dict(name=result_name, overrides=Arm(result_name, _merged(base.env, *(c.env for c in accepted)))
                     .overrides())
        write_atomic(gdir / "greedy.json", json.dumps(dict(rounds=rounds, result=final), indent=1, default=str))
        write_atomic(gdir / "greedy.md", greedy_markdown(exp, cands, rounds, final))
        if not kept or not remaining:
            break
    print(f"greedy: {gdir / 'greedy.md'}; result `{final['name']}`: {final['overrides'] or 'the base arm unchanged'}",
          file=out)
    return 1 if failed else 0


def main(argv=None, launcher=None, out=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.arms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", metavar="FILE.toml", help="the experiment: base preset, shared variables, arms, seeds")
    parser.add_argument("--out", metavar="DIR", help="the experiment folder (default: runs/arms/<file name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimated time; run nothing")
    parser.add_argument("--only", action="append", metavar="ARM", help="run only this arm (repeatable); the report "
                        "still covers every arm")
    parser.add_argument("--nproc", type=int, metavar="N", help="processes per run (torchrun when > 1); default: the "
                        "file's nproc, else 1")
    parser.add_argument("--greedy", metavar="CANDIDATES.toml", help="forward selection over these candidates")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if args.nproc is not None and args.nproc < 1:
        parser.error(f"argument --nproc: must be an integer >= 1, got {args.nproc}")
    try:
        exp = load_experiment(args.file, args.nproc)
        folder = ExperimentFolder(Path(args.out) if args.out else Path("runs") / "arms" / Path(args.file).stem)
        cands = load_candidates(args.greedy, exp) if args.greedy else None
        if args.only:
            if cands:
                raise ArmsError("--only and --greedy do not go together: a greedy round runs every candidate")
            unknown = [o for o in args.only if o not in [a.name for a in exp.arms]]
            if unknown:
                raise ArmsError(f"--only {unknown[0]}: no such arm in {exp.path} "
                                f"({', '.join(a.name for a in exp.arms)})")
        arms = list(exp.arms)
        plans = plan(exp, arms, folder.runs)
        used = [p for p in plans if not args.only or p.arm in args.only]
        if cands:  # every candidate on the base alone, and all of them together, must be a valid configuration
            base = exp.arm(cands.base)
            used = [p for p in plans if p.arm == base.name]
            for c in cands.candidates:
                used += plan(exp, [Arm(f"{base.name}+{c.name}", _merged(base.env, c.env))], folder.runs)
            plan(exp, [Arm("all", _merged(base.env, *(c.env for c in cands.candidates)))], folder.runs)
        problems = data_problems(used)
    except ArmsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if cands:
            base = exp.arm(cands.base)
            first = [Arm(base.name, base.env, True, None, base.seconds_per_run)] + [
                Arm(f"{base.name}+{c.name}", _merged(base.env, c.env), seconds_per_run=base.seconds_per_run)
                for c in cands.candidates]
            print("greedy round 1 (the later rounds depend on its scores):", file=out)
            first_plans = plan(exp, first, folder.runs)
            print_plan(exp, first, first_plans, folder, out)
            n = len(cands.candidates)
            most = len(exp.seeds) * (1 + n * (n + 1) // 2)
            guesses = [g for g, _ in estimates(first_plans, exp, {a.name: a for a in first}, folder).values()]
            each = None if None in guesses else sum(guesses) / len(guesses)
            print(f"at most {most} runs in all ({n} rounds, if every round keeps one)"
                  + (f": about {_clock(most * each)}" if each else ""), file=out)
        else:
            selected = [a for a in arms if not args.only or a.name in args.only]
            print_plan(exp, selected, [p for p in plans if p.arm in {a.name for a in selected}], folder, out)
        for line in problems:
            print(f"data: NOT READY -- {line}", file=out)
        return 2 if problems else 0
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    try:
        folder.lock()
    except ArmsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dropped = dropped_shell_variables()
    if dropped:
        print(f"note: not passed on from this shell (the file decides): {', '.join(dropped)}", file=out)

    def on_term(signum, frame):
        raise Interrupted()
    previous = signal.signal(signal.SIGTERM, on_term) if hasattr(signal, "SIGTERM") else None
    try:
        if cands:
            return run_greedy(exp, cands, folder, launcher, out)
        return run_arms(exp, folder, args.only, launcher, out)
    except (KeyboardInterrupt, Interrupted):
        print(f"\ninterrupted: rerun the same command to resume ({folder.root})", file=out)
        return 130
    except ArmsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        folder.unlock()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
