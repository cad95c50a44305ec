"""The crawler model (model.GPT) against SPEC 3: parameter counts, each module against its formula written out by hand,
the U-Net / crawler wiring seen through hooks, the init rules, and loading the original's state dict.

Forward tests use small configs in fp32 with the PyTorch kernels path (the Triton kernels are tested
against the same references in their own files).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
import model
from kernels.attention import attention_reference
from model.config import from_env
from kernels.norm import rms_norm_reference
from model.blocks import MLP, Block, apply_rope, bigram_buckets, rope_tables
from model.gpt import GPT, CheckpointError
from model.schedule import CRAWLER, DECODER, ENCODER, Rope, Slot, block_schedule

AS_RUN_PARAMETERS = 26_040_913          # SPEC: the original's 26,253,908 less its unused ve_* and loop_inst_*
# as-run + the live instruction: loop_inst_proj 32x512 + two loop_inst_up 512x32
OUROBOROS_PARAMETERS = AS_RUN_PARAMETERS + 32 * 512 + 2 * 512 * 32


pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")


def config(**changes):
    """The tiny preset (d=128, 2 heads of 64, 1 KV head), read without the caller's environment."""
    return from_env(environ={}, preset="tiny", **changes)


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    net = GPT(config(**changes))
    randomize_(net)
    return net


@torch.no_grad()
def randomize_(net, seed=1):
    """Give every parameter a non-trivial value, so zero-init branches and unit scales hide nothing."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if p.dim() == 2 and "resid_mix" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
        else:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def hand_rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def record_calls(net):
    """Forward pre-hooks and hooks on every block: a list of (name, args, output) in call order."""
    calls, handles = [], []
    for name, module in net.named_modules():
        if isinstance(module, Block):
            def hook(mod, args, out, name=name):
                calls.append((name, args, out))
            handles.append(module.register_forward_hook(hook))
    return calls, handles


# ---------------------------------------------------------------- parameter counts and shapes

def full_size(preset):
    """The full model's structure on the meta device: counting needs shapes, not values."""
    with torch.device("meta"):
        return model.build_model(from_env(environ={}, preset=preset))


def test_as_run_parameter_count_is_the_originals():
    net = full_size("ouroboros-as-run")
    assert model.count_parameters(net) == AS_RUN_PARAMETERS
    assert not hasattr(net, "loop_inst_proj")


def test_ouroboros_parameter_count():
    net = full_size("ouroboros")
    count = model.count_parameters(net)
    print(f"ouroboros preset: {count:,} parameters")
    assert count == OUROBOROS_PARAMETERS == 26_090_065
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["loop_inst_proj.weight"] == (32, 512)
    assert shapes["loop_inst_up.1.weight"] == (512, 32) and "loop_inst_up.2.weight" not in shapes
    assert shapes["crawler_blocks.0.mlp.fc.weight"] == (3072, 512)
    assert shapes["flat_blocks.8.mlp.proj.weight"] == (512, 1536)


def test_build_model_reads_the_environment(monkeypatch):
    monkeypatch.setenv("PRESET", "tiny")
    monkeypatch.setenv("MODEL_DIM", "64")
    monkeypatch.setenv("NUM_FLAT_LAYERS", "3")
    net = model.build_model()
    assert net.config.model_dim == 64 and len(net.flat_blocks) == 3
    assert net.tok_emb.weight.shape == (1024, 64)


def test_shapes_through_every_block():
    net = tiny_model()
    cfg = net.config
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    calls, handles = record_calls(net)
    logits = net(ids)
    for h in handles:
        h.remove()
    order = [name for name, _, _ in calls]
    n_enc = cfg.num_encoder_layers
    assert order == ([f"flat_blocks.{i}" for i in range(n_enc)] + ["crawler_blocks.0"] * cfg.crawler_loops
                     + [f"flat_blocks.{i}" for i in range(n_enc, cfg.num_flat_layers)])
    for name, args, out in calls:
        assert args[0].shape == args[1].shape == out.shape == (2, 24, cfg.model_dim), name
    assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == torch.float32


# ---------------------------------------------------------------- modules against hand-written formulas

