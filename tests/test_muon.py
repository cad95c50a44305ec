"""Muon (SPEC 4) against hand-written float64 references."""
import math

import pytest
import torch

from train.muon import NS_COEFFS, Muon, momentum_at, newton_schulz5


def _matrix_with_singular_values(rows, cols, singular_values, generator):
    """U diag(s) V^T with random orthonormal U, V: a matrix whose spectrum the test chooses."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    return u @ torch.diag(singular_values) @ v.T


def _ns_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The iteration written independently in float64: it only maps each singular value sigma of
    G/||G|| through x -> a x + b x^3 + c x^5, `steps` times, keeping the singular vectors."""
    a, b, c = NS_COEFFS
    g = g.double()
    u, s, vh = torch.linalg.svd(g / (g.norm() + 1e-7), full_matrices=False)
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(96, 40), (24, 80)])  # tall (transposed inside) and wide
def test_newton_schulz_singular_values_near_one(shape):
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    sv = torch.linspace(0.5, 2.0, k, dtype=torch.float64)  # condition number 4
    g = _matrix_with_singular_values(*shape, sv, gen).float()
    out = newton_schulz5(g)
    assert out.shape == g.shape and out.dtype == torch.float32  # fp32 on CPU
    s = torch.linalg.svdvals(out.double())
    # 5 steps of these coefficients do not orthogonalize exactly; they land the spectrum near 1.
    assert s.min() >= 0.6 and s.max() <= 1.2, f"singular values in [{s.min():.3f}, {s.max():.3f}]"
    # And the output is the float64 polynomial map of the spectrum, to fp32 rounding.
    ref = _ns_reference(g)
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-5 * ref.abs().max().item(), f"max abs error {err:.3e}"


def test_newton_schulz_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(3, 4, 5\)"):
        newton_schulz5(torch.zeros(3, 4, 5))


def test_momentum_ramp():
    assert momentum_at(0, 0.92, 0.99, 1500) == pytest.approx(0.92)
    assert momentum_at(750, 0.92, 0.99, 1500) == pytest.approx(0.955)
    assert momentum_at(1500, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert momentum_at(9000, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert momentum_at(3, 0.92, 0.99, 0) == pytest.approx(0.99)


def test_muon_step_matches_hand_written_update():
    gen = torch.Generator().manual_seed(1)
    shapes = [(48, 16), (16, 40)]  # scale sqrt(3) for the tall one, 1 for the wide one
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    lr, wd = 0.02, 0.04
    opt = Muon(params, lr=lr, momentum=0.9, weight_decay=wd)

    ref_p = [p.detach().double().clone() for p in params]
    ref_buf = [torch.zeros_like(p) for p in ref_p]
    for step in range(3):
        mu = momentum_at(step, 0.85, 0.95, 2)  # the loop ramps momentum through the param group
        opt.param_groups[0]["momentum"] = mu
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref_buf[i] = mu * ref_buf[i] + g.double()
            nesterov = g.double() + mu * ref_buf[i]
            rows, cols = shapes[i]
            update = _ns_reference(nesterov) * math.sqrt(max(1.0, rows / cols))
            ref_p[i] = ref_p[i] * (1 - lr * wd) - lr * update
    for p, ref in zip(params, ref_p):
        err = (p.detach().double() - ref).abs().max().item()
        assert err < 1e-6, f"Muon weights differ from the hand-written step by {err:.3e}"


def test_muon_skips_params_without_grad():
    a = torch.nn.Parameter(torch.ones(8, 8))
    b = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([a, b], lr=0.1, momentum=0.9, weight_decay=0.5)
    a.grad = torch.eye(8)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(8, 8))  # no grad: no update and no weight decay
    assert not torch.equal(a.detach(), torch.ones(8, 8))


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(7,\)"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(7))], lr=0.1)
