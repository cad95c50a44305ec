"""quant/records.py: the records folder (`export`), the seeds' statistics (`stats`), the `check` hand-off,
and the run-log lines and summary.json numbers a record is read from.

Two real runs (seeds 7 and 8) of a 2-block model, 3 steps each with a round-to-nearest export, stand in
for a competitor's seeds; train_gpt.py is a fake bundle of bytes made here (quant/bundle.py is tested on
its own).
"""
import functools
import json
import math
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import kernels
from conftest import SMALL
from model import from_env
from quant import records
from quant import ledger as quant_ledger
from quant.artifact import ARTIFACT_NAME, read_artifact, write_artifact
from quant.export import export_run

SEEDS = (7, 8)
BUNDLE = b"# a stand-in for the bundle\n" * 40
DATE = "2026-12-01"


@pytest.fixture(scope="module")
def seed_runs(small_data, tmp_path_factory):
    """[runs/seed7, runs/seed8]: finished runs with their export step, as `python -m train` leaves them."""
    from train.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    kernels.set_backend("torch")
    try:
        with torch.random.fork_rng():
            for seed in SEEDS:
                cfg = from_env(environ={}, preset="tiny", runs_dir=str(runs), run_id=f"seed{seed}",
                               **{**SMALL, **small_data, "seed": seed, "quant_method": "rtn"})
                train(cfg, export_fn=functools.partial(export_run, compare=False), echo=False)
    finally:
        kernels.set_backend(None)
    return [runs / f"seed{seed}" for seed in SEEDS]


def only_line(pattern: str, text: str) -> re.Match:
    found = list(re.finditer(pattern, text, re.M))
    assert len(found) == 1, f"{pattern!r}: {len(found)} matching lines"
    return found[0]


# ---------------------------------------------------------------------------------------------- the run

