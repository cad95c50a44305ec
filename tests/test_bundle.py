"""The submission's one train_gpt.py (quant/bundle.py) and the records check (quant/records_check.py).

The bundle holds exactly the modules a run imports, stays under SIZE_TARGET, keeps its lzma blob in a
latin-1 string literal that gives back every byte value (compiled from bytes and read by `python -I`), and
runs from a temporary folder under `python -I` with this checkout's editable install still importable:
every module comes from the bundle, the Triton kernels decorate without the interpreter (a loader that
exec()s strings fails there, shown by a variant that compiles under "<bundle>"), and tracebacks show its
lines. The full check (the short run from the bundle against `python -m train`) runs once per source state,
cached under .cache/tests behind a file lock, on the folder `quant.records export` makes from a real tiny
run; the cheap failure cases use folders written here in the same format (write_folder).
"""
import ast
import hashlib
import inspect
import io
import json
import lzma
import os
import re
import shutil
import statistics
import subprocess
import sys
import tokenize
import warnings
from pathlib import Path

import pytest
from conftest import REPO, hash_project_sources
from filelock import FileLock

from quant import bundle, records_check

SEED = 1337


@pytest.fixture(scope="module")
def code() -> bytes:
    return bundle.build_bundle()


def _env() -> dict:
    """A child's environment as `check` gives it: no TRITON_INTERPRET, no PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")
            and not k.startswith("PYTEST_")}


def write_folder(folder: Path, code: bytes, seeds=(SEED,), change=None) -> Path:
    """A records folder whose logs and submission.json agree (the lines the trainer and export write);
    change(submission) may edit submission.json before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_bytes(code)
    (folder / "README.md").write_text("# test record\n")
    sha = hashlib.sha256(code).hexdigest()
    results = {}
    for i, seed in enumerate(seeds):
        loss, bpb, model_bytes = 2.123456780 + 0.01 * i, 1.234567890 + 0.01 * i, 15_000_000 + 1000 * i
        log = [f"lrs: matrix 0.03 embed 0.035 scalar 0.025  grad_clip:0.3  swa_every:10  seed:{seed}",
               "versions: torch:2.13.0 triton:3.7.1 cuda:12.8 gpu:NVIDIA H100 80GB HBM3",
               "step:7000/20000 val_loss:2.1300 val_bpb:1.2400 train_time:580000ms step_avg:82.86ms",
               "stopping_early: wallclock_cap train_time:580000ms step:7000/20000",
               "train_stop: train_time_s:580.000 steps:7000",
               "calibration_s:15.500 train_plus_calibration_s:595.500 limit_s:600",
               f"quant: wrote runs/x/final_model.int6.ptz: {model_bytes:,} B model + {len(code):,} B code",
               f"code_bytes:{len(code)} code_sha256:{sha}",
               f"Total submission size int6+brotli: {model_bytes + len(code)} bytes",
               f"final_int6_sliding_window val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{88123 + i}ms",
               f"final_int6_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]
        (folder / f"train_seed{seed}.log").write_text("\n".join(log) + "\n")
        results[str(seed)] = dict(val_loss=loss, val_bpb=bpb, artifact_bytes=model_bytes + len(code), steps=7000,
                                  step_avg_ms=82.857, train_time_s=595.5, eval_time_s=(88123 + i) / 1000)
    losses, bpbs = [r["val_loss"] for r in results.values()], [r["val_bpb"] for r in results.values()]

    def std(values):
        return round(statistics.stdev(values), 8) if len(values) > 1 else None
    sub = dict(author="", github_id="", name="test", blurb="", date="2026-12-01", track="10min_16mb",
               val_loss=round(sum(losses) / len(losses), 8), val_bpb=round(sum(bpbs) / len(bpbs), 8),
               val_loss_std=std(losses), val_bpb_std=std(bpbs), seeds=list(seeds), seed_results=results,
               bytes_total=max(r["artifact_bytes"] for r in results.values()), bytes_code=len(code),
               hardware="8x NVIDIA H100 80GB HBM3", pytorch_version="2.13.0", triton_version="3.7.1",
               cuda_version="12.8", compliance=dict(train_time_max_s=595.5,
                                                    eval_time_max_s=max(r["eval_time_s"] for r in results.values()),
                                                    gptq_within_budget=True))
    if change is not None:
        change(sub)
    (folder / "submission.json").write_text(json.dumps(sub, indent=1))
    return folder


# ---------------------------------------------------------------- what the bundle holds

def test_bundle_holds_what_a_run_imports_and_nothing_else():
    modules = bundle.bundled_modules()
    # what `python -m train` really imports, without the interpreter
    probe = ("import sys, train.__main__; print(' '.join(sorted(n for n in sys.modules "
             "if n.split('.')[0] in ('kernels', 'model', 'train', 'quant'))))")
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, check=True).stdout.split()
    assert sorted(modules) == imported
    for left_out in ("kernels._interpreter", "quant.__main__", "quant.inspect", "quant.generate", "quant.bundle",
                     "quant.records", "quant.records_check", "train.prepare", "train.download", "model.decode"):
        assert left_out not in modules
    assert all(path.is_relative_to(REPO) and path.parts[len(REPO.parts)] in bundle.PACKAGES
               for path in modules.values())