def test_bigram_buckets_by_hand():
    ids = torch.tensor([[5, 900, 1023, 0, 7], [1, 1, 2, 3, 1000]])
    got = bigram_buckets(ids, 2048)
    for b in range(2):
        row = ids[b].tolist()
        want = [2047] + [((36313 * row[t]) ^ (27191 * row[t - 1])) % 2047 for t in range(1, 5)]
        assert got[b].tolist() == want
    assert got.max() < 2048 and got.min() >= 0


def test_bigram_buckets_wrap_in_int32():
    """SPEC 3: the hash is int32 arithmetic; with ids past 2^31 / 36313 the products wrap (int64 would not)."""
    ids = np.array([[60000, 65535, 59999, 1, 40000]], dtype=np.int32)
    with np.errstate(over="ignore"):
        pairs = np.bitwise_xor(np.int32(36313) * ids[:, 1:], np.int32(27191) * ids[:, :-1])
    assert (pairs < 0).any()  # the wrap happened, so this case tells int32 from int64
    want = [[2047] + np.mod(pairs, 2047)[0].tolist()]
    assert bigram_buckets(torch.from_numpy(ids).long(), 2048).tolist() == want


def test_bigram_hash_module_by_hand():
    net = tiny_model()
    ids = torch.randint(0, 1024, (2, 9))
    buckets = bigram_buckets(ids, net.config.bigram_vocab_size)
    want = (net.bigram.embed.weight[buckets] @ net.bigram.proj.weight.T) * net.bigram.scale
    torch.testing.assert_close(net.bigram(ids), want)


def test_smear_gate_by_hand():
    net = tiny_model()
    h = torch.randn(2, 7, net.config.model_dim)
    g = torch.sigmoid(net.smear.gate)
    out = net.smear(h)
    for t in range(7):
        previous = h[:, t - 1] if t > 0 else torch.zeros_like(h[:, 0])
        torch.testing.assert_close(out[:, t], (1 - g) * h[:, t] + g * previous)


def test_rope_direction_is_the_originals():
    """out1 = x1·cos + x2·sin, out2 = -x1·sin + x2·cos at angles t·inv_freq_i."""
    T, D, rope_dims, base = 5, 64, 16, 10000.0
    cos, sin = rope_tables(T, base, 1.0, rope_dims, "cpu")
    inv_freq = torch.tensor([base ** (-2 * i / rope_dims) for i in range(rope_dims // 2)])
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    # Unit vector on dim 0 (in x1): its x1 part becomes cos, its x2 partner (dim 8) becomes -sin.
    x = torch.zeros(1, T, 1, D)
    x[..., 0] = 1.0
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, :, 0, 0], angles[:, 0].cos())
    torch.testing.assert_close(out[0, :, 0, 8], -angles[:, 0].sin())
    # Unit vector on dim 8 (in x2): dim 0 becomes +sin.
    x = torch.zeros(1, T, 1, D)
    x[..., 8] = 1.0
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, :, 0, 0], angles[:, 0].sin())
    torch.testing.assert_close(out[0, :, 0, 8], angles[:, 0].cos())


def test_partial_rope_rotates_16_dims_and_leaves_the_rest():
    T, H, D = 6, 3, 64
    cos, sin = rope_tables(T, 10000.0, 1.0, 16, "cpu")
    x = torch.randn(2, T, H, D)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 16:], x[..., 16:])
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :8], x[..., 8:16]
    torch.testing.assert_close(out[..., :8], x1 * c + x2 * s)
    torch.testing.assert_close(out[..., 8:16], -x1 * s + x2 * c)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths
    assert not torch.allclose(out[:, 1:, :, :16], x[:, 1:, :, :16])  # and position 0 is the only fixed one