def test_run_log_has_the_lines_reviewers_read(seed_runs):
    run = seed_runs[0]
    log = (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    export = summary["export"]
    versions = only_line(r"^versions: torch:(\S+) triton:(\S+) cuda:(\S+) gpu:(.+)$", log)
    assert versions.groups() == (torch.__version__, __import__("triton").__version__,
                                 torch.version.cuda or "none", "cpu")
    assert only_line(r"^model_params:\d+  train_shards:(\d+)  val_tokens:(\d+)  ", log).groups() == ("1", "2048")
    assert re.search(r"^lrs: .* seed:7$", log, re.M)
    stop = only_line(r"^train_stop: train_time_s:(\d+\.\d{3}) steps:(\d+)$", log)
    assert float(stop.group(1)) == pytest.approx(summary["train_time_ms"] / 1000, abs=6e-4)
    assert int(stop.group(2)) == summary["steps"] == 3
    calib = only_line(r"^calibration_s:(\d+\.\d{3}) train_plus_calibration_s:(\d+\.\d{3}) limit_s:600$", log)
    assert float(calib.group(1)) == pytest.approx(export["calibration_seconds"], abs=6e-4)
    assert float(calib.group(2)) == pytest.approx(summary["train_time_ms"] / 1000 + export["calibration_seconds"],
                                                  abs=1e-3)
    total = only_line(r"^Total submission size int6\+brotli: (\d+) bytes$", log)
    assert int(total.group(1)) == export["total_bytes"] == export["model_bytes"] + export["code_bytes"]
    short = only_line(r"^final_int6_sliding_window val_loss:(\d+\.\d{4}) val_bpb:(\d+\.\d{4}) eval_time:(\d+)ms$", log)
    assert int(short.group(3)) == round(1000 * export["roundtrip_eval_seconds"])
    exact = only_line(r"^final_int6_sliding_window_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log)
    assert exact.group(1) == f"{export['roundtrip_val_loss']:.8f}" and exact.group(2) == f"{export['roundtrip_val_bpb']:.8f}"
    assert export["roundtrip_eval_seconds"] > 0


def test_summary_val_bpb_is_the_artifacts(seed_runs):
    summary = json.loads((seed_runs[0] / "summary.json").read_text())
    export = summary["export"]
    assert summary["val_bpb"] == export["roundtrip_val_bpb"] and summary["val_loss"] == export["roundtrip_val_loss"]
    assert summary["float_val_bpb"] == export["float_val_bpb"] and summary["float_val_loss"] == export["float_val_loss"]
    assert summary["val_bpb"] != summary["float_val_bpb"]  # rounding to int6/int8/fp16 moved it


# ---------------------------------------------------------------------------------------------- export

SUBMISSION_KEYS = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_loss_std",
                   "val_bpb_std", "seeds", "seed_results", "bytes_total", "bytes_code", "hardware", "pytorch_version",
                   "triton_version", "cuda_version", "compliance", "bytes_by_kind"}


def test_export_writes_the_records_folder(seed_runs, tmp_path):
    baseline = [write_log(tmp_path / f"base{i}.log", loss, loss * 0.58) for i, loss in enumerate((3.9, 3.95, 4.0))]
    folder = records.export_records(seed_runs, "Tiny_2seeds", "10min", tmp_path / "out", BUNDLE, author="A. Person",
                                    github_id="aperson", blurb="Two seeds of a tiny model.", baseline=baseline,
                                    date=DATE, warn=pytest.fail)
    assert folder == tmp_path / "out" / "track_10min_16mb" / f"{DATE}_Tiny_2seeds"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                        "train_gpt.py", "train_seed7.log", "train_seed8.log"]
    assert (folder / "train_gpt.py").read_bytes() == BUNDLE
    for seed, run in zip(SEEDS, seed_runs):
        assert (folder / f"train_seed{seed}.log").read_bytes() == (run / "train.log").read_bytes()

    sub = json.loads((folder / "submission.json").read_text())
    assert set(sub) == SUBMISSION_KEYS
    assert set(sub["compliance"]) == {"train_time_max_s", "eval_time_max_s", "gptq_within_budget"}
    assert (sub["author"], sub["github_id"], sub["name"], sub["date"], sub["track"]) == \
        ("A. Person", "aperson", "Tiny_2seeds", DATE, "10min_16mb")
    assert sub["seeds"] == list(SEEDS) and sub["bytes_code"] == len(BUNDLE)
    summaries = [json.loads((run / "summary.json").read_text()) for run in seed_runs]
    for seed, s in zip(SEEDS, summaries):
        got, export = sub["seed_results"][str(seed)], s["export"]
        assert set(got) == {"val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "train_time_s",
                            "eval_time_s"}
        assert got["val_bpb"] == pytest.approx(s["val_bpb"], abs=5e-9)  # the log's 8 decimals
        assert got["val_loss"] == pytest.approx(s["val_loss"], abs=5e-9)
        assert got["artifact_bytes"] == export["model_bytes"] + len(BUNDLE)
        assert (got["steps"], got["step_avg_ms"]) == (s["steps"], s["step_avg_ms"])
        assert got["train_time_s"] == pytest.approx(s["train_time_ms"] / 1000 + export["calibration_seconds"], abs=1e-3)
        assert got["eval_time_s"] == pytest.approx(export["roundtrip_eval_seconds"], abs=1e-3)
    bpbs = [sub["seed_results"][str(seed)]["val_bpb"] for seed in SEEDS]
    losses = [sub["seed_results"][str(seed)]["val_loss"] for seed in SEEDS]
    assert sub["val_bpb"] == pytest.approx(np.mean(bpbs), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-8)
    assert sub["val_loss_std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-8)
    assert sub["bytes_total"] == max(r["artifact_bytes"] for r in sub["seed_results"].values())
    assert (sub["pytorch_version"], sub["cuda_version"], sub["hardware"]) == (torch.__version__, torch.version.cuda,
                                                                              "1x cpu")
    assert sub["compliance"]["gptq_within_budget"] is True

    reqs = (folder / "requirements.txt").read_text().splitlines()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and f"triton=={sub['triton_version']}" in reqs
    assert {line.split("==")[0] for line in reqs if not line.startswith("#")} == set(records.REQUIREMENTS)
    readme = (folder / "README.md").read_text()
    assert readme.startswith("# Tiny_2seeds\n\nTwo seeds of a tiny model.")
    assert "SEED=<seed> PRESET=tiny" in readme and "MODEL_DIM=64" in readme and "QUANT_METHOD=rtn" in readme
    assert "DATA_PATH=" not in readme and readme.count("python train_gpt.py") == 1
    for seed in SEEDS:
        r = sub["seed_results"][str(seed)]
        assert f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | 3 |" in readme
    assert f"`train_gpt.py` is {len(BUNDLE):,} B" in readme
    assert "## Against the baseline" in readme and "rule: improvement >= 0.005 nats at p < 0.01" in readme
    # each artifact by kind, as quant.inspect accounts for it (these runs' OUROPTZ: its categories and header)
    assert set(sub["bytes_by_kind"]) == {str(seed) for seed in SEEDS}
    for seed, run in zip(SEEDS, seed_runs):
        kinds = sub["bytes_by_kind"][str(seed)]
        led = quant_ledger.build_ledger(run / ARTIFACT_NAME, project=False, code=len(BUNDLE))
        assert [k["kind"] for k in kinds] == [label for _, label, _ in quant_ledger.CATEGORIES] + ["header"]
        assert [(k["values"], k["bytes"]) for k in kinds] == \
            [(led.values[key], led.bytes[key]) for key, _, _ in quant_ledger.CATEGORIES] + [(0, led.bytes["header"])]
        assert sum(k["share"] for k in kinds) == pytest.approx(1, abs=1e-3)
        for k in kinds:
            bits = "" if k["bits_per_value"] is None else f"{k['bits_per_value']:.3f}"
            assert f"| {seed} | {k['kind']} | {k['values']:,} | {k['bytes']:,} | {bits} | {k['share']:.2%} |" in readme

    with pytest.raises(records.RecordsError, match="already exists"):  # never over an earlier export
        records.export_records(seed_runs, "Tiny_2seeds", "10min", tmp_path / "out", BUNDLE, date=DATE, warn=print)


@pytest.fixture
def fake_bundle(monkeypatch):
    """quant.bundle as the CLI imports it, building BUNDLE."""
    monkeypatch.setitem(sys.modules, "quant.bundle", types.SimpleNamespace(build_bundle=lambda root=None: BUNDLE))


def test_export_cli_one_seed_without_author_warns(seed_runs, tmp_path, monkeypatch, capsys, fake_bundle):
    monkeypatch.delenv("AUTHOR", raising=False)
    monkeypatch.delenv("GITHUB_ID", raising=False)
    code = records.main(["export", "--run", str(seed_runs[1]), "--name", "one", "--track", "non_record",
                         "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: no author" in err and "--author" in err and "warning: no github_id" in err
    (folder,) = (tmp_path / "track_non_record_16mb").iterdir()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_one", folder.name)
    sub = json.loads((folder / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["track"], sub["seeds"]) == ("", "", "non_record_16mb", [8])
    assert sub["val_bpb_std"] is None and sub["val_loss_std"] is None
    monkeypatch.setenv("AUTHOR", "From Env")
    monkeypatch.setenv("GITHUB_ID", "fromenv")
    assert records.main(["export", "--run", str(seed_runs[1]), "--name", "two", "--out", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
    sub = json.loads(next((tmp_path / "track_10min_16mb").iterdir()).joinpath("submission.json").read_text())
    assert (sub["author"], sub["github_id"]) == ("From Env", "fromenv")


def test_export_accounts_for_a_pergroup_artifact_by_kind(seed_runs, tmp_path):
    """A run whose artifact is in the per-group container (here seed 8's tensors written again that way): the
    record lists the ledger's kinds with bits per value and share; a run without its artifact is warned about."""
    run = tmp_path / "seed8"
    shutil.copytree(seed_runs[1], run)
    stored = read_artifact(run / ARTIFACT_NAME)
    write_artifact(run / ARTIFACT_NAME, stored.tensors, stored.config, container="pergroup", coder="brotli")
    folder = records.export_records([run], "pergroup", "10min", tmp_path / "out", BUNDLE, author="a", github_id="b",
                                    date=DATE, warn=pytest.fail)
    kinds = json.loads((folder / "submission.json").read_text())["bytes_by_kind"]["8"]
    led = quant_ledger.build_ledger(run / ARTIFACT_NAME, project=False, code=len(BUNDLE))
    assert [(k["kind"], k["values"], k["bytes"]) for k in kinds] == [(label, n, size) for _, label, n, size in led.kinds]
    assert [k["kind"] for k in kinds] == [label for _, label in quant_ledger.KINDS]
    assert sum(k["share"] for k in kinds) == pytest.approx(1, abs=1e-3)
    readme = (folder / "README.md").read_text()
    for k in kinds:
        assert (k["bits_per_value"] is None) == (k["values"] == 0)
        bits = "" if k["bits_per_value"] is None else f"{k['bits_per_value']:.3f}"
        assert f"| 8 | {k['kind']} | {k['values']:,} | {k['bytes']:,} | {bits} | {k['share']:.2%} |" in readme
    (run / ARTIFACT_NAME).unlink()
    warned = []
    folder = records.export_records([run], "none", "10min", tmp_path / "out", BUNDLE, author="a", github_id="b",
                                    date=DATE, warn=warned.append)
    assert warned == [f"warning: run {run} has no {ARTIFACT_NAME}: no bytes by kind for seed 8"]
    assert "bytes_by_kind" not in json.loads((folder / "submission.json").read_text())
    assert "by kind of stored value" not in (folder / "README.md").read_text()


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, message", [
    ("no summary", r"no summary\.json"),
    ("no log", r"no train\.log"),
    ("diverged", r"did not finish \(non-finite loss"),
    ("no export", r"export step did not finish"),
    ("other config", r"differ in more than SEED: MODEL_DIM=64 vs 96"),
    ("same seed", r"SEED=7 is the seed of more than one run"),
])
def test_export_refuses(seed_runs, tmp_path, capsys, fake_bundle, case, message):
    bad = tmp_path / "bad"
    shutil.copytree(seed_runs[1], bad)
    runs = [seed_runs[0], bad]
    if case == "no summary":
        (bad / "summary.json").unlink()
    elif case == "no log":
        (bad / "train.log").unlink()
    elif case == "diverged":
        _edit_json(bad / "summary.json", status="diverged", error="non-finite loss at step 2")
    elif case == "no export":
        summary = json.loads((bad / "summary.json").read_text())
        del summary["export"]
        (bad / "summary.json").write_text(json.dumps(summary))
    elif case == "other config":
        _edit_json(bad / "config.json", model_dim=96)
    else:
        runs = [seed_runs[0], seed_runs[0]]
    argv = ["export", "--name", "x", "--out", str(tmp_path / "out")]
    for run in runs:
        argv += ["--run", str(run)]
    assert records.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_check_hands_its_arguments_to_records_check(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "quant.records_check",
                        types.SimpleNamespace(main=lambda argv: seen.append(argv) or 1))
    assert records.main(["check", "records/x", "--data-path", "/d", "--tokenizer-path", "/t"]) == 1
    assert seen == [["records/x", "--data-path", "/d", "--tokenizer-path", "/t"]]


# ---------------------------------------------------------------------------------------------- stats

def write_log(path, val_loss, val_bpb):
    path.write_text(f"step:3/3 train_loss:4.0\nfinal_int6_sliding_window_exact val_loss:{val_loss:.8f} "
                    f"val_bpb:{val_bpb:.8f}\nsummary: x\n")
    return path


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom: its density integrated numerically."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, abs(t), 2_000_001)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    between = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))  # trapezoids from 0 to |t|
    return 0.5 - math.copysign(between, t)


BPB_PER_NAT = 0.58  # the logs' val_bpb / val_loss


def test_stats_against_a_hand_computation(tmp_path, capsys):
    candidate = [2.300, 2.302, 2.298]    # mean 2.300, sample variance (0 + 2e-3^2 + 2e-3^2) / 2 = 4e-6
    baseline = [2.310, 2.313, 2.307]     # mean 2.310, sample variance (0 + 3e-3^2 + 3e-3^2) / 2 = 9e-6
    cand = [write_log(tmp_path / f"c{i}.log", v, v * BPB_PER_NAT) for i, v in enumerate(candidate)]
    base = [write_log(tmp_path / f"b{i}.log", v, v * BPB_PER_NAT) for i, v in enumerate(baseline)]
    got = records.compare_scores(records.Scores.from_logs(cand), records.Scores.from_logs(base))

    # Welch: se^2 = s_b^2/n_b + s_c^2/n_c = 9e-6/3 + 4e-6/3; df = se^4 / ((s_b^2/n_b)^2/(n_b-1) + (s_c^2/n_c)^2/(n_c-1))
    se2 = 9e-6 / 3 + 4e-6 / 3
    df = se2 ** 2 / ((9e-6 / 3) ** 2 / 2 + (4e-6 / 3) ** 2 / 2)
    assert df == pytest.approx(3.4845360824742267)
    t_plain = 0.010 / math.sqrt(se2)           # improvement 2.310 - 2.300
    t_rule = (0.010 - 0.005) / math.sqrt(se2)  # improvement over the 0.005-nat bar
    assert got["improvement_loss"] == pytest.approx(0.010, abs=1e-12)
    for key, t in (("plain_loss", t_plain), ("rule_loss", t_rule)):
        assert got[key]["t"] == pytest.approx(t, rel=1e-9) and got[key]["df"] == pytest.approx(df, rel=1e-9)
        assert got[key]["p"] == pytest.approx(student_t_sf(t, df), abs=1e-7)
    assert 0.01 < got["rule_loss"]["p"] < 0.05 and not got["passes"]  # 3 seeds this close: not yet a record
    # In bpb every value is 0.58 x its loss: the same t and df, the bar 0.005 x 0.58 bpb, tokens/byte 0.58 ln 2
    assert got["margin_bpb"] == pytest.approx(0.005 * BPB_PER_NAT, rel=1e-6)
    assert got["tokens_per_byte"] == pytest.approx(BPB_PER_NAT * math.log(2), rel=1e-6)
    assert got["rule_bpb"]["t"] == pytest.approx(t_rule, rel=1e-5)
    assert got["plain_bpb"]["t"] == pytest.approx(t_plain, rel=1e-5)

    further = [write_log(tmp_path / f"f{i}.log", v + 0.01, (v + 0.01) * BPB_PER_NAT) for i, v in enumerate(baseline)]
    better = records.compare_scores(records.Scores.from_logs(cand), records.Scores.from_logs(further))
    t = (0.020 - 0.005) / math.sqrt(se2)
    assert better["rule_loss"]["t"] == pytest.approx(t, rel=1e-8) and better["passes"]
    assert better["rule_loss"]["p"] == pytest.approx(student_t_sf(t, df), abs=1e-7)
    assert better["rule_loss"]["p"] < 0.01

    assert records.main(["stats", *map(str, cand), "--baseline", *map(str, further)]) == 0
    out = capsys.readouterr().out
    assert f"seeds: 3  val_loss 2.30000000 ± {0.002:.8f}" in out and "-> passes" in out
    assert "val_loss +0.02000000 nats" in out and f"= {0.005 * BPB_PER_NAT:.6f} bpb" in out


def test_stats_one_seed_and_bad_logs(tmp_path, capsys):
    one = write_log(tmp_path / "one.log", 2.5, 1.45)
    assert records.main(["stats", str(one), "--baseline", str(one)]) == 0
    out = capsys.readouterr().out
    assert "val_loss 2.50000000 (one seed: no std)" in out and "no test (needs at least 2 seeds on each side)" in out
    (tmp_path / "float_only.log").write_text("final_sliding_window val_loss:2.5000 val_bpb:1.4500\n")
    assert records.main(["stats", str(tmp_path / "float_only.log")]) == 2
    assert "float_only.log: no `final_int6_sliding_window_exact" in capsys.readouterr().err
    assert records.main(["stats", str(tmp_path / "absent.log")]) == 2
    assert "absent.log" in capsys.readouterr().err


def test_a_ttt_score_is_the_last_exact_line_and_its_eval_time_the_clock(seed_runs):
    """With TTT_ENABLED=1 the export step writes the diagnostic score, then TTT's: the records read TTT's line as
    the score and, for the eval time, the eval clock's total (decompression, dequantization, warmup, the loop)."""
    from quant import records_check

    log = (seed_runs[0] / "train.log").read_text()
    ttt = ("eval_clock: decompress:1.2s dequantize:0.3s warmup:40.0s ttt:300.5s total:342.0s limit_s:600\n"
           "final_int6_ttt_phased val_loss:2.1000 val_bpb:1.0500 eval_time:342000ms\n"
           "final_int6_ttt_phased_exact val_loss:2.10000000 val_bpb:1.05000000\n")
    assert records.exact_score(log + ttt, "log") == (2.1, 1.05)
    assert records.exact_score(log, "log") != (2.1, 1.05)  # without TTT: the artifact's own score line
    parsed = records_check.parse_log(log + ttt, "log")
    assert (parsed["val_bpb"], parsed["eval_time_s"]) == (1.05, 342.0)
    export = dict(roundtrip_eval_seconds=12.5)
    assert records.eval_seconds(export) == 12.5
    assert records.eval_seconds(dict(export, eval_clock=dict(total_s=342.0))) == 342.0
