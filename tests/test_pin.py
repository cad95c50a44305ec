"""The pin: the tiny run's losses, val_bpb and artifact tensors must not move when the code is refactored.

tests/pin_tiny_run.py trains the tiny preset for 40 steps by step schedule, exports the artifact
(loop-aware GPTQ) and reports train_losses, export.float_val_bpb, export.roundtrip_val_bpb and a sha256
of every decoded artifact tensor. They are compared bit for bit with tests/pins/tiny_run.json.

It runs in a child process with one thread per BLAS/OpenMP pool and AVX2 dispatch (PIN_ENV), so the
numbers do not depend on whether pytest runs with xdist or on how wide the CPU's vectors are. The result
is cached under .cache/tests/pin-<key>.json behind a file lock, the key covering every .py file under
kernels/ model/ train/ quant/, the runner and the corpus manifest: any source change runs it again.

A change that is meant to move these numbers (a new model feature, a fixed bug) regenerates the pins
deliberately: `OUROBOROS_UPDATE_PINS=1 .venv/bin/python -m pytest tests/test_pin.py`, and says why in
its commit.
"""
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, hash_project_sources
from filelock import FileLock

PIN_FILE = REPO / "tests" / "pins" / "tiny_run.json"
RUNNER = REPO / "tests" / "pin_tiny_run.py"
PIN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "KERNELS": "torch"}
if platform.machine() in ("x86_64", "AMD64"):  # the same vector code path on AVX2 and AVX-512 machines
    PIN_ENV.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")


def source_key(corpus_manifest: Path) -> str:
    digest = hashlib.sha256(json.dumps(PIN_ENV, sort_keys=True).encode())
    hash_project_sources(digest)
    digest.update(RUNNER.read_bytes())
    digest.update(corpus_manifest.read_bytes() if corpus_manifest.is_file() else b"no manifest")
    return digest.hexdigest()[:16]


def run_pinned(corpus) -> dict:
    """The runner's result for the current sources: from the cache, or computed once under a lock."""
    cache = REPO / ".cache" / "tests"
    cache.mkdir(parents=True, exist_ok=True)
    key = source_key(Path(corpus.dataset_dir) / "manifest.json")
    result_path = cache / f"pin-{key}.json"
    with FileLock(str(cache / f"pin-{key}.lock")):
        if not result_path.is_file():
            runs_dir = Path(".cache") / "tests" / f"pin-runs-{key}"
            subprocess.run(["rm", "-rf", str(REPO / runs_dir)], check=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
            env.update(PIN_ENV, PYTHONPATH=str(REPO))  # this checkout's code, also from a git worktree
            proc = subprocess.run([sys.executable, str(RUNNER), "--out", str(result_path), "--runs-dir", str(runs_dir)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, f"pin run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            subprocess.run(["rm", "-rf", str(REPO / runs_dir)], check=True)
    return json.loads(result_path.read_text())


def test_tiny_run_is_pinned(prepared_corpus):
    got = run_pinned(prepared_corpus)
    if os.environ.get("OUROBOROS_UPDATE_PINS") == "1":
        PIN_FILE.parent.mkdir(parents=True, exist_ok=True)
        PIN_FILE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"OUROBOROS_UPDATE_PINS=1: wrote {PIN_FILE.relative_to(REPO)}")
    want = json.loads(PIN_FILE.read_text())
    assert len(got["train_losses"]) == len(want["train_losses"])
    moved = [f"step {i + 1}: {a!r} != pinned {b!r}" for i, (a, b) in
             enumerate(zip(got["train_losses"], want["train_losses"])) if a != b]
    assert not moved, "train losses moved:\n" + "\n".join(moved[:10])
    for key in ("float_val_bpb", "roundtrip_val_bpb"):
        assert got[key] == want[key], f"export.{key} {got[key]!r} != pinned {want[key]!r}"
    assert sorted(got["tensor_sha256"]) == sorted(want["tensor_sha256"]), "the artifact's tensor names changed"
    changed = [name for name, h in want["tensor_sha256"].items() if got["tensor_sha256"][name] != h]
    assert not changed, f"decoded artifact tensors changed: {changed}"
