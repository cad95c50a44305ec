"""The artifact containers side by side: bytes and write / read seconds of every coder of the per-group container
(quant/artifact.py: "ans", "brotli", "lrzip" where its binary exists) and of today's OUROPTZ container, in one run.

    python -m bench.artifact                      # (a) the R1-shaped synthetic model, (b) the pinned tiny run
    python -m bench.artifact --trained runs/<id>/final_model.int6.ptz ...   # (b) these trained artifacts instead
    python -m bench.artifact --scale 0.25 --skip-synthetic --out bench/results/artifact.md

(a) R1's model (QUANT.md Q.3): 11 blocks of c_q 512x512, c_k / c_v 256x512, attn.proj 512x512, mlp.fc 2048x512,
mlp.proj 512x2048 int6, tok_emb 8192x512 int7, 11 attention gates [8, 12] gate_int8, LQER rank-4 asymmetric factors
on the three matrices of largest ||W - Q s||_F (quant.lqer, as R1 picks them), and R1's 30,887 fp16 control values.
Weights are Student-t with 5 degrees of freedom (heavy tails), quantized by quant.gptq.sdclip_quantize (R1's SDClip
GPTQ: steps fp16(k * std(row) / clip_range), 1% damping, descending diag H) with R1's k: MLP 11.5, attention 13.0,
embedding 14.0 at int7 (the embedding read as bf16 first, as R1 does), and random Hessians (random_hessian): one
per layer input as in the model (c_q, c_k and c_v share the attention input; attn.proj, mlp.fc, mlp.proj and the
tied embedding, through the head input, have their own), each H = X^T X / n of n = 2 * cols seeded random
activations X = (Z + F M) diag(c): Z Student-t(5) [n, cols], F M a rank-8 shared part (columns correlate), c
lognormal(0, 1) per column (outlier channels, max / median ~20x at 512 columns); mlp.proj's input is
LeakyReLU(0.5)^2 of such a matrix, as R1's MLP computes it. n > cols makes H positive definite (and
sdclip_quantize damps it). The LQER error is W - Q s of those GPTQ codes. The model is built with one torch
thread (on 2 shared cores, two threads took 6x the CPU time: 142 s against 25 s). The codes have next to no
structure beyond order 0 (no rows are alike; GPTQ moves codes where H's outlier columns are, which the context
coder sees a little of), so this measures a coder's overhead over the codes' entropy, and speed; GPTQ's codes
have a little more entropy than round-to-nearest ones at the same steps, and the issue's 3.4255 bits per mlp.fc
code were measured on round-to-nearest codes of such weights: (a') shows both.
(b) The codes of trained models: real structure (an embedding's rare tokens crowd together, columns differ).

The tables of whole models, (a) and (b), also give each file's total with the counted code ("with code":
train_gpt.py as quant.bundle builds it and quant.artifact.code_bytes counts it), the number held to 16,000,000 B.

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

from quant import artifact as art, gptq, lqer
from quant.scheme import (KIND_FP16, KIND_GATE, KIND_INT6, KIND_INT7, KIND_INT8, QuantizedTensor,
                          gate_int8_row)

# R1's blob and its total with its counted code (31,999 B), QUANT.md Q.5
R1 = {"bytes": 15_865_260, "total": 15_897_259, "write_s": 99.9, "read_s": 20.4}
# The issue's measurements on 11 R1-shaped 2048x512 int6 matrices at k 11.5 (11,534,336 codes, 3.4255 bits).
ISSUE_FC = {"lrzip -z -L 9 (ZPAQ)": (4_942_693, 38.1), "brotli-11 lgwin 24": (4_996_855, 24.3),
            "zstd-19": (5_043_218, 14.0), "lzma-9e": (5_324_956, 14.5), "constriction order-0 rANS": (4_938_824, 0.4)}
PINNED_TINY = Path(__file__).resolve().parent.parent / "tests" / "pins" / "tiny_run.int6.ptz"
CONTROL = {"attn.q_gain": (8,), "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512)}


def random_hessian(rng: np.random.Generator, cols: int, activation: bool = False) -> torch.Tensor:
    """H = X^T X / n (fp32 [cols, cols], positive definite) of n = 2 * cols random activations (module docstring):
    X = (Z + F M) diag(c), Z Student-t(5), F [n, 8] and M [8, cols] Gaussian (M / sqrt 8), c lognormal(0, 1);
    activation: LeakyReLU(0.5)^2 of that X (the input of an MLP's down projection)."""
    n, r = 2 * cols, 8
    z = rng.standard_t(5, (n, cols)) + rng.standard_normal((n, r)) @ rng.standard_normal((r, cols)) / math.sqrt(r)
    x = torch.from_numpy((z * rng.lognormal(0.0, 1.0, cols)).astype(np.float32))
    if activation:
        x = torch.nn.functional.leaky_relu(x, 0.5).square()
    return x.T @ x / n


def rtn_codes(w: torch.Tensor, k: float, bits: int) -> torch.Tensor:
    """SDClip round-to-nearest codes (sdclip_quantize's steps, no GPTQ): what the issue measured its entropy on."""
    clip = 2 ** (bits - 1) - 1
    step = gptq.sdclip_scales(w, k, bits).float()
    return torch.round(w / torch.where(step == 0, 1, step)[:, None]).clamp(-clip, clip).to(torch.int8)


def r1_synthetic(seed: int = 0, scale: float = 1.0, layers: int = 11, rtn: dict | None = None) -> dict:
    """R1's stored tensors (module docstring), every matrix dimension times `scale` (1.0: R1's shapes), GPTQ'd with
    seeded random Hessians. rtn: a dict that receives {name: round-to-nearest codes of the same weights}."""
    rng = np.random.default_rng(seed)
    d, kv, hidden, vocab = (max(8, int(x * scale)) for x in (512, 256, 2048, 8192))

    def weights(rows, cols):
        return torch.from_numpy(rng.standard_t(5, (rows, cols)).astype(np.float32))

    out, errors = {}, {}

    def matrix(name, rows, cols, k, kind, bits, hessian):
        w = weights(rows, cols)
        if kind == KIND_INT7:  # R1 quantizes its bf16 embedding
            w = w.bfloat16().float()
        codes, step = gptq.sdclip_quantize(w, hessian, k, bits)
        step = step.float()
        out[name] = QuantizedTensor(kind, (rows, cols), codes=codes, scale=step)
        errors[name] = w - gptq.dequantize(codes, step)
        if rtn is not None:
            rtn[name] = rtn_codes(w, k, bits)

    matrix("tok_emb.weight", vocab, d, 14.0, KIND_INT7, 7, random_hessian(rng, d))
    for i in range(layers):
        p = f"blocks.{i}."
        h_attn = random_hessian(rng, d)  # c_q, c_k and c_v read the same input
        for name, (rows, cols), k, h in (
                ("attn.c_q", (d, d), 13.0, h_attn), ("attn.c_k", (kv, d), 13.0, h_attn),
                ("attn.c_v", (kv, d), 13.0, h_attn), ("attn.proj", (d, d), 13.0, random_hessian(rng, d)),
                ("mlp.fc", (hidden, d), 11.5, random_hessian(rng, d)),
                ("mlp.proj", (d, hidden), 11.5, random_hessian(rng, hidden, activation=True))):
            matrix(f"{p}{name}.weight", rows, cols, k, KIND_INT6, 6, h)
        gate = weights(8, 12) * 0.1
        codes, step = gate_int8_row(gate)
        out[f"{p}attn.attn_gate_w"] = QuantizedTensor(KIND_GATE, (8, 12), codes=codes, scale=step.float())
        for name, shape in CONTROL.items():
            out[p + name] = QuantizedTensor(KIND_FP16, shape, values=(1 + 0.1 * weights(1, math.prod(shape))).half()
                                            .reshape(shape))
    for name, shape in {"skip_weights": (8, d), "skip_gates": (8, d), "parallel_post_lambdas": (layers, 2, 2),
                        "parallel_resid_lambdas": (layers, 2), "smear_gate.weight": (1, 12), "smear_lambda": (1,)}.items():
        out[name] = QuantizedTensor(KIND_FP16, shape, values=weights(1, math.prod(shape)).half().reshape(shape))
    for name in lqer.top_k_by_error(errors, 3):  # LQER on the three largest errors (Frobenius norm), as R1 picks them
        try:
            out[name].lqer = lqer.pack_asym(errors[name], 4, 64)
        except ValueError:  # a scaled-down B that groups of 64 do not divide: R1's symmetric fallback
            out[name].lqer = lqer.pack_sym(errors[name], 4, 4)
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


def format_rows(title: str, quantized: dict, rows: list[dict], r1: bool = False, code: int | None = None) -> str:
    """The tables of one model; code: the counted train_gpt.py's bytes, for a "with code" column."""
    groups = group_codes(quantized)
    n_codes = sum(m.size for ms in groups.values() for m in ms)
    h0 = {g: order0_bits(ms) for g, ms in groups.items()}
    lines = [f"### {title}", "", f"{len(quantized)} tensors, {n_codes:,} codes; order-0 entropy of the codes, per group "
             f"pooled: {sum(h0.values()) / 8:,.0f} B", "",
             "| container / coder | bytes | vs order-0 codes |" + (" with code |" if code is not None else "")
             + " write s (cpu) | read s (cpu) | exact |", "|---|---:|---:|" + ("---:|" if code is not None else "")
             + "---:|---:|:-:|"]
    for row in rows:
        lines.append(f"| {'ouroptz (today)' if row['coder'] == 'ouroptz' else 'pergroup ' + row['coder']} | "
                     f"{row['bytes']:,} | {row['bytes'] - sum(h0.values()) / 8:+,.0f} | "
                     + (f"{row['bytes'] + code:,} | " if code is not None else "") + f"{row['write_s']:.2f} "
                     f"({row['write_cpu_s']:.2f}) | {row['read_s']:.2f} ({row['read_cpu_s']:.2f}) | "
                     f"{'yes' if row['exact'] else 'NO'} |")
    if r1:
        lines.append(f"| R1 (lrzip ZPAQ, its real codes, 8xH100 host) | {R1['bytes']:,} | | "
                     + (f"{R1['total']:,} (its code) | " if code is not None else "") + f"{R1['write_s']} | "
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
    code = art.code_bytes()
    text += [f"code: train_gpt.py, the bundle of quant/bundle.py that quant.artifact.code_bytes counts, {code:,} B; "
             f"\"with code\" = the file + {code:,} B, the total held to {art.SIZE_LIMIT:,} B.", ""]
    if not args.skip_synthetic:
        rtn, t0, c0, threads = {}, time.perf_counter(), time.process_time(), torch.get_num_threads()
        torch.set_num_threads(1)  # GPTQ of 512- and 2048-column matrices: on 2 shared cores, 2 threads took 6x the CPU
        try:
            synth = r1_synthetic(scale=args.scale, rtn=rtn)
        finally:
            torch.set_num_threads(threads)
        built = (time.perf_counter() - t0, time.process_time() - c0)
        n_gptq = sum(q.kind in (KIND_INT6, KIND_INT7) for q in synth.values())
        text += [format_rows(f"(a) R1-shaped synthetic model (scale {args.scale})", synth,
                             measure(synth, {"synthetic": "r1"}, coders), r1=args.scale == 1.0, code=code), "",
                 f"built in {built[0]:.1f} s ({built[1]:.1f} s cpu, one torch thread): random Hessians and "
                 f"sdclip_quantize (GPTQ) of its "
                 f"{n_gptq} matrices, LQER on " + ", ".join(n for n, q in synth.items() if q.lqer is not None)
                 + ".", ""]
        fc = fc_subset(synth)
        fc_rtn = [rtn[n].numpy() for n in fc]
        fc_h0 = order0_bits([q.codes.numpy() for q in fc.values()])
        n_fc = sum(q.numel for q in fc.values())
        text += [format_rows("(a') its 11 mlp.fc matrices alone (the issue's measurement)", fc,
                             measure(fc, {}, coders)), "",
                 f"order-0 entropy of these mlp.fc codes: {fc_h0 / n_fc:.4f} bits per code ({fc_h0 / 8:,.0f} B) by "
                 f"GPTQ; the same weights rounded to nearest at the same SDClip steps: "
                 f"{order0_bits(fc_rtn) / n_fc:.4f} bits ({order0_bits(fc_rtn) / 8:,.0f} B). The issue's figures below "
                 f"were measured on round-to-nearest codes at 3.4255 bits per code:", "",
                 "the issue's figures on such matrices: " + "; ".join(f"{k} {b:,} B in {s} s"
                                                                    for k, (b, s) in ISSUE_FC.items()), ""]
    for path in (args.trained if args.trained is not None else [PINNED_TINY]):
        stored = art.read_artifact(path)
        text += [format_rows(f"(b) trained: {path}", stored.tensors, measure(stored.tensors, stored.config, coders),
                             code=code), ""]
    report = "\n".join(text)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
