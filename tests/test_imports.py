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
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# imported only where used (a slow import, or an optional extra), never with the package
LAZY = ("tqdm", "torch", "transformers", "tokenizers", "tiktoken", "matplotlib", "resiliparse", "fastwarc",
        "py3langid")
# a known lazy edge that closes a cycle: GPT.from_pretrained/save_pretrained call fastllm.hf, which builds GPTs.
# It goes when model.py's rewrite (issue 16) takes the HF names/layout from hf without hf importing the model.
KNOWN_CYCLE_EDGES = {("model", "hf")}


def imports_of(module: str) -> set[str]:
    """The package modules (stems; "" for the package itself) that `module` imports anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            else:  # from . import x, y: submodules or names of the package
                found |= {a.name if (PACKAGE / f"{a.name}.py").exists() or a.name == "_C" else "" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fastllm":
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] if "." in a.name else "" for a in node.names
                      if a.name.split(".")[0] == "fastllm"}
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
    graph = {m: imports_of(m) for m in MODULES}
    init = ast.parse((PACKAGE / "__init__.py").read_text())
    graph[""] = {n.module.split(".")[0] if n.module else a.name for n in ast.walk(init)
                 if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
    return graph


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
    mods = [m for m in MODULES if m != "__main__"]  # __main__ runs the CLI
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
