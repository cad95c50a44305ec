"""`python -m train.download --train-shards N`: the challenge's FineWeb sp1024 shards from Hugging Face.

The dataset repo (default willdepueoai/parameter-golf, a dataset repo) keeps everything under a root
folder `datasets/`; its manifest lists each tokenized dataset with its shard counts and tokenizer:

    datasets/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_{train,val}_%06d.bin
    datasets/tokenizers/fineweb_1024_bpe.{model,vocab}

Everything below the root maps to the same path below --out-root (default data/), so the shards land
in data/datasets/fineweb10B_sp1024/ beside the embedded corpus. Files already there and valid are
kept. Without a network it stops at once; `python -m train.prepare` builds the offline corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from model.cli import nonnegative_int
from model.io import write_atomic
from train.data import ShardError, load_shard

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
DEFAULT_DATASET = "fineweb10B_sp1024"
DEFAULT_TRAIN_SHARDS = 80
SHARD_PREFIX = "fineweb"  # fineweb_{train,val}_%06d.bin, train shards numbered from 0
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

    def remote_files(self, train_shards: int) -> list[str]:
        """Remote paths below the root: val shards, the first train_shards train shards, tokenizer files."""
        if not 0 <= train_shards <= self.train_shards_available:
            raise DownloadError(f"--train-shards {train_shards}: {self.dataset} has "
                                f"{self.train_shards_available} train shards (choose 0..{self.train_shards_available})")
        folder = f"datasets/{self.dataset}"
        return ([f"{folder}/{SHARD_PREFIX}_val_{i:06d}.bin" for i in range(self.val_shards)]
                + [f"{folder}/{SHARD_PREFIX}_train_{i:06d}.bin" for i in range(train_shards)]
                + list(self.tokenizer_files))


def parse_manifest(manifest: dict, dataset: str = DEFAULT_DATASET) -> DownloadPlan:
    """What the manifest says about one dataset: shard counts and the tokenizer files it was made with."""
    where = f"{REMOTE_ROOT}/manifest.json"
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
    return DownloadPlan(dataset, n_train, n_val, files)


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
    """Put a fetched file at dest atomically; shards are validated before they replace anything."""
    if dest.suffix == ".bin":
        try:
            load_shard(source)
        except ShardError as e:
            raise DownloadError(f"downloaded shard is corrupt, not installed: {e}") from None
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


def _present(dest: Path) -> bool:
    if not dest.is_file() or dest.stat().st_size == 0:
        return False
    if dest.suffix == ".bin":
        try:
            load_shard(dest)
        except ShardError:
            return False
    return True


def download(train_shards: int = DEFAULT_TRAIN_SHARDS, out_root="data", repo_id: str | None = None,
             dataset: str = DEFAULT_DATASET, fetch=None, endpoint: str | None = None) -> list[Path]:
    """Fetch the manifest, then the val shards, the first train_shards train shards and the tokenizer.

    fetch(repo_id=, filename=, repo_type="dataset", endpoint=) -> local file path; default the hub's
    hf_hub_download (tests pass a fake). Returns the local paths of every planned file.
    """
    repo_id = repo_id or os.environ.get("PARAMETER_GOLF_REPO_ID") or DEFAULT_REPO_ID
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

    manifest_file = get("manifest.json")
    try:
        manifest = json.loads(Path(manifest_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DownloadError(f"{REMOTE_ROOT}/manifest.json from {repo_id} is not valid JSON: {e}") from None
    plan = parse_manifest(manifest, dataset)
    remote_files = plan.remote_files(train_shards)
    _place(Path(manifest_file), local_path("manifest.json", out_root))
    dests = []
    for remote in tqdm(remote_files, desc=f"{dataset} from {repo_id}", unit="file"):
        dest = local_path(remote, out_root)
        if not _present(dest):
            _place(get(remote), dest)
        dests.append(dest)
    return dests


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.download", description=__doc__.split("\n")[0])
    parser.add_argument("--train-shards", type=nonnegative_int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"train shards of 10^8 tokens to fetch, 0: only val and the tokenizer "
                             f"(default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--out-root", default="data", help="folder receiving datasets/ and tokenizers/")
    parser.add_argument("--repo-id", default=None,
                        help=f"dataset repo (default $PARAMETER_GOLF_REPO_ID or {DEFAULT_REPO_ID})")
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--endpoint", default=None, help="hub URL (default $HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    try:
        dests = download(args.train_shards, args.out_root, args.repo_id, args.dataset, endpoint=args.endpoint)
    except DownloadError as e:
        sys.exit(f"download failed: {e}")
    shards = [d for d in dests if d.suffix == ".bin"]
    print(f"{len(shards)} shards in {shards[0].parent if shards else args.out_root}; "
          f"tokenizer {', '.join(str(d) for d in dests if d.suffix != '.bin')}")


if __name__ == "__main__":
    main()
