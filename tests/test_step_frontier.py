"""The frontier preset in the step bench and the step ledger (bench/step.py, bench/flops.py, bench/ledger.py).

The analytical FLOP model of the looped, two-lane, gated, segmented model is checked against torch's own
FLOP counter (torch.utils.flop_counter) on the PyTorch path, with the loop off and on, with and without
cu_seqlens; the segment formula against hand-counted cases and the kernels' attention mask; R1's banked
Muon and the real frontier step by hand; then the frontier-tiny step, its ledger and its gpu-check part
on the CPU with both loop states.
"""
import json
import math
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model
from bench import flops, gpu_check, ledger
from bench import report as bench_report
from bench import step as bench_step
from conftest import DEVICE

FRONTIER = model.from_env(environ={}, preset="frontier")
TINY = model.from_env(environ={}, preset="frontier-tiny")
ROW = 98_304  # one rank's packed row: 786,432 / 8


@pytest.fixture
def process_group():
    """Muon's 1/8 share runs with a one-process group; leave no group behind for other tests."""
    yield
    bench_step.release_process_group()


@pytest.fixture
def counted_attention(monkeypatch):
    """The torch path's attention as a FLOP counter sees it. On the CPU, SDPA runs
    aten._scaled_dot_product_flash_attention_for_cpu, which torch.utils.flop_counter does not count (it
    reports 0), so attention runs attention_reference instead: the same dense masked T x T, as einsums
    (bmm), which the counter does count."""
    monkeypatch.setattr(sys.modules["kernels.attention"], "attention_sdpa",
                        sys.modules["kernels.attention"].attention_reference)


def _row(cfg, doc_lengths, seed=0):
    x, y, cu = bench_step.packed_batch(cfg, tuple(doc_lengths), seed)
    return x.to(DEVICE), y.to(DEVICE), cu.to(DEVICE)


# ---------------------------------------------------------------- the analytical model against the FLOP counter

@pytest.mark.parametrize("recurrence", [False, True], ids=["loop-off", "loop-on"])
@pytest.mark.parametrize("segmented", [False, True], ids=["one-sequence", "cu_seqlens"])
def test_analytic_matmul_flops_equal_the_flop_counter(recurrence, segmented, counted_attention,
                                                       torch_kernels_one_thread):
    """Forward + backward of frontier-tiny (6 blocks, 2..3 looped three times, two-lane from block 4, gated
    skips, SmearGate, attention gate) on a 96-token packed row, counted by FlopCounterMode, equals the
    analytical matmul FLOPs (every group but Muon) exactly: both count the same GEMMs, integers well below
    2^53, so the tolerance is float rounding (rel 1e-12). Attention on this path is a dense masked T x T
    whatever cu_seqlens say, so it is compared with attention_count="dense"; the causal segment formula
    is checked on its own below."""
    cfg = TINY.replace(train_seq_len=32)  # pieces of at most 32 tokens: the 96-token row is cut by both rules
    docs = flops.synthetic_document_lengths(96, 20.0, seed=3)
    x, y, cu = _row(cfg, docs)
    segments = flops.document_pieces(docs, cfg.train_seq_len)
    assert len(segments) > len(docs) >= 3  # documents, and a 32-token cut inside one of them
    torch.manual_seed(0)
    net = model.build_model(cfg).to(DEVICE)
    net.recurrence_active = recurrence
    with FlopCounterMode(display=False) as counter:
        net(x, y, cu_seqlens=cu if segmented else None).backward()
    led = flops.analytic_ledger(cfg, 1, 96, muon_world_size=1, world_size=1, recurrence_active=recurrence,
                                segments=segments if segmented else None, attention_count="dense")
    assert led.applications == (10 if recurrence else 6)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.bmm"] == pytest.approx(led.groups["attention"].flops, rel=1e-12)  # the attention einsums
    assert counter.get_total_flops() == pytest.approx(led.flops - led.groups["muon"].flops, rel=1e-12)


