"""The report of an ablation (`python -m train.arms`): per-arm statistics, the control's pin, tables and plots.

build_report() reads the finished runs' folders (summary.json, train.log) and returns the report as a dict
(report.json); write_report() writes it as report.md, report.csv (one row per arm), runs.csv (one row per run),
report.json, curves.png and scores.png, each atomically, so a reader never sees half a file. The statistics
are quant.records': the round-trip score is each log's `final_int6_*_exact` line (Scores.from_logs), mean and
sample std by mean_std, and the comparison with the control by compare_scores (one-sided Welch t-tests, the
challenge's 0.005-nat rule at p < 0.01). Not on the run path: no run imports this module.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from model.io import write_atomic
from quant.records import RULE_NATS, RULE_P, RecordsError, Scores, compare_scores, exact_score, mean_std

METRICS = ("val_bpb", "float_val_bpb")  # what a pin (`expect`) may name: the round-trip or the float score


@dataclass(frozen=True)
class Expect:
    """A pinned score: the arm's mean `metric` should lie within value ± tol."""
    value: float
    tol: float
    metric: str = "val_bpb"

    def text(self) -> str:
        return f"{self.value:g} ± {self.tol:g}"


@dataclass
class RunRow:
    """One (arm, seed) as the report shows it. status: finished, failed, interrupted, running, pending."""
    run_id: str
    arm: str
    seed: int
    status: str
    folder: Path | None = None   # where its results are (its own folder, or a run with the same key)
    note: str = ""               # failed: the output's last line; an alias: which run it shares
    seconds: float | None = None
    summary: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / "train.log"


@dataclass(frozen=True)
class ArmInfo:
    name: str
    control: bool
    overrides: str = ""           # the arm's own variables, for the table
    expect: Expect | None = None


def read_summary(folder: Path) -> dict:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def finished_summary(folder: Path) -> dict | None:
    """The summary of a run that finished with a scored artifact (its log has the exact score line), else None."""
    summary = read_summary(folder)
    if summary.get("status") != "finished" or "roundtrip_val_bpb" not in (summary.get("export") or {}):
        return None
    try:
        exact_score((folder / "train.log").read_text(), str(folder))
    except (OSError, RecordsError):
        return None
    return summary


def _ms(values) -> list | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean, std = mean_std(values)
    return [mean, std]


def clears_bar(comparison: dict | None) -> bool | None:
    """The challenge's bar (a gain of RULE_NATS at p < RULE_P), tested in bpb: RULE_NATS at the arm's own tokens
    per byte (compare_scores' rule_bpb). With one tokenizer it is the val_loss test, scaled; across tokenizers
    (sp1024 against sp8192) val_loss per token is no common measure, and bits per byte is."""
    if comparison is None or comparison["rule_bpb"] is None:
        return None
    return comparison["rule_bpb"]["p"] < RULE_P


def _check_pin(arm: ArmInfo, scores: Scores | None, floats: list[float]) -> dict | None:
    if arm.expect is None:
        return None
    pin = arm.expect
    if pin.metric == "val_bpb":
        values = list(scores.val_bpb) if scores else []
    else:
        values = floats
    if not values:
        return dict(metric=pin.metric, value=pin.value, tol=pin.tol, mean=None, drift=None, n=0)
    mean = math.fsum(values) / len(values)
    return dict(metric=pin.metric, value=pin.value, tol=pin.tol, mean=mean, n=len(values),
                drift=abs(mean - pin.value) > pin.tol)


