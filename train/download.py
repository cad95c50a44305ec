"""`python -m train.download --variant sp1024|sp8192|sp8192_caseops --train-shards N`: FineWeb shards from Hugging Face.

Each variant (model/datasets.py: VARIANTS) lives in its own dataset repo (REPO_IDS), which keeps everything
under a root folder `datasets/`; its manifest lists each tokenized dataset with its shard counts and tokenizer:

    datasets/manifest.json
    datasets/datasets/<dataset>/fineweb_{train,val}_%06d.bin   (CaseOps also fineweb_val_bytes_%06d.bin)
    datasets/tokenizers/<tokenizer>.{model,vocab}

Everything below the root maps to the same path below --out-root (default data/), so the shards land in
data/datasets/<dataset>/ beside the embedded corpus. Files already there and valid are kept. The manifest is
saved as data/manifest.json with the repo it came from beside it (manifest.source.json); one from another
repo is refused, not silently replaced or reused. Without a network it stops at once; `python -m
train.prepare` builds the offline corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from model.cli import nonnegative_int
from model.datasets import VARIANTS
from model.io import write_atomic
from train.data import ShardError, load_shard

REPO_IDS = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf",
            "sp8192_caseops": "romeerp/parameter-golf-caseops-v1"}
REPO_ID_VARIABLE = "PARAMETER_GOLF_REPO_ID"  # overrides REPO_IDS for whichever variant is downloaded
DEFAULT_VARIANT = "sp1024"
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # R1 ran 80 CaseOps train shards
SHARD_PREFIX = "fineweb"  # fineweb_{train,val}_%06d.bin, train shards numbered from 0
VAL_BYTES_GLOB = f"{SHARD_PREFIX}_val_bytes_*.bin"  # the exporter's sidecar names when the manifest gives none
# Published hashes (DATA_EVAL.md 1.2): a tokenizer with other bytes splits text differently from the shards.
TOKENIZER_SHA256 = {
    "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model":
        "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d",
}
MANIFEST = "manifest.json"
MANIFEST_SOURCE = "manifest.source.json"  # {"repo_id": ...}: which repo the saved manifest came from
OFFLINE_HINT = ("for an offline run build the embedded corpus instead: `python -m train.prepare` "
                "(data/datasets/embedded_sp1024)")


class DownloadError(RuntimeError):
    """The download cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DownloadPlan:
    dataset: str
    train_shards_available: int
    val_shards: int
    tokenizer_files: tuple   # remote paths below the root, e.g. "tokenizers/fineweb_1024_bpe.model"
    val_bytes_glob: str | None = None  # sidecar file names, e.g. "fineweb_val_bytes_*.bin"; None: no sidecars

    def val_shard(self, index: int) -> str:
        return f"datasets/{self.dataset}/{SHARD_PREFIX}_val_{index:06d}.bin"

    def sidecars(self) -> dict[str, str]:
        """Remote path of each val byte sidecar -> remote path of the val shard whose tokens it counts the bytes of."""
        if self.val_bytes_glob is None:
            return {}
        return {f"datasets/{self.dataset}/{self.val_bytes_glob.replace('*', f'{i:06d}')}": self.val_shard(i)
                for i in range(self.val_shards)}

    def remote_files(self, train_shards: int) -> list[str]:
        """Remote paths below the root: the tokenizer files first (a bad hash stops before gigabytes of shards),
        the val shards, their byte sidecars, then the first train_shards train shards."""
        if not 0 <= train_shards <= self.train_shards_available:
            raise DownloadError(f"--train-shards {train_shards}: {self.dataset} has "
                                f"{self.train_shards_available} train shards (choose 0..{self.train_shards_available})")
        return (list(self.tokenizer_files)
                + [self.val_shard(i) for i in range(self.val_shards)]
                + list(self.sidecars())
                + [f"datasets/{self.dataset}/{SHARD_PREFIX}_train_{i:06d}.bin" for i in range(train_shards)])


def parse_manifest(manifest: dict, dataset: str = VARIANTS[DEFAULT_VARIANT].dataset, source: str = "",
                   val_bytes: bool = False) -> DownloadPlan:
    """What the manifest (of repo `source`) says about one dataset: shard counts, the tokenizer files it was made
    with and, when it names a val_bytes_glob or val_bytes is set, the val byte sidecars' file names."""
    where = f"{REMOTE_ROOT}/{MANIFEST}" + (f" of {source}" if source else "")
    datasets = manifest.get("datasets") if isinstance(manifest, dict) else None
    if not isinstance(datasets, list):
        raise DownloadError(f"{where}: no 'datasets' list; is this the parameter-golf dataset repo?")
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == dataset), None)
    if entry is None:
        names = [d.get("name") for d in datasets if isinstance(d, dict)]
        raise DownloadError(f"{where}: dataset {dataset!r} not listed (it has {names})")
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{where}: dataset {dataset!r} lacks integer stats.files_train / stats.files_val "
                            f"(got stats={stats!r})") from None
    tok_name = entry.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers") or [] if isinstance(t, dict) and t.get("name") == tok_name),
                     None)
    if tokenizer is None:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} of dataset {dataset!r} is not in its 'tokenizers' list")
    files = tuple(str(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k))
    if not files:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} names no model_path / vocab_path")
    val_bytes_glob = entry.get("val_bytes_glob")
    if val_bytes_glob:
        # Only the file-name part counts: the exporter writes each sidecar beside its val shard, where the
        # evaluation looks for it; the folder part is the exporter's own path.
        name = str(val_bytes_glob).rsplit("/", 1)[-1]
        if name.count("*") != 1 or any(c in name for c in "?[") or not name.endswith(".bin"):
            raise DownloadError(f"{where}: dataset {dataset!r} has val_bytes_glob {val_bytes_glob!r}; expected a .bin "
                                f"file name with one '*' for the shard number, such as {VAL_BYTES_GLOB!r}")
        val_bytes_glob = name
    elif val_bytes:
        val_bytes_glob = VAL_BYTES_GLOB
    return DownloadPlan(dataset, n_train, n_val, files, val_bytes_glob or None)


