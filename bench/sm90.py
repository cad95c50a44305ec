"""The H100 compile check: every kernel configuration the code can launch, compiled for sm_90.

python -m bench.sm90 [--module PATH ...] [--jobs 2] [--json OUT]

Each kernels/<family>.py that defines @triton.jit kernels exposes `sm90_configs() -> list[dict]`, one
dict per configuration its launchers can launch:
    {"name": str, "kernel": <@triton.jit function (or its autotune/heuristics wrapper)>,
     "signature": {arg: "*bf16" | "*fp32" | "i32" | "fp32" | ...}  (every non-constexpr argument),
     "constexprs": {arg: value}  (every constexpr argument without a default),
     "num_warps": int, "num_stages": int,
     "hgmma": bool  (True for large-tile matrix kernels that must use Hopper's warpgroup MMA),
     "divisible_by_16": [int args]  (optional: ints the real launches pass as multiples of 16),
     "equal_to_1": [int args]  (optional: ints a launch may pass as 1, which Triton turns into the
                                constexpr 1; the kernel must compile that way too)}
Pointer arguments are compiled as 16-byte aligned, as Triton specializes them for torch tensors.

Each configuration is compiled with triton.compile for GPUTarget("cuda", 90, 32) (no GPU needed),
then read with the wheel's cuobjdump: registers, stack, local memory and the SASS (its LDL/STL local
loads and stores, its matrix instructions); shared memory comes from the compiled metadata (cuobjdump
shows only the static part). A configuration fails on any spill or local memory, on more than 227 KB
of shared memory, or, where "hgmma" is set, on SASS without a warpgroup MMA (HGMMA and its int8/fp8
forms). A module that launches a @triton.jit kernel (`kernel[grid](...)`) that no configuration names,
or that has @triton.jit kernels and no sm90_configs, fails too: a new family is never silently skipped.

The interpreter replaces every kernel with an interpreter object that cannot be compiled, so the check
always runs in a process without TRITON_INTERPRET (this module re-launches itself when it is set).
Triton's own cache (~/.triton/cache) makes a re-run of unchanged kernels take seconds.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHARED_LIMIT = 227 * 1024   # H100: the most shared memory one block can opt in to
TARGET = ("cuda", 90, 32)   # backend, compute capability, warp size
REQUIRED_KEYS = {"name": str, "kernel": object, "signature": dict, "constexprs": dict, "num_warps": int,
                 "num_stages": int, "hgmma": bool}
WARPGROUP_MMA = ("HGMMA", "IGMMA", "QGMMA")  # bf16/fp16, int8 and fp8 forms of wgmma in SASS

_CONFIGS: list[tuple[str, dict]] = []  # (module name, config) filled by discovery, read by forked workers


class ConfigError(ValueError):
    """An sm90_configs() entry that cannot be compiled as written; the message names module and config."""


def _jit_function(obj):
    """The JITFunction under an @autotune / @heuristics wrapper, or None for anything else."""
    from triton.runtime.jit import JITFunction, KernelInterface
    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj if isinstance(obj, JITFunction) else None


def _jit_functions(module) -> dict:
    """name -> JITFunction for the @triton.jit functions defined in the module itself (not imported)."""
    found = {}
    for name, obj in vars(module).items():
        fn = _jit_function(obj)
        if fn is not None and getattr(fn.fn, "__module__", None) == module.__name__:
            found[name] = fn
    return found


def _launched_names(module, jit_names) -> set:
    """The @triton.jit functions the module's host code launches as `name[grid](...)`."""
    try:
        source = Path(module.__file__).read_text()
    except OSError:
        return set()
    return {name for name in jit_names if re.search(rf"\b{re.escape(name)}\s*\[", source)}


def _default(kernel, name: str):
    """A kernel argument's default (inspect.Parameter.empty if none); the plain signature works on Triton 3.6 too."""
    return inspect.signature(kernel.fn).parameters[name].default


