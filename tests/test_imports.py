"""The package's import structure: every module imports on its own in a fresh interpreter, the modules import each
other without a cycle (function-local imports included), heavy or optional dependencies are not imported with the
package, and the public API is at the top level."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastllm

PACKAGE = Path(fastllm.__file__).parent


def _name(path: Path) -> str:
    """A source file's module name inside the package: "train", "clean.readers", "clean" (its __init__), "" (the
    package's own __init__)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)
# imported only where used (a slow import, or an optional extra), never with the package
LAZY = ("tqdm", "torch", "transformers", "tokenizers", "tiktoken", "matplotlib", "resiliparse", "fastwarc",
        "py3langid", "dask", "distributed")
# modules that exist to adapt an optional extra: importing them imports it (and what it imports)
ADAPTERS = {"eval.harness"}  # the lm-evaluation-harness model class (subclasses lm_eval's LM)
# known function-local imports that close a cycle; each goes when its module is restructured:
KNOWN_CYCLE_EDGES = {
    ("model", "hf"),  # GPT.from_pretrained/save_pretrained call fastllm.hf, which builds GPTs
    ("clean.readers", "clean.extract"),  # readers decodes HTML with extract.decode_html; extract imports readers
    ("clean.pipeline", "clean.distributed"),  # the Dask dedup; distributed imports pipeline.dedup_keys
}


def _known(parts: list[str]) -> str:
    """The longest prefix of a dotted name that is a module of the package ("" for the package itself)."""
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FILES or ".".join(parts[:n]) == "_C":  # _C: the native module
            return ".".join(parts[:n])
    return ""


def imports_of(module: str) -> set[str]:
    """The package modules that `module` imports anywhere in its source (function-local imports included)."""
    path = FILES[module]
    here = module.split(".") if module else []
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            names = [[]] if node.module else [[a.name] for a in node.names]  # from . import x: x may be a module
            found |= {_known(base + n) for n in names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastllm":
            found.add(_known(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found |= {_known(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "fastllm"}
    found.discard(module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def module_graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def test_no_import_cycles():
    graph = module_graph()
    for a, b in KNOWN_CYCLE_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: remove ({a!r}, {b!r}) from KNOWN_CYCLE_EDGES"
        graph[a] = graph[a] - {b}
    found = cycles(graph)
    names = [[m or "fastllm (__init__)" for m in c] for c in found]
    assert not found, f"import cycles among fastllm's modules: {names}"


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


ALONE = """
import importlib, sys
for module in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "fastllm" or (m.startswith("fastllm.") and m != "fastllm._C")]:
        del sys.modules[name]  # a fresh import of the package's Python modules (the native module stays loaded)
    importlib.import_module("fastllm." + module)
    heavy = sorted(m for m in LAZY if m in sys.modules)
    assert not heavy, f"importing fastllm.{module} imports {heavy}"
"""


def test_each_module_imports_alone():
    """In a fresh interpreter, each module imported first (the package purged before each): it imports on its own,
    whatever the order, and brings none of the LAZY dependencies."""
    mods = [m for m in MODULES if m not in ("", "__main__") and m not in ADAPTERS]  # __main__ runs the CLI
    r = subprocess.run([sys.executable, "-c", f"LAZY = {LAZY!r}" + ALONE, *mods], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr


def test_public_api():
    assert set(fastllm.__all__) >= {"GPT", "GPTConfig", "Tokenizer", "load_model", "generate"}
    for name in fastllm.__all__:
        assert getattr(fastllm, name) is not None
    from fastllm.checkpoint import load_model
    from fastllm.model import GPT
    from fastllm.sample import generate

    assert fastllm.GPT is GPT and fastllm.load_model is load_model and fastllm.generate is generate
