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
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import numpy as np
import torch

from model.io import write_atomic

from .scheme import KIND_FP16, KIND_INT6, KIND_INT8, ArtifactError, QuantizedTensor

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


# ---------------------------------------------------------------- files
def compress(body: bytes, quality: int = BROTLI_QUALITY) -> bytes:
    return brotli.compress(body, quality=quality)


def blob(quantized: dict, config: dict, encoding: dict | None = None, quality: int = BROTLI_QUALITY) -> bytes:
    """The complete file contents (quality below 11 only for scratch files whose size does not matter)."""
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
                   quality: int = BROTLI_QUALITY) -> ArtifactInfo:
    """Write the artifact atomically if model + code fit in `limit`; otherwise leave `path` untouched,
    keep the blob beside it as `<path>.over-budget` (nothing is lost) and raise OverBudgetError."""
    path = Path(path)
    data = blob(quantized, config, encoding, quality)
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
    """What read_artifact returns: the run's config, the stored tensors, the encoding and the file size."""
    config: dict
    tensors: dict
    encoding: dict
    file_bytes: int


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
    if magic != MAGIC:
        raise ArtifactError(f"{path}: not an Ouroboros artifact (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version}, this code reads version {FORMAT_VERSION}")
    payload = data[_PREFIX.size:]
    if len(payload) != length:
        raise ArtifactError(f"{path}: truncated or padded: header says {length} payload bytes, file has {len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"{path}: checksum mismatch: the payload is corrupt (its sha256 differs from the header's)")
    try:
        body = brotli.decompress(payload)
    except brotli.error as exc:
        raise ArtifactError(f"{path}: payload does not decompress ({exc})") from None
    config, tensors, encoding = decode(body, where=str(path))
    return Artifact(config, tensors, encoding, len(data))