def test_rope_bases_flat_ntk_and_per_loop_scales():
    """Flat blocks: the NTK base (≈22,082 at TRAIN_SEQ_LEN 2048); crawler loop k: base 10000 / scale_k."""
    net = tiny_model(train_seq_len=2048, crawler_loop_rope_scales=(9.0, 1.0, 1.0))
    T = 12
    calls, handles = record_calls(net)
    net(torch.randint(0, 1024, (1, T)))
    for h in handles:
        h.remove()
    positions = torch.arange(T, dtype=torch.float32)[:, None]
    i = torch.arange(8, dtype=torch.float32)
    flat_base = 10000.0 * 2.0 ** (16 / 14)
    assert flat_base == pytest.approx(22_082, abs=1)
    for name, args, _ in calls:
        if name.startswith("flat_blocks"):
            torch.testing.assert_close(args[2], (positions * flat_base ** (-2 * i / 16)).cos())
    crawler_cos = [args[2] for name, args, _ in calls if name == "crawler_blocks.0"]
    crawler_sin = [args[3] for name, args, _ in calls if name == "crawler_blocks.0"]
    for k, scale in enumerate((9.0, 1.0)):
        angles = positions * 10000.0 ** (-2 * i / 16) / scale
        torch.testing.assert_close(crawler_cos[k], angles.cos())
        torch.testing.assert_close(crawler_sin[k], angles.sin())
    assert not torch.allclose(crawler_cos[0], crawler_cos[1])


def xsa_placement(cfg):
    """XSA of the distinct blocks in forward order, read from the schedule (the crawler's loops agree)."""
    flags = {}
    for slot in block_schedule(cfg):
        assert flags.setdefault(slot.name, slot.xsa) == slot.xsa, slot
    return list(flags.values())


def test_xsa_placement_counts_distinct_blocks_in_forward_order():
    # forward order of the 10 distinct blocks: enc0-3 (0-3), crawler (4), dec0-4 (5-9)
    assert xsa_placement(config(xsa_last_n=0)) == [False] * 10
    assert xsa_placement(config(xsa_last_n=3)) == [False] * 7 + [True] * 3
    assert xsa_placement(config(xsa_last_n=6)) == [False] * 4 + [True] * 6
    assert xsa_placement(config(xsa_last_n=11)) == [True] * 10
    assert xsa_placement(config(xsa_blocks="crawler", xsa_last_n=3)) == [i == 4 for i in range(10)]
    net = GPT(config(xsa_last_n=6))
    assert [b.attn.xsa for b in net.flat_blocks] == [False] * 4 + [True] * 5
    assert net.crawler_blocks[0].attn.xsa
    assert all(net.block(slot).attn.xsa == slot.xsa for slot in net.schedule)
    as_run = from_env(environ={}, preset="ouroboros-as-run")
    assert xsa_placement(as_run) == [i == 4 for i in range(10)]


# ---------------------------------------------------------------- the block schedule

def test_schedule_of_the_ouroboros_preset():
    cfg = from_env(environ={}, preset="ouroboros")
    flat, xsa = Rope(cfg.flat_rope_base, 1.0), True  # XSA_LAST_N=11 covers all 10 distinct blocks
    assert flat[0] == pytest.approx(10000.0 * 2.0 ** (16 / 14))  # the NTK base at TRAIN_SEQ_LEN 2048
    encoder = [Slot("flat_blocks", i, ENCODER, i, flat, xsa, push_skip=True) for i in range(4)]
    crawler = [Slot("crawler_blocks", 0, CRAWLER, 4, Rope(10000.0, 9.0), xsa, loop=0, inst=0),
               Slot("crawler_blocks", 0, CRAWLER, 5, Rope(10000.0, 1.0), xsa, loop=1, inst=1)]
    decoder = [Slot("flat_blocks", 4 + i, DECODER, 6 + i, flat, xsa, skip=i if i < 4 else None) for i in range(5)]
    assert block_schedule(cfg) == tuple(encoder + crawler + decoder)
    assert [s.name for s in block_schedule(cfg)] == ([f"flat_blocks.{i}" for i in range(4)] + ["crawler_blocks.0"] * 2
                                                     + [f"flat_blocks.{i}" for i in range(4, 9)])


def test_schedule_crawler_only_xsa_and_no_instruction():
    schedule = block_schedule(from_env(environ={}, preset="ouroboros-as-run"))  # XSA_BLOCKS=crawler, INST_DIM=0
    assert [s.xsa for s in schedule] == [s.kind == CRAWLER for s in schedule] == [False] * 4 + [True] * 2 + [False] * 5
    assert [s.inst for s in schedule] == [None] * 11
    assert [s.loop for s in schedule] == [None] * 4 + [0, 1] + [None] * 5
    assert [s.inst for s in block_schedule(config(inst_dim=16))] == [None] * 4 + [0, 1] + [None] * 5


