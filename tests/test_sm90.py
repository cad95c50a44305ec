"""The H100 compile check (bench/sm90.py): every kernel configuration compiled for sm_90, no GPU needed.

One subprocess (without TRITON_INTERPRET) compiles the configurations of every kernels/ module plus the
example modules below, two at a time; the tests then read its report. The example modules are this
file's own kernels with known properties (a big bf16 GEMM tile that must use HGMMA, a skinny one that
cannot, one that asks for too much shared memory, one that spills), so the check is shown to catch
each problem before it is trusted on the project's kernels.
"""
import textwrap

import pytest

from bench import sm90

EXAMPLE_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def row_scale_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # the whole row stays live across the reduction: 16384 fp32 values in one warp cannot fit registers
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x / tl.sum(x * x))


@triton.jit
def offset_by_method(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + n.to(tl.int64) * BLOCK + offs, offs)  # n == 1 arrives as a constexpr: no .to


@triton.jit
def offset_by_cast(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + tl.cast(n, tl.int64) * BLOCK + offs, offs)


def gemm(a, b, c, block_m, block_n, block_k):
    gemm_kernel[(a.shape[0] // block_m, b.shape[1] // block_n)](a, b, c, a.shape[0], b.shape[1], a.shape[1],
                                                                  block_m, block_n, block_k)


def _gemm(name, block_m, block_n, block_k, stages, hgmma):
    return {"name": name, "kernel": gemm_kernel,
            "signature": {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"},
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
            "num_warps": 4, "num_stages": stages, "hgmma": hgmma, "divisible_by_16": ["M", "N", "K"]}


def sm90_configs():
    return [
        _gemm("gemm_128x128x64", 128, 128, 64, 3, True),
        _gemm("gemm_16x64x64", 16, 64, 64, 2, False),
        _gemm("gemm_16x64x64_marked_hgmma", 16, 64, 64, 2, True),
        _gemm("gemm_128x128x128_5_stages", 128, 128, 128, 5, True),
        {"name": "row_scale_16k_1warp", "kernel": row_scale_kernel, "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32"},
         "constexprs": {"BLOCK": 16384}, "num_warps": 1, "num_stages": 1, "hgmma": False},
    ] + [{"name": f"{kernel.__name__}_{tag}", "kernel": kernel, "signature": {"x_ptr": "*i32", "n": "i32"},
          "constexprs": {"BLOCK": 128}, "num_warps": 4, "num_stages": 1, "hgmma": False,
          "equal_to_1": ["n"] if tag == "n1" else []}
         for kernel in (offset_by_method, offset_by_cast) for tag in ("n1", "n7")]
'''

NO_CONFIGS = '''
import triton
import triton.language as tl


@triton.jit
def copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))
'''

UNLISTED_LAUNCH = NO_CONFIGS + '''

@triton.jit
def double_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs))


def copy(x, y):
    copy_kernel[(1,)](x, y, BLOCK=x.numel())


def double(x, y):
    double_kernel[(1,)](x, y, BLOCK=x.numel())