def build_report(title: str, arms: list[ArmInfo], rows: list[RunRow], header: list[str] | None = None) -> dict:
    """The report as a dict: one entry per arm (ranked by mean round-trip val_bpb), one per run, the pins."""
    control = next(a.name for a in arms if a.control)
    by_arm = {a.name: [r for r in rows if r.arm == a.name] for a in arms}
    scores = {}
    for name, arm_rows in by_arm.items():
        done = [r for r in arm_rows if r.status == "finished"]
        scores[name] = Scores.from_logs([r.log for r in done]) if done else None
    out_arms = []
    for arm in arms:
        done = [r for r in by_arm[arm.name] if r.status == "finished"]
        sums = [r.summary for r in done]
        floats = [s.get("float_val_bpb") for s in sums]
        entry = dict(
            name=arm.name, control=arm.control, overrides=arm.overrides, n=len(done), runs=len(by_arm[arm.name]),
            failed=sum(r.status == "failed" for r in by_arm[arm.name]),
            seeds=[r.seed for r in done], logs=[str(r.log) for r in done],
            val_bpb=_ms(scores[arm.name].val_bpb) if scores[arm.name] else None,
            val_loss=_ms(scores[arm.name].val_loss) if scores[arm.name] else None,
            val_bpb_values=list(scores[arm.name].val_bpb) if scores[arm.name] else [],
            float_val_bpb=_ms(floats),
            quant_gap=_ms((s.get("export") or {}).get("quant_gap_bpb") for s in sums),
            step_avg_ms=_ms(s.get("step_avg_ms") for s in sums),
            steps=_ms(s.get("steps") for s in sums),
            artifact_bytes=_ms((s.get("export") or {}).get("total_bytes") for s in sums),
            artifact_bytes_max=max(((s.get("export") or {}).get("total_bytes") or 0 for s in sums), default=None),
            pin=_check_pin(arm, scores[arm.name], [f for f in floats if f is not None]),
            vs_control=None)
        if not arm.control and scores[arm.name] and scores[control]:
            entry["vs_control"] = compare_scores(scores[arm.name], scores[control])
        out_arms.append(entry)
    ranked = sorted((a for a in out_arms if a["val_bpb"]), key=lambda a: a["val_bpb"][0])
    for i, a in enumerate(ranked, 1):
        a["rank"] = i
    out_arms.sort(key=lambda a: (a.get("rank") is None, a.get("rank") or 0))
    pins = []
    for a in out_arms:
        pin = a["pin"]
        if pin is None or pin["mean"] is None:
            continue
        role = "control" if a["control"] else "arm"
        what = "val_bpb" if pin["metric"] == "val_bpb" else "float val_bpb"
        if pin["drift"]:
            pins.append(f"**DRIFT**: {role} `{a['name']}` {what} {pin['mean']:.5f} (mean of {pin['n']}) lies outside "
                        f"its pin {pin['value']:g} ± {pin['tol']:g} (by {pin['mean'] - pin['value']:+.5f}): find what "
                        "changed, or repin it (`expect` in the file)")
        else:
            pins.append(f"pin held: {role} `{a['name']}` {what} {pin['mean']:.5f} (mean of {pin['n']}) within "
                        f"{pin['value']:g} ± {pin['tol']:g}")
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "failed", "interrupted", "running", "pending")}
    return dict(
        title=title, control=control, header=header or [], pins=pins, counts=counts,
        updated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        rule=dict(nats=RULE_NATS, p=RULE_P), arms=out_arms,
        runs=[dict(run_id=r.run_id, arm=r.arm, seed=r.seed, status=r.status, folder=str(r.folder or ""),
                   note=r.note, seconds=r.seconds,
                   val_bpb=(r.summary.get("val_bpb") if r.status == "finished" else None),
                   float_val_bpb=r.summary.get("float_val_bpb"), steps=r.summary.get("steps"),
                   step_avg_ms=r.summary.get("step_avg_ms"),
                   artifact_bytes=(r.summary.get("export") or {}).get("total_bytes")) for r in rows])


# ---------------------------------------------------------------------------------------------- text


def _f(pair, digits=4, std=True) -> str:
    if not pair:
        return "–"
    mean, sd = pair
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if std and sd is not None else "")


def _p(result) -> str:
    return "–" if result is None else f"{result['p']:.3g}"


