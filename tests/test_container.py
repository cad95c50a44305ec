"""The per-group container (quant/artifact.py, container="pergroup") and its coders: R1's similarity order against a
naive reference, bit-exact round trips of every stored kind (with and without LQER factors, empty groups, the crawler
model's names) through each coder this machine has, the coder named in the header and the refusals of what a build
cannot read, lrzip's command lines through a stand-in binary, the default container unchanged byte for byte (the
pinned tiny run's artifact, written by the code before this container existed), the ledger's group table, and a
smoke run of bench/artifact.py."""
import hashlib
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from bench import artifact as bench_artifact
from model.config import Config, from_env
from quant import artifact as art
from quant import inspect as quant_inspect
from quant import ledger as quant_ledger
from quant.lqer import correction as lqer_correction
from quant.scheme import KIND_FP16, KIND_GATE, KIND_INT6, KIND_INT7, KIND_INT8, QuantizedTensor, dequantize_state_dict

PIN = Path(__file__).resolve().parent / "pins" / "tiny_run.int6.ptz"
CODERS = art.available_coders()


def naive_similarity_order(codes) -> np.ndarray:
    """QUANT.md Q.5 as written: from row 0, repeatedly the unused row at the least L1 distance (float32 sums), scanned
    in ascending index with a strict '<', so ties go to the lowest index."""
    m = np.asarray(codes, dtype=np.float32)
    n = len(m)
    if n == 0:
        return np.zeros(0, np.uint16)
    used, order, cur = [False] * n, [0], 0
    used[0] = True
    for _ in range(n - 1):
        best, best_j = None, -1
        for j in range(n):
            if not used[j]:
                d = float(np.abs(m[j] - m[cur]).sum())
                if best is None or d < best:
                    best, best_j = d, j
        order.append(best_j)
        used[best_j] = True
        cur = best_j
    return np.array(order, np.uint16)


@pytest.mark.parametrize("seed", range(6))
def test_similarity_order_is_the_naive_greedy_chain(seed):
    rng = np.random.default_rng(seed)
    cases = [np.zeros((0, 4), np.int8), np.zeros((1, 3), np.int8), np.zeros((7, 5), np.int8),  # all tied
             np.repeat(rng.integers(-2, 3, (3, 4)), 4, axis=0).astype(np.int8)]  # duplicated rows
    for _ in range(40):
        rows, cols, hi = int(rng.integers(2, 48)), int(rng.integers(1, 10)), int(rng.integers(1, 4))
        cases.append(rng.integers(-hi, hi + 1, (rows, cols)).astype(np.int8))  # small alphabets: many ties
    cases.append(rng.integers(-31, 32, (60, 16)).astype(np.int8))
    cases.append(rng.integers(-127, 128, (40, 8)).astype(np.int8))
    for codes in cases:
        want = naive_similarity_order(codes)
        for device in (None, "cpu"):  # one numpy step per row; all distances on a torch device
            got = art.similarity_order(codes, device)
            assert got.dtype == np.uint16 and got.shape == (len(codes),)
            np.testing.assert_array_equal(got, want)


def test_similarity_order_breaks_ties_to_the_lowest_row():
    codes = np.array([[0, 0], [5, 5], [1, 0], [0, 1], [1, 0]], np.int8)
    # from row 0, rows 2, 3 and 4 are all at distance 1: row 2; from row 2, row 4 at 0; then row 3 at 2; then row 1
    for device in (None, "cpu"):
        np.testing.assert_array_equal(art.similarity_order(codes, device), [0, 2, 4, 3, 1])


def test_routing_by_role():
    assert art.group_of("tok_emb.weight") == "tok_emb"
    assert art.group_of("blocks.3.attn.c_q.weight") == "attn.c_q"
    assert art.group_of("flat_blocks.0.mlp.proj.weight") == "mlp.proj"
    assert art.group_of("crawler_blocks.0.attn.c_k.weight") == "attn.c_k"
    assert art.group_of("blocks.0.mlp.fc.weight", "qA") == "rest"
    for name in ("bigram.embed.weight", "blocks.0.attn.attn_gate_w", "tok_emb.weights", "blocks.0.attn.c_qq.weight"):
        assert art.group_of(name) == "rest", name


