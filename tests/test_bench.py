"""The benchmark machinery (bench/registry.py, bench/report.py, python -m bench, the pytest-benchmark
route) and the `make gpu-check` driver (bench/gpu_check.py), exercised on CPU.

The machinery is tested with an example entry defined here (a small Triton kernel and its PyTorch
baselines), so it does not depend on which kernel families have landed; the CLI test then runs the
smoke over every entry that is registered in bench/.
"""
import csv
import struct
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from bench import registry, report
from bench.registry import Case, Registry, Result

from conftest import DEVICE


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


def _scaled_add_triton(x, y, alpha):
    out = torch.empty_like(x)
    _scaled_add_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, out, alpha, x.numel(), BLOCK=1024)
    return out


def _scaled_add_reference(x, y, alpha):
    return alpha * x + y


def example_cases(device: str, smoke: bool) -> list:
    """An entry the way bench/<family>.py writes one: a kernel, its eager and compiled baselines."""
    n = 4096 if smoke else 1 << 26
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    compiled = registry.compile_baseline(_scaled_add_reference, device)
    # memory-bound: read x and y, write out (fp32); 2 flops per element
    bytes_moved, flops = 3 * n * 4, 2 * n
    return [Case("scaled_add", provider, "fwd", {"N": n}, fn, flops=flops, bytes=bytes_moved)
            for provider, fn in [("triton", lambda: _scaled_add_triton(x, y, 0.5)),
                                 ("eager", lambda: _scaled_add_reference(x, y, 0.5)),
                                 ("compile", lambda: compiled(x, y, 0.5))]]


def _example_registry():
    reg = Registry()
    reg.register("scaled_add")(example_cases)
    return reg


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("changes, named", [
    ({"mode": "forward"}, "mode='forward'"),
    ({"shape": {}}, "shape must be a non-empty dict"),
    ({"shape": {"M": 1.5}}, "shape['M']=1.5"),
    ({"fn": None}, "fn=None is not callable"),
    ({"flops": -1.0}, "flops=-1.0"),
    ({"bytes": float("nan")}, "bytes=nan"),
    ({"provider": "tri ton"}, "provider='tri ton'"),
])
def test_case_rejects_bad_fields_naming_them(changes, named):
    fields = dict(kernel="mlp", provider="triton", mode="fwd", shape={"M": 16}, fn=lambda: None, flops=1.0, bytes=None)
    fields.update(changes)
    with pytest.raises(ValueError) as err:
        Case(**fields)
    assert named in str(err.value) and "kernel='mlp'" in str(err.value)


def test_registry_rejects_duplicates_bad_names_and_bad_cases():
    reg = _example_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("scaled_add")(lambda device, smoke: [])
    with pytest.raises(ValueError, match="identifier"):
        reg.register("scaled add")
    with pytest.raises(ValueError, match="non-empty list of Case"):
        registry.build_cases("empty", lambda device, smoke: [], "cpu", True)
    with pytest.raises(ValueError, match="item 0 is a dict"):
        registry.build_cases("bad", lambda device, smoke: [{"kernel": "x"}], "cpu", True)
    twice = Case("k", "eager", "fwd", {"M": 1}, lambda: None)
    with pytest.raises(ValueError, match="same kernel/provider/mode/shape: k-eager-fwd-M1"):
        registry.build_cases("dup", lambda device, smoke: [twice, twice], "cpu", True)


