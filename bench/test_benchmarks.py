"""Every registered bench case as one pytest-benchmark test: `pytest bench --benchmark-only -p no:xdist`.

Tests are grouped by kernel, mode and shape, so pytest-benchmark's table compares the providers side
by side; extra_info carries the FLOP and byte counts and the rates computed from the median.
BENCH_PACKAGE=<package> takes the entries from another package's modules instead of bench/.
"""
import math
import os
import time

import pytest
import torch

from bench import registry

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SMOKE = not CUDA
PACKAGE = os.environ.get("BENCH_PACKAGE", "bench")


def case_params(entries: dict, device: str, smoke: bool) -> list:
    """One pytest.param(entry, case_id) per case. Builds each entry's cases once; they are freed after."""
    params = []
    for name, cases_fn in entries.items():
        params += [pytest.param(name, case.id, id=case.id)
                   for case in registry.build_cases(name, cases_fn, device, smoke)]
        if CUDA:
            torch.cuda.empty_cache()
    return params


_live: dict = {}  # entry -> {case id: Case}: only one entry's inputs are alive at a time


def _case(entry: str, case_id: str) -> registry.Case:
    if entry not in _live:
        _live.clear()
        if CUDA:
            torch.cuda.empty_cache()
        cases_fn = registry.load_entries([entry], package=PACKAGE)[entry]
        _live[entry] = {c.id: c for c in registry.build_cases(entry, cases_fn, DEVICE, SMOKE)}
    return _live[entry][case_id]


def pytest_generate_tests(metafunc):
    # at collection, not import: importing this module must not build every entry's cases
    if "case_id" in metafunc.fixturenames:
        metafunc.parametrize("entry, case_id", case_params(registry.load_entries(package=PACKAGE), DEVICE, SMOKE))


def test_benchmark(benchmark, entry, case_id):
    case = _case(entry, case_id)
    benchmark.group = f"{case.kernel} {case.mode} {case.shape_label}"
    benchmark.extra_info.update(kernel=case.kernel, provider=case.provider, mode=case.mode, shape=case.shape,
                                flops=case.flops, bytes=case.bytes,
                                timing=registry.TIMING_GPU if CUDA else registry.TIMING_SMOKE)
    if CUDA:
        def run():
            case.fn()
            torch.cuda.synchronize()  # time the kernel, not the launch
        run()  # compile and autotune outside the timed rounds
        t0 = time.perf_counter()
        run()
        once = max(time.perf_counter() - t0, 1e-6)
        # the same budgets as do_bench in python -m bench: >= 25 ms warm-up, >= 100 ms timed
        benchmark.pedantic(run, rounds=max(10, math.ceil(0.100 / once)), warmup_rounds=math.ceil(0.025 / once),
                           iterations=1)
    else:
        benchmark.pedantic(case.fn, rounds=1, iterations=1)
    if benchmark.stats:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / median_s / 1e12
        if case.bytes:
            benchmark.extra_info["gbps"] = case.bytes / median_s / 1e9