def test_minified_modules_keep_the_program_and_every_kernel_signature():
    sources = bundle._built(None)[1]
    for name, path in bundle.bundled_modules().items():
        original = ast.parse(path.read_text())
        small = ast.parse(sources[name])
        assert ast.dump(small) == ast.dump(bundle._without_annotations(bundle._without_docstrings(
            bundle._without_unrun_functions(ast.parse(path.read_text())))))
        # the compile-check tables are left out, and nothing left in the bundle reaches for them
        assert not any(word in sources[name] for word in bundle.LEFT_OUT_FUNCTIONS), name
        assert not any(line.lstrip().startswith("#") for line in sources[name].splitlines())  # no comments

        def kernels(tree):
            return {f.name: [(a.arg, ast.unparse(a.annotation) if a.annotation else None) for a in f.args.args]
                    for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    and any("jit" in ast.unparse(d) for d in f.decorator_list)}
        assert kernels(small) == kernels(original)
        if name.startswith("kernels.") and name not in ("kernels._runtime", "kernels.selftest"):
            assert any("tl.constexpr" in str(args) for args in kernels(small).values()), name

        def annotations(tree, decorated):  # custom_op infers its schema from them: decorated functions keep theirs
            return {f.name: [ast.dump(a.annotation) if a.annotation else None
                             for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
                    + [ast.dump(f.returns) if f.returns else None]
                    for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    and any(bundle._decorator_name(d) not in bundle._ANNOTATION_BLIND for d in f.decorator_list)
                    == decorated}
        assert annotations(small, True) == annotations(original, True)
        assert all(a is None for args in annotations(small, False).values() for a in args), name


def test_bundle_size_and_bytes_per_package(code, capsys):
    sizes = bundle.package_bytes()
    with capsys.disabled():
        print("\n" + bundle.format_sizes())
    assert len(code) <= bundle.SIZE_TARGET, f"train_gpt.py is {len(code):,} B > {bundle.SIZE_TARGET:,} B"
    assert set(sizes) == {*bundle.PACKAGES, "loader"} and all(v > 0 for v in sizes.values())
    assert sizes["loader"] < 1200  # the loader stays small
    assert bundle.main([]) == 0 and "train_gpt.py:" in capsys.readouterr().out


# What the literal escapes, in every context that changes how: runs of quotes (the third would close the
# literal; trailing ones would run into the closing quotes), NUL before octal and other digits, backslash before
# a quote or a newline, CR alone and in CRLF.
LITERAL_EDGES = [b"", b'"', b'""', b'"""', b'""""', b'a"""b', b'"' * 7 + b"x" + b'"' * 5, b'\\"""',
                 b"\\", b"\\\n", b"\r", b"\r\n", b"\n\r", b"\0", b"\0" + b"0", b"\0" + b"7", b"\0" + b"8", b"\0\0\0"]
ESCAPED_AND_NEIGHBOURS = b'"\\\r\n\0' + b"078"


def test_latin1_literal_gives_back_every_byte_value(tmp_path):
    cases = [bytes(range(256)) * 4, bytes(range(255, -1, -1)) * 4, *LITERAL_EDGES]
    cases += [bytes([a, b, c]) for a in ESCAPED_AND_NEIGHBOURS for b in ESCAPED_AND_NEIGHBOURS
              for c in ESCAPED_AND_NEIGHBOURS]
    literals = [bundle.latin1_literal(data) for data in cases]
    # per 256 byte values, only the backslash, CR and NUL take a second character; 6 are the quotes
    assert len(literals[0]) == len(cases[0]) + 3 * 4 + 6
    source = ("# coding: latin-1\nimport sys\nX=[" + ",\n".join(literals) + "]\n"
              "sys.stdout.write(repr([x.encode('latin-1') for x in X]))\n").encode("latin-1")
    path = tmp_path / "literals.py"
    path.write_bytes(source)
    space = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an invalid escape is only a warning; it must not be there either
        exec(compile(source, str(path), "exec"), space)  # the way runpy and py_compile read a file: from its bytes
    assert [x.encode("latin-1") for x in space["X"]] == cases
    # the way `python train_gpt.py` reads it: the interpreter's own file reader
    out = subprocess.run([sys.executable, "-I", "-W", "error", str(path)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out == repr(cases)


def test_bundle_is_latin1_and_its_literal_is_the_lzma_of_the_sources(code):
    assert tokenize.detect_encoding(io.BytesIO(code).readline)[0] == "iso-8859-1"
    assert code.startswith(b"# coding: latin-1\n") and b"\0" not in code and b"\r" not in code
    literals = [node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)
                and isinstance(node.value, str) and len(node.value) > 10_000]
    assert len(literals) == 1
    names_and_sources = lzma.decompress(literals[0].encode("latin-1")).decode().split(bundle._SEP)
    assert dict(zip(names_and_sources[::2], names_and_sources[1::2])) == bundle._built(None)[1]


def test_build_is_cached_by_source_hash(tmp_path):
    for rel, text in {"train/__init__.py": "", "train/__main__.py": "import model.m\n", "model/__init__.py": "",
                      "model/m.py": "X = 1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    first = bundle.build_bundle(tmp_path)
    assert bundle.build_bundle(tmp_path) is first
    (tmp_path / "model" / "m.py").write_text("X = 2\n")
    assert bundle.build_bundle(tmp_path) != first
    with pytest.raises(FileNotFoundError, match="no train/__main__.py"):
        bundle.build_bundle(tmp_path / "model")


# ---------------------------------------------------------------- running it

def test_bundle_loads_isolated_ahead_of_the_installed_copy(code, tmp_path):
    """python -I from a folder of its own: the finder goes first (this venv's editable install would otherwise
    win), the kernels decorate without the interpreter, inspect and tracebacks see the bundled source."""
    path = tmp_path / "train_gpt.py"
    path.write_bytes(code)
    report = records_check._probe(path, _env(), tmp_path)
    assert sorted(report["origins"]) == report["bundled"] == sorted(bundle.bundled_modules())
    installed = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                                "print(s.origin if s else '')"], cwd=tmp_path, env=_env(), capture_output=True,
                               text=True, check=True).stdout.strip()
    if installed:  # a competing copy (the editable install) was importable, and lost
        assert installed != str(path)
    program = (f"import json, runpy, inspect, traceback; runpy.run_path({str(path)!r}, run_name='x')\n"
               "import kernels.norm as n, model.config as c\n"
               "jit = [v for v in vars(n).values() if type(v).__name__ == 'JITFunction']\n"
               "try:\n    c.from_env(environ={'MODEL_DIM': 'wide'})\nexcept c.ConfigError:\n"
               "    tb = traceback.format_exc()\n"
               "print(json.dumps([n.__file__, [inspect.getsource(f.fn) for f in jit], tb]))")
    out = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, check=True).stdout
    file, sources, tb = json.loads(out)
    assert file == f"{path}/kernels/norm.py" and sources
    # every kernel's source reads back through linecache, and decorated functions keep their annotations
    assert all(source.startswith("@triton.jit") for source in sources)
    assert any("tl.constexpr" in source for source in sources)
    # the traceback names the module's place in the bundle and shows the line that raised
    assert f'File "{path}/model/config.py"' in tb and "raise ConfigError(" in tb


