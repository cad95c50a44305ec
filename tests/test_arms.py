"""python -m train.arms: an experiment file's arms x seeds run end to end, the report's statistics are
quant.records', a killed experiment resumes, bad files stop before anything runs, greedy selection runs rounds.

Runs are 20-step runs of a 2-block model on a cut of the embedded corpus (tests/conftest.py SMALL). Most run in
this process (`in_process`: what `python -m train` does, without an interpreter start per run); the resume test
runs the tool and its runs as the real commands.
"""
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernels
from conftest import SMALL
from quant.records import Scores, compare_scores, mean_std
from train import arms

REPO = Path(__file__).resolve().parents[1]
ARM_TOML = """
[[arm]]
name = "base"
control = true

[[arm]]
name = "lr"
env = { MATRIX_LR = 0.03, TIED_EMBED_LR = 0.035, SCALAR_LR = 0.025 }

[[arm]]
name = "wd"
env = { MUON_WEIGHT_DECAY = 0.0 }
"""
# The control learns nothing (every LR 0, set for all arms), so that `lr` beats it by far more than the seeds'
# noise and a greedy round keeps it; `wd` changes nothing at LR 0.
CANDIDATES_TOML = ARM_TOML.split("\n\n", 1)[1].replace("[[arm]]", "[[candidate]]")  # the two arms as candidates


