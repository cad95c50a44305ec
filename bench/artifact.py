"""The artifact containers side by side: bytes and write / read seconds of every coder of the per-group container
(quant/artifact.py: "ans", "brotli", "lrzip" where its binary exists) and of today's OUROPTZ container, in one run.

    python -m bench.artifact                      # (a) the R1-shaped synthetic model, (b) the pinned tiny run
    python -m bench.artifact --trained runs/<id>/final_model.int6.ptz ...   # (b) these trained artifacts instead
    python -m bench.artifact --scale 0.25 --skip-synthetic --out bench/results/artifact.md

(a) R1's model (QUANT.md Q.3): 11 blocks of c_q 512x512, c_k / c_v 256x512, attn.proj 512x512, mlp.fc 2048x512,
mlp.proj 512x2048 int6, tok_emb 8192x512 int7, 11 attention gates [8, 12] gate_int8, LQER rank-4 asymmetric factors
on tok_emb and two mlp.fc, and R1's 30,887 fp16 control values. Weights are Student-t with 5 degrees of freedom
(heavy tails: at k 11.5 the codes' order-0 entropy is 3.4255 bits, the figure the issue measured), quantized
by SDClip round-to-nearest here (step = fp16(k * std(row) / clip_range), codes round(w / step) clamped), with R1's
k: MLP 11.5, attention 13.0, embedding 14.0 at int7. GPTQ would move codes by at most one step and not their
statistics; the "random Hessians" of the issue therefore do not enter. Random codes have no structure beyond
order 0, so this measures a coder's overhead over the entropy, and speed.
(b) The codes of trained models: real structure (an embedding's rare tokens crowd together, columns differ).

Times: wall seconds and this process's CPU seconds (the machine may be shared; CPU seconds are what an idle
machine would take on one core). Every round trip is checked bit for bit. R1's own numbers (8xH100 host, lrzip
ZPAQ per group): 15,865,260 B, 99.9 s write, 20.4 s read.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quant import artifact as art
from quant.scheme import KIND_FP16, KIND_GATE, KIND_INT6, KIND_INT7, KIND_INT8, QuantizedTensor

R1 = {"bytes": 15_865_260, "write_s": 99.9, "read_s": 20.4}
# The issue's measurements on 11 R1-shaped 2048x512 int6 matrices at k 11.5 (11,534,336 codes, 3.4255 bits).
ISSUE_FC = {"lrzip -z -L 9 (ZPAQ)": (4_942_693, 38.1), "brotli-11 lgwin 24": (4_996_855, 24.3),
            "zstd-19": (5_043_218, 14.0), "lzma-9e": (5_324_956, 14.5), "constriction order-0 rANS": (4_938_824, 0.4)}
PINNED_TINY = Path(__file__).resolve().parent.parent / "tests" / "pins" / "tiny_run.int6.ptz"
CONTROL = {"attn.q_gain": (8,), "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512)}


def sdclip_rtn(w: torch.Tensor, k: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDClip round-to-nearest (R1's step rule without GPTQ): (int8 codes, fp32 steps of fp16 value)."""
    clip = 2 ** (bits - 1) - 1
    step = (k * w.float().std(dim=1) / clip).clamp_min(1e-10).half().float()
    codes = torch.where(step[:, None] > 0, torch.round(w / step[:, None]), torch.zeros_like(w))
    return codes.clamp(-clip, clip).to(torch.int8), step


def _lqer_asym(err: torch.Tensor, rank: int = 4, group: int = 64) -> tuple:
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    a, b = u[:, :rank] * s[:rank], vh[:rank]
    sa = (a.abs().max().clamp_min(1e-10) / 1.5).half()
    qa = torch.round(a / sa.float()).clamp(-2, 1).to(torch.int8)
    g = b.reshape(-1, group)
    sb = (g.abs().amax(1).clamp_min(1e-10) / 7.5).half()
    qb = torch.round(g / sb.float()[:, None]).clamp(-8, 7).to(torch.int8).reshape(b.shape)
    return qa, sa, qb, sb


