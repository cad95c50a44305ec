"""Benchmark results as CSV rows, a markdown table and one PNG plot per kernel.

Every row carries the machine (GPU, driver, CUDA, torch, triton) and the git commit, so a CSV read
months later still says what produced it. Percent-of-peak uses the GPU's datasheet peak and the
ceiling measured on the lent machines (cuBLAS bf16 8192^3 GEMM, device-to-device copy).
"""
from __future__ import annotations

import csv
import io
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from bench.registry import TIMING_SMOKE, Result
from model.io import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# name substring -> (datasheet bf16 dense TFLOP/s, measured GEMM TFLOP/s, datasheet GB/s, measured copy GB/s)
PEAKS = {
    "H100": (989.0, 798.0, 3350.0, 3000.0),
    "H200": (989.0, 788.0, 4800.0, 4300.0),
}
DEFAULT_PEAKS = PEAKS["H100"]  # the challenge's machine: numbers from anywhere else are read against it

ENV_COLUMNS = ["date", "gpu", "driver", "cuda", "torch", "triton", "commit"]
CASE_COLUMNS = ["kernel", "provider", "mode", "shape", "timing", "ms", "ms_p20", "ms_p80", "flops", "bytes",
                "tflops", "pct_peak_tflops", "pct_measured_tflops", "gbps", "pct_peak_bw", "pct_measured_bw",
                "peak_tflops", "measured_tflops", "peak_gbps", "measured_gbps", "error"]
CSV_COLUMNS = ENV_COLUMNS + CASE_COLUMNS


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """$OUROBOROS_COMMIT (for copies of the tree without .git), else HEAD, '-dirty' with uncommitted changes."""
    if os.environ.get("OUROBOROS_COMMIT"):
        return os.environ["OUROBOROS_COMMIT"]
    head = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def environment() -> dict:
    """The ENV_COLUMNS of this machine and checkout."""
    import torch
    import triton
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0].strip() if smi else "unknown"
    else:
        gpu, driver = f"cpu ({platform.machine()})", "none"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "gpu": gpu, "driver": driver,
            "cuda": torch.version.cuda or "none", "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit()}


def peaks_for(gpu: str) -> tuple[float, float, float, float]:
    for key, peaks in PEAKS.items():
        if key in gpu:
            return peaks
    return DEFAULT_PEAKS


def gpu_slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3', for file names."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
    return slug or "unknown"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_row(result: Result, env: dict) -> dict:
    """One CSV row (all values as strings) for a result."""
    case = result.case
    peak_tf, meas_tf, peak_bw, meas_bw = peaks_for(env["gpu"])
    tflops, gbps = result.tflops, result.gbps
    row = dict(env)
    row.update(kernel=case.kernel, provider=case.provider, mode=case.mode, shape=case.shape_label,
               timing=result.timing, ms=result.ms, ms_p20=result.ms_p20, ms_p80=result.ms_p80,
               flops=case.flops, bytes=case.bytes, tflops=tflops,
               pct_peak_tflops=None if tflops is None else 100 * tflops / peak_tf,
               pct_measured_tflops=None if tflops is None else 100 * tflops / meas_tf,
               gbps=gbps, pct_peak_bw=None if gbps is None else 100 * gbps / peak_bw,
               pct_measured_bw=None if gbps is None else 100 * gbps / meas_bw,
               peak_tflops=peak_tf, measured_tflops=meas_tf, peak_gbps=peak_bw, measured_gbps=meas_bw,
               error=result.error)
    return {k: _fmt(row[k]) for k in CSV_COLUMNS}


def write_csv(path: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a bench results CSV, missing columns {missing}")
        return list(reader)


def _num(text: str, digits: int) -> str:
    return "" if text == "" else f"{float(text):.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, headed by the machine they ran on."""
    if not rows:
        return "(no results)\n"
    first = rows[0]
    lines = []
    if any(r["timing"] == TIMING_SMOKE for r in rows):
        lines.append("**Interpreter smoke on CPU: the times are Triton-interpreter times, not GPU numbers.**\n")
    lines.append(f"{first['gpu']}, driver {first['driver']}, CUDA {first['cuda']}, torch {first['torch']}, "
                 f"triton {first['triton']}, commit {first['commit']}, {first['date']}. Peaks: "
                 f"{_num(first['peak_tflops'], 0)} TFLOP/s datasheet, {_num(first['measured_tflops'], 0)} measured; "
                 f"{_num(first['peak_gbps'], 0)} GB/s datasheet, {_num(first['measured_gbps'], 0)} measured.\n")
    header = ["kernel", "provider", "mode", "shape", "ms", "p20-p80 ms", "TFLOP/s", "% peak", "% measured",
              "GB/s", "% peak BW", "% measured BW"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        if r["error"]:
            cells = [r["kernel"], r["provider"], r["mode"], r["shape"], f"ERROR: {r['error']}"] + [""] * 7
        else:
            cells = [r["kernel"], r["provider"], r["mode"], r["shape"], _num(r["ms"], 4),
                     f"{_num(r['ms_p20'], 4)}-{_num(r['ms_p80'], 4)}", _num(r["tflops"], 1),
                     _num(r["pct_peak_tflops"], 1), _num(r["pct_measured_tflops"], 1), _num(r["gbps"], 0),
                     _num(r["pct_peak_bw"], 1), _num(r["pct_measured_bw"], 1)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per kernel: throughput per provider (bars) for each mode and shape (groups).

    TFLOP/s where the case counts flops, else GB/s. Returns the files written.
    """
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    written = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel and not r["error"]]
        use_flops = any(r["tflops"] for r in mine)
        metric, unit = ("tflops", "TFLOP/s") if use_flops else ("gbps", "GB/s")
        mine = [r for r in mine if r[metric]]
        if not mine:
            continue
        groups = list(dict.fromkeys(f"{r['mode']}\n{r['shape']}" for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(providers)) / 2), 4.5))
        for i, provider in enumerate(providers):
            values = {f"{r['mode']}\n{r['shape']}": float(r[metric]) for r in mine if r["provider"] == provider}
            xs = [g + (i - (len(providers) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [values.get(g, 0.0) for g in groups], width, label=provider)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(unit)
        smoke = any(r["timing"] == TIMING_SMOKE for r in mine)
        ax.set_title(f"{kernel} on {mine[0]['gpu']}" + (" (INTERPRETER SMOKE, not GPU numbers)" if smoke else ""),
                     fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        written.append(write_atomic(Path(out_dir) / f"{stem}_{kernel}.png", buf.getvalue()))
    return written
