"""`make gpu-check` (bench/gpu_check.py) on the CPU: the one-call plan fits 480 s, and each part's rows are on
disk the moment it ends, so a part killed at its budget loses nothing that finished before it."""
import json
import sys

import pytest

from bench import gpu_check
from bench import report as bench_report


def test_the_plan_fits_one_call_and_says_so(capsys):
    total = gpu_check.INSTALL_ALLOWANCE_S + sum(p.budget_s for p in gpu_check.PARTS)
    assert total <= gpu_check.LIMIT_S == 480
    assert [p.name for p in gpu_check.PARTS] == ["tests", "bench", "step", "frontier", "ttt", "ledger"]  # in order of value
    assert gpu_check.main(["--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"total: {total:.0f} s (limit 480 s)"
    parts = [line.split(":")[0] for line in lines if not line.startswith((" ", "install", "total"))]
    assert parts == list(gpu_check.STAGES)
    assert gpu_check.main(["--plan", "--stage", "bench", "--budget", "30"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"total: {gpu_check.INSTALL_ALLOWANCE_S + 30} s (limit 480 s)"


def test_default_selections_are_the_kernel_families():
    args = gpu_check.parse_args([])
    tests = gpu_check.stage_command("tests", args, gpu_check.REPO)
    assert set(gpu_check.KERNEL_TESTS) <= set(tests)
    for path in gpu_check.KERNEL_TESTS:
        assert (gpu_check.REPO / path).is_file(), path
    bench = gpu_check.stage_command("bench", args, gpu_check.REPO)
    assert bench[3:3 + len(gpu_check.KERNEL_BENCH)] == list(gpu_check.KERNEL_BENCH)
    ledger = gpu_check.stage_command("ledger", args, gpu_check.REPO)
    assert ledger[1:3] == ["-m", "bench.ledger"] and "--no-compiled" in ledger


def test_a_part_killed_at_its_budget_keeps_the_earlier_parts_rows(tmp_path, monkeypatch):
    (tmp_path / "test_quick.py").write_text("def test_ok():\n    assert 2 + 2 == 4\n")

    def command(stage, args, work):
        if stage == "tests":
            return [sys.executable, "-m", "pytest", str(tmp_path / "test_quick.py"), "-q", "-p", "no:xdist",
                    "-p", "no:cacheprovider", f"--junitxml={work / 'junit.xml'}", f"--rootdir={tmp_path}"]
        return [sys.executable, "-c", "import time; time.sleep(120)"]  # hangs: killed at its budget

    monkeypatch.setattr(gpu_check, "stage_command", command)
    monkeypatch.setattr(bench_report, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setitem(gpu_check.BUDGETS, "bench", 2)
    args = gpu_check.parse_args(["--stage", "tests,bench", "--copy-to", str(tmp_path / "out")])
    env = {"gpu": "Test GPU", "driver": "-", "cuda": "-", "torch": "-", "triton": "-", "commit": "abc",
           "date": "2026-12-01T00:00:00Z"}
    import time
    worst = gpu_check.run_parts(args, tmp_path / "work", env, time.perf_counter(), log=lambda *_: None)
    assert worst == 1
    json_path, md_path = gpu_check.results_paths("Test GPU", "2026-12-01")
    stages = {s["stage"]: s for s in json.loads(json_path.read_text())["stages"]}
    assert stages["tests"]["status"] == "passed" and stages["tests"]["summary"] == "1 passed"
    assert stages["bench"]["status"] == "timeout" and stages["bench"]["wall_s"] < 30
    assert "killed at its 2 s budget" in md_path.read_text()
    assert (tmp_path / "out" / json_path.name).is_file() and (tmp_path / "out" / "tests.log").is_file()


def test_no_part_runs_past_the_limit(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(gpu_check, "run_stage", lambda stage, args, work, budget: ran.append((stage, budget)))
    args = gpu_check.parse_args(["--stage", "step,ledger"])
    started = __import__("time").perf_counter() - (gpu_check.LIMIT_S - 8)  # 8 s of the limit left
    messages = []
    assert gpu_check.run_parts(args, tmp_path, {}, started, log=messages.append) == 1
    assert ran == [] and all("skipped" in m for m in messages) and len(messages) == 2


@pytest.mark.parametrize("argv, message", [(["--stage", "lint"], "unknown stage ['lint']"),
                                           (["--budget", "450"], "inside 8 minutes")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err