def validate_config(module_name: str, index: int, config) -> dict:
    """Check one config dict against its kernel's parameters; returns it with the kernel unwrapped."""
    where = f"{module_name}.sm90_configs()[{index}]"
    if not isinstance(config, dict):
        raise ConfigError(f"{where} is a {type(config).__name__}, not a dict")
    where = f"{module_name}.sm90_configs() config {config.get('name', index)!r}"
    for key, kind in REQUIRED_KEYS.items():
        if key not in config:
            raise ConfigError(f"{where}: missing key {key!r} (needs {sorted(REQUIRED_KEYS)})")
        if kind is not object and (not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool))):
            raise ConfigError(f"{where}: {key}={config[key]!r} must be a {kind.__name__}")
    kernel = _jit_function(config["kernel"])
    if kernel is None:
        raise ConfigError(f"{where}: kernel={config['kernel']!r} is not a @triton.jit function")
    params = {p.name: p for p in kernel.params}
    constexpr = {n for n, p in params.items() if p.is_constexpr}
    sig, consts = config["signature"], config["constexprs"]
    for name in list(sig) + list(consts):
        if name not in params:
            raise ConfigError(f"{where}: {kernel.__name__} has no argument {name!r} (arguments: {list(params)})")
    missing_sig = [n for n in params if n not in constexpr and n not in sig]
    if missing_sig:
        raise ConfigError(f"{where}: signature lacks {missing_sig} of {kernel.__name__}")
    missing_const = [n for n in constexpr if n not in consts and _default(kernel, n) is inspect.Parameter.empty]
    if missing_const:
        raise ConfigError(f"{where}: constexprs lacks {missing_const} of {kernel.__name__}")
    wrong = [n for n in sig if n in constexpr] + [n for n in consts if n not in constexpr]
    if wrong:
        raise ConfigError(f"{where}: {wrong} are in the wrong dict (constexpr arguments go in 'constexprs', "
                          f"the others in 'signature')")
    bad_types = {n: t for n, t in sig.items() if not isinstance(t, str) or not t}
    if bad_types:
        raise ConfigError(f"{where}: signature types must be strings like '*bf16' or 'i32', got {bad_types}")
    for key in ("num_warps", "num_stages"):
        if config[key] < 1:
            raise ConfigError(f"{where}: {key}={config[key]} must be >= 1")
    if config["num_warps"] & (config["num_warps"] - 1):
        raise ConfigError(f"{where}: num_warps={config['num_warps']} must be a power of two")
    for key in ("divisible_by_16", "equal_to_1"):
        named = config.get(key, [])
        bad = [n for n in named if n not in sig or sig[n].startswith("*")]
        if bad:
            raise ConfigError(f"{where}: {key} names {bad}, which are not integer arguments")
    return {**config, "kernel": kernel}


def discover(package: str | None = "kernels", paths: tuple = ()) -> tuple[list[dict], list[tuple[str, dict]]]:
    """Import the package's modules and the module files in `paths`; collect and validate their configs.

    Returns (one report per module, [(module name, config)]). Problems are recorded, not raised, so one
    broken module does not hide the others.
    """
    modules = []
    if package:
        pkg = importlib.import_module(package)
        modules += [(f"{package}.{m.name}", None) for m in pkgutil.iter_modules(pkg.__path__)]
    modules += [(f"sm90_check_{Path(p).stem}", Path(p)) for p in paths]
    reports, configs = [], []
    for name, path in modules:
        report = {"module": name, "path": str(path) if path else name.replace(".", "/") + ".py",
                  "jit_functions": [], "configs": 0, "error": None}
        reports.append(report)
        try:
            if path is None:
                module = importlib.import_module(name)
            elif _dotted_name(path):  # a file inside a package (kernels/norm.py): its relative imports need it
                root, dotted = _dotted_name(path)
                if root not in sys.path:
                    sys.path.insert(0, root)
                module = importlib.import_module(dotted)
                report["module"] = name = dotted
            else:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        except Exception as exc:
            report["error"] = f"import failed: {type(exc).__name__}: {exc}"
            continue
        jit = _jit_functions(module)
        report["jit_functions"] = sorted(jit)
        if not hasattr(module, "sm90_configs"):
            if jit:
                report["error"] = (f"defines @triton.jit functions {sorted(jit)} but no sm90_configs(): add one "
                                   f"listing every configuration its launchers can launch")
            continue
        try:
            listed = module.sm90_configs()
            if not isinstance(listed, (list, tuple)):
                raise ConfigError(f"{name}.sm90_configs() returned a {type(listed).__name__}, not a list")
            mine = [validate_config(name, i, c) for i, c in enumerate(listed)]
            names = Counter(c["name"] for c in mine)
            twice = [n for n, k in names.items() if k > 1]
            if twice:
                raise ConfigError(f"{name}.sm90_configs(): config names used more than once: {twice}")
            covered = {id(c["kernel"]) for c in mine}
            unlisted = sorted(n for n in _launched_names(module, jit) if id(jit[n]) not in covered)
            if unlisted:
                raise ConfigError(f"{name}: kernels launched in the module but in no sm90_configs() entry: {unlisted}")
        except Exception as exc:
            report["error"] = str(exc) if isinstance(exc, ConfigError) else f"sm90_configs() failed: {type(exc).__name__}: {exc}"
            continue
        report["configs"] = len(mine)
        configs += [(name, c) for c in mine]
    return reports, configs


