"""The reference quantizer: O's row-scale rule, round-to-nearest, GPTQ (textbook and the original's variant),
int8 per row. GPTQ is checked against a naive column-by-column OBS solver written here in float64."""
import pytest
import torch

from quant import gptq

ORIGINAL_VARIANT = dict(block_size=64, damping=0.002, order="ascending", inverse="plain")


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Activations O(1) in a random basis with a power-law spectrum (sigma_i = i^-0.7, so cond(H) ~ 1e3, as
    normed residual streams have) plus a shared mean offset. (With near-singular H, cond 1e7+, the
    original's never-downdated inverse loses to round-to-nearest; textbook GPTQ does not.)"""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    x = (torch.randn(n, cols, generator=g) * torch.arange(1, cols + 1).float().pow(-0.7)) @ basis.T
    x = x + 0.3 * x.std() * torch.randn(cols, generator=g)
    return x / x.std()


def random_layer(rows: int, cols: int, gain: float, seed: int):
    """(W, H): W ~ N(0, gain²/cols) -- gain > 1 mimics trained rows whose clip is above 1 (step above 1/31)."""
    g = torch.Generator().manual_seed(seed + 1000)
    w = torch.randn(rows, cols, generator=g) * gain / cols ** 0.5
    x = correlated_inputs(16 * cols, cols, seed)
    return w, x.T @ x / x.shape[0]


# (rows, cols, gain): cols not a multiple of 64 or 128 exercise the last partial block
LAYERS = [(48, 128, 1.0), (64, 200, 8.0), (32, 96, 20.0), (40, 160, 3.0)]


def test_row_scales_rule_against_torch_quantile():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 300, generator=g) * torch.logspace(-2, 1.5, 24)[:, None]
    w[3, 7] = 40.0  # an outlier row: clipping it must win
    s = gptq.row_scales(w)
    assert s.dtype == torch.float32 and s.shape == (24,)
    for r in range(24):
        best = None
        for p in gptq.SCALE_CANDIDATES:
            clip = torch.quantile(w[r].abs(), p)
            step = torch.clamp(clip / 31, min=1 / 31).half().float()
            err = (w[r] - torch.clamp(torch.round(w[r] / step), -31, 31) * step).square().sum()
            if best is None or err < best[0]:
                best = (err, step)
        assert s[r] == best[1], f"row {r}: scale {s[r].item()} != reference {best[1].item()}"
    # the floor is on the step: every row whose clip is below 1 gets exactly 1/31 (as stored, fp16)
    small = w.abs().amax(dim=1) < 1
    assert small.any() and (s[small] == torch.tensor(1 / 31).half().float()).all()
    assert (s >= torch.tensor(1 / 31).half().float()).all()


def test_rtn_codes_and_range():
    w, _ = random_layer(32, 64, 30.0, 1)
    s = gptq.row_scales(w)
    codes = gptq.quantize_rtn(w, s)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 31
    torch.testing.assert_close(codes.float(), torch.clamp(torch.round(w / s[:, None]), -31, 31), rtol=0, atol=0)


