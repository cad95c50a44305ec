"""The size ledger of an artifact: where the 16,000,000 bytes go.

Each category (int6 codes, int6 row steps, int8 codes, int8 row steps, fp16 small tensors, the header)
is compressed on its own with brotli-11 to attribute bytes to it; their sum differs a little from the
file, which compresses everything in one stream, and both are shown. The ledger also projects what the
full `ouroboros` model's artifact would weigh (same code, its own tensor counts) two ways, each line
saying what it assumes: at this artifact's bits per stored value, and at the original entry's measured
bits per parameter. A projection is an estimate, not a warning: how well codes compress depends on how
large the model is and how long it trained; only a real artifact over the limit is an error (artifact.py).
A per-group artifact lists instead its groups (codes, their order-0 entropy and the bytes its coder achieved)
and then its bytes by kind of stored value (KINDS): int6, int7, int8 and gate int8 codes, row steps, LQER factors,
similarity orders, fp16 passthrough and the header, each with its values, its bytes compressed alone, bits per
value and share of the parts' sum. Codes are compressed alone by the artifact's coder ("ans" or "brotli"; brotli
for "lrzip", whose ZPAQ takes minutes), rows of the sorted groups in their stored order; LQER factors are their
codes that way plus their fp16 scales; fp16 parts, byte planes as stored, and the uint16 orders by brotli-11; the
header is its JSON by brotli-11 plus the file prefix, coder name and stream table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifact import (SIZE_LIMIT, _PREFIX, _ans_encode, _bytes_encode, _rows_cols, _shuffle, code_bytes, compress,
                       encode, section_bytes)
from .load import read_model_artifact
from .scheme import KIND_FP16, KIND_GATE, KIND_INT6, KIND_INT7, KIND_INT8, tensor_kind

# The original entry, same model and quantizer, as measured once trained (5,951 steps on 8xH100): the
# model part of its artifact (15,034,550 B less 121,677 B of code) over its parameters.
ORIGINAL_ENTRY = {"model_bytes": 14_912_873, "params": 26_040_913, "steps": 5_951}
ORIGINAL_ENTRY_BITS_PER_PARAM = 8 * ORIGINAL_ENTRY["model_bytes"] / ORIGINAL_ENTRY["params"]

# (category key, label, what a "value" is)
CATEGORIES = (("int6_codes", "int6 matrices: codes", KIND_INT6), ("int6_steps", "int6 matrices: row steps", KIND_INT6),
              ("int8_codes", "int8 tensors: codes", KIND_INT8), ("int8_steps", "int8 tensors: row steps", KIND_INT8),
              ("fp16", "fp16 small tensors", KIND_FP16))
# A per-group artifact's kinds of stored value: (key, label)
KINDS = ((KIND_INT6, "int6 codes"), (KIND_INT7, "int7 codes"), (KIND_INT8, "int8 codes"),
         (KIND_GATE, "gate int8 codes"), ("steps", "row steps (fp16)"), ("lqer", "LQER factors (codes + scales)"),
         ("orders", "similarity orders (uint16)"), (KIND_FP16, "fp16 passthrough"), ("header", "header"))


@dataclass
class Ledger:
    path: str
    encoding: dict
    values: dict            # category -> number of stored values (codes, steps or fp16 numbers)
    params: dict            # kind -> model parameters stored that way
    bytes: dict             # category -> bytes when compressed alone; plus "header"
    file_bytes: int
    code_bytes: int         # the submitted train_gpt.py (quant.artifact.code_bytes)
    limit: int = SIZE_LIMIT
    projection: dict = field(default_factory=dict)
    groups: list = field(default_factory=list)  # per-group container: (group, codes, order-0 bits, bytes)
    kinds: list = field(default_factory=list)   # per-group container: (key, label, values, bytes alone) of KINDS

    @property
    def total_bytes(self) -> int:
        return self.file_bytes + self.code_bytes

    def bits_per_value(self, category: str) -> float:
        return 8.0 * self.bytes[category] / self.values[category] if self.values[category] else 0.0


def build_ledger(path: str | Path, project: bool = True, code: int | None = None) -> Ledger:
    """code: the counted code's bytes (default: quant.artifact.code_bytes())."""
    art, _ = read_model_artifact(path)  # an artifact that cannot load as a model is not accounted for
    code = code_bytes() if code is None else code
    if art.groups:
        return _group_ledger(path, art, code)
    sections = section_bytes(art.tensors, art.encoding)
    parts = {key: [] for key, _, _ in CATEGORIES}
    values = {key: 0 for key, _, _ in CATEGORIES}
    params = {KIND_INT6: 0, KIND_INT8: 0, KIND_FP16: 0}
    for name, q in art.tensors.items():
        params[q.kind] += q.numel
    for category, items in sections.items():
        for name, part, raw in items:
            q = art.tensors[name]
            key = "fp16" if q.kind == KIND_FP16 else f"{q.kind}_{'codes' if part == 'codes' else 'steps'}"
            parts[key].append(raw)
            values[key] += q.numel if part in ("codes", "values") else q.scale.numel()
    sizes = {key: len(compress(b"".join(raw))) if raw else 0 for key, raw in parts.items()}
    body = encode(art.tensors, art.config, art.encoding)
    header_len = int.from_bytes(body[:4], "little")
    sizes["header"] = len(compress(body[:4 + header_len])) + _PREFIX.size
    ledger = Ledger(str(path), art.encoding, values, params, sizes, art.file_bytes, code)
    if project:
        ledger.projection = project_ouroboros(ledger)
    return ledger


