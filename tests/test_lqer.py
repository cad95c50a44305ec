"""R1's int8-per-row attention gate (quant.scheme) and LQER (quant.lqer), against references written here from
QUANT.md Q.3/Q.4 with plain loops over numpy scalars: fp32 division, fp16 by numpy's round-to-nearest-even cast,
Python's round (half to even). The SVD is torch's in both: the asymmetric clamps make the codes depend on its
sign choice, so the references start from the same torch.linalg.svd factors, and a separate test bounds the
correction against the rank-r truncation of E without reading the codes."""
import numpy as np
import pytest
import torch

from quant import gptq, lqer
from quant.scheme import gate_int8_row, is_gate_row_tensor, step_codes

F32, F16 = np.float32, np.float16


def ref_code(x, step, lo, hi) -> int:
    """One code: clamp(round(x / step), lo, hi), the division in fp32; a zero step gives 0."""
    if float(step) == 0.0:
        return 0
    return min(hi, max(lo, round(float(F32(x) / F32(step)))))


def ref_step(values, divisor) -> float:
    """fp16(max|values| clamped to >= 1e-10, divided by `divisor` in fp32), as a Python float."""
    m = max(max(abs(float(v)) for v in values), float(F32(1e-10)))
    return float(F16(F32(m) / F32(divisor)))


def ref_symmetric_rows(w: np.ndarray, qmax: int):
    steps = [ref_step(row, qmax) for row in w]
    codes = [[ref_code(x, steps[i], -qmax, qmax) for x in row] for i, row in enumerate(w)]
    return np.array(codes, dtype=np.int8), np.array(steps, dtype=np.float16)


def svd_factors(error: torch.Tensor, rank: int):
    """A = U[:, :r]·S[:r] (each product one fp32 rounding) and B = Vh[:r] from torch's SVD, as numpy fp32."""
    u, s, vh = (t.numpy() for t in torch.linalg.svd(error.float(), full_matrices=False))
    r = min(rank, len(s))
    a = np.array([[F32(u[i, j]) * F32(s[j]) for j in range(r)] for i in range(u.shape[0])], dtype=np.float32)
    return a, vh[:r].copy()


def ref_pack_asym(error: torch.Tensor, rank: int, group: int):
    a, b = svd_factors(error, rank)
    sa = ref_step(a.ravel(), 1.5)
    qa = np.array([[ref_code(x, sa, -2, 1) for x in row] for row in a], dtype=np.int8)
    flat = b.ravel()  # row-major: group g is flat[g*group:(g+1)*group], across row ends
    sb, qb = [], []
    for g in range(len(flat) // group):
        chunk = flat[g * group:(g + 1) * group]
        sb.append(ref_step(chunk, 7.5))
        qb += [ref_code(x, sb[-1], -8, 7) for x in chunk]
    return qa, F16(sa), np.array(qb, dtype=np.int8).reshape(b.shape), np.array(sb, dtype=np.float16)


def low_rank_error(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A GPTQ-error-like matrix: uniform noise at a small step plus a few dominant directions."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(rows, cols, generator=g) - 0.5) * 0.02
    spikes = torch.randn(rows, 6, generator=g) * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.3, 0.2]) @ torch.randn(6, cols, generator=g)
    return noise + 0.01 * spikes


def assert_equal(got: torch.Tensor, want: np.ndarray, what: str):
    assert got.dtype == {np.int8: torch.int8, np.float16: torch.float16}[want.dtype.type], what
    assert tuple(got.shape) == want.shape, f"{what}: shape {tuple(got.shape)} != {want.shape}"
    diff = np.flatnonzero(got.numpy().ravel() != want.ravel())
    assert diff.size == 0, f"{what}: {diff.size} entries differ, first at flat {diff[0]}: " \
                           f"{got.numpy().ravel()[diff[0]]} != {want.ravel()[diff[0]]}"


# ---- the gate ----