@pytest.mark.parametrize("flat, kinds, skips", [
    (0, "C", []),
    (1, "CD", [None]),
    (2, "ECD", [0]),
    (4, "EECDD", [0, 1]),
    (5, "EECDDD", [0, 1, None]),
    (9, "EEEECDDDDD", [0, 1, 2, 3, None]),
])
def test_schedule_wiring_for_odd_even_and_tiny_depths(flat, kinds, skips):
    schedule = block_schedule(config(num_flat_layers=flat, crawler_loops=1))
    short = {ENCODER: "E", CRAWLER: "C", DECODER: "D"}
    assert "".join(short[s.kind] for s in schedule) == kinds
    assert [s.position for s in schedule] == list(range(len(kinds)))
    assert [s.push_skip for s in schedule] == [s.kind == ENCODER for s in schedule]
    assert [s.skip for s in schedule if s.kind == DECODER] == skips
    assert all(s.skip is None for s in schedule if s.kind != DECODER)
    flat_names = [s.name for s in schedule if s.kind != CRAWLER]
    assert flat_names == [f"flat_blocks.{i}" for i in range(flat)]
    net = GPT(config(num_flat_layers=flat, crawler_loops=1))
    assert net.skip_weights.shape[0] == sum(s is not None for s in skips)


def reference_forward(net, ids):
    """The U-Net written out by hand, as the crawler's forward ran before the schedule: encoder blocks keep
    their outputs, the crawler loops (instruction, then the block with its own RoPE scale), decoder i adds
    encoder n_enc-1-i's output, every table and float op in the same order."""
    cfg = net.config
    T = ids.size(1)
    x = x0 = net.smear(rms_norm_reference(net.tok_emb(ids) + net.bigram(ids)))
    flat_cos, flat_sin = rope_tables(T, cfg.flat_rope_base, 1.0, cfg.rope_dims, ids.device)
    n_enc = cfg.num_encoder_layers
    skips = []
    for block in net.flat_blocks[:n_enc]:
        x = block(x, x0, flat_cos, flat_sin)
        skips.append(x)
    for k in range(cfg.crawler_loops):
        if cfg.inst_dim > 0:
            x = x + net.loop_inst_up[k](net.loop_inst_proj(x))
        cos, sin = rope_tables(T, cfg.rope_base, cfg.crawler_loop_rope_scales[k], cfg.rope_dims, ids.device)
        x = net.crawler_blocks[0](x, x0, cos, sin)
    for i, block in enumerate(net.flat_blocks[n_enc:]):
        if skips:
            x = x + net.skip_weights[i] * skips.pop()
        x = block(x, x0, flat_cos, flat_sin)
    logits = F.linear(kernels.rms_norm(x), net.tok_emb.weight).float()
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)


@pytest.mark.parametrize("changes", [dict(), dict(inst_dim=0, num_flat_layers=4, train_seq_len=2048),
                                     dict(num_flat_layers=1, crawler_loops=3, crawler_loop_rope_scales=(4.0, 2.0, 1.0))],
                         ids=["tiny", "no-inst-even-ntk", "one-flat-three-loops"])
def test_forward_is_the_hand_written_order_bit_for_bit(changes):
    net = tiny_model(**changes)
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(net(ids), reference_forward(net, ids))


def test_xsa_removes_exactly_the_own_value_component():
    net = tiny_model(num_heads=4, num_kv_heads=2, model_dim=128)  # head_dim 32, GQA groups of 2
    attn = net.flat_blocks[0].attn
    seen = {}
    attn.c_v.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out))
    attn.proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    x = torch.randn(2, 10, 128)
    cos, sin = rope_tables(10, 10000.0, 1.0, 16, "cpu")
    outputs = {}
    for xsa in (False, True):
        attn.xsa = xsa
        attn(x, cos, sin)
        outputs[xsa] = seen["y"].view(2, 10, 4, 32)
    v = seen["v"].view(2, 10, 2, 32).repeat_interleave(2, dim=2)  # query head h reads KV head h // 2
    v_hat = v / v.norm(dim=-1, keepdim=True)
    y = outputs[False]
    torch.testing.assert_close(outputs[True], y - (y * v_hat).sum(-1, keepdim=True) * v_hat)
    assert (outputs[True] * v_hat).sum(-1).abs().max() < 1e-5
    assert (y * v_hat).sum(-1).abs().max() > 1e-2  # there was a component to remove


