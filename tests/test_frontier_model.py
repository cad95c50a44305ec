"""The `frontier` model (looped layers with R1's switches) against the independent reference of R1's model
function (tests/frontier_reference.py, written from R1's specification alone): the schedule, the parameter
count, the checkpoint format both ways, R1's initialization order, and the logits on the same weights.

Logits are compared in fp32 on the PyTorch path, relative to the spread of the reference's logits, at the
`frontier-tiny` shape (every R1 switch on), with the loop on and off and with document segments.
"""
import math

import pytest
import torch
import torch.nn as nn

import frontier_reference as ref
import kernels
from model import CheckpointError, build_model, count_parameters, from_env, from_record_state_dict, load_checkpoint
from model import to_record_state_dict
from model.schedule import DECODER, ENCODER, block_schedule

TINY = ref.R1Shape(vocab_size=8192, num_layers=6, model_dim=128, num_heads=2, num_kv_heads=1, loop_start=2,
                   loop_end=3, parallel_start_layer=4)
LOGITS_RTOL = 1e-4  # of the reference logits' spread (max - min)


@pytest.fixture(autouse=True)
def torch_path():
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def test_frontier_tiny_is_the_shape_the_tests_use():
    cfg = from_env(environ={}, preset="frontier-tiny")
    assert (cfg.vocab_size, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.loop_start,
            cfg.loop_end, cfg.num_loops, cfg.parallel_start_layer, cfg.mlp_mult, cfg.gate_window) == (
        TINY.vocab_size, TINY.num_layers, TINY.model_dim, TINY.num_heads, TINY.num_kv_heads, TINY.loop_start,
        TINY.loop_end, TINY.num_loops, TINY.parallel_start_layer, TINY.mlp_mult, TINY.gate_window)


@pytest.mark.parametrize("preset, shape", [("frontier", ref.R1Shape()), ("frontier-tiny", TINY)])
@pytest.mark.parametrize("on", [True, False])
def test_schedule_is_r1s(preset, shape, on):
    """Which physical block runs in which slot, encoder or decoder, which skip it pops, which run two-lane."""
    plan = block_schedule(from_env(environ={}, preset=preset), recurrence_active=on)
    want = ref.r1_schedule(shape, looping_active=on)
    assert [s.index for s in plan] == [w.physical for w in want]
    assert [s.kind for s in plan] == [ENCODER if w.part == "enc" else DECODER for w in want]
    assert [s.parallel for s in plan] == [w.parallel for w in want]
    assert [s.position for s in plan] == list(range(len(want)))
    # the reference names the encoder output a decoder pops (S_k); ours names the skip row j; LIFO ties them
    encoders = sum(s.kind == ENCODER for s in plan)
    assert [s.skip for s in plan] == [None if w.skip is None else j - encoders for j, w in enumerate(want)]
    assert [w.skip for w in want if w.skip is not None] == list(range(encoders))[::-1][:len(
        [w for w in want if w.skip is not None])]


def test_frontier_has_r1s_parameters_and_state_dict_format():
    with torch.device("meta"):
        net = build_model(preset="frontier")
    assert count_parameters(net) == ref.R1_PARAMETER_COUNT == 35_945_671
    record = to_record_state_dict(net)
    spec = ref.r1_state_dict_spec(ref.R1Shape())
    assert list(record) == list(spec)  # the 66 keys in R1's save order
    assert {k: (tuple(v.shape), v.dtype) for k, v in record.items()} == spec


def test_a_record_state_dict_loads_and_goes_back_unchanged():
    sd = ref.r1_state_dict_random(TINY, seed=3)
    net = from_record_state_dict(sd, preset="frontier-tiny")
    assert net.tok_emb.weight.dtype == torch.float32
    back = to_record_state_dict(net)
    assert list(back) == list(sd)
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    net.blocks[0].attn.c_q.weight.data.zero_()  # the model holds copies, not the caller's tensors
    assert sd["qo_bank"][0].abs().sum() > 0


