"""The built-in English corpus: documentation that ships with every Python, so `fastllm demo` and the
tokenizer need no download.

Two sources, in this order:
  1. the pydoc topics (`pydoc_data.topics`: the language reference pages `help()` shows), one document each;
  2. the docstrings of the standard library, one document per module: its module, class and function
     docstrings in source order, separated by blank lines. They are read from the `.py` files with `ast`
     (no module is imported, so no module's side effects run). Test packages, codecs (`encodings`) and
     installed third-party packages are skipped; a docstring seen before (many are copied between modules)
     is kept only the first time, so validation documents do not repeat training text.

The result is deterministic for a given Python installation (files in sorted order). On CPython 3.11 it is
about 2.2 MB in ~540 documents.

>>> docs = builtin_corpus()
>>> docs[0][:22]
'The "assert" statement'
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import tokenize

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "dist-packages",
                       "__pycache__"})


def builtin_corpus() -> list[str]:
    """Python's own documentation as a list of documents: the pydoc topics, then one document of docstrings
    per standard-library module (see the module doc). Computed once per process (a few seconds)."""
    return list(_corpus())


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    seen: set[str] = set()
    for path in stdlib_sources():
        parts = [doc for doc in dict.fromkeys(module_docstrings(path)) if doc not in seen]  # each docstring once
        seen.update(parts)
        if parts:
            docs.append("\n\n".join(parts))
    return tuple(docs)


def stdlib_sources(root: str | None = None) -> list[str]:
    """Paths of the standard library's `.py` files under `root` (default: this Python's), sorted, without
    the folders in SKIP_DIRS and `test_*.py` files. Empty when the installation has no sources."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    return files


def module_docstrings(path: str | os.PathLike) -> list[str]:
    """The docstrings of a Python source file (module, then classes and functions depth-first in source
    order), dedented; [] for a file that does not parse (e.g. Python 2 syntax in test data).

    >>> module_docstrings(json.__file__)[0][:35]
    'JSON (JavaScript Object Notation) <'
    """
    try:
        with tokenize.open(path) as f:  # honours the file's coding cookie
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:  # depth-first, in source order
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        stack += reversed([c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr)])  # defs: not in exprs
    return out
