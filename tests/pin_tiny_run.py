"""The pinned tiny run: train the `tiny` preset briefly by step, export its artifact, record what is pinned.

    python tests/pin_tiny_run.py --out pinned.json --artifact-out pinned.int6.ptz   (from the repository root)

tests/test_pin.py runs this in a child process with one thread per BLAS/OpenMP pool (PIN_ENV there) and
compares the result with tests/pins/tiny_run.json and tests/pins/tiny_run.int6.ptz. What is pinned: every
training loss, the float and round-trip val_bpb of the export step, and the artifact's decoded tensors
(codes, row steps, fp16 values; its header, which stores the config and paths, is not pinned).

fp32 on a CPU depends on the kernels picked for the processor (ATen's vector width, MKL's and oneDNN's code
paths), so the result also records `machine`: where it was made, in the terms that pick those kernels. The
test compares bit for bit only on the same kind of machine, and within stated tolerances elsewhere.

All paths are repo-relative (the tiny preset's data and tokenizer paths, the run folder below .cache/), so
the run is the same from any clone.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

STEPS = 40  # enough for SWA snapshots, the warmdown and a calibrated GPTQ to all take part
# Variables that choose which vector code ATen, MKL and oneDNN run: part of `machine` when set.
DISPATCH_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
# The CPU flags that decide kernel choice (x86 vector extensions; Arm's SIMD and SVE); the rest of the flag
# list (mitigations, virtualization) does not change a float.
_SIMD_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|amx|asimd|sve|fphp|bf16|i8mm)")


def _cpuinfo() -> dict:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _blas() -> str:
    """The math libraries this torch build calls for fp32 (from torch.__config__.show())."""
    import torch

    shown = torch.__config__.show()
    libraries = [re.sub(r"\s*\(Git Hash \w+\)", "", line.strip(" -")) for line in shown.splitlines()
                 if line.startswith("  - ") and re.search(r"Math Kernel Library|MKL-DNN|oneDNN|OpenBLAS|BLIS|Kleidi",
                                                           line)]
    blas = re.search(r"BLAS_INFO=([^,\s]+)", shown)
    return "; ".join(([f"BLAS_INFO={blas.group(1)}"] if blas else []) + libraries)


def machine() -> dict:
    """Where a pinned result is made, as far as it decides fp32 results: the processor, the vector code ATen
    dispatches to, the torch build and its BLAS, and any dispatch variable set."""
    import torch

    info = _cpuinfo()
    flags = (info.get("flags") or info.get("Features") or "").split()
    return {"arch": platform.machine(),
            "cpu": info.get("model name") or info.get("Model") or info.get("CPU part") or platform.processor(),
            "cpu_vendor": info.get("vendor_id") or info.get("CPU implementer") or "",
            "simd_flags": sorted(f for f in flags if _SIMD_FLAG.match(f)),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "blas": _blas(),
            "dispatch_env": {v: os.environ[v] for v in DISPATCH_VARS if os.environ.get(v)},
            "threads": torch.get_num_threads()}


def pinned_config(runs_dir: str):
    from model import from_env

    return from_env(environ={}, preset="tiny", iterations=STEPS, warmdown_iters=STEPS // 3, val_loss_every=0,
                    swa_every=5, eval_stride=256, runs_dir=runs_dir, run_id="pin")


def run(runs_dir: str) -> tuple[dict, Path]:
    """(the pinned numbers with `machine`, the run's artifact path)."""
    import kernels
    from quant.export import export_run
    from train.trainer import train

    kernels.set_backend("torch")
    summary = train(pinned_config(runs_dir), export_fn=functools.partial(export_run, compare=False), echo=False)
    export = summary["export"]
    return ({"machine": machine(), "train_losses": summary["train_losses"], "float_val_bpb": export["float_val_bpb"],
             "roundtrip_val_bpb": export["roundtrip_val_bpb"]}, Path(export["artifact_path"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the pinned values (JSON)")
    parser.add_argument("--artifact-out", type=Path, required=True, help="where to copy the run's artifact")
    parser.add_argument("--runs-dir", default=".cache/tests/pin-runs", help="repo-relative folder for the run")
    args = parser.parse_args(argv)
    result, artifact = run(args.runs_dir)
    # the artifact first, the JSON last: a JSON on disk means both are complete
    for source, dest in ((artifact, args.artifact_out), (None, args.out)):
        tmp = dest.with_name(dest.name + ".tmp")
        if source is None:
            tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        else:
            shutil.copyfile(source, tmp)
        tmp.replace(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
