"""The training loop (SPEC 4): schedule, SWA, determinism, DDP equivalence, divergence, DRY_RUN, run folder.

Runs use a small model on a cut of the embedded corpus (the real tokenizer and tokens, fewer of them)
so each takes seconds on one CPU core.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from conftest import SMALL
from model import build_model, count_parameters, from_env, load_checkpoint
from train import trainer
from train.step import Optimizers, TrainingDiverged, lr_multiplier
from train.trainer import SnapshotAverage, grad_accum_steps_for, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def torch_kernels():
    """The PyTorch path: the interpreted Triton kernels are tested in their own files and far slower here."""
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def small_config(small_data, runs_dir, run_id, **overrides):
    return from_env(environ={}, preset="tiny", runs_dir=str(runs_dir), run_id=run_id,
                    **{**SMALL, **small_data, **overrides})


def env_vars(cfg) -> dict:
    """The config as the environment variables `python -m train` reads."""
    return {k: str(int(v) if isinstance(v, bool) else v) for k, v in cfg.env_dict().items() if k != "PRESET"}


# ---------------------------------------------------------------------------------------------- pure parts

def test_step_schedule_warmdown():
    kw = dict(iterations=100, warmdown_iters=20, max_wallclock_ms=None)
    assert lr_multiplier(0, 0.0, **kw) == 1.0
    assert lr_multiplier(79, 0.0, **kw) == 1.0
    assert lr_multiplier(80, 0.0, **kw) == pytest.approx(1.0)
    assert lr_multiplier(90, 0.0, **kw) == pytest.approx(0.5)
    assert lr_multiplier(99, 0.0, **kw) == pytest.approx(0.05)
    assert lr_multiplier(5, 0.0, iterations=100, warmdown_iters=0, max_wallclock_ms=None) == 1.0
    # warmdown longer than the run: the ramp starts at step 0 below 1
    assert lr_multiplier(0, 0.0, iterations=10, warmdown_iters=20, max_wallclock_ms=None) == pytest.approx(0.5)


def test_wallclock_warmdown_multiplier():
    kw = dict(iterations=20000, warmdown_iters=2000, max_wallclock_ms=600_000.0)
    # 100 ms/step: the warmdown spans the last 2000 x 100 ms = 200 s of the 600 s
    assert lr_multiplier(1000, 100_000.0, **kw) == 1.0         # 500 s left > 200 s
    assert lr_multiplier(4000, 400_000.0, **kw) == pytest.approx(1.0)    # exactly 200 s left
    assert lr_multiplier(5000, 500_000.0, **kw) == pytest.approx(0.5)    # 100 s left of 200 s
    assert lr_multiplier(5900, 590_000.0, **kw) == pytest.approx(0.05)
    assert lr_multiplier(6000, 600_000.0, **kw) == 0.0
    assert lr_multiplier(6100, 610_000.0, **kw) == 0.0          # past the cap: never negative
    # slower steps (150 ms) start the warmdown earlier: 300 s window, 150 s left -> 0.5
    assert lr_multiplier(3000, 450_000.0, **kw) == pytest.approx(0.5)
    assert lr_multiplier(0, 0.0, **kw) == 1.0                   # no steps yet: no estimate, full LR


def test_snapshot_average_is_uniform_mean():
    net = torch.nn.Linear(3, 2)
    swa = SnapshotAverage()
    snapshots = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            net.weight.fill_(value)
            net.bias.copy_(torch.tensor([value, -value]))
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        swa.add(net)
    with torch.no_grad():
        net.weight.fill_(100.0)
    swa.load_into(net)
    assert swa.count == 3
    assert torch.allclose(net.weight, torch.full((2, 3), 3.0))
    assert torch.allclose(net.bias, torch.tensor([3.0, -3.0]))
    with pytest.raises(RuntimeError, match="no snapshots"):
        SnapshotAverage().average()


def test_grad_accum_rules():
    cfg = from_env(environ={}, preset="ouroboros")
    assert grad_accum_steps_for(cfg, 8) == 1 and grad_accum_steps_for(cfg, 1) == 8  # 0 means 8 // world
    bad = cfg.replace(train_batch_tokens=1000)
    with pytest.raises(ValueError, match=r"TRAIN_BATCH_TOKENS=1000 must be a multiple of .* = 16384"):
        grad_accum_steps_for(bad, 1)
    with pytest.raises(ValueError, match="WORLD_SIZE=16"):
        grad_accum_steps_for(cfg, 16)


def test_optimizers_use_the_spec_hyperparameters():
    """SPEC 4: Muon on every Linear weight (lr 0.03, wd 0.04, Nesterov, 5 NS steps, momentum 0.92 -> 0.99 over
    1500 steps); AdamW betas 0.9/0.95, eps 1e-8, wd 0.04, lr 0.035 embeddings / 0.025 the rest; one multiplier."""
    cfg = from_env(environ={}, preset="ouroboros", **SMALL)
    net = build_model(cfg)
    opts = Optimizers(net, cfg, "cpu")
    (muon,) = opts.muon.param_groups
    assert {id(p) for p in muon["params"]} == {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Linear)}
    assert (muon["lr"], muon["weight_decay"], muon["momentum"], muon["nesterov"], muon["backend_steps"]) == \
        (0.03, 0.04, 0.92, True, 5)
    embed, scalar = opts.adam.param_groups
    assert {id(p) for p in embed["params"]} == {id(net.tok_emb.weight), id(net.bigram.embed.weight)}
    assert (embed["lr"], scalar["lr"]) == (0.035, 0.025)
    for group in (embed, scalar):
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.04)
    opts.set_schedule(750, 0.5)  # half way up the momentum ramp, half the LR
    assert muon["momentum"] == pytest.approx(0.955) and muon["lr"] == pytest.approx(0.015)
    assert embed["lr"] == pytest.approx(0.0175) and scalar["lr"] == pytest.approx(0.0125)
    opts.set_schedule(1500, 1.0)
    assert muon["momentum"] == pytest.approx(0.99) and muon["lr"] == pytest.approx(0.03)


# ---------------------------------------------------------------------------------------------- runs

def test_loss_falls_and_run_folder(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path, "falls", iterations=30, warmdown_iters=30, val_loss_every=15,
                       train_log_every=10, swa_every=2)
    summary = train(cfg, echo=False)
    run = tmp_path / "falls"
    losses = summary["train_losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(1024), abs=0.1)  # starts at uniform over the vocab
    assert np.mean(losses[-5:]) < losses[0] - 0.6, f"loss did not fall: {losses[0]:.3f} -> {losses[-5:]}"
    vals = [v["val_loss"] for v in summary["val_history"]]
    assert len(vals) == 2 and vals[1] < vals[0]
    # run folder: log, config, float checkpoint (SWA-averaged), summary
    assert {"train.log", "config.json", "final_model.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("steps", "step_avg_ms", "val_bpb", "params"):
        assert key in on_disk
    assert on_disk["steps"] == 30 and on_disk["params"] == count_parameters(build_model(cfg))
    # multiplier (30 - s) / 30 < 0.2 for 0-based steps s >= 25, so snapshots after steps 26, 28 and 30
    assert on_disk["swa_snapshots"] == 3
    assert 0 < on_disk["val_bpb"] < 4.0 and on_disk["val_bpb"] == pytest.approx(summary["val_bpb"])
    assert on_disk["float_val_bpb"] == on_disk["val_bpb"]  # no export step: the float model's score
    assert json.loads((run / "config.json").read_text())["iterations"] == 30
    log = (run / "train.log").read_text()
    assert "step:10/30 train_loss:" in log and "step_avg:" in log
    assert "step:30/30 val_loss:" in log and "final_sliding_window val_loss:" in log and "peak memory" in log
    model = load_checkpoint(run / "final_model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # A run folder is never overwritten
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg, echo=False)


@pytest.fixture(scope="module")
def two_same_seed_runs(small_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("seeded")
    return [train(small_config(small_data, runs, f"seed7-{i}"), echo=False) | {"dir": runs / f"seed7-{i}"}
            for i in range(2)]


def test_same_seed_same_losses(two_same_seed_runs, small_data, tmp_path):
    a, b = two_same_seed_runs
    assert a["train_losses"] == b["train_losses"]
    assert a["val_bpb"] == b["val_bpb"]
    other = train(small_config(small_data, tmp_path, "seed8", seed=8), echo=False)
    assert other["train_losses"] != a["train_losses"]  # the seed does reach the model


def test_compile_warmup_is_undone(two_same_seed_runs, small_data, tmp_path):
    """SPEC 4: after the warmup steps the weights, optimizer state and data stream are reset, so a run
    with warmup trains exactly like one without."""
    warmed = train(small_config(small_data, tmp_path, "warmed", warmup_steps=3), echo=False)
    assert warmed["train_losses"] == two_same_seed_runs[0]["train_losses"]
    kept = load_checkpoint(tmp_path / "warmed" / "final_model.pt").state_dict()
    clean = load_checkpoint(two_same_seed_runs[0]["dir"] / "final_model.pt").state_dict()
    for name, tensor in clean.items():
        assert torch.equal(kept[name], tensor), name
    assert "warmup: 3 steps" in (tmp_path / "warmed" / "train.log").read_text()


def test_nan_loss_stops_and_keeps_last_good(two_same_seed_runs, small_data, tmp_path, monkeypatch):
    real_build = trainer.build_model

    def build_with_nan_on_fourth_step(cfg):
        model = real_build(cfg)
        forward, calls = model.forward, [0]

        def poisoned(ids, targets=None):
            out = forward(ids, targets)
            if targets is not None:
                calls[0] += 1
                if calls[0] == 4:
                    out = out * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer, "build_model", build_with_nan_on_fourth_step)
    cfg = small_config(small_data, tmp_path, "nan", iterations=6)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 4: train_loss=nan.*after step 3"):
        train(cfg, echo=False)
    run = tmp_path / "nan"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 3 and len(summary["train_losses"]) == 3
    assert not (run / "final_model.pt").exists()
    # The kept weights are exactly those after 3 good steps: a clean 3-step run of the same seed.
    kept = load_checkpoint(run / "last_good_model.pt").state_dict()
    clean = load_checkpoint(two_same_seed_runs[0]["dir"] / "final_model.pt").state_dict()
    assert summary["train_losses"] == two_same_seed_runs[0]["train_losses"]
    for name, tensor in clean.items():
        assert torch.equal(kept[name], tensor), name
    assert "stopped" in (run / "train.log").read_text()


def test_torchrun_two_processes_match_one_process_with_accumulation(small_data, tmp_path):
    """2 gloo ranks x 1 micro batch == 1 rank x 2 micro batches: same tokens, same losses and weights."""
    common = dict(iterations=4, warmdown_iters=2, train_batch_tokens=4 * 64)
    single = train(small_config(small_data, tmp_path, "single", grad_accum_steps=2, **common), echo=False)

    cfg = small_config(small_data, tmp_path, "ddp", grad_accum_steps=1, **common)
    env = {**os.environ, **env_vars(cfg), "PRESET": "tiny", "GLOO_SOCKET_IFNAME": "lo", "KERNELS": "torch"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "train"], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["grad_accum_steps"] == 1 and single["grad_accum_steps"] == 2
    np.testing.assert_allclose(ddp["train_losses"], single["train_losses"], rtol=1e-5)
    # `python -m train` exported the artifact, whose score is then the run's val_bpb; `single` did not
    assert ddp["float_val_bpb"] == pytest.approx(single["val_bpb"], rel=1e-5)
    assert ddp["val_bpb"] == ddp["export"]["roundtrip_val_bpb"]
    a = load_checkpoint(tmp_path / "ddp" / "final_model.pt").state_dict()
    b = load_checkpoint(tmp_path / "single" / "final_model.pt").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert "step:4/4 train_loss:" in proc.stdout and proc.stdout.count("final_sliding_window") == 1  # rank 0 only


def test_dry_run_prints_config_params_tokens_and_data(small_data, tmp_path, monkeypatch, capsys):
    from train.__main__ import main

    cfg = small_config(small_data, tmp_path / "runs", "dry")
    for key, value in env_vars(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setenv("DRY_RUN", "1")
    assert main() == 0
    out = capsys.readouterr().out
    assert "preset: tiny (PRESET=tiny is set)" in out
    assert "MODEL_DIM=64" in out and "MATRIX_LR=0.03" in out
    assert f"model_params: {count_parameters(build_model(cfg)):,}" in out
    assert "tokens_per_step: 256 = world_size 1 x grad_accum_steps 1 x 4 sequences of 64" in out
    assert "data train: 1 shards, 60,000 tokens" in out and "data val: 1 shards, 2,049 tokens" in out
    assert "DRY_RUN=1: nothing trained" in out
    assert not (tmp_path / "runs").exists()  # nothing written

    monkeypatch.setenv("DATA_PATH", str(tmp_path / "nowhere"))
    monkeypatch.delenv("PRESET")
    assert main() == 2  # a run could not start
    out = capsys.readouterr().out
    assert "PRESET not set" in out and "data train: NOT READY" in out and "python -m train.prepare" in out


def test_tiny_run_fixture(tiny_run):
    """The cached short tiny-preset run other tests (quant/) build on: complete, finite, and it learned."""
    from conftest import TINY_RUN_STEPS

    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == TINY_RUN_STEPS
    assert summary["preset"] == "tiny"
    losses = summary["train_losses"]
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    model = load_checkpoint(tiny_run / "final_model.pt")
    assert model.config.model_dim == 128 and model.config.iterations == TINY_RUN_STEPS
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_over_budget_artifact_fails_the_run_with_the_overage(small_data, tmp_path, monkeypatch, capsys):
    """`python -m train` exits 1 and says by how much when model + code exceed the limit (here 1,000 bytes)."""
    import functools

    import train.__main__ as entry

    cfg = small_config(small_data, tmp_path / "runs", "over", quant_method="rtn")
    for key, value in env_vars(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setattr(entry, "export_run", functools.partial(entry.export_run, limit=1_000, compare=False))
    assert entry.main() == 1
    out = capsys.readouterr().out
    assert "error:" in out and "over budget by" in out
    assert (tmp_path / "runs" / "over" / "final_model.pt").is_file()  # the float model is kept


def test_calibration_overrun_fails_only_past_the_wall_clock(small_data, tmp_path):
    """Calibration longer than GPTQ_RESERVE_SECONDS is an error only when it really ends past
    MAX_WALLCLOCK_SECONDS: not after a run that stopped at ITERATIONS long before the cap."""
    def export_taking(seconds):
        return lambda model, cfg, run_dir, **context: {"calibration_seconds": seconds}

    early = small_config(small_data, tmp_path, "early", iterations=2, max_wallclock_seconds=600.0,
                         gptq_reserve_seconds=10.0)
    summary = train(early, export_fn=export_taking(11.0), echo=False)  # ~1 s + 11 s of a 600 s budget
    assert summary["steps"] == 2 and "error" not in summary

    capped = small_config(small_data, tmp_path, "capped", iterations=100_000, max_wallclock_seconds=1.0,
                          gptq_reserve_seconds=0.2)
    with pytest.raises(trainer.CalibrationOverran, match=r"calibration overran the wall clock: calibration took "
                                                         r"0.3s > GPTQ_RESERVE_SECONDS=0.2s"):
        train(capped, export_fn=export_taking(0.3), echo=False)
    on_disk = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert on_disk["steps"] < 100_000 and on_disk["train_time_ms"] >= 800.0 and "overran" in on_disk["error"]
    assert on_disk["compliant"] is False and "compliant" not in summary


def test_calibration_overrun_is_one_line_and_exit_1(small_data, tmp_path, monkeypatch, capsys,
                                                    torch_kernels_one_thread):
    """`python -m train` ends an overrun with the log's ERROR line and one error line, exit 1, no traceback."""
    import train.__main__ as entry

    cfg = small_config(small_data, tmp_path, "overran", iterations=100_000, max_wallclock_seconds=1.0,
                       gptq_reserve_seconds=0.2)
    for key, value in env_vars(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setattr(entry, "export_run", lambda model, cfg, run_dir, **context: {"calibration_seconds": 0.3})
    assert entry.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("error: calibration overran the wall clock: calibration took 0.3s > ")
    assert any(line.startswith("ERROR: calibration overran") for line in lines)
    assert json.loads((tmp_path / "overran" / "summary.json").read_text())["compliant"] is False


def test_training_scopes_tf32_to_the_run(monkeypatch):
    """On CUDA the run turns TF32 on for itself and hands the caller's flags back, also when it fails, so
    later fp32 comparisons in the same process (a test worker that trained the cached tiny run) stay fp32."""
    from train import trainer

    seen = []

    def fake_train(cfg, env, export_fn, echo, calibration_probe=None):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        if len(seen) == 2:
            raise RuntimeError("planted failure")
        return {}

    monkeypatch.setattr(trainer, "setup_distributed", lambda _: trainer.DistEnv(0, 1, 0, torch.device("cuda", 0)))
    monkeypatch.setattr(trainer, "_train", fake_train)
    cfg = from_env(environ={}, preset="tiny")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    trainer.train(cfg)
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.train(cfg)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    monkeypatch.setattr(trainer, "setup_distributed", lambda _: trainer.DistEnv(0, 1, 0, torch.device("cpu")))
    seen.clear()
    trainer.train(cfg)
    assert seen == [(False, False)]  # a CPU run leaves them alone
