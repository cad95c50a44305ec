"""Muon (SPEC 4) against hand-written references: float64 spectral maps, a frozen copy of the quintic path
as it was before the R1 options (it must stay bit-identical), and an independent fp32 reference of R1's
per-matrix update (MuonEq-R row norm + Polar Express)."""
import math
import threading

import pytest
import torch

from train.muon import (NS_COEFFS, POLAR_EXPRESS_COEFFS, Muon, momentum_at, newton_schulz, newton_schulz5,
                        row_normalize)


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


# ---- The default path, frozen: these copies are what Muon computed before the R1 options existed. ----

def _frozen_newton_schulz5(grad, steps=5, eps=1e-7):
    """Verbatim math of newton_schulz5 before Polar Express was added (coefficients written out)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


def _frozen_muon_step(params, grads, buffers, lr, mu, wd, backend_steps=5):
    """Muon.step before the R1 options, on one CPU rank: the same flat fp32 buffer, ops and order."""
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if buffers[i] is None:
            buffers[i] = torch.zeros_like(g)
        buffers[i].mul_(mu).add_(g)
        g = g.add(buffers[i], alpha=mu)
        update = _frozen_newton_schulz5(g, steps=backend_steps)
        update = update * math.sqrt(max(1.0, p.size(0) / p.size(1)))
        flat[offset:offset + n] = update.flatten()
        offset += n
    offset = 0
    for p in params:
        n = p.numel()
        update = flat[offset:offset + n].view_as(p).to(p.dtype)
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(update, alpha=-lr)
        offset += n


@pytest.mark.parametrize("shape", [(96, 40), (24, 80), (32, 32)])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_quintic_newton_schulz_bit_identical_to_frozen_copy(shape, steps):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(steps))
    frozen = _frozen_newton_schulz5(g, steps=steps)
    assert torch.equal(newton_schulz5(g, steps=steps), frozen)
    assert torch.equal(newton_schulz(g, steps=steps), frozen)  # the quintic is newton_schulz's default
    assert torch.equal(newton_schulz(g, steps=steps, coeffs=NS_COEFFS), frozen)


@pytest.mark.parametrize("explicit_defaults", [False, True])
def test_muon_default_step_bit_identical_to_frozen_step(explicit_defaults):
    gen = torch.Generator().manual_seed(7)
    shapes = [(64, 16), (16, 48), (24, 24)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    frozen_params = [p.detach().clone() for p in params]
    frozen_buffers = [None] * len(shapes)
    options = dict(row_normalize=False, ns="quintic", momentum_dtype=None) if explicit_defaults else {}
    opt = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.04, **options)
    for step in range(4):
        mu, lr = momentum_at(step, 0.85, 0.95, 3), 0.02 * (1.0 - 0.2 * step)
        opt.param_groups[0]["momentum"], opt.param_groups[0]["lr"] = mu, lr
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        _frozen_muon_step(frozen_params, grads, frozen_buffers, lr, mu, 0.04)
    for p, ref, buf, ref_buf in zip(params, frozen_params, (opt.state[p]["momentum_buffer"] for p in params),
                                    frozen_buffers):
        assert torch.equal(p.detach(), ref)
        assert torch.equal(buf, ref_buf)


# ---- R1's Muon: MuonEq-R row normalization and Polar Express, from the record's description. ----

# R1's five (a, b, c), written out here rather than imported, so a wrong table in train.muon fails.
R1_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def test_polar_express_table_is_r1s():
    assert POLAR_EXPRESS_COEFFS == R1_POLAR_EXPRESS


def _polar_spectral_reference(g, tuples):
    """float64: Polar Express maps each singular value s of G/||G||_F through a s + b s^3 + c s^5, one tuple
    after another, and keeps the singular vectors."""
    g = g.double()
    u, s, vh = torch.linalg.svd(g / (g.norm() + 1e-7), full_matrices=False)
    for a, b, c in tuples:
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(96, 40), (24, 80), (40, 40)])
@pytest.mark.parametrize("steps, tuples_used", [(5, 5), (9, 5), (3, 3), (1, 1)])
def test_polar_newton_schulz_runs_the_first_steps_tuples(shape, steps, tuples_used):
    gen = torch.Generator().manual_seed(3)
    sv = torch.linspace(0.05, 1.0, min(shape), dtype=torch.float64)  # condition number 20
    g = _matrix_with_singular_values(*shape, sv, gen).float()
    out = newton_schulz(g, steps=steps, coeffs=POLAR_EXPRESS_COEFFS)
    assert out.shape == g.shape and out.dtype == torch.float32
    ref = _polar_spectral_reference(g, R1_POLAR_EXPRESS[:tuples_used])
    err = (out.double() - ref).abs().max().item()
    assert err < 3e-5 * ref.abs().max().item(), f"max abs error {err:.3e} against the first {tuples_used} tuples"
    if tuples_used < 5:  # and it is not the full schedule's result
        full = _polar_spectral_reference(g, R1_POLAR_EXPRESS)
        assert (out.double() - full).abs().max().item() > 100 * err


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (512, 128)])
def test_polar_express_lands_singular_values_near_one(shape):
    """A Gaussian 2:1 or 4:1 matrix has a normalized spectrum in about [0.02, 0.15]; Polar Express's five
    polynomials bring every singular value within 0.15 of 1 (they equioscillate at about +-0.141), which
    the quintic's five steps do not (its smallest land near 0.68)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    s = torch.linalg.svdvals(newton_schulz(g, coeffs=POLAR_EXPRESS_COEFFS).double())
    assert (s - 1).abs().max().item() <= 0.15, f"singular values in [{s.min():.3f}, {s.max():.3f}]"
    s_quintic = torch.linalg.svdvals(newton_schulz5(g).double())
    assert (s_quintic - 1).abs().max().item() > 0.15


