"""The FineWeb download, offline: manifest parsing, remote-to-local paths, the three variants, and a fake hub."""
import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import train.download as download_module
from model.datasets import VARIANTS, Variant, variant_for
from train.data import load_shard, shard_paths, write_shard
from train.download import (REPO_IDS, TOKENIZER_SHA256, DownloadError, DownloadPlan, download, hub_unreachable,
                            local_path, main, parse_manifest)

CASEOPS = VARIANTS["sp8192_caseops"]
CASEOPS_MODEL = b"caseops model bytes"

MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp512", "tokenizer_name": "fineweb_512_bpe", "stats": {"files_train": 9, "files_val": 1}},
        {"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
         "stats": {"files_train": 3, "files_val": 2, "tokens_train": 300}},
        {"name": "fineweb10B_sp8192", "tokenizer_name": "fineweb_8192_bpe",
         "stats": {"files_train": 3, "files_val": 2}},
        {"name": CASEOPS.dataset, "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
         "stats": {"files_train": 3, "files_val": 2},
         "val_bytes_glob": f"datasets/{CASEOPS.dataset}/fineweb_val_bytes_*.bin"},
    ],
    "tokenizers": [
        {"name": "fineweb_512_bpe", "model_path": "tokenizers/fineweb_512_bpe.model"},
        {"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        {"name": "fineweb_8192_bpe", "model_path": "tokenizers/fineweb_8192_bpe.model",
         "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"},
        {"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
         "model_path": f"tokenizers/{CASEOPS.tokenizer_model}",
         "vocab_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab"},
    ],
}


class FakeHub:
    """Serves files of a fake dataset repo from a folder, the way hf_hub_download returns a cached path.

    One folder holds the datasets of all three variants, whichever repo is asked; `calls` records which."""

    def __init__(self, root: Path, manifest=MANIFEST):
        self.root, self.calls = root, []
        files = {"datasets/manifest.json": json.dumps(manifest).encode()}
        for dataset in ("fineweb10B_sp1024", "fineweb10B_sp8192", CASEOPS.dataset):
            for i in range(2):
                files[f"datasets/datasets/{dataset}/fineweb_val_{i:06d}.bin"] = np.arange(5 + i)
            for i in range(3):
                files[f"datasets/datasets/{dataset}/fineweb_train_{i:06d}.bin"] = np.full(10, i)
        for i in range(2):  # one byte count per val token, 0 for the BOS
            files[f"datasets/datasets/{CASEOPS.dataset}/fineweb_val_bytes_{i:06d}.bin"] = np.r_[0, np.full(4 + i, 3)]
        files["datasets/tokenizers/fineweb_1024_bpe.model"] = b"model bytes"
        files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"vocab text"
        files["datasets/tokenizers/fineweb_8192_bpe.model"] = b"sp8192 model bytes"
        files["datasets/tokenizers/fineweb_8192_bpe.vocab"] = b"sp8192 vocab text"
        files[f"datasets/tokenizers/{CASEOPS.tokenizer_model}"] = CASEOPS_MODEL
        files["datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab"] = b"caseops vocab"
        for name, content in files.items():
            path = root / "repo" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                write_shard(path, content)

    def remote(self, name: str) -> Path:
        return self.root / "repo" / "datasets" / name

    def __call__(self, *, repo_id, filename, repo_type, endpoint=None):
        assert repo_type == "dataset"
        self.calls.append((repo_id, filename))
        path = self.root / "repo" / filename
        if not path.is_file():
            raise FileNotFoundError(f"404 {filename}")  # the hub's EntryNotFoundError is an OSError too
        return str(path)


@pytest.fixture
def caseops_hash_of_fake(monkeypatch):
    """The fake CaseOps model's hash stands in for the published one (no fake can have the real bytes' hash)."""
    monkeypatch.setitem(TOKENIZER_SHA256, CASEOPS.tokenizer_model, hashlib.sha256(CASEOPS_MODEL).hexdigest())


def replace_local(path: Path, content: bytes) -> None:
    path.unlink()  # local copies may be hard links to the hub's cache: change a copy, not the cache
    path.write_bytes(content)


