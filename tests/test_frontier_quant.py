"""QUANT_METHOD=frontier (QUANT.md Q.1-Q.4): the calibration R1 runs (one pass, recurrence on, the looped blocks
summing their passes, the tied embedding's H from the head's input), the per-entry scheme (gate rows, fp16,
SDClip GPTQ by group, LQER on the largest errors), loading (the corrected embedding rounded to bf16), and
frontier-tiny's export end to end."""
import pytest
import torch

import kernels
from model import build_model, from_env
from quant.calibrate import collect_hessians, int6_layer_names
from quant.frontier import clip_sigmas_and_bits


@pytest.fixture(autouse=True)
def torch_kernels():
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def _tiny_frontier(**changes):
    return from_env(environ={}, preset="frontier-tiny", num_layers=4, loop_start=1, loop_end=2, parallel_start_layer=3,
                    model_dim=64, num_heads=1, num_kv_heads=1, quant_small_numel=256, **changes)


def _spread(net):
    """Random non-zero weights everywhere (zero-initialized projections would make some inputs vanish)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def test_hessians_are_r1s_one_pass_with_recurrence_on():
    """Q.1: c_q/c_k/c_v share the attention input's H; the looped blocks' hooks fire on every pass into one H;
    the tied embedding's H is the head input's (the final norm's output)."""
    net = _spread(build_model(_tiny_frontier())).eval()
    layers = int6_layer_names(net, 256) + ["tok_emb"]
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(5))
    captured = {}
    hooks = [net.head_input.register_forward_hook(lambda m, a, out: captured.setdefault("head", out.detach())),
             net.blocks[1].attn.c_q.register_forward_pre_hook(
                 lambda m, a: captured.setdefault("c_q1", []).append(a[0].detach()))]
    try:
        with torch.no_grad():
            net(ids)
    finally:
        for h in hooks:
            h.remove()
    hessians = collect_hessians(net, lambda b: net(b), [ids], layers)
    head = captured["head"].reshape(-1, 64)
    torch.testing.assert_close(hessians["tok_emb"], head.T @ head / head.shape[0], rtol=1e-5, atol=1e-6)
    for i in range(4):
        qkv = [hessians[f"blocks.{i}.attn.{n}"] for n in ("c_q", "c_k", "c_v")]
        assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    passes = captured["c_q1"]  # block 1 is looped (1..2, NUM_LOOPS=2): three passes summed into one H
    assert len(passes) == 3
    x = torch.cat([p.reshape(-1, 64) for p in passes])
    torch.testing.assert_close(hessians["blocks.1.attn.c_q"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_clip_sigmas_and_bits_follow_the_groups_in_order():
    cfg = from_env(environ={}, preset="frontier")
    assert (cfg.embed_clip_sigmas, cfg.embed_bits, cfg.mlp_clip_sigmas, cfg.attn_clip_sigmas,
            cfg.matrix_clip_sigmas, cfg.matrix_bits) == (14.0, 7, 11.5, 13.0, 12.85, 6)
    assert clip_sigmas_and_bits("tok_emb.weight", cfg) == (14.0, 7)
    assert clip_sigmas_and_bits("blocks.3.mlp.fc.weight", cfg) == (11.5, 6)
    assert clip_sigmas_and_bits("blocks.3.mlp.proj.weight", cfg) == (11.5, 6)
    assert clip_sigmas_and_bits("blocks.0.attn.c_k.weight", cfg) == (13.0, 6)
    assert clip_sigmas_and_bits("blocks.0.attn.proj.weight", cfg) == (13.0, 6)
    assert clip_sigmas_and_bits("bigram.proj.weight", cfg) == (12.85, 6)
    assert cfg.quant_method == "frontier" and cfg.gated_attn_quant_gate and cfg.compressor == "pergroup"
    assert (cfg.lqer_enabled, cfg.lqer_rank, cfg.lqer_top_k, cfg.lqer_asym_enabled, cfg.lqer_asym_group) == (
        True, 4, 3, True, 64)


def test_frontier_quantize_stores_each_entry_as_r1_does():
    """Q.3: gate rows int8 per row, small tensors fp16, every other matrix SDClip GPTQ with its group's k and bits
    (the embedding read as bf16, int7), then LQER on the LQER_TOP_K largest ||W - Qs||_F (asymmetric where the
    groups divide B, else symmetric); dequantization adds the correction."""
    from quant import gptq, lqer
    from quant.frontier import frontier_quantize
    from quant.scheme import gate_int8_row

    cfg = _tiny_frontier(lqer_top_k=2, lqer_asym_group=64)
    net = _spread(build_model(cfg)).eval()
    gen = torch.Generator().manual_seed(3)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["blocks.0.attn.attn_gate_w"] = torch.randn(4, 12, generator=gen)  # 48 values: the gate rule applies
    layers = int6_layer_names(net, cfg.quant_small_numel) + ["tok_emb"]
    ids = torch.randint(0, 8192, (2, 32), generator=gen)
    hessians = collect_hessians(net, lambda b: net(b), [ids], layers)
    del hessians["blocks.3.mlp.proj"]  # a matrix without a Hessian: GPTQ with H = I
    stored = frontier_quantize(state, hessians, cfg)

    assert stored["blocks.0.attn.attn_gate_w"].kind == "gate_int8"
    codes, scale = gate_int8_row(state["blocks.0.attn.attn_gate_w"])
    assert torch.equal(stored["blocks.0.attn.attn_gate_w"].codes, codes)
    assert stored["blocks.1.attn.attn_gate_w"].kind == "fp16"  # 12 values: below the gate rule's 32
    errors = {}
    for name, t in state.items():
        q = stored[name]
        if t.dim() != 2 or t.numel() <= cfg.quant_small_numel:
            assert q.kind in ("fp16", "gate_int8"), name
            continue
        k, bits = clip_sigmas_and_bits(name, cfg)
        w = t.float().bfloat16().float() if name == "tok_emb.weight" else t.float()
        h = hessians.get(name.removesuffix(".weight"), torch.eye(w.shape[1]))
        want_codes, want_scale = gptq.sdclip_quantize(w, h, k, bits)
        assert q.kind == f"int{bits}" and torch.equal(q.codes, want_codes), name
        assert torch.equal(q.scale, want_scale.float()), name
        errors[name] = w - gptq.dequantize(want_codes, want_scale.float())
    assert stored["tok_emb.weight"].kind == "int7" and stored["blocks.0.mlp.fc.weight"].kind == "int6"
    chosen = sorted(errors, key=lambda n: -float(errors[n].norm()))[:2]
    assert sorted(n for n, q in stored.items() if q.lqer is not None) == sorted(chosen)
    for name in chosen:
        rows, cols = errors[name].shape
        asym = min(4, rows, cols) * cols % 64 == 0
        want = lqer.pack_asym(errors[name], 4, 64) if asym else lqer.pack_sym(errors[name], 4, 4)
        assert all(torch.equal(a, b) for a, b in zip(stored[name].lqer, want)), name
        base = gptq.dequantize(stored[name].codes, stored[name].scale)
        torch.testing.assert_close(stored[name].dequantize(), base + lqer.correction(*want), rtol=0, atol=0)
        assert (stored[name].dequantize() - state[name].float()).norm() < errors[name].norm()  # it helps