def _kinds(art) -> list:
    """[(key, label, values, bytes alone)] of a per-group artifact, KINDS in order (module docstring)."""
    coder = art.encoding["coder"]
    mats, fp16 = {k: [] for k, _ in KINDS}, {k: [] for k, _ in KINDS}
    for name, q in art.tensors.items():
        if q.kind == KIND_FP16:
            fp16[KIND_FP16].append(q.values)
            continue
        parts = [(q.kind, "q", q.codes)] + list(zip(["lqer"] * 4, ("qA", "sA", "qB", "sB"), q.lqer or ()))
        fp16["steps"].append(q.scale)
        for key, part, t in parts:
            if part[0] == "s":
                fp16[key].append(t)
            else:
                m = t.numpy().reshape(_rows_cols(t.shape))
                order = art.orders.get((name, part))
                mats[key].append(m if order is None else m[order])
    orders = list(art.orders.values())
    out = []
    for key, label in KINDS:
        ms, fs = mats[key], fp16[key]
        n = sum(m.size for m in ms) + sum(t.numel() for t in fs)
        size = len(_ans_encode([ms])[0]) if ms and coder == "ans" else len(_bytes_encode("brotli", ms)) if ms else 0
        if fs:
            size += len(compress(_shuffle(b"".join(t.half().numpy().tobytes() for t in fs), 2)))
        if key == "orders" and orders:
            n, size = sum(map(len, orders)), len(compress(b"".join(o.tobytes() for o in orders)))
        if key == "header":
            size = len(compress(art.header)) + _PREFIX.size + 1 + len(coder) + 4 * (2 + len(art.groups))
        out.append((key, label, n, size))
    return out


def _group_ledger(path, art, code) -> Ledger:
    params, groups = {}, []
    for q in art.tensors.values():
        params[q.kind] = params.get(q.kind, 0) + q.numel
    for group, members, size in art.groups:
        codes = [art.tensors[n].codes if p == "q" else art.tensors[n].lqer[0 if p == "qA" else 2] for n, p in members]
        n = np.bincount(torch.cat([c.reshape(-1).long() + 128 for c in codes]).numpy())
        n = n[n > 0]
        groups.append((group, int(n.sum()), float(n.sum() * np.log2(n.sum()) - (n * np.log2(n)).sum()), size))
    return Ledger(str(path), art.encoding, {}, params, {"header": art.meta_bytes}, art.file_bytes, code,
                  groups=groups, kinds=_kinds(art))


def ouroboros_counts(small_numel: int | None = None) -> tuple[dict, dict]:
    """(values per category, params per kind) of the full `ouroboros` model, from its shapes alone."""
    from model import build_model
    from model.config import from_env

    cfg = from_env(environ={}, preset="ouroboros")
    small = cfg.quant_small_numel if small_numel is None else small_numel
    with torch.device("meta"):  # shapes only: no memory, no init cost
        state = build_model(cfg).state_dict()
    values = {key: 0 for key, _, _ in CATEGORIES}
    params = {KIND_INT6: 0, KIND_INT8: 0, KIND_FP16: 0}
    for name, t in state.items():
        kind = tensor_kind(name, t.numel(), small)
        params[kind] += t.numel()
        if kind == KIND_FP16:
            values["fp16"] += t.numel()
        else:
            values[f"{kind}_codes"] += t.numel()
            values[f"{kind}_steps"] += t.shape[0] if t.dim() > 1 else 1
    return values, params


def project_ouroboros(ledger: Ledger) -> dict:
    """The full model's artifact estimated from this artifact's bits per stored value, category by category.
    The sum of separately compressed parts is scaled to the file's real size (one stream compresses better)."""
    values, params = ouroboros_counts()
    parts = {key: ledger.bits_per_value(key) * values[key] / 8 for key, _, _ in CATEGORIES}
    alone = sum(ledger.bytes[key] for key, _, _ in CATEGORIES) + ledger.bytes["header"]
    together = ledger.file_bytes / alone if alone else 1.0
    model_bytes = (sum(parts.values()) + ledger.bytes["header"]) * together
    total = model_bytes + ledger.code_bytes
    entry_model_bytes = ORIGINAL_ENTRY_BITS_PER_PARAM * sum(params.values()) / 8
    return {"values": values, "params": params, "bytes": parts, "model_bytes": model_bytes, "total_bytes": total,
            "entry_model_bytes": entry_model_bytes,
            "entry_total_bytes": entry_model_bytes + ledger.code_bytes}