def test_parse_manifest():
    plan = parse_manifest(MANIFEST)
    assert plan == DownloadPlan("fineweb10B_sp1024", 3, 2, ("tokenizers/fineweb_1024_bpe.model",
                                                             "tokenizers/fineweb_1024_bpe.vocab"))
    assert plan.remote_files(1) == [
        "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin", "datasets/fineweb10B_sp1024/fineweb_val_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"]
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


def test_sidecar_names_follow_val_bytes_glob():
    def entry(**extra):
        dataset = {"name": "d", "tokenizer_name": "t", "stats": {"files_train": 0, "files_val": 2}, **extra}
        return {"datasets": [dataset],
                "tokenizers": [{"name": "t", "model_path": "tokenizers/t.model"}]}

    assert parse_manifest(entry(val_bytes_glob="/export/datasets/d/val_bytes_*.bin"), "d").sidecars() == {
        "datasets/d/val_bytes_000000.bin": "datasets/d/fineweb_val_000000.bin",
        "datasets/d/val_bytes_000001.bin": "datasets/d/fineweb_val_000001.bin"}
    assert list(parse_manifest(entry(), "d", val_bytes=True).sidecars()) == [
        "datasets/d/fineweb_val_bytes_000000.bin", "datasets/d/fineweb_val_bytes_000001.bin"]
    assert parse_manifest(entry(), "d").sidecars() == {}
    with pytest.raises(DownloadError, match=r"val_bytes_glob 'd/\*_\*\.bin'"):
        parse_manifest(entry(val_bytes_glob="d/*_*.bin"), "d")


def test_local_paths_mirror_the_remote_root(tmp_path):
    assert local_path("manifest.json", tmp_path) == tmp_path / "manifest.json"
    assert local_path("datasets/fineweb10B_sp1024/fineweb_val_000000.bin", tmp_path) == \
        tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    assert local_path("tokenizers/fineweb_1024_bpe.model", tmp_path) == \
        tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    for bad in ("../escape.bin", "/etc/passwd"):
        with pytest.raises(DownloadError, match="inside"):
            local_path(bad, tmp_path)


