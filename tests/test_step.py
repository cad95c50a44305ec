"""The training-step bench (bench/step.py), the step ledger (bench/ledger.py, bench/flops.py) and the eval
timing entry (bench/eval_timing.py): analytical counts against hand-computed numbers, the profiler grouping
on the tiny preset, and the step itself (Muon's 1/8 share, timing, bad input)."""
import math

import pytest
import torch

import kernels
import model
from bench import eval_timing, flops, ledger, step as bench_step
from bench.flops import GROUPS
from conftest import DEVICE
from train.step import TrainStep

REAL = model.from_env(environ={}, preset="ouroboros")
B, T, D = 48, 2048, 512
TOKENS = B * T  # 98,304 per GPU


@pytest.fixture
def process_group():
    """Muon's 1/8 share runs with a one-process group; leave no group behind for other tests."""
    yield
    bench_step.release_process_group()


# ---------------------------------------------------------------- analytical model, by hand

def _hand_matmul_params_per_token() -> int:
    flat_block = 512 * 512 + 256 * 512 + 256 * 512 + 512 * 512 + 512 * 1536 + 1536 * 512   # q, k, v, out, fc, proj
    crawler = 512 * 512 + 256 * 512 + 256 * 512 + 512 * 512 + 512 * 3072 + 3072 * 512
    bigram, inst, head = 128 * 512, 2 * (512 * 32 + 32 * 512), 512 * 1024
    assert flat_block == 2_359_296 and crawler == 3_932_160
    return 9 * flat_block + 2 * crawler + bigram + inst + head


def test_model_flops_are_6N_plus_causal_attention_by_hand():
    params = _hand_matmul_params_per_token()
    assert params == 29_753_344
    attention_per_token = 6 * 11 * T * D  # causal: half of the 12·L·T·d non-causal figure
    expected = 6 * params * TOKENS + attention_per_token * TOKENS
    led = flops.analytic_ledger(REAL, B, T)
    model_flops = led.flops - led.groups["muon"].flops
    assert model_flops == pytest.approx(expected, rel=1e-12)
    assert flops.model_flops_per_token(REAL, T) * TOKENS == pytest.approx(expected, rel=1e-12)
    assert led.groups["mlp"].flops == pytest.approx(12 * TOKENS * D * (9 * 1536 + 2 * 3072), rel=1e-12)
    assert led.groups["attention"].flops == pytest.approx(11 * 6 * B * 8 * T * T * 64, rel=1e-12)
    assert led.groups["embed_head_ce"].flops == pytest.approx(6 * TOKENS * D * 1024, rel=1e-12)
    # SPEC 6: ~195 TFLOP per 8-GPU step, ~24 per GPU.
    assert 185e12 < 8 * model_flops < 205e12
    assert 23e12 < led.flops < 25.5e12


def test_muon_newton_schulz_flops_by_hand_and_the_rank_share():
    shapes = 9 * [(512, 512), (256, 512), (256, 512), (512, 512), (1536, 512), (512, 1536)] + \
        [(512, 512), (256, 512), (256, 512), (512, 512), (3072, 512), (512, 3072), (512, 128), (32, 512)] + 2 * [(512, 32)]

    def ns(r, c):
        m, n = min(r, c), max(r, c)
        return 5 * (4 * m * m * n + 2 * m ** 3)
    every = flops.analytic_ledger(REAL, B, T, muon_world_size=1)
    assert sorted(flops.matrix_shapes(REAL)) == sorted(shapes)
    assert every.groups["muon"].flops == pytest.approx(sum(ns(r, c) for r, c in shapes), rel=1e-12)
    share = flops.analytic_ledger(REAL, B, T, muon_world_size=8)
    mine = [s for i, s in enumerate(flops.matrix_shapes(REAL)) if i % 8 == 0]
    assert len(mine) == 8
    assert share.groups["muon"].flops == pytest.approx(sum(ns(r, c) for r, c in mine), rel=1e-12)
    # 8 GPUs at once: NVLink all-reduce of fp32 grads and the bf16 Muon buffer, 2·7/8 of each per GPU.
    counts = flops.parameter_counts(REAL)
    expected_link = 2 * 7 / 8 * (4 * sum(counts.values()) + 2 * counts["matrix"])
    assert share.groups["communication"].link_bytes == pytest.approx(expected_link, rel=1e-12)
    assert every.groups["communication"].link_bytes == pytest.approx(2 * 7 / 8 * 4 * sum(counts.values()), rel=1e-12)