def test_block_against_hand_written_formula():
    cfg = config()
    for layer_idx, slope, xsa in ((0, 0.5, False), (9, 0.0, True)):
        torch.manual_seed(layer_idx)
        block = Block(cfg, layer_idx, 3.0, slope, xsa)
        randomize_(block, seed=layer_idx + 5)
        B, T, d, D = 2, 11, cfg.model_dim, cfg.head_dim
        x, x0 = torch.randn(B, T, d), torch.randn(B, T, d)
        cos, sin = rope_tables(T, 10000.0, 1.0, 16, "cpu")
        s = 1 / math.sqrt(layer_idx + 1)

        def rope(t):
            c, sn = cos[None, :, None, :], sin[None, :, None, :]
            return torch.cat((t[..., :8] * c + t[..., 8:16] * sn, -t[..., :8] * sn + t[..., 8:16] * c, t[..., 16:]), -1)

        a = block.attn
        x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
        n = hand_rms(x_in) * s
        q = rope(hand_rms((n @ a.c_q.weight.T).view(B, T, cfg.num_heads, D)))
        k = rope(hand_rms((n @ a.c_k.weight.T).view(B, T, cfg.num_kv_heads, D)))
        v = (n @ a.c_v.weight.T).view(B, T, cfg.num_kv_heads, D)
        y = attention_reference(q, k, v, a.q_gain, xsa).reshape(B, T, d) @ a.proj.weight.T
        h = x_in + block.attn_scale * y
        u = (hand_rms(h) * s) @ block.mlp.fc.weight.T
        act = torch.where(u > 0, u, slope * u) ** 2
        want = h + block.mlp_scale * (act @ block.mlp.proj.weight.T)
        torch.testing.assert_close(block(x, x0, cos, sin), want, rtol=1e-4, atol=1e-4)