def markdown(report: dict) -> str:
    rows = []
    for a in report["arms"]:
        c = a["vs_control"]
        if a["control"]:
            delta, p, bar = "control", "", ""
        elif c is None:
            delta, p, bar = "–", "–", "–"
        else:
            delta = f"{-c['improvement_bpb']:+.4f}"
            p = _p(c["plain_bpb"])
            bar = ("–" if clears_bar(c) is None else "**yes**" if clears_bar(c) else "no") \
                + ("" if c["rule_bpb"] is None else f" (p {_p(c['rule_bpb'])})")
        n = f"{a['n']}" if a["n"] == a["runs"] else f"{a['n']}/{a['runs']}"
        rows.append(f"| {a.get('rank', '–')} | `{a['name']}` | {n} | {_f(a['float_val_bpb'])} | {_f(a['val_bpb'])} | "
                    f"{_f(a['quant_gap'], 4)} | {_f(a['step_avg_ms'], 1)} | {_f(a['steps'], 0, std=False)} | "
                    + (f"{a['artifact_bytes_max']:,}" if a["artifact_bytes_max"] else "–")
                    + f" | {delta} | {p} | {bar} |")
    counts = report["counts"]
    progress = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    lines = [f"# {report['title']}", ""]
    if report["pins"]:
        lines += [*[f"{line}  " for line in report["pins"]], ""]
    lines += [f"Updated {report['updated']}: {progress}.", "", *report["header"], "",
              "## Arms, ranked by round-trip val_bpb (lower is better)", "",
              "| rank | arm | n | float val_bpb | round-trip val_bpb | quant gap | step_avg ms | steps "
              "| artifact bytes (max) | Δ val_bpb vs control | p (Δ < 0) | clears the 0.005-nat bar |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
              "Each cell is the mean ± the sample std over the arm's finished seeds (n). The round-trip val_bpb is "
              "the artifact's score, read from each run's `final_int6_*_exact` line (what `python -m quant.records "
              "stats` reads); the quant gap is round trip minus float. Δ is the arm's mean minus the control's; p is "
              "the one-sided Welch t-test that the arm's mean is lower than the control's (`–` needs 2 seeds a "
              "side). "
              f"The bar is the challenge's rule, a gain of at least {RULE_NATS} nats at p < {RULE_P}, tested the same "
              "way in bpb (the 0.005 nats at the arm's own tokens per byte: the val_loss test when the arms share a "
              "tokenizer, and the only fair one when they do not; its p in brackets). "
              "With two seeds a side the test has about two degrees of freedom: "
              "only a large, consistent difference reaches p < 0.01; a small p with few seeds is a lead to confirm "
              "with more seeds, and p > 0.05 says the seeds cannot tell the arms apart, not that they are equal.", ""]
    overrides = [f"- `{a['name']}`: {a['overrides'] or 'the base configuration'}" for a in report["arms"]]
    lines += ["## What each arm sets", "", *overrides, ""]
    lines += ["![val_bpb and train loss by step](curves.png)", "", "![final scores](scores.png)", ""]
    run_rows = []
    for r in report["runs"]:
        score = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "–"
        secs = f"{r['seconds']:.0f}" if r["seconds"] else "–"
        note = r["note"].replace("|", "\\|")
        run_rows.append(f"| {r['run_id']} | `{r['arm']}` | {r['seed']} | {r['status']} | {score} | "
                        f"{r['steps'] if r['steps'] is not None else '–'} | {secs} | {note} |")
    lines += ["## Runs", "", "| run | arm | seed | status | val_bpb | steps | seconds | note |",
              "|---|---|---|---|---|---|---|---|", *run_rows, ""]
    if report.get("plot_error"):
        lines += [f"(plots not drawn: {report['plot_error']})", ""]
    return "\n".join(lines)


ARM_COLUMNS = ("rank", "arm", "control", "n", "runs", "failed", "float_val_bpb_mean", "float_val_bpb_std",
               "val_bpb_mean", "val_bpb_std", "val_loss_mean", "val_loss_std", "quant_gap_mean", "quant_gap_std",
               "step_avg_ms_mean", "step_avg_ms_std", "steps_mean", "artifact_bytes_mean", "artifact_bytes_max",
               "delta_val_bpb", "p_improvement_bpb", "p_rule", "clears_bar", "pin", "pin_drift", "overrides")
RUN_COLUMNS = ("run_id", "arm", "seed", "status", "val_bpb", "float_val_bpb", "steps", "step_avg_ms",
               "artifact_bytes", "seconds", "folder", "note")


