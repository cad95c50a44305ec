"""The fused residual + RMSNorm kernels (kernels/norm.py) against their fp32 PyTorch references.

Every case runs forward and backward and checks every output (the residual streams and h) and every
input gradient (dx, dx0, d(mix); dx, dbranch, d(gain); dx; the skip merge's dx, dkept, d(weight),
d(gate), dx0, d(mix); the two-lane update's dlanes, dbranches, d(scales), d(resid), d(post)). Three
precisions:
  fp32      everything fp32: fixed bars (summation order and FMA contraction are the only differences);
  bf16      everything bf16: at most twice the error of the same reference run by PyTorch in bf16;
  autocast  what the model runs on CUDA: fp32 stream and parameters, bf16 branches (matmul outputs),
            under autocast, so h comes out bf16. fp32 results keep the fixed bars; a bf16 result may be
            at most twice the error of the fp32 reference rounded to bf16 (what the next matmul reads on
            the PyTorch path).
On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py).
"""
import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.norm import (add_norm_reference, add_norm_triton, lane_update_backward, lane_update_reference,
                          lane_update_triton, mix_norm_reference, mix_norm_triton, norm_backward, norm_forward,
                          rms_norm_reference, rms_norm_triton, skip_mix_norm_backward, skip_mix_norm_forward,
                          skip_mix_norm_reference, skip_mix_norm_triton, MODE_MIX)
from kernel_checks import (assert_same_losses, check_close, compile_recording_graphs, hold_on_torch,
                           train_tiny_losses)

