"""Benchmarks of the fused residual + RMSNorm ops (kernels/norm.py) at the training shapes.

Memory-bound, so each case carries a byte count and the report gives GB/s (percent of the H100's
3.35 TB/s = GB/s / 3350); no FLOPs are counted. Shapes: M = 48·2048 = 98,304 tokens per GPU (R1's too),
d = 512. Dtypes as the model runs on CUDA under autocast: fp32 residual stream (x, x0, kept, the lanes) and
parameters, bf16 branches (the attention and MLP output projections' results), h in bf16 (the next matmul's
input).

Providers: "triton" (kernels.norm's ops), "eager" (the PyTorch reference, then h cast to bf16 as the
next autocast matmul would) and "compile" (torch.compile of that same function).

Bytes, with E = M·d elements and the minimum traffic each op must move (every input read once, every
output written once; rstd is 4 B per row; the per-program parameter partials, ~0.5-2 MB, are left out):
  mix_norm  fwd: x 4 + x0 4 + x_in 4 + h 2                                 = 14·E + 4·M
            bwd: dx_in 4 + dh 2 + x 4 + x0 4 + dx 4 + dx0 4                 = 22·E + 4·M
  add_norm  fwd: x 4 + branch 2 + x_new 4 + h 2                             = 12·E + 4·M
            bwd: dx_new 4 + dh 2 + x_new 4 + branch 2 + dx 4 + dbranch 2    = 18·E + 4·M
  rms_norm  fwd: x 4 + h 2 = 6·E + 4·M;  bwd: dh 2 + x 4 + dx 4             = 10·E + 4·M
  skip_mix_norm, keeping one residual (x_in for a sequential slot, merged for a two-lane one):
            fwd: x 4 + kept 4 + x0 4 + residual 4 + h 2                     = 18·E + 4·M
            bwd: dresidual 4 + dh 2 + x 4 + kept 4 + x0 4 + dx 4 + dkept 4 + dx0 4 = 30·E + 4·M
  lane_update (no norm, no rstd):
            fwd: lane0 4 + lane1 4 + attn 2 + mlp 2 + lane0' 4 + lane1' 4   = 20·E
            bwd: dlane0' 4 + dlane1' 4 + lane0 4 + lane1 4 + attn 2 + mlp 2
                 + dlane0 4 + dlane1 4 + dattn 2 + dmlp 2                    = 32·E
  fwd+bwd is the sum. The eager and compiled baselines are charged the same bytes (the work is the
  same), so their GB/s are comparable effective rates. The issue's goal for lane_update is at least 2x
  torch.compile's time (fwd+bwd); only a GPU run of `python -m bench norm` can say whether it is met.
"""

import torch

from bench.registry import Case, compile_baseline, register
from kernels.norm import (add_norm_reference, add_norm_triton, lane_update_reference, lane_update_triton,
                          mix_norm_reference, mix_norm_triton, rms_norm_reference, rms_norm_triton,
                          skip_mix_norm_reference, skip_mix_norm_triton)

GPU_SHAPES = [dict(M=98_304, d=512)]
SMOKE_SHAPES = [dict(M=64, d=48)]
SCALE = 0.5  # any s = 1/sqrt(layer + 1); the cost does not depend on it
# Bytes per element of [M, d] for (fwd, bwd), and whether the op keeps rstd (4 B per row each way).
BYTES_PER_ELEMENT = {"mix_norm": (14, 22), "add_norm": (12, 18), "rms_norm": (6, 10), "skip_mix_norm": (18, 30),
                     "lane_update": (20, 32)}
ROW_BYTES = {"lane_update": 0}
# skip_mix_norm's forms in the model: R1's gated skips into a sequential slot (keeping x_in) and into a
# two-lane slot (keeping merged, its lane0), and the crawler's additive skips (keeping x_in).
SKIP_FORMS = [("lerp", "x_in"), ("lerp", "merged"), ("add", "x_in")]


def _bytes(op: str, mode: str, M: int, d: int) -> float:
    fwd, bwd = BYTES_PER_ELEMENT[op]
    per = {"fwd": (fwd, 1), "bwd": (bwd, 1), "fwd+bwd": (fwd + bwd, 2)}[mode]
    return float(per[0] * M * d + per[1] * ROW_BYTES.get(op, 4) * M)


