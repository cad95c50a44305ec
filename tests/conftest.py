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

# The one device definition every test module imports (`from conftest import DEVICE`): CUDA when present,
# else the CPU, where Triton kernels run through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


import pytest  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The packages whose code decides what a trained model and its artifact hold (bench/ and tests/ do not).
SOURCE_DIRS = ("kernels", "model", "train", "quant")


def hash_project_sources(digest) -> None:
    """Feed every .py file under SOURCE_DIRS (path and contents) into `digest`: a cache key for trained runs."""
    files = sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls(request):
    """fp32 references must be fp32: TF32 stays off in every test (restored after), unless the test is
    marked `tf32`. On a CPU-only machine the flags do nothing; on a GPU an earlier training run in the same
    worker would otherwise leave TF32 on and blur every later fp32 comparison."""
    from kernels._runtime import tf32_matmuls

    with tf32_matmuls(request.node.get_closest_marker("tf32") is not None):
        yield


@pytest.fixture
def torch_kernels_one_thread():
    """The PyTorch kernels path on one thread, both restored after: on a shared 2-core machine two OpenMP
    threads make orthogonal init ~10x slower."""
    import kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared_corpus():
    """The embedded corpus under <repo>/data, built once (about 15 s) or reused from `make train`.

    prepare() holds a file lock while it builds, so parallel test workers build it once between them.
    Returns train.prepare.Summary (dataset_dir, tokenizer_path, token counts, shard names).
    """
    from train.prepare import prepare

    return prepare(out_root=REPO / "data", progress=False)


# A 2-block model at sequence length 64: the same code paths as the presets, at a fraction of the cost.
SMALL = dict(model_dim=64, num_heads=1, num_kv_heads=1, num_flat_layers=2, crawler_loops=2,
             bigram_vocab_size=256, bigram_dim=32, inst_dim=8, train_seq_len=64, train_batch_tokens=4 * 64,
             grad_accum_steps=1, iterations=3, max_wallclock_seconds=0.0, warmdown_iters=0, warmup_steps=0,
             val_loss_every=0, train_log_every=1, swa_every=0, eval_seq_len=64, eval_stride=32,
             eval_batch_seqs=32, seed=7)


def _small_copy(corpus, folder) -> dict:
    """The first 60k train and 2k val tokens of a prepared corpus (and of its val byte sidecar, if it has one)
    as shards of their own: DATA_PATH and TOKENIZER_PATH for runs that take seconds."""
    import numpy as np

    from train.data import load_shard, shard_paths, sidecar_paths, write_shard

    src = corpus.dataset_dir
    train_tokens = np.concatenate([load_shard(p) for p in shard_paths(src, "train")])[:60_000]
    val = shard_paths(src, "val")[:1]
    write_shard(folder / "embedded_train_000000.bin", train_tokens)
    write_shard(folder / "embedded_val_000000.bin", load_shard(val[0])[:2_049])
    for sidecar in sidecar_paths(val):
        write_shard(folder / "embedded_val_bytes_000000.bin", load_shard(sidecar)[:2_049])
    return dict(data_path=str(folder), tokenizer_path=str(corpus.tokenizer_path))


@pytest.fixture(scope="session")
def small_data(prepared_corpus, tmp_path_factory):
    """The first 60k train and 2k val tokens of the embedded corpus: for runs that take seconds
    (tests/test_train.py, tests/test_records.py)."""
    return _small_copy(prepared_corpus, tmp_path_factory.mktemp("small_corpus"))


@pytest.fixture(scope="session")
def prepared_caseops_corpus():
    """The embedded corpus as CaseOps text at vocab 8192 with val byte sidecars (`python -m train.prepare
    --variant sp8192_caseops`), built once (about 10 s) or reused; what frontier-tiny trains on."""
    from train.prepare import prepare

    return prepare(out_root=REPO / "data", progress=False, vocab_size=8192, case_ops=True)


@pytest.fixture(scope="session")
def small_caseops_data(prepared_caseops_corpus, tmp_path_factory):
    """small_data of the CaseOps corpus, its val byte sidecar included."""
    return _small_copy(prepared_caseops_corpus, tmp_path_factory.mktemp("small_caseops_corpus"))


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
    sources (hash_project_sources), the corpus manifest and what picks the CPU's kernels (torch version, ATen
    capability, dispatch variables); a file lock makes parallel pytest-xdist workers train it once between
    them. It trains on one thread, as an xdist worker has, so a plain `pytest` run builds the same model. The
    run trains into a temporary folder that is renamed into place when complete.
    """
    import hashlib
    import json
    import shutil

    from filelock import FileLock

    import kernels
    from pin_tiny_run import DISPATCH_VARS

    repo = REPO
    cfg = tiny_run_config(prepared_corpus)
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    hash_project_sources(digest)
    manifest = Path(prepared_corpus.dataset_dir) / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    dispatch = [torch.__version__, torch.backends.cpu.get_cpu_capability()] + [
        os.environ.get(v, "") for v in DISPATCH_VARS]
    digest.update(json.dumps(dispatch).encode())
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
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.random.fork_rng():  # training seeds the global RNG; leave the session's alone
                    train(cfg.replace(runs_dir=str(cache), run_id=partial.name), echo=False)
            finally:
                kernels.set_backend(None)
                torch.set_num_threads(threads)
            shutil.rmtree(final, ignore_errors=True)  # a leftover without final_model.pt
            os.replace(partial, final)  # whole folder at once: readers never see a half-written run
    return final