from conftest import DEVICE
from kernels.selftest import BARS
# the family's bars, defined once in kernels/selftest.py (the start-up self-test holds kernels to them too);
# lane_update has its own (its d(resid) and d(post) are sums over every element of the stream)
NORM_BARS, LANE_BARS = BARS["norm"], BARS["lane_update"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more only fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# The ops in one harness: inputs, names of the results and gradients
# ---------------------------------------------------------------------------------------------------
# skip_mix_norm runs in six forms: gated by lerp (R1) or additive (gate None, the crawler), keeping both
# residuals, x_in alone (a sequential slot) or merged alone (a two-lane slot). Each is an op of the harness,
# "skip_mix_norm[<gate>-<keep>]", whose leaves leave out a missing gate and whose outputs leave out the
# residual not kept (the reference's then gets no gradient, as the kernel's is not written).
SKIP_GATES = ("lerp", "add")
SKIP_KEEPS = {"both": (0, 1, 2), "x_in": (1, 2), "merged": (0, 2)}  # outputs kept of (merged, x_in, h)


def _skip_op(gate, keep):
    kept = SKIP_KEEPS[keep]
    flags = dict(keep_merged=0 in kept, keep_x_in=1 in kept)

    def with_gate(fn):  # the leaves without the gate when it is None
        return fn if gate == "lerp" else lambda x, kept_, w, x0, mix, *rest, **kw: fn(x, kept_, w, None, x0, mix, *rest, **kw)

    reference = with_gate(lambda *a, eps=None: tuple(skip_mix_norm_reference(*a, eps)[i] for i in kept))
    kernel = with_gate(lambda *a: tuple(skip_mix_norm_triton(*a, **flags)[i] for i in kept))
    grads = ("dx", "dkept", "dweight") + (("dgate",) if gate == "lerp" else ()) + ("dx0", "dmix")
    return reference, kernel, tuple(("merged", "x_in", "h")[i] for i in kept) + grads


OPS = {  # name -> (reference(*leaves, *constants, eps=None), kernel entry, names of outputs and input gradients)
    "mix_norm": (mix_norm_reference, mix_norm_triton, ("x_in", "h", "dx", "dx0", "dmix")),
    "add_norm": (add_norm_reference, add_norm_triton, ("x_new", "h", "dx", "dbranch", "dgain")),
    "rms_norm": (lambda x, s, eps=None: (rms_norm_reference(x, s, eps),), lambda x, s: (rms_norm_triton(x, s),),
                 ("h", "dx")),
    **{f"skip_mix_norm[{gate}-{keep}]": _skip_op(gate, keep) for gate in SKIP_GATES for keep in SKIP_KEEPS},
    "lane_update": (lambda *a, eps=None: lane_update_reference(*a), lane_update_triton,
                    ("lane0", "lane1", "dlane0", "dlane1", "dattn_out", "dmlp_out", "dattn_scale", "dmlp_scale",
                     "dresid", "dpost")),
}
# The leaves that are matmul outputs, so bf16 under autocast (the other leaves stay fp32 there).
MATMUL_OUTPUTS = {"add_norm": (1,), "lane_update": (2, 3)}


def _inputs(op, lead, d, seed):
    """(leaves, constants) of op with realistic scales: the residual stream, x0, kept, branches O(1); mix, gain,
    the skip weights and the branch scales near their inits (1, 0); skip gates spread on both sides of 0 (both
    of lerp's formulas); the lane lambdas near R1's inits (1.1 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    mix = lambda: torch.stack((1 + 0.2 * randn(d), 0.5 * randn(d)))
    scale = 1.0 / math.sqrt(seed % 5 + 1)
    x = randn(*lead, d)
    if op == "mix_norm":
        m = mix()
        tensors, constants = [x, randn(*lead, d), m], (scale,)
    elif op == "add_norm":
        tensors, constants = [x, randn(*lead, d), 1 + 0.2 * randn(d)], (scale,)
    elif op == "rms_norm":
        tensors, constants = [x], (scale,)
    elif op.startswith("skip_mix_norm"):
        gate = [randn(d)] if "[lerp" in op else []
        tensors, constants = [x, randn(*lead, d), 1 + 0.2 * randn(d), *gate, randn(*lead, d), mix()], (scale,)
    else:
        assert op == "lane_update", op
        tensors = [x, randn(*lead, d), randn(*lead, d), randn(*lead, d), 1 + 0.2 * randn(d), 1 + 0.2 * randn(d),
                   1.1 + 0.1 * randn(2), 1 + 0.2 * randn(2, 2)]
        constants = ()
    return [t.to(DEVICE) for t in tensors], constants


def _run(fn, leaves, constants, upstream, autocast=False):
    """Outputs and input gradients of fn(*leaves, *constants) with the given upstream gradients (cast to each
    output's dtype, as autograd would hand them over)."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        outs = fn(*leaves, *constants)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check(name, got, ref, torch_bf16=None, bars=NORM_BARS):
    """got vs the fp32 reference: fixed bars for fp32 results, 2x the PyTorch bf16 path's error for bf16 ones
    (torch_bf16 None for a bf16 result: the reference rounded to bf16 is that path)."""
    if got.dtype == torch.bfloat16 and torch_bf16 is None:
        torch_bf16 = ref.to(torch.bfloat16)
    check_close(name, got, ref, torch_bf16, **dataclasses.asdict(bars))


def _compare_to_reference(op, lead, d, precision, seed=0):
    reference, kernel, names = OPS[op]
    inputs, constants = _inputs(op, lead, d, seed)
    if precision == "bf16":
        leaves = [t.to(torch.bfloat16) for t in inputs]
    elif precision == "autocast":
        leaves = [t.to(torch.bfloat16) if i in MATMUL_OUTPUTS.get(op, ()) else t for i, t in enumerate(inputs)]
    else:
        leaves = inputs
    gen = torch.Generator().manual_seed(seed + 100)
    n_out = len(names) - len(leaves)
    upstream = [torch.randn(*lead, d, generator=gen).to(DEVICE) for _ in range(n_out)]
    out = _run(kernel, leaves, constants, upstream, autocast=precision == "autocast")
    # The reference sees exactly what the kernel saw: the same rounded inputs and upstream gradients.
    upstream = [g.to(o.dtype).float() for o, g in zip(out, upstream)]
    # bf16 inputs are normalized with bf16's eps (F.rms_norm's default for them), so the fp32 reference is too.
    eps = torch.finfo(leaves[0].dtype).eps
    ref = _run(lambda *a: reference(*a, eps=eps), [t.float() for t in leaves], constants, upstream)
    baseline = _run(reference, leaves, constants, upstream) if precision == "bf16" else [None] * len(names)
    # Under autocast only h changes dtype (to bf16); every residual output keeps the stream's dtype.
    expected = {"fp32": [torch.float32] * len(names), "bf16": [torch.bfloat16] * len(names),
                "autocast": [torch.bfloat16 if name == "h" else torch.float32 for name in names[:n_out]]
                + [t.dtype for t in leaves]}[precision]
    assert [t.dtype for t in out] == expected, (names, [t.dtype for t in out])
    for name, got, want, base in zip(names, out, ref, baseline):
        _check(f"{op} {name}", got, want, base, LANE_BARS if op == "lane_update" else NORM_BARS)


# ---------------------------------------------------------------------------------------------------
# The references themselves
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_reference_gradcheck_fp64(op):
    inputs, constants = _inputs(op, (3, 5), 6, seed=3)
    leaves = [t.double().cpu().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: OPS[op][0](*a, *constants), leaves)


def test_references_are_the_spec_formulas():
    # SPEC 3: x_in = m0⊙x + m1⊙x0; h = x_in / sqrt(mean(x_in²) + eps) · s, eps = finfo(dtype).eps; the
    # attention residual x + a⊙branch normalized the same way.
    x, x0, mix = [t.double().cpu() for t in _inputs("mix_norm", (9,), 8, seed=4)[0]]
    s = 0.5
    eps = torch.finfo(torch.float64).eps
    norm = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    x_in = mix[0] * x + mix[1] * x0
    for got, want in zip(mix_norm_reference(x, x0, mix, s), (x_in, norm(x_in) * s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gain = mix[0]
    for got, want in zip(add_norm_reference(x, x0, gain, s), (x + gain * x0, norm(x + gain * x0) * s)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms_norm_reference(x), norm(x), rtol=1e-12, atol=1e-12)


def test_skip_and_lane_references_are_r1s_formulas():
    # MODEL.md §2.4: x <- lerp(w⊙s, x, σ(g)) = w⊙s + σ(g)⊙(x − w⊙s) with skip gates, x + w⊙s without; then the
    # block's mix and norm (§2.5). §2.8: lane_k <- r_k·lane_k + P[0,k]·A + P[1,k]·M, A = a⊙Attn, M = m⊙MLP.
    x, kept, w, g, x0, mix = [t.double().cpu() for t in _inputs("skip_mix_norm[lerp-both]", (9,), 8, seed=4)[0]]
    s = 0.5
    eps = torch.finfo(torch.float64).eps
    norm = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    for gate, merged in ((g, w * kept + torch.sigmoid(g) * (x - w * kept)), (None, x + w * kept)):
        x_in = mix[0] * merged + mix[1] * x0
        for got, want in zip(skip_mix_norm_reference(x, kept, w, gate, x0, mix, s), (merged, x_in, norm(x_in) * s)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    lane0, lane1, attn, mlp, a, m, r, p = [t.double().cpu() for t in _inputs("lane_update", (9,), 8, seed=4)[0]]
    for k, (got, lane) in enumerate(zip(lane_update_reference(lane0, lane1, attn, mlp, a, m, r, p), (lane0, lane1))):
        torch.testing.assert_close(got, r[k] * lane + p[0, k] * (a * attn) + p[1, k] * (m * mlp), rtol=1e-12, atol=1e-12)


def test_torch_path_is_the_model_maths_bit_for_bit():
    """KERNELS=torch must not change the model's numbers: the references are the block's old expressions."""
    (x, x0, mix), (s,) = _inputs("mix_norm", (4, 7), 32, seed=5)
    x_in, h = mix_norm_reference(x, x0, mix, s)
    assert torch.equal(x_in, mix[0] * x + mix[1] * x0)
    assert torch.equal(h, F.rms_norm(x_in, (32,)) * s)
    x_new, h2 = add_norm_reference(x_in, x0, mix[1], s)
    assert torch.equal(x_new, x_in + mix[1] * x0) and torch.equal(h2, F.rms_norm(x_new, (32,)) * s)
    assert torch.equal(rms_norm_reference(x), F.rms_norm(x, (32,)))


@pytest.mark.parametrize("stream, branch", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "autocast"])
def test_skip_and_lane_torch_paths_are_the_model_maths_bit_for_bit(stream, branch):
    """KERNELS=torch keeps the numbers of the separate ops the model ran before these fusions (the pinned
    crawler run depends on it): the skip merge (x + w⊙s, or torch.lerp(w⊙s, x, σ(g))), then mix_norm; the
    lane update (resid·lane + post·(attn_scale⊙A)) + post·(mlp_scale⊙M). In each dtype mix the model runs:
    fp32, bf16, and an fp32 stream with bf16 branches (matmul outputs under autocast)."""
    (x, kept, w, g, x0, mix), (s,) = _inputs("skip_mix_norm[lerp-both]", (4, 7), 32, seed=5)
    x, kept, w, g, x0, mix = (t.to(stream) for t in (x, kept, w, g, x0, mix))
    for gate in (g, None):
        merged = x + w * kept if gate is None else torch.lerp(w * kept, x, torch.sigmoid(gate))
        want = (merged, *mix_norm_reference(merged, x0, mix, s))
        got = skip_mix_norm_reference(x, kept, w, gate, x0, mix, s)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"gate={gate is not None}"
    (lane0, lane1, attn, mlp, attn_scale, mlp_scale, resid, post), _ = _inputs("lane_update", (4, 7), 32, seed=5)
    lane0, lane1, attn_scale, mlp_scale, resid, post = (
        t.to(stream) for t in (lane0, lane1, attn_scale, mlp_scale, resid, post))
    attn, mlp = attn.to(branch), mlp.to(branch)
    A, M = attn_scale * attn, mlp_scale * mlp
    want = (resid[0] * lane0 + post[0, 0] * A + post[1, 0] * M, resid[1] * lane1 + post[0, 1] * A + post[1, 1] * M)
    got = lane_update_reference(lane0, lane1, attn, mlp, attn_scale, mlp_scale, resid, post)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------------
# The kernels against the references
# ---------------------------------------------------------------------------------------------------
# Pairwise cover of op x rows x d x precision (every pair of values appears in some row): d = 48 is no
# power of two (masked columns), 128 is; M = 1, 37 (one partial row block), 2 x 64, and 1000 rows,
# which makes every backward program loop over several row blocks. skip_mix_norm's forms have their own
# pairwise cover of gate x keep x rows x d x precision, and lane_update its rows, both with an odd d = 45.
PAIRWISE = [
    ("mix_norm", (1,), 48, "fp32"),
    ("mix_norm", (37,), 128, "bf16"),
    ("mix_norm", (2, 64), 48, "autocast"),
    ("mix_norm", (1000,), 128, "fp32"),
    ("add_norm", (1,), 128, "autocast"),
    ("add_norm", (37,), 48, "fp32"),
    ("add_norm", (2, 64), 128, "bf16"),
    ("add_norm", (1000,), 48, "autocast"),
    ("rms_norm", (1,), 48, "bf16"),
    ("rms_norm", (37,), 128, "autocast"),
    ("rms_norm", (2, 64), 128, "fp32"),
    ("rms_norm", (1000,), 48, "bf16"),
    ("skip_mix_norm[lerp-both]", (1,), 45, "fp32"),
    ("skip_mix_norm[add-x_in]", (1,), 128, "bf16"),
    ("skip_mix_norm[lerp-merged]", (1,), 45, "autocast"),
    ("skip_mix_norm[add-both]", (37,), 45, "bf16"),
    ("skip_mix_norm[lerp-x_in]", (37,), 128, "autocast"),
    ("skip_mix_norm[add-merged]", (37,), 45, "fp32"),
    ("skip_mix_norm[lerp-both]", (2, 64), 128, "autocast"),
    ("skip_mix_norm[add-x_in]", (2, 64), 45, "fp32"),
    ("skip_mix_norm[lerp-merged]", (2, 64), 128, "bf16"),
    ("skip_mix_norm[add-both]", (1000,), 128, "fp32"),
    ("skip_mix_norm[lerp-x_in]", (1000,), 45, "bf16"),
    ("skip_mix_norm[add-merged]", (1000,), 128, "autocast"),
    ("lane_update", (1,), 45, "bf16"),
    ("lane_update", (37,), 45, "autocast"),
    ("lane_update", (2, 64), 128, "fp32"),
    ("lane_update", (2, 64), 128, "bf16"),
    ("lane_update", (1000,), 45, "fp32"),
    ("lane_update", (1000,), 128, "autocast"),
]


@pytest.mark.parametrize("op, lead, d, precision", PAIRWISE,
                         ids=[f"{c[0]}-M{math.prod(c[1])}-d{c[2]}-{c[3]}" for c in PAIRWISE])
def test_matches_reference(op, lead, d, precision):
    _compare_to_reference(op, lead, d, precision, seed=len(lead) + d)


def test_saved_rstd_and_partial_sums():
    """The forward keeps only rstd = 1/sqrt(mean(x_in²) + eps) per row (fp32); the backward's d(mix) is the
    same whether reduced by one program or by several grid-stride programs over 1000 rows."""
    (x, x0, mix), (s,) = _inputs("mix_norm", (1000,), 48, seed=6)
    x_in, h, rstd = norm_forward(MODE_MIX, x, x0, mix, s, torch.float32)
    assert rstd.shape == (1000,) and rstd.dtype == torch.float32
    want = torch.rsqrt(x_in.double().pow(2).mean(-1) + torch.finfo(torch.float32).eps)
    _check("rstd", rstd, want.float())
    dx_in, dh = torch.randn_like(x), torch.randn_like(x)
    _, _, dmix = norm_backward(MODE_MIX, dx_in, dh, x, x0, mix, rstd, s)
    leaves = [t.clone().requires_grad_() for t in (x, x0, mix)]
    torch.autograd.backward(mix_norm_reference(*leaves, s), (dx_in, dh))
    _check("dmix", dmix, leaves[2].grad)
    # Four launches over 250 rows each, summed: a different split into programs, the same parameter gradient.
    pieces = [norm_backward(MODE_MIX, dx_in[i:i + 250], dh[i:i + 250], x[i:i + 250], x0[i:i + 250], mix,
                            rstd[i:i + 250], s)[2] for i in range(0, 1000, 250)]
    _check("dmix over 4 launches", sum(pieces), dmix)


def test_skip_and_lane_parameter_gradients_over_several_launches():
    """Their parameter gradients are fp32 partial sums per program, summed on the host: they match the reference,
    and four launches over 250 rows each give the one launch's sums."""
    quarters = [slice(i, i + 250) for i in range(0, 1000, 250)]
    (lane0, lane1, attn, mlp, *params), _ = _inputs("lane_update", (1000,), 45, seed=13)
    g0, g1 = torch.randn_like(lane0), torch.randn_like(lane0)
    stream = (g0, g1, lane0, lane1, attn, mlp)
    whole = lane_update_backward(*stream, *params)[4:]
    split = [lane_update_backward(*(t[q] for t in stream), *params)[4:] for q in quarters]
    leaves = [t.clone().requires_grad_() for t in (lane0, lane1, attn, mlp, *params)]
    torch.autograd.backward(lane_update_reference(*leaves), (g0, g1))
    for name, got, pieces, leaf in zip(("dattn_scale", "dmlp_scale", "dresid", "dpost"), whole, zip(*split), leaves[4:]):
        _check(name, got, leaf.grad, bars=LANE_BARS)
        _check(f"{name} over 4 launches", sum(pieces), got, bars=LANE_BARS)

    (x, kept, weight, gate, x0, mix), (s,) = _inputs("skip_mix_norm[lerp-both]", (1000,), 45, seed=13)
    _, _, _, rstd = skip_mix_norm_forward(x, kept, weight, gate, x0, mix, s, torch.float32, True, True)
    upstream = [torch.randn_like(x) for _ in range(3)]  # d(merged), d(x_in), dh

    def backward(rows):
        dx, dkept, dweight, dgate, dx0, dmix = skip_mix_norm_backward(
            *(t[rows] for t in (*upstream, x, kept)), weight, gate, x0[rows], mix, rstd[rows], s)
        return dweight, dgate, dmix

    whole, split = backward(slice(None)), [backward(q) for q in quarters]
    leaves = [t.clone().requires_grad_() for t in (x, kept, weight, gate, x0, mix)]
    torch.autograd.backward(skip_mix_norm_reference(*leaves, s), upstream)
    for name, got, pieces, leaf in zip(("dweight", "dgate", "dmix"), whole, zip(*split), leaves[2:4] + leaves[5:]):
        _check(name, got, leaf.grad)
        _check(f"{name} over 4 launches", sum(pieces), got)


def _saved_for_backward(fn, leaves):
    """The tensors autograd keeps for the backward of fn(*leaves), in the order they are saved."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*(t.requires_grad_() for t in leaves))
    return saved


def test_what_the_backward_keeps():
    """skip_mix_norm keeps its inputs and rstd, never merged, x_in or h (the backward recomputes them: the
    parameter gradients read x and kept anyway); lane_update keeps its eight inputs and none of its outputs."""
    leaves, (s,) = _inputs("skip_mix_norm[lerp-both]", (5,), 16, seed=14)
    *inputs, rstd = _saved_for_backward(lambda *a: skip_mix_norm_triton(*a, s), leaves)
    assert [t.data_ptr() for t in inputs] == [t.data_ptr() for t in leaves]
    assert rstd.shape == (5,) and rstd.dtype == torch.float32
    leaves, _ = _inputs("lane_update", (5,), 16, seed=14)
    assert [t.data_ptr() for t in _saved_for_backward(lane_update_triton, leaves)] == [t.data_ptr() for t in leaves]


def test_skip_keep_flags_drop_outputs_not_numbers():
    """An output not kept is None on both paths, and the outputs kept are bit for bit those of the full call."""
    inputs, (s,) = _inputs("skip_mix_norm[lerp-both]", (37,), 45, seed=15)
    for fn in (skip_mix_norm_triton, skip_mix_norm_reference):
        full = fn(*inputs, s)
        for flags, dropped in (({"keep_merged": False}, 0), ({"keep_x_in": False}, 1)):
            part = fn(*inputs, s, **flags)
            assert part[dropped] is None, (fn.__name__, flags)
            assert all(torch.equal(part[i], full[i]) for i in range(3) if i != dropped), (fn.__name__, flags)


def test_lane_update_of_one_tensor_in_both_lanes():
    """The first two-lane slot without a skip starts both lanes from x itself: the kernel reads one tensor for
    both, and x's gradient is the sum of both lanes'."""
    (x, _, attn, mlp, *params), _ = _inputs("lane_update", (37,), 45, seed=16)
    names = ("lane0", "lane1", "dx", "dattn_out", "dmlp_out", "dattn_scale", "dmlp_scale", "dresid", "dpost")
    upstream = [torch.randn_like(x), torch.randn_like(x)]
    got = _run(lambda x, *rest: lane_update_triton(x, x, *rest), [x, attn, mlp, *params], (), upstream)
    want = _run(lambda x, *rest: lane_update_reference(x, x, *rest), [x, attn, mlp, *params], (), upstream)
    for name, a, b in zip(names, got, want):
        _check(name, a, b, bars=LANE_BARS)


def test_zero_rows():
    (x, b, gain), (s,) = _inputs("add_norm", (0,), 48, seed=7)
    leaves = [t.requires_grad_() for t in (x, b, gain)]
    x_new, h = add_norm_triton(*leaves, s)
    assert x_new.shape == h.shape == (0, 48)
    (x_new.sum() + h.sum()).backward()
    assert leaves[0].grad.shape == (0, 48) and torch.count_nonzero(leaves[2].grad) == 0
    leaves = [t.requires_grad_() for t in _inputs("skip_mix_norm[lerp-both]", (0,), 48, seed=7)[0]]
    outs = skip_mix_norm_triton(*leaves, s)
    assert [t.shape for t in outs] == [(0, 48)] * 3
    sum(t.sum() for t in outs).backward()
    assert leaves[0].grad.shape == (0, 48) and all(torch.count_nonzero(t.grad) == 0 for t in leaves[2:4] + leaves[5:])
    leaves = [t.requires_grad_() for t in _inputs("lane_update", (0,), 48, seed=7)[0]]
    outs = lane_update_triton(*leaves)
    assert [t.shape for t in outs] == [(0, 48)] * 2
    sum(t.sum() for t in outs).backward()
    assert leaves[0].grad.shape == (0, 48) and all(torch.count_nonzero(t.grad) == 0 for t in leaves[4:])


ENTRIES = {  # op -> (its Triton entry, the harness op that builds its inputs, its arguments' names)
    "mix_norm": (mix_norm_triton, "mix_norm", ("x", "x0", "mix")),
    "add_norm": (add_norm_triton, "add_norm", ("x", "branch", "gain")),
    "rms_norm": (rms_norm_triton, "rms_norm", ("x",)),
    "skip_mix_norm": (skip_mix_norm_triton, "skip_mix_norm[lerp-both]", ("x", "kept", "weight", "gate", "x0", "mix")),
    "lane_update": (lane_update_triton, "lane_update",
                    ("lane0", "lane1", "attn_out", "mlp_out", "attn_scale", "mlp_scale", "resid", "post")),
}


@pytest.mark.parametrize("op, changes, message", [
    ("mix_norm", dict(x0=lambda a: a["x0"][:, :15]), "mix_norm: x0 (4, 15) must have x's shape (4, 16)"),
    ("mix_norm", dict(mix=lambda a: a["mix"][0]), "mix_norm: mix (16,) must be (2, 16)"),
    ("mix_norm", dict(x0=lambda a: a["x0"].to(torch.bfloat16)), "x0 is torch.bfloat16, x is torch.float32"),
    ("add_norm", dict(gain=lambda a: a["gain"][:8]), "add_norm: gain (8,) must be (16,)"),
    ("add_norm", dict(branch=lambda a: a["branch"].half()), "branch is torch.float16"),
    ("add_norm", dict(gain=lambda a: a["gain"].to(torch.bfloat16)), "gain is torch.bfloat16 but x is torch.float32"),
    ("rms_norm", dict(x=lambda a: a["x"].double()), "rms_norm: x is torch.float64"),
    ("rms_norm", dict(x=lambda a: a["x"].new_zeros(2, 8192)), "d=8192 > 4096"),
    ("skip_mix_norm", dict(kept=lambda a: a["kept"][:, :15]), "skip_mix_norm: kept (4, 15) must have x's shape (4, 16)"),
    ("skip_mix_norm", dict(weight=lambda a: a["weight"][None]), "skip_mix_norm: weight (1, 16) must be (16,)"),
    ("skip_mix_norm", dict(gate=lambda a: a["gate"].to(torch.bfloat16)), "gate is torch.bfloat16 but x is torch.float32"),
    ("skip_mix_norm", dict(keep_merged=False, keep_x_in=False), "keep_merged and keep_x_in are both False"),
    ("lane_update", dict(lane1=lambda a: a["lane1"][:, :15]), "lane_update: lane1 (4, 15) must have lane0's shape (4, 16)"),
    ("lane_update", dict(lane0=lambda a: a["lane0"].double()), "lane_update: lane0 is torch.float64"),
    ("lane_update", dict(resid=lambda a: a["resid"][0]), "lane_update: resid () must be (2,)"),
    ("lane_update", dict(post=lambda a: a["post"].flatten()), "lane_update: post (4,) must be (2, 2)"),
    ("lane_update", dict(mlp_out=lambda a: a["mlp_out"].to(torch.bfloat16)),
     "attn_out is torch.float32 but mlp_out is torch.bfloat16"),
])
def test_bad_inputs_are_named(op, changes, message):
    entry, inputs_of, names = ENTRIES[op]
    inputs, constants = _inputs(inputs_of, (4,), 16, seed=8)
    args = {**dict(zip(names, inputs)), **dict(zip(("scale",), constants))}
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    with pytest.raises(ValueError) as err:
        entry(**args)
    assert message in str(err.value)


def test_entries_name_bad_shapes_of_any_rank():
    """The entries take [..., d] and validate once (the launchers below them trust what they pass): a
    scalar is named at the entry, whatever op it reaches."""
    (x, x0, mix), (s,) = _inputs("mix_norm", (2, 4), 16, seed=12)
    with pytest.raises(ValueError, match=r"mix_norm: x must be \[\.\.\., d\] with d >= 1, got shape \(\)"):
        mix_norm_triton(x[0, 0, 0], x0[0, 0, 0], mix, s)
    with pytest.raises(ValueError, match=r"rms_norm: x must be \[\.\.\., d\] with d >= 1, got shape \(4, 0\)"):
        rms_norm_triton(x[0, :, :0], s)


# ---------------------------------------------------------------------------------------------------
# The ops: dispatch, custom op registration, torch.compile
# ---------------------------------------------------------------------------------------------------
def test_dispatch_follows_the_backend(monkeypatch):
    module = importlib.import_module("kernels.norm")
    for op in ENTRIES:
        monkeypatch.setattr(module, f"{op}_triton", lambda *a, op=op, **flags: (f"{op} triton", flags))
        monkeypatch.setattr(module, f"{op}_reference", lambda *a, op=op, **flags: (f"{op} torch", flags))
    x, kept, weight, x0, mix = _inputs("skip_mix_norm[add-x_in]", (3,), 16, seed=9)[0]
    keep_both = {"keep_merged": True, "keep_x_in": True}
    calls, expected = [], []
    try:
        for backend in ("triton", "torch"):
            kernels.set_backend(backend)
            for op, (_, inputs_of, _) in ENTRIES.items():
                inputs, constants = _inputs(inputs_of, (3,), 16, seed=9)
                calls.append(getattr(kernels, op)(*inputs, *constants))
                expected.append((f"{op} {backend}", keep_both if op == "skip_mix_norm" else {}))
            calls.append(kernels.skip_mix_norm(x, kept, weight, None, x0, mix, 0.5, keep_merged=False))
            expected.append((f"skip_mix_norm {backend}", {"keep_merged": False, "keep_x_in": True}))
    finally:
        kernels.set_backend(None)
    assert calls == expected


def test_custom_op_opcheck():
    """Schema, fakes, autograd registration and AOT dispatch of all six custom ops (torch.library.opcheck)."""
    ops = torch.ops.ouroboros
    (x, x0, mix), (s,) = _inputs("mix_norm", (5,), 16, seed=10)
    (_, branch, gain), _ = _inputs("add_norm", (5,), 16, seed=10)
    dh = torch.randn_like(x)
    torch.library.opcheck(ops.mix_norm.default, (x.requires_grad_(), x0.requires_grad_(), mix.requires_grad_(), s,
                                                 torch.float32))
    torch.library.opcheck(ops.add_norm.default, (x, branch.requires_grad_(), gain.requires_grad_(), s, torch.float32))
    torch.library.opcheck(ops.rms_norm.default, (x, s, torch.float32))
    x, x0, mix, branch, gain = (t.detach() for t in (x, x0, mix, branch, gain))
    _, _, rstd = ops.mix_norm(x, x0, mix, s, torch.float32)
    torch.library.opcheck(ops.mix_norm_backward.default, (dh, dh, x, x0, mix, rstd, s))
    x_new, _, rstd = ops.add_norm(x, branch, gain, s, torch.float32)
    torch.library.opcheck(ops.add_norm_backward.default, (dh, dh, x_new, branch, gain, rstd, s))
    _, rstd = ops.rms_norm(x, s, torch.float32)
    torch.library.opcheck(ops.rms_norm_backward.default, (dh, x, rstd, s))


@pytest.mark.parametrize("gate, keep", [("lerp", "both"), ("lerp", "x_in"), ("lerp", "merged"), ("add", "x_in")])
def test_skip_mix_norm_opcheck(gate, keep):
    """Schema, fakes (an output not kept is an empty tensor), autograd registration and AOT dispatch of
    ouroboros::skip_mix_norm and its backward, with a gate and without (torch.library.opcheck)."""
    ops = torch.ops.ouroboros
    inputs, (s,) = _inputs(f"skip_mix_norm[{gate}-{keep}]", (5,), 16, seed=10)
    x, kept, weight, *maybe_gate, x0, mix = inputs
    gate_t = maybe_gate[0] if maybe_gate else None
    flags = (0 in SKIP_KEEPS[keep], 1 in SKIP_KEEPS[keep])
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, kept, weight, gate_t, x0, mix)]
    torch.library.opcheck(ops.skip_mix_norm.default, (*leaves, s, torch.float32, *flags))
    merged, x_in, _, rstd = ops.skip_mix_norm(x, kept, weight, gate_t, x0, mix, s, torch.float32, *flags)
    upstream = (torch.randn_like(merged), torch.randn_like(x_in), torch.randn_like(x))
    torch.library.opcheck(ops.skip_mix_norm_backward.default,
                          (*upstream, x, kept, weight, gate_t, x0, mix, rstd, s, *flags))


def test_lane_update_opcheck():
    ops = torch.ops.ouroboros
    inputs, _ = _inputs("lane_update", (5,), 16, seed=10)
    torch.library.opcheck(ops.lane_update.default, [t.clone().requires_grad_() for t in inputs])
    torch.library.opcheck(ops.lane_update_backward.default, (torch.randn_like(inputs[0]), torch.randn_like(inputs[0]),
                                                             *inputs))


def test_torch_compile_fullgraph_traces_the_ops():
    """A block's norm chain under torch.compile(fullgraph=True): no graph break, each op one node in the
    forward and backward graphs, the same loss and gradients as eager.

    Backend: AOTAutograd with recording compilers and no inductor (aot_eager-style), to keep it quick on
    CPU; on CUDA the trainer compiles the same graphs with inductor.
    """
    def chain(x, x0, mix, gain):
        x, h = kernels.mix_norm(x, x0, mix, 0.5)
        x, h = kernels.add_norm(x, torch.tanh(h), gain, 0.5)
        return (kernels.rms_norm(x + h) * x0).square().mean()

    (x, x0, mix), _ = _inputs("mix_norm", (2, 19), 48, seed=11)
    gain = _inputs("add_norm", (1,), 48, seed=11)[0][2]
    torch._dynamo.reset()
    try:
        kernels.set_backend("triton")
        compiled, graphs = compile_recording_graphs(chain)
        leaves = [t.clone().requires_grad_() for t in (x, x0, mix, gain)]
        loss = compiled(*leaves)
        loss.backward()
        eager = [t.clone().requires_grad_() for t in (x, x0, mix, gain)]
        eager_loss = chain(*eager)
        eager_loss.backward()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    for op in ("mix_norm", "add_norm", "rms_norm"):
        assert f"ouroboros.{op}.default" in graphs["forward"], graphs["forward"]
        assert f"ouroboros.{op}_backward.default" in graphs["backward"], graphs["backward"]
    _check("loss", loss.detach(), eager_loss.detach())
    for name, a, b in zip(("dx", "dx0", "dmix", "dgain"), leaves, eager):
        _check(name, a.grad, b.grad)


def test_torch_compile_fullgraph_traces_the_skip_and_lane_ops():
    """A two-lane slot after a gated skip (skip_mix_norm keeping merged, then lane_update), then a sequential
    slot's additive skip (keeping x_in), under torch.compile(fullgraph=True): no graph break, each op a node in
    the forward and backward graphs, the same loss and gradients as eager (AOTAutograd without inductor)."""
    def slots(x, kept, weight, gate, x0, mix, lane1, attn_scale, mlp_scale, resid, post):
        lane0, _, h = kernels.skip_mix_norm(x, kept, weight, gate, x0, mix, 0.5, keep_x_in=False)
        lane0, lane1 = kernels.lane_update(lane0, lane1, torch.tanh(h), torch.sin(lane1), attn_scale, mlp_scale,
                                           resid, post)
        _, x_in, h = kernels.skip_mix_norm(0.5 * (lane0 + lane1), kept, weight, None, x0, mix, 0.5, keep_merged=False)
        return (x_in * h).square().mean()

    skip, _ = _inputs("skip_mix_norm[lerp-both]", (2, 19), 48, seed=11)
    lane1, _, _, _, *params = _inputs("lane_update", (2, 19), 48, seed=11)[0]
    inputs = [*skip, lane1, *params]
    torch._dynamo.reset()
    try:
        kernels.set_backend("triton")
        compiled, graphs = compile_recording_graphs(slots)
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = compiled(*leaves)
        loss.backward()
        eager = [t.clone().requires_grad_() for t in inputs]
        eager_loss = slots(*eager)
        eager_loss.backward()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    for op in ("skip_mix_norm", "lane_update"):
        assert f"ouroboros.{op}.default" in graphs["forward"], graphs["forward"]
        assert f"ouroboros.{op}_backward.default" in graphs["backward"], graphs["backward"]
    _check("loss", loss.detach(), eager_loss.detach())
    names = ("dx", "dkept", "dweight", "dgate", "dx0", "dmix", "dlane1", "dattn_scale", "dmlp_scale", "dresid", "dpost")
    for name, a, b in zip(names, leaves, eager):
        _check(name, a.grad, b.grad, bars=LANE_BARS)


# ---------------------------------------------------------------------------------------------------
# Wiring: the tiny model trains to the same losses with the norm kernels on and off
# ---------------------------------------------------------------------------------------------------
def _spread_off_inits(net):
    """Move the mix, scales and branches off their inits so every gradient is non-trivial (one pass over
    the parameters, both draws from the global RNG in parameter order)."""
    for name, p in net.named_parameters():
        if name.endswith(("mlp.proj.weight", "attn.proj.weight")):
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        elif name.endswith(("resid_mix", "attn_scale", "mlp_scale")):
            p.add_(0.1 * torch.randn_like(p))


def test_tiny_model_same_losses_with_triton_norms(monkeypatch):
    # Only the norms switch: attention, the MLP and the head's loss stay on their PyTorch paths in both
    # runs (they have their own wiring tests, and interpreted they would cost this test minutes).
    hold_on_torch(monkeypatch, "attention", "mlp", "softcap_cross_entropy")
    # Muon + AdamW as the trainer runs them.
    torch_losses = train_tiny_losses("torch", init=_spread_off_inits)
    triton_losses = train_tiny_losses("triton", init=_spread_off_inits)
    assert_same_losses(triton_losses, torch_losses, rel_tol=1e-5)
