"""The start-up self-test (kernels/selftest.py) and its fallback, on the Triton interpreter with KERNELS=triton.

Broken kernels are planted by monkeypatching a family's `<op>_triton`: one that returns wrong numbers,
one that raises. The ops that fail move to their PyTorch path for the process (kernels.use_reference);
a fixture puts every op back afterwards so no other test sees an override.
"""
import importlib
import json
import math

import pytest
import torch

import kernels
from kernels import selftest
from kernels.int6 import QuantLinear, int6_matmul_torch
from kernels.mlp import mlp_reference
from kernels.norm import rms_norm_reference
from kernel_checks import assert_same_losses, tiny_config, train_tiny_losses
from train import trainer
from test_train import env_vars, small_config

from conftest import DEVICE, SMALL

ALL_OPS = selftest.TRAINING_OPS + selftest.QUANT_OPS
RUN_OPS = selftest.TRAINING_OPS + selftest.CALIBRATION_OPS  # what a training run with GPTQ checks
# test_train.py's 2-block model, without its run settings.
SMALL_MODEL = {k: SMALL[k] for k in ("model_dim", "num_heads", "num_kv_heads", "num_flat_layers", "crawler_loops",
                                     "bigram_vocab_size", "bigram_dim", "inst_dim")}


@pytest.fixture(autouse=True)
def triton_backend():
    """KERNELS=triton for the test; afterwards the environment's backend and no op moved to its reference."""
    kernels.set_backend("triton")
    yield
    for op in {case.op for case in selftest.CASES} | set(selftest.CODE_CHECKS):
        kernels.use_reference(op, None)
    kernels.set_backend(None)


def plant(monkeypatch, family, op, broken):
    """Replace kernels.<family>.<op>_triton with broken(real) for this test."""
    module = importlib.import_module(f"kernels.{family}")
    monkeypatch.setattr(module, f"{op}_triton", broken(getattr(module, f"{op}_triton")))


def wrong_numbers(real):
    def entry(*args, **kwargs):
        out = real(*args, **kwargs)
        return tuple(1.01 * t for t in out) if isinstance(out, tuple) else 1.01 * out
    return entry


def raises(real):
    def entry(*args, **kwargs):
        raise RuntimeError("planted launch failure\nsecond line of the message")
    return entry


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "kernels" and r.levelname == "WARNING"]


def test_every_op_passes_and_the_record_says_triton(caplog):
    paths = selftest.run(DEVICE, ALL_OPS, strict=True)
    assert paths == {op: "triton" for op in ALL_OPS}
    assert not _warnings(caplog)
    assert selftest.record_line(paths).startswith("kernels: mlp:triton  attention:triton")


def test_torch_backend_runs_nothing(monkeypatch):
    kernels.set_backend("torch")
    monkeypatch.setattr(selftest, "check_case", lambda *a, **k: pytest.fail("the self-test ran on KERNELS=torch"))
    assert selftest.run(DEVICE, ALL_OPS) == {op: "torch" for op in ALL_OPS}


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match=r"no self-test for \['gemm'\]"):
        selftest.run(DEVICE, ("mlp", "gemm"))


def test_broken_kernels_fall_back_with_one_warning_each(monkeypatch, caplog):
    plant(monkeypatch, "mlp", "mlp", wrong_numbers)
    plant(monkeypatch, "norm", "rms_norm", raises)
    paths = selftest.run(DEVICE, ("mlp", "rms_norm", "add_norm"))

    assert paths["add_norm"] == "triton"
    assert paths["mlp"].startswith("torch (self-test: fp32: y: rms error ") and "bar" in paths["mlp"]
    assert paths["rms_norm"] == ("torch (self-test: fp32: raised RuntimeError: planted launch failure "
                                 "second line of the message)")
    lines = _warnings(caplog)
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    mlp_line, norm_line = lines
    assert mlp_line.startswith("kernels: mlp failed its start-up self-test in fp32: y: rms error ")
    assert "max error" in mlp_line and "PyTorch path" in mlp_line
    assert norm_line.startswith("kernels: rms_norm failed its start-up self-test in fp32: raised RuntimeError: planted")

    # The dispatch now calls the references: the planted kernels are never reached again.
    gen = torch.Generator().manual_seed(3)
    x, w_up, w_down = (torch.randn(5, 16, generator=gen), torch.randn(32, 16, generator=gen),
                       torch.randn(16, 32, generator=gen))
    x, w_up, w_down = x.to(DEVICE), w_up.to(DEVICE), w_down.to(DEVICE)
    assert torch.equal(kernels.mlp(x, w_up, w_down, 0.5), mlp_reference(x, w_up, w_down, 0.5))
    assert torch.equal(kernels.rms_norm(x, 0.5), rms_norm_reference(x, 0.5))
    assert not kernels.uses_triton("mlp") and kernels.uses_triton("add_norm")
    assert selftest.record(("mlp", "add_norm")) == {"mlp": paths["mlp"], "add_norm": "triton"}


