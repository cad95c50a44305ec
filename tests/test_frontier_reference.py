"""Tests of the R1 reference itself (tests/frontier_reference.py) against facts MODEL.md states or that can
be computed by hand. They are what make it trustworthy enough to test the project's model against."""
import dataclasses
import math

import pytest
import torch

from frontier_reference import (R1_PARAMETER_COUNT, R1Shape, Slot, apply_rope, build_cu_seqlens, leaky_relu_sq,
                                num_skip_slots, r1_hidden, r1_logits, r1_parameter_count, r1_schedule,
                                r1_state_dict_random, r1_state_dict_spec, rms_norm, rope_inv_freq, skip_merge,
                                smear)

R1 = R1Shape()
# R1's structure shrunk: loop segment 2..3 run 3 times, 10 slots (5 enc + 5 dec), physical 4-5 parallel.
SMALL = R1Shape(vocab_size=1024, model_dim=64, num_heads=2, num_kv_heads=1, num_layers=6, loop_start=2,
                loop_end=3, parallel_start_layer=4)
SEQ_LEN = 24


@pytest.fixture(scope="module")
def state():
    return r1_state_dict_random(SMALL, seed=0)


def random_ids(seed: int, seq_len: int = SEQ_LEN, batch: int = 1, vocab: int = 1024) -> torch.Tensor:
    """Token ids with no BOS (id 1) anywhere: tests place BOS themselves."""
    return torch.randint(2, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def replaced(state: dict, **changes) -> dict:
    """A copy of `state` with keys replaced (dots in key names spelled as __)."""
    return {**state, **{key.replace("__", "."): value for key, value in changes.items()}}


# ---- §4, §5 checkpoint format and parameter count ------------------------------------------------------

def test_parameter_count_at_r1_shape():
    assert r1_parameter_count(R1) == R1_PARAMETER_COUNT == 35_945_671
    spec = r1_state_dict_spec(R1)
    data_bytes = sum(math.prod(size) * dtype.itemsize for size, dtype in spec.values())
    assert data_bytes == 4_194_304 * 2 + 31_751_367 * 4 == 135_394_076  # §4 size check


def test_checkpoint_keys_in_save_order_at_r1_shape():
    spec = r1_state_dict_spec(R1)
    block_keys = [f"blocks.{i}.{name}" for i in range(11)
                  for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.attn_gate_w")]
    assert list(spec) == ["qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "skip_weights", "skip_gates",
                          "parallel_post_lambdas", "parallel_resid_lambdas", "smear_lambda", "tok_emb.weight",
                          *block_keys, "smear_gate.weight"]
    assert len(spec) == 66
    sizes = {key: size for key, (size, _) in spec.items()}
    assert sizes["qo_bank"] == (22, 512, 512) and sizes["kv_bank"] == (22, 256, 512)
    assert sizes["mlp_up_bank"] == (11, 2048, 512) and sizes["mlp_down_bank"] == (11, 512, 2048)
    assert sizes["skip_weights"] == sizes["skip_gates"] == (8, 512)
    assert sizes["parallel_post_lambdas"] == (11, 2, 2) and sizes["parallel_resid_lambdas"] == (11, 2)
    assert sizes["smear_lambda"] == (1,) and sizes["tok_emb.weight"] == (8192, 512)
    assert sizes["blocks.10.resid_mix"] == (2, 512) and sizes["blocks.10.attn.q_gain"] == (8,)
    assert sizes["blocks.10.attn.attn_gate_w"] == (8, 12) and sizes["smear_gate.weight"] == (1, 12)
    assert [key for key, (_, dtype) in spec.items() if dtype != torch.float32] == ["tok_emb.weight"]
    assert spec["tok_emb.weight"][1] == torch.bfloat16


def test_random_state_dict_is_random_everywhere(state):
    spec = r1_state_dict_spec(SMALL)
    assert list(state) == list(spec)
    assert all(tuple(state[key].shape) == size and state[key].dtype == dtype for key, (size, dtype) in spec.items())
    for key, value in state.items():  # no zeros, no constant tensor: every term of the function is live
        assert (value != 0).all(), key
        assert value.numel() == 1 or value.float().std() > 0.05, key
    assert torch.equal(r1_state_dict_random(SMALL, seed=0)["qo_bank"], state["qo_bank"])
    assert not torch.equal(r1_state_dict_random(SMALL, seed=1)["qo_bank"], state["qo_bank"])


def test_r1_shape_forward_runs():
    """The full R1 shape once (hidden 2048, kv_dim 256, GQA 2:1, 8 skip slots): finite, softcapped logits."""
    logits = r1_logits(r1_state_dict_random(R1, seed=0), random_ids(0, seq_len=8, vocab=8192), R1)
    assert logits.shape == (1, 8, 8192) and logits.dtype == torch.float32
    assert logits.isfinite().all() and logits.abs().max() < 30


# ---- §2.3 schedule -------------------------------------------------------------------------------------

def test_loop_on_schedule_matches_model_md_table():
    plan = r1_schedule(R1, looping_active=True)
    assert [slot.physical for slot in plan] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [slot.part for slot in plan] == ["enc"] * 8 + ["dec"] * 9
    assert [slot.skip for slot in plan[8:]] == [7, 6, 5, 4, 3, 2, 1, 0, None]
    assert [slot.parallel for slot in plan] == [False] * 14 + [True] * 3
    assert num_skip_slots(R1) == 8


def test_loop_off_schedule_matches_model_md():
    plan = r1_schedule(R1, looping_active=False)
    assert plan == [Slot(i, "enc", None, False) for i in range(5)] + [
        Slot(5, "dec", 4, False), Slot(6, "dec", 3, False), Slot(7, "dec", 2, False),
        Slot(8, "dec", 1, True), Slot(9, "dec", 0, True), Slot(10, "dec", None, True)]


def test_small_schedule_keeps_r1_structure():
    assert [tuple(slot) for slot in r1_schedule(SMALL, looping_active=True)] == [
        (0, "enc", None, False), (1, "enc", None, False), (2, "enc", None, False), (3, "enc", None, False),
        (2, "enc", None, False), (3, "dec", 4, False), (2, "dec", 3, False), (3, "dec", 2, False),
        (4, "dec", 1, True), (5, "dec", 0, True)]
    assert [tuple(slot) for slot in r1_schedule(SMALL, looping_active=False)] == [
        (0, "enc", None, False), (1, "enc", None, False), (2, "enc", None, False),
        (3, "dec", 2, False), (4, "dec", 1, True), (5, "dec", 0, True)]


def test_parallel_slots_must_end_the_decoder():
    with pytest.raises(ValueError, match="parallel"):
        r1_schedule(dataclasses.replace(SMALL, parallel_start_layer=3))  # decoder 3,2,3,...: 2 would be sequential


def test_unread_rows_do_not_matter(state):
    """§2.3/§5: parallel-lambda rows below parallel_start_layer are never read; loop off reads only the
    skip rows it pops (3 at SMALL's shape), loop on reads all K = 5."""
    ids = random_ids(1)
    post, resid = state["parallel_post_lambdas"].clone(), state["parallel_resid_lambdas"].clone()
    post[:4], resid[:4] = 7.0, -3.0
    lambdas_changed = replaced(state, parallel_post_lambdas=post, parallel_resid_lambdas=resid)
    weights, gates = state["skip_weights"].clone(), state["skip_gates"].clone()
    weights[3:], gates[3:] = 5.0, -5.0
    skips_changed = replaced(state, skip_weights=weights, skip_gates=gates)
    for looping in (True, False):
        assert torch.equal(r1_logits(lambdas_changed, ids, SMALL, looping), r1_logits(state, ids, SMALL, looping))
    assert torch.equal(r1_logits(skips_changed, ids, SMALL, False), r1_logits(state, ids, SMALL, False))
    assert not torch.allclose(r1_logits(skips_changed, ids, SMALL, True), r1_logits(state, ids, SMALL, True))


# ---- §2.2 SmearGate, §2.4 skips, §2.7 MLP, the norm ----------------------------------------------------

def test_rms_norm_is_weightless_with_eps_2_pow_minus_23():
    x = torch.full((4,), 1e-4)
    assert torch.allclose(rms_norm(x), x / math.sqrt(1e-8 + 2.0 ** -23), rtol=1e-6)
    assert torch.allclose(rms_norm(torch.tensor([3.0, -4.0])), torch.tensor([3.0, -4.0]) / math.sqrt(12.5))


def test_smear_gate_by_hand(state):
    e = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 7, 8, 1, 9, 10]])  # BOS at 0 and 3
    w, lam = state["smear_gate.weight"], state["smear_lambda"]
    h = smear(e, ids, w, lam)
    assert torch.equal(h[:, 0], e[:, 0]) and torch.equal(h[:, 3], e[:, 3])  # row start and BOS: never smeared
    gate = lam * torch.sigmoid((w[0] * e[0, 4, :12]).sum())
    assert torch.allclose(h[0, 4], e[0, 4] + gate * e[0, 3], atol=1e-6)  # from the unsmeared BOS embedding
    assert torch.equal(smear(e, ids, w, torch.zeros(1)), e)  # smear_lambda = 0: the identity


