"""The Triton GPTQ (kernels/gptq.py) against its PyTorch reference (quantize_layer_reference, the same file).

Contract: codes equal the reference's except at most 0.1% off by one (float summation order near
rounding ties), and the layer objective ||(W - Q)X||² within 1% of the reference's. On a machine
without CUDA the block kernel runs through the Triton interpreter, so the layers are small.
"""
import pytest
import torch

from kernels.gptq import gptq_block_reference, gptq_block_triton, quantize_layer_reference, quantize_layer_triton
from quant.gptq import layer_objective, quantize_rtn, row_scales

from conftest import DEVICE

MAX_CODE_MISMATCH = 1e-3


def _calibration(cols: int, dead: list, seed: int, n: int = 1024) -> torch.Tensor:
    """Correlated inputs like a layer's activations: a shared low-rank part, mixed channels with very
    different scales (a few outlier channels), and dead channels that never move. Returns H = XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g)
    mixed = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5)
    channel_scale = torch.exp(0.7 * torch.randn(cols, generator=g))
    x = (0.5 * shared + mixed) * channel_scale
    x[:, dead] = 0.0
    return (x.T @ x / n).to(DEVICE)


def _weight(rows: int, cols: int, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * std).to(DEVICE)


def compare_codes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.int8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    assert int(got.abs().max()) <= 31, f"{what}: codes outside [-31, 31]"
    diff = (got.int() - want.int()).abs()
    off = torch.nonzero(diff)
    assert int(diff.max()) <= 1 and len(off) <= MAX_CODE_MISMATCH * got.numel(), (
        f"{what}: {len(off)} of {got.numel()} codes differ (max by {int(diff.max())}); first at "
        + ", ".join(f"{tuple(i)}: got {int(got[tuple(i)])} want {int(want[tuple(i)])}" for i in off[:5].tolist()))


def test_block_kernel_matches_block_reference():
    # One partial block (50 of a 64-wide tile) over 40 rows (not a multiple of the row tile).
    rows, width = 40, 50
    h = _calibration(width, dead=[], seed=1).cpu() + 0.01 * torch.eye(width)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(DEVICE)
    w = _weight(rows, width, 0.3, seed=2)
    scale = row_scales(w)
    codes, err = gptq_block_triton(w, u, scale)
    want_codes, want_err = gptq_block_reference(w, u, scale)
    compare_codes(codes, want_codes, "block codes")
    rel = ((err - want_err).norm() / want_err.norm()).item()
    assert torch.isfinite(err).all() and rel < 1e-5, f"block errors differ: relative {rel:.3g}"


# Pairwise over: block size (full and partial last block), column order, inverse, damping, and the
# weight regime (std 0.07: the 1/31 step floor binds, codes near 0; std 0.5: row scales above it).
LAYERS = [
    dict(rows=64, cols=200, std=0.07, block_size=64, order="descending", inverse="cholesky", damping=0.01),
    dict(rows=64, cols=200, std=0.5, block_size=128, order="ascending", inverse="cholesky", damping=0.01),
    dict(rows=48, cols=96, std=0.5, block_size=64, order="ascending", inverse="plain", damping=0.002),
    dict(rows=32, cols=72, std=0.07, block_size=32, order="none", inverse="plain", damping=0.01),
]


@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: f"{s['rows']}x{s['cols']}-b{s['block_size']}-{s['order']}-{s['inverse']}")
def test_layer_matches_reference(spec):
    dead = [3, 17, spec["cols"] - 1]
    h = _calibration(spec["cols"], dead, seed=spec["cols"])
    w = _weight(spec["rows"], spec["cols"], spec["std"], seed=spec["rows"])
    scale = row_scales(w)
    options = {k: spec[k] for k in ("block_size", "order", "inverse", "damping")}
    codes = quantize_layer_triton(w, h, scale, **options)
    want = quantize_layer_reference(w, h, scale, **options)
    compare_codes(codes, want, f"layer {spec}")
    assert torch.all(codes[:, dead] == 0), "dead columns must quantize to 0"

    objective = layer_objective(w, codes.float() * scale[:, None], h)
    reference = layer_objective(w, want.float() * scale[:, None], h)
    rtn = layer_objective(w, quantize_rtn(w, scale).float() * scale[:, None], h)
    print(f"{spec}: objective triton {objective:.6g}, reference {reference:.6g}, round-to-nearest {rtn:.6g}")
    assert abs(objective - reference) <= 0.01 * reference, (objective, reference)
    if spec["inverse"] == "cholesky":  # textbook GPTQ never does worse than rounding
        assert objective <= rtn, (objective, rtn)


def test_bad_input_is_rejected_with_the_argument_named():
    w = _weight(8, 16, 0.3, seed=3)
    h = _calibration(16, [], seed=4)
    s = row_scales(w)
    with pytest.raises(ValueError, match=r"hessian must be \[16, 16\].*got \(15, 15\)"):
        quantize_layer_triton(w, h[:15, :15], s)
    with pytest.raises(ValueError, match=r"scale must be \[8\]"):
        quantize_layer_triton(w, h, s[:7])
    with pytest.raises(ValueError, match=r"block_size=300 must be in \[1, 256\]"):
        quantize_layer_triton(w, h, s, block_size=300)
    with pytest.raises(ValueError, match="order='random'"):
        quantize_layer_triton(w, h, s, order="random")
    with pytest.raises(ValueError, match="scale .* must be >= 0"):  # a step of 0 is allowed: it codes 0
        quantize_layer_triton(w, h, -s)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight .* non-finite"):
        quantize_layer_triton(bad, h, s)
