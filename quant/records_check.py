"""`check FOLDER [--data-path P --tokenizer-path P]`: does a records folder run, and are its numbers its logs'?

Stages, cheapest first; the first that fails ends the check (exit status 1, 0 when all pass):
1. files: train_gpt.py, submission.json, README.md and at least one train_seed<N>.log.
2. the logs against submission.json (the line formats a run writes): every seed's score, sizes, steps and
   times, the means and spreads, the versions; each seed's total <= 16,000,000 B, training + calibration
   <= 600 s, evaluation <= 600 s; and the logged code (bytes, sha256) is this train_gpt.py.
3. a copy of the folder alone in a temporary directory, run with `python -I` and no TRITON_INTERPRET:
   py_compile; a probe that loads the bundle's finder without running main, imports every bundled module
   (decorating the Triton kernels reads their source through inspect, so a loader that exec()s strings
   fails here on any machine) and requires each kernels/model/train/quant module's __spec__.origin to be
   the file; then DRY_RUN=1.
4. a short tiny-preset run on a step schedule from the bundle and, side by side, with `python -m train`
   from this checkout, one thread each: the same train losses, artifact model bytes and val_bpb (float and
   round trip), and the bundle's run counts its own file as code. Both run on the CPU with KERNELS=torch,
   also on a GPU machine: that is where two processes pick the same kernels (the GPU path is gpu-check's).
DATA_PATH / TOKENIZER_PATH default to the embedded corpus under this checkout's data/ (train.prepare builds
it when missing). About a minute and a half on 2 idle cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from model.config import Config

from .artifact import SIZE_LIMIT
from .bundle import PACKAGES
from .export import TIME_LIMIT_SECONDS
from .records import EXACT_LINE, REPO, VERSIONS_LINE
# The short run (stage 4): the tiny preset cut to a few steps; both runs get exactly these.
RUN_SETTINGS = {"PRESET": "tiny", "ITERATIONS": "4", "WARMDOWN_ITERS": "2", "MAX_WALLCLOCK_SECONDS": "0",
                "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "256", "GPTQ_CAL_SAMPLES": "8", "SEED": "1337"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RUN_TIMEOUT_SECONDS = 1200
# Loads the bundle (main() runs only as __main__), imports every module it holds and reports their origins.
PROBE = r"""
import importlib, json, runpy, sys
path = sys.argv[1]
loader = runpy.run_path(path, run_name="bundle_probe")
for name in sorted(loader["M"]):
    importlib.import_module(name)
origins = {n: getattr(getattr(m, "__spec__", None), "origin", None) for n, m in sys.modules.items()
           if n.split(".")[0] in sys.argv[2].split(",")}
print(json.dumps({"first_finder": getattr(sys.meta_path[0], "bundle_file", None), "bundled": sorted(loader["M"]),
                  "origins": origins}))
"""

_LOG_LINES = {  # what each seed's log must say, in the formats the trainer and the export step write
    "seed": r"\bseed:(\d+)",
    "code": r"^code_bytes:(\d+) code_sha256:([0-9a-f]{64})$",
    "total_bytes": r"^Total submission size int6\+brotli: (\d+) bytes$",
    "train_stop": r"^train_stop: train_time_s:([\d.]+) steps:(\d+)$",
    "train_plus_calibration_s": r"^calibration_s:[\d.]+ train_plus_calibration_s:([\d.]+) limit_s:\d+$",
    # the last score line's time (with TTT: the eval clock's total)
    "eval_time_ms": r"^final_int6_(?:sliding_window|doc_isolated|ttt_phased) val_loss:[\d.]+ val_bpb:[\d.]+ "
                    r"eval_time:(\d+)ms$",
    "exact": EXACT_LINE.pattern,
}
_STEP_AVG = r"^step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:\d+ms step_avg:([\d.]+)ms"


class CheckFailed(Exception):
    """One stage of the check failed; the message says what, and where."""


def parse_log(text: str, where: str) -> dict:
    """The numbers of one seed's train log that submission.json must agree with."""
    found = {}
    for key, pattern in _LOG_LINES.items():
        matches = re.findall(pattern, text, re.MULTILINE)
        if not matches:
            raise CheckFailed(f"{where}: no line matching {pattern!r}")
        found[key] = matches[-1]
    step_avg = re.findall(_STEP_AVG, text, re.MULTILINE)
    versions = VERSIONS_LINE.findall(text)
    return dict(seed=int(found["seed"]), code_bytes=int(found["code"][0]), code_sha256=found["code"][1],
                total_bytes=int(found["total_bytes"]), train_time_s=float(found["train_stop"][0]),
                steps=int(found["train_stop"][1]), train_plus_calibration_s=float(found["train_plus_calibration_s"]),
                eval_time_s=int(found["eval_time_ms"]) / 1000, val_loss=float(found["exact"][0]),
                val_bpb=float(found["exact"][1]), step_avg_ms=float(step_avg[-1]) if step_avg else None,
                versions=versions[-1] if versions else None)


