"""The artifact: the mixed scheme (quant/scheme.py), the 6-bit stream packing, exact write/read round trips
and loading (quant/load.py), corrupt files, the budget, code bytes and the size ledger. Synthetic weights (a tiny model with noise added), no training needed."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model.config import Config, from_env
from quant import artifact as art
from quant import inspect as quant_inspect, ledger as quant_ledger
from quant import bundle, load, scheme

ENCODINGS = [dict(codes=c, fp16=f) for c in art.CODE_ENCODINGS for f in art.FP16_ENCODINGS]


@pytest.fixture(scope="module")
def tiny():
    """(config, model, quantized): a smaller tiny model (brotli-11 is slow) with noise added to every weight,
    quantized by round-to-nearest; it has int6, int8 and fp16 tensors."""
    cfg = from_env(environ={}, preset="tiny", model_dim=64, num_flat_layers=3, bigram_vocab_size=256, bigram_dim=32,
                   inst_dim=8, quant_small_numel=1024)
    torch.manual_seed(0)
    net = model.build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():  # zero-init and constant tensors would make the round trip trivial
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.05))
    return cfg, net, scheme.quantize_state_dict(net.state_dict(), cfg.quant_small_numel)


def test_pack_int6_stream_round_trips_all_64_codes():
    every = np.arange(-32, 32, dtype=np.int8)
    for n in (64, 63, 62, 61, 1):  # lengths that are not a multiple of 4 pad the last group
        codes = np.roll(every, n)[:n]
        packed = art.pack_int6_stream(codes)
        assert packed.dtype == np.uint8 and packed.size == 3 * -(-n // 4)
        np.testing.assert_array_equal(art.unpack_int6_stream(packed, n), codes)


def test_pack_int6_stream_bit_layout():
    """4 codes -> one little-endian 24-bit word, code i in bits 6i..6i+5, two's complement."""
    np.testing.assert_array_equal(art.pack_int6_stream(np.array([1, 0, 0, 0])), [1, 0, 0])
    np.testing.assert_array_equal(art.pack_int6_stream(np.array([0, 1, 0, 0])), [64, 0, 0])
    np.testing.assert_array_equal(art.pack_int6_stream(np.array([-1, 0, 0, -32])), [63, 0, 0x80])


def test_scheme_puts_every_attention_and_mlp_matrix_in_int6():
    for preset in ("tiny", "ouroboros"):
        cfg = from_env(environ={}, preset=preset)
        with torch.device("meta"):
            state = model.build_model(cfg).state_dict()
        kinds = {n: scheme.tensor_kind(n, t.numel(), cfg.quant_small_numel) for n, t in state.items()}
        matrices = [n for n in state if any(f".{m}.weight" in n for m in
                                             ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"))]
        assert len(matrices) == 6 * (cfg.num_flat_layers + 1)
        assert all(kinds[n] == scheme.KIND_INT6 for n in matrices), preset
        assert kinds["tok_emb.weight"] == kinds["bigram.embed.weight"] == scheme.KIND_INT8
        assert {n for n, k in kinds.items() if k == scheme.KIND_INT6} == set(matrices)
        assert all(state[n].numel() <= cfg.quant_small_numel for n, k in kinds.items() if k == scheme.KIND_FP16)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e['codes']}-{e['fp16']}")
def test_write_read_is_exact_to_the_stored_precision(tiny, tmp_path, encoding):
    cfg, net, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    info = art.write_artifact(path, quantized, cfg.to_dict(), encoding)
    assert info.model_bytes == path.stat().st_size
    back = art.read_artifact(path)
    assert Config.from_dict(back.config) == cfg and back.encoding == encoding and set(back.tensors) == set(quantized)
    state = net.state_dict()
    for name, q in quantized.items():
        r = back.tensors[name]
        assert r.kind == q.kind and r.shape == q.shape
        if q.kind == scheme.KIND_FP16:
            assert torch.equal(r.values, state[name].half())
        else:
            assert torch.equal(r.codes, q.codes) and torch.equal(r.scale, q.scale)
            assert torch.equal(r.scale, r.scale.half().float())  # steps are fp16 numbers
            torch.testing.assert_close(r.dequantize(), (r.codes.float() * r.scale[:, None]).reshape(q.shape),
                                       rtol=0, atol=0)


def test_load_model_rebuilds_the_dequantized_model(tiny, tmp_path):
    cfg, net, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, cfg.to_dict())
    fresh, fresh_cfg = load.load_model(path)
    assert fresh is not net and fresh_cfg == cfg
    expected = scheme.dequantize_state_dict(quantized)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, expected[name]), name
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        drift = (fresh(ids) - net(ids)).abs().max().item()
    assert 0 < drift < 5.0  # quantized, so different, but the same model