def test_smear_lambda_zero_makes_the_gate_weight_irrelevant(state):
    ids = random_ids(2)
    off = replaced(state, smear_lambda=torch.zeros(1))
    other_weight = replaced(off, smear_gate__weight=-state["smear_gate.weight"])
    assert torch.equal(r1_logits(off, ids, SMALL), r1_logits(other_weight, ids, SMALL))
    assert not torch.allclose(r1_logits(off, ids, SMALL), r1_logits(state, ids, SMALL))


def test_skip_merge_at_init_values_is_the_average():
    x, s = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(skip_merge(x, s, torch.ones(8), torch.zeros(8)), 0.5 * x + 0.5 * s, atol=1e-7)
    w, g = torch.full((8,), 2.0), torch.full((8,), 1.5)
    assert torch.allclose(skip_merge(x, s, w, g), w * s + torch.sigmoid(g) * (x - w * s), atol=1e-6)


def test_leaky_relu_squared():
    assert torch.equal(leaky_relu_sq(torch.tensor([-2.0, -0.5, 0.0, 3.0])), torch.tensor([1.0, 0.0625, 0.0, 9.0]))


# ---- §2.6 attention pieces -----------------------------------------------------------------------------

def test_rope_inv_freq_is_the_bf16_table():
    assert rope_inv_freq(R1).tolist() == [1.0, 0.31640625, 0.10009765625, 0.03173828125, 0.010009765625,
                                          0.0031585693359375, 0.00099945068359375, 0.000316619873046875]