def test_check_fails_on_a_broken_train_gpt(code, tmp_path, prepared_corpus):
    corpus = dict(data_path=prepared_corpus.dataset_dir, tokenizer_path=prepared_corpus.tokenizer_path)
    lines = []
    broken = write_folder(tmp_path / "syntax", code.replace(b"class BundleFinder:", b"class BundleFinder(:"))
    assert records_check.check_folder(broken, log=lines.append, **corpus) == 1
    assert "does not compile" in lines[-1]
    # a loader that exec()s the sources as strings: fine under TRITON_INTERPRET=1, fails without it
    as_strings = code.replace(b'exec(compile(s,f,"exec"),m.__dict__)', b'exec(compile(s,"<bundle>","exec"),m.__dict__)')
    assert as_strings != code
    lines.clear()
    assert records_check.check_folder(write_folder(tmp_path / "strings", as_strings), log=lines.append, **corpus) == 1
    assert "@jit functions should be defined in a Python file" in lines[-1]


@pytest.mark.parametrize("change, message", [
    (lambda s: s["seed_results"][str(SEED)].update(val_bpb=1.2345), r"seed_results\[1337\].val_bpb = 1.2345"),
    (lambda s: s.update(val_loss=2.0), "val_loss 2.0 is not the seeds' mean"),
    (lambda s: s.update(bytes_code=123), "bytes_code 123 is not train_gpt.py's"),
    (lambda s: s["compliance"].update(gptq_within_budget=False), "gptq_within_budget is False"),
    (lambda s: s.update(seeds=[1, 2]), "are not the logs' seeds"),
])
def test_check_fails_when_submission_disagrees_with_the_logs(code, tmp_path, change, message):
    lines = []
    folder = write_folder(tmp_path / "record", code, seeds=(SEED, 42), change=change)
    assert records_check.check_folder(folder, log=lines.append) == 1
    assert "disagree" in lines[-1]
    assert re.search(message, lines[-1]), lines[-1]