def _close(a, b, tol: float) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) <= tol + 1e-12


def compare_submission(sub: dict, logs: dict[int, dict], code: bytes) -> list[str]:
    """Every disagreement between submission.json, the parsed logs {seed: parse_log(...)} and the bundle, and
    every limit a seed is over; [] when none."""
    bad = []
    results = sub.get("seed_results") or {}
    if sorted(int(s) for s in sub.get("seeds", [])) != sorted(logs) or sorted(int(s) for s in results) != sorted(logs):
        bad.append(f"seeds {sub.get('seeds')} / seed_results {sorted(results)} are not the logs' seeds {sorted(logs)}")
    if sub.get("bytes_code") != len(code):
        bad.append(f"bytes_code {sub.get('bytes_code')} is not train_gpt.py's {len(code)} B")
    sha = hashlib.sha256(code).hexdigest()
    for seed, log in sorted(logs.items()):
        where = f"train_seed{seed}.log"
        if (log["code_bytes"], log["code_sha256"]) != (len(code), sha):
            bad.append(f"{where}: the run counted code of {log['code_bytes']} B, sha256 {log['code_sha256'][:12]}..., "
                       f"not this train_gpt.py ({len(code)} B, {sha[:12]}...)")
        if log["total_bytes"] > SIZE_LIMIT:
            bad.append(f"{where}: total {log['total_bytes']:,} B is over the {SIZE_LIMIT:,} B limit")
        if log["train_plus_calibration_s"] > TIME_LIMIT_SECONDS:
            bad.append(f"{where}: training + calibration {log['train_plus_calibration_s']:.3f} s is over "
                       f"{TIME_LIMIT_SECONDS} s")
        if log["eval_time_s"] > TIME_LIMIT_SECONDS:
            bad.append(f"{where}: evaluation {log['eval_time_s']:.3f} s is over {TIME_LIMIT_SECONDS} s")
        r = results.get(str(seed))
        if r is None:
            continue
        for key, want, tol in (("val_loss", log["val_loss"], 6e-9), ("val_bpb", log["val_bpb"], 6e-9),
                               ("artifact_bytes", log["total_bytes"], 0), ("steps", log["steps"], 0),
                               ("train_time_s", log["train_plus_calibration_s"], 1e-3),
                               ("eval_time_s", log["eval_time_s"], 1e-3), ("step_avg_ms", log["step_avg_ms"], 5e-3)):
            if not _close(r.get(key), want, tol):
                bad.append(f"seed_results[{seed}].{key} = {r.get(key)!r}, its log says {want!r}")
        if log["versions"] is not None:
            torch_v, triton_v, cuda_v, _ = log["versions"]
            cuda_v = None if cuda_v == "none" else cuda_v  # a CPU run: submission.json says null
            for key, want in (("pytorch_version", torch_v), ("triton_version", triton_v), ("cuda_version", cuda_v)):
                if sub.get(key) != want:
                    bad.append(f"{key} {sub.get(key)!r}, {where} says {want!r}")
    if logs:
        for key in ("val_loss", "val_bpb"):
            values = [log[key] for _, log in sorted(logs.items())]
            if not _close(sub.get(key), statistics.fmean(values), 1.5e-8):
                bad.append(f"{key} {sub.get(key)!r} is not the seeds' mean {statistics.fmean(values):.8f}")
            std = statistics.stdev(values) if len(values) > 1 else None
            if (std is None) != (sub.get(f"{key}_std") is None) or (std is not None and not _close(sub[f"{key}_std"], std, 1.5e-8)):
                bad.append(f"{key}_std {sub.get(f'{key}_std')!r} is not the seeds' sample std {std!r}")
        if results and sub.get("bytes_total") != max(log["total_bytes"] for log in logs.values()):
            bad.append(f"bytes_total {sub.get('bytes_total')} is not the largest seed total "
                       f"{max(log['total_bytes'] for log in logs.values())}")
        comp = sub.get("compliance") or {}
        train_max = max(log["train_plus_calibration_s"] for log in logs.values())
        eval_max = max(log["eval_time_s"] for log in logs.values())
        if not _close(comp.get("train_time_max_s"), train_max, 1e-3) or not _close(comp.get("eval_time_max_s"), eval_max, 1e-3):
            bad.append(f"compliance {comp} does not match the logs' longest training + calibration {train_max:.3f} s "
                       f"and evaluation {eval_max:.3f} s")
        if comp.get("gptq_within_budget") is not (train_max <= TIME_LIMIT_SECONDS):
            bad.append(f"compliance.gptq_within_budget is {comp.get('gptq_within_budget')!r} with training + "
                       f"calibration {train_max:.3f} s against {TIME_LIMIT_SECONDS} s")
    return bad