def _lqer(rng, rows, cols, rank=4, asym=True):
    qa = torch.from_numpy(rng.integers(-2 if asym else -7, 2 if asym else 8, (rows, rank)).astype(np.int8))
    qb = torch.from_numpy(rng.integers(-8 if asym else -7, 8, (rank, cols)).astype(np.int8))

    def small(n):
        return torch.from_numpy(rng.uniform(1e-3, 1e-2, n).astype(np.float16))
    if asym:
        return qa, torch.tensor(0.0123, dtype=torch.float16), qb, small(rank * cols // 64)
    return qa, small(rows), qb, small(rank)


def _codes(rng, rows, cols, qmax, clustered=False):
    c = rng.laplace(0, qmax / 8, (rows, cols))
    if clustered:  # rows near a few centres, as a trained embedding's rare tokens are
        c = rng.laplace(0, qmax / 6, (4, cols))[rng.integers(0, 4, rows)] + rng.normal(0, 1.0, (rows, cols))
    c = np.clip(np.round(c), -qmax, qmax).astype(np.int8)
    c[0, :2] = [qmax, -qmax]  # the alphabet's ends
    return torch.from_numpy(c)


def every_kind(seed=0) -> dict:
    """A state dict's worth of every kind: R1's names (int7 embedding with LQER, int6 matrices, a gate), the crawler's
    and a bigram table (int8, rest), symmetric LQER, a 1-D int8 entry, an all-zero matrix, fp16 of several shapes."""
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float16))

    def steps(rows):
        return torch.from_numpy(rng.uniform(1e-3, 1e-1, rows).astype(np.float16)).float()

    def coded(kind, rows, cols, qmax, **kw):
        return QuantizedTensor(kind, (rows, cols), codes=_codes(rng, rows, cols, qmax, kw.pop("clustered", False)),
                               scale=steps(rows), **kw)

    q = {"tok_emb.weight": coded(KIND_INT7, 300, 32, 63, clustered=True, lqer=_lqer(rng, 300, 32)),
         "skip_weights": QuantizedTensor(KIND_FP16, (3, 32), values=randn(3, 32)),
         "smear_lambda": QuantizedTensor(KIND_FP16, (1,), values=randn(1)),
         "bigram.scale": QuantizedTensor(KIND_FP16, (), values=torch.tensor(0.5).half()),
         "bigram.embed.weight": coded(KIND_INT8, 160, 16, 127),
         "crawler_blocks.0.attn.c_q.weight": coded(KIND_INT6, 32, 32, 31)}
    for i in range(2):
        p = f"blocks.{i}."
        q[p + "attn.c_q.weight"] = coded(KIND_INT6, 32, 32, 31)
        q[p + "attn.c_k.weight"] = coded(KIND_INT6, 16, 32, 31)
        q[p + "attn.proj.weight"] = coded(KIND_INT6, 32, 32, 31, lqer=_lqer(rng, 32, 32, 2, asym=False))
        q[p + "mlp.fc.weight"] = coded(KIND_INT6, 140, 32, 31, lqer=_lqer(rng, 140, 32) if i else None)
        q[p + "mlp.proj.weight"] = coded(KIND_INT6, 32, 140, 31)
        q[p + "attn.attn_gate_w"] = coded(KIND_GATE, 2, 12, 127)
        q[p + "attn_scale"] = QuantizedTensor(KIND_FP16, (32,), values=randn(32))
    q["blocks.1.attn.c_k.weight"].codes.zero_()
    q["pos.weight"] = QuantizedTensor(KIND_INT8, (40,), codes=_codes(rng, 1, 40, 127), scale=steps(1))
    return q  # no attn.c_v: an empty group