def test_unusable_stored_config_names_the_file_and_field(tiny, tmp_path):
    cfg, _, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, dict(cfg.to_dict(), model_dim=-64))
    with pytest.raises(art.ArtifactError, match=rf"{path}: its stored config cannot be used: MODEL_DIM=-64"):
        load.load_model(path)
    art.write_artifact(path, quantized, dict(cfg.to_dict(), no_such_knob=1))
    with pytest.raises(art.ArtifactError, match=r"unknown configuration fields \['no_such_knob'\]"):
        load.load_model(path)


def test_artifact_stored_before_quant_method_still_loads(tiny, tmp_path):
    """Artifacts written before QUANT_METHOD store skip_gptq / loop_aware_gptq in their config."""
    cfg, _, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    stored = {k: v for k, v in cfg.to_dict().items() if k != "quant_method"}
    art.write_artifact(path, quantized, dict(stored, skip_gptq=False, loop_aware_gptq=False))
    _, loaded = load.load_model(path)
    assert loaded == cfg.replace(quant_method="gptq")


def test_int6_codes_out_of_range_are_refused(tiny):
    cfg, net, _ = tiny
    bad = lambda name, w: (torch.full(w.shape, 32, dtype=torch.int8), torch.ones(w.shape[0]))  # noqa: E731
    with pytest.raises(art.ArtifactError, match=r"int6 codes must be int8 .* in \[-31, 31\]"):
        scheme.quantize_state_dict(net.state_dict(), cfg.quant_small_numel, bad)


@pytest.mark.parametrize("name", ["tok_emb.weight", "smear.gate", "flat_blocks.0.attn.c_q.weight"])
def test_non_finite_weights_are_refused_by_name(tiny, name):
    """int8, fp16 and int6 entries alike: the error names the state-dict entry (fp16 would store NaN silently)."""
    cfg, net, _ = tiny
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state[name].view(-1)[3] = float("nan")
    with pytest.raises(art.ArtifactError, match=rf"state dict entry '{name}' \(shape .*\) contains NaN or inf"):
        scheme.quantize_state_dict(state, cfg.quant_small_numel)


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:len(data) - 100]
    elif how == "flipped byte":
        data[len(data) // 2] ^= 0x01
    elif how == "wrong version":
        data[8:12] = (art.FORMAT_VERSION + 1).to_bytes(4, "little")
    elif how == "not an artifact":
        data[:8] = b"PK\x03\x04zip!"
    elif how == "empty":
        data = b""
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("truncated", r"truncated or padded: header says \d+ payload bytes, file has \d+"),
    ("flipped byte", "checksum mismatch"),
    ("wrong version", rf"format version {art.FORMAT_VERSION + 1}, this code reads version {art.FORMAT_VERSION}"),
    ("not an artifact", "not an Ouroboros artifact"),
    ("empty", "truncated: 0 bytes"),
])
def test_bad_files_fail_clearly_and_nothing_is_overwritten(tiny, tmp_path, how, message):
    cfg, _, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, cfg.to_dict())
    _corrupt(path, how)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(art.ArtifactError, match=message) as err:
        load.load_model(path)
    assert str(path) in str(err.value)  # the message names the file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [art.ARTIFACT_NAME]
    assert quant_inspect.main([str(path), "--no-projection"]) == 2