def test_load_entries_fails_loudly_on_a_module_that_registers_nothing(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("")  # machinery names are not entry modules
    (pkg / "good.py").write_text(textwrap.dedent("""
        from bench.registry import Case
        from fakebench import REG
        @REG.register("good")
        def cases(device, smoke):
            return [Case("good", "eager", "fwd", {"N": 1}, lambda: None)]
    """))
    (pkg / "__init__.py").write_text("from bench.registry import Registry\nREG = Registry()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fakebench
    assert registry.entry_modules("fakebench") == ["good"]
    assert list(registry.load_entries(package="fakebench", registry=fakebench.REG)) == ["good"]
    with pytest.raises(KeyError, match="no bench entry named 'nope'; registered: good"):
        registry.load_entries(["nope"], package="fakebench", registry=fakebench.REG)
    (pkg / "silent.py").write_text("X = 1\n")
    with pytest.raises(RuntimeError, match="fakebench.silent registered no entry"):
        registry.load_entries(package="fakebench", registry=fakebench.REG)
    (pkg / "silent.py").unlink()
    (pkg / "broken.py").write_text("import no_such_module_anywhere\n")
    with pytest.raises(RuntimeError, match=r"fakebench/broken\.py failed to import: ModuleNotFoundError"):
        registry.load_entries(package="fakebench", registry=fakebench.REG)
    for name in [m for m in sys.modules if m.startswith("fakebench")]:
        del sys.modules[name]


# ---------------------------------------------------------------- numbers and writers

def test_rates_and_percent_of_peak_follow_the_formulas():
    case = Case("gemm", "triton", "fwd", {"M": 8192, "N": 8192, "K": 8192}, lambda: None,
                flops=2.0 * 8192 ** 3, bytes=3 * 8192 * 8192 * 2)
    result = Result(case, registry.TIMING_GPU, ms=1.5, ms_p20=1.4, ms_p80=1.6)
    assert result.tflops == pytest.approx(2.0 * 8192 ** 3 / 1.5e-3 / 1e12)
    assert result.gbps == pytest.approx(3 * 8192 * 8192 * 2 / 1.5e-3 / 1e9)
    for gpu in ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "cpu (x86_64)"]:
        env = dict(date="d", gpu=gpu, driver="1", cuda="13.0", torch="2.11", triton="3.6.0", commit="abc")
        row = report.to_row(result, env)
        peak_tf, meas_tf, peak_bw, meas_bw = report.peaks_for(gpu)
        assert float(row["pct_peak_tflops"]) == pytest.approx(100 * result.tflops / peak_tf, rel=1e-5)
        assert float(row["pct_measured_tflops"]) == pytest.approx(100 * result.tflops / meas_tf, rel=1e-5)
        assert float(row["pct_peak_bw"]) == pytest.approx(100 * result.gbps / peak_bw, rel=1e-5)
        assert float(row["pct_measured_bw"]) == pytest.approx(100 * result.gbps / meas_bw, rel=1e-5)
    assert report.peaks_for("NVIDIA H100 80GB HBM3") == (989.0, 798.0, 3350.0, 3000.0)
    no_flops = Result(Case("copy", "eager", "fwd", {"N": 1}, lambda: None, bytes=8.0), registry.TIMING_GPU, ms=1.0)
    assert no_flops.tflops is None and report.to_row(no_flops, env)["pct_peak_tflops"] == ""


def _umask():
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_smoke_run_writes_csv_markdown_and_one_plot_per_kernel(tmp_path):
    entries = _example_registry().entries()
    broken = lambda device, smoke: [Case("broken", "eager", "fwd", {"N": 1}, lambda: 1 / 0, flops=1.0)]
    no_setup = lambda device, smoke: [][0]
    results = registry.run_entries({"no_setup": no_setup, **entries, "broken": broken}, DEVICE, smoke=True)
    assert [(r.case.kernel, r.case.provider) for r in results] == [
        ("no_setup", "setup"), ("scaled_add", "triton"), ("scaled_add", "eager"), ("scaled_add", "compile"),
        ("broken", "eager")]
    setup_failed, *ok, bad = results
    assert "failed: IndexError: list index out of range" in setup_failed.error and setup_failed.ms is None
    results = results[1:]
    assert bad.error.startswith("ZeroDivisionError") and bad.ms is None  # reported, and the others still ran
    for r in ok:
        assert r.error is None and r.ms > 0 and r.ms_p20 <= r.ms <= r.ms_p80
        assert r.timing == (registry.TIMING_SMOKE if DEVICE == "cpu" else registry.TIMING_GPU)
        assert r.gbps == pytest.approx(3 * 4096 * 4 / (r.ms * 1e-3) / 1e9)
        with pytest.raises(RuntimeError, match="inputs were freed"):
            r.case.fn()

    env = report.environment()
    assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__ and env["commit"]
    rows = [report.to_row(r, env) for r in results]
    path = report.write_csv(tmp_path / "run.csv", rows)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.CSV_COLUMNS
        back = list(reader)
    assert back == rows == report.read_csv(path)
    assert float(back[0]["ms"]) == pytest.approx(ok[0].ms, rel=1e-5)
    assert back[3]["error"].startswith("ZeroDivisionError") and back[3]["ms"] == ""
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temp file"
    assert path.stat().st_mode & 0o444 == 0o444 & ~_umask(), "results should be readable like any new file"

    table = report.markdown_table(back).splitlines()
    body = [line for line in table if line.startswith("| scaled_add") or line.startswith("| broken")]
    assert len(body) == 4 and "ERROR: ZeroDivisionError" in body[3]
    assert all(line.count("|") == 13 for line in table if line.startswith("|"))
    if DEVICE == "cpu":
        assert "not GPU numbers" in table[0]

    pngs = report.plot(back, tmp_path, "run")
    assert [p.name for p in pngs] == ["run_scaled_add.png"]  # "broken" has no numbers to draw
    width, height = _png_size(pngs[0])
    assert width > 300 and height > 200

    (tmp_path / "bad.csv").write_text("kernel,ms\nx,1\n")
    with pytest.raises(ValueError, match="bad.csv: not a bench results CSV"):
        report.read_csv(tmp_path / "bad.csv")


def test_gpu_slug_and_commit_override(monkeypatch):
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    monkeypatch.setenv("OUROBOROS_COMMIT", "0123456789ab")
    assert report.git_commit() == "0123456789ab"


# ---------------------------------------------------------------- the CLI and the pytest-benchmark route

def test_cli_rejects_budgets_below_the_minimum(capsys):
    from bench.__main__ import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--rep-ms", "50"])
    assert "--rep-ms >= 100" in capsys.readouterr().err
    assert parse_args(["mlp", "--smoke"]).names == ["mlp"]


def test_cli_smoke_over_every_registered_entry(tmp_path, capsys):
    """`python -m bench --smoke` over whatever bench/<family>.py entries exist right now."""
    from bench.__main__ import main
    entries = registry.load_entries()
    code = main(["--smoke", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    if not entries:
        assert code == 2 and "no entries are registered" in err
        return
    assert code == 0, err
    (csv_path,) = tmp_path.glob("smoke_*.csv")
    rows = report.read_csv(csv_path)
    expected = sum(len(registry.build_cases(n, fn, DEVICE, True)) for n, fn in entries.items())
    assert len(rows) == expected and not any(r["error"] for r in rows)
    for kernel in {r["kernel"] for r in rows if r["tflops"] or r["gbps"]}:
        assert (tmp_path / f"{csv_path.stem}_{kernel}.png").exists(), f"no plot for {kernel}"
    if DEVICE == "cpu":
        assert {r["timing"] for r in rows} == {registry.TIMING_SMOKE}
        assert "not GPU numbers" in out
    assert main(["no_such_entry"]) == 2
    assert "no bench entry named 'no_such_entry'" in capsys.readouterr().err


def test_pytest_benchmark_route_collects_one_test_per_case():
    from bench.test_benchmarks import case_params
    params = case_params(_example_registry().entries(), DEVICE, smoke=True)
    assert [p.id for p in params] == [c.id for c in example_cases(DEVICE, True)]
    assert all(p.values[0] == "scaled_add" for p in params)


# ---------------------------------------------------------------- make gpu-check (bench/gpu_check.py)

def test_gpu_check_arguments_and_stage_plan(tmp_path, capsys):
    from bench import gpu_check
    args = gpu_check.parse_args(["--stage", "tests", "--tests", "tests/test_mlp.py", "--workers", "4"])
    assert args.stages == ("tests",)
    cmd = gpu_check.stage_command("tests", args, tmp_path)
    assert cmd[1:4] == ["-m", "pytest", "tests/test_mlp.py"] and cmd[-2:] == ["-n", "4"]
    assert f"--junitxml={tmp_path / 'junit.xml'}" in cmd
    args = gpu_check.parse_args(["--stage", "bench,step", "--bench", "mlp", "--kernels", "torch", "--workers", "0"])
    assert args.stages == ("bench", "step")
    assert gpu_check.stage_command("bench", args, tmp_path)[1:4] == ["-m", "bench", "mlp"]
    step = gpu_check.stage_command("step", args, tmp_path)
    assert step[step.index("--kernels") + 1:] == ["torch"]
    assert gpu_check.parse_args([]).stages == gpu_check.STAGES
    for bad, message in [(["--stage", "lint"], "unknown stage ['lint']"), (["--budget", "600"], "inside 8 minutes"),
                         (["--kernels", "cuda"], "must be triton or torch"), (["--steps", "1"], ">= 2 timed steps")]:
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--stage", "tests"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err


def test_gpu_check_tests_stage_reads_pytest_output_and_junit(tmp_path):
    """A real pytest run (one pass, one failure) through the stage's runner and summary."""
    from bench import gpu_check
    (tmp_path / "test_tiny.py").write_text("def test_ok():\n    assert 1 + 1 == 2\n\n"
                                           "def test_bad():\n    assert [1, 2] == [1, 3]\n")
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "test_tiny.py"), "-q", "-p", "no:xdist",
           "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'junit.xml'}", f"--rootdir={tmp_path}"]
    rc, wall, output = gpu_check.run_command(cmd, 120, tmp_path / "tests.log")
    assert rc == 1 and wall > 0 and "1 failed, 1 passed" in output
    status, summary, details = gpu_check.summarize("tests", rc, output, tmp_path, 120)
    assert status == "failed" and summary == "1 failed, 1 passed"
    assert "test_tiny.py::test_bad: assert [1, 2] == [1, 3]" in details and "| s |" in details
    assert gpu_check.pytest_counts("== 3 failed, 10 passed, 2 skipped, 1 error in 12.34s ==") == {
        "failed": 3, "passed": 10, "skipped": 2, "error": 1}


def test_gpu_check_kills_a_stage_at_its_budget(tmp_path):
    from bench import gpu_check
    t0 = __import__("time").perf_counter()
    rc, wall, _ = gpu_check.run_command([sys.executable, "-c", "import time; print('started', flush=True); "
                                         "time.sleep(60)"], 1.5, tmp_path / "slow.log")
    assert rc is None and 1.5 <= wall < 10 and __import__("time").perf_counter() - t0 < 10
    status, summary, _ = gpu_check.summarize("tests", rc, "started", tmp_path, 1.5)
    assert status == "timeout" and "split it" in summary


def test_gpu_check_results_table_merges_stages(tmp_path, monkeypatch):
    from bench import gpu_check
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    env = dict(date="2026-11-25T16:00:00Z", gpu="NVIDIA H100 80GB HBM3", driver="580.159.04", cuda="13.0",
               torch="2.11.0", triton="3.6.0", commit="abc123")
    # the bench stage: a CSV from a real (example) run becomes the stage's table
    (tmp_path / "work").mkdir()
    results = registry.run_entries(_example_registry().entries(), DEVICE, smoke=True)
    report.write_csv(tmp_path / "work" / "bench.csv", [report.to_row(r, env) for r in results])
    status, summary, details = gpu_check.summarize("bench", 0, "", tmp_path / "work", 420, "scaled_add")
    assert status == "passed" and summary.startswith("3 cases, 0 errors")
    assert (tmp_path / "bench_h100-80gb-hbm3_2026-11-25_scaled_add.csv").exists()
    step_data = {"device": "NVIDIA H100 80GB HBM3", "compiled": True, "preset": "ouroboros", "seq_len": 2048,
                 "batch_seqs": 48, "tokens_per_step": 98304,
                 "runs": {"triton": {"ms_median": 110.0, "ms_p20": 109.0, "ms_p80": 111.0, "warmup_s": 60.0,
                                     "tokens_per_s": 98304 / 0.110, "peak_mem_mb": 30720.0, "tflops": 250.0},
                          "torch": {"error": "RuntimeError: boom"}}}
    assert "triton: 110.0 ms/step, 0.89 M tok/s; torch: RuntimeError: boom" in gpu_check.step_summary(step_data)
    stage_results = [
        gpu_check.StageResult("tests", "", "failed", 300.0, "1 failed, 99 passed", "Failures: ...", "pytest tests"),
        gpu_check.StageResult("bench", "scaled_add", status, 40.0, summary, details, "python -m bench scaled_add"),
        gpu_check.StageResult("step", "", "failed", 200.0, gpu_check.step_summary(step_data),
                              gpu_check.step_table(step_data), "python -m bench.gpu_check --step-worker"),
        gpu_check.StageResult("tests", "", "passed", 280.0, "100 passed", "", "pytest tests"),  # a rerun replaces
    ]
    for result in stage_results:
        json_path, md_path = gpu_check.record(result, env)
    assert md_path == tmp_path / "gpu_check_h100-80gb-hbm3_2026-11-25.md"
    text = md_path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tests") or line.startswith("| bench")
            or line.startswith("| step")]
    assert rows[0].startswith("| tests | passed | 280.0 | 100 passed") and len(rows) == 3
    assert "| bench[scaled_add] | passed |" in text and "| scaled_add | triton | fwd | N=4096 |" in text
    assert "| triton | 110.00 | 109.00-111.00 | 893,673 | 250.0 | 60.0 | 30.0 |" in text and "ERROR: RuntimeError: boom" in text
    assert text.startswith("# gpu-check on NVIDIA H100 80GB HBM3") and "commit abc123" in text
    assert [s["key"] for s in __import__("json").loads(json_path.read_text())["stages"]] == [
        "tests", "bench[scaled_add]", "step"]
    assert not list(tmp_path.glob(".*.tmp"))
    gpu_check.copy_out(tmp_path / "back", [json_path, md_path, tmp_path / "missing.log", None])
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted([json_path.name, md_path.name])
    assert (tmp_path / "back" / md_path.name).read_text() == text