def r1_synthetic(seed: int = 0, scale: float = 1.0, layers: int = 11) -> dict:
    """R1's stored tensors (module docstring), every matrix dimension times `scale` (1.0: R1's shapes)."""
    rng = np.random.default_rng(seed)
    d, kv, hidden, vocab = (max(8, int(x * scale)) for x in (512, 256, 2048, 8192))

    def weights(rows, cols):
        return torch.from_numpy(rng.standard_t(5, (rows, cols)).astype(np.float32))

    out, errors = {}, {}

    def matrix(name, rows, cols, k, kind, bits):
        w = weights(rows, cols)
        codes, step = sdclip_rtn(w, k, bits)
        out[name] = QuantizedTensor(kind, (rows, cols), codes=codes, scale=step)
        errors[name] = w - codes.float() * step[:, None]

    matrix("tok_emb.weight", vocab, d, 14.0, KIND_INT7, 7)
    for i in range(layers):
        p = f"blocks.{i}."
        for name, (rows, cols), k in (("attn.c_q", (d, d), 13.0), ("attn.c_k", (kv, d), 13.0),
                                      ("attn.c_v", (kv, d), 13.0), ("attn.proj", (d, d), 13.0),
                                      ("mlp.fc", (hidden, d), 11.5), ("mlp.proj", (d, hidden), 11.5)):
            matrix(f"{p}{name}.weight", rows, cols, k, KIND_INT6, 6)
        gate = weights(8, 12) * 0.1
        step = (gate.abs().amax(1).clamp_min(1e-10) / 127).half().float()
        out[f"{p}attn.attn_gate_w"] = QuantizedTensor(KIND_GATE, (8, 12), codes=torch.round(gate / step[:, None]).clamp(
            -127, 127).to(torch.int8), scale=step)
        for name, shape in CONTROL.items():
            out[p + name] = QuantizedTensor(KIND_FP16, shape, values=(1 + 0.1 * weights(1, math.prod(shape))).half()
                                            .reshape(shape))
    for name, shape in {"skip_weights": (8, d), "skip_gates": (8, d), "parallel_post_lambdas": (layers, 2, 2),
                        "parallel_resid_lambdas": (layers, 2), "smear_gate.weight": (1, 12), "smear_lambda": (1,)}.items():
        out[name] = QuantizedTensor(KIND_FP16, shape, values=weights(1, math.prod(shape)).half().reshape(shape))
    # LQER on the three largest errors (Frobenius norm), as R1 picks them
    for name in sorted(errors, key=lambda n: -float(errors[n].norm()))[:3]:
        out[name].lqer = _lqer_asym(errors[name])
    return out


def as_ouroptz(quantized: dict) -> dict:
    """The same codes in today's container's kinds: int7 and gate_int8 as int8 (codes and steps stored alike), LQER
    factors as separate int8 entries with unit steps and fp16 entries (the same information)."""
    out = {}
    for name, q in quantized.items():
        kind = KIND_INT8 if q.kind in (KIND_INT7, KIND_GATE) else q.kind
        out[name] = QuantizedTensor(kind, q.shape, codes=q.codes, scale=q.scale, values=q.values)
        if q.lqer is not None:
            qa, sa, qb, sb = q.lqer
            out[name + ".lqA"] = QuantizedTensor(KIND_INT8, tuple(qa.shape), codes=qa, scale=torch.ones(qa.shape[0]))
            out[name + ".lqB"] = QuantizedTensor(KIND_INT8, tuple(qb.shape), codes=qb, scale=torch.ones(qb.shape[0]))
            out[name + ".lqAs"] = QuantizedTensor(KIND_FP16, tuple(sa.shape), values=sa.half())
            out[name + ".lqBs"] = QuantizedTensor(KIND_FP16, tuple(sb.shape), values=sb.half())
    return out


def order0_bits(codes: list[np.ndarray]) -> float:
    """Order-0 entropy of the codes pooled, in bits (all of them)."""
    if not codes:
        return 0.0
    counts = np.bincount(np.concatenate([c.ravel().astype(np.int64) + 256 for c in codes]))
    counts = counts[counts > 0]
    n = counts.sum()
    return float(n * math.log2(n) - (counts * np.log2(counts)).sum())


def group_codes(quantized: dict) -> dict:
    """{group: [code matrices]} as the per-group container routes them."""
    groups = {g: [] for g in art.GROUPS}
    for name, q in quantized.items():
        if q.kind != KIND_FP16:
            groups[art.group_of(name)].append(q.codes.numpy())
            for part, t in zip(("qA", "sA", "qB", "sB"), q.lqer or ()):
                if part.startswith("q"):
                    groups[art.group_of(name, part)].append(t.numpy())
    return {g: m for g, m in groups.items() if m}


def same(a: dict, b: dict) -> bool:
    def parts(q):
        return [q.codes, q.scale, q.values, *(q.lqer or ())]
    return a.keys() == b.keys() and all(
        a[n].kind == b[n].kind and all((x is None and y is None) or (x is not None and y is not None and torch.equal(
            x.float(), y.float())) for x, y in zip(parts(a[n]), parts(b[n]))) for n in a)