def naive_gptq(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Surgeon one column at a time, in float64, re-inverting H over the columns not yet
    fixed at every step (no Cholesky, no blocks): the definition GPTQ computes efficiently."""
    w = w.double().clone()
    h = h.double()
    s = s.double()
    codes = torch.zeros_like(w)
    remaining = order.tolist()
    while remaining:
        j, rest = remaining[0], remaining[1:]
        h_inv = torch.linalg.inv(h[remaining][:, remaining])
        q = torch.clamp(torch.round(w[:, j] / s), -31, 31)
        codes[:, j] = q
        err = (w[:, j] - q * s) / h_inv[0, 0]
        if rest:
            w[:, rest] -= err[:, None] * h_inv[0, 1:][None, :]
        remaining = rest
    return codes


@pytest.mark.parametrize("order", ["descending", "ascending", "none"])
def test_gptq_matches_naive_obs(order):
    w, h = random_layer(24, 40, 6.0, 7)
    damp = 0.01 * torch.diagonal(h).mean()
    h_damped = h + damp * torch.eye(40)
    s = gptq.row_scales(w)
    diag = torch.diagonal(h_damped)
    perm = {"descending": torch.argsort(diag, descending=True, stable=True),
            "ascending": torch.argsort(diag, stable=True), "none": torch.arange(40)}[order]
    ref = naive_gptq(w, h_damped, s, perm)
    got = gptq.quantize_layer(w, h, s, block_size=16, order=order)
    mismatched = (got.double() != ref).sum().item()
    assert mismatched <= 1, f"{mismatched} of {ref.numel()} codes differ from the naive OBS solver"  # near-ties only


def test_block_size_does_not_change_textbook_gptq():
    """Lazy block updates are exact algebra: the codes cannot depend on the block size (up to fp32 ties)."""
    w, h = random_layer(64, 200, 8.0, 3)
    s = gptq.row_scales(w)
    base = gptq.quantize_layer(w, h, s, block_size=200)
    for bs in (1, 16, 64, 128):
        diff = (gptq.quantize_layer(w, h, s, block_size=bs) != base).float().mean().item()
        assert diff <= 1e-3, f"block_size={bs}: {diff:.4%} of codes differ"


def test_identity_hessian_is_round_to_nearest():
    """Uncorrelated, equal-variance inputs: GPTQ has nothing to compensate, so it is round-to-nearest."""
    w, _ = random_layer(16, 64, 10.0, 4)
    s = gptq.row_scales(w)
    got = gptq.quantize_layer(w, torch.eye(64), s, block_size=32)
    assert torch.equal(got, gptq.quantize_rtn(w, s))


def test_gptq_beats_rtn_on_every_layer_block_and_order(capsys):
    rows = []
    total_rtn = total_original = 0.0
    for i, (r, c, gain) in enumerate(LAYERS):
        w, h = random_layer(r, c, gain, 10 + i)
        s = gptq.row_scales(w)
        rtn = gptq.layer_objective(w, gptq.dequantize(gptq.quantize_rtn(w, s), s), h)
        for bs in (32, 64, 128):
            for order in gptq.ORDERS:
                codes = gptq.quantize_layer(w, h, s, block_size=bs, order=order)
                assert int(codes.abs().max()) <= 31 and codes.dtype == torch.int8
                obj = gptq.layer_objective(w, gptq.dequantize(codes, s), h)
                assert obj < rtn, f"layer {i} {r}x{c} block {bs} order {order}: GPTQ {obj:.4g} >= RTN {rtn:.4g}"
                rows.append((i, f"{r}x{c}", gain, bs, order, obj / rtn))
        codes = gptq.quantize_layer(w, h, s, **ORIGINAL_VARIANT)
        assert int(codes.abs().max()) <= 31
        original = gptq.layer_objective(w, gptq.dequantize(codes, s), h)
        total_rtn += rtn
        total_original += original
        rows.append((i, f"{r}x{c}", gain, 64, "original variant", original / rtn))
    with capsys.disabled():
        print("\nGPTQ objective / round-to-nearest objective, per layer:")
        for i, shape, gain, bs, order, ratio in rows:
            print(f"  layer {i} {shape:>7} gain {gain:>4}: block {bs:>3} {order:<17} {ratio:.3f}")
        print(f"  original variant, total over layers: {total_original / total_rtn:.3f}")
    assert total_original < total_rtn


def test_dead_columns_get_zero_codes():
    w, h = random_layer(16, 48, 10.0, 5)
    dead = torch.tensor([0, 17, 47])
    h[dead, :] = 0
    h[:, dead] = 0
    s = gptq.row_scales(w)
    codes = gptq.quantize_layer(w, h, s, block_size=16)
    assert (codes[:, dead] == 0).all()
    obj = gptq.layer_objective(w, gptq.dequantize(codes, s), h)
    assert obj < gptq.layer_objective(w, gptq.dequantize(gptq.quantize_rtn(w, s), s), h)


def test_int8_row_quantize():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(20, 512, generator=g) * torch.logspace(-3, 0.5, 20)[:, None]
    codes, s = gptq.int8_row_quantize(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    clip = torch.quantile(w.abs(), gptq.INT8_CLIP_QUANTILE, dim=1)
    torch.testing.assert_close(s, torch.clamp(clip / 127, min=1 / 127).half().float(), rtol=0, atol=0)
    inside = w.abs() <= clip[:, None]
    err = (gptq.dequantize(codes, s) - w).abs()
    assert (err[inside] <= (s[:, None] / 2 + 1e-7).expand_as(w)[inside]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(hessian=torch.eye(5)), r"hessian: expected shape \(8, 8\)"),
    (dict(scale=torch.ones(3)), r"scale: expected shape \(4,\)"),
    (dict(order="random"), "order='random'"),
    (dict(inverse="lu"), "inverse='lu'"),
    (dict(block_size=0), "block_size=0"),
    (dict(weight=torch.full((4, 8), float("nan"))), "weight: contains NaN"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(weight=torch.randn(4, 8), hessian=torch.eye(8), scale=torch.ones(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gptq.quantize_layer(args.pop("weight"), args.pop("hessian"), args.pop("scale"), **args)
