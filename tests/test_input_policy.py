"""The one input policy of every Triton entry point (kernels/_runtime.py `input_policy`).

What it promises, checked per op on tiny inputs (the kernels run in the interpreter on a CPU): the
inputs are validated once per call, forward and backward together; under autocast the named floating
inputs reach the kernel in the autocast dtype (norms: h comes out in it); non-contiguous inputs give
the contiguous inputs' results; tensors where no Triton kernel runs are refused with a message that
names the argument and says how to run on a CPU.
"""
import importlib
import sys

import pytest
import torch

import kernels
from kernels import _runtime

# The family modules (`kernels.mlp` and `kernels.attention` are the dispatching functions, not the modules).
attention_family, gptq_family, head_family, int6_family, mlp_family, norm_family = (
    importlib.import_module(f"kernels.{name}") for name in ("attention", "gptq", "head", "int6", "mlp", "norm"))

from conftest import DEVICE
CHECKERS = {family._check_inputs.__code__: family.__name__
            for family in (attention_family, gptq_family, head_family, int6_family, mlp_family, norm_family)}


def _tensors(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(DEVICE) for shape in shapes]


def _int6_layer(n=8, k=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-31, 32, (n, k), generator=gen, dtype=torch.int8)
    scale = (1.0 / 31) * (0.5 + torch.rand(n, generator=gen))
    return int6_family.pack_int6_planes(codes).to(DEVICE), scale.to(DEVICE)


def _call(op):
    """(entry, args, floating args autocast should cast, the args' names) for one Triton entry, tiny inputs."""
    if op == "mlp":
        x, w_up, w_down = _tensors(1, (4, 16), (24, 16), (16, 24))
        return mlp_family.mlp_triton, [x, w_up / 4, w_down / 5, 0.5], (0, 1, 2)
    if op == "attention":
        q, k, v = _tensors(2, (1, 8, 2, 64), (1, 8, 1, 64), (1, 8, 1, 64))
        return attention_family.attention_triton, [q, k, v, torch.tensor([1.0, 2.0], device=DEVICE), True], (0, 1, 2)
    if op == "softcap_cross_entropy":
        h, weight = _tensors(3, (2, 3, 16), (24, 16))
        targets = torch.randint(0, 24, (2, 3), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        return head_family.softcap_cross_entropy_triton, [h, weight / 4, targets, 30.0], (0, 1)
    if op == "mix_norm":
        x, x0, mix = _tensors(4, (5, 16), (5, 16), (2, 16))
        return norm_family.mix_norm_triton, [x, x0, mix, 0.5], ()
    if op == "add_norm":
        x, branch, gain = _tensors(5, (5, 16), (5, 16), (16,))
        return norm_family.add_norm_triton, [x, branch, gain, 0.5], ()
    if op == "rms_norm":
        (x,) = _tensors(6, (5, 16))
        return norm_family.rms_norm_triton, [x, 0.5], ()
    if op == "skip_mix_norm":
        x, kept, x0, weight, gate, mix = _tensors(9, (5, 16), (5, 16), (5, 16), (16,), (16,), (2, 16))
        return norm_family.skip_mix_norm_triton, [x, kept, weight, gate, x0, mix, 0.5], ()
    if op == "lane_update":
        tensors = _tensors(10, (5, 16), (5, 16), (5, 16), (5, 16), (16,), (16,), (2,), (2, 2))
        return norm_family.lane_update_triton, tensors, ()
    if op == "int6_matmul":
        packed, scale = _int6_layer()
        (x,) = _tensors(7, (3, 20))
        return int6_family.int6_matmul_triton, [x, packed, scale, 20], (0,)
    if op == "quantize_layer_triton":
        w, x = _tensors(8, (8, 16), (64, 16))
        return gptq_family.quantize_layer_triton, [w, x.t() @ x / 64, w.abs().amax(1) / 31], ()
    raise AssertionError(op)


OPS = ["mlp", "attention", "softcap_cross_entropy", "mix_norm", "add_norm", "rms_norm", "skip_mix_norm", "lane_update",
       "int6_matmul", "quantize_layer_triton"]
WITH_BACKWARD = {"mlp", "attention", "softcap_cross_entropy", "mix_norm", "add_norm", "rms_norm", "skip_mix_norm",
                 "lane_update", "int6_matmul"}


def _outputs(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t.is_floating_point()]


def _count_checks(fn):
    """fn() run with every call of a family's _check_inputs counted (this thread: on a CPU the autograd
    engine runs the backward here too). Returns (fn's result, {module: calls})."""
    calls = {}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in CHECKERS:
            calls[CHECKERS[frame.f_code]] = calls.get(CHECKERS[frame.f_code], 0) + 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(previous)
    return result, calls


@pytest.mark.parametrize("op", OPS)
def test_one_validation_per_call_forward_and_backward(op):
    entry, args, _ = _call(op)
    family = entry.__module__
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and op in WITH_BACKWARD
            else a for a in args]

    def forward_backward():
        out = entry(*args)
        if op in WITH_BACKWARD:
            torch.autograd.backward(_outputs(out), [torch.ones_like(t) for t in _outputs(out)])
        return out

    _, calls = _count_checks(forward_backward)
    assert calls == {family: 1}, calls