def test_ideal_time_is_the_roofline_of_each_group():
    led = flops.analytic_ledger(REAL, B, T)
    mlp = led.groups["mlp"]
    hand_bytes = sum(3 * 2 * (TOKENS * k + k * m + TOKENS * m)
                     for h in 9 * [1536] + 2 * [3072] for k, m in ((D, h), (h, D)))
    assert mlp.hbm_bytes == pytest.approx(hand_bytes, rel=1e-12)
    assert mlp.ideal_ms(989.0, 3.35) == pytest.approx(1e3 * max(mlp.flops / 989e12, hand_bytes / 3.35e12), rel=1e-12)
    for grp in GROUPS:
        c = led.groups[grp]
        assert c.ideal_ms(798.0, 3.0) >= c.ideal_ms(989.0, 3.35) >= 0
    total = led.ideal_ms(989.0, 3.35)
    assert total == pytest.approx(sum(c.ideal_ms(989.0, 3.35) for c in led.groups.values()), rel=1e-12)
    # At least the compute floor of the whole step, and below the original's 100.85 ms/step.
    assert led.flops / 989e12 * 1e3 < total < 100.85


# ---------------------------------------------------------------- the measured ledger on the tiny preset

def test_profiler_grouping_covers_every_op_and_attributes_backward(process_group):
    from torch.profiler import profile

    cfg = bench_step.smoke_config()
    run = bench_step.build_step(cfg, "torch", DEVICE, batch_seqs=2, seq_len=32, compile_model=False)
    with ledger.instrumented(run.net):
        run.run()  # warm-up outside the profile
        with profile() as prof:
            run.run()
    events = prof.events()
    assigned = ledger.assign_groups(events)
    assert len(assigned) == len(events) and all(g in GROUPS for _, g in assigned)
    use_device = DEVICE == "cuda"
    times = ledger.group_events(events, use_device)
    on_device = [e.device_type != torch.autograd.DeviceType.CPU for e in events]
    own = sum(e.time_range.elapsed_us() if use_device else e.self_cpu_time_total
              for e, dev in zip(events, on_device) if dev == use_device)
    assert sum(times.values()) == pytest.approx(own, rel=1e-9)
    for grp in ("attention", "mlp", "other_linears", "muon", "embed_head_ce", "norms_elementwise", "communication"):
        assert times[grp] > 0, f"no time in group {grp}: {times}"

    def groups_of(word):
        return {g for e, g in assigned if word in e.name}
    # forward op and its backward land in the same group
    assert groups_of("leaky_relu") == {"mlp"}                     # aten::leaky_relu and LeakyReluBackward0
    assert groups_of("scaled_dot_product") == {"attention"}       # SDPA forward and its backward
    assert groups_of("nll_loss") == {"embed_head_ce"}
    assert groups_of("embedding") == {"embed_head_ce"}
    # every kernels op's range, and each op that runs inside it, lands in that op's group
    names = {e.name for e in events}
    # gptq_quantize_layer is calibration's op: it runs after training, never in a step; lane_update runs only
    # in two-lane blocks, which the tiny preset has none of.
    for op, group in ledger.KERNEL_GROUPS.items():
        if op in ("gptq_quantize_layer", "lane_update"):
            continue
        assert kernels.PROFILE_PREFIX + op in names, f"no kernels::{op} range in the profile"
        inside = {g for e, g in assigned if e.name == kernels.PROFILE_PREFIX + op
                  or (e.cpu_parent is not None and e.cpu_parent.name == kernels.PROFILE_PREFIX + op)}
        assert inside == {group}, (op, inside)
    assert groups_of("all_reduce") | groups_of("allreduce") == {"communication"}
    assert {g for e, g in assigned if e.name.startswith("Optimizer.step#Muon")} == {"muon"}

    measured = ledger.MeasuredLedger({g: t / 1e3 for g, t in times.items()}, 1, "CPU time")
    assert sum(measured.percent().values()) == pytest.approx(100.0, abs=1e-9)
    text = ledger.markdown(measured, "tiny", flops.analytic_ledger(REAL, B, T), "ouroboros")
    for grp in GROUPS:
        assert ledger.GROUP_LABELS[grp] in text