def measure(quantized: dict, config: dict, coders: list[str]) -> list[dict]:
    """Write and read `quantized` with each coder ("ouroptz": today's container); bytes, times, exact round trip."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for coder in coders:
            path = Path(tmp, f"{coder}.ptz")
            stored = as_ouroptz(quantized) if coder == "ouroptz" else quantized
            t0, c0 = time.perf_counter(), time.process_time()
            if coder == "ouroptz":
                data = art.blob(stored, config)
            else:
                data = art.blob(stored, config, container="pergroup", coder=coder)
            path.write_bytes(data)
            t1, c1 = time.perf_counter(), time.process_time()
            back = art.read_artifact(path)
            t2, c2 = time.perf_counter(), time.process_time()
            rows.append(dict(coder=coder, bytes=len(data), write_s=t1 - t0, write_cpu_s=c1 - c0, read_s=t2 - t1,
                             read_cpu_s=c2 - c1, exact=same(stored, back.tensors),
                             groups={g: b for g, _, b in back.groups}, meta_bytes=back.meta_bytes))
    return rows


def format_rows(title: str, quantized: dict, rows: list[dict], r1: bool = False) -> str:
    groups = group_codes(quantized)
    n_codes = sum(m.size for ms in groups.values() for m in ms)
    h0 = {g: order0_bits(ms) for g, ms in groups.items()}
    lines = [f"### {title}", "", f"{len(quantized)} tensors, {n_codes:,} codes; order-0 entropy of the codes, per group "
             f"pooled: {sum(h0.values()) / 8:,.0f} B", "",
             "| container / coder | bytes | vs order-0 codes | write s (cpu) | read s (cpu) | exact |", "|---|---:|---:|---:|---:|:-:|"]
    for row in rows:
        lines.append(f"| {'ouroptz (today)' if row['coder'] == 'ouroptz' else 'pergroup ' + row['coder']} | "
                     f"{row['bytes']:,} | {row['bytes'] - sum(h0.values()) / 8:+,.0f} | {row['write_s']:.2f} "
                     f"({row['write_cpu_s']:.2f}) | {row['read_s']:.2f} ({row['read_cpu_s']:.2f}) | "
                     f"{'yes' if row['exact'] else 'NO'} |")
    if r1:
        lines.append(f"| R1 (lrzip ZPAQ, its real codes, 8xH100 host) | {R1['bytes']:,} | | {R1['write_s']} | "
                     f"{R1['read_s']} | |")
    per = [row for row in rows if row["groups"]]
    lines += ["", "| group | codes | order-0 bits/code | order-0 B | " + " | ".join(f"{r['coder']} B" for r in per) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(per)]
    for g, ms in groups.items():
        n = sum(m.size for m in ms)
        lines.append(f"| {g} | {n:,} | {h0[g] / n:.4f} | {h0[g] / 8:,.0f} | "
                     + " | ".join(f"{r['groups'].get(g, 0):,}" for r in per) + " |")
    lines.append("| stream 0 (header, fp16, orders) | | | | " + " | ".join(f"{r['meta_bytes']:,}" for r in per) + " |")
    return "\n".join(lines)


def fc_subset(quantized: dict) -> dict:
    """Only the mlp.fc matrices (codes and steps): the issue's 11 x 2048x512 measurement."""
    return {n: QuantizedTensor(q.kind, q.shape, codes=q.codes, scale=q.scale) for n, q in quantized.items()
            if n.endswith("mlp.fc.weight")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.artifact", description=__doc__.split("\n")[0])
    parser.add_argument("--trained", nargs="*", type=Path, default=None,
                        help=f"trained artifacts for (b) (default: {PINNED_TINY.relative_to(PINNED_TINY.parents[2])})")
    parser.add_argument("--coders", default=",".join(["ouroptz", *art.available_coders()]),
                        help="comma-separated: ouroptz and per-group coders (default: all this machine has)")
    parser.add_argument("--scale", type=float, default=1.0, help="(a)'s matrix dimensions times this")
    parser.add_argument("--skip-synthetic", action="store_true", help="only (b)")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    coders = args.coders.split(",")
    missing = [c for c in coders if c != "ouroptz" and c not in art.available_coders()]
    if missing:
        print(f"bench.artifact: coder(s) {missing} not available here (have {art.available_coders()})", file=sys.stderr)
        return 2
    versions = {p: importlib.metadata.version(p) for p in ("numpy", "brotli", "constriction")
                if p != "constriction" or "ans" in art.available_coders()}
    text = ["# The artifact's containers and coders (bench/artifact.py)", "",
            f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (os.cpu_count), "
            f"python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    if "lrzip" not in art.available_coders():
        text += ["lrzip is not installed on this machine: its column is absent; the issue's figure for the fc "
                 "matrices (lrzip -z -L 9, ZPAQ) is shown below instead.", ""]
    if not args.skip_synthetic:
        synth = r1_synthetic(scale=args.scale)
        text += [format_rows(f"(a) R1-shaped synthetic model (scale {args.scale})", synth,
                             measure(synth, {"synthetic": "r1"}, coders), r1=args.scale == 1.0), ""]
        fc = fc_subset(synth)
        text += [format_rows("(a') its 11 mlp.fc matrices alone (the issue's measurement)", fc,
                             measure(fc, {}, coders)), "",
                 "the issue's figures on such matrices: " + "; ".join(f"{k} {b:,} B in {s} s"
                                                                    for k, (b, s) in ISSUE_FC.items()), ""]
    for path in (args.trained if args.trained is not None else [PINNED_TINY]):
        stored = art.read_artifact(path)
        text += [format_rows(f"(b) trained: {path}", stored.tensors, measure(stored.tensors, stored.config, coders)), ""]
    report = "\n".join(text)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