def test_one_validation_through_the_dispatch():
    """kernels.mlp -> mlp_triton -> the custom op -> the launchers, forward and backward: one check."""
    _, args, _ = _call("mlp")
    leaves = [a.requires_grad_() for a in args[:3]]
    try:
        kernels.set_backend("triton")
        _, calls = _count_checks(lambda: kernels.mlp(*leaves, args[3]).sum().backward())
    finally:
        kernels.set_backend(None)
    assert calls == {"kernels.mlp": 1}, calls
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("op", ["mlp", "attention", "softcap_cross_entropy", "int6_matmul"])
def test_autocast_casts_the_named_inputs(op):
    """Under autocast the op gives exactly what it gives for its inputs cast by hand, as F.linear would cast them."""
    entry, args, cast = _call(op)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = entry(*args)
    by_hand = entry(*[a.to(torch.bfloat16) if i in cast else a for i, a in enumerate(args)])
    assert got.dtype == by_hand.dtype == (torch.float32 if op == "softcap_cross_entropy" else torch.bfloat16)
    assert torch.equal(got, by_hand)


@pytest.mark.parametrize("op", ["mix_norm", "add_norm", "rms_norm"])
def test_autocast_gives_norms_h_in_the_autocast_dtype(op):
    """The norms cast no input (the residual stream stays fp32); h comes out in the autocast dtype."""
    entry, args, _ = _call(op)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = entry(*args)
    got = got if isinstance(got, tuple) else (got,)
    plain = entry(*args)
    plain = plain if isinstance(plain, tuple) else (plain,)
    # the op itself with h_dtype given: what autocast must select
    raw = getattr(torch.ops.ouroboros, op)(*args[:-1], float(args[-1]), torch.bfloat16)
    assert got[-1].dtype == torch.bfloat16 and plain[-1].dtype == torch.float32
    assert torch.equal(got[-1], raw[-2 if op != "rms_norm" else 0])
    if op != "rms_norm":
        assert got[0].dtype == torch.float32 and torch.equal(got[0], plain[0])


def test_autocast_leaves_the_skip_and_lane_streams_alone():
    """skip_mix_norm casts no input and gives h in the autocast dtype, merged and x_in in the stream's;
    lane_update casts nothing and gives the lanes in their own dtype (bf16 branches are read as they come)."""
    entry, args, _ = _call("skip_mix_norm")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = entry(*args)
    plain = entry(*args)
    raw = torch.ops.ouroboros.skip_mix_norm(*args[:-1], float(args[-1]), torch.bfloat16, True, True)
    assert got[2].dtype == torch.bfloat16 and plain[2].dtype == torch.float32 and torch.equal(got[2], raw[2])
    assert all(got[i].dtype == torch.float32 and torch.equal(got[i], plain[i]) for i in (0, 1))
    entry, args, _ = _call("lane_update")
    args = [a.to(torch.bfloat16) if i in (2, 3) else a for i, a in enumerate(args)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = entry(*args)
    assert all(g.dtype == torch.float32 and torch.equal(g, p) for g, p in zip(got, entry(*args)))


def test_autocast_leaves_fp64_alone_and_the_check_names_it():
    entry, args, _ = _call("mlp")
    with torch.autocast(DEVICE, dtype=torch.bfloat16), pytest.raises(ValueError, match="one dtype out of bfloat16"):
        entry(args[0].double(), *args[1:])


@pytest.mark.parametrize("op", ["mix_norm", "skip_mix_norm", "lane_update", "softcap_cross_entropy", "int6_matmul",
                                "attention"])
def test_non_contiguous_inputs_give_the_contiguous_result(op):
    entry, args, _ = _call(op)
    strided = [a.transpose(0, -1).contiguous().transpose(0, -1) if isinstance(a, torch.Tensor) and a.dim() > 1
               and a.is_floating_point() else a for a in args]
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in strided)
    for got, want in zip(_outputs(entry(*strided)), _outputs(entry(*args))):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", OPS)
def test_tensors_where_no_kernel_runs_are_refused_by_name(op, monkeypatch):
    """Without the interpreter, CPU tensors cannot reach a Triton kernel: the message says which argument
    and how to run on a CPU (on a GPU machine the same CPU tensors get the same message)."""
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    entry, args, _ = _call(op)
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    first = next(iter(entry.__wrapped__.__code__.co_varnames))
    with pytest.raises(ValueError) as err:
        entry(*args)
    message = str(err.value)
    assert message.startswith(f"{op}: the Triton kernel needs CUDA tensors"), message
    assert "TRITON_INTERPRET=1" in message and message.endswith(f"got {first} on cpu"), message


def test_bad_input_is_named_before_the_device(monkeypatch):
    """Validation first: a wrong shape is reported as such even where no kernel could run."""
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    _, args, _ = _call("mlp")
    with pytest.raises(ValueError, match=r"mlp: x \(4, 15\) has d=15"):
        mlp_family.mlp_triton(args[0][:, :15].cpu(), *[a.cpu() for a in args[1:3]], 0.5)