def check_saved_manifest(out_root, repo_id: str, variant: str) -> None:
    """Refuse the manifest an earlier download left in out_root when it came from another repo, or, written by a
    downloader that did not record its repo, does not list this variant's dataset.

    R1's downloader reused such a stale manifest silently; replacing it silently would lose the record of
    where the files beside it came from. Either way the user should decide, so the message says what to do.
    The same repo's manifest passes: this download replaces it with the repo's current one.
    """
    path, source_path = Path(out_root) / MANIFEST, Path(out_root) / MANIFEST_SOURCE
    if not path.exists():
        return
    try:
        source = json.loads(source_path.read_text(encoding="utf-8"))["repo_id"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None  # R1's downloader, or this one before it recorded the repo
    if source == repo_id:
        return
    try:
        listed = [d.get("name") for d in json.loads(path.read_text(encoding="utf-8"))["datasets"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = []
    dataset = VARIANTS[variant].dataset
    to_delete = f"{path} and {source_path}" if source_path.exists() else str(path)
    remedy = (f"delete {to_delete} (the shards and tokenizers already downloaded stay valid) or pass --out-root "
              f"<another folder>")
    if source is not None:
        raise DownloadError(f"{path} is the manifest of {source} (datasets {listed}), not of {repo_id}, where variant "
                            f"{variant} comes from; {remedy}; or pass --repo-id {source} if that is the repo you mean")
    if dataset not in listed:
        raise DownloadError(f"{path} records no source repo and lists datasets {listed}, not {dataset} of variant "
                            f"{variant}: it is stale or from another repo; {remedy}")


def local_path(remote: str, out_root) -> Path:
    """Where a remote path below the root lands: datasets/datasets/x/f.bin -> <out_root>/datasets/x/f.bin."""
    parts = Path(remote).parts
    if not parts or Path(remote).is_absolute() or ".." in parts:
        raise DownloadError(f"refusing remote path {remote!r}: it must stay inside {REMOTE_ROOT}/")
    return Path(out_root).joinpath(*parts)


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the hub's host cannot be reached (DNS or TCP), or None when it can; fails fast instead of retrying."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy may reach what a direct connection cannot: let the hub client try
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e})"
    return None


def _hub_fetch():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: pip install -e '.[download]'") from None
    return hf_hub_download


def _place(source: Path, dest: Path) -> None:
    """Put a fetched file at dest atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:  # a hard link to the hub's cached blob: 80 shards of 200 MB are not stored twice
        os.link(Path(source).resolve(), tmp)
        os.replace(tmp, dest)
        return
    except OSError:
        tmp.unlink(missing_ok=True)
    with open(source, "rb") as f:
        write_atomic(dest, iter(lambda: f.read(1 << 24), b""))


def _unusable(path: Path, dest: Path, val_shard: Path | None) -> str | None:
    """Why the file at path cannot serve as dest, or None: empty, a shard (.bin) not in the shard format, or a
    byte sidecar whose length is not its val shard's (it holds one byte count per val token)."""
    if not path.is_file() or path.stat().st_size == 0:
        return "missing or empty"
    if dest.suffix == ".bin":
        try:
            count = load_shard(path).size
        except ShardError as e:
            return str(e)
        if val_shard is not None and count != (tokens := load_shard(val_shard).size):
            return f"its {count:,} byte counts do not match the {tokens:,} tokens of its val shard {val_shard}"
    return None


def _sha256_mismatch(path: Path, name: str) -> tuple[str, str] | None:
    """(published, actual) sha256 when a file named `name` has a published hash and path holds other bytes."""
    published = TOKENIZER_SHA256.get(name)
    if published is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return None if digest.hexdigest() == published else (published, digest.hexdigest())


def download(train_shards: int = DEFAULT_TRAIN_SHARDS, out_root="data", repo_id: str | None = None,
             variant: str = DEFAULT_VARIANT, fetch=None, endpoint: str | None = None) -> list[Path]:
    """Fetch the variant's manifest, then its tokenizer, val shards (with byte sidecars for CaseOps) and the
    first train_shards train shards.

    repo_id: default $PARAMETER_GOLF_REPO_ID, else REPO_IDS[variant]. fetch(repo_id=, filename=,
    repo_type="dataset", endpoint=) -> local file path; default the hub's hf_hub_download (tests pass a fake).
    Returns the local paths of every planned file.
    """
    if variant not in VARIANTS:
        raise DownloadError(f"unknown variant {variant!r} (choose one of {', '.join(VARIANTS)})")
    spec = VARIANTS[variant]
    repo_id = repo_id or os.environ.get(REPO_ID_VARIABLE) or REPO_IDS[variant]
    check_saved_manifest(out_root, repo_id, variant)
    if fetch is None:
        # Probe first: the hub client retries for ~25 s before it gives up on a machine without network.
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
            reason = hub_unreachable(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            if reason:
                raise DownloadError(f"the Hugging Face Hub is unreachable, {reason}; {OFFLINE_HINT}")
        fetch = _hub_fetch()

    def get(remote: str) -> Path:
        try:
            return Path(fetch(repo_id=repo_id, filename=f"{REMOTE_ROOT}/{remote}", repo_type="dataset",
                              endpoint=endpoint))
        except Exception as e:  # offline, not found, HTTP errors: all end the download with one message
            raise DownloadError(f"fetching {REMOTE_ROOT}/{remote} from {repo_id} failed ({type(e).__name__}: "
                                f"{e}); {OFFLINE_HINT}") from e

    manifest_file = get(MANIFEST)
    try:
        manifest = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DownloadError(f"{REMOTE_ROOT}/{MANIFEST} from {repo_id} is not valid JSON: {e}") from None
    plan = parse_manifest(manifest, spec.dataset, repo_id, val_bytes=spec.caseops)
    if spec.tokenizer_path(out_root) not in [local_path(f, out_root) for f in plan.tokenizer_files]:
        # the config's TOKENIZER_PATH default for this variant would miss it
        raise DownloadError(f"{REMOTE_ROOT}/{MANIFEST} of {repo_id}: dataset {spec.dataset} comes with tokenizer "
                            f"files {list(plan.tokenizer_files)}, not tokenizers/{spec.tokenizer_model} that variant "
                            f"{variant} expects")
    remote_files = plan.remote_files(train_shards)
    _place(Path(manifest_file), local_path(MANIFEST, out_root))
    write_atomic(local_path(MANIFEST_SOURCE, out_root), json.dumps({"repo_id": repo_id}) + "\n")
    sidecars = plan.sidecars()
    dests = []
    for remote in tqdm(remote_files, desc=f"{variant} from {repo_id}", unit="file"):
        dest = local_path(remote, out_root)
        val_shard = local_path(sidecars[remote], out_root) if remote in sidecars else None
        if dest.is_file() and _unusable(dest, dest, val_shard) is None:
            mismatch = _sha256_mismatch(dest, dest.name)
            if mismatch:  # out of the way, so that nothing loads it by its expected name
                aside = dest.with_name(f"{dest.name}.{mismatch[1][:12]}.rejected")
                os.replace(dest, aside)
                raise DownloadError(f"{dest} has sha256 {mismatch[1]}, not the published {mismatch[0]}; moved it to "
                                    f"{aside}; run again to fetch the published file")
            dests.append(dest)
            continue
        source = get(remote)
        problem = _unusable(source, dest, val_shard)
        mismatch = _sha256_mismatch(source, dest.name) if problem is None else None
        if mismatch:
            problem = f"sha256 {mismatch[1]}, not the published {mismatch[0]}"
        if problem:
            raise DownloadError(f"{REMOTE_ROOT}/{remote} from {repo_id} is not installed as {dest}: {problem}")
        _place(source, dest)
        dests.append(dest)
    return dests


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.download", description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default=DEFAULT_VARIANT,
                        help=f"which tokenized FineWeb: sp1024 (the challenge's), sp8192, or sp8192_caseops (R1's, "
                             f"with val byte sidecars); default {DEFAULT_VARIANT}")
    parser.add_argument("--train-shards", type=nonnegative_int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"train shards of 10^8 tokens to fetch, 0: only val and the tokenizer "
                             f"(default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--out-root", default="data", help="folder receiving datasets/ and tokenizers/")
    parser.add_argument("--repo-id", default=None,
                        help=f"dataset repo (default ${REPO_ID_VARIABLE}, else the variant's: "
                             + ", ".join(f"{variant} {repo}" for variant, repo in REPO_IDS.items()) + ")")
    parser.add_argument("--endpoint", default=None, help="hub URL (default $HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    try:
        dests = download(args.train_shards, args.out_root, args.repo_id, args.variant, endpoint=args.endpoint)
    except DownloadError as e:
        sys.exit(f"download failed: {e}")
    spec = VARIANTS[args.variant]
    print(f"{sum(d.suffix == '.bin' for d in dests)} shard files in {spec.data_path(args.out_root)}; run with "
          f"DATA_PATH={spec.data_path(args.out_root)} TOKENIZER_PATH={spec.tokenizer_path(args.out_root)}")


if __name__ == "__main__":
    main()
