"""model/io.py: the one atomic write every file that matters goes through, and the device sync."""
import os

import pytest
import torch

from model.io import synchronize, write_atomic


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("form", ["bytes", "str", "chunks", "writer"])
def test_write_atomic_every_form_gives_the_bytes_and_the_usual_mode(tmp_path, form):
    data = {"bytes": b"abc\x00def", "str": "abc\x00def", "chunks": iter([b"abc", b"\x00", b"def"]),
            "writer": lambda f: f.write(b"abc\x00def")}[form]
    path = write_atomic(tmp_path / "sub" / "out.bin", data)
    assert path.read_bytes() == b"abc\x00def"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "keep.json"
    path.write_text("old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_checkpoints_and_artifacts_get_the_same_mode_as_other_files(tmp_path):
    from model import build_model, save_checkpoint

    path = tmp_path / "model.pt"
    save_checkpoint(build_model(preset="tiny", num_flat_layers=1, crawler_loops=1), path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # was 0600 before model/io.py


def test_synchronize_accepts_cpu_devices_and_none():
    synchronize(torch.device("cpu"))
    synchronize("cpu")
    synchronize(None)