EXAMPLE_ENTRY_MODULE = """
import torch
from bench.registry import Case, compile_baseline, register


def _matmul(a, b):
    return a @ b


@register("example_matmul")
def cases(device, smoke):
    n = 64 if smoke else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    compiled = compile_baseline(_matmul, device)
    return [Case("example_matmul", provider, "fwd", {"M": n, "N": n, "K": n}, fn, flops=2.0 * n ** 3)
            for provider, fn in [("eager", lambda: _matmul(a, b)), ("compile", lambda: compiled(a, b))]]
"""


def test_pytest_benchmark_route_end_to_end(tmp_path):
    """`pytest bench --benchmark-only -p no:xdist` over an example entry package, read back from its JSON."""
    import json
    import os
    import subprocess
    pkg = tmp_path / "example_entries"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "matmul.py").write_text(EXAMPLE_ENTRY_MODULE)
    out = tmp_path / "bench.json"
    repo = Path(registry.__file__).parent.parent
    # Under `make test` this test runs in an xdist worker: its PYTEST_XDIST_* variables would make the
    # child's pytest-benchmark believe it runs under xdist too and switch itself off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(BENCH_PACKAGE="example_entries",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/test_benchmarks.py", "--benchmark-only",
                           "-p", "no:xdist", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert sorted(b["params"]["case_id"] for b in benchmarks) == [
        "example_matmul-compile-fwd-M64-N64-K64", "example_matmul-eager-fwd-M64-N64-K64"]
    for b in benchmarks:
        info, median = b["extra_info"], b["stats"]["median"]
        assert b["group"] == "example_matmul fwd M=64 N=64 K=64" and info["flops"] == 2.0 * 64 ** 3
        assert info["timing"] == (registry.TIMING_SMOKE if DEVICE == "cpu" else registry.TIMING_GPU)
        assert info["tflops"] == pytest.approx(info["flops"] / median / 1e12)