def _dotted_name(path: Path) -> tuple[str, str] | None:
    """(folder to import from, dotted module name) of a .py file inside a package; None for a loose file."""
    path = Path(path).resolve()
    parts, folder = [path.stem], path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return (str(folder), ".".join(parts)) if len(parts) > 1 else None


def _tool(name: str) -> str:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is neither in {bundled.parent} nor on PATH")
    return found


def parse_resource_usage(text: str) -> dict:
    """cuobjdump --dump-resource-usage -> {registers, stack, local}; the one kernel's line."""
    line = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not line:
        raise ValueError(f"cuobjdump --dump-resource-usage printed no REG/STACK/LOCAL line:\n{text[:500]}")
    return {"registers": int(line[1]), "stack": int(line[2]), "local": int(line[4])}


def sass_opcodes(sass: str) -> Counter:
    """Opcode counts (the mnemonic before the first '.') of a cuobjdump --dump-sass listing."""
    return Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))


def verdict(result: dict) -> list[str]:
    """The problems of one compiled configuration (empty when it passes)."""
    problems = []
    if result["stack"] or result["local_memory_instructions"]:
        problems.append(f"register spills: {result['stack']} B stack, "
                        f"{result['local_memory_instructions']} local loads/stores (LDL/STL)")
    if result["local"]:
        problems.append(f"{result['local']} B of local memory")
    if result["shared"] > SHARED_LIMIT:
        problems.append(f"{result['shared'] / 1024:.1f} KB shared memory > {SHARED_LIMIT // 1024} KB")
    if result["hgmma_required"] and not any(result["mma"].get(op) for op in WARPGROUP_MMA):
        found = ", ".join(f"{op} x{n}" for op, n in result["mma"].items()) or "no matrix instructions"
        problems.append(f"marked hgmma but the SASS has no warpgroup MMA (HGMMA): {found}")
    return problems


def compile_config(index: int) -> dict:
    """Compile _CONFIGS[index] for sm_90 and read its resources. Runs in a worker process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, config = _CONFIGS[index]
    kernel = config["kernel"]
    result = {"module": module_name, "name": config["name"], "kernel": kernel.__name__,
              "num_warps": config["num_warps"], "num_stages": config["num_stages"],
              "hgmma_required": config["hgmma"], "error": None, "problems": []}
    t0 = time.perf_counter()
    try:
        ones = set(config.get("equal_to_1", []))  # launched with the value 1: Triton makes them constexpr
        constexprs = {p.name: config["constexprs"][p.name] if p.name in config["constexprs"] else _default(kernel, p.name)
                      for p in kernel.params if p.is_constexpr}
        constexprs.update({name: 1 for name in ones})
        signature = {p.name: "constexpr" if p.is_constexpr or p.name in ones else config["signature"][p.name]
                     for p in kernel.params}
        aligned = set(config.get("divisible_by_16", []))
        attrs = {(p.num,): [["tt.divisibility", 16]] for p in kernel.params
                 if signature[p.name] != "constexpr" and (signature[p.name].startswith("*") or p.name in aligned)}
        source = ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget(*TARGET),
                                  options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
        result["compile_s"] = round(time.perf_counter() - t0, 2)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        result.update(parse_resource_usage(usage))
        ops = sass_opcodes(sass)
        result["shared"] = int(compiled.metadata.shared)
        result["local_memory_instructions"] = ops["LDL"] + ops["STL"]
        result["mma"] = {op: n for op, n in sorted(ops.items()) if op.endswith("MMA")}
        result["problems"] = verdict(result)
    except Exception as exc:
        result["compile_s"] = round(time.perf_counter() - t0, 2)
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["problems"] = [f"does not compile for sm_90: {result['error'][:300]}"]
    return result


def run_check(package: str | None = "kernels", paths: tuple = (), jobs: int = 2) -> dict:
    """Discover and compile everything in this process (TRITON_INTERPRET must be unset here)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.sm90.run_check needs real @triton.jit kernels: run it in a process without "
                           "TRITON_INTERPRET (check() does that for you)")
    import triton
    t0 = time.perf_counter()
    reports, configs = discover(package, tuple(paths))
    _CONFIGS[:] = configs
    indices = range(len(configs))
    if jobs > 1 and len(configs) > 1:
        import multiprocessing
        # fork: the workers inherit the imported modules and _CONFIGS (kernels cannot be pickled)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_config, indices))
    else:
        results = [compile_config(i) for i in indices]
    return {"triton": triton.__version__, "target": list(TARGET), "jobs": jobs,
            "wall_s": round(time.perf_counter() - t0, 2), "modules": reports, "configs": results,
            "ok": not any(r["error"] for r in reports) and not any(r["problems"] for r in results)}


