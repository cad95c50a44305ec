"""Calibration through the Triton GPTQ kernel (kernels.gptq_quantize_layer on the triton backend) against
the reference path, on the trained `tiny` model (the tiny_run fixture), by loop-aware GPTQ as the export runs it.

Bars: the codes as tests/test_gptq.py states them (per layer at most 0.1% off by one, none by more), and
the round-trip val_bpb within 1e-4 of the reference path's. Under the interpreter the kernel costs ~5 ms
per program and column (all 60 int6 matrices: ~15,600 of them, minutes on a shared CPU), so only the
crawler's MLP matrices (768x128, 128x768) are int6 here: QUANT_SMALL_NUMEL = 128·384 stores every
smaller matrix as fp16 (loop-aware's phase 2 then re-collects the crawler's Hessians over float flat blocks).
"""
import pytest
import sentencepiece as spm
import torch

import kernels
import kernels.gptq
import model
from quant.calibrate import Calibrator
from quant.export import calibration_tokens, evaluate_final
from quant.scheme import dequantize_state_dict
from train.data import load_val_tokens, shard_paths
from train.evaluate import build_byte_luts

from test_gptq import compare_codes

CRAWLER_MLP_ONLY_SMALL_NUMEL = 128 * 384  # the tiny model's flat MLP matrices; the crawler's are 128 * 768
MAX_BPB_DIFF = 1e-4
VAL_WINDOWS = 32  # of the val shard's ~180 windows: the same tokens on both paths, and ~4x cheaper


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    kernels.set_backend(None)


def _torch_forward(net):
    """The calibration forward on the torch backend whichever is active: the Hessians are then the same on
    both paths, so a difference in the codes can only be GPTQ's."""
    def forward(batch):
        active = kernels.backend()
        kernels.set_backend("torch")
        try:
            net(batch)
        finally:
            kernels.set_backend(active)
    return forward


def _round_trip_bpb(quantized: dict, cfg, val, luts) -> float:
    net = model.build_model(cfg)
    net.load_state_dict(dequantize_state_dict(quantized), strict=True)
    kernels.set_backend("torch")
    return evaluate_final(net, cfg, val, luts, torch.device("cpu"))[1]


def test_calibration_through_the_triton_kernel_matches_the_reference_path(tiny_run, prepared_corpus, monkeypatch):
    net = model.load_checkpoint(tiny_run / "final_model.pt")
    cfg = net.config.replace(quant_small_numel=CRAWLER_MLP_ONLY_SMALL_NUMEL)
    batches = [calibration_tokens(shard_paths(prepared_corpus.dataset_dir, "train"), cfg)]

    kernels.set_backend("torch")
    want, want_stats = Calibrator(net, cfg, _torch_forward(net), batches).quantize("loop_aware")

    launched = []
    triton_entry = kernels.gptq.quantize_layer_triton

    def counted(weight, *args, **kwargs):
        launched.append(tuple(weight.shape))
        return triton_entry(weight, *args, **kwargs)

    monkeypatch.setattr(kernels.gptq, "quantize_layer_triton", counted)
    kernels.set_backend("triton")
    calibrator = Calibrator(net, cfg, _torch_forward(net), batches)
    got, stats = calibrator.quantize("loop_aware")
    crawler = [n for n in calibrator.layers if n.startswith("crawler_blocks.")]
    assert crawler == calibrator.layers and len(crawler) == 2
    assert launched == [(768, 128), (128, 768)]  # loop-aware quantizes the crawler once, with phase 2's Hessians

    assert set(got) == set(want)
    for layer in calibrator.layers:
        name = f"{layer}.weight"
        compare_codes(got[name].codes, want[name].codes, name)
        assert torch.equal(got[name].scale, want[name].scale), name
        assert stats["objective"][layer]["quantized"] == pytest.approx(
            want_stats["objective"][layer]["quantized"], rel=0.01), layer

    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=str(prepared_corpus.tokenizer_path)), cfg.vocab_size)
    val = load_val_tokens(shard_paths(prepared_corpus.dataset_dir, "val"), cfg.eval_seq_len)
    val = val[:VAL_WINDOWS * cfg.eval_seq_len + 1]
    bpb, want_bpb = _round_trip_bpb(got, cfg, val, luts), _round_trip_bpb(want, cfg, val, luts)
    print(f"round-trip val_bpb: kernel path {bpb:.6f}, reference path {want_bpb:.6f}")
    assert abs(bpb - want_bpb) <= MAX_BPB_DIFF, (bpb, want_bpb)
