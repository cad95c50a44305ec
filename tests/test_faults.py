"""Faults and bad input (issue 13): each case ends with a clear message and an exit code that means one
thing, and none of them can lose a finished run. The sections below are independent of each other."""


# --- inputs checked before training, exit codes (items 2, 5) ---

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 1024  # the tiny preset's VOCAB_SIZE
BAD_ID, BAD_AT = 1500, 777  # an id outside the vocab, and where the shards below hold it


def _token_shards(folder: Path, bad: str | None = None) -> Path:
    """Two small train shards and one val shard of ids in [1, VOCAB); `bad` ("train" or "val") puts BAD_ID
    at token BAD_AT of the last shard of that split."""
    from train.data import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = {"train_000000": 5_000, "train_000001": 5_000, "val_000000": 2_049}
    for name, count in shards.items():
        tokens = rng.integers(1, VOCAB, count)
        if bad is not None and name == {"train": "train_000001", "val": "val_000000"}[bad]:
            tokens[BAD_AT] = BAD_ID
        write_shard(folder / f"faults_{name}.bin", tokens)
    return folder


def _cli(module: str, *args, timeout: int = 180, **env) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` with the environment `env` added (a None value removes the variable)."""
    full = {**os.environ, "PRESET": "tiny", "KERNELS": "torch", "ITERATIONS": "2", "VAL_LOSS_EVERY": "0",
            "QUANT_METHOD": "rtn"}
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = str(value)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _output(proc) -> str:
    return proc.stdout + proc.stderr


def _assert_bad_input(proc, *needles) -> str:
    """Exit 2, no traceback, and the message names each of `needles`."""
    out = _output(proc)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    return out


@pytest.fixture
def run_env(prepared_corpus, tmp_path):
    """Variables for a short tiny run on tmp_path's shards (made by the test) with the real tokenizer."""
    return dict(DATA_PATH=tmp_path / "data", TOKENIZER_PATH=prepared_corpus.tokenizer_path, RUNS_DIR=tmp_path / "runs",
                RUN_ID="faults")


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_id_outside_the_vocab_stops_the_run_before_its_first_step(run_env, tmp_path, split):
    """A bad id in a later train shard would crash mid-run; one in the val shard was found only at the first
    validation, after training. Both stop the run at start-up, naming the file and the token index."""
    _token_shards(tmp_path / "data", bad=split)
    proc = _cli("train", **run_env)
    bad_file = tmp_path / "data" / ("faults_train_000001.bin" if split == "train" else "faults_val_000000.bin")
    out = _assert_bad_input(proc, str(bad_file), f"token id {BAD_ID} at token {BAD_AT}", f"VOCAB_SIZE={VOCAB}")
    assert "step:1/" not in out  # not one step trained
    assert not (tmp_path / "runs" / "faults" / "final_model.pt").exists()


def test_token_id_check_is_split_across_ranks_and_every_rank_stops(tmp_path):
    """Under torch.distributed rank r scans shards r::world; the rank whose shards are clean raises the
    same error as the rank that found the bad id, so they stop together."""
    _token_shards(tmp_path / "data", bad="train")
    script = tmp_path / "scan.py"
    script.write_text(
        "import os, sys\n"
        "import torch.distributed as dist\n"
        "from train.data import ShardError, check_token_ids, shard_paths\n"
        "dist.init_process_group('gloo')\n"
        "rank, world = dist.get_rank(), dist.get_world_size()\n"
        "paths = shard_paths(sys.argv[1], 'train')\n"
        "try:\n"
        f"    check_token_ids(paths, {VOCAB}, rank, world)\n"
        "    print(f'rank {rank}: clean', flush=True)\n"
        "except ShardError as err:\n"
        "    print(f'rank {rank}: {err}', flush=True)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "data")], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, _output(proc)[-3000:]
    bad = f"{tmp_path / 'data' / 'faults_train_000001.bin'}: token id {BAD_ID} at token {BAD_AT}"
    for rank in (0, 1):  # rank 1 scanned the bad shard, rank 0 only the clean one
        assert f"rank {rank}: {bad}" in proc.stdout, _output(proc)[-3000:]


def test_token_id_check_scans_only_this_ranks_shards(tmp_path):
    from train.data import ShardError, check_token_ids, shard_paths

    paths = shard_paths(_token_shards(tmp_path / "data", bad="train"), "train")
    check_token_ids(paths, VOCAB, rank=0, world_size=2)  # shard 0 only: clean
    with pytest.raises(ShardError, match=rf"faults_train_000001.bin: token id {BAD_ID} at token {BAD_AT}"):
        check_token_ids(paths, VOCAB, rank=1, world_size=2)
    check_token_ids(paths, BAD_ID + 1)  # the same ids fit a larger vocab


@pytest.mark.parametrize("kernels_value, message", [
    ("bogus", "KERNELS='bogus' is not one of"),
    ("triton", "KERNELS=triton needs CUDA, or the Triton interpreter"),
])
def test_bad_kernels_exits_2_before_the_run_folder_exists(run_env, tmp_path, kernels_value, message):
    if kernels_value == "triton" and torch.cuda.is_available():
        pytest.skip("KERNELS=triton is valid with CUDA")
    _token_shards(tmp_path / "data")
    proc = _cli("train", KERNELS=kernels_value, TRITON_INTERPRET=None, **run_env)
    _assert_bad_input(proc, message)
    assert not (tmp_path / "runs").exists()


def test_eval_seq_len_longer_than_the_val_set_exits_2(run_env, tmp_path):
    _token_shards(tmp_path / "data")
    proc = _cli("train", EVAL_SEQ_LEN=4096, EVAL_STRIDE=64, **run_env)
    _assert_bad_input(proc, "hold 2049 tokens", "EVAL_SEQ_LEN=4096 is longer than the val set")


def test_tokenizer_that_is_not_a_sentencepiece_model_exits_2(run_env, tmp_path):
    _token_shards(tmp_path / "data")
    fake = tmp_path / "fake.model"
    fake.write_text("not a sentencepiece model\n")
    proc = _cli("train", **{**run_env, "TOKENIZER_PATH": fake})
    _assert_bad_input(proc, f"TOKENIZER_PATH={fake}: not a sentencepiece model")


@pytest.mark.parametrize("dry_run", [0, 1])
def test_shard_path_that_is_a_directory_exits_2(run_env, tmp_path, dry_run):
    _token_shards(tmp_path / "data")
    folder = tmp_path / "data" / "faults_train_000002.bin"
    folder.mkdir()
    proc = _cli("train", DRY_RUN=dry_run, **run_env)
    _assert_bad_input(proc, f"{folder}: is a directory, not a shard file")


def test_dry_run_exits_2_when_data_is_not_ready(run_env, tmp_path):
    proc = _cli("train", DRY_RUN=1, **{**run_env, "DATA_PATH": tmp_path / "nowhere"})
    _assert_bad_input(proc, "data train: NOT READY", "does not exist")
    shard = _token_shards(tmp_path / "data") / "faults_train_000000.bin"
    proc = _cli("train", DRY_RUN=1, **{**run_env, "DATA_PATH": shard})  # the file, not its folder
    _assert_bad_input(proc, f"DATA_PATH={shard} is a file", str(tmp_path / "data"))
    proc = _cli("train", DRY_RUN=1, EVAL_SEQ_LEN=4096, EVAL_STRIDE=64, **run_env)
    _assert_bad_input(proc, "data val: NOT READY", "EVAL_SEQ_LEN=4096 is longer than the val set")
    assert not (tmp_path / "runs").exists()


def test_inspect_of_a_directory_exits_2(tmp_path):
    proc = _cli("quant.inspect", tmp_path, "--no-projection")
    _assert_bad_input(proc, f"{tmp_path}: is a directory")


def test_artifact_whose_config_disagrees_with_its_tensors_exits_2(tmp_path):
    """Stored MLP_MULT=4 over tensors of a MLP_MULT=3 model: the same names, other shapes. generate and
    inspect both refuse it at load, naming the tensor, its stored shape and the shape the config implies."""
    from model import build_model, from_env
    from quant import artifact
    from quant.scheme import quantize_state_dict

    cfg = from_env(environ={}, preset="tiny", model_dim=64, num_flat_layers=1, bigram_vocab_size=256, bigram_dim=32,
                   inst_dim=8, mlp_mult=3.0)
    told = cfg.replace(mlp_mult=4.0)
    state = build_model(cfg).state_dict()
    with torch.device("meta"):
        expected = build_model(told).state_dict()
    name = next(n for n in state if state[n].shape != expected[n].shape)
    path = tmp_path / "mismatch.ptz"
    artifact.write_artifact(path, quantize_state_dict(state, cfg.quant_small_numel), told.to_dict(), quality=5)
    needles = (str(path), f"tensor {name!r}", f"stored with shape {list(state[name].shape)}",
               f"expects {list(expected[name].shape)}")
    _assert_bad_input(_cli("quant.generate", "--artifact", path, "--tokens", 2), *needles)
    _assert_bad_input(_cli("quant.inspect", path, "--no-projection"), *needles)