def check(package: str | None = "kernels", paths: tuple = (), jobs: int = 2, timeout: float = 600) -> dict:
    """run_check in a fresh subprocess without TRITON_INTERPRET (safe to call from interpreter-mode tests)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sm90.json"
        cmd = [sys.executable, "-m", "bench.sm90", "--jobs", str(jobs), "--json", str(out), "--quiet"]
        cmd += ["--package", package] if package else ["--no-package"]
        for p in paths:
            cmd += ["--module", str(p)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
        if not out.exists():
            raise RuntimeError(f"the sm_90 check crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def markdown(report: dict) -> str:
    lines = [f"sm_90 compile check: triton {report['triton']}, {len(report['configs'])} configurations from "
             f"{len(report['modules'])} modules in {report['wall_s']:.1f} s ({report['jobs']} jobs)\n"]
    bad_modules = [m for m in report["modules"] if m["error"]]
    for m in bad_modules:
        lines.append(f"- MODULE {m['path']}: {m['error']}")
    if bad_modules:
        lines.append("")
    header = ["module", "config", "kernel", "warps/stages", "regs", "stack B", "local B", "shared KB", "LDL/STL",
              "matrix instructions", "compile s", "verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in report["configs"]:
        if r["error"]:
            cells = [r["module"], r["name"], r["kernel"], f"{r['num_warps']}/{r['num_stages']}"] + [""] * 6 + [
                f"{r['compile_s']:.1f}", "FAIL: " + "; ".join(r["problems"])]
        else:
            mma = ", ".join(f"{op} x{n}" for op, n in r["mma"].items()) or "none"
            cells = [r["module"], r["name"], r["kernel"], f"{r['num_warps']}/{r['num_stages']}", str(r["registers"]),
                     str(r["stack"]), str(r["local"]), f"{r['shared'] / 1024:.1f}", str(r["local_memory_instructions"]),
                     mma + (" (hgmma required)" if r["hgmma_required"] else ""), f"{r['compile_s']:.1f}",
                     "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append(f"\n{'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from model.cli import positive_int

    parser = argparse.ArgumentParser(prog="python -m bench.sm90", description="Compile every kernel "
                                     "configuration for sm_90 (no GPU needed) and check its resources.")
    parser.add_argument("--package", default="kernels", help="package whose modules are checked (default: kernels)")
    parser.add_argument("--no-package", action="store_true", help="check only the --module files")
    parser.add_argument("--module", action="append", default=[], type=Path, help="an extra module file to check")
    parser.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no table on screen")
    args = parser.parse_args(argv)
    for path in args.module:
        if not path.is_file():
            parser.error(f"--module {path}: no such file")
    package = None if args.no_package else args.package
    if os.environ.get("TRITON_INTERPRET") == "1":
        report = check(package, tuple(args.module), args.jobs)
    else:
        report = run_check(package, tuple(args.module), args.jobs)
    if args.json:
        from model.io import write_atomic
        write_atomic(args.json, json.dumps(report, indent=1))
    if not args.quiet:
        print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