def small_env(data: dict) -> str:
    """The shared env table: SMALL at 20 steps on the small corpus, the PyTorch kernels, the LRs at 0."""
    values = {k.upper(): v for k, v in SMALL.items() if k not in ("seed", "iterations", "max_wallclock_seconds")}
    values.update(VAL_LOSS_EVERY=10, TRAIN_LOG_EVERY=5, EVAL_STRIDE=64, GPTQ_CAL_SAMPLES=4, GPTQ_CAL_SEQ_LEN=64,
                  QUANT_SMALL_NUMEL=1024, WARMDOWN_ITERS=5, MATRIX_LR=0.0, TIED_EMBED_LR=0.0, SCALAR_LR=0.0,
                  DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer_path"], KERNELS="torch")
    return "env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


def experiment_file(folder: Path, data: dict, arms_toml: str = ARM_TOML, seeds=(1, 2), extra: str = "") -> Path:
    path = folder / "exp.toml"
    path.write_text(f'title = "test"\npreset = "tiny"\nseeds = {list(seeds)}\nsteps = 20\nseconds_per_run = 5\n'
                    f"{extra}{small_env(data)}\n{arms_toml}")
    return path


class Lines(io.TextIOBase):
    def __init__(self, on_line):
        self.on_line, self.buffer = on_line, ""

    def write(self, text):
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.on_line(line)
        return len(text)


class InProcess:
    """A launcher that does what `python -m train` does, in this process; counts its runs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, command, env, on_line):
        import train.__main__ as entry

        assert command[1:] == ["-m", "train"]
        self.calls += 1
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        kernels.set_backend(None)
        out = Lines(on_line)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), torch.random.fork_rng():
                return entry.main()
        finally:
            out.write("\n")
            os.environ.clear()
            os.environ.update(saved)
            kernels.set_backend(None)


def run_tool(argv, launcher=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = arms.main([str(a) for a in argv], launcher=launcher, out=out)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def experiment(small_data, tmp_path_factory):
    """3 arms x 2 seeds x 20 steps, run once through the tool: once per session, whichever pytest-xdist worker
    comes first (the others wait for it and read its folder)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above every worker's own
    folder = shared / "arms-experiment"
    with FileLock(str(shared / "arms-experiment.lock")):
        if not (folder / "exp" / "report.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            path = experiment_file(folder, small_data)
            launcher = InProcess()
            code, out, err = run_tool([path, "--out", folder / "exp"], launcher)
            assert code == 0, out + err
            assert launcher.calls == 6
    return dict(file=folder / "exp.toml", dir=folder / "exp")


def test_an_experiment_runs_end_to_end_with_its_report(experiment):
    root = experiment["dir"]
    for name in ("report.md", "report.csv", "runs.csv", "report.json", "curves.png", "scores.png"):
        assert (root / name).is_file(), name
    for name in ("curves.png", "scores.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "experiment.toml").read_bytes() == experiment["file"].read_bytes()
    report = json.loads((root / "report.json").read_text())
    assert report["counts"]["finished"] == 6 and report["control"] == "base"
    assert [a["rank"] for a in report["arms"]] == [1, 2, 3] and report["arms"][0]["name"] == "lr"
    for run in ("base-s1", "lr-s1", "wd-s1", "base-s2", "lr-s2", "wd-s2"):
        meta = json.loads((root / "runs" / run / "arms.json").read_text())
        assert meta["result"]["returncode"] == 0 and meta["config"]["seed"] == int(run[-1])
        assert meta["config"]["iterations"] == 20 and meta["config"]["max_wallclock_seconds"] == 0.0
        assert meta["env"]["RUN_ID"] == run and (root / "runs" / run / "output.log").is_file()
    rows = (root / "report.csv").read_text().splitlines()
    assert rows[0].startswith("rank,arm,control,n,") and len(rows) == 4
    md = (root / "report.md").read_text()
    assert "| 1 | `lr` | 2 |" in md and "clears the 0.005-nat bar" in md and "![final scores](scores.png)" in md


def test_the_statistics_are_quant_records_on_the_same_logs(experiment):
    report = json.loads((experiment["dir"] / "report.json").read_text())
    arms_by_name = {a["name"]: a for a in report["arms"]}
    control = Scores.from_logs(arms_by_name["base"]["logs"])
    for name, arm in arms_by_name.items():
        scores = Scores.from_logs(arm["logs"])
        assert arm["val_bpb"] == list(mean_std(scores.val_bpb))
        assert arm["val_loss"] == list(mean_std(scores.val_loss))
        summaries = [json.loads((Path(log).parent / "summary.json").read_text()) for log in arm["logs"]]
        assert arm["float_val_bpb"] == list(mean_std(s["float_val_bpb"] for s in summaries))
        assert arm["quant_gap"] == list(mean_std(s["export"]["quant_gap_bpb"] for s in summaries))
        if name != "base":
            assert arm["vs_control"] == compare_scores(scores, control)
    # the bar is the rule in bpb (at the arm's tokens per byte), fair across tokenizers too
    rows = {r["arm"]: r for r in csv.DictReader((experiment["dir"] / "report.csv").open())}
    for name in ("lr", "wd"):
        rule = compare_scores(Scores.from_logs(arms_by_name[name]["logs"]), control)["rule_bpb"]
        assert float(rows[name]["p_rule"]) == rule["p"] and rows[name]["clears_bar"] == str(int(rule["p"] < 0.01))
    assert arms_by_name["lr"]["vs_control"]["improvement_bpb"] > 0.05  # the control learns nothing


def test_a_rerun_skips_every_finished_run(experiment):
    launcher = InProcess()
    code, out, _ = run_tool([experiment["file"], "--out", experiment["dir"]], launcher)
    assert code == 0 and launcher.calls == 0
    assert "skipping 6 finished runs" in out


def test_a_killed_experiment_resumes_and_a_failed_run_does_not_stop_the_others(small_data, tmp_path):
    """The tool and its runs as real commands: killed (SIGKILL) while its second run trains, its first run stays
    finished and is skipped, the interrupted one runs again (its logs kept in attic/); a run that fails is a row
    with its last line while the other runs finish."""
    path = experiment_file(tmp_path, small_data, '[[arm]]\nname = "c"\ncontrol = true\n'
                           '[[arm]]\nname = "bad"\nenv = { DATA_PATH = "/nonexistent/for-sure", QK_GAIN_INIT = 3.0 }\n')
    root = tmp_path / "exp"
    code, _, err = run_tool([path, "--out", root])  # missing data: refused before anything runs
    assert code == 2 and "arm 'bad'" in err and "/nonexistent/for-sure" in err and not root.exists()
    path.write_text(path.read_text().replace('"/nonexistent/for-sure"', json.dumps(small_data["data_path"]))
                    .replace('name = "bad"\n', 'name = "bad"\nexpect = "1.0 +- 0.01"\n'))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one core, as an xdist worker has
    tool = subprocess.Popen([sys.executable, "-m", "train.arms", str(path), "--out", str(root)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (root / "runs" / "bad-s1" / "output.log").is_file():  # c-s1 finished, bad-s1 started
            assert tool.poll() is None and time.monotonic() < deadline, tool.stdout.read()
            time.sleep(0.2)
        tool.send_signal(signal.SIGKILL)
        tool.wait()
    finally:
        if tool.poll() is None:
            tool.kill()
    first = (root / "runs" / "c-s1" / "summary.json").stat().st_mtime_ns
    # the next run of `bad` fails (a step that raises), the others go on
    launcher = InProcess()

    def failing(command, env, on_line):
        if env["RUN_ID"] == "bad-s2":
            on_line("error: something broke")
            return 1
        return launcher(command, env, on_line)
    code, out, err = run_tool([path, "--out", root], failing)
    assert code == 1, out + err
    assert "skipping 1 finished runs" in out and launcher.calls == 2  # bad-s1 again, and c-s2
    assert (root / "runs" / "c-s1" / "summary.json").stat().st_mtime_ns == first
    attic = list((root / "attic").iterdir())
    assert len(attic) == 1 and attic[0].name.startswith("bad-s1-") and (attic[0] / "arms.json").is_file()
    report = json.loads((root / "report.json").read_text())
    rows = {r["run_id"]: r for r in report["runs"]}
    assert {k: r["status"] for k, r in rows.items()} == {"c-s1": "finished", "bad-s1": "finished",
                                                        "c-s2": "finished", "bad-s2": "failed"}
    assert rows["bad-s2"]["note"] == "exit 1: error: something broke"
    assert report["pins"][0].startswith("**DRIFT**: arm `bad`")
    assert (root / "report.md").read_text().startswith("# test\n\n**DRIFT**")


BAD = [
    ('seeds = [1]\n[[arm]]\nname = "a"\ncontrol = true\nenv = { MODEL_DIMS = 64 }\n',
     "arm 'a': MODEL_DIMS is not a variable `python -m train` reads (did you mean MODEL_DIM?)"),
    ('seeds = [1]\n[[arm]]\nname = "a"\ncontrol = true\nenv = { MODEL_DIM = "abc" }\n',
     "arm 'a': MODEL_DIM='abc': expected an integer"),
    ('seeds = [1]\nenv = { NUM_HEADS = 3 }\n[[arm]]\nname = "a"\ncontrol = true\n',
     "arm 'a': MODEL_DIM=128: must be divisible by NUM_HEADS=3"),
    ('seeds = [1]\n[[arm]]\nname = "a"\ncontrol = true\n[[arm]]\nname = "a"\n', "two are named 'a'"),
    ('seeds = [1]\n[[arm]]\nname = "a"\n[[arm]]\nname = "b"\n', "no arm has control = true"),
    ('seeds = [1]\n[[arm]]\nname = "a"\ncontrol = true\nenv = { SEED = 3 }\n', "SEED is set by python -m train.arms"),
    ('seed = [1]\n[[arm]]\nname = "a"\ncontrol = true\n', "unknown key 'seed' (did you mean 'seeds'?)"),
    ('seeds = [1]\n[[arm]]\nname = "a"\ncontrol = true\nexpect = "1.5 or so"\n', "expect = '1.5 or so'"),
    ('seeds = [1]\nsteps = 10\nenv = { ITERATIONS = 5 }\n[[arm]]\nname = "a"\ncontrol = true\n',
     "steps and env ITERATIONS both set the budget"),
    ('seeds = [1\n', "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:30] for _, m in BAD])
def test_a_bad_file_is_refused_in_one_line_before_anything_runs(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text('preset = "tiny"\n' + text)
    code, out, err = run_tool([path, "--out", tmp_path / "exp"], launcher=lambda *a: pytest.fail("ran"))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "exp").exists()


def test_the_pin_reads_plus_minus_and_tables():
    assert arms.parse_expect("1.52365 +- 0.002", "x") == arms.Expect(1.52365, 0.002)
    assert arms.parse_expect("1.52365 ± 0.002", "x") == arms.Expect(1.52365, 0.002)
    assert arms.parse_expect({"value": 1.5, "tol": 0.01, "metric": "float_val_bpb"}, "x") == \
        arms.Expect(1.5, 0.01, "float_val_bpb")


def test_greedy_runs_two_rounds_and_reuses_the_runs_it_has(experiment, tmp_path):
    """Round 1 (base, base+lr, base+wd) is the experiment's own runs: nothing runs; it keeps lr. Round 2 runs
    base+lr+wd (2 seeds) against base+lr (the lr arm's runs) and stops or keeps wd, by the rule."""
    root = tmp_path / "exp"
    shutil.copytree(experiment["dir"], root, ignore=shutil.ignore_patterns(".*.tmp", ".lock"))  # another worker
    # may be rereading the folder (test_a_rerun_skips_every_finished_run): its atomic writes' temp files come and go
    cands = tmp_path / "cands.toml"
    cands.write_text(CANDIDATES_TOML)
    launcher = InProcess()
    code, out, err = run_tool([experiment["file"], "--out", root, "--greedy", cands], launcher)
    assert code == 0, out + err
    assert launcher.calls == 2
    summary = json.loads((root / "greedy-cands" / "greedy.json").read_text())
    first, second = summary["rounds"][:2]
    assert first["best"] == "base" and first["kept"] == "base+lr"
    assert second["best"] == "base+lr" and [c["name"] for c in second["candidates"]] == ["base+lr+wd"]
    c = second["candidates"][0]
    assert (second["kept"] == "base+lr+wd") == (c["gain"] > c["noise"])
    assert len(summary["rounds"]) == 2  # nothing left after round 2, or stopped there
    for k in (1, 2):
        assert (root / "greedy-cands" / f"round-{k}" / "report.md").is_file()
    md = (root / "greedy-cands" / "greedy.md").read_text()
    assert "## Round 2: current best `base+lr`" in md and "## Result" in md
    report = json.loads((root / "greedy-cands" / "round-2" / "report.json").read_text())
    assert {r["run_id"]: r["note"] for r in report["runs"]}["base+lr-s1"] == "the same run as lr-s1"


@pytest.mark.parametrize("name, runs", [("frontier-cpu", 6), ("frontier-8xh100", 9)])
def test_the_example_files_plan_with_their_estimate(name, runs, tmp_path):
    """Both example files parse and resolve; --dry-run prints the plan and the total estimated time (the
    FineWeb data of the 8xH100 file is not here: NOT READY, exit 2)."""
    path = REPO / "experiments" / f"{name}.toml"
    code, out, err = run_tool([path, "--out", tmp_path / "exp", "--dry-run"])
    assert code in (0, 2), err
    assert f"= {runs} runs" in out and "estimated time: " in out
    stated = path.read_text().split("estimated time: ", 1)[1].split()[0]  # the file says what --dry-run prints
    assert f"estimated time: {stated} for the {runs} runs left" in out
    assert not (tmp_path / "exp").exists()


def test_the_greedy_example_plans_its_first_round(tmp_path):
    code, out, err = run_tool([REPO / "experiments" / "frontier-cpu.toml", "--greedy",
                               REPO / "experiments" / "frontier-candidates-cpu.toml", "--out", tmp_path / "exp",
                               "--dry-run"])
    assert code in (0, 2), err
    assert "greedy round 1" in out and "6 arms x 2 seeds = 12 runs" in out and "at most 32 runs in all" in out