def assert_same(stored: dict, back: dict):
    assert list(back) == list(stored)
    for name, q in stored.items():
        r = back[name]
        assert (r.kind, r.shape) == (q.kind, q.shape), name
        if q.kind == KIND_FP16:
            assert r.values.dtype == torch.float16 and torch.equal(r.values, q.values), name
            continue
        assert r.codes.dtype == torch.int8 and torch.equal(r.codes, q.codes), name
        assert r.scale.dtype == torch.float32 and torch.equal(r.scale, q.scale), name
        assert (r.lqer is None) == (q.lqer is None), name
        for a, b in zip(r.lqer or (), q.lqer or ()):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        assert torch.equal(r.dequantize(), q.dequantize()), name


@pytest.mark.parametrize("coder", CODERS)
def test_every_kind_round_trips_bit_exact(tmp_path, coder):
    stored = every_kind()
    path = tmp_path / art.ARTIFACT_NAME
    info = art.write_artifact(path, stored, {"preset": "test", "n": 3}, container="pergroup", coder=coder)
    assert info.model_bytes == path.stat().st_size
    data = path.read_bytes()
    assert data[:8] == art.PG_MAGIC
    assert data[art._PREFIX.size:art._PREFIX.size + 1 + len(coder)] == bytes([len(coder)]) + coder.encode()
    back = art.read_artifact(path)
    assert back.config == {"preset": "test", "n": 3} and back.file_bytes == len(data)
    assert back.encoding == {"container": "pergroup", "coder": coder}
    assert_same(stored, back.tensors)
    groups = {g: members for g, members, _ in back.groups}
    assert list(groups) == ["tok_emb", "attn.c_k", "attn.c_q", "attn.proj", "mlp.fc", "mlp.proj", "rest"]  # no c_v
    assert groups["attn.c_q"] == [("crawler_blocks.0.attn.c_q.weight", "q"), ("blocks.0.attn.c_q.weight", "q"),
                                  ("blocks.1.attn.c_q.weight", "q")]
    assert ("tok_emb.weight", "qA") in groups["rest"] and ("blocks.0.attn.attn_gate_w", "q") in groups["rest"]
    assert sum(size for _, _, size in back.groups) + back.meta_bytes < len(data)


@pytest.mark.parametrize("coder", CODERS)
def test_edge_cases_round_trip(tmp_path, coder):
    rng = np.random.default_rng(1)
    path = tmp_path / "x.ptz"
    cases = [{},  # nothing at all
             {"a": QuantizedTensor(KIND_FP16, (2,), values=torch.ones(2).half())},  # no codes: no groups
             {"tok_emb.weight": QuantizedTensor(KIND_INT8, (1, 1), codes=torch.tensor([[-127]], dtype=torch.int8),
                                                scale=torch.ones(1))},
             {"blocks.0.mlp.fc.weight": QuantizedTensor(KIND_INT6, (256, 8), codes=torch.zeros(256, 8, dtype=torch.int8),
                                                        scale=torch.zeros(256))},
             {"tok_emb.weight": QuantizedTensor(KIND_INT8, (512, 4), codes=_codes(rng, 512, 4, 127, True),
                                                scale=torch.ones(512))}]
    for stored in cases:
        art.write_artifact(path, stored, {}, container="pergroup", coder=coder, limit=float("inf"))
        assert_same(stored, art.read_artifact(path).tensors)


def test_ans_beats_brotli_and_order_0_on_clustered_codes():
    """The context model earns its keep: rows near a few centres (an embedding's rare tokens) and columns of
    different scale, where order 0 misses the structure."""
    rng = np.random.default_rng(2)
    centres = np.round(rng.laplace(0, 8, (3, 64)))
    col = np.exp(rng.normal(0, 0.7, 64))
    codes = np.clip(centres[rng.integers(0, 3, 2048)] + np.round(rng.laplace(0, 1, (2048, 64)) * col), -63, 63)
    stored = {"tok_emb.weight": QuantizedTensor(KIND_INT7, (2048, 64), codes=torch.from_numpy(codes.astype(np.int8)),
                                                scale=torch.ones(2048))}
    ans = len(art.blob(stored, {}, container="pergroup", coder="ans"))
    brotli_bytes = len(art.blob(stored, {}, container="pergroup", coder="brotli"))
    order0 = bench_artifact.order0_bits([codes]) / 8
    assert ans < 0.8 * order0 and ans < 0.95 * brotli_bytes, (ans, brotli_bytes, order0)


