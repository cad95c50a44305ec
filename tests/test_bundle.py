"""The submission's one train_gpt.py (quant/bundle.py) and the records check (quant/records_check.py).

The bundle holds exactly the modules a run imports, minified to the same program (the AST of the documented
transforms, and the same code modulo renamed locals: each transform is also shown refusing what it must),
stays under SIZE_TARGET, keeps its brotli blob in a base-252 latin-1 string literal that gives back every
byte value (compiled from bytes and read by `python -I`), and runs from a temporary folder under `python -I` with this checkout's editable install still importable:
every module comes from the bundle, the Triton kernels decorate without the interpreter (a loader that
exec()s strings fails there, shown by a variant that compiles under "<bundle>"), and tracebacks show its
lines. The full check (the short run from the bundle against `python -m train`) runs once per source state,
cached under .cache/tests behind a file lock, on the folder `quant.records export` makes from a real tiny
run; the cheap failure cases use folders written here in the same format (write_folder).
"""
import ast
import copy
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import tokenize
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
    _, sources, unreached = bundle._built(None)
    for name, path in bundle.bundled_modules().items():
        original = ast.parse(path.read_text())
        small = ast.parse(sources[name])
        dropped = unreached.get(name, set())
        transformed = bundle._transformed(path.read_text(), str(path), dropped)  # the documented transforms
        renamed = copy.deepcopy(transformed)
        bundle.rename_locals(renamed)
        # the same AST as the documented transforms with the locals renamed ...
        assert ast.dump(small) == ast.dump(renamed)
        # ... and, independently of how rename_locals decides, the same code as the unrenamed transforms:
        # instructions, constants, globals, attributes and parameters, local names mapped one to one
        bundle.same_code(compile(bundle._layout(transformed), name, "exec"), compile(sources[name], name, "exec"), name)
        # the compile-check tables (bench/sm90.py reads them, no run does) are unreached, and left out
        if any(isinstance(f, ast.FunctionDef) and f.name == "sm90_configs" for f in original.body):
            assert "sm90_configs" in dropped and "sm90_configs" not in sources[name], name
        assert not any(line.lstrip().startswith("#") for line in sources[name].splitlines())  # no comments

        def kernels(tree):  # every @triton.jit function whole: names, annotations and body untouched
            return {f.name: ast.unparse(f) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    and any("jit" in ast.unparse(d) for d in f.decorator_list)}
        assert kernels(small) == kernels(transformed)
        assert kernels(small).keys() == kernels(original).keys() - dropped
        if name.startswith("kernels.") and name not in ("kernels._runtime", "kernels.selftest"):
            assert any("tl.constexpr" in source for source in kernels(small).values()), name

        def signatures(tree, decorated):  # custom_op infers its schema from them: decorated functions keep theirs
            return {f.name: [(a.arg, ast.dump(a.annotation) if a.annotation else None)
                             for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]
                    + [ast.dump(f.returns) if f.returns else None]
                    for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    and any(bundle._decorator_name(d) not in bundle._ANNOTATION_BLIND for d in f.decorator_list)
                    == decorated}
        assert signatures(small, True) == signatures(original, True)
        # undecorated functions lose their annotations and keep their parameters' names
        assert all(a[1] is None for args in signatures(small, False).values() for a in args[:-1]), name
        assert [[a[0] for a in args[:-1]] for args in signatures(small, False).values()] == \
            [[a[0] for a in args[:-1]] for args in signatures(transformed, False).values()], name


def test_bundle_size_and_bytes_per_package(code, capsys):
    sizes = bundle.package_bytes()
    with capsys.disabled():
        print("\n" + bundle.format_sizes())
    assert len(code) <= bundle.SIZE_TARGET, f"train_gpt.py is {len(code):,} B > {bundle.SIZE_TARGET:,} B"
    assert set(sizes) == {*bundle.PACKAGES, "loader"} and all(v > 0 for v in sizes.values())
    assert sizes["loader"] < 1300  # the loader stays small (1,254 B with the two-byte word codes)
    assert bundle.main([]) == 0 and "train_gpt.py:" in capsys.readouterr().out


