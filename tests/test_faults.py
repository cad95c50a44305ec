"""Issue 13: faults and bad input, one section per item of the issue, each self-contained."""

# --- as-run rotary (item 8) ---
# The original's model.bfloat16() rounded every rotary inv_freq buffer to bf16, and its crawler loops built their
# per-loop tables from that rounded buffer at every length; it summed micro-batch gradients (plain backward).
# `ouroboros-as-run` does both (ROPE_INV_FREQ_BF16=1, MICRO_BATCH_GRADS=sum); `ouroboros` and `tiny` do neither.
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import model  # noqa: E402
from model.config import ConfigError, from_env  # noqa: E402
from model.decode import KVCache, decode_step  # noqa: E402
from model.gpt import CRAWLER, Block, CrawlerGPT, Rope, bf16_rounded, rope_tables  # noqa: E402
from train.step import TrainStep  # noqa: E402


def _as_run_pair(seed=0, **changes):
    """The tiny model (head_dim 64, 16 rotary dims, base 10000, loop scales 9 and 1 as the full model) with noisy
    weights, exact and with the as-run rounding, sharing every weight. q_gain stays at QK_GAIN_INIT (4, as the
    original's init), so attention is as peaked as the original's rather than flattened by random gains."""
    cfg = from_env(environ={}, preset="tiny", train_seq_len=2048, crawler_loop_rope_scales=(9.0, 1.0), **changes)
    torch.manual_seed(seed)
    exact = CrawlerGPT(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in exact.named_parameters():
            if name.endswith("q_gain"):
                continue
            if p.dim() == 2 and "resid_mix" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    as_run = CrawlerGPT(cfg.replace(rope_inv_freq_bf16=True)).eval()
    as_run.load_state_dict(exact.state_dict())
    return exact, as_run


def _hand_tables(T, base, scale, rounded):
    """cos, sin written out as the original built them: inv_freq in fp32, through bf16 when rounded, then / scale."""
    inv_freq = 1.0 / (base ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    if rounded:
        inv_freq = inv_freq.to(torch.bfloat16).to(torch.float32)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * (inv_freq / scale)[None, :]
    return angles.cos(), angles.sin()


def test_bf16_rounded_is_torchs_round_to_nearest_even():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=gen) * 10.0 ** torch.randint(-8, 8, (10_000,), generator=gen),
                   1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))])
    ties = (x.view(torch.int32) & -0x10000 | 0x8000).view(torch.float32)  # exactly halfway between two bf16
    for values in (x, ties, -ties):
        assert torch.equal(bf16_rounded(values), values.to(torch.bfloat16).to(torch.float32))
    assert not torch.equal(bf16_rounded(x), x)


def test_only_the_as_run_preset_rounds_and_only_its_crawler_loops():
    for preset, rounded in [("ouroboros", False), ("tiny", False), ("ouroboros-as-run", True)]:
        schedule = model.block_schedule(from_env(environ={}, preset=preset))
        assert [s.rope.inv_freq_bf16 for s in schedule] == [rounded and s.kind == CRAWLER for s in schedule], preset
    schedule = model.block_schedule(from_env(environ={}, preset="ouroboros-as-run"))
    assert [s.rope for s in schedule if s.kind == CRAWLER] == [Rope(10000.0, 9.0, True), Rope(10000.0, 1.0, True)]
    # the original's flat blocks rebuilt exact fp32 tables at its 2048 tokens (its NTK branch): no rounding there
    assert {s.rope for s in schedule if s.kind != CRAWLER} == {Rope(10000.0 * 2 ** (16 / 14), 1.0, False)}


@pytest.mark.usefixtures("torch_kernels_one_thread")
@pytest.mark.parametrize("T", [1, 12, 1024, 2048, 2500])
def test_as_run_tables_are_built_from_the_bf16_rounded_inv_freq_at_every_length(T):
    exact, as_run = _as_run_pair()
    tables = as_run.rope_tables(T, "cpu")
    flat_base = as_run.config.flat_rope_base
    for rope, (cos, sin) in tables.items():
        want_cos, want_sin = _hand_tables(T, rope.base, rope.scale, rounded=rope.base != flat_base)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), rope
    for rope, (cos, sin) in exact.rope_tables(T, "cpu").items():
        want_cos, want_sin = _hand_tables(T, rope.base, rope.scale, rounded=False)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), rope
        assert torch.equal(cos, rope_tables(T, rope.base, rope.scale, 16, "cpu")[0])
    if T > 1:  # the rounding changes every loop's table (position 0 has angle 0 either way)
        rounded = [tables[Rope(10000.0, s, True)][0] for s in (9.0, 1.0)]
        plain = [exact.rope_tables(T, "cpu")[Rope(10000.0, s)][0] for s in (9.0, 1.0)]
        assert all(not torch.equal(r, p) for r, p in zip(rounded, plain))