def format_ledger(ledger: Ledger) -> str:
    if ledger.groups:
        return _format_groups(ledger)
    lines = [f"artifact {ledger.path}", f"encoding: codes {ledger.encoding['codes']}, fp16 {ledger.encoding['fp16']}; "
             f"brotli-11", "",
             f"{'category':<28}{'values':>12}{'bytes alone':>14}{'bits/value':>12}"]
    for key, label, _ in CATEGORIES:
        lines.append(f"{label:<28}{ledger.values[key]:>12,}{ledger.bytes[key]:>14,}{ledger.bits_per_value(key):>12.3f}")
    lines.append(f"{'header (config, table)':<28}{'':>12}{ledger.bytes['header']:>14,}")
    alone = sum(ledger.bytes.values())
    n_params = sum(ledger.params.values())
    lines += ["",
              f"{'sum of parts, each alone':<40}{alone:>14,}",
              f"{'model file (one stream)':<40}{ledger.file_bytes:>14,}   "
              f"{8 * ledger.file_bytes / n_params:.3f} bits per parameter over {n_params:,}",
              *_code_and_total(ledger)]
    for kind in (KIND_INT6, KIND_INT8, KIND_FP16):
        if ledger.params[kind]:
            kind_bytes = sum(ledger.bytes[k] for k, _, c in CATEGORIES if c == kind)
            lines.append(f"  {kind} parameters {ledger.params[kind]:>12,}: {8 * kind_bytes / ledger.params[kind]:.3f} "
                         f"bits each (steps included, compressed alone)")
    p = ledger.projection
    if p:
        lines += ["", f"projected full `ouroboros` model ({sum(p['params'].values()):,} parameters), estimates:"]
        for key, label, _ in CATEGORIES:
            lines.append(f"  {label:<26}{p['values'][key]:>12,} values {int(p['bytes'][key]):>12,} B")
        for total, assumption in (
                ("total_bytes", f"if its values compress as this artifact's do (int6 codes at "
                                f"{ledger.bits_per_value('int6_codes'):.2f} bits; that depends on size and training)"),
                ("entry_total_bytes", f"at the original entry's measured {ORIGINAL_ENTRY_BITS_PER_PARAM:.2f} bits per "
                                      f"parameter ({ORIGINAL_ENTRY['model_bytes']:,} B for {ORIGINAL_ENTRY['params']:,} "
                                      f"parameters, {ORIGINAL_ENTRY['steps']:,} steps)")):
            lines.append(f"  model {int(p[total] - ledger.code_bytes):,} B + code {ledger.code_bytes:,} B = "
                         f"{int(p[total]):,} B of {ledger.limit:,}, " + assumption)
    return "\n".join(lines)


def _code_and_total(ledger: Ledger) -> list[str]:
    """The last two lines of either ledger: the code's bytes, and the total against the limit."""
    over = ledger.total_bytes - ledger.limit
    return [f"{'code (train_gpt.py)':<40}{ledger.code_bytes:>14,}",
            f"{'total':<40}{ledger.total_bytes:>14,}   of {ledger.limit:,}: "
            + (f"{-over:,} under" if over <= 0 else f"OVER by {over:,}")]


def _format_groups(ledger: Ledger) -> str:
    lines = [f"artifact {ledger.path}", f"per-group container, coder {ledger.encoding['coder']}", "",
             f"{'group':<12}{'codes':>12}{'order-0 B':>12}{'bits/code':>11}{'bytes':>12}{'bits/code':>11}"]
    for group, n, h0, size in ledger.groups:
        lines.append(f"{group:<12}{n:>12,}{h0 / 8:>12,.0f}{h0 / n:>11.3f}{size:>12,}{8 * size / n:>11.3f}")
    n_params = sum(ledger.params.values())
    alone = sum(k[3] for k in ledger.kinds)
    lines += [f"{'stream 0: header, fp16 steps and values, row orders':<59}{ledger.bytes['header']:>12,}", "",
              f"{'kind':<32}{'values':>12}{'bytes alone':>14}{'bits/value':>12}{'share':>9}"]
    for _, label, n, size in ledger.kinds:
        lines.append(f"{label:<32}{n:>12,}{size:>14,}{f'{8 * size / n:.3f}' if n else '':>12}{size / alone:>9.2%}")
    lines += ["", f"{'sum of parts, each alone':<40}{alone:>14,}",
              f"{'model file':<40}{ledger.file_bytes:>14,}   {8 * ledger.file_bytes / n_params:.3f} bits per parameter "
              f"over {n_params:,} ({', '.join(f'{k} {v:,}' for k, v in ledger.params.items())})",
              *_code_and_total(ledger)]
    return "\n".join(lines)
