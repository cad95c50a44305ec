"""`pytest bench --benchmark-only`: the registered bench entries through pytest-benchmark.

Without CUDA the entries run their tiny smoke shapes through the Triton interpreter, so the route is
exercised on CPU; those times are interpreter times. TRITON_INTERPRET is read when kernel modules are
imported, so it is set here, before the entries import them.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # pytest-benchmark switches itself off under xdist: every benchmark would silently not be timed.
    workers = getattr(config.option, "numprocesses", None)
    if workers and not os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError(f"pytest bench: -n {workers} runs under pytest-xdist, which switches pytest-benchmark "
                                "off; run the benchmarks single-process: pytest bench --benchmark-only -p no:xdist")


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"bench: {torch.cuda.get_device_name()}, real shapes"
    return "bench: no CUDA: interpreter smoke at tiny shapes; the times are not GPU numbers"