def test_gate_rows_by_hand():
    s = 2.0 ** -6  # row max 127/64: the step is exactly 1/64, so w/s is exact
    w = torch.tensor([
        [127 / 64, 2.5 / 64, 3.5 / 64, -2.5 / 64, 0.5 / 64, -0.5 / 64, 1.5 / 64, -127 / 64],  # ties go to even
        [0.0] * 8,  # zero row: max clamps to 1e-10, fp16(1e-10/127) = 0 -> step 0, codes 0
        [1e-9, -1e-9, 0, 0, 0, 0, 0, 0],  # nonzero, but the fp16 step is still 0: codes 0, not ±inf clamped
        # max = 1.4 * 127 * 2^-24: m/127 rounds to fp16's smallest subnormal 2^-24, so m/s = 177.8 -> clamped
        [1.4 * 127 * 2 ** -24, -1.4 * 127 * 2 ** -24, 100 * 2 ** -24, -2.5 * 2 ** -24, 0, 0, 0, 0],
    ])
    codes, scale = gate_int8_row(w)
    assert codes.dtype == torch.int8 and codes.shape == (4, 8) and scale.dtype == torch.float16 and scale.shape == (4,)
    assert scale.tolist() == [s, 0.0, 0.0, 2.0 ** -24]
    assert codes.tolist() == [[127, 2, 4, -2, 0, 0, 2, -127], [0] * 8, [0] * 8, [127, -127, 100, -2, 0, 0, 0, 0]]
    # dequantization (Q.4): codes · scale[row] in fp32, the same function as every row-scaled kind
    deq = gptq.dequantize(codes, scale)
    assert deq.dtype == torch.float32
    assert deq[0].tolist() == [c * s for c in codes[0].tolist()] and not deq[1:3].any()


def test_gate_rows_random_against_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 12, generator=g) * torch.logspace(-3, 0.5, 8)[:, None]  # R1's [heads, 12]
    codes, scale = gate_int8_row(w)
    want_codes, want_scale = ref_symmetric_rows(w.numpy(), 127)
    assert_equal(scale, want_scale, "gate scales")
    assert_equal(codes, want_codes, "gate codes")
    assert (codes.abs() == 127).sum() >= 8  # every row's max maps to ±127
    # bf16 weights quantize from their values upcast
    codes16, scale16 = gate_int8_row(w.bfloat16())
    want16 = ref_symmetric_rows(w.bfloat16().float().numpy(), 127)
    assert_equal(codes16, want16[0], "bf16 gate codes")
    assert_equal(scale16, want16[1], "bf16 gate scales")


def test_is_gate_row_tensor():
    name = "blocks.3.attn.attn_gate_w"
    assert is_gate_row_tensor(name, torch.zeros(8, 12))
    assert is_gate_row_tensor(name, torch.zeros(8, 12, dtype=torch.bfloat16))
    assert is_gate_row_tensor(name, torch.zeros(4, 8)) and is_gate_row_tensor(name, torch.zeros(64, 128))  # 32 and 8192
    assert not is_gate_row_tensor(name, torch.zeros(31, 1)) and not is_gate_row_tensor(name, torch.zeros(1, 8193))
    assert not is_gate_row_tensor(name, torch.zeros(96))  # not 2-D
    assert not is_gate_row_tensor(name, torch.zeros(2, 8, 12))
    assert not is_gate_row_tensor(name, torch.zeros(8, 12, dtype=torch.int8))  # not floating
    assert not is_gate_row_tensor("blocks.3.attn.attn_gate_w.bias", torch.zeros(8, 12))
    assert not is_gate_row_tensor("blocks.3.attn_gate", torch.zeros(8, 12))
    assert not is_gate_row_tensor("smear_gate.weight", torch.zeros(8, 12))


# ---- LQER packs ----

def test_step_codes_asymmetric_clamps():
    x = torch.tensor([1.5, -1.5, 2.5, -2.5, 0.5, -0.5, 1.0, -1.0, 0.75, -0.75, 9.0, -9.0])
    assert step_codes(x, torch.tensor(1.0, dtype=torch.float16), -2, 1).tolist() == \
        [1, -2, 1, -2, 0, 0, 1, -1, 1, -1, 1, -2]  # +1.5 rounds to 2, clamped to 1; -1.5 rounds to -2
    assert step_codes(x * 5, torch.tensor(1.0), -8, 7).tolist() == [7, -8, 7, -8, 2, -2, 5, -5, 4, -4, 7, -8]


@pytest.mark.parametrize("column", [(12.0, -5.0), (5.0, -12.0)])
def test_pack_asym_clamps_at_plus_minus_one_and_a_half(column):
    """Rank 1, E = u·e0ᵀ with |u| = 13: the SVD is exact, max|A| = 12 and sA = fp16(12 / 1.5) = 8 exactly,
    so the largest entry of A sits at exactly ±1.5 steps: +1.5 -> 2 -> clamped to 1, -1.5 -> -2."""
    e = torch.zeros(4, 64)
    e[0, 0], e[1, 0] = column
    qa, sa, qb, sb = lqer.pack_asym(e, rank=1)  # rank 4 would add 3 columns of A at S = 0
    a, _ = svd_factors(e, 1)
    assert qa.shape == (4, 1) and float(sa) == 8.0 and sa.dim() == 0
    for i in range(2):
        ratio = float(a[i, 0]) / 8.0
        want = {1.5: 1, -1.5: -2, 0.625: 1, -0.625: -1}[ratio]  # 5/8 rounds to 1
        assert int(qa[i, 0]) == want, (column, i, ratio)
    assert not qa[2:].any()
    # B = ±e0ᵀ: one group, step fp16(1 / 7.5), code round(7.5) = 8 -> clamped to 7, or -8
    assert sb.tolist() == [float(F16(F32(1) / F32(7.5)))] and int(qb[0, 0]) in (7, -8) and not qb[0, 1:].any()


