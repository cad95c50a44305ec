"""The 16 MB artifact's file format: the encoding of quantized tensors (quant/scheme.py), the atomic write
within the size budget (model + code bytes, the code being the submitted train_gpt.py), and the checked read.

File layout (all integers little-endian):
    MAGIC (8 bytes) | format version u32 | payload length u64 | sha256(payload) (32 bytes) | payload
where payload = brotli(quality 11) of
    header length u32 | header JSON (config, encoding, tensor table) | the data sections
and the data sections are grouped by kind so like sits next to like for the compressor: every int6
code matrix, then every int8 code matrix, then all fp16 row steps, then all fp16 small tensors.

Encoding, measured on a trained tiny model (120 steps on the embedded corpus, loop-aware GPTQ; 1.57 M
int6 codes, 270 k int8 codes, 12 k fp16 values), brotli-11 of the whole payload:
    codes                fp16       uncompressed   brotli-11
    int8 containers      raw          1,904,300      983,459
    int8 containers      shuffled     1,904,305      982,997   <- DEFAULT_ENCODING
    6-bit packed         raw          1,511,072    1,089,839
    6-bit packed         shuffled     1,511,077    1,089,405
    6-bit packed, byte planes of each 3-byte group
                         shuffled     1,511,086    1,031,148
A code in an int8 container gives brotli's context model whole-byte symbols; true 6-bit packing
saves 25% before compression but splits codes across byte boundaries, and the compressor loses more
than that (+11%; +5% with byte planes). Byte shuffling (low bytes, then high bytes) helps fp16 a little.
(brotli window 24 instead of the default 22: 983,290, no better.)
The reader accepts every encoding; the writer uses DEFAULT_ENCODING.

That container (OUROPTZ) is the default, and its bytes do not change. The per-group container (PG_MAGIC,
container="pergroup", layout below) stores each role's codes as one stream (R1's groups: the embedding, c_k, c_q,
c_v, attn.proj, mlp.fc, mlp.proj, then the rest), coded by "ans" (a context-model range coder, below), "lrzip"
(R1's ZPAQ flags; rows of the hot groups in R1's similarity order, transposed) or "brotli" (the same bytes); the
header names the coder, and a build refuses a coder it lacks by name. bench/artifact.py measures them: on an
R1-shaped model of random weights (SDClip GPTQ with random Hessians) "ans" is within 0.1% of the codes' order-0
entropy in every group, 1.2% under OUROPTZ (15,839,140 B against 16,025,229 B), in 3 s to write and 2 s to read
(CPU) on 2 cores; on round-to-nearest codes of 11 such mlp.fc matrices it took 4,939,068 B against the 4,942,693 B
the issue measured for ZPAQ on codes of that kind.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import numpy as np
import torch

from model.io import write_atomic

from .scheme import CODE_KINDS, KIND_FP16, KIND_INT6, KIND_INT8, ArtifactError, QuantizedTensor

MAGIC = b"OUROPTZ\x00"
FORMAT_VERSION = 1
SIZE_LIMIT = 16_000_000
BROTLI_QUALITY = 11
_PREFIX = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256 of payload

# How codes and fp16 data are laid out before compression (see the module docstring for the numbers).
CODE_ENCODINGS = ("int8", "packed6", "packed6-shuffled")
FP16_ENCODINGS = ("raw", "shuffled")
DEFAULT_ENCODING = {"codes": "int8", "fp16": "shuffled"}
ARTIFACT_NAME = "final_model.int6.ptz"

class OverBudgetError(RuntimeError):
    """The artifact (compressed model + code) is over the 16,000,000-byte limit."""

    def __init__(self, message: str, total_bytes: int, limit: int, path: str | None = None):
        super().__init__(message)
        self.total_bytes, self.limit, self.path = total_bytes, limit, path


# ---------------------------------------------------------------- encodings
def pack_int6_stream(codes: np.ndarray) -> np.ndarray:
    """6-bit two's complement, 4 codes in 3 bytes (little-endian 24-bit groups) over one flat stream of codes
    (not kernels.int6's row layout); any code in [-32, 31]."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    pad = (-flat.size) % 4
    u = (np.concatenate([flat, np.zeros(pad, np.int8)]).astype(np.uint32) & 0x3F).reshape(-1, 4)
    word = u[:, 0] | (u[:, 1] << 6) | (u[:, 2] << 12) | (u[:, 3] << 18)
    return np.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], axis=1).astype(np.uint8).reshape(-1)