def test_muon_newton_schulz_flops_equal_the_flop_counter(torch_kernels_one_thread):
    """The round-robin Muon of train/muon.py on every matrix of frontier-tiny, counted: the analytical
    Newton-Schulz FLOPs (5·(4m²n + 2m³) per matrix) exactly."""
    from train.step import Optimizers

    torch.manual_seed(0)
    net = model.build_model(TINY).to(DEVICE)
    x, y, cu = _row(TINY, (40, 60, 28))
    net(x, y, cu_seqlens=cu).backward()
    optimizers = Optimizers(net, TINY, DEVICE, world_size=1)
    with FlopCounterMode(display=False) as counter:
        optimizers.muon.step()
    led = flops.analytic_ledger(TINY, 1, 128, muon_world_size=1, world_size=1, optimizer_layout="round_robin")
    assert counter.get_total_flops() == pytest.approx(led.groups["muon"].flops, rel=1e-12)
    assert len(flops.matrix_shapes(TINY)) == 36  # 6 blocks x (q, k, v, out, up, down); the SmearGate row is a scalar


# ---------------------------------------------------------------- segments

def test_segment_formula_on_hand_counted_rows():
    # a 10-token row: documents of 3 and 7 tokens, pieces of at most 4: 3 | 4, 3
    assert flops.document_pieces((3, 7), 4) == (3, 4, 3)
    assert flops.attention_forward_flops(2, 4, 1, 10, (3, 4, 3)) == 2 * 2 * 4 * (9 + 16 + 9)
    assert flops.attention_forward_flops(2, 4, 1, 10) == 2 * 2 * 4 * 100             # one causal sequence
    assert flops.attention_forward_flops(2, 4, 3, 10, count="dense") == 4 * 3 * 2 * 4 * 100
    # the real row's upper bound: 48 full 2048-token pieces
    assert flops.full_segments(ROW, 2048) == (2048,) * 48
    assert flops.full_segments(5000, 2048) == (2048, 2048, 904)
    with pytest.raises(ValueError, match="attention count 'flash'"):
        flops.attention_forward_flops(2, 4, 1, 10, count="flash")


def test_segments_are_the_trainers_and_the_masks():
    """The pieces the ledger assumes are the segments train.data.document_segments cuts from the synthetic row,
    and the causal count is the kernels' own attention mask: Σ L² = 2·(visible query-key pairs) - T, since a
    segment of L tokens has L(L + 1)/2 of them."""
    from kernels.attention import _visible

    docs = flops.synthetic_document_lengths(600, 40.0, seed=5)
    assert sum(docs) == 600 and min(docs) >= 1 and len(docs) > 4 and max(docs) > 64  # some cut at 64 too
    x, _, cu = bench_step.packed_batch(TINY.replace(train_seq_len=64), docs)
    bos = (x[0] == 1).nonzero().flatten().tolist()
    assert bos == list(torch.tensor(docs[:-1]).cumsum(0))   # BOS at every start but the row's first (a tail)
    offsets = cu.tolist()
    assert len(offsets) % 64 == 0 and offsets[0] == 0 and offsets[-1] == 600
    pieces = tuple(b - a for a, b in zip(offsets, offsets[1:]) if b > a)
    assert pieces == flops.document_pieces(docs, 64) and max(pieces) <= 64
    visible = int(_visible(600, cu, "cpu").sum())
    assert sum(n * n for n in pieces) == 2 * visible - 600
    H, hd = 8, 64
    assert flops.attention_forward_flops(H, hd, 1, 600, pieces) == 2 * H * hd * (2 * visible - 600)


