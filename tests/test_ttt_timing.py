"""The TTT eval timing entry (bench/ttt_timing.py) on the CPU: the synthetic stream against R1's figures, the
counts it projects with against what train.ttt.score_batch runs, the replayed queue against R1's pauses,
the fit, and the smoke of the CLI through make gpu-check's ttt part (CPU times, never GPU numbers)."""
import json
import math

import pytest
import torch

from bench import gpu_check, report as bench_report, ttt_timing as tt
from conftest import DEVICE
from train import ttt


class _R1Shapes:  # the TTT settings batch_work reads, at R1's values
    ttt_chunk_size, ttt_eval_seq_len, ttt_grad_steps = 48, 2048, 1


def _r1_docs() -> list[ttt.Doc]:
    docs, start = [], 0
    for length in tt.document_lengths(tt.R1_STREAM, 64):
        docs.append(ttt.Doc(start, length))
        start += length - 1
    return docs


def test_r1_stream_has_r1s_documents_targets_and_longest_batch():
    lengths = tt.document_lengths(tt.R1_STREAM, 64)
    assert len(lengths) == 50_000 and sum(lengths) - len(lengths) == 47_851_520 and lengths == sorted(lengths)
    assert lengths[-16] == 30_339 and lengths[-1] == 97_114 and lengths[-17] < 30_339
    batches, queue = ttt.batch_queue(_r1_docs(), 64)
    assert len(batches) == 782 and queue[0] == 781 and len(batches[781]) == 16
    # R1's pauses kept the shortest 833 / 1666 / 2500 of its 1296 / 2128 / 2960 scored documents (batches
    # 761.., 748.., 735.. by index): this stream gives 122 / 213 / 288 steps where R1 took 130 / 218 / 288
    steps = [math.ceil((sum(lengths[64 * first:64 * first + kept]) - 1) / 32768) - 1
             for first, kept in ((761, 833), (748, 1666), (735, 2500))]
    assert steps == [122, 213, 288]
    with pytest.raises(ValueError, match="log-normal body"):
        tt.document_lengths(tt.StreamSpec("short", docs=40, targets=4_000, longest=(100, 700)), 16)


def test_replayed_queue_pauses_where_r1_paused():
    """With every batch's time proportional to its padded tokens (R1's mean rate), the replayed dynamic queue
    scores 1296, 2128 and 2960 documents by its pauses, R1's logged counts."""
    docs = _r1_docs()
    batches, queue = ttt.batch_queue(docs, 64)
    work = [tt.batch_work([docs[i] for i in batches[j]], _R1Shapes) for j in queue]
    assert work[0].forwards == 2024 and work[0].adapter_rows == 16
    seconds = [w.forward_tokens * 3.6e-6 for w in work]
    entries = [(j, [docs[i].length for i in batches[j]]) for j in queue]
    clock, phases = tt.replay_queue(seconds, entries, [833, 1666, 2500], 0.13, 32768)
    assert [p["scored"] for p in phases] == [1296, 2128, 2960] and [p["trained"] for p in phases] == [833, 1666, 2500]
    assert clock >= seconds[0] + 0.13 * sum(p["steps"] for p in phases)  # the longest batch is on the path
    # by hand: 2 ranks, entries of 3, 1, 1, 1 s with one document each, a pause after 2 documents
    clock, phases = tt.replay_queue([3.0, 1.0, 1.0, 1.0], [(3, [5]), (2, [4]), (1, [3]), (0, [2])], [2], 10.0, 2, world=2)
    # rank 1 finishes entries 1 and 2 by t=2, when the count reaches 2, and pauses; rank 0 pauses after
    # entry 0 at t=3; the phase trains on the 2 shortest scored (batches 1 and 2: 3 + 4 tokens, 2 steps of
    # 2 tokens, the last chunk skipped); then rank 0 scores entry 3
    assert phases == [dict(scored=3, trained=2, steps=2)] and clock == 3.0 + 20.0 + 1.0