@pytest.mark.usefixtures("torch_kernels_one_thread")
def test_every_crawler_loop_runs_with_its_rounded_table_in_forward_and_decode():
    _, as_run = _as_run_pair()
    T = 24
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, args[2], args[3])))
               for name, m in as_run.named_modules() if isinstance(m, Block)]
    ids = torch.randint(0, 1024, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = as_run(ids)
    for h in handles:
        h.remove()
    crawler = [(cos, sin) for name, cos, sin in calls if name == "crawler_blocks.0"]
    assert len(crawler) == 2
    for (cos, sin), scale in zip(crawler, (9.0, 1.0)):
        want_cos, want_sin = _hand_tables(T, 10000.0, scale, rounded=True)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    # the KV cache takes the model's own tables, so decode agrees with forward
    cache = KVCache(as_run, 1, T)
    for rope, (cos, sin) in as_run.rope_tables(T, "cpu").items():
        assert torch.equal(cache.ropes[rope][0], cos) and torch.equal(cache.ropes[rope][1], sin)
    decoded = torch.cat([decode_step(as_run, ids[:, :9], cache)] + [decode_step(as_run, ids[:, t:t + 1], cache)
                                                                  for t in range(9, T)], dim=1)
    torch.testing.assert_close(decoded, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("torch_kernels_one_thread")
def test_as_run_rounding_moves_the_logits_more_at_2048_than_at_256():
    """The issue measured 1.8e-3 (T=256) and 1.4e-2 (T=2048) relative on the original's weights; noisy weights
    with the original's q_gain give ~5e-4 and ~3.4e-3 (three seeds), the same growth with length."""
    exact, as_run = _as_run_pair(num_flat_layers=2, inst_dim=0)
    ids = torch.randint(0, 1024, (1, 2048), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        rel = {}
        for T in (256, 2048):
            a, b = exact(ids[:, :T]), as_run(ids[:, :T])
            rel[T] = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < rel[256] < rel[2048] / 3, rel
    assert rel[2048] > 1e-3, rel


def test_as_run_settings_from_the_environment_and_old_configs():
    as_run = from_env(environ={}, preset="ouroboros-as-run")
    assert (as_run.rope_inv_freq_bf16, as_run.micro_batch_grads) == (True, "sum")
    for preset in ("ouroboros", "tiny"):
        cfg = from_env(environ={}, preset=preset)
        assert (cfg.rope_inv_freq_bf16, cfg.micro_batch_grads) == (False, "mean")
    cfg = from_env({"PRESET": "tiny", "ROPE_INV_FREQ_BF16": "1", "MICRO_BATCH_GRADS": "sum"})
    assert (cfg.rope_inv_freq_bf16, cfg.micro_batch_grads) == (True, "sum")
    with pytest.raises(ConfigError, match=r"^MICRO_BATCH_GRADS='avg': must be one of 'mean', 'sum'"):
        from_env({"PRESET": "tiny", "MICRO_BATCH_GRADS": "avg"})
    with pytest.raises(ConfigError, match=r"^ROPE_INV_FREQ_BF16='half': expected 0 or 1"):
        from_env({"PRESET": "tiny", "ROPE_INV_FREQ_BF16": "half"})
    # a config stored before these fields existed loads with what ran then: exact tables, averaged gradients
    stored = {k: v for k, v in as_run.to_dict().items() if k not in ("rope_inv_freq_bf16", "micro_batch_grads")}
    old = model.Config.from_dict(stored)
    assert (old.rope_inv_freq_bf16, old.micro_batch_grads) == (False, "mean")


class _GradRecorder:
    """An optimizer stand-in that keeps the gradients it was asked to apply."""

    def __init__(self, net):
        self.net, self.grads = net, None

    def set_schedule(self, step, multiplier):
        pass

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.net.named_parameters()}

    def zero_grad(self):
        self.net.zero_grad(set_to_none=True)


def test_summed_micro_batch_gradients_are_accum_times_the_mean():
    cfg = from_env(environ={}, preset="tiny", model_dim=64, num_heads=1, num_kv_heads=1, num_flat_layers=2,
                   crawler_loops=1, bigram_vocab_size=256, bigram_dim=32, inst_dim=8)
    torch.manual_seed(0)
    net = model.build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    results = {}
    for mode in ("mean", "sum"):
        halves = iter([(x[:2], y[:2]), (x[2:], y[2:])])
        recorder = _GradRecorder(net)
        loss, norm = TrainStep(net, net, recorder, lambda: next(halves), accum=2, micro_batch_grads=mode)(0, 1.0)
        results[mode] = loss, norm, recorder.grads
    (loss_mean, norm_mean, mean), (loss_sum, norm_sum, summed) = results["mean"], results["sum"]
    assert loss_sum == loss_mean  # the reported loss is the mean either way
    assert norm_sum == pytest.approx(2 * norm_mean, rel=1e-6)  # the norm the 0.3 clip sees is twice as large
    for name, grad in summed.items():
        assert torch.equal(grad, 2 * mean[name]), name  # scaling by a power of two is exact
    with pytest.raises(ValueError, match="micro_batch_grads='avg'"):
        TrainStep(net, net, _GradRecorder(net), lambda: (x, y), micro_batch_grads="avg")