def _csv(columns, rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def arms_csv(report: dict) -> str:
    rows = []
    for a in report["arms"]:
        c = a["vs_control"]
        row = dict(rank=a.get("rank"), arm=a["name"], control=int(a["control"]), n=a["n"], runs=a["runs"],
                   failed=a["failed"], artifact_bytes_max=a["artifact_bytes_max"], overrides=a["overrides"])
        for key in ("float_val_bpb", "val_bpb", "val_loss", "quant_gap", "step_avg_ms", "artifact_bytes"):
            if a[key]:
                row[f"{key}_mean"], row[f"{key}_std"] = a[key]
        row["steps_mean"] = a["steps"][0] if a["steps"] else None
        if c is not None:
            row.update(delta_val_bpb=-c["improvement_bpb"],
                       p_improvement_bpb=c["plain_bpb"]["p"] if c["plain_bpb"] else None,
                       p_rule=c["rule_bpb"]["p"] if c["rule_bpb"] else None,
                       clears_bar=None if clears_bar(c) is None else int(clears_bar(c)))
        if a["pin"]:
            row["pin"] = f"{a['pin']['metric']} {a['pin']['value']:g}+-{a['pin']['tol']:g}"
            row["pin_drift"] = None if a["pin"]["drift"] is None else int(a["pin"]["drift"])
        rows.append(row)
    return _csv(ARM_COLUMNS, rows)


def runs_csv(report: dict) -> str:
    return _csv(RUN_COLUMNS, report["runs"])


# ---------------------------------------------------------------------------------------------- plots


def _band(series: list[list[float]]):
    """Mean, min and max over equally long series."""
    import numpy as np

    arr = np.asarray(series, dtype=np.float64)
    return arr.mean(0), arr.min(0), arr.max(0)


def _smooth(values, window: int):
    import numpy as np

    if window <= 1 or len(values) < window:
        return np.asarray(values, dtype=np.float64)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot(report: dict, rows: list[RunRow], folder: Path) -> None:
    """curves.png (val_bpb by step: mean over seeds with the min-max band; train loss the same, smoothed) and
    scores.png (each arm's mean round-trip val_bpb with its std as error bar, its seeds as dots, pins as bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = [a["name"] for a in report["arms"]]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(order)}
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in order:
        sums = [r.summary for r in rows if r.arm == name and r.status == "finished"]
        if not sums:
            continue
        histories = [{h["step"]: h["val_bpb"] for h in s.get("val_history", [])} for s in sums]
        steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
        if steps:
            mean, lo, hi = _band([[h[s] for s in steps] for h in histories])
            ax_val.plot(steps, mean, marker="o", ms=3, color=colors[name], label=f"{name} (n={len(sums)})")
            ax_val.fill_between(steps, lo, hi, color=colors[name], alpha=0.2)
        losses = [s.get("train_losses") or [] for s in sums]
        length = min(len(x) for x in losses)
        if length:
            window = max(1, length // 50)
            mean, lo, hi = _band([_smooth(np.asarray(x[:length]), window) for x in losses])
            x = np.arange(1, length + 1)
            ax_loss.plot(x, mean, color=colors[name], label=name)
            ax_loss.fill_between(x, lo, hi, color=colors[name], alpha=0.2)
    ax_val.set(title="val_bpb during training (mean, min-max over seeds)", xlabel="step", ylabel="val_bpb")
    ax_loss.set(title="train loss (moving average; mean, min-max over seeds)", xlabel="step", ylabel="train loss")
    for ax in (ax_val, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(folder / "curves.png", lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)

    scored = [a for a in report["arms"] if a["val_bpb"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(order) + 2), 4.8))
    if scored:
        values = [v for a in scored for v in a["val_bpb_values"]]
        pins = [(a["pin"]["value"] - a["pin"]["tol"], a["pin"]["value"] + a["pin"]["tol"]) for a in scored
                if a["pin"] and a["pin"]["metric"] == "val_bpb"]
        low = min(values + [p[0] for p in pins])
        high = max(values + [a["val_bpb"][0] + (a["val_bpb"][1] or 0) for a in scored] + [p[1] for p in pins])
        pad = max(high - low, 1e-4) * 0.25
        base = low - pad
        for i, a in enumerate(scored):
            mean, sd = a["val_bpb"]
            ax.bar(i, mean - base, bottom=base, color=colors[a["name"]], alpha=0.85 if a["control"] else 0.6,
                   edgecolor="black" if a["control"] else "none", yerr=sd or 0, capsize=6)
            ax.scatter([i] * len(a["val_bpb_values"]), a["val_bpb_values"], color="black", s=14, zorder=3)
            pin = a["pin"]
            if pin and pin["metric"] == "val_bpb":
                ax.fill_between([i - 0.45, i + 0.45], pin["value"] - pin["tol"], pin["value"] + pin["tol"],
                                color="red" if pin["drift"] else "green", alpha=0.25, hatch="//",
                                label=f"pin of {a['name']}")
        ax.set_ylim(base, high + pad)
        ax.set_xticks(range(len(scored)), [a["name"] + ("\n(control)" if a["control"] else "") for a in scored],
                      rotation=20, ha="right")
        if any(a["pin"] for a in scored):
            ax.legend(fontsize=8)
    ax.set(title="round-trip val_bpb (mean ± sample std; dots: seeds)", ylabel="val_bpb")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_atomic(folder / "scores.png", lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_report(folder: Path, title: str, arms: list[ArmInfo], rows: list[RunRow],
                 header: list[str] | None = None) -> dict:
    """Build the report and write its files into `folder`; returns the report."""
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(title, arms, rows, header)
    try:
        plot(report, rows, folder)
    except Exception as err:  # a plot must never stop an experiment: the tables still get written
        report["plot_error"] = f"{type(err).__name__}: {err}"
    write_atomic(folder / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_atomic(folder / "report.csv", arms_csv(report))
    write_atomic(folder / "runs.csv", runs_csv(report))
    write_atomic(folder / "report.md", markdown(report))
    return report