def test_variant_table_for_the_config():
    assert VARIANTS == {
        "sp1024": Variant("fineweb10B_sp1024", "fineweb_1024_bpe.model", 1024, False),
        "sp8192": Variant("fineweb10B_sp8192", "fineweb_8192_bpe.model", 8192, False),
        "sp8192_caseops": Variant("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                                  "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", 8192, True)}
    assert [variant_for(1024, False), variant_for(8192, False), variant_for(8192, 1), variant_for(1024, True)] == \
        ["sp1024", "sp8192", "sp8192_caseops", None]
    assert CASEOPS.data_path() == Path("data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    assert CASEOPS.tokenizer_path("/d") == \
        Path("/d/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    # the config imports the table: it must not pull in the downloader or huggingface_hub
    tree = ast.parse((Path(__file__).parents[1] / "model" / "datasets.py").read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    assert imported <= {"__future__", "pathlib", "typing"}
    assert REPO_IDS == {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf",
                        "sp8192_caseops": "romeerp/parameter-golf-caseops-v1"}
    assert TOKENIZER_SHA256 == {  # DATA_EVAL.md 1.2
        CASEOPS.tokenizer_model: "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_lands_where_the_config_looks(tmp_path, variant, caseops_hash_of_fake):
    hub, out, spec = FakeHub(tmp_path), tmp_path / "data", VARIANTS[variant]
    dests = download(train_shards=1, out_root=out, variant=variant, fetch=hub)
    assert {repo for repo, _ in hub.calls} == {REPO_IDS[variant]}
    assert json.loads((out / "manifest.source.json").read_text()) == {"repo_id": REPO_IDS[variant]}
    folder = spec.data_path(out)
    assert [p.name for p in shard_paths(folder, "train")] == ["fineweb_train_000000.bin"]
    assert [load_shard(p).tolist() for p in sorted(folder.glob("fineweb_val_0*.bin"))] == \
        [list(range(5)), list(range(6))]
    sidecars = sorted(folder.glob("fineweb_val_bytes_*.bin"))
    if spec.caseops:
        assert [load_shard(p).tolist() for p in sidecars] == [[0, 3, 3, 3, 3], [0, 3, 3, 3, 3, 3]]
        assert spec.tokenizer_path(out).read_bytes() == CASEOPS_MODEL
    else:
        assert sidecars == []
    assert spec.tokenizer_path(out).is_file() and spec.tokenizer_path(out).with_suffix(".vocab").is_file()
    assert len(dests) == 2 + 2 + len(sidecars) + 1 and all(p.is_file() for p in dests)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_more_train_shards_than_the_manifest_offers_is_refused(tmp_path, variant):
    # the default (80, as R1 ran) is more than the fake repo's 3
    with pytest.raises(DownloadError, match=f"--train-shards 80: {VARIANTS[variant].dataset} has 3 train shards"):
        download(out_root=tmp_path / "data", variant=variant, fetch=FakeHub(tmp_path))
    assert not (tmp_path / "data" / "datasets").exists()


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
    replace_local(bad, bad.read_bytes()[:-1])
    download(train_shards=3, out_root=out, repo_id="someone/golf", fetch=hub)
    assert sorted(f for _, f in hub.calls) == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                                "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin",
                                                "datasets/manifest.json"]
    assert load_shard(bad).tolist() == [1] * 10


def test_corrupt_remote_shard_is_not_installed(tmp_path):
    hub = FakeHub(tmp_path)
    remote = hub.remote("datasets/fineweb10B_sp1024/fineweb_train_000000.bin")
    remote.write_bytes(remote.read_bytes() + b"\0")
    with pytest.raises(DownloadError, match="fineweb_train_000000.bin"):
        download(train_shards=1, out_root=tmp_path / "data", fetch=hub)
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()


def test_caseops_tokenizer_with_other_bytes_is_refused(tmp_path, monkeypatch):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    model = CASEOPS.tokenizer_path(out)
    fake_hash = hashlib.sha256(CASEOPS_MODEL).hexdigest()
    # fetched: the fake's bytes are not the published model's
    with pytest.raises(DownloadError) as refused:
        download(train_shards=1, out_root=out, variant="sp8192_caseops", fetch=hub)
    message = str(refused.value)
    assert all(s in message for s in (CASEOPS.tokenizer_model, fake_hash, TOKENIZER_SHA256[CASEOPS.tokenizer_model]))
    assert not model.exists() and not CASEOPS.data_path(out).exists(), "the tokenizer is checked before any shard"
    # already present: refused too, and moved aside so that nothing loads it by its name
    monkeypatch.setitem(TOKENIZER_SHA256, CASEOPS.tokenizer_model, fake_hash)
    download(train_shards=1, out_root=out, variant="sp8192_caseops", fetch=hub)
    replace_local(model, b"other bytes")
    with pytest.raises(DownloadError) as refused:
        download(train_shards=1, out_root=out, variant="sp8192_caseops", fetch=hub)
    aside = model.with_name(f"{model.name}.{hashlib.sha256(b'other bytes').hexdigest()[:12]}.rejected")
    assert str(model) in str(refused.value) and fake_hash in str(refused.value)
    assert hashlib.sha256(b"other bytes").hexdigest() in str(refused.value) and str(aside) in str(refused.value)
    assert not model.exists() and aside.read_bytes() == b"other bytes"
    download(train_shards=1, out_root=out, variant="sp8192_caseops", fetch=hub)  # as the message says
    assert model.read_bytes() == CASEOPS_MODEL


@pytest.mark.parametrize("sidecar, problem", [
    (np.arange(7), "its 7 byte counts do not match the 6 tokens of its val shard"),
    (b"not a shard", "shorter than the 1024-byte shard header"),
], ids=["wrong_length", "not_a_shard"])
def test_sidecar_must_match_its_val_shard(tmp_path, caseops_hash_of_fake, sidecar, problem):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    name = f"datasets/{CASEOPS.dataset}/fineweb_val_bytes_000001.bin"
    remote = hub.remote(name)
    good = remote.read_bytes()
    if isinstance(sidecar, bytes):
        remote.write_bytes(sidecar)
    else:
        write_shard(remote, sidecar)
    with pytest.raises(DownloadError) as refused:
        download(train_shards=0, out_root=out, variant="sp8192_caseops", fetch=hub)
    assert f"datasets/{name} from {REPO_IDS['sp8192_caseops']} is not installed" in str(refused.value)
    assert problem in str(refused.value)
    if "val shard" in problem:
        assert str(CASEOPS.data_path(out) / "fineweb_val_000001.bin") in str(refused.value)
    assert not local_path(name, out).exists()
    # a local sidecar that does not fit is fetched again, like a corrupt shard
    remote.write_bytes(good)
    download(train_shards=0, out_root=out, variant="sp8192_caseops", fetch=hub)
    replace_local(local_path(name, out), (tmp_path / "repo" / "datasets" / "datasets" / CASEOPS.dataset /
                                          "fineweb_val_bytes_000000.bin").read_bytes())
    hub.calls.clear()
    download(train_shards=0, out_root=out, variant="sp8192_caseops", fetch=hub)
    assert sorted(f for _, f in hub.calls) == [f"datasets/{name}", "datasets/manifest.json"]
    assert load_shard(local_path(name, out)).size == 6


def test_manifest_of_another_repo_is_refused(tmp_path, caseops_hash_of_fake):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    download(train_shards=0, out_root=out, variant="sp1024", fetch=hub)
    hub.calls.clear()
    with pytest.raises(DownloadError) as refused:
        download(train_shards=0, out_root=out, variant="sp8192_caseops", fetch=hub)
    message = str(refused.value)
    assert message.startswith(f"{out / 'manifest.json'} is the manifest of willdepueoai/parameter-golf (datasets "
                              f"['fineweb10B_sp512', 'fineweb10B_sp1024', ")
    assert "not of romeerp/parameter-golf-caseops-v1, where variant sp8192_caseops comes from" in message
    assert f"delete {out / 'manifest.json'} and {out / 'manifest.source.json'}" in message
    assert "--out-root" in message and "--repo-id willdepueoai/parameter-golf" in message
    assert hub.calls == [], "refused before anything is fetched"
    for name in ("manifest.json", "manifest.source.json"):  # as the message says
        (out / name).unlink()
    download(train_shards=0, out_root=out, variant="sp8192_caseops", fetch=hub)
    assert json.loads((out / "manifest.source.json").read_text()) == {"repo_id": "romeerp/parameter-golf-caseops-v1"}


def test_unrecorded_manifest_without_the_dataset_is_refused(tmp_path):
    hub, out = FakeHub(tmp_path), tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}]}))  # R1's downloader
    with pytest.raises(DownloadError) as refused:
        download(train_shards=0, out_root=out, variant="sp8192", fetch=hub)
    assert str(refused.value).startswith(
        f"{out / 'manifest.json'} records no source repo and lists datasets ['fineweb10B_sp1024'], not "
        f"fineweb10B_sp8192 of variant sp8192: it is stale or from another repo; delete {out / 'manifest.json'} (")
    # one that lists the dataset is replaced by the repo's, now with its source recorded
    download(train_shards=0, out_root=out, variant="sp1024", fetch=hub)
    assert json.loads((out / "manifest.json").read_text()) == MANIFEST
    assert json.loads((out / "manifest.source.json").read_text()) == {"repo_id": "willdepueoai/parameter-golf"}