def test_row_normalize_unit_rows_zero_rows_and_dtype():
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(6, 10, generator=gen) * torch.tensor([1e3, 1.0, 1e-3, 0.0, 5.0, 1e-9]).unsqueeze(1)
    out = row_normalize(u)
    norms = out.double().norm(dim=1)
    assert torch.allclose(norms[[0, 1, 2, 4]], torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.equal(out[3], torch.zeros(10))  # a zero row stays zero
    # A row whose norm is below eps is divided by eps, not blown up to unit norm.
    assert torch.allclose(out[5], u[5] / 1e-7, rtol=1e-6)
    assert torch.equal(row_normalize(torch.zeros(4, 3)), torch.zeros(4, 3))
    b = u[:3].bfloat16()
    out_bf16 = row_normalize(b)
    assert out_bf16.dtype == torch.bfloat16
    # fp32 norm, cast to bf16, then a bf16 divide.
    assert torch.equal(out_bf16, b / b.float().norm(dim=1, keepdim=True).bfloat16())


def _r1_reference_muon_update(w, buf, g, lr, mu, wd):
    """R1's per-matrix Muon in plain fp32, written from the record's description; returns (W, B) after.

    B <- mu B + G; U <- G + mu B; each row of U / max(||row||, 1e-7); X = U / (||U||_F + 1e-7) on the
    orientation with rows <= cols; for each of the five tuples A = X X^T, X <- a X + (b A + c A A) X;
    W <- W (1 - lr wd) - lr sqrt(max(1, rows/cols)) X.
    """
    rows, cols = w.shape
    buf = mu * buf + g
    u = g + mu * buf
    u = torch.stack([row / max(math.sqrt(float((row * row).sum())), 1e-7) for row in u])
    x = u.T if rows > cols else u
    x = x / (math.sqrt(float((x * x).sum())) + 1e-7)
    for a, b, c in R1_POLAR_EXPRESS:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if rows > cols else x
    scale = math.sqrt(max(1.0, rows / cols))
    return w * (1 - lr * wd) - lr * scale * x, buf


R1_SHAPES = [(32, 80), (48, 48), (128, 32), (40, 24)]  # wide, square, tall (4x: scale 2), the zero-grad one
ZERO_GRAD = 3


def _r1_grads(gen):
    grads = [torch.randn(s, generator=gen) for s in R1_SHAPES]
    grads[ZERO_GRAD] = torch.zeros(R1_SHAPES[ZERO_GRAD])
    return grads


def test_muon_r1_options_match_the_independent_reference():
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in R1_SHAPES]
    ref_w = [p.detach().clone() for p in params]
    ref_b = [torch.zeros(s) for s in R1_SHAPES]
    base_lr, wd = 0.026, 0.095
    opt = Muon(params, lr=base_lr, momentum=0.92, weight_decay=wd, row_normalize=True, ns="polar")
    for step in range(5):
        # As the trainer does: momentum and lr set on the param group before each step.
        mu, lr = momentum_at(step, 0.92, 0.97, 4), base_lr * (1.0 - 0.15 * step)
        opt.param_groups[0]["momentum"], opt.param_groups[0]["lr"] = mu, lr
        grads = _r1_grads(gen)
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref_w[i], ref_b[i] = _r1_reference_muon_update(ref_w[i], ref_b[i], g, lr, mu, wd)
        # An all-zero gradient (R1's padding matrices) gives an exactly zero update: decay only.
        assert torch.equal(params[ZERO_GRAD].detach(), before[ZERO_GRAD] * (1.0 - lr * wd))
        # The tall (4:1) matrix's step, undecayed, is 2x a near-orthogonal matrix: singular values 2 +- 15%.
        tall_update = (before[2] * (1.0 - lr * wd) - params[2].detach()).double() / lr
        assert (torch.linalg.svdvals(tall_update) / 2 - 1).abs().max().item() <= 0.15
        # fp32 both sides, differently ordered: they agree to ~1e-7 (observed <= 7e-8 on weights ~0.1).
        for i, (p, ref) in enumerate(zip(params, ref_w)):
            err = (p.detach() - ref).abs().max().item()
            assert err < 5e-7, f"step {step}, matrix {R1_SHAPES[i]}: Muon differs from R1's update by {err:.3e}"
    for p, ref in zip(params, ref_b):
        assert torch.allclose(opt.state[p]["momentum_buffer"], ref, rtol=0, atol=1e-6)