def test_every_kernels_op_has_a_ledger_group():
    dispatching = {name for name in dir(kernels) if not name.startswith("_")
                   and callable(getattr(kernels, name)) and hasattr(getattr(kernels, name), "__wrapped__")}
    assert dispatching == set(ledger.KERNEL_GROUPS)  # kernels._profiled wraps each one
    assert set(ledger.KERNEL_GROUPS.values()) <= set(GROUPS)
    with pytest.raises(KeyError, match="kernels op 'new_op' no group"):
        ledger._range_scope(kernels.PROFILE_PREFIX + "new_op")


def test_instrumented_removes_its_hooks_and_patches_nothing():
    net = model.build_model(bench_step.smoke_config())
    dispatch = kernels.attention
    with ledger.instrumented(net):
        assert kernels.attention is dispatch  # the kernels' own profiler ranges are used
        assert any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(TypeError, match="eager GPT"):
        with ledger.instrumented(torch.nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------- the step

def test_step_runs_rank_share_of_muon_and_learns(process_group):
    cfg = bench_step.smoke_config()
    run = bench_step.build_step(cfg, "torch", DEVICE, batch_seqs=2, seq_len=32)
    result = bench_step.time_steps(run, steps=3, warmup_steps=1)
    assert result["ms_p20"] <= result["ms_median"] <= result["ms_p80"]
    assert result["tokens_per_s"] == pytest.approx(64 / (result["ms_median"] * 1e-3))
    assert result["loss"] < math.log(cfg.vocab_size)  # 4 steps on one fixed batch: below the uniform loss
    assert isinstance(run.train_step, TrainStep)  # the trainer's own step function is what is timed
    matrices = model.param_groups(run.net)["matrix"]
    with_momentum = [i for i, p in enumerate(matrices) if "momentum_buffer" in run.optimizers.muon.state[p]]
    assert with_momentum == list(range(0, len(matrices), 8))  # round robin: rank 0 of 8

    everything = bench_step.build_step(cfg, "torch", DEVICE, batch_seqs=1, seq_len=16, muon_share="all")
    everything.run()
    assert all("momentum_buffer" in everything.optimizers.muon.state[p]
               for p in model.param_groups(everything.net)["matrix"])


def test_step_registry_cases_and_bad_input():
    cases = bench_step.cases("cpu", smoke=True)
    assert [c.provider for c in cases] == ["torch", "triton"]
    expected = flops.analytic_ledger(bench_step.smoke_config(), 2, 64).flops
    assert cases[0].flops == pytest.approx(expected) and cases[0].shape["muon"] == "1/8"
    with pytest.raises(ValueError, match="muon_share='half'"):
        bench_step.build_step(bench_step.smoke_config(), "torch", "cpu", 1, 16, muon_share="half")
    with pytest.raises(ValueError, match="backend='cuda'"):
        bench_step.build_step(bench_step.smoke_config(), "cuda", "cpu", 1, 16)
    with pytest.raises(model.ConfigError, match="TRAIN_BATCH_TOKENS=1000"):
        bench_step.per_gpu_batch_seqs(REAL.replace(train_batch_tokens=1000))
    assert bench_step.per_gpu_batch_seqs(REAL) == 48


# ---------------------------------------------------------------- eval timing

def test_eval_window_counts_and_flops():
    from train.evaluate import sliding_windows

    for targets in (2048, 2049, 2112, 2113, 5000):
        assert eval_timing.total_windows(targets) == len(sliding_windows(targets, 2048, 64))
    assert eval_timing.total_windows() == (62_021_632 - 2048) // 64 + 1
    share = eval_timing.share_windows()
    assert share == eval_timing.total_windows() // 8
    forward_flops = eval_timing.eval_flops(REAL, share, 2048)
    assert forward_flops == pytest.approx(share * 2048 * (2 * 29_753_344 + 2 * 11 * 2048 * 512), rel=1e-12)
    assert 1.8e16 < forward_flops < 2.2e16  # the "about 2e16 FLOP per GPU"


def test_eval_run_scores_every_window_of_a_random_model():
    cfg = eval_timing.smoke_config("torch")
    run = eval_timing.EvalRun(cfg, "torch", DEVICE, windows=3, batch_seqs=2)
    loss, bpb = run.run()
    # A freshly initialised model is close to uniform: the loss is about ln(vocab).
    assert loss == pytest.approx(math.log(cfg.vocab_size), abs=0.05)
    base, space, boundary = run.luts
    x, y = run.tokens[:-1], run.tokens[1:]
    nbytes = (base[y].long() + (space[y] & ~boundary[x]).long()).sum().item()
    assert bpb == pytest.approx(loss * y.numel() / (math.log(2) * nbytes), rel=1e-6)
    with pytest.raises(ValueError, match="windows=0"):
        eval_timing.EvalRun(cfg, "torch", DEVICE, windows=0, batch_seqs=2)


def test_gpu_grouping_counts_each_kernel_once_in_its_launching_op_group():
    """The CUDA path on hand-made profiler events: kernels go to the group of the op that launched them,
    backward kernels (run on the autograd thread, outside ledger::backward) follow their forward op."""
    from types import SimpleNamespace

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    ids = iter(range(1, 100))

    def op(name, parent=None, seq=-1, thread=1, fwd_thread=1):
        return SimpleNamespace(id=next(ids), name=name, cpu_parent=parent, sequence_nr=seq, thread=thread,
                               fwd_thread=fwd_thread, device_type=cpu, self_cpu_time_total=1.0, linked_correlation_id=0)

    def kernel(name, launcher, us):
        return SimpleNamespace(id=next(ids), name=name, cpu_parent=None, sequence_nr=-1, thread=0, fwd_thread=0,
                               device_type=gpu, linked_correlation_id=launcher.id if launcher else 0,
                               time_range=SimpleNamespace(elapsed_us=lambda us=us: us))
    fwd = op("ledger::forward")
    mlp = op("ledger::mlp", fwd)
    mm = op("aten::mm", mlp, seq=7)
    node = op("autograd::engine::evaluate_function: MmBackward0", None, seq=7, thread=2, fwd_thread=1)
    mm_bwd = op("aten::mm", node, thread=2)
    muon = op("ledger::muon")
    ns = op("aten::mm", muon)
    events = [fwd, mlp, mm, node, mm_bwd, muon, ns,
              kernel("sm90_gemm", mm, 100.0), kernel("sm90_gemm", mm_bwd, 200.0), kernel("sm90_gemm", ns, 30.0),
              kernel("ncclDevKernel_AllReduce_Sum_bf16", None, 5.0), kernel("unknown_kernel", None, 1.0)]
    times = ledger.group_events(events, use_device=True)
    assert times["mlp"] == 300.0 and times["muon"] == 30.0 and times["communication"] == 5.0 and times["other"] == 1.0
    assert sum(times.values()) == 336.0
    cpu_times = ledger.group_events(events, use_device=False)
    assert cpu_times["mlp"] == 4.0 and sum(cpu_times.values()) == 7.0  # host ops only: ledger::mlp, mm, node, mm_bwd


def test_command_lines_write_their_results(tmp_path, process_group, capsys):
    import json

    out = tmp_path / "step.json"
    assert bench_step.main(["--kernels", "torch", "--steps", "2", "--warmup-steps", "0", "--batch-seqs", "1",
                            "--seq-len", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    run = data["runs"]["torch"]
    assert data["tokens_per_step"] == 16 and data["muon_share"] == "rank"
    assert run["ms_p20"] <= run["ms_median"] <= run["ms_p80"] and math.isfinite(run["loss"])

    table = tmp_path / "ledger.md"
    assert ledger.main(["--steps", "1", "--batch-seqs", "1", "--seq-len", "16", "--out", str(table)]) == 0
    text = table.read_text()
    assert "`tiny` at 1 x 16 tokens" in text and "`ouroboros` at 48 x 2048 tokens per GPU" in text
    assert all(ledger.GROUP_LABELS[g] in text for g in GROUPS)

    assert eval_timing.main(["--kernels", "torch", "--windows", "2"]) == 0
    assert "eval[torch]: tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_step.main(["--steps", "0"])