def test_a_broken_int6_kernel_moves_quant_linear_to_its_torch_path(monkeypatch):
    plant(monkeypatch, "int6", "int6_matmul", wrong_numbers)
    assert selftest.run(DEVICE, selftest.QUANT_OPS)["int6_matmul"].startswith("torch (self-test: fp32: y:")
    gen = torch.Generator().manual_seed(4)
    layer = QuantLinear.from_codes(torch.randint(-32, 32, (6, 20), generator=gen, dtype=torch.int8),
                                   torch.rand(6, generator=gen) / 31).to(DEVICE)
    x = torch.randn(3, 20, generator=gen).to(DEVICE)
    assert torch.equal(layer(x), int6_matmul_torch(x, layer.packed, layer.scale, 20))


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_strict_makes_a_failure_an_error(monkeypatch, how):
    plant(monkeypatch, "norm", "add_norm", wrong_numbers)
    if how == "environment":
        monkeypatch.setenv(selftest.STRICT_ENV, "1")
    with pytest.raises(selftest.SelfTestFailed) as failed:
        selftest.run(DEVICE, ("rms_norm", "add_norm"), **({"strict": True} if how == "argument" else {}))
    message = str(failed.value)
    assert "\n" not in message and message.startswith("kernels: add_norm failed its start-up self-test in fp32: ")
    assert message.endswith("(KERNELS_STRICT=1)")
    assert kernels.uses_triton("add_norm")  # an error, not a fallback


def test_tiny_model_with_broken_kernels_trains_as_torch_after_the_self_test(monkeypatch):
    plant(monkeypatch, "mlp", "mlp", wrong_numbers)
    plant(monkeypatch, "attention", "attention", raises)
    paths = selftest.run(DEVICE)
    assert [op for op, path in paths.items() if path != "triton"] == ["mlp", "attention"]
    # The tiny preset cut to two narrow blocks, with plain SGD: seconds under the interpreter (Muon's
    # Newton-Schulz alone would take longer than the kernels).
    cfg = tiny_config(**{**SMALL_MODEL, "train_seq_len": 64, "train_batch_tokens": 128, "iterations": 3})
    torch_losses = train_tiny_losses("torch", cfg, optimizer="sgd")
    triton_losses = train_tiny_losses("triton", cfg, optimizer="sgd")  # working kernels on Triton, broken on torch
    assert_same_losses(triton_losses, torch_losses, rel_tol=1e-5)


# The trainer's hook. A training run with interpreted kernels takes over a minute (each step and each
# validation through the interpreter), so these run the PyTorch path with the self-test stubbed: the stub
# moves rms_norm to its reference as a real failure would; the self-test itself is tested above.

def _stub_failing(op):
    def run(device, ops=selftest.TRAINING_OPS, *, strict=None):
        # a calibrated QUANT_METHOD (the tiny preset's loop_aware) adds GPTQ for the export step
        assert tuple(ops) == RUN_OPS and torch.device(device).type == DEVICE
        kernels.use_reference(op, "self-test: fp32: planted")
        return selftest.record(ops)
    return run