@pytest.mark.parametrize("coder", CODERS)
def test_the_whole_int8_range_round_trips(coder):
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(2, 128)
    stored = {"x": QuantizedTensor(KIND_INT8, (2, 128), codes=codes, scale=torch.ones(2))}
    back = art._read_pergroup(art.blob(stored, {}, container="pergroup", coder=coder)[art._PREFIX.size:], "x")
    assert torch.equal(back.tensors["x"].codes, codes)


def test_lqer_dequantize_adds_the_correction():
    rng = np.random.default_rng(3)
    for asym in (True, False):
        qa, sa, qb, sb = _lqer(rng, 6, 128, 4, asym)
        if asym:
            want = (qa.float() * sa.float()) @ (qb.float().reshape(-1, 64) * sb.float()[:, None]).reshape(4, 128)
        else:
            want = (qa.float() * sa.float()[:, None]) @ (qb.float() * sb.float()[:, None])
        torch.testing.assert_close(lqer_correction(qa, sa, qb, sb), want, rtol=0, atol=0)
        codes, scale = _codes(rng, 6, 128, 31), torch.rand(6)
        q = QuantizedTensor(KIND_INT6, (6, 128), codes=codes, scale=scale, lqer=(qa, sa, qb, sb))
        torch.testing.assert_close(q.dequantize(), codes.float() * scale[:, None] + want, rtol=0, atol=0)
        assert not torch.equal(q.dequantize(), QuantizedTensor(KIND_INT6, (6, 128), codes=codes, scale=scale).dequantize())


def _recoded(path: Path, coder: bytes):
    """The file at `path` with its header's coder name replaced (checksum recomputed)."""
    data = path.read_bytes()
    payload = data[art._PREFIX.size:]
    payload = bytes([len(coder)]) + coder + payload[1 + payload[0]:]
    path.write_bytes(art._PREFIX.pack(art.PG_MAGIC, art.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
                     + payload)


def test_unknown_and_unavailable_coders_are_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, every_kind(), {}, container="pergroup", coder="brotli")
    _recoded(path, b"zpaq-9000")
    with pytest.raises(art.ArtifactError, match=rf"{path}: coder 'zpaq-9000' is unknown to this build \(it has "
                                                rf"ans, lrzip, brotli\)"):
        art.read_artifact(path)
    assert quant_inspect.main([str(path)]) == 2
    monkeypatch.setattr(art.shutil, "which", lambda name: None)
    _recoded(path, b"lrzip")
    with pytest.raises(art.ArtifactError, match=rf"{path}: coder 'lrzip' needs the lrzip binary"):
        art.read_artifact(path)
    monkeypatch.setattr(art, "_has_constriction", lambda: False)
    _recoded(path, b"ans")
    with pytest.raises(art.ArtifactError, match=rf"{path}: coder 'ans' needs constriction"):
        art.read_artifact(path)
    with pytest.raises(art.ArtifactError, match="write_artifact: coder 'lrzip' needs the lrzip binary"):
        art.write_artifact(path, every_kind(), {}, container="pergroup", coder="lrzip")
    with pytest.raises(art.ArtifactError, match="coder 'zstd' is unknown"):
        art.write_artifact(path, every_kind(), {}, container="pergroup", coder="zstd")
    with pytest.raises(art.ArtifactError, match="container 'zip'"):
        art.write_artifact(path, every_kind(), {}, container="zip")
    assert art.available_coders() == ["brotli"]
    art.write_artifact(path, every_kind(), {}, container="pergroup")  # auto: the best this machine has
    assert art.read_artifact(path).encoding["coder"] == "brotli"


def test_auto_picks_the_context_coder_when_there():
    if "ans" not in CODERS:
        pytest.skip("constriction is not installed")
    assert CODERS[0] == "ans"
    data = art.blob(every_kind(), {}, container="pergroup")
    assert data[art._PREFIX.size:art._PREFIX.size + 4] == b"\x03ans"