def test_over_budget_raises_and_keeps_the_existing_artifact(tiny, tmp_path):
    cfg, _, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    good = art.write_artifact(path, quantized, cfg.to_dict())
    before = path.read_bytes()
    limit = good.total_bytes - 1234
    with pytest.raises(art.OverBudgetError, match="over budget by 1,234 bytes") as err:
        art.write_artifact(path, quantized, cfg.to_dict(), limit=limit)
    assert err.value.total_bytes - err.value.limit == 1234
    assert path.read_bytes() == before  # the artifact that was there is untouched
    aside = Path(err.value.path)
    assert aside.name == art.ARTIFACT_NAME + ".over-budget" and aside.read_bytes() == before  # nothing lost
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_code_bytes_are_the_bundle_an_export_submits(tmp_path):
    """SPEC 5: the counted code is train_gpt.py (quant/bundle.py) built from the sources a run imports."""
    assert art.code_bytes() == len(art.code_source()) == len(bundle.build_bundle()) <= bundle.SIZE_TARGET
    for rel, text in {"train/__init__.py": "", "train/__main__.py": "import model.m\n", "model/__init__.py": "",
                      "model/m.py": "X = 1  # a comment the bundle drops\n", "model/unused.py": "Y = 2\n",
                      "tests/t.py": "import model.m\n", "bench/__init__.py": "import model.m\n"}.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    assert sorted(bundle.bundled_modules(tmp_path)) == ["model", "model.m", "train", "train.__main__"]
    assert art.code_bytes(tmp_path) == len(bundle.build_bundle(tmp_path)) < art.code_bytes()
    path = tmp_path / art.ARTIFACT_NAME
    cfg = from_env(environ={}, preset="tiny")
    info = art.write_artifact(path, {}, cfg.to_dict(), code_root=tmp_path)
    assert info.code_bytes == art.code_bytes(tmp_path)
    assert info.code_sha256 == hashlib.sha256(bundle.build_bundle(tmp_path)).hexdigest()


def test_ledger_accounts_for_every_byte_and_parameter(tiny, tmp_path, capsys):
    cfg, net, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, cfg.to_dict())
    led = quant_ledger.build_ledger(path)
    assert sum(led.params.values()) == sum(t.numel() for t in net.state_dict().values())
    assert led.values["int6_codes"] == led.params[scheme.KIND_INT6]
    assert led.values["int6_steps"] == sum(q.shape[0] for q in quantized.values() if q.kind == scheme.KIND_INT6)
    assert led.file_bytes == path.stat().st_size and led.total_bytes == led.file_bytes + led.code_bytes
    assert led.code_bytes == art.code_bytes() == len(bundle.build_bundle())  # the submitted train_gpt.py
    # each category compressed alone: within a few percent of the one-stream file
    assert abs(sum(led.bytes.values()) - led.file_bytes) < 0.05 * led.file_bytes
    # the projection counts the full model's values exactly
    values, params = quant_ledger.ouroboros_counts()
    assert sum(params.values()) == model.count_parameters(model.build_model(from_env(environ={}, preset="ouroboros")))
    assert led.projection["values"] == values
    assert quant_inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "int6 matrices: codes" in out and "bits per parameter" in out and "projected full `ouroboros`" in out
    assert f"{led.total_bytes:,}" in out
    # the full model's two projections, each saying what it assumes, and neither a warning
    entry = quant_ledger.ORIGINAL_ENTRY
    assert quant_ledger.ORIGINAL_ENTRY_BITS_PER_PARAM == pytest.approx(4.581, abs=1e-3)
    assert led.projection["entry_model_bytes"] == pytest.approx(entry["model_bytes"] * sum(params.values())
                                                                / entry["params"])
    projected = [line for line in out.splitlines() if line.startswith("  model ")]
    assert len(projected) == 2
    assert f"= {int(led.projection['total_bytes']):,} B" in projected[0]
    assert "if its values compress as this artifact's do" in projected[0]
    assert f"= {int(led.projection['entry_total_bytes']):,} B" in projected[1]
    assert "at the original entry's measured 4.58 bits per parameter (14,912,873 B" in projected[1]
    led.limit = int(led.projection["total_bytes"]) - 10  # a projection over the limit is shown, without alarm
    text = quant_ledger.format_ledger(led)
    assert f"{int(led.projection['total_bytes']):,} B of {led.limit:,}, if its values" in text
    assert "WARNING" not in text and "WARNING" not in out


def test_write_is_atomic_when_it_fails(tiny, tmp_path, monkeypatch):
    cfg, _, quantized = tiny
    path = tmp_path / art.ARTIFACT_NAME
    art.write_artifact(path, quantized, cfg.to_dict())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        art.write_artifact(path, quantized, cfg.to_dict(), dict(codes="packed6", fp16="raw"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [art.ARTIFACT_NAME]  # no temp file left behind