def test_fit_recovers_per_step_and_per_token_costs():
    features = [(2024, 3.9e7), (56, 4.5e6), (12, 2.4e5), (1, 3072)]
    seconds = [0.002 * count + 3e-6 * size for count, size in features]
    a, b = tt.fit_part(features, seconds)
    assert a == pytest.approx(0.002, rel=1e-6) and b == pytest.approx(3e-6, rel=1e-6)
    assert tt.fit_part([(10, 0), (20, 0)], [1.0, 2.0]) == pytest.approx((0.1, 0.0))  # one feature alone
    assert tt.sample_positions(782, 3) == [0, 196, 586] and tt.sample_positions(3, 8) == [0, 1, 2]


def test_batch_work_counts_what_score_batch_runs(torch_kernels_one_thread):
    """batch_work's forwards, padded tokens and training steps are score_batch's, and a batch cut to its first
    steps runs exactly that batch's first forwards."""
    cfg = tt.smoke_config("torch")
    bench = tt.TTTBench(cfg, "torch", DEVICE, tt.synthetic_stream(tt.SMOKE_STREAM, cfg.vocab_size, cfg.ttt_batch_size))
    assert len(bench.docs) == 40 and [len(b) for b in bench.batches] == [16, 16, 8] and bench.queue[0] == 2

    def record(calls):
        def forward(ids, **kw):
            calls.append((ids.clone(), torch.is_grad_enabled()))
            return bench.net(ids, **kw)
        return forward

    full, cut = [], []
    bench.forward = record(full)
    whole = bench.time_batch(0)
    bench.forward = record(cut)
    first = bench.time_batch(0, max_steps=3)
    for run, calls in ((whole, full), (first, cut)):
        work = run["work"]
        assert work["forwards"] == len(calls) and work["forward_tokens"] == sum(ids.numel() for ids, _ in calls)
        assert work["train_tokens"] == sum(ids.numel() for ids, grad in calls if grad)
        assert work["train_steps"] == sum(grad for _, grad in calls) and run["seconds"]["score_forward"] > 0
    assert whole["cut"] is False and first["cut"] is True and (whole["work"]["forwards"], len(cut)) == (6, 3)
    for (ids, grad), (ids_cut, grad_cut) in zip(full[:2], cut[:2]):
        assert torch.equal(ids, ids_cut) and grad and grad_cut
    assert cut[2][1] is False  # the cut batch's last step scores without training


def test_cli_smoke_and_its_gpu_check_part(tmp_path, monkeypatch, torch_kernels_one_thread, capsys):
    out = tmp_path / "work" / "ttt.json"
    out.parent.mkdir()
    assert tt.main(["--kernels", "torch", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    run = data["runs"]["torch"]
    assert [t["position"] for t in run["timed"]] == [0, 1, 2] and run["docs"] == 40 and run["targets"] == 6_000
    assert run["sgd_step_s"] > 0 and run["eval_clock"]["queue"] >= run["longest_batch_s"]
    assert run["even_split"]["scoring"] == pytest.approx(sum(run["even_split"][p] for p in tt.PARTS))
    printed = capsys.readouterr().out
    if DEVICE == "cpu":
        assert run["warmup_s"] is None and "CPU smoke, not GPU numbers" in run["table"]
        assert "not measured (no GPU)" in run["table"] and "no CUDA" in printed
    for part in ("| score forward |", "| adapter backward |", "| optimizer |", "| global SGD (2 steps",
                 "| compile warmup |", "| **eval clock, even split** |", "424.4", "84.4 (130+218+288 steps)"):
        assert part in run["table"], part
    monkeypatch.setattr(bench_report, "RESULTS_DIR", tmp_path)
    status, line, details = gpu_check.summarize("ttt", 0, "", tmp_path / "work", 60)
    (table,) = tmp_path.glob("ttt_*.md")  # bench/results/ttt_<gpu>.md, beside the ledger's
    assert status == "passed" and line.startswith("torch: eval clock") and line.endswith(f"table {table}")
    assert details == data["table"] and table.read_text() == data["table"]
    cmd = gpu_check.stage_command("ttt", gpu_check.parse_args([]), tmp_path)
    assert cmd[1:5] == ["-m", "bench.ttt_timing", "--preset", "frontier"] and "--max-steps" in cmd
    with pytest.raises(SystemExit):
        tt.main(["--fraction", "1.5"])
