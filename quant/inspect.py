"""`python -m quant.inspect runs/<id>/final_model.int6.ptz`: the artifact's size ledger (quant/ledger.py).

An OUROPTZ artifact: bytes per category (int6 / int8 codes and row steps, fp16, header) and the full model's
projection. A per-group one: its groups, then its bytes by kind (int6, int7, int8 and gate int8 codes, row
steps, LQER factors, similarity orders, fp16 passthrough, header) with bits per value and share.

Exit status: 0 within the limit, 1 when the artifact (model + code) is over 16,000,000 bytes, 2 when
the file cannot be read or does not load as a model, e.g. its config disagrees with its tensors (the
message says why).
"""
from __future__ import annotations

import argparse
import sys

from .artifact import ArtifactError
from .ledger import build_ledger, format_ledger


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="path to a final_model.int6.ptz")
    parser.add_argument("--no-projection", action="store_true", help="skip the full-model projection")
    args = parser.parse_args(argv)
    try:
        ledger = build_ledger(args.artifact, project=not args.no_projection)
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_ledger(ledger))
    return 1 if ledger.total_bytes > ledger.limit else 0


if __name__ == "__main__":
    sys.exit(main())