# Lengths around the chunk size, leading and trailing zero bytes (a chunk is a number: its 1 byte keeps them),
# every byte value, and the bytes the literal may not hold as characters.
LITERAL_EDGES = [b"", b"\0", b"\0" * 998, b"\0" * 999, b"\0" * 1000, b"\xff" * 999, b"\xff" * 1998,
                 b'"\\\r\n\0' * 500, bytes(range(256)) * 8, bytes(range(255, -1, -1)) * 8]


def test_digits_literal_gives_back_every_byte_value(tmp_path):
    cases = LITERAL_EDGES + [bytes([a, b]) * n for a in b'"\\\r\0\xff' for b in b'"\\\r\0' for n in (1, 600)]
    literals = [bundle.digits_literal(data) for data in cases]
    for data, literal in zip(cases, literals):
        body = literal[3:-3].encode("latin-1")
        assert literal == f'"""{body.decode("latin-1")}"""' and not set(body) & set(b'\0\r"\\')  # no escapes
        assert bundle.from_digits(literal[3:-3]) == data
        assert len(body) <= len(data) * 1.004 + 4  # 1003 digits per 999 bytes
    # the loader's arithmetic (c-1-(c>13)-(c>34)-(c>92)) is DIGITS.index
    assert all(c - 1 - (c > 13) - (c > 34) - (c > 92) == bundle.DIGITS.index(c) for c in bundle.DIGITS)
    assert "for c in S[i:i+1003]:n=n*252+c-1-(c>13)-(c>34)-(c>92)" in bundle.LOADER
    assert len(bundle.DIGITS) == 252 and 252 ** bundle._CHUNK_DIGITS >= 256 ** (bundle._CHUNK + 1)
    # the way `python train_gpt.py` reads it: the interpreter's own file reader, warnings as errors
    source = ("# coding: latin-1\nimport sys\nX=[" + ",\n".join(literals) + "]\n"
              "sys.stdout.write(repr([x.encode('latin-1') for x in X]))\n").encode("latin-1")
    path = tmp_path / "literals.py"
    path.write_bytes(source)
    out = subprocess.run([sys.executable, "-I", "-W", "error", str(path)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    assert [bundle.from_digits(x.decode("latin-1")) for x in eval(out)] == cases


def test_bundle_is_latin1_and_its_literal_is_the_blob_of_the_sources(code, tmp_path):
    assert tokenize.detect_encoding(io.BytesIO(code).readline)[0] == "iso-8859-1"
    assert code.startswith(b"# coding: latin-1\n") and b"\0" not in code and b"\r" not in code
    literals = [node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)
                and isinstance(node.value, str) and len(node.value) > 10_000]
    assert len(literals) == 1
    sources = bundle._built(None)[1]
    assert bundle.decompress(bundle.from_digits(literals[0])) == sources
    # the loader's own lines read the same modules (in a child: its finder would take over this process)
    path = tmp_path / "train_gpt.py"
    path.write_bytes(code)
    out = subprocess.run([sys.executable, "-I", "-c", "import json, runpy, sys; "
                          f"print(json.dumps(runpy.run_path({str(path)!r}, run_name='x')['M']))"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == sources


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


# ---------------------------------------------------------------- the transforms, each shown failing

def _minified(source: str) -> str:
    return bundle.minify(textwrap.dedent(source))


def _run(source: str, call: str):
    space = {}
    exec(compile(source, "<test>", "exec"), space)
    return eval(call, space)


def test_rename_keeps_parameters_imports_defs_and_globals():
    source = """
        import math
        LIMIT = 3
        def scale(values, factor=2, *rest, power, **extra):
            import os as system
            total = 0
            for value in values:
                doubled = value * factor
                total += doubled ** power
            def helper(x):
                return x + total
            class Box:
                size = total
            return helper(total) + len(system.sep) + LIMIT + Box.size + math.floor(0.5)
        """
    small = _minified(source)
    tree = ast.parse(small)
    scale = next(f for f in tree.body if isinstance(f, ast.FunctionDef))
    assert [a.arg for a in scale.args.args] == ["values", "factor"] and scale.args.vararg.arg == "rest"
    assert [a.arg for a in scale.args.kwonlyargs] == ["power"] and scale.args.kwarg.arg == "extra"
    names = {n.id for n in ast.walk(scale) if isinstance(n, ast.Name)}
    assert {"values", "factor", "power", "system", "helper", "Box", "LIMIT", "math", "len"} <= names
    # a class body reads `total` by name: it keeps it; `value` and `doubled` are renamed
    assert "total" in names and not {"value", "doubled"} & names
    assert "def helper(x)" in small  # a nested function's parameter is a parameter too
    call = "scale([1, 2], factor=3, power=2)"
    assert _run(small, call) == _run(textwrap.dedent(source), call)


def test_rename_leaves_jit_kernels_and_introspecting_functions_alone():
    source = """
        import triton
        import triton.language as tl
        @triton.jit
        def kernel(x_ptr, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            values = tl.load(x_ptr + offsets)
        def reads_locals(a):
            answer = a + 1
            return locals()
        def outer():
            hidden = 1
            def inner():
                return eval("hidden")
            return inner
        def unknown_decorator_keeps_names():
            @some.decorator
            def f():
                kept = 1
                return kept
            return f
        def renamed():
            gone = 1
            return gone
        """
    small = _minified(source)
    for word in ("offsets=tl.arange(0,BLOCK)", "values", "BLOCK:tl.constexpr", "answer", "hidden", "kept"):
        assert word in small, word
    assert "gone" not in small
    assert _run(small, "reads_locals(1)") == {"a": 1, "answer": 2}


def test_rename_keeps_messages_and_closures():
    source = """
        def check(width, limit=4):
            height = width * 2
            scale = [height * i for i in range(3)]
            def late():
                return height + sum(scale)
            if height > limit:
                raise ValueError(f"{height=} is over {limit}: width {width!r}, {late()}")
            return late
        """
    small = _minified(source)
    assert re.findall(r"\bheight\b", small) == ["height"] and "'height={" in small  # only in the message
    with pytest.raises(ValueError) as renamed_error:
        _run(small, "check(3)")
    with pytest.raises(ValueError) as original_error:
        _run(textwrap.dedent(source), "check(3)")
    assert str(renamed_error.value) == str(original_error.value) == "height=6 is over 4: width 3, 24"
    assert _run(small, "check(1)()") == _run(textwrap.dedent(source), "check(1)()") == 8


@pytest.mark.parametrize("original, changed, message", [
    # a renamed parameter: a caller passing it by keyword would break
    ("def f(alpha):\n    return alpha\n", "def f(beta):\n    return beta\n", "parameters"),
    # a local renamed to a global the function reads: it now shadows it
    ("def f():\n    x = 1\n    return x + y\n", "def f():\n    y = 1\n    return y + y\n", "co_names"),
    # two locals swapped at one use only
    ("def f():\n    x = 1\n    y = 2\n    return x\n", "def f():\n    a = 1\n    b = 2\n    return b\n",
     "became"),
    # closures wired to the other variables
    ("def f():\n    x = 1\n    y = 2\n    def g():\n        return x\n    def h():\n        return y\n    return g, h\n",
     "def f():\n    a = 1\n    b = 2\n    def g():\n        return b\n    def h():\n        return a\n    return g, h\n",
     "closure cells"),
    # a message changed
    ("def f():\n    raise ValueError('x is bad')\n", "def f():\n    raise ValueError('a is bad')\n", "constant"),
])
def test_same_code_refuses_a_renaming_that_changes_the_program(original, changed, message):
    with pytest.raises(ValueError, match=message):
        bundle.same_code(compile(original, "a", "exec"), compile(changed, "b", "exec"))


def test_same_code_accepts_closures_whose_cells_sort_differently():
    original = "def f(dispatch):\n    name = 1\n    def g():\n        return dispatch(name)\n    return g\n"
    renamed = "def f(dispatch):\n    a = 1\n    def g():\n        return dispatch(a)\n    return g\n"
    bundle.same_code(compile(original, "a", "exec"), compile(renamed, "b", "exec"))


def test_layout_joins_statements_and_keeps_the_ast():
    source = textwrap.dedent("""
        def f(x):
            if x:
                y = 1
                return y
            else:
                if x is None:
                    return 0
                else:
                    z = 2
            for i in range(3):
                pass
            else:
                x = 1
            try:
                x = 2
            except ValueError as e:
                raise
            finally:
                x = 3
            return x
        """)
    tree = ast.parse(source)
    small = bundle._layout(tree)
    assert ast.dump(ast.parse(small)) == ast.dump(tree)
    assert " if x:y=1;return y\n elif x is None:return 0\n" in small  # `else: if` is `elif`, the same AST
    assert len(small.splitlines()) < len(source.splitlines()) / 2


@pytest.mark.parametrize("text", [b"", b"abc", "naïve — text\0 with words words words\n".encode() * 5,
                                  bytes(range(256)) * 3, bytes(range(1, 256)) + b" alpha alpha alpha",
                                  b"\x01\x7f\xff" + b"shape dtype device " * 40,
                                  b"\n".join(b"w%d_%d" % (i % 500, i % 7) for i in range(30_000)) + b"\x80\x01"])
def test_word_substitution_gives_back_the_text(text):
    data = bundle.substitute_words(text)
    assert bundle.expand_words(data) == text
    if b"w499_" in text:  # more words than free bytes: two-byte codes (escape, any byte but NUL and itself)
        codes = bundle._codes(b"\x01\x80")
        assert len(codes[-1]) == 2 and len(data.split(b"\0")[1].split()) == len(codes)
    if b" alpha alpha" in text:  # no byte left to stand for a word: nothing substituted
        assert data.endswith(text)
    if b"shape dtype" in text:
        assert len(data) < len(text) / 2


def _unreached(modules: dict[str, str]) -> dict[str, set[str]]:
    trees = {name: ast.parse(textwrap.dedent(source)) for name, source in modules.items()}
    return bundle.unreached_definitions(trees, {name for name in modules if "." not in name})


def test_unreached_definitions_go_and_every_way_to_reach_one_keeps_it():
    unreached = _unreached({
        "train": "",
        "train.__main__": """
            from model import helpers
            from model.helpers import by_import
            from model.helpers import unused_import, also_unused
            from model import lookup
            def main():
                return helpers.by_attribute() + by_import() + lookup.find("by_string") + chained()
            def chained():
                return 1
            def planted():
                return planted_callee()
            def planted_callee():
                return 2
            """,
        "model": "",
        "model.helpers": """
            import functools
            __all__ = ["only_in_all"]
            def by_attribute(): return 1
            def by_import(): return 1
            def unused_import(): return 1
            def also_unused(): return 1
            def by_string(): return 1
            def only_in_all(): return 1
            def cycle_a(): return cycle_b()
            def cycle_b(): return cycle_a()
            @functools.lru_cache
            def wrapped_unused(): return 1
            @registry.add
            def registered(): return 1
            def __getattr__(name): return 1
            def rebound(): return 1
            rebound = rebound
            """,
        "model.lookup": """
            import importlib
            def find(name):
                return getattr(importlib.import_module("model.helpers"), name)() + kernel("x")
            def kernel(op):
                return getattr(importlib.import_module("model.kernels"), f"{op}_triton")
            """,
        "model.kernels": """
            def x_triton(): return 1
            def x_reference(): return 1
            """,
    })
    assert unreached == {
        # never named: gone, and what only they reach (a cycle too); an import statement keeps its first name,
        # so that it still imports its module where it did
        "train.__main__": {"planted", "planted_callee", "also_unused"},
        # __all__ is for `import *`, which nothing does; a wrapping decorator registers nothing
        "model.helpers": {"also_unused", "only_in_all", "cycle_a", "cycle_b", "wrapped_unused"},
        # getattr with a built name: every name holding a word next to its hole stays
        "model.kernels": {"x_reference"},
    }
    # a namespace read whole keeps every name of it; `import *` reaches __all__'s names and the rest
    assert _unreached({"train": "", "train.__main__": "def main(): return globals()\ndef spare(): pass\n"}) == {}
    assert _unreached({"train": "", "train.__main__": "from model.helpers import *\ndef main(): pass\n",
                       "model": "", "model.helpers": "__all__ = ['a']\ndef a(): pass\ndef b(): pass\n"}) == {}


def test_unreached_definitions_are_checked_against_what_is_left(monkeypatch):
    modules = {"train": "", "train.__main__": "def main(): return kept()\ndef kept(): pass\n"}
    assert _unreached(modules) == {}
    monkeypatch.setattr(bundle._Reach, "unreached", lambda self, entries: {"train.__main__": {"kept"}})
    with pytest.raises(ValueError, match="train.__main__.kept was dropped, yet the bundle still refers to it"):
        _unreached(modules)


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
