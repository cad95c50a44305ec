"""The pinned tiny run: train the `tiny` preset briefly by step, export its artifact, print what is pinned.

    python tests/pin_tiny_run.py --out pinned.json        (run from the repository root)

tests/test_pin.py runs this in a child process with one thread and fixed SIMD dispatch (PIN_ENV) so the
numbers do not depend on how pytest was started, and compares them bit for bit with tests/pins/tiny_run.json.
What is pinned: every training loss, the float and round-trip val_bpb of the export step, and a sha256 of
every tensor decoded from the artifact (kind, shape and dequantized fp32 values; the artifact's header,
which stores the config, is not pinned). A refactor must leave all of them unchanged.

All paths are repo-relative (the tiny preset's data and tokenizer paths, the run folder below .cache/), so
the run is the same from any clone.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

STEPS = 40  # enough for SWA snapshots, the warmdown and a calibrated GPTQ to all take part


def pinned_config(runs_dir: str):
    from model import from_env

    return from_env(environ={}, preset="tiny", iterations=STEPS, warmdown_iters=STEPS // 3, val_loss_every=0,
                    swa_every=5, eval_stride=256, runs_dir=runs_dir, run_id="pin")


def tensor_digests(artifact_path) -> dict:
    """{name: sha256 of kind, shape and the dequantized fp32 values} for every tensor in the artifact."""
    from quant.artifact import read_artifact

    out = {}
    for name, q in sorted(read_artifact(artifact_path).tensors.items()):
        values = q.dequantize().float().contiguous().numpy()
        h = hashlib.sha256(f"{q.kind}:{tuple(q.shape)}:".encode())
        h.update(values.tobytes())
        out[name] = h.hexdigest()
    return out


def run(runs_dir: str) -> dict:
    import kernels
    from quant.export import export_run
    from train.trainer import train

    kernels.set_backend("torch")
    summary = train(pinned_config(runs_dir), export_fn=functools.partial(export_run, compare=False), echo=False)
    export = summary["export"]
    return {"train_losses": summary["train_losses"], "float_val_bpb": export["float_val_bpb"],
            "roundtrip_val_bpb": export["roundtrip_val_bpb"],
            "tensor_sha256": tensor_digests(export["artifact_path"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the pinned values (JSON)")
    parser.add_argument("--runs-dir", default=".cache/tests/pin-runs", help="repo-relative folder for the run")
    args = parser.parse_args(argv)
    result = run(args.runs_dir)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