def test_cli_names_the_variant_and_prints_the_paths(tmp_path, monkeypatch, capsys, caseops_hash_of_fake):
    hub = FakeHub(tmp_path)
    monkeypatch.setattr(download_module, "_hub_fetch", lambda: hub)
    monkeypatch.setattr(download_module, "hub_unreachable", lambda endpoint: None)
    monkeypatch.delenv("PARAMETER_GOLF_REPO_ID", raising=False)
    out = tmp_path / "data"
    main(["--variant", "sp8192_caseops", "--train-shards", "2", "--out-root", str(out)])
    assert capsys.readouterr().out.strip() == (
        f"6 shard files in {CASEOPS.data_path(out)}; run with DATA_PATH={CASEOPS.data_path(out)} "
        f"TOKENIZER_PATH={CASEOPS.tokenizer_path(out)}")
    monkeypatch.setenv("PARAMETER_GOLF_REPO_ID", "mirror/caseops")  # overrides the variant's repo
    main(["--variant", "sp8192_caseops", "--train-shards", "0", "--out-root", str(tmp_path / "mirrored")])
    assert hub.calls[-1][0] == "mirror/caseops"
    with pytest.raises(SystemExit) as stop:
        main(["--variant", "sp4096"])
    assert stop.value.code == 2 and "invalid choice: 'sp4096'" in capsys.readouterr().err


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
