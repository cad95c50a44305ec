"""The benchmark registry: which cases exist, and how one case is timed.

Each entry module bench/<family>.py registers a function that builds its cases:

    from bench.registry import Case, register

    @register("mlp")
    def cases(device: str, smoke: bool) -> list[Case]: ...

`smoke=True` means there is no CUDA: tiny shapes that the Triton interpreter runs in seconds, so CI
exercises every entry; their timings are interpreter times and are labelled so everywhere. The
cases function is only called when its entry is benchmarked, so allocating inputs inside it is fine.

Every bench/*.py that is not part of the machinery (MACHINERY below) is an entry module; a module
that fails to import or registers nothing is an error, so a new family is never silently skipped.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

MODES = ("fwd", "bwd", "fwd+bwd")
# bench/ modules that run or analyse benchmarks rather than define them (ledger: the step's time ledger;
# flops: the analytical FLOP/byte model).
MACHINERY = frozenset({"__init__", "__main__", "registry", "report", "sm90", "gpu_check", "conftest",
                       "test_benchmarks", "ledger", "flops", "artifact"})
# triton.testing.do_bench budgets in ms; the issue asks for at least these.
MIN_WARMUP_MS = 25
MIN_REP_MS = 100
TIMING_GPU = "do_bench"
TIMING_SMOKE = "interpreter-smoke"

CasesFn = Callable[[str, bool], list]


@dataclass(frozen=True)
class Case:
    """One timed thing: `fn()` runs the op once (for mode "bwd": the backward pass only).

    flops: useful floating-point operations of one call (a GEMM counts 2·M·N·K), None if not
    compute-bound; bytes: bytes one call must move to/from memory, None if not memory-bound.
    """
    kernel: str
    provider: str
    mode: str
    shape: dict
    fn: Callable[[], object] = field(repr=False)
    flops: float | None = None
    bytes: float | None = None

    def __post_init__(self):
        where = f"Case(kernel={self.kernel!r}, provider={self.provider!r})"
        for name in ("kernel", "provider"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c in value for c in " ,/\n"):
                raise ValueError(f"{where}: {name}={value!r} must be a non-empty name without spaces, commas or '/'")
        if self.mode not in MODES:
            raise ValueError(f"{where}: mode={self.mode!r} is not one of {MODES}")
        if not isinstance(self.shape, dict) or not self.shape:
            raise ValueError(f"{where}: shape must be a non-empty dict like {{'M': 4096, 'N': 512}}, got {self.shape!r}")
        for key, value in self.shape.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"{where}: shape[{key!r}]={value!r}: keys must be str, values int or str")
        if not callable(self.fn):
            raise ValueError(f"{where}: fn={self.fn!r} is not callable (a zero-argument function running the op once)")
        for name in ("flops", "bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{where}: {name}={value!r} must be None or a finite number >= 0")

    @property
    def shape_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def id(self) -> str:
        """Unique within an entry: kernel-provider-mode-shape."""
        return f"{self.kernel}-{self.provider}-{self.mode}-" + "-".join(f"{k}{v}" for k, v in self.shape.items())


@dataclass
class Result:
    """One case's timing. ms is the median, ms_p20/ms_p80 the 20th/80th percentiles."""
    case: Case
    timing: str                  # TIMING_GPU or TIMING_SMOKE
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    error: str | None = None     # the exception, when the case failed to run

    @property
    def tflops(self) -> float | None:
        if self.ms is None or self.case.flops is None or self.ms <= 0:
            return None
        return self.case.flops / (self.ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float | None:
        if self.ms is None or self.case.bytes is None or self.ms <= 0:
            return None
        return self.case.bytes / (self.ms * 1e-3) / 1e9


class Registry:
    """Entry name -> the function that builds its cases."""

    def __init__(self):
        self._entries: dict[str, CasesFn] = {}

    def register(self, name: str):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register({name!r}): the entry name must be an identifier like 'mlp'")

        def decorate(fn: CasesFn) -> CasesFn:
            old = self._entries.get(name)
            # The same source registering again is one entry module run as a script (`python -m bench.step`)
            # and also imported under its package name: keep the newest, it is the same code.
            same_source = old is not None and (old.__code__.co_filename, old.__code__.co_firstlineno) == (
                fn.__code__.co_filename, fn.__code__.co_firstlineno)
            if old is not None and old is not fn and not same_source:
                raise ValueError(f"bench entry {name!r} is registered twice: by {old.__module__}.{old.__qualname__} "
                                 f"and {fn.__module__}.{fn.__qualname__}")
            self._entries[name] = fn
            return fn
        return decorate

    def entries(self) -> dict[str, CasesFn]:
        return dict(self._entries)

    def modules(self) -> set[str]:
        return {fn.__module__ for fn in self._entries.values()}


REGISTRY = Registry()
register = REGISTRY.register


def entry_modules(package: str = "bench") -> list[str]:
    """The entry modules of a package: every module in it that is not machinery, sorted."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name not in MACHINERY and not m.name.startswith("_"))


def load_entries(names: list[str] | None = None, package: str = "bench", registry: Registry = REGISTRY) -> dict[str, CasesFn]:
    """Import every entry module of `package`, then return the entries named (all when names is empty).

    Kernel modules read TRITON_INTERPRET when they are imported: on a machine without CUDA set it first.
    """
    for module in entry_modules(package):
        qualified = f"{package}.{module}"
        try:
            importlib.import_module(qualified)
        except Exception as exc:
            path = Path(importlib.import_module(package).__path__[0]) / f"{module}.py"
            raise RuntimeError(f"bench entry module {path} failed to import: {type(exc).__name__}: {exc}") from exc
        if qualified not in registry.modules():
            raise RuntimeError(f"bench entry module {qualified} registered no entry: decorate its cases function with "
                               f"@register('<name>') from bench.registry (or list it in bench.registry.MACHINERY "
                               f"if it is not an entry)")
    found = registry.entries()
    if not names:
        return found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise KeyError(f"no bench entry named {', '.join(map(repr, unknown))}; registered: {', '.join(sorted(found)) or 'none'}")
    return {n: found[n] for n in names}


def build_cases(name: str, cases_fn: CasesFn, device: str, smoke: bool) -> list[Case]:
    """Call an entry's cases function and check what it returned."""
    cases = cases_fn(device, smoke)
    where = f"bench entry {name!r} ({cases_fn.__module__}.{cases_fn.__qualname__}, device={device!r}, smoke={smoke})"
    if not isinstance(cases, (list, tuple)) or not cases:
        raise ValueError(f"{where} returned {type(cases).__name__} {cases!r:.80}; expected a non-empty list of Case")
    seen = set()
    for i, case in enumerate(cases):
        if not isinstance(case, Case):
            raise ValueError(f"{where}: item {i} is a {type(case).__name__}, not a bench.registry.Case")
        if case.id in seen:
            raise ValueError(f"{where}: two cases have the same kernel/provider/mode/shape: {case.id}")
        seen.add(case.id)
    return list(cases)


def time_case(case: Case, interpreted: bool, warmup_ms: float = MIN_WARMUP_MS, rep_ms: float = MIN_REP_MS,
              smoke_reps: int = 1) -> Result:
    """Time one case; an exception becomes Result.error so one broken case does not lose the others.

    On CUDA: triton.testing.do_bench (it flushes L2 between calls) for the median and p20/p80.
    Interpreted (no CUDA): `smoke_reps` wall-clock calls with no warm-up; not a GPU number.
    """
    timing = TIMING_SMOKE if interpreted else TIMING_GPU
    try:
        if interpreted:
            samples = []
            for _ in range(smoke_reps):
                t0 = time.perf_counter()
                case.fn()
                samples.append((time.perf_counter() - t0) * 1e3)
            q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
            return Result(case, timing, ms=statistics.median(samples), ms_p20=q[0], ms_p80=q[3])
        import triton.testing
        if warmup_ms < MIN_WARMUP_MS or rep_ms < MIN_REP_MS:
            raise ValueError(f"warmup_ms={warmup_ms}, rep_ms={rep_ms}: at least {MIN_WARMUP_MS} and {MIN_REP_MS} ms")
        median, p20, p80 = triton.testing.do_bench(case.fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Result(case, timing, ms=median, ms_p20=p20, ms_p80=p80)
    except Exception as exc:  # report it in the row and go on with the next case
        return Result(case, timing, error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
    finally:
        from model.io import synchronize  # lazily: listing entries needs no torch
        synchronize()


def _inputs_freed():
    raise RuntimeError("this case was timed already and its inputs were freed")


def run_entries(entries: dict[str, CasesFn], device: str, smoke: bool, warmup_ms: float = MIN_WARMUP_MS,
                rep_ms: float = MIN_REP_MS, progress: Callable[[str], None] | None = None) -> list[Result]:
    """Build and time every case of every entry, one entry at a time (its inputs are freed before the next).

    smoke picks the entries' tiny shapes; without CUDA they are timed as interpreter smoke.
    """
    results = []
    for name, cases_fn in entries.items():
        try:
            cases = build_cases(name, cases_fn, device, smoke)
        except Exception as exc:  # one entry that cannot set up must not lose the others' results
            where = Case(kernel=name, provider="setup", mode="fwd", shape={"entry": name}, fn=_inputs_freed)
            error = f"{cases_fn.__module__}.{cases_fn.__qualname__}(device={device!r}, smoke={smoke}) failed: " \
                    f"{type(exc).__name__}: {exc}"
            results.append(Result(where, TIMING_SMOKE if device != "cuda" else TIMING_GPU,
                                  error=error.replace("\n", " ")[:300]))
            if progress:
                progress(f"  {name:<12} ERROR {results[-1].error}")
            continue
        for case in cases:
            result = time_case(case, device != "cuda", warmup_ms, rep_ms)
            result.case = replace(case, fn=_inputs_freed)  # the result must not keep the inputs alive
            results.append(result)
            if progress:
                status = f"ERROR {result.error}" if result.error else f"{result.ms:.4f} ms"
                progress(f"  {case.kernel:<12} {case.provider:<10} {case.mode:<8} {case.shape_label:<40} {status}")
        del cases
        if device == "cuda":
            import torch
            torch.cuda.empty_cache()
    return results


def compile_baseline(fn: Callable, device: str) -> Callable:
    """torch.compile(fn) for an entry's "compile" provider.

    Without CUDA (smoke) it compiles with backend="eager": the Dynamo trace is still exercised, but CI
    does not pay inductor's ~20 s C++ build per graph for a number nobody reads.
    """
    import torch
    return torch.compile(fn) if device == "cuda" else torch.compile(fn, backend="eager")