def test_the_default_container_is_unchanged_byte_for_byte():
    """The pinned tiny run's artifact was written by the code before this container: written again from its
    tensors in the model's state-dict order, with the defaults, it comes out the same bytes."""
    stored = art.read_artifact(PIN)
    with torch.device("meta"):
        names = list(model.build_model(Config.from_dict(stored.config)).state_dict())
    tensors = {name: stored.tensors[name] for name in names}
    assert art.blob(tensors, stored.config) == PIN.read_bytes()
    assert art.blob(tensors, stored.config, stored.encoding, container="ouroptz") == PIN.read_bytes()


def test_the_default_container_refuses_what_it_cannot_store():
    q = every_kind()
    with pytest.raises(art.ArtifactError, match="'tok_emb.weight'.*not int7 \\+ LQER.*container='pergroup'"):
        art.blob(q, {})
    with pytest.raises(art.ArtifactError, match="not gate_int8.*container='pergroup'"):
        art.blob({"g": q["blocks.0.attn.attn_gate_w"]}, {})


def _fake_lrzip(folder: Path, log: Path) -> None:
    """A stand-in `lrzip` on PATH that logs its arguments and copies input to output (no compression)."""
    script = folder / "lrzip"
    script.write_text(f"#!{sys.executable}\nimport shutil, sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) "
                      f"+ '\\n')\na = sys.argv[1:]\nshutil.copyfile(a[-1], a[a.index('-o') + 1])\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_lrzip_runs_with_r1s_flags_when_present(tmp_path, monkeypatch):
    if art.shutil.which("lrzip") is None:
        bin_dir, log = tmp_path / "bin", tmp_path / "lrzip.log"
        bin_dir.mkdir()
        _fake_lrzip(bin_dir, log)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    else:
        log = None
    assert "lrzip" in art.available_coders()
    path = tmp_path / art.ARTIFACT_NAME
    stored = every_kind()
    art.write_artifact(path, stored, {}, container="pergroup", coder="lrzip")
    back = art.read_artifact(path)
    assert back.encoding["coder"] == "lrzip"
    assert_same(stored, back.tensors)
    if log is not None:
        calls = log.read_text().splitlines()
        assert len(calls) == 2 * len(back.groups)
        assert all(c.startswith("-z -L 9 -o ") for c in calls[:len(back.groups)])
        assert all(c.startswith("-d -f -o ") for c in calls[len(back.groups):])


def test_byte_coders_sort_the_hot_groups_and_ans_does_not(tmp_path):
    stored = every_kind()
    meta_sizes = {}
    for coder in ("brotli", *(["ans"] if "ans" in CODERS else [])):
        path = tmp_path / f"{coder}.ptz"
        art.write_artifact(path, stored, {}, container="pergroup", coder=coder, limit=float("inf"))
        payload = path.read_bytes()[art._PREFIX.size:]
        pos = 1 + payload[0]
        (n,) = struct.unpack_from("<I", payload, pos)
        lengths = struct.unpack_from(f"<{n}I", payload, pos + 4)
        meta = art.brotli.decompress(payload[pos + 4 + 4 * n:pos + 4 + 4 * n + lengths[0]])
        meta_sizes[coder] = len(meta)
    if "ans" in meta_sizes:  # the orders of tok_emb (300 rows), 3 c_q (32 each), 2 fc (140 each), uint16; the name
        assert meta_sizes["brotli"] - meta_sizes["ans"] == 2 * (300 + 3 * 32 + 2 * 140) + len("brotli") - len("ans")


def test_over_budget_and_atomic_write_hold_for_the_new_container(tmp_path):
    path = tmp_path / art.ARTIFACT_NAME
    good = art.write_artifact(path, every_kind(), {}, container="pergroup", coder="brotli")
    before = path.read_bytes()
    with pytest.raises(art.OverBudgetError, match="over budget by 77 bytes"):
        art.write_artifact(path, every_kind(), {}, container="pergroup", coder="brotli", limit=good.total_bytes - 77)
    assert path.read_bytes() == before
    assert (tmp_path / (art.ARTIFACT_NAME + ".over-budget")).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_pergroup_files_fail_clearly(tmp_path):
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, every_kind(), {}, container="pergroup", coder="brotli")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(art.ArtifactError, match="checksum mismatch"):
        art.read_artifact(path)
    art.write_artifact(path, every_kind(), {}, container="pergroup", coder="brotli")
    payload = path.read_bytes()[art._PREFIX.size:]
    payload = payload[:-10]  # a stream cut short, with a valid checksum
    path.write_bytes(art._PREFIX.pack(art.PG_MAGIC, art.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
                     + payload)
    with pytest.raises(art.ArtifactError, match=rf"{path}: malformed payload"):
        art.read_artifact(path)


@pytest.fixture(scope="module")
def tiny_quantized():
    cfg = from_env(environ={}, preset="tiny", model_dim=64, num_flat_layers=3, bigram_vocab_size=256, bigram_dim=32,
                   inst_dim=8, quant_small_numel=1024)
    torch.manual_seed(0)
    net = model.build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.05))
    from quant import scheme
    return cfg, net, scheme.quantize_state_dict(net.state_dict(), cfg.quant_small_numel)


