"""The `ouroboros-frontier` presets: the crawler schedule of `ouroboros` on the frontier's stack (data, training,
quantizer, sparse gate), and `ouroboros-frontier-tiny` training, exporting and evaluating on the CPU."""
import json
import math

import pytest

import kernels
from model import from_env
from model.config import PRESETS
from model.schedule import block_schedule, describe


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


@pytest.mark.parametrize("name, model, stack", [("ouroboros-frontier", "ouroboros", "frontier"),
                                                ("ouroboros-frontier-tiny", "tiny", "frontier-tiny")])
def test_the_crawler_schedule_on_the_frontier_stack(name, model, stack):
    """The frontier stack's settings (those `ouroboros-frontier` lists, and the data paths they imply) are the
    frontier preset's; every other setting is the crawler preset's; so the block schedule is the crawler's."""
    cfg, crawler, frontier = (from_env(environ={}, preset=p).to_dict() for p in (name, model, stack))
    # test-time training is the stack's too, at the stack preset's size
    ttt_keys = {k for k in PRESETS[stack] if k.startswith(("ttt_", "phased_ttt_", "global_ttt_"))}
    stack_keys = set(PRESETS["ouroboros-frontier"]) | {"data_path", "tokenizer_path"} | ttt_keys
    assert {k for k in stack_keys if cfg[k] != frontier[k]} == set()
    assert {k for k in cfg if k not in stack_keys | {"preset"} and cfg[k] != crawler[k]} == set()
    assert cfg["swa_every"] == 0 and cfg["ema_decay"] == frontier["ema_decay"] > 0
    assert cfg["use_crawler"] == 1 and cfg["enable_looping_at"] == 0.0  # looping from the first step, as ouroboros
    a, b = (from_env(environ={}, preset=p) for p in (name, model))
    assert describe(block_schedule(a)) == describe(block_schedule(b))
    for key in ("vocab_size", "caseops_enabled", "eval_mode", "train_loader", "muon_ns", "muon_row_normalize",
                "quant_method", "compressor", "embed_bits", "lqer_enabled", "sparse_attn_gate_enabled",
                "gated_attn_quant_gate", "data_path", "tokenizer_path"):
        assert cfg[key] == frontier[key], key


def test_ouroboros_frontier_parameters():
    from train.trainer import parameter_count

    # ouroboros' 26,090,065 with the 8192-token embedding (+7168 x 512) and a sparse gate row per head and block
    assert parameter_count(from_env(environ={}, preset="ouroboros-frontier")) == 29_761_041


def test_ouroboros_frontier_tiny_trains_exports_and_evaluates_on_cpu(small_caseops_data, tmp_path):
    """Cut to a 2-block crawler model at sequence length 64 for seconds; every stack switch stays on: packed rows,
    Polar-Express MuonEq-R, EMA, the sparse gate, R1's quantizer and container, document-isolated scoring, TTT."""
    from quant.export import calibration_probe, export_run
    from train.trainer import train

    cfg = from_env(environ={}, preset="ouroboros-frontier-tiny", num_flat_layers=2, model_dim=64, num_heads=1,
                   num_kv_heads=1, bigram_vocab_size=256, bigram_dim=32, inst_dim=8, runs_dir=str(tmp_path),
                   run_id="oft", iterations=8, train_seq_len=64, train_batch_tokens=4 * 64, eval_seq_len=64,
                   eval_stride=32, eval_batch_seqs=32, val_loss_every=4, train_log_every=1, gptq_cal_samples=4,
                   gptq_cal_seq_len=64, quant_small_numel=1024, **small_caseops_data)
    summary = train(cfg, export_fn=export_run, calibration_probe=calibration_probe, echo=False)
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert summary["export"]["method"] == "frontier" and (tmp_path / "oft" / "final_model.int6.ptz").is_file()
    assert math.isfinite(summary["val_bpb"]) and abs(summary["export"]["quant_gap_bpb"]) < 0.05
    assert summary["train_losses"][-1] < summary["train_losses"][0]
    log = (tmp_path / "oft" / "train.log").read_text()
    assert "muon:polar row-normalized  loader:packed" in log and "ema:0.99" in log
    assert "final_int6_doc_isolated_exact val_loss:" in log and "final_int6_ttt_phased_exact val_loss:" in log
    assert summary["val_bpb"] == summary["export"]["ttt_val_bpb"]  # TTT's score is the run's
    assert json.loads((tmp_path / "oft" / "config.json").read_text())["preset"] == "ouroboros-frontier-tiny"