def test_pack_asym_clamp_signs_both_seen():
    """The two columns above give A's extreme entry +12 once and -12 once with this LAPACK, so both clamps ran."""
    seen = set()
    for column in [(12.0, -5.0), (5.0, -12.0)]:
        e = torch.zeros(4, 64)
        e[0, 0], e[1, 0] = column
        a, _ = svd_factors(e, 1)
        seen |= {float(x) for x in a[:2, 0] if abs(x) == 12}
    assert seen == {12.0, -12.0}


@pytest.mark.parametrize("rows, cols, seed", [(48, 512, 0), (512, 96, 1), (33, 256, 2)])
def test_pack_asym_against_reference(rows, cols, seed):
    e = low_rank_error(rows, cols, seed)
    qa, sa, qb, sb = lqer.pack_asym(e)
    want = ref_pack_asym(e, 4, 64)
    assert_equal(qa, want[0], "qA")
    assert sa.dtype == torch.float16 and sa.dim() == 0 and float(sa) == float(want[1]), "sA"
    assert_equal(qb, want[2], "qB")
    assert_equal(sb, want[3], "sB")
    assert sb.numel() == 4 * cols // 64
    assert int(qa.min()) >= -2 and int(qa.max()) <= 1 and int(qb.min()) >= -8 and int(qb.max()) <= 7