def test_trainer_runs_the_self_test_and_records_the_paths(monkeypatch, small_data, tmp_path):  # noqa: F811
    kernels.set_backend("torch")
    monkeypatch.setattr(selftest, "run", _stub_failing("rms_norm"))
    summary = trainer.train(small_config(small_data, tmp_path, "selftest", iterations=2, eval_stride=64), echo=False)
    expected = {op: "torch" for op in RUN_OPS}
    expected["rms_norm"] = "torch (self-test: fp32: planted)"
    assert summary["kernels"] == expected
    assert json.loads((tmp_path / "selftest" / "summary.json").read_text())["kernels"] == expected
    log = (tmp_path / "selftest" / "train.log").read_text().splitlines()
    record = next(i for i, line in enumerate(log) if line.startswith("kernels: "))
    assert log[record].startswith(selftest.record_line(expected) + "  (self-test ")
    assert not any(line.startswith("step:") for line in log[:record])  # before the first step
    assert len(summary["train_losses"]) == 2 and all(map(math.isfinite, summary["train_losses"]))


def test_strict_failure_exits_1_with_one_line(monkeypatch, small_data, tmp_path, capsys):  # noqa: F811
    import train.__main__ as entry

    def failing(device, ops=selftest.TRAINING_OPS, *, strict=None):
        raise selftest.SelfTestFailed("kernels: mlp failed its start-up self-test in fp32: planted (KERNELS_STRICT=1)")

    for key, value in env_vars(small_config(small_data, tmp_path, "strict")).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setattr(selftest, "run", failing)
    assert entry.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "error: kernels: mlp failed its start-up self-test in fp32: planted (KERNELS_STRICT=1)"
    assert not (tmp_path / "strict" / "summary.json").exists()


def test_under_ddp_an_op_that_failed_on_any_rank_moves_on_every_rank(monkeypatch):
    """Rank 0's kernels pass, rank 1's mlp failed: rank 0 moves mlp too, so every rank runs the same maths."""
    theirs = {op: "triton" for op in selftest.TRAINING_OPS}
    theirs["mlp"] = "torch (self-test: bf16: dx: rms error 1e-1 (bar 1e-3))"
    monkeypatch.setattr(selftest, "run", lambda device, ops: selftest.record(ops))

    def all_gather_object(every, mine):
        every[:] = [mine, theirs]
    monkeypatch.setattr(trainer.dist, "all_gather_object", all_gather_object)
    paths = trainer.selftest_kernels(trainer.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device(DEVICE)))
    assert paths["mlp"] == "torch (rank 1: self-test: bf16: dx: rms error 1e-1 (bar 1e-3))"
    assert not kernels.uses_triton("mlp")
    assert all(paths[op] == "triton" for op in selftest.TRAINING_OPS if op != "mlp")


def test_gptq_is_checked_and_a_broken_gptq_kernel_falls_back(monkeypatch, caplog):
    """Calibration's GPTQ (kernels.gptq_quantize_layer) passes the self-test; planted wrong codes move it to
    the reference, which the dispatcher then runs."""
    import kernels
    from kernels import gptq, selftest

    kernels.set_backend("triton")
    try:
        assert selftest.run(DEVICE, selftest.CALIBRATION_OPS) == {"gptq_quantize_layer": "triton"}
        monkeypatch.setattr(gptq, "quantize_layer_triton", lambda w, h, s, **kw: torch.zeros_like(w, dtype=torch.int8))
        with caplog.at_level("WARNING", logger="kernels"):
            paths = selftest.run(DEVICE, selftest.CALIBRATION_OPS)
        assert paths["gptq_quantize_layer"].startswith("torch (self-test: fp32: codes: ")
        assert len([r for r in caplog.records if "gptq_quantize_layer failed" in r.getMessage()]) == 1
        w = torch.randn(8, 16, device=DEVICE)
        h = torch.eye(16, device=DEVICE)
        scale = (w.abs().amax(1) / 31).half().float()
        opts = dict(block_size=8, damping=0.01, order="none", inverse="cholesky")
        assert torch.equal(kernels.gptq_quantize_layer(w, h, scale, **opts), gptq.quantize_layer_reference(w, h, scale, **opts))
    finally:
        kernels.set_backend(None)
