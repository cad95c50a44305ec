"""Faults and bad input (issue 13): each case ends with a clear message, nothing lost, nothing mixed up.

Sections are self-contained, one per group of cases.
"""


# --- run folders, unknown variables, small things (items 1, 6, 7) ---

import functools
import json
import os
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from test_train import SMALL, env_vars, small_config, small_data  # noqa: F401 (small_data is a fixture)

import kernels
from model import ConfigError, load_checkpoint
from model.config import KNOWN_VARIABLES, Config, check_variable_names
from train.trainer import train

REPO = Path(__file__).resolve().parents[1]

# Runs the trainer with the clock stopped at one second, so that runs started together share the second
# (what `datetime.now()` to the second gave two runs started at once) however the machine schedules them.
SAME_SECOND = """
import datetime, runpy, types
import train.trainer as trainer

class Stopped(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)

trainer.datetime = types.SimpleNamespace(datetime=Stopped, timezone=datetime.timezone)
runpy.run_module("train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(autouse=True)
def torch_kernels_for_runs():
    """The PyTorch path: the interpreted Triton kernels are tested in their own files and far slower here."""
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def _run_env(cfg, **extra) -> dict:
    env = {**os.environ, **env_vars(cfg), "PRESET": "tiny", "KERNELS": "torch", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def test_runs_started_in_the_same_second_get_folders_of_their_own(small_data, tmp_path):
    """Item 1: two `python -m train` at once, their clocks on the same second, no RUN_ID: two folders,
    each with its own seed in config.json, summary.json and train.log (before: one folder, mixed)."""
    cfg = small_config(small_data, tmp_path / "runs", "", iterations=2, val_loss_every=0, quant_method="rtn",
                       eval_stride=64, gptq_cal_samples=2, gptq_cal_seq_len=64)  # the export compares methods
    procs = [subprocess.Popen([sys.executable, "-c", SAME_SECOND], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=_run_env(cfg, SEED=str(seed), OMP_NUM_THREADS="1"))
             for seed in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, [f.name for f in folders]
    seeds = set()
    for folder in folders:
        assert folder.name.startswith("20260102-030405-"), folder.name
        seed = json.loads((folder / "config.json").read_text())["seed"]
        seeds.add(seed)
        assert f"seed:{seed}" in (folder / "train.log").read_text()
        assert (folder / "train.log").read_text().count("run: ") == 1  # one run's lines only
        assert json.loads((folder / "summary.json").read_text())["run_id"] == folder.name
        assert load_checkpoint(folder / "final_model.pt").config.seed == seed
    assert seeds == {1, 2}


@pytest.mark.parametrize("run_id", ["..", ".", "../elsewhere", "{tmp}/elsewhere", "a/b", "a\\b"])
def test_run_id_that_leaves_runs_dir_is_refused(small_data, tmp_path, run_id):
    """Item 1: RUN_ID names one folder inside RUNS_DIR; anything else is a ConfigError before any folder
    is made (`python -m train` exits 2 with one line)."""
    runs = tmp_path / "deep" / "runs"
    run_id = run_id.format(tmp=tmp_path)
    cfg = small_config(small_data, runs, run_id, tokenizer_path=str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match=r"RUN_ID=.*must name one folder inside RUNS_DIR"):
        train(cfg, echo=False)
    assert not (tmp_path / "deep").exists() and not (tmp_path / "elsewhere").exists()


def test_run_id_outside_runs_dir_exits_2_with_one_line(small_data, tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    cfg = small_config(small_data, tmp_path / "runs", "../out")
    for key, value in env_vars(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    assert main() == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("error: RUN_ID='../out': must name one folder inside RUNS_DIR")
    assert not (tmp_path / "out").exists()


def test_a_run_folder_in_use_is_refused(small_data, tmp_path):
    """Item 1: a second run given the RUN_ID of a live run (its train.log locked) stops at once, writing
    nothing into the live run's folder."""
    import fcntl

    run = tmp_path / "live"
    run.mkdir()
    with open(run / "train.log", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the live run's RunLog holds
        with pytest.raises(FileExistsError, match=r"run folder .*live is in use by another run"):
            train(small_config(small_data, tmp_path, "live", iterations=2), echo=False)
    assert sorted(p.name for p in run.iterdir()) == ["train.log"]
    assert (run / "train.log").read_text() == ""


def test_failed_start_up_is_in_train_log_and_a_rerun_appends_under_a_marker(small_data, tmp_path):
    """Item 7: an error after the run folder exists is written to its train.log; the same RUN_ID then
    reruns there: a marker line, the temp files of killed writes removed, a finished run."""
    cfg = small_config(small_data, tmp_path, "again", iterations=2, tokenizer_path=str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        train(cfg, echo=False)
    run = tmp_path / "again"
    first = (run / "train.log").read_text()
    assert "error: FileNotFoundError: TOKENIZER_PATH=" in first and "Traceback" in first

    (run / "quant_compare").mkdir()
    stale = [run / ".final_model.pt.k1ll3d.tmp", run / "quant_compare" / ".gptq.ptz.x9_2ab.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run / "notes.tmp"  # not a write_atomic temp file
    keep.write_text("mine")
    summary = train(cfg.replace(tokenizer_path=small_data["tokenizer_path"]), echo=False)
    assert summary["steps"] == 2 and (run / "final_model.pt").is_file()
    assert not any(p.exists() for p in stale) and keep.exists()
    log = (run / "train.log").read_text()
    assert log.startswith(first)  # the earlier attempt's lines stay, above the marker
    rest = log[len(first):].splitlines()
    assert rest[0].startswith("==== rerun ") and rest[0].endswith(" ====")
    assert rest[1].startswith("removed 2 temp files left by killed writes: ")
    assert ".final_model.pt.k1ll3d.tmp" in rest[1] and "quant_compare/.gptq.ptz.x9_2ab.tmp" in rest[1]
    assert any(line.startswith("run: ") for line in rest) and "summary: " in rest[-1]
    with pytest.raises(FileExistsError, match="already holds a run"):  # a finished run is never rerun
        train(cfg, echo=False)


RUN_FILES = ("final_model.pt", "final_model.int6.ptz", "summary.json", "config.json")


@pytest.fixture(scope="module")
def exported_run(small_data, tmp_path_factory):
    """A finished small run with its round-to-nearest artifact, written under umask 027: (folder, summary,
    {file: mode} as the run left them)."""
    from quant.export import export_run

    runs = tmp_path_factory.mktemp("exported")
    old = os.umask(0o027)
    try:
        cfg = small_config(small_data, runs, "exported", iterations=2, quant_method="rtn")
        kernels.set_backend("torch")
        summary = train(cfg, export_fn=functools.partial(export_run, compare=False), echo=False)
    finally:
        os.umask(old)
        kernels.set_backend(None)
    run = runs / "exported"
    return run, summary, {name: stat.S_IMODE((run / name).stat().st_mode) for name in RUN_FILES}


def test_checkpoint_and_artifact_modes_follow_the_umask(exported_run):
    """Item 7: what a run writes, checkpoint and artifact included, is 0666 & ~umask (here 0640), not
    mkstemp's 0600."""
    assert exported_run[2] == {name: 0o640 for name in RUN_FILES}


def test_quant_checkpoint_records_its_export_in_the_run_summary(exported_run, capsys):
    """Item 7: `python -m quant --checkpoint` puts its export into the run's summary.json as the trainer
    records it, keeping the other keys; a partial evaluation leaves summary.json alone."""
    from quant.__main__ import main

    run, by_trainer, _ = exported_run
    path = run / "summary.json"
    stored = json.loads(path.read_text())
    del stored["export"]
    stored["note"] = "kept"
    path.write_text(json.dumps(stored))

    assert main(["--checkpoint", str(run / "final_model.pt"), "--no-compare", "--val-tokens", "257"]) == 0
    assert json.loads(path.read_text()) == stored and "left as it was" in capsys.readouterr().out

    assert main(["--checkpoint", str(run / "final_model.pt"), "--no-compare"]) == 0
    assert "summary.json updated" in capsys.readouterr().out
    after = json.loads(path.read_text())
    assert after["note"] == "kept" and after["train_losses"] == by_trainer["train_losses"]
    for key in ("val_loss", "val_bpb", "steps", "status"):  # the top-level numbers as the trainer left them
        assert after[key] == by_trainer[key], key
    export, want = after["export"], by_trainer["export"]
    assert set(export) == set(want)
    assert export["method"] == want["method"] == "rtn"
    for key in ("model_bytes", "total_bytes", "float_val_bpb", "roundtrip_val_bpb", "quant_gap_bpb"):
        assert export[key] == pytest.approx(want[key], rel=1e-9), key
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_misspelt_variable_warns_once_under_torchrun(small_data, tmp_path):
    """Item 6: MODEL_DIMS=256 (a typo of MODEL_DIM) is named on one line, once for the two ranks."""
    cfg = small_config(small_data, tmp_path / "runs", "typo")
    env = _run_env(cfg, MODEL_DIMS="256", DRY_RUN="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "train"], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "is not a setting" in line]
    assert warnings == ["warning: MODEL_DIMS is not a setting; did you mean MODEL_DIM?"]


def test_strict_env_makes_a_misspelt_variable_an_error(monkeypatch, capsys):
    from train.__main__ import main

    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.setenv("ITERATION", "5")
    monkeypatch.setenv("STRICT_ENV", "1")
    assert main() == 2
    assert capsys.readouterr().out.strip() == ("configuration error: ITERATION is not a setting; did you mean "
                                               "ITERATIONS? (STRICT_ENV=1 makes this an error)")
    monkeypatch.setenv("STRICT_ENV", "perhaps")
    assert main() == 2
    assert "STRICT_ENV='perhaps': expected 0 or 1" in capsys.readouterr().out


def test_known_and_unrelated_variables_are_left_alone():
    """Item 6: every name a run reads is known (one list, model/config.py); other programs' variables,
    however many, are not warned about; only near misses of ours are."""
    assert {f.name.upper() for f in fields(Config)} <= KNOWN_VARIABLES
    ours = ["PRESET", "SKIP_GPTQ", "LOOP_AWARE_GPTQ", "KERNELS", "KERNELS_STRICT", "STRICT_ENV", "DIST_TIMEOUT_SECONDS",
            "CHECKPOINT_FALLBACK_DIR", "MODEL_DIM", "USE_CRAWLER", "RANK", "WORLD_SIZE", "LOCAL_RANK",
            "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_RESTART_COUNT"]
    others = ["PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH",
              "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET",
              "TRITON_CACHE_DIR", "NCCL_DEBUG", "TORCH_HOME", "HF_HOME", "GLOO_SOCKET_IFNAME", "PYTEST_XDIST_WORKER"]
    assert check_variable_names({name: "1" for name in ours + others}) == []
    typos = {"MODEL_DIMS": "MODEL_DIM", "model_dim": "MODEL_DIM", "SEEDS": "SEED", "RUNID": "RUN_ID",
             "KERNEL": "KERNELS", "DATAPATH": "DATA_PATH", "VAL_LOSS_EVRY": "VAL_LOSS_EVERY"}
    assert check_variable_names({name: "1" for name in [*typos, *others]}) == [
        f"{name} is not a setting; did you mean {known}?" for name, known in sorted(typos.items())]
