"""Test setup: on a machine without CUDA, every Triton kernel runs through the interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here, before any test
module imports kernels/. Models and references run in fp32 on the CPU (bf16 there is ~30x slower).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one core; more threads per worker only fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared_corpus():
    """The embedded corpus under <repo>/data, built once (about 15 s) or reused from `make train`.

    prepare() holds a file lock while it builds, so parallel test workers build it once between them.
    Returns train.prepare.Summary (dataset_dir, tokenizer_path, token counts, shard names).
    """
    from pathlib import Path

    from train.prepare import prepare

    return prepare(out_root=Path(__file__).resolve().parents[1] / "data", progress=False)


# Source files whose contents decide what the tiny_run fixture trains: any change retrains it.
_TINY_RUN_SOURCES = ("model/config.py", "model/gpt.py", "kernels/__init__.py", "kernels/mlp.py", "kernels/norm.py",
                     "kernels/attention.py", "kernels/head.py", "train/trainer.py", "train/step.py", "train/muon.py",
                     "train/data.py", "train/evaluate.py")
TINY_RUN_STEPS = 40  # enough that the weights leave their init and quantization gaps mean something


def tiny_run_config(corpus):
    """The tiny preset, cut to TINY_RUN_STEPS with its warmdown scaled to match, on the prepared corpus.

    The final evaluation uses non-overlapping windows (stride = window) to keep the fixture cheap.
    """
    from model import from_env

    return from_env(environ={}, preset="tiny", iterations=TINY_RUN_STEPS, warmdown_iters=TINY_RUN_STEPS // 3,
                    val_loss_every=0, swa_every=5, eval_stride=256, data_path=str(corpus.dataset_dir),
                    tokenizer_path=str(corpus.tokenizer_path))


@pytest.fixture(scope="session")
def tiny_run(prepared_corpus):
    """runs-style folder (final_model.pt, summary.json, train.log, config.json) of a short tiny-preset run.

    Trained once and cached under .cache/tests/tiny_run-<hash>, the hash covering the config, the
    training sources and the corpus manifest; a file lock makes parallel pytest-xdist workers train it
    once between them. The run trains into a temporary folder that is renamed into place when complete.
    """
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from filelock import FileLock

    import kernels

    repo = Path(__file__).resolve().parents[1]
    cfg = tiny_run_config(prepared_corpus)
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for rel in _TINY_RUN_SOURCES:
        digest.update(rel.encode() + b"\0" + (repo / rel).read_bytes())
    manifest = Path(prepared_corpus.dataset_dir) / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    cache = repo / ".cache" / "tests"
    cache.mkdir(parents=True, exist_ok=True)
    name = f"tiny_run-{digest.hexdigest()[:16]}"
    final = cache / name
    with FileLock(str(cache / f"{name}.lock")):
        if not (final / "final_model.pt").is_file():
            from train.trainer import train

            partial = cache / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier attempt
            kernels.set_backend("torch")  # the interpreted Triton kernels would take far longer
            try:
                with torch.random.fork_rng():  # training seeds the global RNG; leave the session's alone
                    train(cfg.replace(runs_dir=str(cache), run_id=partial.name), echo=False)
            finally:
                kernels.set_backend(None)
            shutil.rmtree(final, ignore_errors=True)  # a leftover without final_model.pt
            os.replace(partial, final)  # whole folder at once: readers never see a half-written run
    return final
