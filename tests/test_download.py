"""The FineWeb download, offline: manifest parsing, remote-to-local paths, and a fake hub."""
import json
from pathlib import Path

import numpy as np
import pytest

from train.data import load_shard, shard_paths, write_shard
from train.download import (DownloadError, DownloadPlan, download, hub_unreachable, local_path, main,
                            parse_manifest)

MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp512", "tokenizer_name": "fineweb_512_bpe", "stats": {"files_train": 9, "files_val": 1}},
        {"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
         "stats": {"files_train": 3, "files_val": 2, "tokens_train": 300}},
    ],
    "tokenizers": [
        {"name": "fineweb_512_bpe", "model_path": "tokenizers/fineweb_512_bpe.model"},
        {"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
    ],
}


class FakeHub:
    """Serves files of a fake dataset repo from a folder, the way hf_hub_download returns a cached path."""

    def __init__(self, root: Path, manifest=MANIFEST):
        self.root, self.calls = root, []
        files = {"datasets/manifest.json": json.dumps(manifest).encode()}
        for i in range(2):
            files[f"datasets/datasets/fineweb10B_sp1024/fineweb_val_{i:06d}.bin"] = np.arange(5 + i)
        for i in range(3):
            files[f"datasets/datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin"] = np.full(10, i)
        files["datasets/tokenizers/fineweb_1024_bpe.model"] = b"model bytes"
        files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"vocab text"
        for name, content in files.items():
            path = root / "repo" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                write_shard(path, content)

    def __call__(self, *, repo_id, filename, repo_type, endpoint=None):
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename))
        path = self.root / "repo" / filename
        if not path.is_file():
            raise FileNotFoundError(f"404 {filename}")  # the hub's EntryNotFoundError is an OSError too
        return str(path)


def test_parse_manifest():
    plan = parse_manifest(MANIFEST)
    assert plan == DownloadPlan("fineweb10B_sp1024", 3, 2, ("tokenizers/fineweb_1024_bpe.model",
                                                             "tokenizers/fineweb_1024_bpe.vocab"))
    assert plan.remote_files(1) == [
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "datasets/fineweb10B_sp1024/fineweb_val_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    assert parse_manifest(MANIFEST, "fineweb10B_sp512").tokenizer_files == ("tokenizers/fineweb_512_bpe.model",)
    with pytest.raises(DownloadError, match="has 3 train shards"):
        plan.remote_files(4)


@pytest.mark.parametrize("manifest, message", [
    ({}, "no 'datasets' list"),
    ({"datasets": [{"name": "other"}]}, "'fineweb10B_sp1024' not listed"),
    ({"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": 2}}]}, "files_val"),
    ({"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "t", "stats": {"files_train": 2, "files_val": 1}}],
      "tokenizers": []}, "tokenizer 't'"),
])
def test_bad_manifests_say_what_is_missing(manifest, message):
    with pytest.raises(DownloadError, match=message):
        parse_manifest(manifest)


def test_local_paths_mirror_the_remote_root(tmp_path):
    assert local_path("manifest.json", tmp_path) == tmp_path / "manifest.json"
    assert local_path("datasets/fineweb10B_sp1024/fineweb_val_000000.bin", tmp_path) == \
        tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert local_path("tokenizers/fineweb_1024_bpe.model", tmp_path) == \
        tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    for bad in ("../escape.bin", "/etc/passwd"):
        with pytest.raises(DownloadError, match="inside"):
            local_path(bad, tmp_path)


def test_download_with_fake_hub(tmp_path):
    hub = FakeHub(tmp_path)
    out = tmp_path / "data"
    dests = download(train_shards=2, out_root=out, repo_id="someone/golf", fetch=hub)
    folder = out / "datasets" / "fineweb10B_sp1024"
    assert [p.name for p in shard_paths(folder, "train")] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [load_shard(p).tolist() for p in shard_paths(folder, "val")] == [list(range(5)), list(range(6))]
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model bytes"
    assert json.loads((out / "manifest.json").read_text()) == MANIFEST
    assert len(dests) == 6 and all(p.is_file() for p in dests)
    assert {repo for repo, _ in hub.calls} == {"someone/golf"}
    # files already in place and valid are not fetched again; a corrupt one is
    hub.calls.clear()
    bad = folder / "fineweb_train_000001.bin"
    damaged = bad.read_bytes()[:-1]
    bad.unlink()  # local copies may be hard links to the hub's cache: damage a copy, not the cache
    bad.write_bytes(damaged)
    download(train_shards=3, out_root=out, repo_id="someone/golf", fetch=hub)
    assert sorted(f for _, f in hub.calls) == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                                "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin",
                                                "datasets/manifest.json"]
    assert load_shard(bad).tolist() == [1] * 10


def test_corrupt_remote_shard_is_not_installed(tmp_path):
    hub = FakeHub(tmp_path)
    remote = tmp_path / "repo" / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    remote.write_bytes(remote.read_bytes() + b"\0")
    with pytest.raises(DownloadError, match="fineweb_train_000000.bin"):
        download(train_shards=1, out_root=tmp_path / "data", fetch=hub)
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()


def test_offline_fails_at_once_pointing_to_prepare(tmp_path, monkeypatch):
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)  # the probe is skipped behind a proxy
    def offline_hub(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    with pytest.raises(DownloadError, match="python -m train.prepare"):
        download(train_shards=1, out_root=tmp_path, fetch=offline_hub)
    # the reachability probe: a host under .invalid never resolves (RFC 6761)
    assert "cannot connect to hub.invalid" in hub_unreachable("https://hub.invalid", timeout=2.0)
    with pytest.raises(SystemExit) as stop:
        main(["--train-shards", "1", "--out-root", str(tmp_path), "--endpoint", "https://hub.invalid"])
    assert "python -m train.prepare" in str(stop.value)
    assert not any(tmp_path.iterdir()), "nothing is written when the hub cannot be reached"
