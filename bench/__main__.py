"""python -m bench [name ...]: time every registered kernel and its baselines.

With CUDA: triton.testing.do_bench per case, a CSV under bench/results/, a markdown table on screen
and one PNG per kernel. Without CUDA: a smoke run of every entry at tiny shapes through the Triton
interpreter, written to a temp folder only, its rows marked "interpreter-smoke".
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Kernel modules read this when they are imported (the entries import them): set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import registry, report  # noqa: E402
from model.cli import positive_float  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="entries to run (default: all registered)")
    parser.add_argument("--list", action="store_true", help="list the registered entries and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one call each (the default without CUDA; through the interpreter there)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the CSV and plots (default: bench/results with CUDA, a temp folder for smoke)")
    parser.add_argument("--csv", type=Path, default=None, help="exact CSV path (overrides --out for the CSV)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--warmup-ms", type=positive_float, default=registry.MIN_WARMUP_MS,
                        help="do_bench warm-up budget (>= 25)")
    parser.add_argument("--rep-ms", type=positive_float, default=registry.MIN_REP_MS,
                        help="do_bench timing budget (>= 100)")
    args = parser.parse_args(argv)
    if args.warmup_ms < registry.MIN_WARMUP_MS or args.rep_ms < registry.MIN_REP_MS:
        parser.error(f"--warmup-ms must be >= {registry.MIN_WARMUP_MS} and --rep-ms >= {registry.MIN_REP_MS} "
                     f"(got {args.warmup_ms}, {args.rep_ms})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    try:
        entries = registry.load_entries(args.names)
    except (KeyError, RuntimeError) as exc:
        print(f"bench: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    if args.list:
        for name, fn in entries.items():
            print(f"{name:<16} {fn.__module__}")
        return 0
    if not entries:
        print("bench: no entries are registered (bench/<family>.py modules with @register): nothing to run",
              file=sys.stderr)
        return 2

    smoke = args.smoke or not cuda
    if not cuda:
        print("bench: no CUDA on this machine: running an interpreter smoke of every entry at tiny shapes. "
              "Its times are Triton-interpreter times, not GPU numbers.")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="ouroboros-bench-smoke-")) if smoke else report.RESULTS_DIR)
    env = report.environment()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{'smoke' if smoke else 'bench'}_{report.gpu_slug(env['gpu'])}_{stamp}"

    print(f"bench: {len(entries)} entries on {env['gpu']} ({'smoke' if smoke else 'do_bench'}): {', '.join(entries)}")
    results = registry.run_entries(entries, "cuda" if cuda else "cpu", smoke, args.warmup_ms, args.rep_ms,
                                   progress=lambda line: print(line, flush=True))
    rows = [report.to_row(r, env) for r in results]
    csv_path = report.write_csv(args.csv or out_dir / f"{stem}.csv", rows)
    print()
    print(report.markdown_table(rows))
    print(f"bench: wrote {csv_path}")
    if not args.no_plot:
        for png in report.plot(rows, out_dir, stem):
            print(f"bench: wrote {png}")
    failed = [r for r in results if r.error]
    if failed:
        print(f"bench: {len(failed)} of {len(results)} cases failed (see the error column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