def test_a_pergroup_artifact_loads_as_a_model_and_the_ledger_lists_its_groups(tiny_quantized, tmp_path, capsys):
    from quant import load
    cfg, net, quantized = tiny_quantized
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, cfg.to_dict(), container="pergroup")
    fresh, fresh_cfg = load.load_model(path)
    assert fresh_cfg == cfg
    expected = dequantize_state_dict(quantized)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, expected[name]), name
    led = quant_ledger.build_ledger(path)
    assert [g for g, *_ in led.groups] == [g for g, _, _ in art.read_artifact(path).groups]
    assert sum(n for _, n, _, _ in led.groups) == sum(q.numel for q in quantized.values() if q.kind != KIND_FP16)
    for group, n, h0, size in led.groups:
        codes = [quantized[name].codes for name, q in quantized.items() if q.kind != KIND_FP16
                 and art.group_of(name) == group]
        assert h0 == pytest.approx(bench_artifact.order0_bits([c.numpy() for c in codes]))
    assert quant_inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "order-0 B" in out and f"coder {art.available_coders()[0]}" in out
    assert f"{led.total_bytes:,}" in out
    assert any(line.startswith("mlp.fc") and f"{dict((g, s) for g, _, _, s in led.groups)['mlp.fc']:,}" in line
               for line in out.splitlines())


@pytest.fixture(scope="module")
def frontier_quantized():
    """A frontier-tiny-shaped model (4 blocks of width 64, 4 heads so the gates are R1's gate_int8 rows, vocabulary
    512) through R1's quantizer (H = I): int7 embedding, int6 matrices, gate rows, LQER on three, fp16 passthrough;
    one attn.proj relabelled int8 (its codes fit) so that every code kind is there."""
    import kernels
    from quant.frontier import frontier_quantize

    cfg = from_env(environ={}, preset="frontier-tiny", num_layers=4, loop_start=1, loop_end=2, parallel_start_layer=3,
                   model_dim=64, num_heads=4, num_kv_heads=2, quant_small_numel=256, vocab_size=512)
    torch.manual_seed(0)
    net = model.build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    kernels.set_backend("torch")
    try:
        q = frontier_quantize(net.state_dict(), {}, cfg)
    finally:
        kernels.set_backend(None)
    x = q["blocks.2.attn.proj.weight"]
    q["blocks.2.attn.proj.weight"] = QuantizedTensor(KIND_INT8, x.shape, codes=x.codes, scale=x.scale)
    return cfg, q