def test_rope_rotation_direction_and_pass_through():
    """u1' = u1·cos + u2·sin, u2' = −u1·sin + u2·cos on dims 0..15 of each head; dims 16..63 untouched."""
    theta = torch.tensor([[0.0], [0.7]])  # positions 0 and 1, one frequency
    x = torch.zeros(1, 2, 1, 4)
    x[..., 0], x[..., 1], x[..., 2:] = 1.0, 0.0, torch.tensor([2.0, 3.0])  # u1 = 1, u2 = 0 at rd = 2
    out = apply_rope(x, theta.cos(), theta.sin())
    assert torch.allclose(out[0, 1, 0], torch.tensor([math.cos(0.7), -math.sin(0.7), 2.0, 3.0]))
    assert torch.equal(out[0, 0, 0], x[0, 0, 0])


def test_gqa_query_head_h_uses_kv_head_h_over_group():
    """4 query heads on 2 KV heads: heads 0, 1 read KV head 0. With heads 2, 3 cut from every out-projection,
    KV head 1's k and v rows (kv_bank rows 16..31) no longer matter."""
    shape = dataclasses.replace(SMALL, num_heads=4, num_kv_heads=2)
    state = r1_state_dict_random(shape, seed=3)
    n, dh = shape.num_layers, shape.head_dim
    generator = torch.Generator().manual_seed(3)
    qo = state["qo_bank"].clone()
    qo[n:, :, 2 * dh:] = 0.0  # W_o columns of heads 2, 3
    cut = replaced(state, qo_bank=qo)
    kv = cut["kv_bank"].clone()
    kv[:, dh:2 * dh] = torch.randn(2 * n, dh, shape.model_dim, generator=generator)
    ids = random_ids(4)
    assert torch.allclose(r1_logits(replaced(cut, kv_bank=kv), ids, shape), r1_logits(cut, ids, shape), atol=1e-6)
    kv = cut["kv_bank"].clone()
    kv[:, :dh] = torch.randn(2 * n, dh, shape.model_dim, generator=generator)
    assert not torch.allclose(r1_logits(replaced(cut, kv_bank=kv), ids, shape), r1_logits(cut, ids, shape))


def test_xsa_erases_a_lone_tokens_attention(state):
    """At position 0 attention returns the token's own v, which XSA removes: no attention weight (banks,
    q_gain, the sparse gate) can change position 0's logits."""
    ids = random_ids(5)
    other = r1_state_dict_random(SMALL, seed=5)
    attention_keys = ["qo_bank", "kv_bank"] + [f"blocks.{i}.attn.{name}" for i in range(6)
                                               for name in ("q_gain", "attn_gate_w")]
    changed = {**state, **{key: other[key] for key in attention_keys}}
    assert torch.allclose(r1_logits(changed, ids, SMALL)[:, 0], r1_logits(state, ids, SMALL)[:, 0], atol=1e-4)
    assert not torch.allclose(r1_logits(changed, ids, SMALL)[:, 1:], r1_logits(state, ids, SMALL)[:, 1:])


# ---- §2.8 final lane, §2.9 head ------------------------------------------------------------------------