def _h_to(dtype, fn):
    """The reference as the model's torch path feeds the next matmul: h cast to the autocast dtype."""
    def run(*args):
        *res, h = fn(*args)
        return (*res, h.to(dtype))
    return run


def _skip_form(fn, gate: str, keep: str):
    """skip_mix_norm in one form: no gate argument for "add", and only the residual kept, then h."""
    flags = {"keep_merged": keep == "merged", "keep_x_in": keep == "x_in"}
    index = 0 if keep == "merged" else 1

    def run(x, kept, weight, *rest):
        gate_t, (x0, mix, scale) = (rest[0], rest[1:]) if gate == "lerp" else (None, rest)
        out = fn(x, kept, weight, gate_t, x0, mix, scale, **flags)
        return out[index], out[2]
    return run


@register("norm")
def cases(device: str, smoke: bool) -> list[Case]:
    # The interpreter's bf16 is emulated and slow: the smoke runs everything in fp32.
    low = torch.float32 if smoke else torch.bfloat16
    out = []
    for shape in SMOKE_SHAPES if smoke else GPU_SHAPES:
        M, d = shape["M"], shape["d"]
        gen = torch.Generator(device=device).manual_seed(0)
        randn = lambda *size, dtype=torch.float32: torch.randn(*size, device=device, generator=gen).to(dtype)
        x, x0, kept = randn(M, d), randn(M, d), randn(M, d)
        mix = torch.stack((1 + 0.2 * randn(d), 0.5 * randn(d)))
        branch, gain = randn(M, d, dtype=low), 1 + 0.2 * randn(d)
        weight, gate = 1 + 0.2 * randn(d), randn(d)
        lanes_in = (x, kept, branch, randn(M, d, dtype=low), 1 + 0.2 * randn(d), 1 + 0.2 * randn(d),
                    1.1 + 0.1 * randn(2), 1 + 0.2 * randn(2, 2))
        grads = {"res": randn(M, d), "h": randn(M, d, dtype=low)}
        ops = [  # (op, shape label, inputs, constants, {provider: fn}, upstream gradients)
            ("mix_norm", {}, (x, x0, mix), (SCALE,),
             {"triton": mix_norm_triton, "eager": _h_to(low, mix_norm_reference)}, (grads["res"], grads["h"])),
            ("add_norm", {}, (x, branch, gain), (SCALE,),
             {"triton": add_norm_triton, "eager": _h_to(low, add_norm_reference)}, (grads["res"], grads["h"])),
            ("rms_norm", {}, (x,), (SCALE,), {"triton": lambda t, s: (rms_norm_triton(t, s),),
                                              "eager": _h_to(low, lambda t, s: (rms_norm_reference(t, s),))},
             (grads["h"],)),
            *(("skip_mix_norm", {"gate": g, "keep": k}, (x, kept, weight, *([gate] if g == "lerp" else []), x0, mix),
               (SCALE,), {"triton": _skip_form(skip_mix_norm_triton, g, k),
                          "eager": _h_to(low, _skip_form(skip_mix_norm_reference, g, k))},
               (grads["res"], grads["h"])) for g, k in SKIP_FORMS),
            ("lane_update", {}, lanes_in, (), {"triton": lane_update_triton, "eager": lane_update_reference},
             (grads["res"], randn(M, d))),
        ]
        for op, label, inputs, constants, providers, upstream in ops:
            providers["compile"] = compile_baseline(providers["eager"], device)
            leaves = tuple(t.detach().requires_grad_() for t in inputs)
            for provider, fn in providers.items():
                def call(fn=fn, leaves=leaves, constants=constants):
                    # Autocast on CUDA, as the model runs: the triton ops then return h in bf16.
                    with torch.autocast(device, dtype=low, enabled=not smoke):
                        return fn(*leaves, *constants)

                def fwd(call=call):
                    with torch.no_grad():
                        return call()

                outs = call()  # the graph the "bwd" case replays (retain_graph)

                def bwd(outs=outs, leaves=leaves, upstream=upstream):
                    return torch.autograd.grad(outs, leaves, upstream, retain_graph=True)

                def fwd_bwd(call=call, leaves=leaves, upstream=upstream):
                    return torch.autograd.grad(call(), leaves, upstream)

                for mode, fn_mode in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
                    out.append(Case(kernel=op, provider=provider, mode=mode, shape={**shape, **label}, fn=fn_mode,
                                    bytes=_bytes(op, mode, M, d)))
    return out