def test_check_holds_each_seed_to_the_limits(code, tmp_path):
    folder = write_folder(tmp_path / "record", code)
    log = folder / f"train_seed{SEED}.log"
    text = log.read_text()
    log.write_text(text.replace("train_plus_calibration_s:595.500", "train_plus_calibration_s:601.000")
                   .replace("eval_time:88123ms", "eval_time:600500ms"))
    lines = []
    assert records_check.check_folder(folder, log=lines.append) == 1
    assert "training + calibration 601.000 s is over 600 s" in lines[-1]
    assert "evaluation 600.500 s is over 600 s" in lines[-1]
    log.write_text(text.replace(hashlib.sha256(code).hexdigest(), "0" * 64))
    lines.clear()
    assert records_check.check_folder(folder, log=lines.append) == 1
    assert "not this train_gpt.py" in lines[-1]
    (folder / "README.md").unlink()
    assert records_check.check_folder(folder, log=lines.append) == 1
    assert "missing README.md" in lines[-1]


def _exported_folder(work: Path, small_data: dict) -> Path:
    """What a competitor sends: a finished tiny run (step schedule, its export step included) exported by
    `quant.records` with this checkout's bundle."""
    import functools

    import torch

    import kernels
    from conftest import SMALL
    from model import from_env
    from quant import records
    from quant.export import export_run
    from train.trainer import train

    kernels.set_backend("torch")
    try:
        with torch.random.fork_rng():
            cfg = from_env(environ={}, preset="tiny", runs_dir=str(work / "runs"), run_id=f"seed{SEED}",
                           **{**SMALL, **small_data, "seed": SEED, "quant_method": "rtn"})
            train(cfg, export_fn=functools.partial(export_run, compare=False), echo=False)
    finally:
        kernels.set_backend(None)
    return records.export_records([work / "runs" / f"seed{SEED}"], "test", "10min", work / "records",
                                  bundle.build_bundle(), author="", github_id="", warn=lambda line: None)


@pytest.fixture(scope="session")
def full_check(prepared_corpus, small_data):
    """check_folder's log lines and status on a folder `quant.records export` made from a real tiny run: the
    one full check (the short run from the bundle against `python -m train`), cached under .cache/tests by
    the sources it depends on."""
    digest = hashlib.sha256(inspect.getsource(_exported_folder).encode())
    hash_project_sources(digest)
    manifest = Path(prepared_corpus.dataset_dir) / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    cache = REPO / ".cache" / "tests"
    cache.mkdir(parents=True, exist_ok=True)
    result = cache / f"bundle-check-{digest.hexdigest()[:16]}.json"
    with FileLock(str(result) + ".lock"):
        if not result.is_file():
            work = cache / f"{result.stem}-work"
            shutil.rmtree(work, ignore_errors=True)
            folder = _exported_folder(work, small_data)
            lines = []
            rc = records_check.check_folder(folder, prepared_corpus.dataset_dir, prepared_corpus.tokenizer_path,
                                            log=lines.append)
            result.write_text(json.dumps({"rc": rc, "lines": lines, "folder": str(folder)}))
    return json.loads(result.read_text())


def test_check_passes_and_the_bundle_run_equals_the_package_run(full_check):
    lines = full_check["lines"]
    assert full_check["rc"] == 0, "\n".join(lines)
    assert any("every one loaded from the bundle" in line for line in lines)
    assert any("DRY_RUN=1 ok" in line for line in lines)
    assert any("from the bundle = python -m train" in line for line in lines)
    assert lines[-1].endswith("passes")