def test_mean_final_lane_is_the_average_of_the_two_lanes(state):
    ids = random_ids(6)
    lanes = {lane: r1_hidden(state, ids, dataclasses.replace(SMALL, parallel_final_lane=lane))
             for lane in ("mean", "attn", "mlp")}
    assert torch.allclose(lanes["mean"], 0.5 * (lanes["attn"] + lanes["mlp"]), atol=1e-5)
    assert not torch.allclose(lanes["attn"], lanes["mlp"])


def test_logits_are_softcapped_and_loop_mode_matters(state):
    ids = random_ids(7, batch=2)
    on, off = r1_logits(state, ids, SMALL, True), r1_logits(state, ids, SMALL, False)
    assert on.shape == (2, SEQ_LEN, 1024) and on.abs().max() < 30 and on.abs().max() > 10
    assert not torch.allclose(on, off)


# ---- causality and segments (§2.6 step 5, §2.10) -------------------------------------------------------

def test_causality(state):
    ids = random_ids(8)
    later = ids.clone()
    later[0, 15] += 1
    before, after = r1_logits(state, ids, SMALL), r1_logits(state, later, SMALL)
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_documents_are_isolated_with_cu_seqlens(state):
    """Documents at 0 and 12. Changing a token of document 0 leaves document 1's logits alone with cu (its BOS
    takes no smear), and changes them without cu. Document 1 alone gives the same logits: RoPE positions are
    row indices, but scores depend only on p − p'."""
    ids = random_ids(9)
    ids[0, 0] = ids[0, 12] = 1
    cu = build_cu_seqlens(ids[0])
    assert cu[:3].tolist() == [0, 12, SEQ_LEN] and cu.numel() == 64
    changed = ids.clone()
    changed[0, 5] += 1
    packed = r1_logits(state, ids, SMALL, cu_seqlens=cu)
    assert torch.equal(r1_logits(state, changed, SMALL, cu_seqlens=cu)[:, 12:], packed[:, 12:])
    assert not torch.allclose(r1_logits(state, changed, SMALL)[:, 12:], r1_logits(state, ids, SMALL)[:, 12:])
    assert torch.allclose(r1_logits(state, ids[:, 12:], SMALL), packed[:, 12:], atol=1e-4)


def test_smear_leaks_across_a_split_inside_a_document(state):
    """§2.2 quirk: one document split every 8 tokens (segments 0-7, 8-15, 16-23). The last token of segment 0
    smears into token 8, so it changes segment 1 but not segment 2; token 6 changes neither."""
    ids = random_ids(10)
    ids[0, 0] = 1
    cu = build_cu_seqlens(ids[0], max_len=8)
    assert cu[:4].tolist() == [0, 8, 16, 24]
    base = r1_logits(state, ids, SMALL, cu_seqlens=cu)
    last_of_segment_0, second_last = ids.clone(), ids.clone()
    last_of_segment_0[0, 7] += 1
    second_last[0, 6] += 1
    leaked = r1_logits(state, last_of_segment_0, SMALL, cu_seqlens=cu)
    assert not torch.allclose(leaked[:, 8:16], base[:, 8:16]) and torch.equal(leaked[:, 16:], base[:, 16:])
    assert torch.equal(r1_logits(state, second_last, SMALL, cu_seqlens=cu)[:, 8:], base[:, 8:])


def test_cu_seqlens_needs_a_single_row(state):
    with pytest.raises(ValueError, match="B = 1"):
        r1_logits(state, random_ids(11, batch=2), SMALL, cu_seqlens=torch.tensor([0, SEQ_LEN], dtype=torch.int32))


# ---- §2.10 build_cu_seqlens ----------------------------------------------------------------------------

def test_build_cu_seqlens_starts_at_every_bos():
    cu = build_cu_seqlens(torch.tensor([1, 5, 6, 1, 7, 1, 8, 9]), pad_to=4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8]
    assert build_cu_seqlens(torch.tensor([1, 5, 6, 1, 7, 1, 8, 9])).tolist() == [0, 3, 5] + [8] * 61


def test_build_cu_seqlens_adds_zero_for_a_leading_partial_document():
    assert build_cu_seqlens(torch.tensor([5, 6, 1, 7]), pad_to=4).tolist() == [0, 2, 4, 4]


def test_build_cu_seqlens_splits_long_documents_from_their_start():
    # leading partial document 0..4 (split at 2, 4), BOS at 5: document 5..9 (split at 7, 9)
    row = torch.tensor([5, 5, 5, 5, 5, 1, 5, 5, 5, 5])
    assert build_cu_seqlens(row, max_len=2, pad_to=8).tolist() == [0, 2, 4, 5, 7, 9, 10, 10]
    assert build_cu_seqlens(row, max_len=3, pad_to=1).tolist() == [0, 3, 5, 8, 10]
