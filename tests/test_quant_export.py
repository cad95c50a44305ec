"""The export step on the trained `tiny` model (the tiny_run fixture): real Hessians, the three quantization
gaps (round-to-nearest, GPTQ, loop-aware GPTQ), the budget failure and the standalone CLI.

The gaps are measured with the run's own eval settings (the fixture evaluates non-overlapping windows of
256 to stay cheap) on the whole val shard (~46 k tokens), the same tokens for every method, so the
comparison is paired. Fewer tokens are too noisy: on 8 k-token slices of the val set the ordering of
the GPTQ and round-to-nearest gaps flipped on one slice in five.
"""
import math
import shutil

import pytest
import sentencepiece as spm

import model
from quant import artifact as art
from quant import gptq
from quant.__main__ import main as quant_main
from quant.calibrate import Calibrator
from quant.export import calibration_tokens, export_run
from train.data import load_val_tokens, shard_paths
from train.evaluate import build_byte_luts

ORIGINAL_VARIANT = dict(block_size=64, damping=0.002, order="ascending", inverse="plain")


@pytest.fixture(scope="module")
def trained(request, prepared_corpus):
    """(run folder, float model, config, val tokens, luts, train shard paths)."""
    try:
        run_dir = request.getfixturevalue("tiny_run")
    except pytest.FixtureLookupError:
        pytest.skip("the trainer's tiny_run fixture is not in tests/conftest.py yet")
    net = model.load_checkpoint(run_dir / "final_model.pt")
    cfg = net.config
    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=str(prepared_corpus.tokenizer_path)), cfg.vocab_size)
    val = load_val_tokens(shard_paths(prepared_corpus.dataset_dir, "val"), cfg.eval_seq_len)
    return run_dir, net, cfg, val, luts, shard_paths(prepared_corpus.dataset_dir, "train")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """export_run with all three methods compared, into a fresh folder (the cached run stays as it is)."""
    _, net, cfg, val, luts, train_paths = trained
    out = tmp_path_factory.mktemp("export")
    lines = []
    result = export_run(net, cfg, out, val_tokens=val, luts=luts, train_paths=train_paths, compare=True,
                        log=lines.append)
    return out, result, lines


def test_gptq_beats_rtn_on_the_real_hessians_of_every_layer(trained, capsys):
    _, net, cfg, _, _, train_paths = trained
    calib = calibration_tokens(train_paths, cfg)
    calibrator = Calibrator(net, cfg, lambda b: net(b), [calib])
    hessians = calibrator.phase1()
    state = net.state_dict()
    total_rtn = total_original = 0.0
    rows = []
    for layer in calibrator.layers:
        w, h = state[f"{layer}.weight"], hessians[layer]
        s = gptq.row_scales(w)
        rtn = gptq.layer_objective(w, gptq.dequantize(gptq.quantize_rtn(w, s), s), h)
        textbook = gptq.layer_objective(w, gptq.dequantize(gptq.quantize_layer(w, h, s), s), h)
        codes = gptq.quantize_layer(w, h, s, **ORIGINAL_VARIANT)
        assert int(codes.abs().max()) <= 31
        original = gptq.layer_objective(w, gptq.dequantize(codes, s), h)
        assert textbook < rtn, f"{layer}: textbook GPTQ {textbook:.4g} >= round-to-nearest {rtn:.4g}"
        total_rtn += rtn
        total_original += original
        rows.append(f"  {layer:<32} textbook/RTN {textbook / rtn:.3f}  original/RTN {original / rtn:.3f}")
    with capsys.disabled():
        print("\nlayer objective ||(W-Q)X||^2 on the trained tiny model's calibration Hessians:")
        print("\n".join(rows))
        print(f"  total: original variant / RTN {total_original / total_rtn:.3f}")
    assert total_original < total_rtn


def test_three_quantization_gaps(exported, capsys):
    out, result, lines = exported
    gaps, ratios = result["gaps"], result["gap_ratios"]
    with capsys.disabled():
        print("\n" + "\n".join(line for line in lines if line.startswith("quant")))
    assert set(gaps) == {"rtn", "gptq", "loop_aware"} and all(math.isfinite(g) for g in gaps.values())
    assert gaps["gptq"] < gaps["rtn"], f"GPTQ gap {gaps['gptq']:+.4f} is not below round-to-nearest's {gaps['rtn']:+.4f}"
    assert gaps["loop_aware"] <= gaps["gptq"] + 0.002
    assert ratios["gptq/rtn"] == pytest.approx(gaps["gptq"] / gaps["rtn"])
    # the run log carries the three gaps and their ratios
    assert any(line.startswith("quant gaps") for line in lines) and any("gptq/rtn" in line for line in lines)


def test_exported_artifact_round_trip(exported, trained):
    out, result, _ = exported
    _, _, cfg, _, _, _ = trained
    path = out / art.ARTIFACT_NAME
    assert result["artifact_path"] == str(path) and result["method"] == "loop_aware"
    assert result["model_bytes"] == path.stat().st_size
    assert result["total_bytes"] == result["model_bytes"] + result["code_bytes"] <= art.SIZE_LIMIT
    assert result["code_bytes"] > 50_000  # the package's sources: counted, not forgotten
    assert result["roundtrip_val_bpb"] - result["float_val_bpb"] == pytest.approx(result["quant_gap_bpb"])
    assert result["gaps"]["loop_aware"] == result["quant_gap_bpb"]
    assert result["calibration_seconds"] > 0 and 0 < result["objective_ratio"] < 1
    fresh, fresh_cfg = art.load_model(path)
    assert fresh_cfg == cfg


def test_over_budget_fails_the_run_and_keeps_the_artifact(exported, trained):
    out, result, _ = exported
    _, net, cfg, val, luts, train_paths = trained
    path = out / art.ARTIFACT_NAME
    before = path.read_bytes()
    with pytest.raises(art.OverBudgetError, match=r"over budget by [\d,]+ bytes"):
        export_run(net, cfg.replace(skip_gptq=True), out, val_tokens=val, luts=luts, train_paths=train_paths,
                   compare=False, limit=result["total_bytes"] // 2, log=lambda line: None)
    assert path.read_bytes() == before


def test_standalone_cli(trained, tmp_path, prepared_corpus, capsys):
    run_dir, _, cfg, _, _, _ = trained
    shutil.copy(run_dir / "final_model.pt", tmp_path / "final_model.pt")  # the cached run stays untouched
    args = ["--checkpoint", str(tmp_path / "final_model.pt"), "--method", "rtn", "--no-compare",
            "--data-path", str(prepared_corpus.dataset_dir), "--tokenizer-path", str(prepared_corpus.tokenizer_path),
            "--val-tokens", str(4 * cfg.eval_seq_len)]
    assert quant_main(args) == 0
    out = capsys.readouterr().out
    assert "round trip (rtn)" in out and "quantization gap" in out
    assert (tmp_path / art.ARTIFACT_NAME).is_file()
    assert quant_main(args[:-2] + ["--val-tokens", "0", "--data-path", str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err
