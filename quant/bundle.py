"""The submission's one train_gpt.py: the modules a run imports, minified, in one brotli blob, plus a loader.

    python -m quant.bundle [--out records/.../train_gpt.py]   # bytes per package and the total; writes the file

Which modules: those `python -m train` (training, evaluation, the export step) imports, found by walking
the imports of train/__main__.py through the four packages, minus LEFT_OUT. Of those, the top-level
definitions no run can reach are left out (unreached_definitions, by the rules of _Reach: what the loader,
the import-time statements and every reached definition name, by name, module attribute, import, string or
a getattr of a built name; tools' and tests' helpers, the sm_90 configuration tables, names a package
re-exports that no run takes), checked a second way: nothing left refers to any of them. Minified (minify):
docstrings and comments dropped, and the annotations of undecorated functions, which nothing reads; the variables of
functions, lambdas and comprehensions renamed to short names (rename_locals: never parameters, imports,
defs, classes, globals, attributes, annotations, strings, nor anything in a @triton.jit function or one that
may read its locals by name); each block's simple statements on one line joined by ';', on the header's
line where the block has nothing else; one space per indent level, spaces only where tokens would merge
(_layout). Every minified module must parse to the documented transforms of its source (AST equality), and
compile to the same code as the unrenamed transforms: instructions, constants, globals, attributes and
parameter names, with one consistent one-to-one map of local names (same_code). Running the file is
`python -m train` with the same environment variables (torchrun too): its loader goes first on
sys.meta_path, so an installed copy of the packages never wins, gives every module __spec__.origin =
the file itself, and puts each module's source in linecache under <train_gpt.py>/<package>/<module>.py,
the name its code is compiled under, so @triton.jit's inspect.getsourcelines works and tracebacks show
the lines that ran (the minified lines: messages keep their text, variables may have short names).
quant.artifact.code_bytes() counts this file (SPEC 5).

The blob: the names and minified sources, package by package (BLOB_ORDER), NUL-separated, through a
word-replacing transform (substitute_words: the ~160 most frequent words each become one byte the text
never holds, the next ~250 an escape byte and a second byte), compressed by brotli at quality 11. The loader
undoes both in four lines. Measured on the 32 modules of 792e336, train_gpt.py went 64,061 -> 57,128 B:
brotli instead of lzma -961 B, the layout -217, renaming -2,700, the package order -109, the word transform
-2,538, the base-252 literal -279, renaming inside this project's _profiled and input_policy entry points too
-129. On the 34 modules of fd2c01c (62,570 B, the sm90_configs tables already left out by a list of names):
the unreached definitions left out -758 B (21 of them, 5 KB of source; __all__ not counted as a reference -545
of it); two-byte word codes -452 (the blob -523, the loader +71). Measured and not kept: brotli's lgwin 24,
mode TEXT, lgblock 16 or 24 (+0 to +49 B); _MIN_WORD 2 or 4 (+91, +131); every other package order (+11 and
up); more escape bytes (2: +59, 3: +196, measured before the one-pass substitution); two-byte codes ranked by
count alone (+67); parentheses the AST does not need, removed line by line (-152 B for 6 s more build time);
renaming the variables of @triton.jit kernels (-400 B: Triton compiles their source, which same_code does not
see, and a GPU run would be the only proof).

The blob is held in a triple-quoted string literal of a latin-1 source file (PEP 263 line `# coding:
latin-1`), written in base 252 (digits_literal): its characters are the 252 latin-1 characters the tokenizer
reads as themselves inside triple quotes and no run of quotes can end (all but NUL, CR, the quote and the
backslash), so nothing is escaped; each chunk of 999 blob bytes behind a 1 byte is a 1003-digit number.
That costs 0.4% over the compressed bytes (the bytes themselves with backslash escapes cost 1.2%, base85
25%) and 0.1 s of the loader's time; the loader reads it back with .encode("latin-1") and integer arithmetic.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import collections
import copy
import dis
import hashlib
import inspect
import io
import itertools
import keyword
import re
import string
import sys
import tokenize
import types
from pathlib import Path

import brotli

PACKAGES = ("kernels", "model", "train", "quant")
ENTRY = "train.__main__"
SIZE_TARGET = 64_000  # issue 14's budget for the counted code; tests hold the bundle to it
# Imported somewhere on the run path, never by a run from the bundle itself.
LEFT_OUT = {
    "kernels._interpreter": "the CPU interpreter's patches, imported only under TRITON_INTERPRET=1",
    "quant.bundle": "this builder: a run from the bundle counts its own file",
    "model.record": "R1's checkpoint format: read by load_checkpoint and the CLIs on an R1 file, never by a run",
    "quant.ledger": "the size ledger, a report: `python -m quant.inspect` prints it (a run from the repo logs it too)",
    "quant.compare": "the method comparison of CPU-sized runs, a report for experiments, never on a record's val set",
}
# The blob: brotli at its best quality (the window holds all of it; every window from 2^18 up gives the same
# bytes), measured 1.5-2% smaller than lzma (FORMAT_ALONE, preset 9e, pb=0; lc/pb/nice_len tuning gains
# 24 B) on the same text.
_BROTLI = dict(quality=11, lgwin=22)
# The packages' order in the blob: name order was 109 B larger; orders differ by under 200 B, all 24 tried.
BLOB_ORDER = ("model", "train", "quant", "kernels")
_SEP = "\0"  # between names and sources in the blob: a null byte cannot occur in Python source
# The literal's digits: base 252, every latin-1 character the tokenizer reads as itself inside triple quotes
# and that no run of quotes can end: all but NUL (refused in source), CR (read as a newline), the backslash
# and the quote. A chunk of 999 blob bytes behind a 1 byte (so its leading zero bytes count) is a number
# below 256^1000 <= 252^1003: 1003 digits, the last chunk fewer. No escapes at all: 0.4% over the blob, where
# backslash escapes cost 1.2% and base85 25%.
DIGITS = bytes(c for c in range(1, 256) if c not in b'\r"\\')
_CHUNK, _CHUNK_DIGITS = 999, 1003

# The loader. Its finder (a class, like the standard library's) is what quant.artifact looks for
# (bundle_file) to tell a run from the bundle from a run from the sources; quant/records_check.py's probe
# reads M (module name -> source) and B (the file).
LOADER = '''# coding: latin-1
"""Ouroboros: kernels, model, train and quant in one file. `python train_gpt.py` is `python -m train`."""
import brotli,linecache,os,re,sys
from importlib.machinery import ModuleSpec
B=os.path.abspath(__file__)
S=%s.encode("latin-1");D=b""
for i in range(0,len(S),1003):
 n=0
 for c in S[i:i+1003]:n=n*252+c-1-(c>13)-(c>34)-(c>92)
 D+=n.to_bytes(n.bit_length()+7>>3,"big")[1:]
X,W,D=brotli.decompress(D).split(b"\\0",2);R=bytes(range(1,256))
*C,E=re.findall(rb"[^\\n -~"+X+rb"]",R)or[b"$"]
for c,w in[*zip(C+[E+s for s in re.findall(rb"[^"+E+rb"]",R)],W.split())][::-1]:D=D.replace(c,w)
D=D.decode().split("\\0")
M=dict(zip(D[::2],D[1::2]))
P={n.rpartition(".")[0] for n in M}
class BundleFinder:
 bundle_file=B
 @classmethod
 def find_spec(c,n,*_):
  if n in M:return ModuleSpec(n,c,origin=B,is_package=n in P)
 @classmethod
 def create_module(c,s):pass
 @classmethod
 def exec_module(c,m):
  n=m.__name__;s=M[n];f=m.__file__=B+"/"+n.replace(".","/")+("/__init__"if n in P else"")+".py"
  linecache.cache[f]=len(s),None,s.splitlines(True),f
  exec(compile(s,f,"exec"),m.__dict__)
 @classmethod
 def get_source(c,n):return M[n]
sys.meta_path.insert(0,BundleFinder)
if __name__=="__main__":
 from train.__main__ import main
 sys.exit(main())
'''


def _root(root) -> Path:
    return Path(root) if root is not None else Path(__file__).resolve().parent.parent


def _module_file(root: Path, name: str) -> tuple[Path | None, bool]:
    """(source file, is a package) of a module name under root; (None, False) when there is none."""
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None, False


def _imported_names(name: str, tree: ast.AST, is_package: bool):
    """Every module name an import in `tree` may load (for `from a import b`, both a and a.b), at any depth:
    an import inside a function runs on the run path too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(name, is_package, node)
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _from_module(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from ... import` in module `name` imports from."""
    if not node.level:
        return node.module
    package = name if is_package else name.rpartition(".")[0]
    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def bundled_modules(root=None) -> dict[str, Path]:
    """{module name: source file} of the modules the bundle holds, in name order."""
    root = _root(root)
    found, todo = {}, [ENTRY]
    while todo:
        name = todo.pop()
        if name in found or name in LEFT_OUT or name.split(".")[0] not in PACKAGES:
            continue
        path, is_package = _module_file(root, name)
        if path is None:  # `from pkg import function`: not a module
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        todo += _imported_names(name, ast.parse(path.read_text(), str(path)), is_package)
    if ENTRY not in found:
        raise FileNotFoundError(f"bundle: no {ENTRY.replace('.', '/')}.py under {root}")
    return dict(sorted(found.items()))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


# Decorators that read no annotations. Any other decorator may (torch.library.custom_op infers its schema
# from them, @triton.jit its constexprs), so a decorated function keeps its annotations.
_ANNOTATION_BLIND = {"staticmethod", "classmethod", "property"}


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _without_annotations(tree: ast.AST) -> ast.AST:
    """Argument and return annotations dropped from functions whose decorators all ignore them."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and all(_decorator_name(d) in _ANNOTATION_BLIND for d in node.decorator_list):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]:
                arg.annotation = None
            node.returns = None
    return tree


_WORD = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _compact(source: str) -> str:
    """Python source with one space per indent level and spaces only between word characters."""
    lines, line, depth, prev = [], [], 0, ""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, text = tok.type, tok.string
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind in (tokenize.NEWLINE, tokenize.NL):
            if line:
                lines.append(" " * depth + "".join(line))
            line, prev = [], ""
        elif kind not in (tokenize.ENDMARKER, tokenize.COMMENT) and text:
            if prev and prev[-1] in _WORD and text[0] in _WORD:
                line.append(" ")
            line.append(text)
            prev = text
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- layout: a block's statements on few lines

_COMPOUND = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For, ast.AsyncFor, ast.While,
             ast.With, ast.AsyncWith, ast.Try, getattr(ast, "TryStar", ast.Try), ast.Match)


def _simple(node: ast.stmt) -> str:
    text = ast.unparse(node)
    if "\n" in text:  # ast.unparse writes a simple statement on one line; a surprise takes the plain path
        raise ValueError(f"{type(node).__name__} on several lines")
    return text


def _headers(node: ast.AST, *emptied: str) -> list[str]:
    """The decorator lines and the header line (ending in ':') of a compound statement, by unparsing it with
    its body `pass` and the `emptied` fields empty."""
    stub = copy.copy(node)
    stub.body = [ast.Pass()]
    for field in emptied:
        setattr(stub, field, [])
    return ast.unparse(stub).split("\n")[:-1]


def _suite(headers: list[str], body: list[ast.stmt], depth: int, out: list[str]) -> None:
    *decorators, header = headers
    out += [" " * depth + line for line in decorators]
    if any(isinstance(node, _COMPOUND) for node in body):
        out.append(" " * depth + header)
        _block(body, depth + 1, out)
    else:  # only simple statements: on the header's line
        out.append(" " * depth + header + ";".join(_simple(node) for node in body))


def _block(body: list[ast.stmt], depth: int, out: list[str]) -> None:
    run = []  # consecutive simple statements: one line, joined by ';'
    for node in body + [None]:
        if node is not None and not isinstance(node, _COMPOUND):
            run.append(_simple(node))
            continue
        if run:
            out.append(" " * depth + ";".join(run))
            run = []
        if node is None:
            break
        if isinstance(node, ast.If):
            _suite(_headers(node, "orelse"), node.body, depth, out)
            orelse = node.orelse
            while len(orelse) == 1 and isinstance(orelse[0], ast.If):  # `else: if` is `elif`: the same AST
                _suite(["el" + _headers(orelse[0], "orelse")[-1]], orelse[0].body, depth, out)
                orelse = orelse[0].orelse
            if orelse:
                _suite(["else:"], orelse, depth, out)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            _suite(_headers(node, "orelse"), node.body, depth, out)
            if node.orelse:
                _suite(["else:"], node.orelse, depth, out)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            star = "*" if type(node).__name__ == "TryStar" else ""
            _suite(["try:"], node.body, depth, out)
            for handler in node.handlers:
                _suite([_headers(handler)[-1].replace("except", "except" + star, 1)], handler.body, depth, out)
            if node.orelse:
                _suite(["else:"], node.orelse, depth, out)
            if node.finalbody:
                _suite(["finally:"], node.finalbody, depth, out)
        elif isinstance(node, ast.Match):
            raise ValueError("match statements take the plain path")
        else:  # def, class, with
            _suite(_headers(node), node.body, depth, out)


def _layout(tree: ast.Module) -> str:
    """The module's source with each block's consecutive simple statements on one line joined by ';' (on its
    header's line when the block has nothing else), one space per indent level, spaces only between word
    characters; ast.unparse, compacted, where that is not the same AST."""
    want = ast.dump(tree)
    try:
        out = []
        _block(tree.body, 0, out)
        small = _compact("\n".join(out) + "\n")
        if ast.dump(ast.parse(small)) == want:
            return small
    except (ValueError, SyntaxError):
        pass
    plain = ast.unparse(tree)
    small = _compact(plain)
    return small if ast.dump(ast.parse(small)) == want else plain


# ---------------------------------------------------------------- renaming the locals of functions

# A function that names one of these builtins, or reads one of these attributes, may read its variables by
# name (locals(), eval, a frame's f_locals): neither its variables nor those of the functions around it are
# renamed. (model.eval() is an attribute: not one of them.)
_INTROSPECTION_NAMES = {"locals", "vars", "eval", "exec", "dir", "globals", "breakpoint"}
_INTROSPECTION_ATTRIBUTES = {"_getframe", "currentframe", "f_locals", "f_back", "f_globals"}
# Decorators known to read neither the source nor the local names of what they decorate (custom_op and
# register_fake read the parameters and annotations only, which keep their names; this project's
# kernels._profiled reads the function's __name__, kernels._runtime.input_policy its parameters: -129 B). A
# function with any other decorator (@triton.jit reads its source; others are not known) keeps its names,
# and so does everything inside it.
RENAME_SAFE_DECORATORS = {"staticmethod", "classmethod", "property", "setter", "abstractmethod", "contextmanager",
                          "wraps", "lru_cache", "cache", "no_grad", "inference_mode", "custom_op", "register_fake",
                          "_profiled", "input_policy"}


class _Scope:
    """A module, class, function, lambda or comprehension: the names bound and seen in it, and every place
    where a name in it may be renamed."""

    def __init__(self, node: ast.AST, parent: _Scope | None):
        self.node, self.parent, self.children = node, parent, []
        self.kind = "module" if parent is None else "class" if isinstance(node, ast.ClassDef) else "function"
        self.bound, self.fixed, self.seen = set(), set(), set()  # fixed: parameters, imports, defs, classes
        self.globals, self.nonlocals = set(), set()
        self.pinned = []  # names read where no renaming reaches (annotations)
        self.places = []  # (owner, key, name): owner[key] or owner.key holds the name
        self.blocked = False
        self.rename: dict[str, str] = {}
        if parent is not None:
            parent.children.append(self)

    def subtree(self):
        yield self
        for child in self.children:
            yield from child.subtree()

    def binder(self, name: str) -> _Scope | None:
        """The function or comprehension scope whose variable `name` here is; None for a module global,
        a builtin or a class attribute."""
        scope = self
        while scope.parent is not None:
            if name in scope.globals:
                return None
            if name not in scope.nonlocals and name in scope.bound:
                return scope if scope.kind == "function" else None
            scope = scope.parent
            while scope.kind == "class":  # a class body's names are not seen from the scopes inside it
                scope = scope.parent
        return None


class _Scopes(ast.NodeVisitor):
    """Python's scoping rules on an AST: which scope binds each name, where each scope's code runs."""

    def __init__(self, tree: ast.Module):
        self.scope = self.root = _Scope(tree, None)
        for node in tree.body:
            self.visit(node)

    def _enter(self, node: ast.AST, visit, blocked: bool = False) -> None:
        outer = self.scope
        self.scope = _Scope(node, outer)
        self.scope.blocked = blocked
        visit()
        self.scope = outer

    def _bind(self, name: str, fixed: bool = False) -> None:
        self.scope.bound.add(name)
        self.scope.seen.add(name)
        if fixed:
            self.scope.fixed.add(name)

    def _pin(self, node: ast.AST | None) -> None:
        """Names not renamed (in annotations: strings under `from __future__ import annotations`, read by
        custom_op and dataclasses), and so pinned: the variables they would name keep their names."""
        for sub in ast.walk(node) if node is not None else ():
            if isinstance(sub, ast.Name):
                self.scope.seen.add(sub.id)
                self.scope.pinned.append(sub.id)

    def _block_outward(self) -> None:
        """This scope and every function around it keep their names (the module renames nothing anyway)."""
        scope = self.scope
        while scope.parent is not None:
            scope.blocked = True
            scope = scope.parent

    @staticmethod
    def _parameters(args: ast.arguments) -> list[ast.arg]:
        return args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]

    def _function(self, node, body: list[ast.AST], blocked: bool) -> None:
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        for arg in self._parameters(node.args):
            self._pin(arg.annotation)
        self._pin(getattr(node, "returns", None))

        def inside():
            for arg in self._parameters(node.args):
                self._bind(arg.arg, fixed=True)
            for child in body:
                self.visit(child)
        self._enter(node, inside, blocked)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._bind(node.name, fixed=True)
        blocked = any(_decorator_name(d) not in RENAME_SAFE_DECORATORS for d in node.decorator_list)
        self._function(node, node.body, blocked)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node, [node.body], False)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in node.decorator_list + node.bases + node.keywords:
            self.visit(child)
        self._bind(node.name, fixed=True)
        self._enter(node, lambda: [self.visit(child) for child in node.body])

    def _comprehension(self, node, parts: list[ast.AST]) -> None:
        self.visit(node.generators[0].iter)  # the first iterable runs in the enclosing scope

        def inside():
            for i, generator in enumerate(node.generators):
                self.visit(generator.target)
                if i:
                    self.visit(generator.iter)
                for condition in generator.ifs:
                    self.visit(condition)
            for part in parts:
                self.visit(part)
        self._enter(node, inside)

    def visit_ListComp(self, node) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._bind(node.id)
        self.scope.seen.add(node.id)
        self.scope.places.append((node, "id", node.id))
        if node.id in _INTROSPECTION_NAMES:
            self._block_outward()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in _INTROSPECTION_ATTRIBUTES:
            self._block_outward()
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._pin(node.annotation)
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._bind(node.name)
            self.scope.places.append((node, "name", node.name))
        for child in node.body:
            self.visit(child)

    def visit_Import(self, node) -> None:
        for alias in node.names:
            self._bind(alias.asname or alias.name.split(".")[0], fixed=True)

    visit_ImportFrom = visit_Import

    def visit_Global(self, node: ast.Global) -> None:
        self.scope.globals.update(node.names)
        self.scope.seen.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.scope.nonlocals.update(node.names)
        self.scope.seen.update(node.names)
        self.scope.places += [(node.names, i, name) for i, name in enumerate(node.names)]

    def _unhandled(self, node: ast.AST) -> None:
        self._block_outward()  # a walrus binds outside its comprehension; match binds in patterns
        self.generic_visit(node)

    visit_NamedExpr = visit_Match = _unhandled


def _short_names():
    """a..z, A..Z, then two letters, and so on; never a keyword or a builtin."""
    for size in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=size):
            name = "".join(letters)
            if not keyword.iskeyword(name) and not hasattr(builtins, name):
                yield name


def rename_locals(tree: ast.Module) -> dict[str, dict[str, str]]:
    """Renames, in place, the variables of functions, lambdas and comprehensions to short names: a..z first,
    in the order they first appear. Never renamed: parameters (callers pass keywords), names bound by import,
    def or class, globals, class attributes, names in annotations (and the variables they name), and
    everything in or around a function that may read its variables by name (_INTROSPECTION_*) or that has a
    decorator outside RENAME_SAFE_DECORATORS (@triton.jit). A new name is none that the scope or any scope
    inside it sees. Strings are never touched, so messages keep their text (f"{x=}" is the string 'x=' and
    a value in the AST). Returns {function qualname-ish key: {old: new}} for the documentation of a build."""
    root = _Scopes(tree).root
    scopes = list(root.subtree())
    resolved = {id(s): [(owner, key, name, s.binder(name)) for owner, key, name in s.places] for s in scopes}
    users: dict[tuple[int, str], list[_Scope]] = {}
    for s in scopes:
        for *_, name, binder in resolved[id(s)]:
            if binder is not None:
                users.setdefault((id(binder), name), []).append(s)
    pinned = {(id(b), name) for s in scopes for name in s.pinned if (b := s.binder(name)) is not None}
    blocked = set()
    for s in scopes:
        if s.blocked or (s.parent is not None and id(s.parent) in blocked):
            blocked.add(id(s))
    renamed = {}
    for scope in scopes:
        if scope.kind != "function" or id(scope) in blocked:
            continue
        first = {}  # the variables, in the order they first appear (in this scope or one inside it)
        for s in scope.subtree():
            for *_, name, binder in resolved[id(s)]:
                if binder is scope and name not in scope.fixed and (id(scope), name) not in pinned \
                        and not any(u.kind == "class" for u in users[(id(scope), name)]):
                    first.setdefault(name, len(first))
        if not first:
            continue
        taken = set().union(*(s.seen for s in scope.subtree()))
        for s in scope.subtree():  # new names of outer variables used in here
            for *_, name, binder in resolved[id(s)]:
                if binder is not None and name in binder.rename:
                    taken.add(binder.rename[name])
        fresh = (n for n in _short_names() if n not in taken)
        scope.rename = {name: next(fresh) for name in first}
        renamed[f"{getattr(scope.node, 'name', type(scope.node).__name__)}@{scope.node.lineno}"] = scope.rename
    for s in scopes:
        for owner, key, name, binder in resolved[id(s)]:
            if binder is not None and name in binder.rename:
                if isinstance(owner, list):
                    owner[key] = binder.rename[name]
                else:
                    setattr(owner, key, binder.rename[name])
    return renamed


# What names an instruction reads or writes by its local slot, and the instructions wired by name (a closure's
# cells: LOAD_CLOSUREs before MAKE_FUNCTION, MAKE_CELLs at entry), whose order follows the sorted names.
_LOCAL_OPS = set(dis.haslocal) | set(dis.hasfree)
_BY_NAME_RUNS = {dis.opmap[op] for op in ("LOAD_CLOSURE", "MAKE_CELL") if op in dis.opmap}


def same_code(a, b, where: str = "<code>", renamed: dict[str, str] | None = None) -> None:
    """Raises ValueError unless code object b is a with other names for some of its local variables: the
    same instructions, constants (nested code alike), global and attribute names, parameter names, one
    consistent one-to-one map of the other local names (`renamed`, from the enclosing code for free
    variables), positions aside. A closure is wired by name, so a run of LOAD_CLOSUREs or MAKE_CELLs is
    compared as a set."""
    def fail(what):
        raise ValueError(f"bundle: {where}: {getattr(a, 'co_qualname', a.co_name)} is not the same code after "
                         f"renaming: {what}")
    for field in ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_nlocals",
                  "co_stacksize", "co_names", "co_name", "co_qualname", "co_exceptiontable"):
        if getattr(a, field, None) != getattr(b, field, None):  # the last two from Python 3.11 on
            fail(field)
    for field in ("co_code", "co_consts", "co_varnames", "co_cellvars", "co_freevars"):
        if len(getattr(a, field)) != len(getattr(b, field)):
            fail(f"len({field})")
    n = a.co_argcount + a.co_kwonlyargcount + bool(a.co_flags & inspect.CO_VARARGS) \
        + bool(a.co_flags & inspect.CO_VARKEYWORDS)
    if a.co_varnames[:n] != b.co_varnames[:n]:
        fail(f"parameters {a.co_varnames[:n]} became {b.co_varnames[:n]}")
    forward, backward = {}, {}

    def bind(x, y):
        if forward.setdefault(x, y) != y or backward.setdefault(y, x) != x:
            fail(f"{x!r} became {y!r}, and {forward[x]!r} or {backward[y]!r} as well")
    for name in a.co_varnames[:n]:
        bind(name, name)
    for x, y in (renamed or {}).items():
        bind(x, y)
    runs, run = [], None
    for p, q in zip(dis.get_instructions(a), dis.get_instructions(b), strict=True):
        if p.opcode != q.opcode:
            fail(f"instruction at {p.offset}: {p.opname} != {q.opname}")
        if p.opcode in _BY_NAME_RUNS:
            if run is None or run[0] != p.opcode:
                run = (p.opcode, [], [])
                runs.append(run)
            run[1].append(p.argval)
            run[2].append(q.argval)
            continue
        run = None
        if p.opcode in _LOCAL_OPS:
            pair = (p.argval, q.argval) if isinstance(p.argval, tuple) else ((p.argval,), (q.argval,))
            for x, y in zip(*pair, strict=True):
                bind(x, y)
        elif p.arg != q.arg:
            fail(f"argument of {p.opname} at {p.offset}")
    for _, xs, ys in runs:
        for x in xs:
            if x not in forward:  # a cell no instruction of this code reads or writes (__class__)
                bind(x, x)
        if sorted(forward[x] for x in xs) != sorted(ys):
            fail(f"closure cells {xs} != {ys}")
    for field in ("co_varnames", "co_cellvars", "co_freevars"):
        if sorted(forward.get(x, x) for x in getattr(a, field)) != sorted(getattr(b, field)):
            fail(field)
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            same_code(x, y, where, {v: forward[v] for v in x.co_freevars if v in forward})
        elif not _same_constant(x, y):
            fail(f"constant {x!r} != {y!r}")


def _same_constant(x, y) -> bool:
    """Equal constants of one type: by repr, which tells -0.0 from 0.0 and sees a nan equal to itself; tuples
    item by item; a frozenset's items in any order."""
    if type(x) is not type(y):
        return False
    if isinstance(x, tuple):
        return len(x) == len(y) and all(_same_constant(a, b) for a, b in zip(x, y))
    if isinstance(x, frozenset):
        return sorted(map(repr, x)) == sorted(map(repr, y))
    return repr(x) == repr(y)


# ---------------------------------------------------------------- definitions no run reaches

# Decorators that wrap what they decorate and register it nowhere: a definition with only these that nothing
# reaches goes, decorators and all. Any other decorator may register what it decorates (custom_op,
# register_fake, quant.methods.register): its definition stays.
WRAP_ONLY_DECORATORS = {"jit", "autotune", "heuristics", "dataclass", "lru_cache", "cache", "wraps", "contextmanager",
                        "no_grad", "inference_mode", "_profiled", "input_policy"}
# Calls and attributes that read a namespace without naming what they take from it: every name of the
# namespace (of every module, where which one is not known) is reached.
_NAMESPACE_CALLS = {"globals", "vars", "dir"}
_NAMESPACE_ATTRIBUTES = {"__dict__", "__globals__", "f_globals", "getmembers", "__all__"}
# Calls that look a name up by a string, the name's argument: a name they build (f-string, +, %, .format)
# reaches every definition that holds a word of it next to a hole.
_LOOKUP_CALLS = {"getattr": 1, "hasattr": 1, "delattr": 1, "import_module": 0, "__import__": 0}
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_ANY = "*"  # the module of a reference when any module may hold the name


def _is_all(node: ast.stmt) -> bool:
    """Whether `node` is a module's `__all__ = [...]` (or +=)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def _built_strings(node: ast.AST):
    """The templates of the strings built in node's code: (constant parts, holes between them)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.JoinedStr):
            parts = [[]]
            for value in sub.values:
                if isinstance(value, ast.Constant):
                    parts[-1].append(value.value)
                else:
                    parts.append([])
            yield ["".join(p) for p in parts]
        elif isinstance(sub, ast.BinOp) and isinstance(sub.op, (ast.Add, ast.Mod)):
            for side, text in (("left", sub.left), ("right", sub.right)):
                if isinstance(text, ast.Constant) and isinstance(text.value, str):
                    pieces = re.split(r"%[^a-z%]*[a-z]", text.value) if isinstance(sub.op, ast.Mod) else [text.value]
                    yield ["", *pieces] if side == "right" else [*pieces, ""]
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "format" \
                and isinstance(sub.func.value, ast.Constant) and isinstance(sub.func.value.value, str):
            yield re.split(r"\{[^{}]*\}", sub.func.value.value)


def _hole_words(parts: list[str]):
    """The words of a template's constant parts that touch a hole: pieces of a name it may build."""
    for i, part in enumerate(parts):
        words = list(re.finditer(r"\w+", part))
        if i and words and words[0].start() == 0:
            yield words[0].group()
        if i < len(parts) - 1 and words and words[-1].end() == len(part):
            yield words[-1].group()


class _Reach:
    """Which top-level definitions of the bundled modules the run can reach.

    Droppable: a module's top-level def and class statements whose decorators are all WRAP_ONLY_DECORATORS, and
    the names its top-level `from <bundled module> import ...` statements bind; never a dunder, never a name the
    module binds more than once (another statement, a `global`). Everything else at the top level runs at
    import: the roots, with the loader's own code. Reached code reaches
      a name it reads or declares global (in its module: a local variable of the same name counts too),
      the name an import in it takes from a bundled module,
      `m.x` for a bundled module m (a global bound by one import), and `.x` on anything else: x in every module,
      every identifier in its strings: in every module (getattr, registries),
      where getattr, hasattr, delattr or import_module get a name built at run time: every name that holds a
      word touching a hole of a string that call (or, where it gets a variable, the definition it is in) builds,
      every name of a namespace read whole (globals(), vars(), dir(), __dict__, getmembers, `import *`).
    A reached definition's decorators, defaults, bases and body are reached code; a reached import-from name
    reaches what it imports. An import statement whose names all go keeps its first (it still imports its
    module where it did)."""

    def __init__(self, trees: dict[str, ast.Module], packages: set[str], droppable: bool = True):
        self.trees, self.packages = trees, packages
        self.units: dict[tuple[str, str], ast.AST | tuple[str, str]] = {}  # (module, name) -> def or (module, name)
        self.imports: list[tuple[str, list[str]]] = []  # (module, the names one import-from statement binds)
        self.roots: list[tuple[str, ast.AST]] = []
        self.module_names: dict[str, dict[str, str]] = {}  # module -> {global name: the bundled module it is}
        self.globals_read: set[int] = set()  # ids of the Name nodes that read a module global
        for name, tree in trees.items():
            self._index(name, tree, droppable)

    def _index(self, name: str, tree: ast.Module, droppable: bool) -> None:
        counts = collections.Counter()
        for node in self._module_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                counts[node.name] += 1
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                counts.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                counts[node.id] += 1
            elif isinstance(node, ast.ExceptHandler) and node.name:
                counts[node.name] += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                counts.update({n: 2 for n in node.names})  # bound in a function too: stays
        modules = {}
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.name if alias.asname else alias.name.split(".")[0]
                    if bound in self.trees:
                        modules[alias.asname or bound] = bound
            elif isinstance(node, ast.ImportFrom):
                source = _from_module(name, name in self.packages, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in self.trees:
                        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
        self.module_names[name] = {n: m for n, m in modules.items() if counts[n] == 1}
        root = _Scopes(tree).root
        class_names = set().union(*(s.bound for s in root.subtree() if s.kind == "class"))
        self.globals_read |= {id(owner) for s in root.subtree() for owner, key, n in s.places
                              if key == "id" and s.binder(n) is None and n not in class_names}

        def alone(n):
            return droppable and counts[n] == 1 and not (n.startswith("__") and n.endswith("__"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and alone(node.name) \
                    and all(_decorator_name(d) in WRAP_ONLY_DECORATORS for d in node.decorator_list):
                self.units[(name, node.name)] = node
            elif isinstance(node, ast.ImportFrom) and _from_module(name, name in self.packages, node) in self.trees \
                    and all(alias.name != "*" for alias in node.names):
                source = _from_module(name, name in self.packages, node)
                kept = [alias for alias in node.names if not alone(alias.asname or alias.name)]
                for alias in node.names:
                    if alias not in kept:
                        self.units[(name, alias.asname or alias.name)] = (source, alias.name)
                self.imports.append((name, [alias.asname or alias.name for alias in node.names]))
                if kept:
                    self.roots.append((name, ast.ImportFrom(node.module, kept, node.level)))
            elif not _is_all(node):  # __all__ names what `import *` takes: reached only by one (below)
                self.roots.append((name, node))

    @staticmethod
    def _module_level(body: list[ast.stmt]):
        """The nodes of a module's own scope: not inside a def, class, lambda or comprehension."""
        todo = list(body)
        while todo:
            node = todo.pop()
            yield node
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                                     ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                todo += ast.iter_child_nodes(node)

    def _module_of(self, name: str, node: ast.expr) -> str | None:
        """The bundled module `node` is, where it is one: a global bound by one import, or its attribute."""
        if isinstance(node, ast.Name):
            return self.module_names[name].get(node.id) if id(node) in self.globals_read else None
        if isinstance(node, ast.Attribute):
            base = self._module_of(name, node.value)
            return f"{base}.{node.attr}" if base and f"{base}.{node.attr}" in self.trees else None
        return None

    def references(self, name: str, node: ast.AST):
        """(module or _ANY, name) for each definition `node`'s code, in module `name`, may reach; (module,
        None) for a whole module's names; ("*contains", word) for every name holding a word."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                yield (name, None) if sub.id == "__all__" else (name, sub.id)
            elif isinstance(sub, (ast.Global, ast.Nonlocal)):
                yield from ((name, n) for n in sub.names)
            elif isinstance(sub, ast.Attribute):
                base = self._module_of(name, sub.value)
                yield base or _ANY, sub.attr
                if sub.attr in _NAMESPACE_ATTRIBUTES:
                    yield base or _ANY, None
            elif isinstance(sub, ast.ImportFrom):
                source = _from_module(name, name in self.packages, sub)
                yield from ((source, alias.name if alias.name != "*" else None) for alias in sub.names)
            elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                yield from ((_ANY, word) for word in _IDENTIFIER.findall(sub.value))
            elif isinstance(sub, ast.Call):
                called = sub.func.attr if isinstance(sub.func, ast.Attribute) else getattr(sub.func, "id", "")
                if called in _NAMESPACE_CALLS:
                    yield (self._module_of(name, sub.args[0]) or _ANY) if sub.args else name, None
                position = _LOOKUP_CALLS.get(called)
                if position is not None and len(sub.args) > position:
                    looked_up = sub.args[position]
                    if not (isinstance(looked_up, ast.Constant) and isinstance(looked_up.value, str)):
                        built = list(_built_strings(looked_up)) or list(_built_strings(node))
                        yield from (("*contains", word) for parts in built for word in _hole_words(parts))

    def unreached(self, entries: list[tuple[str, str]]) -> dict[str, set[str]]:
        """{module: its droppable names no run reaches} from the roots and the loader's `entries`."""
        reached, names, words, whole = set(), set(), set(), set()
        todo = entries + [ref for module, node in self.roots for ref in self.references(module, node)]
        while True:
            while todo:
                module, n = todo.pop()
                if module == _ANY:
                    names.add(n)
                elif module == "*contains":
                    words.add(n)
                elif n is None:
                    whole.add(module)
                elif (module, n) in self.units and (module, n) not in reached:
                    reached.add((module, n))
                    unit = self.units[(module, n)]
                    todo += [unit] if isinstance(unit, tuple) else self.references(module, unit)
            todo = [key for key in self.units if key not in reached and (
                key[1] in names or key[0] in whole or _ANY in whole or any(w in key[1] for w in words))]
            for module, bound in self.imports:  # an import statement keeps one name at least
                if all((module, n) in self.units and (module, n) not in reached for n in bound):
                    todo.append((module, bound[0]))
            if not todo:
                break
        out = {}
        for module, n in self.units:
            if (module, n) not in reached:
                out.setdefault(module, set()).add(n)
        return out


def unreached_definitions(trees: dict[str, ast.Module], packages: set[str]) -> dict[str, set[str]]:
    """{module: the names of its top-level definitions that no run from the bundle can reach} (_Reach), checked
    a second way: with them gone, nothing left in any module refers to one of them."""
    entries = [(node.module, alias.name) for node in ast.walk(ast.parse(LOADER % '""'))
               if isinstance(node, ast.ImportFrom) and node.module in trees for alias in node.names]
    unreached = _Reach(trees, packages).unreached(entries)
    pruned = {name: _without_definitions(copy.deepcopy(tree), unreached.get(name, ())) for name, tree in trees.items()}
    left = _Reach(pruned, packages, droppable=False)
    refs = set(entries) | {ref for name, node in left.roots for ref in left.references(name, node)}
    names = {n for module, n in refs if module == _ANY}
    words = {n for module, n in refs if module == "*contains"}
    whole = {module for module, n in refs if n is None}
    for module, dropped in unreached.items():
        for n in dropped:
            if (module, n) in refs or n in names or module in whole or _ANY in whole or any(w in n for w in words):
                raise ValueError(f"bundle: {module}.{n} was dropped, yet the bundle still refers to it")
    return unreached


def _without_definitions(tree: ast.Module, names) -> ast.Module:
    """`tree` without the top-level defs, classes and import-from names called `names`."""
    body = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            continue
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) in names for a in node.names):
            node = ast.ImportFrom(node.module, [a for a in node.names if (a.asname or a.name) not in names], node.level)
            if not node.names:
                raise ValueError("bundle: an import statement lost every name")
        body.append(node)
    tree.body = body
    return tree


def _transformed(source: str, where: str, unreached=frozenset()) -> ast.Module:
    """The documented transforms: docstrings, the `unreached` definitions (unreached_definitions) and unread
    annotations dropped."""
    return _without_annotations(_without_definitions(_without_docstrings(ast.parse(source, where)), unreached))


def minify(source: str, where: str = "<source>", unreached=frozenset()) -> str:
    """`source` without docstrings, comments, unread annotations and the `unreached` definitions, its local
    variables renamed (rename_locals), laid out compactly (_layout); raises ValueError unless the result parses
    to that AST and compiles to the same code as the unrenamed source modulo the renaming (same_code)."""
    tree = _transformed(source, where, unreached)
    reference = _layout(tree)
    renamed = copy.deepcopy(tree)
    rename_locals(renamed)
    small = _layout(renamed)
    if ast.dump(ast.parse(reference)) != ast.dump(tree) or ast.dump(ast.parse(small)) != ast.dump(renamed):
        raise ValueError(f"bundle: minifying {where} changed the program")
    same_code(compile(reference, where, "exec"), compile(small, where, "exec"), where)
    return small


# ---------------------------------------------------------------- the blob

_WORDS = re.compile(rb"(?<!\w)[A-Za-z_]\w*")
_MIN_WORD = 3  # measured: 3 and 4 within 30 B, 5 +600 B


def _codes(unusual: bytes) -> list[bytes]:
    """The codes that stand for words, in order: every byte but NUL, newline, printable ASCII and `unusual` (the
    other bytes the text holds) but the last, then the last (the escape) followed by any byte but NUL and
    itself. The loader computes the same list with the same regexes."""
    free = re.findall(rb"[^\n -~" + unusual + rb"]", bytes(range(1, 256)))
    if not free:  # no codes, no words (the loader's stand-in escape then pairs with no word)
        return []
    *singles, escape = free
    return singles + [escape + second for second in re.findall(rb"[^" + escape + rb"]", bytes(range(1, 256)))]


def substitute_words(text: bytes) -> bytes:
    """A word-replacing transform: `text` with its most frequent words (identifiers of _MIN_WORD or more
    characters, wherever they occur) each replaced by a code, after a header: the bytes beyond NUL, newline
    and printable ASCII that the text holds, NUL, the words separated by spaces, NUL. The i-th word stands for
    the i-th code of _codes(those bytes): the most frequent words for the bytes the text never holds, the next
    (by the bytes they save, count x (length - 2)) for an escape byte and a second byte. An LZ compressor's
    match of a short frequent word costs more than a byte (measured: train_gpt.py 4.2% smaller, header and
    loader lines included; the two-byte codes another 0.8%). One pass, longest word first, so a code is never
    read again; the escape stands nowhere else, so every escape begins a code and expand_words, taking the
    two-byte codes first, undoes it."""
    unusual = bytes(sorted(set(text) - {0, ord("\n")} - set(range(ord(" "), ord("~") + 1))))
    codes = _codes(unusual)
    singles = sum(len(code) == 1 for code in codes)
    counts = collections.Counter(w for w in _WORDS.findall(text) if len(w) >= _MIN_WORD)
    ranked = [w for w, _ in counts.most_common()]
    words = ranked[:singles] + sorted(ranked[singles:], key=lambda w: -counts[w] * (len(w) - 2))[:len(codes) - singles]
    table = dict(zip(words, codes))
    if table:
        text = re.sub(b"|".join(map(re.escape, sorted(table, key=len, reverse=True))), lambda m: table[m[0]], text)
    return unusual + b"\0" + b" ".join(words) + b"\0" + text


def expand_words(data: bytes) -> bytes:
    """substitute_words undone, as the loader does it."""
    unusual, words, text = data.split(b"\0", 2)
    for code, word in [*zip(_codes(unusual), words.split())][::-1]:  # the two-byte codes first
        text = text.replace(code, word)
    return text


def _compress(sources: dict[str, str]) -> bytes:
    """The names and sources, package by package in BLOB_ORDER, separated by NULs, words substituted, brotli."""
    rank = {package: i for i, package in enumerate(BLOB_ORDER)}
    names = sorted(sources, key=lambda name: (rank.get(name.split(".")[0], len(rank)), name))
    text = _SEP.join(part for name in names for part in (name, sources[name])).encode()
    substituted = substitute_words(text)
    if expand_words(substituted) != text:
        raise ValueError("bundle: the word transform does not give back the text")
    return brotli.compress(substituted, **_BROTLI)


def decompress(blob: bytes) -> dict[str, str]:
    """{module name: source} from a blob, the way the loader reads it."""
    parts = expand_words(brotli.decompress(blob)).decode().split(_SEP)
    return dict(zip(parts[::2], parts[1::2]))


def digits_literal(data: bytes) -> str:
    """A triple-quoted string literal, for a latin-1 source file, of `data` in base 252 (DIGITS), chunk by
    chunk; from_digits and the loader read it back."""
    out = []
    for start in range(0, len(data), _CHUNK):
        n = int.from_bytes(b"\1" + data[start:start + _CHUNK], "big")
        digits = []
        while n:
            n, d = divmod(n, len(DIGITS))
            digits.append(DIGITS[d])
        last = start + _CHUNK >= len(data)
        out.append(bytes(digits[::-1]).rjust(len(digits) if last else _CHUNK_DIGITS, DIGITS[:1]))
    return '"""' + b"".join(out).decode("latin-1") + '"""'


def from_digits(text: str) -> bytes:
    """digits_literal's value (the string, without the quotes) back to the bytes, as the loader does it."""
    data, s = b"", text.encode("latin-1")
    for i in range(0, len(s), _CHUNK_DIGITS):
        n = 0
        for c in s[i:i + _CHUNK_DIGITS]:
            n = n * len(DIGITS) + DIGITS.index(c)
        data += n.to_bytes((n.bit_length() + 7) // 8, "big")[1:]
    return data


def source_hash(root=None) -> str:
    """sha256 over every .py file of the packages (relative path and bytes) and this builder: the cache key."""
    root = _root(root)
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


_cache: dict[str, tuple[bytes, dict[str, str], dict[str, set[str]]]] = {}


def _built(root) -> tuple[bytes, dict[str, str], dict[str, set[str]]]:
    """(train_gpt.py, {module: minified source}, {module: the definitions left out as unreached})."""
    key = source_hash(root)
    if key not in _cache:
        modules = bundled_modules(root)
        texts = {name: path.read_text() for name, path in modules.items()}
        trees = {name: _without_docstrings(ast.parse(texts[name], str(path))) for name, path in modules.items()}
        unreached = unreached_definitions(trees, {name for name, path in modules.items() if path.name == "__init__.py"})
        sources = {name: minify(texts[name], str(path), unreached.get(name, frozenset()))
                   for name, path in modules.items()}
        _cache[key] = (LOADER % digits_literal(_compress(sources))).encode("latin-1"), sources, unreached
    return _cache[key]


def build_bundle(root=None) -> bytes:
    """The train_gpt.py bytes for the sources under root (default: this checkout), cached by source_hash."""
    return _built(root)[0]


def package_bytes(root=None) -> dict[str, int]:
    """Bytes per package as the literal of its minified modules compressed alone (so the parts sum to a
    little more than the file, which compresses them in one stream), plus the loader's bytes."""
    bundle, sources, _ = _built(root)
    sizes = {package: len(digits_literal(_compress({n: s for n, s in sources.items()
                                                    if n.split(".")[0] == package})))
             for package in PACKAGES}
    sizes["loader"] = len(bundle) - len(digits_literal(_compress(sources)))
    return sizes


def format_sizes(root=None) -> str:
    bundle, sources, unreached = _built(root)
    modules = bundled_modules(root)
    lines = [f"{'package':<10}{'modules':>8}{'source B':>10}{'minified B':>12}{'compressed alone B':>20}"]
    for package, size in package_bytes(root).items():
        names = [n for n in sources if n.split(".")[0] == package]
        raw = sum(modules[n].stat().st_size for n in names)
        mini = sum(len(sources[n].encode()) for n in names)
        lines.append(f"{package:<10}{len(names):>8}{raw:>10,}{mini:>12,}{size:>20,}" if names else
                     f"{package:<10}{'':>8}{'':>10}{'':>12}{size:>20,}")
    lines.append(f"train_gpt.py: {len(bundle):,} B, {SIZE_TARGET - len(bundle):,} B under the {SIZE_TARGET:,} B target"
                 if len(bundle) <= SIZE_TARGET else
                 f"train_gpt.py: {len(bundle):,} B, OVER the {SIZE_TARGET:,} B target by {len(bundle) - SIZE_TARGET:,} B")
    blob = _compress(sources)
    literal = len(digits_literal(blob))
    lines.append(f"blob: {len(blob):,} B of brotli in a {literal:,} B literal "
                 f"(+{literal - len(blob):,} B, {literal / len(blob) - 1:.1%})")
    lines.append(f"sha256 {hashlib.sha256(bundle).hexdigest()}, {len(sources)} modules; left out: {', '.join(LEFT_OUT)}")
    lines.append(f"unreached definitions left out: {sum(map(len, unreached.values()))}: "
                 + ", ".join(f"{module}.{n}" for module in sorted(unreached) for n in sorted(unreached[module])))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.bundle", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write train_gpt.py here")
    args = parser.parse_args(argv)
    print(format_sizes())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(build_bundle())
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