@pytest.mark.parametrize("coder", CODERS)
def test_the_ledger_accounts_for_a_frontier_artifact_by_kind(frontier_quantized, tmp_path, capsys, coder):
    cfg, q = frontier_quantized
    assert {v.kind for v in q.values()} == {KIND_INT6, KIND_INT7, KIND_INT8, KIND_GATE, KIND_FP16}
    assert sum(v.lqer is not None for v in q.values()) == 3
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, q, cfg.to_dict(), container="pergroup", coder=coder)
    led = quant_ledger.build_ledger(path)
    kinds = {key: (label, n, size) for key, label, n, size in led.kinds}
    assert list(kinds) == [key for key, _ in quant_ledger.KINDS]
    coded = [v for v in q.values() if v.kind != KIND_FP16]
    for kind in (KIND_INT6, KIND_INT7, KIND_INT8, KIND_GATE):
        assert kinds[kind][1] == sum(v.numel for v in q.values() if v.kind == kind) > 0, kind
    assert kinds["steps"][1] == sum(v.scale.numel() for v in coded)
    assert kinds["lqer"][1] == sum(t.numel() for v in coded for t in v.lqer or ())
    sorted_rows = sum(v.codes.shape[0] for name, v in q.items() if v.kind != KIND_FP16
                      and art.group_of(name) in art.SORTED_GROUPS)
    assert kinds["orders"][1] == (0 if coder == "ans" else sorted_rows)
    assert kinds[KIND_FP16][1] == sum(v.numel for v in q.values() if v.kind == KIND_FP16)
    assert kinds["header"][1] == 0
    assert all((size > 0) == (n > 0) for key, (_, n, size) in kinds.items() if key != "header")
    fp16 = b"".join(v.values.numpy().tobytes() for v in q.values() if v.kind == KIND_FP16)
    assert kinds[KIND_FP16][2] == len(art.compress(art._shuffle(fp16, 2)))  # alone, byte planes, brotli-11
    alone = sum(size for _, _, size in kinds.values())
    assert 0.9 < alone / led.file_bytes < 1.1  # each alone vs one file: close, not equal

    assert quant_inspect.main([str(path), "--no-projection"]) == 0
    out = capsys.readouterr().out
    shares = 0.0
    for key, (label, n, size) in kinds.items():
        (line,) = [line for line in out.splitlines() if line.startswith(label)]
        assert f"{n:,}" in line and f"{size:,}" in line, line
        if n:
            assert f"{8 * size / n:.3f}" in line, line
        shares += float(line.split()[-1].rstrip("%"))
    assert shares == pytest.approx(100, abs=0.01 * len(kinds))
    assert f"{alone:,}" in out and f"{led.file_bytes:,}" in out and "order-0 B" in out


def test_bench_smoke(tmp_path, capsys):
    rtn = {}
    synth = bench_artifact.r1_synthetic(scale=1 / 32, layers=2, rtn=rtn)
    kinds = {q.kind for q in synth.values()}
    assert kinds == {KIND_INT6, KIND_INT7, KIND_GATE, KIND_FP16}
    assert sum(q.lqer is not None for q in synth.values()) == 3
    for h in (bench_artifact.random_hessian(np.random.default_rng(0), 64, activation) for activation in (False, True)):
        assert torch.equal(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > 0  # positive definite
    fc = synth["blocks.0.mlp.fc.weight"]  # GPTQ at SDClip's steps: the codes in range, not round-to-nearest's
    assert fc.codes.abs().max() <= 31 and not torch.equal(fc.codes, rtn["blocks.0.mlp.fc.weight"])
    assert synth["tok_emb.weight"].codes.abs().max() <= 63
    rows = bench_artifact.measure(synth, {}, ["ouroptz", *CODERS])
    assert [r["coder"] for r in rows] == ["ouroptz", *CODERS] and all(r["exact"] for r in rows)
    text = bench_artifact.format_rows("smoke", synth, rows)
    assert "| mlp.fc |" in text and "order-0" in text
    out = tmp_path / "bench.md"
    assert bench_artifact.main(["--scale", "0.03125", "--trained", str(PIN), "--out", str(out)]) == 0
    report = out.read_text()
    assert "(a) R1-shaped synthetic model" in report and f"(b) trained: {PIN}" in report
    assert f"the file + {art.code_bytes():,} B" in report and "| with code |" in report
    assert "by GPTQ; the same weights rounded to nearest at the same SDClip steps" in report
    assert "| NO |" not in report
    assert bench_artifact.main(["--coders", "ouroptz,nope", "--skip-synthetic"]) == 2