def sm90_configs():
    return [{"name": "copy", "kernel": copy_kernel, "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"},
             "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "hgmma": False}]
'''

BAD_CONFIG = NO_CONFIGS + '''

def sm90_configs():
    return [{"name": "copy", "kernel": copy_kernel, "signature": {"x_ptr": "*fp32"},
             "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "hgmma": False}]
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One compile run over kernels/ and the example modules (the slow part: seconds per configuration)."""
    folder = tmp_path_factory.mktemp("sm90")
    paths = []
    for name, source in [("examples", EXAMPLE_KERNELS), ("no_configs", NO_CONFIGS),
                         ("unlisted_launch", UNLISTED_LAUNCH), ("bad_config", BAD_CONFIG)]:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        paths.append(path)
    result = sm90.check("kernels", tuple(paths), jobs=2)
    print(sm90.markdown(result))  # shown with -s, and in the failure report
    return result


def _examples(report):
    return {r["name"]: r for r in report["configs"] if r["module"] == "sm90_check_examples"}


def _modules(report):
    return {m["module"]: m for m in report["modules"]}


def test_check_passes_a_big_bf16_tile_with_hgmma_and_a_skinny_one_without(report):
    ex = _examples(report)
    big, skinny = ex["gemm_128x128x64"], ex["gemm_16x64x64"]
    assert big["error"] is None and big["problems"] == [], big
    assert big["mma"].get("HGMMA", 0) > 0 and 0 < big["registers"] <= 255
    # two of its three pipeline stages hold an A tile and a B tile in shared memory (bf16)
    assert big["shared"] >= 2 * (128 * 64 + 64 * 128) * 2
    assert skinny["problems"] == [] and "HGMMA" not in skinny["mma"] and skinny["mma"].get("HMMA", 0) > 0


def test_check_fails_missing_hgmma_too_much_shared_memory_and_spills(report):
    ex = _examples(report)
    marked = ex["gemm_16x64x64_marked_hgmma"]
    assert len(marked["problems"]) == 1 and "no warpgroup MMA (HGMMA)" in marked["problems"][0]
    assert marked["mma"] == ex["gemm_16x64x64"]["mma"]  # the same code: only the demand differs
    big = ex["gemm_128x128x128_5_stages"]
    # five stages keep at least four (A, B) tile pairs in flight: 4 * 64 KB > 227 KB
    assert big["shared"] >= 4 * (128 * 128 + 128 * 128) * 2 > sm90.SHARED_LIMIT
    assert any("shared memory > 227 KB" in p for p in big["problems"])
    spill = ex["row_scale_16k_1warp"]
    assert spill["stack"] > 0 and spill["local_memory_instructions"] > 0
    assert any(p.startswith("register spills") for p in spill["problems"])
    assert not report["ok"]


def test_an_int_argument_equal_to_1_is_compiled_as_the_constexpr_triton_makes_it(report):
    ex = _examples(report)
    assert "does not compile" in " ".join(ex["offset_by_method_n1"]["problems"])  # `.to` on a constexpr
    assert not ex["offset_by_method_n7"]["problems"] and not ex["offset_by_cast_n1"]["problems"]
    names = {r["name"] for r in report["configs"]}
    assert "gptq_block_r16_c16_block_size1" in names  # block_size=1: col0 = 1 and width = 1
    assert any(n.startswith("int6_matmul_") and n.endswith("_m1n1") for n in names)  # one token, one feature
    assert any(n.startswith("int6_matmul_dx_") and n.endswith("_m1n1") for n in names)


def test_module_files_inside_the_package_import_with_their_relative_imports():
    """`python -m bench.sm90 --module kernels/norm.py` (norm.py imports kernels._runtime relatively)."""
    import json
    import os
    import subprocess
    import sys

    repo = sm90.Path(sm90.__file__).resolve().parents[1]
    script = ("import json, sys; from bench import sm90; reports, configs = sm90.discover(None, tuple(sys.argv[1:])); "
              "print(json.dumps([[r['module'], r['error'], r['configs']] for r in reports]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit kernels, as the check
    out = subprocess.run([sys.executable, "-c", script, str(repo / "kernels/norm.py"), str(repo / "kernels/gptq.py")],
                         cwd="/", env=env, capture_output=True, text=True, check=True).stdout
    (norm, norm_error, norm_configs), (gptq, gptq_error, gptq_configs) = json.loads(out)
    assert (norm, norm_error, gptq, gptq_error) == ("kernels.norm", None, "kernels.gptq", None)
    assert norm_configs > 0 and gptq_configs > 0


def test_check_rejects_modules_that_would_be_silently_skipped(report):
    mods = _modules(report)
    assert "defines @triton.jit functions ['copy_kernel'] but no sm90_configs()" in mods["sm90_check_no_configs"]["error"]
    assert "launched in the module but in no sm90_configs() entry: ['double_kernel']" in \
        mods["sm90_check_unlisted_launch"]["error"]
    assert "config 'copy': signature lacks ['y_ptr'] of copy_kernel" in mods["sm90_check_bad_config"]["error"]


def test_every_kernels_module_is_covered(report):
    """Every kernels/*.py with @triton.jit kernels lists its configurations, and each one is valid."""
    kernel_modules = {name: m for name, m in _modules(report).items() if name.startswith("kernels.")}
    assert {"kernels.mlp", "kernels.attention"} <= set(kernel_modules)
    broken = {name: m["error"] for name, m in kernel_modules.items() if m["error"]}
    assert not broken, "\n".join(f"{name}: {error}" for name, error in broken.items())
    for name, m in kernel_modules.items():
        assert bool(m["jit_functions"]) == bool(m["configs"]), f"{name}: {m}"


@pytest.mark.parametrize("problem", ["does not compile", "register spills", "local memory", "shared memory",
                                     "no warpgroup MMA"])
def test_project_kernels_fit_the_h100(report, problem):
    offenders = [f"{r['module']} {r['name']}: {p}" for r in report["configs"] if r["module"].startswith("kernels.")
                 for p in r["problems"] if problem in p]
    assert not offenders, f"{len(offenders)} sm_90 configurations with {problem}:\n" + "\n".join(offenders)