def unpack_int6_stream(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of pack_int6_stream: the first `count` codes as int8 (sign-extended from 6 bits)."""
    b = np.asarray(packed, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    u = np.stack([(word >> shift) & 0x3F for shift in (0, 6, 12, 18)], axis=1).reshape(-1)[:count]
    return (u.astype(np.int16) - ((u & 0x20) << 1).astype(np.int16)).astype(np.int8)


def _shuffle(raw: bytes, width: int) -> bytes:
    """Byte planes: every element's byte 0, then every byte 1, ... (groups bytes of like significance)."""
    return np.frombuffer(raw, np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(raw: bytes, width: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(width, -1).T.tobytes()


def _encode_codes(codes: torch.Tensor, encoding: str) -> bytes:
    arr = codes.numpy().astype(np.int8).reshape(-1)
    if encoding == "int8":
        return arr.tobytes()
    packed = pack_int6_stream(arr).tobytes()
    return _shuffle(packed, 3) if encoding == "packed6-shuffled" else packed


def _decode_codes(raw: bytes, count: int, encoding: str) -> np.ndarray:
    if encoding == "int8":
        return np.frombuffer(raw, np.int8, count=count)
    if encoding == "packed6-shuffled":
        raw = _unshuffle(raw, 3)
    return unpack_int6_stream(np.frombuffer(raw, np.uint8), count)


def _encode_fp16(t: torch.Tensor, encoding: str) -> bytes:
    raw = t.to(torch.float16).numpy().tobytes()
    return _shuffle(raw, 2) if encoding == "shuffled" else raw


def _decode_fp16(raw: bytes, encoding: str) -> np.ndarray:
    if encoding == "shuffled":
        raw = _unshuffle(raw, 2)
    return np.frombuffer(raw, np.float16)


def _check_encoding(encoding: dict) -> dict:
    if encoding.get("codes") not in CODE_ENCODINGS or encoding.get("fp16") not in FP16_ENCODINGS:
        raise ArtifactError(f"encoding {encoding!r}: codes must be one of {CODE_ENCODINGS}, fp16 one of {FP16_ENCODINGS}")
    return dict(encoding)


def section_bytes(quantized: dict, encoding: dict | None = None) -> dict:
    """The uncompressed bytes of each data section, by category, in file order (for the ledger too)."""
    enc = _check_encoding(encoding or DEFAULT_ENCODING)
    sections = {"int6": [], "int8": [], "scales": [], "fp16": []}
    for name, q in quantized.items():
        if q.kind not in sections or q.lqer is not None:
            raise ArtifactError(f"{name!r}: the {MAGIC[:7].decode()} container stores int6, int8 and fp16 without LQER "
                                f"factors, not {q.kind}{' + LQER' if q.lqer is not None else ''}: write it with "
                                f"container='pergroup'")
        if q.kind == KIND_FP16:
            sections["fp16"].append((name, "values", _encode_fp16(q.values, enc["fp16"])))
        else:
            codes_enc = enc["codes"] if q.kind == KIND_INT6 else "int8"  # int8 codes need all 8 bits
            sections[q.kind].append((name, "codes", _encode_codes(q.codes, codes_enc)))
            sections["scales"].append((name, "scale", _encode_fp16(q.scale, enc["fp16"])))
    return sections


def encode(quantized: dict, config: dict, encoding: dict | None = None) -> bytes:
    """The uncompressed payload: header length, header JSON, data sections."""
    enc = _check_encoding(encoding or DEFAULT_ENCODING)
    sections = section_bytes(quantized, enc)
    entries = {name: {"kind": q.kind, "shape": list(q.shape)} for name, q in quantized.items()}
    chunks, offset = [], 0
    for category in ("int6", "int8", "scales", "fp16"):
        for name, part, raw in sections[category]:
            entries[name][part] = [offset, len(raw)]
            chunks.append(raw)
            offset += len(raw)
    header = json.dumps({"config": config, "encoding": enc, "tensors": entries},
                        separators=(",", ":"), sort_keys=True).encode()
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode(body: bytes, where: str = "payload") -> tuple[dict, dict, dict]:
    """Inverse of encode: (config dict, {name: QuantizedTensor}, encoding)."""
    try:
        (header_len,) = struct.unpack_from("<I", body, 0)
        header = json.loads(body[4:4 + header_len].decode())
        enc = _check_encoding(header["encoding"])
        data = memoryview(body)[4 + header_len:]
        out = {}
        for name, e in header["tensors"].items():
            shape = tuple(e["shape"])
            numel = int(np.prod(shape)) if shape else 1

            def part(key):
                off, n = e[key]
                if off + n > len(data):
                    raise ArtifactError(f"{where}: tensor {name!r} {key} runs past the end of the data")
                return bytes(data[off:off + n])

            if e["kind"] == KIND_FP16:
                vals = _decode_fp16(part("values"), enc["fp16"])
                out[name] = QuantizedTensor(KIND_FP16, shape, values=torch.from_numpy(vals.copy()).reshape(shape))
            elif e["kind"] in (KIND_INT6, KIND_INT8):
                rows = shape[0] if len(shape) > 1 else 1
                codes_enc = enc["codes"] if e["kind"] == KIND_INT6 else "int8"
                codes = _decode_codes(part("codes"), numel, codes_enc)
                scale = _decode_fp16(part("scale"), enc["fp16"])
                if codes.size != numel or scale.size != rows:
                    raise ArtifactError(f"{where}: tensor {name!r} has {codes.size} codes / {scale.size} steps, "
                                        f"expected {numel} / {rows} for shape {shape}")
                out[name] = QuantizedTensor(e["kind"], shape,
                                            codes=torch.from_numpy(codes.copy()).reshape(rows, -1),
                                            scale=torch.from_numpy(scale.astype(np.float32)))
            else:
                raise ArtifactError(f"{where}: tensor {name!r} has unknown kind {e['kind']!r}")
        return header["config"], out, enc
    except ArtifactError:
        raise
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: malformed payload ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- the per-group container
# Layout (integers little-endian): PG_MAGIC | version u32 | payload length u64 | sha256(payload) | payload, where
# payload = coder name length u8 | coder name (ASCII) | stream count u32 | stream lengths u32 each | the streams:
#   0: brotli-11 of  header length u32 | header JSON (config, coder, groups: [[group, [[tensor, part], ...]], ...],
#      tensors: {name: {kind, shape, parts: {part: shape}}}) | the fp16 parts in table order, byte planes |
#      the uint16 row orders of the sorted groups (byte coders only)
#   1..: one per non-empty group, in GROUPS order, by the coder.
# A tensor's parts: int8 code matrices "q" (codes), "qA", "qB" (LQER factors) go to the groups; fp16 "s" (row
# steps), "v" (values), "sA", "sB" (LQER steps) to stream 0. Groups: tok_emb.weight's codes, then each role's
# codes (`*.attn.c_q.weight` ...) in state-dict (layer) order, then everything else ("rest").
PG_MAGIC = b"OUROPGR\x00"
CODERS = ("ans", "lrzip", "brotli")  # "auto": the first one this machine has
GROUPS = ("tok_emb", "attn.c_k", "attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj", "rest")
SORTED_GROUPS = ("tok_emb", "attn.c_q", "mlp.fc")  # rows in similarity order for the byte coders (R1's hot groups)
_ROLE = re.compile(r"(?:^|\.)(attn\.(?:c_q|c_k|c_v|proj)|mlp\.(?:fc|proj))\.weight$")


def group_of(name: str, part: str = "q") -> str:
    role = _ROLE.search(name)
    return "rest" if part != "q" else "tok_emb" if name == "tok_emb.weight" else role[1] if role else "rest"


def similarity_order(codes, device=None) -> np.ndarray:
    """R1's row order (QUANT.md Q.5): a greedy nearest-neighbour chain from row 0, each step to the unused row at the
    least L1 distance from the current one, ties to the lowest row index. uint16 [rows]. On a torch device (default:
    CUDA when there is one) all distances at once (torch.cdist; integer sums, exact in fp32), then the chain;
    otherwise one vectorized numpy step per row."""
    x = np.asarray(codes).astype(np.int16)
    n = len(x)
    out = np.zeros(n, np.uint16)
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device and n > 1:
        t = torch.from_numpy(x).to(device, torch.float32)
        d = torch.cdist(t[None], t[None], p=1)[0].cpu().numpy()
        d[:, 0] = np.inf
        for k in range(1, n):
            out[k] = d[out[k - 1]].argmin()  # the first of equal minima: the lowest index
            d[:, out[k]] = np.inf
        return out
    idx, rest, cur = np.arange(1, n), x[1:].copy(), x[0] if n else None
    for k in range(1, n):
        m = n - k
        d = np.abs(rest[:m] - cur).sum(1)
        hit = np.flatnonzero(d == d.min())
        j = hit[idx[hit].argmin()]  # rows move when one is taken out, so the lowest index is looked up
        out[k], cur = idx[j], rest[j].copy()
        rest[j], idx[j] = rest[m - 1], idx[m - 1]
    return out


def available_coders() -> list[str]:
    have = {"ans": _has_constriction(), "lrzip": shutil.which("lrzip") is not None, "brotli": True}
    return [c for c in CODERS if have[c]]


def _has_constriction() -> bool:
    try:
        import constriction  # noqa: F401
    except ImportError:
        return False
    return True


def _check_coder(coder: str, where: str) -> str:
    if coder == "auto":
        return available_coders()[0]
    if coder not in CODERS:
        raise ArtifactError(f"{where}: coder {coder!r} is unknown to this build (it has {', '.join(CODERS)})")
    if coder not in available_coders():
        need = "the lrzip binary (apt install lrzip)" if coder == "lrzip" else "constriction (pip install constriction)"
        raise ArtifactError(f"{where}: coder {coder!r} needs {need}, which this machine lacks")
    return coder


# The "ans" coder: an adaptive range coder (constriction) over magnitude contexts. Per matrix, optionally, rows near
# one of k centroids (k-means, k = 16..64, stored as int8) are coded as their difference from it (a trained
# embedding's rare tokens crowd together). A value's context is its predicted log2 magnitude in quarter octaves,
# T + r[row] + c[label of the row][col]: T the matrix's mean |value|, r and c its rows' and (per centroid) columns'
# mean |value| relative to T, each kept only where it pays for itself. The side info (T, centroids, labels, r, c)
# is brotli'd at the head of the group's stream. Each group has one count table per context that starts from a
# Laplace prior and learns after each block of rows; within a block the values of one context are coded together.
# The model's arithmetic is integer: any machine decodes what any other encoded. The rows keep their order.
_Q, _BLK, _PRIOR, _SEEN = 4, 4096, 512, 64  # contexts per octave, codes per block, the prior's weight in codes,
# a code's count (every symbol keeps a count of at least 1: small against a code's)
_NC = 16 * _Q


def _ans_prior() -> np.ndarray:
    counts = np.ones((_NC, 512), np.int64)
    mean = np.array([1 << (z + 10 * _Q) for z in range(_NC)], object)
    for _ in range(_Q.bit_length() - 1):  # the _Q-th root: 2^((z - 6 _Q) / _Q) in 16.16
        mean = np.array([math.isqrt(x) for x in mean], object)
    mean = mean.astype(np.int64)
    w = (_PRIOR * _SEEN << 16) // (2 * mean + (1 << 16))  # p(0) of a two-sided geometric with that mean
    for s in range(256):
        counts[:, 256 + s] += w
        counts[:, 256 - s] += w if s else 0
        w = w * mean // (mean + (1 << 16))
    return counts


def _bits(x: np.ndarray) -> float:
    """Empirical entropy of the non-negative integers x, in bits (all of them)."""
    n = np.bincount(x.ravel())
    n = n[n > 0]
    return float(x.size * math.log2(max(x.size, 1)) - (n * np.log2(n)).sum())


def _ans_cost(v: np.ndarray, lab: np.ndarray, t: int, r: np.ndarray, c: np.ndarray) -> float:
    z = _ans_ctx(t, r[::4], c, lab[::4])
    return 4 * (_bits(z * 512 + v[::4].astype(np.int64) + 256) - _bits(z)) + _bits(r + 3 * _Q) + _bits(c + 3 * _Q)


def _ans_side(m: np.ndarray) -> tuple:
    """(t, centroids [k, cols], labels [rows] (0: none, j: centroid j - 1), r [rows], c [k + 1, cols], values) of
    one code matrix, each part kept when its saving (estimated on every 4th row) beats its cost."""
    cent, lab, v = np.zeros((0, m.shape[1]), np.int8), np.zeros(len(m), np.uint8), m.astype(np.int16)
    k = min(64, max(16, len(m) // 128))  # centroids: 16 up to 2048 rows, 64 from 8192
    if len(m) >= 16 * k:
        f = m.astype(np.float32)
        mu = f[np.linspace(0, len(f) - 1, k).astype(int)]
        for _ in range(8):
            near = ((mu * mu).sum(1) - 2 * f @ mu.T).argmin(1)
            for j in range(k):
                mu[j] = f[near == j].mean(0) if (near == j).any() else mu[j]
        mu = np.round(mu).astype(np.int16)
        d = v - mu[near]
        use = np.abs(d).sum(1) < np.abs(v).sum(1)
        d = np.where(use[:, None], d, v)
        lab2 = (use * (near + 1)).astype(np.uint8)
        if _ans_cost(*_ans_terms(d, lab2, k)) + _bits(lab2) + 6 * mu.size < _ans_cost(*_ans_terms(v, lab, 0)):
            cent, lab, v = mu.astype(np.int8), lab2, d
    v, lab, t, r, c = _ans_terms(v, lab, len(cent))
    best = min((_ans_cost(v, lab, t, rr, cc), i, rr, cc) for i, (rr, cc) in enumerate(
        [(r * 0, c * 0), (r, c * 0), (r * 0, c), (r, c)]))
    return t, cent, lab, best[2].astype(np.int8), best[3].astype(np.int8), v


def _ans_terms(v: np.ndarray, lab: np.ndarray, k: int) -> tuple:
    a = np.abs(v).astype(np.float32)
    mean = max(float(a.mean()), 1 / 64)
    t = int(np.clip(round(_Q * math.log2(mean)) + 6 * _Q, 0, _NC - 1))
    r = a.mean(1)
    c = np.stack([a[lab == j].mean(0) if (lab == j).any() else np.full(a.shape[1], mean) for j in range(k + 1)])
    r, c = (np.clip(np.round(_Q * np.log2(np.maximum(x, mean / 64) / mean)), -3 * _Q, 3 * _Q).astype(np.int64)
            for x in (r, c))
    return v, lab, t, r, c


def _ans_ctx(t: int, r: np.ndarray, c: np.ndarray, lab: np.ndarray) -> np.ndarray:
    return np.clip(t + r.astype(np.int64)[:, None] + c[lab.astype(np.int64)], 0, _NC - 1)


def _ans_run(rc, counts, z: np.ndarray, lo: int, width: int, values: np.ndarray | None = None) -> np.ndarray:
    """Encode `values` (an integer matrix) into range coder `rc`, or decode a matrix of z's shape from it (values
    None), with contexts z and the alphabet lo - 256 .. lo - 256 + width - 1; updates counts. Returns the values."""
    from constriction import stream

    rows, cols = z.shape
    if width == 1:  # all zero: nothing to code
        return np.zeros((rows, cols), np.int16)
    step = max(1, _BLK // cols)
    key = (np.arange(rows)[:, None] // step * _NC + z).ravel()
    perm = np.argsort(key, kind="stable")
    key = key[perm]
    sym = np.empty(key.size, np.int32) if values is None else values.ravel()[perm].astype(np.int32) + (256 - lo)
    starts = np.flatnonzero(np.diff(key, prepend=-1))
    block = 0
    for s, e in zip(starts, [*starts[1:], key.size]):
        if key[s] // _NC != key[block] // _NC:  # a new block: learn the last one
            _ans_learn(counts, key[block:s] % _NC, sym[block:s], lo, width)
            block = s
        model = stream.model.Categorical(counts[key[s] % _NC, lo:lo + width].astype(np.float64), perfect=False)
        if values is None:
            sym[s:e] = rc.decode(model, e - s)
        else:
            rc.encode(sym[s:e], model)
    _ans_learn(counts, key[block:] % _NC, sym[block:], lo, width)
    out = np.empty(key.size, np.int16)
    out[perm] = sym + (lo - 256)
    return out.reshape(rows, cols)


def _ans_learn(counts, z, sym, lo, width):
    counts[:, lo:lo + width] += _SEEN * np.bincount(z * width + sym, minlength=_NC * width).reshape(_NC, width)


def _ans_encode(groups: list[list[np.ndarray]]) -> list[bytes]:
    from constriction import stream

    streams = []
    for mats in groups:
        counts = _ans_prior()
        sides = [_ans_side(m) for m in mats]
        mx = max(int(np.abs(s[-1]).max(initial=0)) for s in sides)
        side, rc = [struct.pack("<H", mx)], stream.queue.RangeEncoder()
        for t, cent, lab, r, c, v in sides:
            side += [bytes([t, len(cent)]), cent.tobytes(), lab.tobytes() if len(cent) else b"", r.tobytes(), c.tobytes()]
            _ans_run(rc, counts, _ans_ctx(t, r, c, lab), 256 - mx, 2 * mx + 1, v)
        side = brotli.compress(b"".join(side), quality=11)
        streams.append(struct.pack("<I", len(side)) + side + rc.get_compressed().tobytes())
    return streams


def _ans_decode(streams: list[bytes], shapes: list[list[tuple]]) -> list[list[np.ndarray]]:
    from constriction import stream

    groups = []
    for data, group_shapes in zip(streams, shapes):
        counts = _ans_prior()
        (n,) = struct.unpack_from("<I", data)
        side = brotli.decompress(data[4:4 + n])
        words = np.frombuffer(data[4 + n:], np.uint32)
        rc, (mx,), pos, mats = stream.queue.RangeDecoder(words), struct.unpack_from("<H", side), 2, []
        for rows, cols in group_shapes:
            t, k = side[pos:pos + 2]
            part = np.frombuffer(side, np.int8, k * cols + (rows if k else 0) + rows + (k + 1) * cols, pos + 2)
            cent, part = part[:k * cols].reshape(k, cols), part[k * cols:]
            lab, part = (part[:rows].view(np.uint8), part[rows:]) if k else (np.zeros(rows, np.uint8), part)
            r, c = part[:rows], part[rows:].reshape(k + 1, cols)
            pos += 2 + (k + 1) * cols + rows + (rows if k else 0) + k * cols
            v = _ans_run(rc, counts, _ans_ctx(t, r, c, lab), 256 - mx, 2 * mx + 1)
            if k:
                v[lab > 0] += cent[lab[lab > 0] - 1]
            mats.append(v.astype(np.int8))
        groups.append(mats)
    return groups


def _lrzip(data: bytes, *flags: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.write_bytes(data)
        subprocess.run(["lrzip", *flags, "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def _bytes_encode(coder: str, mats: list[np.ndarray]) -> bytes:
    """brotli / lrzip: the matrices transposed (bytes run down the columns) and concatenated, R1's flags."""
    raw = b"".join(np.ascontiguousarray(m.T).tobytes() for m in mats)
    return brotli.compress(raw, quality=11, lgwin=24) if coder == "brotli" else _lrzip(raw, "-z", "-L", "9")


def _bytes_decode(coder: str, data: bytes, shapes: list[tuple]) -> list[np.ndarray]:
    raw, off, mats = brotli.decompress(data) if coder == "brotli" else _lrzip(data, "-d", "-f"), 0, []
    for rows, cols in shapes:
        mats.append(np.frombuffer(raw, np.int8, rows * cols, off).reshape(cols, rows).T)
        off += rows * cols
    return mats


def _rows_cols(shape) -> tuple:
    """A code part's stored matrix: [rows, the rest], a 0- or 1-D part as one row."""
    rows = shape[0] if len(shape) > 1 else 1
    return rows, math.prod(shape) // max(rows, 1)


def pergroup_blob(quantized: dict, config: dict, coder: str = "auto") -> bytes:
    """The per-group container's file contents (layout above) with `coder`: "ans", "lrzip", "brotli" or "auto"."""
    coder = _check_coder(coder, "write_artifact")
    table, fp16, members = {}, [], {g: [] for g in GROUPS}
    for name, q in quantized.items():
        if q.kind not in CODE_KINDS + (KIND_FP16,):
            raise ArtifactError(f"{name!r}: unknown kind {q.kind!r}")
        parts = [("v", q.values)] if q.kind == KIND_FP16 else [("q", q.codes), ("s", q.scale)]
        parts += list(zip(("qA", "sA", "qB", "sB"), q.lqer or ()))
        for part, t in parts:
            if part.startswith("q"):
                if t.dtype != torch.int8:
                    raise ArtifactError(f"{name!r}: {part} must be int8 codes, got {t.dtype}")
                members[group_of(name, part)].append((name, part, t.cpu().numpy().reshape(_rows_cols(t.shape))))
            else:
                fp16.append(t.detach().cpu().to(torch.float16).numpy().tobytes())
        table[name] = {"kind": q.kind, "shape": list(q.shape), "parts": {p: list(t.shape) for p, t in parts}}
    groups = [(g, m) for g, m in members.items() if m]
    orders, mats = [], [[m for _, _, m in ms] for _, ms in groups]
    if coder != "ans":
        for (g, _), ms in zip(groups, mats):
            if g in SORTED_GROUPS:
                for i, m in enumerate(ms):
                    orders.append(similarity_order(m))
                    ms[i] = m[orders[-1]]
    header = json.dumps({"config": config, "coder": coder, "tensors": table,
                         "groups": [[g, [[n, p] for n, p, _ in ms]] for g, ms in groups]},
                        separators=(",", ":")).encode()
    meta = struct.pack("<I", len(header)) + header + _shuffle(b"".join(fp16), 2) + b"".join(o.tobytes() for o in orders)
    if coder == "ans":
        streams = _ans_encode(mats)
    else:
        with ThreadPoolExecutor() as pool:  # lrzip runs as processes, one per group
            streams = list(pool.map(lambda ms: _bytes_encode(coder, ms), mats))
    streams = [brotli.compress(meta, quality=11)] + streams
    payload = (bytes([len(coder)]) + coder.encode() + struct.pack(f"<I{len(streams)}I", len(streams),
                                                                    *map(len, streams)) + b"".join(streams))
    return _PREFIX.pack(PG_MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def _read_pergroup(payload: bytes, where: str) -> "Artifact":
    coder = payload[1:1 + payload[0]].decode("ascii", "replace")
    _check_coder(coder, where)
    try:
        pos = 1 + payload[0]
        (n,) = struct.unpack_from("<I", payload, pos)
        lengths = struct.unpack_from(f"<{n}I", payload, pos + 4)
        pos += 4 + 4 * n
        streams = []
        for length in lengths:
            streams.append(payload[pos:pos + length])
            pos += length
        meta = brotli.decompress(streams[0])
        (hlen,) = struct.unpack_from("<I", meta)
        header = json.loads(meta[4:4 + hlen].decode())
        table, groups = header["tensors"], header["groups"]
        shapes = [[_rows_cols(table[n]["parts"][p]) for n, p in members] for _, members in groups]
        if coder == "ans":
            decoded = _ans_decode(streams[1:], shapes)
        else:
            with ThreadPoolExecutor() as pool:
                decoded = list(pool.map(lambda a: _bytes_decode(coder, *a), zip(streams[1:], shapes)))
        nfp16 = sum(math.prod(s) for e in table.values() for p, s in e["parts"].items() if not p.startswith("q"))
        fp16 = np.frombuffer(_unshuffle(meta[4 + hlen:4 + hlen + 2 * nfp16], 2), np.float16)
        orders, opos = np.frombuffer(meta[4 + hlen + 2 * nfp16:], np.uint16), 0
        codes, used = {}, {}
        for (g, members), mats in zip(groups, decoded):
            for (name, part), m in zip(members, mats):
                if coder != "ans" and g in SORTED_GROUPS:
                    order = used[name, part] = orders[opos:opos + len(m)]
                    opos += len(m)
                    m = m[np.argsort(order)]
                codes[name, part] = torch.from_numpy(m.copy()).reshape(table[name]["parts"][part])
        out, fpos = {}, 0
        for name, e in table.items():
            parts = {}
            for part, shape in e["parts"].items():
                if part.startswith("q"):
                    parts[part] = codes[name, part]
                else:
                    k = math.prod(shape)
                    parts[part] = torch.from_numpy(fp16[fpos:fpos + k].copy()).reshape(shape)
                    fpos += k
            lqer = tuple(parts[p] for p in ("qA", "sA", "qB", "sB")) if "qA" in parts else None
            out[name] = (QuantizedTensor(e["kind"], tuple(e["shape"]), values=parts["v"]) if e["kind"] == KIND_FP16 else
                         QuantizedTensor(e["kind"], tuple(e["shape"]), codes=parts["q"], scale=parts["s"].float(),
                                         lqer=lqer))
    except ArtifactError:
        raise
    except (struct.error, ValueError, KeyError, TypeError, IndexError, RuntimeError, brotli.error) as exc:
        raise ArtifactError(f"{where}: malformed payload ({type(exc).__name__}: {exc})") from None
    info = [(g, [tuple(x) for x in members], len(s)) for (g, members), s in zip(groups, streams[1:])]
    return Artifact(header["config"], out, {"container": "pergroup", "coder": coder}, 0, info, len(streams[0]),
                    meta[:4 + hlen], used)


# ---------------------------------------------------------------- files
def compress(body: bytes, quality: int = BROTLI_QUALITY) -> bytes:
    return brotli.compress(body, quality=quality)


def blob(quantized: dict, config: dict, encoding: dict | None = None, quality: int = BROTLI_QUALITY,
         container: str = "ouroptz", coder: str = "auto") -> bytes:
    """The complete file contents (quality below 11 only for scratch files whose size does not matter) in the
    OUROPTZ container (`encoding`, `quality`) or the per-group one (`coder`)."""
    if container == "pergroup":
        return pergroup_blob(quantized, config, coder)
    if container != "ouroptz":
        raise ArtifactError(f"container {container!r}: must be 'ouroptz' or 'pergroup'")
    payload = compress(encode(quantized, config, encoding), quality)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def code_source(root: str | Path | None = None) -> bytes:
    """The counted code (SPEC 5): the train_gpt.py this process was started from, else (or given a source
    root) the one quant.bundle builds from the sources, which is what an export would submit."""
    loader = getattr(__spec__, "loader", None)  # in a run from the bundle, its finder
    started_from = getattr(loader, "bundle_file", None) if root is None else None
    if started_from:
        return Path(started_from).read_bytes()
    from .bundle import build_bundle  # not in the bundle: only a run from the sources builds one

    return build_bundle(root)


def code_bytes(root: str | Path | None = None) -> int:
    return len(code_source(root))


@dataclass
class ArtifactInfo:
    path: str
    model_bytes: int          # the whole file: prefix + compressed payload
    code_bytes: int
    limit: int = SIZE_LIMIT
    extra: dict = field(default_factory=dict)
    code_sha256: str = ""     # of the counted train_gpt.py

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def over_by(self) -> int:
        return self.total_bytes - self.limit


def write_artifact(path: str | Path, quantized: dict, config: dict, encoding: dict | None = None,
                   limit: float = SIZE_LIMIT, code_root: str | Path | None = None,
                   quality: int = BROTLI_QUALITY, container: str = "ouroptz", coder: str = "auto") -> ArtifactInfo:
    """Write the artifact atomically if model + code fit in `limit`; otherwise leave `path` untouched,
    keep the blob beside it as `<path>.over-budget` (nothing is lost) and raise OverBudgetError.
    container "ouroptz" (the default) or "pergroup" with `coder` "auto" | "ans" | "lrzip" | "brotli"."""
    path = Path(path)
    data = blob(quantized, config, encoding, quality, container, coder)
    code = code_source(code_root)
    info = ArtifactInfo(str(path), len(data), len(code), limit, code_sha256=hashlib.sha256(code).hexdigest())
    if info.total_bytes > limit:
        aside = path.with_name(path.name + ".over-budget")
        write_atomic(aside, data)
        raise OverBudgetError(
            f"artifact over budget by {info.over_by:,} bytes: {info.model_bytes:,} B model + {info.code_bytes:,} B "
            f"code = {info.total_bytes:,} B > {limit:,} B limit; {path} was not written (blob kept at {aside})",
            info.total_bytes, limit, str(aside))
    write_atomic(path, data)
    return info


@dataclass
class Artifact:
    """What read_artifact returns: the run's config, the stored tensors, the encoding (per-group container:
    {"container": "pergroup", "coder": name}) and the file size; a per-group file also lists its groups as
    (group, [(tensor, part), ...], stream bytes), the bytes of its stream 0, that stream's header (length and
    JSON, uncompressed) and the row orders of its sorted groups ({(tensor, part): uint16 order}, byte coders)."""
    config: dict
    tensors: dict
    encoding: dict
    file_bytes: int
    groups: list = field(default_factory=list)
    meta_bytes: int = 0
    header: bytes = b""
    orders: dict = field(default_factory=dict)


def read_artifact(path: str | Path) -> Artifact:
    """Read and check an artifact. Raises ArtifactError naming the file and the problem (not an artifact,
    wrong version, truncated, checksum mismatch, malformed payload); reading never writes anything."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not an artifact file (runs/<id>/{ARTIFACT_NAME})") from None
    if len(data) < _PREFIX.size:
        raise ArtifactError(f"{path}: truncated: {len(data)} bytes, shorter than the {_PREFIX.size}-byte header")
    magic, version, length, digest = _PREFIX.unpack_from(data, 0)
    if magic not in (MAGIC, PG_MAGIC):
        raise ArtifactError(f"{path}: not an Ouroboros artifact (magic {magic!r}, expected {MAGIC!r} or {PG_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version}, this code reads version {FORMAT_VERSION}")
    payload = data[_PREFIX.size:]
    if len(payload) != length:
        raise ArtifactError(f"{path}: truncated or padded: header says {length} payload bytes, file has {len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"{path}: checksum mismatch: the payload is corrupt (its sha256 differs from the header's)")
    if magic == PG_MAGIC:
        art = _read_pergroup(payload, str(path))
        art.file_bytes = len(data)
        return art
    try:
        body = brotli.decompress(payload)
    except brotli.error as exc:
        raise ArtifactError(f"{path}: payload does not decompress ({exc})") from None
    config, tensors, encoding = decode(body, where=str(path))
    return Artifact(config, tensors, encoding, len(data))