def test_synthetic_documents_spread_and_the_upper_bound():
    docs = flops.synthetic_document_lengths(ROW)
    assert docs == flops.synthetic_document_lengths(ROW) and docs != flops.synthetic_document_lengths(ROW, seed=1)
    assert sum(docs) == ROW and min(docs) >= 1
    middle = docs[1:-1]  # whole documents
    assert 700 < sum(middle) / len(middle) < 1250 and min(middle) >= 2  # mean 957 by construction, ~100 draws
    assert sorted(middle)[len(middle) // 2] < sum(middle) / len(middle)  # log-normal: the median below the mean
    bound = sum(n * n for n in flops.full_segments(ROW, 2048))
    for seed in range(5):
        pieces = flops.document_pieces(flops.synthetic_document_lengths(ROW, seed=seed), 2048)
        assert sum(pieces) == ROW and sum(n * n for n in pieces) < bound
    with pytest.raises(ValueError, match="mean_tokens=1"):
        flops.synthetic_document_lengths(100, 1)


# ---------------------------------------------------------------- the real frontier step, by hand

def test_frontier_ledger_by_hand():
    full = flops.full_segments(ROW, 2048)
    off = flops.analytic_ledger(FRONTIER, 1, ROW, recurrence_active=False, segments=full)
    on = flops.analytic_ledger(FRONTIER, 1, ROW, recurrence_active=True, segments=full)
    assert (off.applications, on.applications) == (11, 17) and off.optimizer_layout == on.optimizer_layout == "banked"
    d, kv, hidden, V = 512, 256, 2048, 8192
    per_slot = 2 * d * d + 2 * d * kv + 2 * d * hidden + 12 * 8  # q, out, k, v, up, down; the attention gate 12 -> 8
    assert per_slot == 2_883_680
    attention = 6 * 8 * 64 * 48 * 2048 ** 2  # causal within 48 full pieces, per application
    smear = 6 * (ROW - 1) * 12
    for led, apps in ((off, 11), (on, 17)):
        expected = 6 * ROW * (apps * per_slot + d * V) + smear + apps * attention
        assert led.flops - led.groups["muon"].flops == pytest.approx(expected, rel=1e-12)
        assert led.groups["attention"].flops == pytest.approx(apps * attention, rel=1e-12)
        assert led.parts["gates"].flops == pytest.approx(apps * 6 * ROW * 12 * 8 + smear, rel=1e-12)
    # Two-lane slots (8, 9, 10) move more bytes than sequential ones; the loop adds six sequential slots
    seq_bytes, lane_bytes = 3 * (ROW * d * 36 + 4 * ROW * (d + kv)), 3 * (ROW * d * 40 + 4 * ROW * (d + kv))
    skip, lanes_mean = 3 * 12 * ROW * d, 3 * 12 * ROW * d
    assert off.groups["norms_elementwise"].hbm_bytes == pytest.approx(8 * seq_bytes + 3 * lane_bytes + 5 * skip + lanes_mean)
    assert on.groups["norms_elementwise"].hbm_bytes == pytest.approx(14 * seq_bytes + 3 * lane_bytes + 8 * skip + lanes_mean)


def test_frontier_banked_muon_and_communication_by_hand():
    """R1's Muon: 66 matrices in 4 banks padded to 24/24/16/16, each rank Newton-Schulz on 3 + 3 + 2 + 2 slices;
    bf16 reduce-scatter + all-gather of the padded banks, tok_emb bf16 and the scalars fp32 all-reduced."""
    assert flops.bank_shapes(FRONTIER) == [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
    counts = flops.parameter_counts(FRONTIER)
    assert counts == {"matrix": 31_719_424, "embed": 4_194_304, "scalar": 31_943}
    assert sum(counts.values()) == 35_945_671

    def ns(r, c):
        m, n = min(r, c), max(r, c)
        return 5 * (4 * m * m * n + 2 * m ** 3)
    led = flops.analytic_ledger(FRONTIER, 1, ROW)
    assert led.groups["muon"].flops == 3 * ns(512, 512) + 3 * ns(256, 512) + 2 * ns(2048, 512) + 2 * ns(512, 2048)
    padded = 24 * 512 * 512 + 24 * 256 * 512 + 16 * 2048 * 512 + 16 * 512 * 2048
    muon_link = 2 * 7 / 8 * 2 * padded
    assert led.parts["muon_communication"].link_bytes == pytest.approx(muon_link, rel=1e-12)
    assert led.groups["communication"].link_bytes == pytest.approx(
        muon_link + 2 * 7 / 8 * (2 * 4_194_304 + 4 * 31_943), rel=1e-12)
    assert led.parts["adamw"].hbm_bytes == 14 * 4_194_304 + 28 * 31_943
    one_rank = flops.analytic_ledger(FRONTIER, 1, ROW, muon_world_size=1)
    assert one_rank.groups["communication"].link_bytes == 0  # no peer: nothing crosses NVLink
    assert one_rank.groups["muon"].flops == 22 * ns(512, 512) + 22 * ns(256, 512) + 11 * ns(2048, 512) + 11 * ns(512, 2048)
    # the crawler keeps train/muon.py's round robin; either layout can be asked for
    assert flops.analytic_ledger(model.from_env(environ={}, preset="ouroboros"), 48, 2048).optimizer_layout == "round_robin"
    with pytest.raises(ValueError, match="optimizer_layout='zero'"):
        flops.analytic_ledger(FRONTIER, 1, ROW, optimizer_layout="zero")
    with pytest.raises(ValueError, match="segments sum to 10, not seq_len=98304"):
        flops.analytic_ledger(FRONTIER, 1, ROW, segments=(4, 6))


def test_run_mean_follows_the_switch_and_reproduces_r1():
    # R1: ~96 ms unlooped for 35 % of 599.5 s, ~140 ms looped for the rest: 120.6 ms mean, ~4,970 steps;
    # it measured 121.7 ms (3 seeds) and 4,945 steps (seed 42)
    mean = flops.mean_step_ms(96.0, 140.0)
    assert mean == pytest.approx(1 / (0.35 / 96 + 0.65 / 140)) and 119.5 < mean < bench_step.R1_MEAN_MS
    assert abs(599.5e3 / mean - bench_step.R1_SEED42["steps"]) / bench_step.R1_SEED42["steps"] < 0.01
    assert flops.mean_step_ms(96.0, 140.0, 0.0) == pytest.approx(140.0)
    assert flops.mean_step_ms(96.0, 140.0, 1.0) == pytest.approx(96.0)
    with pytest.raises(ValueError, match="enable_looping_at=1.5"):
        flops.mean_step_ms(96.0, 140.0, 1.5)
    run = ledger.looped_run(FRONTIER, ROW, flops.full_segments(ROW, 2048), 8, 0.35)
    off, on = (led.ideal_ms(flops.ACHIEVABLE_TFLOPS, flops.ACHIEVABLE_TBPS) for led in (run.off, run.on))
    ideal = run.mean_ms(flops.ACHIEVABLE_TFLOPS, flops.ACHIEVABLE_TBPS)
    assert off < ideal < on and 1.3 < on / off < 1.7  # R1 measured ~140 / 96 = 1.46
    assert ideal < bench_step.GOAL_MEAN_MS < bench_step.R1_MEAN_MS  # the goal is above the ideal, below R1
    shares = [run.run_percent(run.off.groups[g], run.on.groups[g]) for g in flops.GROUPS]
    assert sum(shares) == pytest.approx(100.0)
    documents = flops.document_pieces(flops.synthetic_document_lengths(ROW), 2048)
    realistic = ledger.looped_run(FRONTIER, ROW, documents, 8, 0.35)
    assert realistic.on.groups["attention"].flops < run.on.groups["attention"].flops  # full pieces bound it
    assert realistic.on.groups["mlp"].flops == run.on.groups["mlp"].flops


def test_reference_lines_state_goals_and_measure_only_a_gpu_number():
    lines = bench_step.reference_lines()
    text = "\n".join(lines)
    assert "121.7 ms/step" in text and "4,945 steps in 599.5 s" in text and "41,717 MiB" in text
    assert "<= 100 ms/step mean on 8 x H100" in text and lines[-1].endswith("not measured (no GPU).")
    measured = bench_step.reference_lines(110.0, 40_000.0, "NVIDIA H100 80GB HBM3")[-1]
    assert "110.00 ms/step run mean = 1.100 x the goal, 0.904 x R1" in measured and "0.959 x the goal" in measured


# ---------------------------------------------------------------- the adapter to the trainer's batch

# ---------------------------------------------------------------- frontier-tiny's step on the CPU

def test_frontier_tiny_step_walks_both_plans_with_the_rows_segments(process_group, torch_kernels_one_thread):
    docs = flops.synthetic_document_lengths(256, bench_step.SMOKE_MEAN_DOC_TOKENS)
    run = bench_step.build_step(TINY, "torch", DEVICE, doc_lengths=docs)
    assert (run.batch_seqs, run.seq_len, run.tokens) == (1, 256, 256)
    assert run.segments == flops.document_pieces(docs, 256) and len(run.segments) > 3
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(args[3]))
               for m in run.net.modules() if isinstance(m, model.blocks.Attention)]
    try:
        for active, applications in ((False, 6), (True, 10)):
            run.set_recurrence(active)
            calls.clear()
            loss = run.run()
            assert run.recurrence_active is active and math.isfinite(loss)
            assert len(calls) == applications and all(cu is run.cu_seqlens for cu in calls)
    finally:
        for h in handles:
            h.remove()
    runs = bench_step.recurrence_runs(run, steps=2, warmup_steps=0)
    assert runs["mean_ms"] == pytest.approx(flops.mean_step_ms(runs["off"]["ms_median"], runs["on"]["ms_median"]))
    assert run.recurrence_active is True  # left on, as the trainer leaves it
    with pytest.raises(ValueError, match="a packed row is one sequence"):
        bench_step.build_step(TINY, "torch", DEVICE, batch_seqs=2, doc_lengths=docs)
    assert bench_step.packed_row_tokens(FRONTIER) == ROW and bench_step.packed_row_tokens(TINY) == 256