def test_unet_skips_crawler_loops_and_shared_x0():
    net = tiny_model(inst_dim=16)
    cfg = net.config
    ids = torch.randint(0, 1024, (2, 16))
    calls, handles = record_calls(net)
    logits = net(ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        x0 = net.smear(hand_rms(net.tok_emb.weight[ids] + net.bigram(ids)))
        n_enc, sw = cfg.num_encoder_layers, net.skip_weights
        enc_out = [out for _, _, out in calls[:n_enc]]
        crawler_calls = calls[n_enc:n_enc + cfg.crawler_loops]
        decoder_calls = calls[n_enc + cfg.crawler_loops:]
        for name, args, _ in calls:  # every block, each crawler loop included, gets the same x0
            torch.testing.assert_close(args[1], x0)
        torch.testing.assert_close(calls[0][1][0], x0)  # the stream starts at x0
        previous = enc_out[-1]
        for k, (_, args, out) in enumerate(crawler_calls):  # x_loop = x + up_k(proj(x))
            inst = previous @ net.loop_inst_proj.weight.T @ net.loop_inst_up[k].weight.T
            torch.testing.assert_close(args[0], previous + inst)
            previous = out
        for i, (_, args, out) in enumerate(decoder_calls):  # decoder i merges encoder (n_enc-1-i)'s output
            torch.testing.assert_close(args[0], previous)
            skip = args[5]  # (kept, weight, gate): the block adds weight⊙kept (no gate on the crawler)
            if i < n_enc:
                assert skip[0] is enc_out[n_enc - 1 - i] and torch.equal(skip[1], sw[i]) and skip[2] is None
            else:
                assert skip is None
            previous = out
        head = 30 * torch.tanh((hand_rms(previous) @ net.tok_emb.weight.T) / 30)
        torch.testing.assert_close(logits, head, rtol=1e-5, atol=1e-5)


def test_loss_is_fp32_cross_entropy_of_softcapped_logits():
    net = tiny_model()
    ids, targets = torch.randint(0, 1024, (2, 20)), torch.randint(0, 1024, (2, 20))
    logits = net(ids)
    assert logits.abs().max() <= 30.0
    loss = net(ids, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    picked = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, -picked.mean())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_causal_logits_do_not_see_the_future():
    net = tiny_model()
    ids = torch.randint(0, 1024, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 1024
    a, b = net(ids), net(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_compiles_fullgraph_without_graph_breaks():
    net = tiny_model(num_flat_layers=3, crawler_loops=2)
    ids = torch.randint(0, 1024, (2, 16))
    compiled = torch.compile(net, fullgraph=True, backend="eager")  # dynamo tracing only: a break raises
    torch.testing.assert_close(compiled(ids), net(ids))


# ---------------------------------------------------------------- init rules

def assert_init_rules(net):
    cfg = net.config
    for name, p in net.named_parameters():
        w = p.detach()
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")) or name.startswith("loop_inst_up."):
            assert torch.count_nonzero(w) == 0, name
        elif name == "bigram.proj.weight":  # orthogonal, then scaled by 1/sqrt(2·10)
            gram = (w.T @ w) if w.shape[0] >= w.shape[1] else (w @ w.T)
            torch.testing.assert_close(gram * 20, torch.eye(min(w.shape)), atol=1e-5, rtol=0)
        elif name.startswith(("flat_blocks", "crawler_blocks")) and name.endswith(".weight"):
            gram = (w.T @ w) if w.shape[0] >= w.shape[1] else (w @ w.T)
            torch.testing.assert_close(gram, torch.eye(min(w.shape)), atol=1e-5, rtol=0, msg=name)
        elif name.endswith(("attn_scale", "mlp_scale")) or name == "skip_weights":
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith("resid_mix"):
            assert torch.equal(w[0], torch.ones(cfg.model_dim)) and torch.count_nonzero(w[1]) == 0
        elif name.endswith("q_gain"):
            assert torch.equal(w, torch.full((cfg.num_heads,), 4.0))
        elif name in ("smear.gate", "bigram.embed.weight"):
            assert torch.count_nonzero(w) == 0, name
        elif name == "bigram.scale":
            assert w.item() == pytest.approx(0.05)
        elif name == "tok_emb.weight":
            assert w.std().item() == pytest.approx(0.005, rel=0.05) and abs(w.mean().item()) < 1e-3
        elif name == "loop_inst_proj.weight":
            assert w.std().item() == pytest.approx(0.01, rel=0.1)
        else:
            raise AssertionError(f"no init rule checked for {name}")


def test_init_rules_deterministic_and_reset():
    torch.manual_seed(3)
    net = GPT(config())
    assert_init_rules(net)
    torch.manual_seed(3)
    again = GPT(net.config)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    randomize_(again)
    again.reset_parameters()  # the trainer's reset after its compile warmup
    assert_init_rules(again)


def test_param_groups_cover_every_parameter_once():
    net = GPT(config())
    groups = model.param_groups(net)
    names = {id(p): n for n, p in net.named_parameters()}
    by_group = {k: {names[id(p)] for p in v} for k, v in groups.items()}
    assert sum(len(v) for v in groups.values()) == len(names)
    assert set().union(*by_group.values()) == set(names.values())
    assert by_group["embed"] == {"tok_emb.weight", "bigram.embed.weight"}
    assert {"bigram.proj.weight", "loop_inst_proj.weight", "loop_inst_up.1.weight",
            "crawler_blocks.0.mlp.fc.weight", "flat_blocks.8.attn.c_k.weight"} <= by_group["matrix"]
    assert all(p.dim() == 2 for p in groups["matrix"])
    assert {"skip_weights", "smear.gate", "bigram.scale", "flat_blocks.0.resid_mix", "flat_blocks.0.attn.q_gain",
            "crawler_blocks.0.attn_scale", "crawler_blocks.0.mlp_scale"} <= by_group["scalar"]
    assert not any(n.endswith(".weight") for n in by_group["scalar"])


def test_calibration_mode_exposes_every_linear_input():
    net = tiny_model()
    ids = torch.randint(0, 1024, (1, 8))
    seen = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[0].shape)))
    fused = net(ids)
    assert not any(".mlp." in name for name, _ in seen)
    seen.clear()
    with model.calibration_mode(net):
        calibrated = net(ids)
    torch.testing.assert_close(calibrated, fused)
    assert [s for n, s in seen if n == "crawler_blocks.0.mlp.proj"] == [(1, 8, 768)] * 2  # once per loop
    assert [s for n, s in seen if n == "flat_blocks.3.mlp.fc"] == [(1, 8, 128)]
    assert not any(m.unfused for m in net.modules() if isinstance(m, MLP))


