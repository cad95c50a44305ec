"""What every writer and timer in the project shares: the atomic file write, the device sync, and rank 0's
answer sent to every rank.

model/ is the lowest package that train/, quant/ and bench/ may all import, so these live here once.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFullError(OSError):
    """A write that found no space left: says where and about how many bytes it needed."""

    def __init__(self, path: str | os.PathLike, need_bytes: int | None):
        self.path, self.need_bytes = Path(path), need_bytes
        try:
            free = f", {shutil.disk_usage(self.path.parent).free:,} B free"
        except OSError:
            free = ""
        need = f"~{need_bytes:,} B" if need_bytes is not None else "more than was free"
        super().__init__(errno.ENOSPC, f"no space left on {self.path}: need {need}{free}")

    def __str__(self) -> str:
        return self.strerror


def _out_of_space(exc: BaseException) -> bool:
    """Whether `exc` or an error behind it is ENOSPC/EDQUOT (torch.save reports a failed write of the file
    object as "unexpected pos ..." with the OSError only as its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def write_atomic(path: str | os.PathLike, data: bytes | str | Iterable[bytes] | Callable[[BinaryIO], object],
                 size_hint: int | None = None) -> Path:
    """Write `path` so that readers see the old file or the whole new one, never a part.

    data: bytes, str (UTF-8), an iterable of byte chunks (streamed), or a function that writes to the
    open binary file (e.g. `lambda f: torch.save(obj, f)`). The data goes to a temp file in the same
    folder, is fsynced, gets the usual mode 0666 & ~umask (mkstemp would leave 0600) and replaces `path`
    with os.replace; on any error the temp file is removed and `path` is untouched. Returns the path.
    A full disk raises DiskFullError naming `path` and the bytes needed: len(data) for bytes and str,
    else `size_hint` (the caller's estimate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            elif isinstance(data, (bytes, bytearray, memoryview, str)):
                f.write(data.encode() if isinstance(data, str) else data)
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(exc):
            if isinstance(data, (bytes, bytearray, memoryview, str)):
                size_hint = len(data.encode() if isinstance(data, str) else data)
            raise DiskFullError(path, size_hint) from exc
        raise
    return path


def temp_files(folder: str | os.PathLike) -> list[Path]:
    """The temp files of write_atomic (.<name>.<random>.tmp) in `folder` and below: left by killed writes
    once no write is running there."""
    return sorted(p for p in Path(folder).rglob(".*.tmp") if p.is_file())


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU, where every op has finished on return.

    device None: the current CUDA device, if CUDA is available.
    """
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def from_rank0(obj):
    """`obj` as rank 0 has it, on every rank (a collective: every rank calls it); in one process, obj."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