def test_round_robin_across_ranks_equals_the_per_matrix_update(monkeypatch):
    """Two ranks (threads), each orthogonalizing every other matrix, then a summing all-reduce: every
    rank's weights equal one rank doing every matrix, bit for bit."""
    world_size = 2
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen) * 0.05 for s in R1_SHAPES]
    steps_grads = [_r1_grads(gen) for _ in range(3)]
    options = dict(lr=0.026, momentum=0.95, weight_decay=0.095, row_normalize=True, ns="polar")

    single = [torch.nn.Parameter(w.clone()) for w in init]
    opt = Muon(single, rank=0, world_size=1, **options)
    for grads in steps_grads:
        for p, g in zip(single, grads):
            p.grad = g.clone()
        opt.step()

    barrier = threading.Barrier(world_size)
    posted = [None] * world_size

    def fake_all_reduce(tensor, op=None):
        rank = ranks[threading.get_ident()]
        posted[rank] = tensor.clone()
        barrier.wait()
        tensor.copy_(posted[0] + posted[1])
        barrier.wait()

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    ranks, results, errors = {}, [None] * world_size, []

    def run_rank(rank):
        ranks[threading.get_ident()] = rank
        try:
            params = [torch.nn.Parameter(w.clone()) for w in init]
            rank_opt = Muon(params, rank=rank, world_size=world_size, **options)
            for grads in steps_grads:
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                rank_opt.step()
            results[rank] = [p.detach() for p in params]
        except Exception as e:  # surfaced below; a dead thread would otherwise leave the barrier hanging
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run_rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for rank_params in results:
        for p, ref in zip(rank_params, single):
            assert torch.equal(p, ref.detach())


def test_bf16_momentum_buffer():
    """momentum_dtype=torch.bfloat16 (allowed on CPU too): the gradient is rounded to bf16 and the buffer
    stays bf16, B <- mu B + bf16(G) in bf16; the weights stay fp32 and p.grad is left as it was."""
    gen = torch.Generator().manual_seed(9)
    p = torch.nn.Parameter(torch.randn(16, 24, generator=gen) * 0.05)
    opt = Muon([p], lr=0.02, momentum=0.9, weight_decay=0.1, row_normalize=True, ns="polar",
               momentum_dtype=torch.bfloat16)
    expected = torch.zeros(16, 24, dtype=torch.bfloat16)
    for mu in (0.9, 0.93):
        opt.param_groups[0]["momentum"] = mu
        g = torch.randn(16, 24, generator=gen)
        p.grad = g.clone()
        opt.step()
        expected = expected.mul(mu).add(g.bfloat16())
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == torch.bfloat16
        assert torch.equal(buf, expected)
        assert torch.equal(p.grad, g) and p.dtype == torch.float32
        assert torch.isfinite(p).all()
    # With the default (None) the buffer keeps the gradient's dtype.
    q = torch.nn.Parameter(torch.zeros(4, 4))
    default = Muon([q], lr=0.02)
    q.grad = torch.ones(4, 4)
    default.step()
    assert default.state[q]["momentum_buffer"].dtype == torch.float32


def test_bad_options_raise():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"ns='cubic'; expected one of \['polar', 'quintic'\]"):
        Muon([p], lr=0.1, ns="cubic")
    with pytest.raises(ValueError, match="momentum_dtype"):
        Muon([p], lr=0.1, momentum_dtype=torch.int8)
    opt = Muon([p], lr=0.1)
    opt.param_groups[0]["ns"] = "Polar"  # a bad name set later is caught at the step, too
    p.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="expected one of"):
        opt.step()


def test_state_dict_without_the_r1_options_loads_with_them_off():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Muon([p], lr=0.1, row_normalize=True, ns="polar", momentum_dtype=torch.bfloat16)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("row_normalize", "ns", "momentum_dtype"):
            del group[key]
    opt.load_state_dict(old)
    group = opt.param_groups[0]
    assert (group["row_normalize"], group["ns"], group["momentum_dtype"]) == (False, "quintic", None)