def test_frontier_step_command_reports_both_states_and_the_gpu_check_part(tmp_path, monkeypatch, process_group,
                                                                          torch_kernels_one_thread):
    out = tmp_path / "work" / "step.json"
    out.parent.mkdir()
    assert bench_step.main(["--preset", "frontier", "--kernels", "torch", "--steps", "2", "--warmup-steps", "0",
                            "--seq-len", "256", "--no-compile", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    off, on = data["runs"]["torch, recurrence off"], data["runs"]["torch, recurrence on"]
    assert data["tokens_per_step"] == 256 and data["segments"]["count"] > 1
    assert off["flops_per_step"] < on["flops_per_step"]  # the loop adds block applications
    summary = data["frontier"]["torch"]
    assert summary["mean_ms"] == pytest.approx(flops.mean_step_ms(off["ms_median"], on["ms_median"]))
    if DEVICE == "cpu":
        assert data["preset"] == "frontier-tiny" and summary["reference"][-1].endswith("not measured (no GPU).")
        assert "goal_ratio" not in summary
    monkeypatch.setattr(bench_report, "RESULTS_DIR", tmp_path)
    status, line, details = gpu_check.summarize("frontier", 0, "", tmp_path / "work", 80)
    assert status == "passed" and "torch, recurrence off: " in line and "torch run mean" in line
    assert "| torch, recurrence on |" in details and "121.7 ms/step" in details
    cmd = gpu_check.stage_command("frontier", gpu_check.parse_args([]), tmp_path)
    assert cmd[1:5] == ["-m", "bench.step", "--preset", "frontier"] and cmd[-2:] == ["--kernels", "triton"]
    for bad in (["--batch-seqs", "2"], ["--enable-looping-at", "1.5"]):
        with pytest.raises(SystemExit):
            bench_step.main(["--preset", "frontier", *bad])


def test_frontier_ledger_command(tmp_path, process_group, torch_kernels_one_thread):
    table = tmp_path / "ledger.md"
    assert ledger.main(["--preset", "frontier", "--steps", "1", "--out", str(table)]) == 0
    text = table.read_text()
    assert "one packed row of 98,304 tokens per GPU" in text and "48 segments of at most 2048 tokens" in text
    assert "### recurrence off: 11 block applications" in text and "### recurrence on: 17 block applications" in text
    assert "Muon all in: Newton-Schulz, update and its communication" in text and "*AdamW (in other)*" in text
    assert "121.7 ms/step" in text and "<= 100 ms/step" in text
    if DEVICE == "cpu":
        assert "`frontier-tiny`, one packed row of 256 tokens" in text and "not measured (no GPU)" in text
        assert text.count("torch.profiler self CPU time") == 2  # one measured table per loop state
    documents = tmp_path / "documents.md"
    assert ledger.main(["--preset", "frontier", "--analytic-only", "--segments", "documents", "--out",
                        str(documents)]) == 0
    assert "log-normal lengths of mean 957 tokens" in documents.read_text()
    assert "## Measured" not in documents.read_text()