def test_gpu_check_step_stage_runs_bench_step(tmp_path, monkeypatch):
    """The step stage end to end on CPU: python -m bench.step (tiny preset) through the stage runner."""
    from bench import gpu_check
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    args = gpu_check.parse_args(["--stage", "step", "--steps", "2", "--warmup-steps", "0", "--kernels", "torch",
                                 "--budget", "240"])
    result = gpu_check.run_stage("step", args, tmp_path / "work")
    assert result.status == "passed", result.details
    data = __import__("json").loads((tmp_path / "work" / "step.json").read_text())
    run = data["runs"]["torch"]
    assert run["ms_median"] > 0 and run["tokens_per_s"] == pytest.approx(data["tokens_per_step"] / (run["ms_median"] * 1e-3))
    assert result.summary.startswith(f"{data['tokens_per_step']} tokens/step") and "torch: " in result.summary
    assert f"| torch | {run['ms_median']:.2f} | {run['ms_p20']:.2f}-{run['ms_p80']:.2f} |" in result.details


# ---------------------------------------------------------------- bench/'s own import graph

def _bench_imports() -> dict[str, set[str]]:
    """bench module -> the bench modules it imports anywhere in its source (function bodies included)."""
    import ast

    folder = Path(registry.__file__).parent
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 or module == "bench":  # from . import x / from bench import x
                    found |= {a.name for a in node.names if a.name in names} | ({module} & names)
                elif module.startswith("bench."):
                    found.add(module.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def test_bench_modules_import_each_other_without_a_cycle():
    graph = _bench_imports()
    assert graph["step"] >= {"flops", "registry"} and "step" in graph["ledger"]  # the parser sees imports
    assert graph["flops"] == set(), "bench/flops.py must import nothing from bench/"
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle in bench/: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