def test_a_mismatched_record_state_dict_names_the_tensor():
    sd = ref.r1_state_dict_random(TINY, seed=4)
    bad = dict(sd, kv_bank=sd["kv_bank"][:, :32])
    with pytest.raises(CheckpointError, match=r"kv_bank \(12, 32, 128\) \(expected \(12, 64, 128\)\)"):
        from_record_state_dict(bad, preset="frontier-tiny")
    missing = {k: v for k, v in sd.items() if k != "skip_gates"}
    with pytest.raises(CheckpointError, match=r"missing tensors \['skip_gates'\]"):
        from_record_state_dict(missing, preset="frontier-tiny")
    extra = dict(sd, **{"blocks.9.attn_scale": torch.ones(128)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['blocks.9.attn_scale'\]"):
        from_record_state_dict(extra, preset="frontier-tiny")
    with pytest.raises(CheckpointError, match=r"crawler model"):
        from_record_state_dict(sd, preset="tiny")


def test_r1s_checkpoint_file_loads_as_the_frontier_model(tmp_path):
    """R1's final_model.pt is torch.save(state_dict) alone: load_checkpoint takes it as `frontier`."""
    sd = ref.r1_state_dict_random(ref.R1Shape(), seed=5)
    torch.save(sd, tmp_path / "final_model.pt")
    net = load_checkpoint(tmp_path / "final_model.pt")
    assert net.config.preset == "frontier" and count_parameters(net) == 35_945_671
    assert torch.equal(net.blocks[10].mlp.proj.weight, sd["mlp_down_bank"][10])


def _spread_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / (want.max() - want.min()))


@pytest.mark.parametrize("on", [True, False])
def test_logits_equal_r1s_on_the_same_weights(on):
    sd = ref.r1_state_dict_random(TINY, seed=11)
    net = from_record_state_dict(sd, preset="frontier-tiny").eval()
    net.recurrence_active = on
    ids = torch.randint(2, TINY.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    ids[0, 40] = ids[1, 0] = ids[1, 70] = ref.BOS_ID  # BOS tokens take nothing from before them
    with torch.no_grad():
        got, want = net(ids), ref.r1_logits(sd, ids, TINY, looping_active=on)
    assert _spread_error(got, want) < LOGITS_RTOL
    # the loop matters: the other plan's logits are far from these
    net.recurrence_active = not on
    with torch.no_grad():
        assert _spread_error(net(ids), want) > 1e-2


def test_r1s_initialization_order():
    """The frontier model draws its initial weights in R1's order from the seeded RNG: the embedding's and
    the SmearGate's constructors, tok_emb's N(0, 0.005), then W_q, W_k, W_v of every block, then every W_up;
    every other tensor starts at R1's constants."""
    cfg = from_env(environ={}, preset="frontier-tiny")
    torch.manual_seed(7)
    net = build_model(cfg)
    torch.manual_seed(7)
    d, L = cfg.model_dim, cfg.num_layers
    emb = nn.init.normal_(torch.empty(cfg.vocab_size, d))
    nn.init.kaiming_uniform_(torch.empty(1, cfg.gate_window), a=math.sqrt(5))
    nn.init.normal_(emb, std=0.005)
    kv = cfg.num_kv_heads * cfg.head_dim
    qkv = [[nn.init.orthogonal_(torch.empty(rows, d)) for rows in (d, kv, kv)] for _ in range(L)]
    up = [nn.init.orthogonal_(torch.empty(4 * d, d)) for _ in range(L)]
    assert torch.equal(net.tok_emb.weight, emb)
    for i, block in enumerate(net.blocks):
        for got, want in zip((block.attn.c_q, block.attn.c_k, block.attn.c_v), qkv[i]):
            assert torch.equal(got.weight, want), i
        assert torch.equal(block.mlp.fc.weight, up[i]), i
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        assert not block.attn.attn_gate_w.any() and (block.attn.q_gain == 5.0).all()
    assert not net.smear_gate.weight.any() and not net.smear_lambda.any() and not net.skip_gates.any()
    assert (net.skip_weights == 1).all() and (net.parallel_post_lambdas == 1).all()
    assert (net.parallel_resid_lambdas == 1.1).all()


def test_parallel_blocks_must_end_the_schedule():
    from model import ConfigError

    with pytest.raises(ConfigError, match=r"PARALLEL_START_LAYER=3: the two-lane blocks must be the last slots"):
        block_schedule(from_env(environ={}, preset="frontier-tiny", parallel_start_layer=3))


@pytest.mark.parametrize("on", [True, False])
def test_kv_cached_decode_equals_the_forward(on):
    """The decode walks the same schedule, lanes, gated skips, attention gate and R1's SmearGate (whose
    previous raw embedding the cache keeps) as the forward, at every position."""
    from model.decode import KVCache, decode_step

    net = from_record_state_dict(ref.r1_state_dict_random(TINY, seed=12), preset="frontier-tiny").eval()
    net.recurrence_active = on
    ids = torch.randint(2, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    ids[1, 9] = ref.BOS_ID
    with torch.no_grad():
        full = net(ids)
    cache = KVCache(net, 2, 20)
    got = torch.cat([decode_step(net, ids[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 13), (13, 20))], dim=1)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=2e-5)
    # the raw embedding the SmearGate reads is the cache's: losing it shows
    cache = KVCache(net, 2, 20)
    decode_step(net, ids[:, :13], cache)
    last_ids, last_e, last_h = cache.last
    cache.last = (last_ids, torch.zeros_like(last_e), last_h)
    assert (decode_step(net, ids[:, 13:14], cache) - full[:, 13:14]).abs().max() > 1e-2


def _small_frontier(**changes):
    """frontier-tiny cut down for the interpreter: 4 blocks with 1..2 looped, two-lane from block 3."""
    return from_env(environ={}, preset="frontier-tiny", num_layers=4, loop_start=1, loop_end=2,
                    parallel_start_layer=3, **changes)


def test_triton_and_torch_paths_train_the_frontier_model_alike():
    """Every frontier switch through the Triton kernels (interpreted) and the PyTorch path: 3 SGD steps, the
    same losses within fp32 rounding (the wiring tests' bar)."""
    from kernel_checks import train_tiny_losses

    def spread(net):  # zero-initialized out/down projections and gates would hide their gradients' paths
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05, generator=torch.Generator(device=p.device).manual_seed(p.numel()))

    cfg = _small_frontier()
    with_triton, with_torch = (train_tiny_losses(backend, cfg, optimizer="sgd", sgd_lr=0.05, init=spread,
                                                 token_seed=0) for backend in ("triton", "torch"))
    assert with_torch[0] != with_torch[2], "training did not move the loss"
    for step, (a, b) in enumerate(zip(with_triton, with_torch)):
        assert abs(a - b) <= 2e-5 * abs(b), f"step {step}: loss {a:.7f} with triton kernels, {b:.7f} with torch"


def test_frontier_tiny_trains_end_to_end_and_exports(small_caseops_data, tmp_path):
    """The whole frontier pipeline at CPU size: CaseOps shards, the looped layout, the export step, scored
    document-isolated from the byte sidecar: the loss falls, the artifact round-trips."""
    import functools

    from quant.export import export_run
    from train.trainer import train

    cfg = _small_frontier(runs_dir=str(tmp_path), run_id="frontier", iterations=24, warmdown_iters=8,
                          train_seq_len=64, train_batch_tokens=4 * 64, eval_seq_len=64, eval_stride=32,
                          eval_batch_seqs=32, val_loss_every=0, train_log_every=1, swa_every=0,
                          gptq_cal_samples=4, gptq_cal_seq_len=64, quant_small_numel=1024, **small_caseops_data)
    summary = train(cfg, export_fn=functools.partial(export_run, compare=False), echo=False)
    losses = summary["train_losses"]
    assert summary["status"] == "finished" and len(losses) == 24 and losses[-1] < losses[0] - 0.5
    # R1's training switches too: packed rows, Polar-Express MuonEq-R, local clip, the fraction schedule, the
    # recurrence switch at ceil(0.35 x 24) = 9, the EMA swapped in; both scores in summary.json
    assert (cfg.train_loader, cfg.muon_ns, cfg.muon_row_normalize, cfg.grad_clip_mode) == ("packed", "polar", True,
                                                                                        "local")
    assert summary["recurrence_from_step"] == 9 and summary["ema_decay"] == 0.99
    # its score is phased LoRA TTT's on the artifact, timed by the eval clock (train/ttt.py)
    assert math.isfinite(summary["float_val_bpb"]) and summary["val_bpb"] == summary["export"]["ttt_val_bpb"]
    clock = summary["eval_clock"]
    assert set(clock) == {"decompress_s", "dequantize_s", "warmup_s", "ttt_s", "total_s"}
    assert clock["total_s"] == pytest.approx(sum(v for k, v in clock.items() if k != "total_s"), abs=2e-3)
    assert summary["params"] == count_parameters(build_model(cfg))
    export = summary["export"]
    assert export["method"] == "frontier" and abs(export["roundtrip_val_bpb"] - export["float_val_bpb"]) < 0.05
    # R1's artifact: the per-group container, int7 embedding, int8 gate rows, LQER; read back as R1 loads it
    from quant.artifact import read_artifact
    from quant.load import load_model

    stored = read_artifact(export["artifact_path"]).tensors
    assert stored["tok_emb.weight"].kind == "int7" and sum(q.lqer is not None for q in stored.values()) == 3
    loaded = load_model(export["artifact_path"])[0].tok_emb.weight
    assert torch.equal(loaded, loaded.bfloat16().float())  # the corrected embedding, rounded to bf16
    log = (tmp_path / "frontier" / "train.log").read_text()  # scored document-isolated, as R1 scores
    assert "val bytes: the byte sidecars; eval mode: doc" in log and "final_doc_isolated val_loss:" in log
    assert "final_int6_doc_isolated_exact val_loss:" in log and "sliding_window" not in log
    assert "eval_clock: decompress:" in log and "limit_s:600" in log and "eval_clock_ttt: score_forward:" in log
    assert log.index("final_int6_doc_isolated_exact") < log.index("final_int6_ttt_phased_exact val_loss:")
    assert "recurrence: on from step 9 (fraction 0.375 of training" in log and "loader:packed" in log
    assert "ema: loaded the exponential moving average of the weights (decay 0.99, 24 updates)" in log


def test_generate_takes_r1s_checkpoint(tmp_path, prepared_corpus, capsys):
    """`python -m quant.generate --checkpoint` runs R1's final_model.pt (the frontier model) like an artifact."""
    from quant.generate import main

    torch.save(ref.r1_state_dict_random(ref.R1Shape(), seed=6), tmp_path / "final_model.pt")
    assert main(["--checkpoint", str(tmp_path / "final_model.pt"), "--tokenizer", str(prepared_corpus.tokenizer_path),
                 "--prompt", "The Congress", "--tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The Congress") and "float checkpoint" in out and "prompt of" in out


def test_switching_the_recurrence_costs_one_extra_graph():
    """recurrence_active switches the plan at run time: no rebuild, and torch.compile(fullgraph=True) traces
    exactly one more graph, reused on every later switch."""
    from torch._dynamo.testing import CompileCounter

    net = build_model(_small_frontier()).eval()
    compiled_graphs = CompileCounter()
    compiled = torch.compile(net, backend=compiled_graphs, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on = compiled(ids)
        for active in (False, True, False, True):
            net.recurrence_active = active
            out = compiled(ids)
            assert torch.equal(out, net(ids))
    assert compiled_graphs.frame_count == 2 and torch.equal(on, out)


def test_the_crawler_takes_every_r1_switch():
    """R1's parts on the crawler layout: gated skips, R1's SmearGate beside the static one, the attention
    gate and two-lane decoder blocks; its forward and KV-cached decode agree, and every switch is live."""
    from model.decode import KVCache, decode_step

    switches = dict(skip_gates_enabled=True, smear_gate_enabled=True, sparse_attn_gate_enabled=True,
                    sparse_attn_gate_scale=0.5, parallel_start_layer=7)
    cfg = from_env(environ={}, preset="tiny", num_flat_layers=9, **switches)
    plan = block_schedule(cfg)
    assert [s.name for s in plan if s.parallel] == ["flat_blocks.7", "flat_blocks.8"]
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    plain = build_model(preset="tiny")
    d, n_flat = cfg.model_dim, cfg.num_flat_layers
    assert count_parameters(net) - count_parameters(plain) == (
        4 * d + cfg.gate_window + 1 + (n_flat + 1) * cfg.num_heads * cfg.gate_window + n_flat * 6)
    with torch.no_grad():
        for p in net.parameters():  # every switch's zero or constant init made live
            p.add_(0.1 * torch.randn_like(p))
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
        full = net(ids)
        cache = KVCache(net, 2, 24)
        got = torch.cat([decode_step(net, ids[:, a:b], cache) for a, b in ((0, 10), (10, 11), (11, 24))], dim=1)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_with_document_segments_equal_r1s(backend):
    """cu_seqlens as R1 builds it (a segment at every BOS and every max_len tokens of a document): the same
    logits as the reference, on the PyTorch path and through the varlen Triton kernel (interpreted)."""
    sd = ref.r1_state_dict_random(TINY, seed=13)
    net = from_record_state_dict(sd, preset="frontier-tiny").eval()
    ids = torch.randint(2, TINY.vocab_size, (1, 160), generator=torch.Generator().manual_seed(4))
    ids[0, [0, 33, 34, 90]] = ref.BOS_ID
    cu = ref.build_cu_seqlens(ids[0], max_len=48, pad_to=16)
    assert cu.numel() == 16 and cu[-1] == 160  # padded with copies of T, as R1 pads to 64 entries
    kernels.set_backend(backend)
    with torch.no_grad():
        got, want = net(ids, cu_seqlens=cu), ref.r1_logits(sd, ids, TINY, cu_seqlens=cu)
        plain = net(ids)
    assert _spread_error(got, want) < LOGITS_RTOL
    assert _spread_error(plain, want) > 1e-2  # the segments matter


def test_decode_with_documents_starts_a_fresh_context_at_bos():
    """KVCache(documents=True): a BOS starts a new context for its row, as model(ids, cu_seqlens) with a
    segment at every BOS computes (positions keep counting)."""
    from model.decode import KVCache, decode_step

    net = from_record_state_dict(ref.r1_state_dict_random(TINY, seed=14), preset="frontier-tiny").eval()
    ids = torch.randint(2, TINY.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))
    ids[0, [0, 12, 21]] = ref.BOS_ID
    cu = ref.build_cu_seqlens(ids[0], max_len=2048, pad_to=1)
    with torch.no_grad():
        full = net(ids, cu_seqlens=cu)
        cache = KVCache(net, 1, 30, documents=True)
        got = torch.cat([decode_step(net, ids[:, a:b], cache) for a, b in ((0, 8), (8, 13), (13, 14), (14, 30))], 1)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=2e-5)
