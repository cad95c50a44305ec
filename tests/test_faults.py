"""Faults and bad input (issue 13): each case ends with a clear message and loses no finished run."""

# --- full disk, hung rank (items 3, 4) ---

import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_train import env_vars, small_config, small_data  # noqa: F401  (small_data: a fixture)


class _FullFile:
    """An open file on a disk with `free` bytes left: a write past them raises ENOSPC, as a full disk does."""

    def __init__(self, f, free: int):
        self._f, self._free = f, free

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._free -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(target, ..., free=0): from now on the atomic writer (model/io.py) finds no space for a file
    named `target` (its temp file beside it) or, for a target folder, for any file under it."""
    def fill(*targets, free=0):
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            where = Path(os.readlink(f"/proc/self/fd/{fd}"))
            for t in map(Path, targets):
                if where.is_relative_to(t) or (where.parent == t.parent and where.name.startswith(f".{t.name}.")):
                    return _FullFile(f, free)
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)
    return fill


@pytest.fixture
def torch_path(monkeypatch):
    """The PyTorch path for the runs here (the interpreted Triton kernels are tested in their own files)."""
    import kernels

    monkeypatch.setenv("KERNELS", "torch")
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def _run_main(monkeypatch, cfg, **export_kwargs) -> int:
    """`python -m train` in this process on `cfg`, its export step with `export_kwargs`."""
    import train.__main__ as entry

    for key, value in env_vars(cfg).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setattr(entry, "export_run", functools.partial(entry.export_run, **export_kwargs))
    return entry.main()


def test_write_atomic_on_a_full_disk_names_the_file_and_the_bytes(tmp_path, full_disk):
    from model import build_model, save_checkpoint
    from model.io import DiskFullError, write_atomic

    full_disk(tmp_path / "full")
    with pytest.raises(DiskFullError, match=r"^no space left on \S+/full/blob.bin: need ~1,234 B, [\d,]+ B free$"):
        write_atomic(tmp_path / "full" / "blob.bin", b"x" * 1234)
    net = build_model(preset="tiny", num_flat_layers=1, crawler_loops=1)
    need = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    # torch.save alone would say "unexpected pos ..."
    with pytest.raises(DiskFullError, match=rf"^no space left on \S+/full/model.pt: need ~{need:,} B") as caught:
        save_checkpoint(net, tmp_path / "full" / "model.pt")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert list((tmp_path / "full").iterdir()) == []  # no temp file left behind


def test_run_log_survives_a_full_disk(tmp_path, capsys):
    from train.trainer import RunLog

    log = RunLog(tmp_path / "train.log")
    log("first")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log._file = Full()
    log("second")
    log("third")
    out = capsys.readouterr().out
    assert "first\nsecond\n" in out and "third" in out and out.count("WARNING") == 1
    assert "on screen only" in out


def test_full_disk_at_the_checkpoint_keeps_the_weights_in_the_fallback_dir(small_data, tmp_path, monkeypatch,
                                                                            capsys, full_disk, torch_path):
    from model import build_model, load_checkpoint

    fallback = tmp_path / "fallback"
    cfg = small_config(small_data, tmp_path / "runs", "ckpt", quant_method="rtn", checkpoint_fallback_dir=str(fallback))
    run = tmp_path / "runs" / "ckpt"
    full_disk(run / "final_model.pt")
    assert _run_main(monkeypatch, cfg, compare=False) == 1  # the checkpoint is required
    out = capsys.readouterr().out
    need = sum(v.numel() * v.element_size() for v in build_model(cfg).state_dict().values())
    kept = fallback / "ouroboros-ckpt" / "final_model.pt"
    said = f"no space left on {run / 'final_model.pt'}: need ~{need:,} B"
    log = (run / "train.log").read_text()
    for text in (said, f"saved: {kept} (CHECKPOINT_FALLBACK_DIR"):
        assert text in out and text in log
    assert f"error: the run finished, but its checkpoint could not be written in {run}" in out and str(kept) in out
    assert not (run / "final_model.pt").exists()
    assert load_checkpoint(kept).config == cfg  # the weights were not lost
    # the run went on to the end: the artifact and the summary, which says where the checkpoint is
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint"] == str(kept) and (run / "final_model.int6.ptz").is_file()
    assert summary["export"]["roundtrip_val_bpb"] > 0


def test_full_disk_at_the_checkpoint_and_its_fallback_says_both(small_data, tmp_path, full_disk, torch_path):
    from train.trainer import CheckpointSaveError, train

    fallback = tmp_path / "fallback"
    cfg = small_config(small_data, tmp_path / "runs", "both", iterations=1, checkpoint_fallback_dir=str(fallback))
    full_disk(tmp_path / "runs" / "both" / "final_model.pt", fallback)
    with pytest.raises(CheckpointSaveError, match=r"the trained weights are lost: no space left on \S+/runs/both/"
                                                  r"final_model.pt: need ~[\d,]+ B.*; and at CHECKPOINT_FALLBACK_DIR: "
                                                  r"no space left on \S+/fallback/ouroboros-both/final_model.pt"):
        train(cfg, echo=False)


def test_full_disk_in_the_method_comparison_skips_it_and_the_run_finishes(small_data, tmp_path, monkeypatch, capsys,
                                                                          full_disk, torch_path):
    cfg = small_config(small_data, tmp_path / "runs", "cmp", quant_method="rtn")
    run = tmp_path / "runs" / "cmp"
    full_disk(run / "quant_compare")
    assert _run_main(monkeypatch, cfg, compare=True) == 0  # the comparison is optional
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "quant compare: WARNING" in line]
    assert len(warnings) == 1 and f"no space left on {run / 'quant_compare'}" in warnings[0]
    summary = json.loads((run / "summary.json").read_text())
    assert "no space left" in summary["export"]["compare_skipped"] and "gaps" not in summary["export"]
    assert (run / "final_model.int6.ptz").is_file() and (run / "final_model.pt").is_file()
    assert not list((run / "quant_compare").glob("*"))  # the scratch files that fit were removed


def test_full_disk_on_the_artifact_fails_the_run_with_the_checkpoint_kept(small_data, tmp_path, monkeypatch, capsys,
                                                                          full_disk, torch_path):
    cfg = small_config(small_data, tmp_path / "runs", "art", quant_method="rtn")
    run = tmp_path / "runs" / "art"
    full_disk(run / "final_model.int6.ptz")
    assert _run_main(monkeypatch, cfg, compare=False) == 1
    out = capsys.readouterr().out
    assert f"error: no space left on {run / 'final_model.int6.ptz'}: need ~" in out
    assert (run / "final_model.pt").is_file() and not (run / "final_model.int6.ptz").exists()
    assert "no space left" in (run / "train.log").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_rank_makes_the_survivor_exit_naming_it(prepared_corpus, tmp_path):
    """Two gloo ranks of the tiny preset; rank 1 is stopped (SIGSTOP) mid-training. Rank 0's step collective
    gives up after DIST_TIMEOUT_SECONDS, a short monitored barrier names rank 1, and rank 0 exits 1."""
    timeout = 6
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_INTERPRET"))}
    env.update(PRESET="tiny", ITERATIONS="100000", VAL_LOSS_EVERY="0", DIST_TIMEOUT_SECONDS=str(timeout),
               RUNS_DIR=str(tmp_path), RUN_ID="hang", KERNELS="torch", DATA_PATH=str(prepared_corpus.dataset_dir),
               TOKENIZER_PATH=str(prepared_corpus.tokenizer_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), GLOO_SOCKET_IFNAME="lo")
    ranks = [subprocess.Popen([sys.executable, "-m", "train"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        seen = []
        for line in ranks[0].stdout:  # wait until both ranks are stepping
            seen.append(line)
            if line.startswith("step:2/"):
                break
        assert seen and seen[-1].startswith("step:2/"), "".join(seen)[-3000:]
        ranks[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rest, _ = ranks[0].communicate(timeout=timeout + 10 + 30)  # the collective, the barrier, and slack
        waited = time.monotonic() - t0
        out = "".join(seen) + rest
        assert ranks[0].returncode == 1, out[-3000:]
        assert "rank 1 stopped answering" in out and "DIST_TIMEOUT_SECONDS=6" in out, out[-3000:]
        assert waited >= timeout - 1, f"rank 0 stopped after {waited:.1f}s, before DIST_TIMEOUT_SECONDS"
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
