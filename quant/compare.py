"""The method comparison of a run's export step (quant/export.py, on when the val set is small): every other
registered method quantized from the same calibration, written to runs/<id>/quant_compare/<method>.ptz, read
back and scored; the gaps and their ratios logged. A report for experiments, not part of a record's run: the
bundled train_gpt.py leaves this module out (quant/bundle.py LEFT_OUT) and says so in its log.
"""
from __future__ import annotations

import math
from pathlib import Path

from model.io import from_rank0

from .artifact import write_artifact
from .calibrate import objective_summary
from .export import _ratio, evaluate_final
from .load import load_model
from .methods import METHODS


def gap_ratios(gaps: dict) -> dict:
    """{"later/earlier": gap ratio} for every pair of registered methods, in registration order."""
    names = [m for m in METHODS if m in gaps]
    return {f"{a}/{b}": _ratio(gaps[a], gaps[b]) for i, a in enumerate(names) for b in names[:i]}


def compare_methods(calibrator, cfg, run_dir: Path, method: str, gap: float, float_val, val_tokens, luts, val_bytes, device,
             log) -> dict:
    """Round trips of the other registered methods, and every method's gap with the ratio of each pair.
    Optional: when its scratch files cannot be written (a full disk) it is skipped with one warning line."""
    folder = run_dir / "quant_compare"
    others = [m for m in METHODS if m != method]
    failed = None
    if calibrator is not None:  # rank 0
        written = []
        try:
            for m in others:
                quantized, stats = calibrator.quantize(m)
                # scratch files read back for the comparison only: fast brotli, no budget (same bytes once decoded)
                written.append(folder / f"{m}.ptz")
                write_artifact(written[-1], quantized, cfg.to_dict(), limit=math.inf, quality=1,
                               container="pergroup" if m == "frontier" else "ouroptz")  # R1's kinds need pergroup
                if stats["objective"]:
                    log(f"quant compare: {objective_summary(stats)}")
        except OSError as err:
            failed = str(err)
            for scratch in written:  # give the space back to what follows (summary.json)
                scratch.unlink(missing_ok=True)
    failed = from_rank0(failed)  # also the barrier before the other ranks read the files
    if failed is not None:
        log(f"quant compare: WARNING skipped the method comparison: {failed}")
        return {"compare_skipped": failed}
    gaps = {method: gap}
    for m in others:
        net, _ = load_model(folder / f"{m}.ptz", device)
        gaps[m] = evaluate_final(net, cfg, val_tokens, luts, device, val_bytes)[1] - float_val[1]
    ratios = gap_ratios(gaps)
    log("quant gaps (round-trip minus float val_bpb): " + "  ".join(f"{m} {gaps[m]:+.4f}" for m in METHODS))
    log("quant gap ratios: " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return {"gaps": gaps, "gap_ratios": ratios}