def _read_folder(folder: Path) -> tuple[dict, dict[int, dict], bytes]:
    """Stages 1 and 2: (submission.json, {seed: parsed log}, train_gpt.py bytes); raises CheckFailed."""
    if not folder.is_dir():
        raise CheckFailed(f"{folder}: no such folder")
    missing = [n for n in ("train_gpt.py", "submission.json", "README.md") if not (folder / n).is_file()]
    log_files = sorted(folder.glob("train_seed*.log"))
    if missing or not log_files:
        raise CheckFailed(f"{folder}: missing {', '.join(missing + ([] if log_files else ['train_seed<N>.log']))}")
    try:
        sub = json.loads((folder / "submission.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckFailed(f"{folder / 'submission.json'}: not JSON ({err})") from None
    logs = {}
    for path in log_files:
        m = re.fullmatch(r"train_seed(\d+)\.log", path.name)
        log = parse_log(path.read_text(errors="replace"), str(path))
        if m is None or int(m.group(1)) != log["seed"]:
            raise CheckFailed(f"{path}: the log's seed:{log['seed']} does not match its file name")
        logs[log["seed"]] = log
    return sub, logs, (folder / "train_gpt.py").read_bytes()


def _child_env(extra: dict) -> dict:
    """This environment without the run's configuration, TRITON_INTERPRET or a distributed launcher's variables."""
    drop = {f.name.upper() for f in fields(Config)} | {"TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                        "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_")}
    env.update(extra)
    return env


def _run(cmd, env, cwd, what: str, timeout: float = RUN_TIMEOUT_SECONDS) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise CheckFailed(f"{what} exited with status {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _probe(bundle: Path, env: dict, cwd: Path) -> dict:
    out = _run([sys.executable, "-I", "-c", PROBE, str(bundle), ",".join(PACKAGES)], env, cwd,
               f"importing the bundled modules from {bundle.name} (python -I, no TRITON_INTERPRET)", timeout=300)
    report = json.loads(out.strip().splitlines()[-1])
    if report["first_finder"] != str(bundle):
        raise CheckFailed(f"{bundle.name}: its finder is not first on sys.meta_path ({report['first_finder']!r})")
    elsewhere = {n: o for n, o in report["origins"].items() if o != str(bundle)}
    if elsewhere:
        raise CheckFailed(f"{bundle.name}: modules not loaded from the bundle: {elsewhere}")
    return report


def _short_runs(bundle: Path, work: Path, data_path: str, tokenizer_path: str, log) -> None:
    """Stage 4: the same short run from the bundle and from this checkout, at once, one thread each."""
    # The artifact's header holds the config, RUNS_DIR and RUN_ID included: the same relative RUNS_DIR and
    # RUN_ID from two working directories keep the two artifacts comparable byte for byte.
    # Both on the CPU through the PyTorch ops, one thread each, so both pick the same kernels and compare bit
    # for bit; on a GPU each run would autotune its own Triton configs and reduce in its own order.
    settings = {**RUN_SETTINGS, **ONE_THREAD, "RUNS_DIR": "runs", "RUN_ID": "check", "DATA_PATH": data_path,
                "TOKENIZER_PATH": tokenizer_path, "KERNELS": "torch", "CUDA_VISIBLE_DEVICES": ""}
    commands = {"bundle": ([sys.executable, "-I", str(bundle)], {}),
                "package": ([sys.executable, "-m", "train"], {"PYTHONPATH": str(REPO)})}
    procs = {}
    for name, (cmd, extra) in commands.items():
        (work / name).mkdir()
        out = open(work / f"{name}.out", "w")
        procs[name] = (subprocess.Popen(cmd, env=_child_env({**settings, **extra}), cwd=work / name,
                                        stdout=out, stderr=subprocess.STDOUT, text=True), out)
    failed = []
    for name, (proc, out) in procs.items():
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.close()
        if rc != 0:
            failed.append(f"the {name} run ({' '.join(commands[name][0][1:])}) exited with status {rc}:\n"
                          + (work / f"{name}.out").read_text()[-3000:])
    if failed:
        raise CheckFailed("\n".join(failed))
    runs = {name: json.loads((work / name / "runs" / "check" / "summary.json").read_text()) for name in commands}
    b, p = runs["bundle"], runs["package"]
    pairs = {"train_losses": (b["train_losses"], p["train_losses"]),
             "model_bytes": (b["export"]["model_bytes"], p["export"]["model_bytes"]),
             "float_val_bpb": (b["export"]["float_val_bpb"], p["export"]["float_val_bpb"]),
             "roundtrip_val_bpb": (b["export"]["roundtrip_val_bpb"], p["export"]["roundtrip_val_bpb"])}
    differ = [f"{key}: bundle {x!r} != python -m train {y!r}" for key, (x, y) in pairs.items() if x != y]
    if differ:
        raise CheckFailed("the bundle's run differs from `python -m train`:\n  " + "\n  ".join(differ))
    if b["export"]["code_bytes"] != bundle.stat().st_size:
        raise CheckFailed(f"the bundle's run counted {b['export']['code_bytes']} B of code, not its own "
                          f"{bundle.stat().st_size} B")
    log(f"check: short run ({RUN_SETTINGS['ITERATIONS']} steps) from the bundle = python -m train: losses "
        f"{', '.join(f'{x:.4f}' for x in b['train_losses'])}, model {b['export']['model_bytes']:,} B, val_bpb "
        f"{b['export']['float_val_bpb']:.8f} float / {b['export']['roundtrip_val_bpb']:.8f} round trip")


def _default_corpus() -> tuple[str, str]:
    from train.prepare import prepare  # builds the embedded corpus under data/ when it is not there yet

    summary = prepare(out_root=REPO / "data", progress=False)
    return str(summary.dataset_dir), str(summary.tokenizer_path)


def check_folder(folder, data_path=None, tokenizer_path=None, log=print) -> int:
    """Run every stage on a records folder (see the module docstring): 0 when all pass, 1 at the first failure."""
    folder = Path(folder)
    try:
        sub, logs, code = _read_folder(folder)
        bad = compare_submission(sub, logs, code)
        if bad:
            raise CheckFailed(f"{folder}: submission.json and the logs disagree or are over a limit:\n  "
                              + "\n  ".join(bad))
        log(f"check: {folder.name}: submission.json agrees with {len(logs)} log(s) (seeds "
            f"{', '.join(map(str, sorted(logs)))}); largest total {max(l['total_bytes'] for l in logs.values()):,} B, "
            f"train_gpt.py {len(code):,} B")
        if data_path is None or tokenizer_path is None:
            default_data, default_tok = _default_corpus()
            data_path, tokenizer_path = data_path or default_data, tokenizer_path or default_tok
        data_path, tokenizer_path = str(Path(data_path).resolve()), str(Path(tokenizer_path).resolve())
        with tempfile.TemporaryDirectory(prefix="records-check-") as tmp:
            work = Path(tmp)
            copy = work / folder.name
            shutil.copytree(folder, copy)
            bundle = copy / "train_gpt.py"
            try:
                py_compile.compile(str(bundle), cfile=str(work / "train_gpt.pyc"), doraise=True)
            except py_compile.PyCompileError as err:
                raise CheckFailed(f"{folder / 'train_gpt.py'} does not compile: {err.msg}") from None
            report = _probe(bundle, _child_env({}), copy)
            log(f"check: python -I {bundle.name}: {len(report['bundled'])} modules, every one loaded from the "
                f"bundle (Triton kernels decorated without the interpreter)")
            dry = {**RUN_SETTINGS, "DRY_RUN": "1", "DATA_PATH": data_path, "TOKENIZER_PATH": tokenizer_path,
                   "RUNS_DIR": str(work / "runs")}
            out = _run([sys.executable, "-I", str(bundle)], _child_env(dry), copy, "DRY_RUN=1 python -I train_gpt.py",
                       timeout=300)
            if "DRY_RUN=1: nothing trained" not in out or "NOT READY" in out or "MISSING" in out:
                raise CheckFailed(f"DRY_RUN=1 python -I train_gpt.py did not find its data:\n{out[-3000:]}")
            log("check: DRY_RUN=1 ok")
            _short_runs(bundle, work, data_path, tokenizer_path, log)
    except CheckFailed as err:
        log(f"check FAILED: {err}")
        return 1
    log(f"check: {folder} passes")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.records check", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="records/<track>/<date>_<name>/")
    parser.add_argument("--data-path", help="dataset folder (default: the embedded corpus under data/)")
    parser.add_argument("--tokenizer-path", help="sentencepiece model (default: the embedded corpus's)")
    args = parser.parse_args(argv)
    return check_folder(args.folder, args.data_path, args.tokenizer_path)


if __name__ == "__main__":
    sys.exit(main())