# ---------------------------------------------------------------- the original's checkpoint, our checkpoints

def seed_state_dict(gen):
    """A synthetic state dict in the original's format (SPEC 3): names, shapes and dtypes as it saved them."""
    bf16, f32 = torch.bfloat16, torch.float32
    spec = {"tok_emb.weight": ((1024, 512), bf16), "bigram.embed.weight": ((2048, 128), bf16),
            "bigram.proj.weight": ((512, 128), f32), "bigram.scale": ((), f32), "smear.gate": ((512,), f32),
            "skip_weights": ((4, 512), f32), "loop_inst_proj.weight": ((32, 512), bf16),
            "ve_shared.embed.weight": ((1024, 64), bf16), "ve_layer_scales": ((2,), bf16)}
    for prefix, hidden in [(f"flat_blocks.{i}.", 1536) for i in range(9)] + [("crawler_blocks.0.", 3072)]:
        spec.update({prefix + "attn_scale": ((512,), f32), prefix + "mlp_scale": ((512,), f32),
                     prefix + "resid_mix": ((2, 512), f32), prefix + "attn.q_gain": ((8,), f32),
                     prefix + "attn.c_q.weight": ((512, 512), f32), prefix + "attn.c_k.weight": ((256, 512), f32),
                     prefix + "attn.c_v.weight": ((256, 512), f32), prefix + "attn.proj.weight": ((512, 512), f32),
                     prefix + "mlp.fc.weight": ((hidden, 512), f32), prefix + "mlp.proj.weight": ((512, hidden), f32)})
    sd = {name: torch.randn(shape, generator=gen).to(dtype) for name, (shape, dtype) in spec.items()}
    for k in range(2):  # never trained in the original: always zero
        sd[f"loop_inst_up.{k}.weight"] = torch.zeros(512, 32, dtype=bf16)
    return sd


def test_original_state_dict_loads_completely():
    sd = seed_state_dict(torch.Generator().manual_seed(0))
    net = model.from_seed_state_dict(sd)
    assert net.config.preset == "ouroboros-as-run"
    loaded = net.state_dict()
    ignored = {k for k in sd if k.startswith(("ve_", "loop_inst_"))}
    assert ignored == {"ve_shared.embed.weight", "ve_layer_scales", "loop_inst_proj.weight",
                       "loop_inst_up.0.weight", "loop_inst_up.1.weight"}
    assert set(loaded) == set(sd) - ignored  # every parameter filled, nothing else left over
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, sd[name].float()), name


def test_original_state_dict_errors_name_the_tensor():
    gen = torch.Generator().manual_seed(1)
    sd = seed_state_dict(gen)
    broken = dict(sd)
    del broken["flat_blocks.3.attn.c_k.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors \['flat_blocks.3.attn.c_k.weight'\]"):
        model.from_seed_state_dict(broken)
    broken = dict(sd, **{"flat_blocks.9.attn_scale": torch.ones(512)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['flat_blocks.9.attn_scale'\]"):
        model.from_seed_state_dict(broken)
    broken = dict(sd, **{"crawler_blocks.0.mlp.fc.weight": torch.zeros(1536, 512)})
    with pytest.raises(CheckpointError, match=r"crawler_blocks.0.mlp.fc.weight \(1536, 512\) \(expected \(3072, 512\)\)"):
        model.from_seed_state_dict(broken)
    broken = dict(sd, **{"loop_inst_up.1.weight": torch.full((512, 32), 1e-3, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"loop_inst_up.1.weight is not zero"):
        model.from_seed_state_dict(broken)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    net = tiny_model(num_flat_layers=3)
    path = tmp_path / "sub" / "ckpt.pt"
    model.save_checkpoint(net, path)
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temp file left behind
    back = model.load_checkpoint(path)
    assert back.config == net.config
    ids = torch.randint(0, 1024, (1, 12))
    torch.testing.assert_close(back(ids), net(ids), rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        model.load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        model.load_checkpoint(corrupt)
    stranger = tmp_path / "stranger.pt"
    torch.save({"weights": torch.zeros(1)}, stranger)
    with pytest.raises(CheckpointError, match="expected keys 'config' and 'state_dict'"):
        model.load_checkpoint(stranger)