def test_pack_asym_groups_of_64_across_rows_of_512():
    """R1's fc shape class: B [4, 512] -> 32 groups, 8 per row, group g = row g // 8, columns 64·(g % 8) + [0, 64).
    Each group gets its own magnitude so a different grouping (columns, another order) changes the scales."""
    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(64, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(512, 4, generator=g) * torch.logspace(-1, 1, 512)[:, None])
    e = u * torch.tensor([4.0, 3.0, 2.0, 1.0]) @ v.T
    _, sa, qb, sb = lqer.pack_asym(e)
    _, b = svd_factors(e, 4)
    assert sb.shape == (32,)
    for grp in range(32):
        chunk = b[grp // 8, 64 * (grp % 8):64 * (grp % 8 + 1)]
        assert float(sb[grp]) == ref_step(chunk, 7.5), grp
        assert qb[grp // 8, 64 * (grp % 8):64 * (grp % 8 + 1)].tolist() == [ref_code(x, float(sb[grp]), -8, 7) for x in chunk]
    assert len(set(sb.tolist())) > 16


def test_pack_asym_needs_whole_groups():
    with pytest.raises(ValueError, match=r"\[4, 100\].*\(16, 100\).*64"):
        lqer.pack_asym(torch.randn(16, 100))  # B [4, 100]: 400 entries
    with pytest.raises(ValueError, match=r"\[4, 64\].*96"):
        lqer.pack_asym(torch.randn(16, 64), group=32 * 3)
    with pytest.raises(ValueError, match=r"\[3, 16\]"):  # r = 3 rows, not rank 4: 48 entries, not 64
        lqer.pack_asym(torch.randn(3, 16))
    # fewer than `rank` singular values: r = min(rank, rows, cols) = 3, B [3, 64] is 3 groups
    qa, sa, qb, sb = lqer.pack_asym(low_rank_error(3, 64, 4))
    assert qa.shape == (3, 3) and qb.shape == (3, 64) and sb.shape == (3,)


def quantization_bound(e, qa, sa, qb, sb, group) -> float:
    """‖ÂB̂ - AB‖_F ≤ ‖ΔA‖_F‖B‖_F + ‖Â‖_F‖ΔB‖_F. Every |Δ| is at most half a step except a clamped positive
    extreme: the fp16 step is within a factor 1 + 2^-11 of max/1.5 (max/7.5), so +1.5(1 + 2^-11) steps -> 1 is off
    by 0.5(1 + 3·2^-11) steps for A, and +7.5(1 + 2^-11) -> 7 by 0.5(1 + 15·2^-11) for B."""
    rows, r = qa.shape
    da = 0.5 * (1 + 2 ** -8) * float(sa) * (rows * r) ** 0.5
    db = 0.5 * (1 + 2 ** -7) * float((sb.float() ** 2 * group).sum()) ** 0.5
    a_hat = float((qa.float() * sa.float()).norm())
    return da * r ** 0.5 + a_hat * db  # ‖B‖_F = √r: B has orthonormal rows


@pytest.mark.parametrize("rows, cols, seed", [(48, 512, 0), (512, 96, 1)])
def test_asym_correction_approximates_the_rank_4_truncation(rows, cols, seed):
    e = low_rank_error(rows, cols, seed)
    qa, sa, qb, sb = lqer.pack_asym(e)
    corr = lqer.correction(qa, sa, qb, sb)
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    truncation = (u[:, :4] * s[:4] @ vh[:4]).float()
    gap = float((corr - truncation).norm())
    assert gap <= quantization_bound(e, qa, sa, qb, sb, 64)
    assert float((e - corr).norm()) < 0.85 * float(e.norm())  # it does remove most of the dominant part


def test_pack_sym_against_reference():
    e = low_rank_error(40, 100, 6)  # 400 % 64 != 0: the case R1 falls back to this pack for
    a, b = svd_factors(e, 4)
    for bits, rng in [(4, 7), (3, 3)]:
        qa, sa, qb, sb = lqer.pack_sym(e, rank=4, factor_bits=bits)
        want_qa, want_sa = ref_symmetric_rows(a, rng)
        want_qb, want_sb = ref_symmetric_rows(b, rng)
        assert_equal(qa, want_qa, f"qA ({bits} bits)")
        assert_equal(sa, want_sa, f"sA ({bits} bits)")
        assert_equal(qb, want_qb, f"qB ({bits} bits)")
        assert_equal(sb, want_sb, f"sB ({bits} bits)")
        assert int(qb.abs().max()) == rng  # each row's max maps to ±rng
    qa, sa, qb, sb = lqer.pack_sym(e)
    corr = lqer.correction(qa, sa, qb, sb)
    assert float((e - corr).norm()) < float(e.norm())


def test_correction_both_packs_by_hand():
    # asymmetric: Â = qA·sA, B̂ = (qB as [-1, g]) · sB[group]; here g = 64 over B [2, 96] (3 groups across rows)
    g = torch.Generator().manual_seed(7)
    qa = torch.randint(-2, 2, (5, 2), generator=g, dtype=torch.int8)
    qb = torch.randint(-8, 8, (2, 96), generator=g, dtype=torch.int8)
    sa = torch.tensor(0.375, dtype=torch.float16)
    sb = torch.tensor([0.5, 0.125, 2.0], dtype=torch.float16)
    b_hat = np.zeros((2, 96))
    for k in range(192):
        b_hat[k // 96, k % 96] = int(qb.view(-1)[k]) * float(sb[k // 64])
    want = (qa.numpy().astype(np.float64) * 0.375) @ b_hat
    got = lqer.correction(qa, sa, qb, sb)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)
    # symmetric: (qA·sA[row]) @ (qB·sB[row])
    sa_rows = torch.tensor([0.5, 1.0, 0.25, 2.0, 0.125], dtype=torch.float16)
    sb_rows = torch.tensor([0.25, 4.0], dtype=torch.float16)
    want = (qa.numpy() * sa_rows.numpy()[:, None].astype(np.float64)) @ (qb.numpy() * sb_rows.numpy()[:, None].astype(np.float64))
    got = lqer.correction(qa, sa_rows, qb, sb_rows)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)


def test_top_k_by_error_frobenius_descending_ties_stable():
    errors = {
        "a": torch.full((2, 2), 0.5),  # ‖·‖_F 1
        "b": torch.tensor([[3.0, 0.0], [0.0, 0.0]]),  # 3 (largest max, smallest sum of |·| among the 3s)
        "c": torch.tensor([[1.0, 2.0], [2.0, 0.0]]),  # 3
        "d": torch.full((4, 4), 0.6),  # 2.4 (largest sum of |·|: 9.6)
        "e": torch.tensor([[0.0, 3.0]]),  # 3, same as b
    }
    assert lqer.top_k_by_error(errors, 3) == ["b", "c", "e"]
    assert lqer.top_k_by_error(errors, 4) == ["b", "c", "e", "d"]
    reordered = {k: errors[k] for k in ["e", "d", "c", "a", "b"]}
    assert lqer.top_k_by_error(reordered, 3) == ["e", "c", "b"]
    assert lqer.top_k_by_error(errors, 10) == ["b", "c", "e", "d", "a"]
    assert lqer.top_k_by_error(errors, 0) == []
