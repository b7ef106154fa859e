"""The built-in corpus (fastllm.corpus): a few MB of Python's own documentation, gathered deterministically from
source without importing anything, with no repeated docstrings, and a validation split that means something."""

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from fastllm.corpus import builtin_corpus, module_docstrings, stdlib_sources

HAS_SOURCES = bool(list(Path(sysconfig.get_paths()["stdlib"]).glob("json/*.py")))


def test_pydoc_topics_first_then_stdlib_docstrings():
    from pydoc_data.topics import topics

    docs = builtin_corpus()
    assert docs[: len(topics)] == [topics[k] for k in sorted(topics)]
    if not HAS_SOURCES:
        pytest.skip("this Python installation has no standard-library sources")
    n_bytes = sum(len(d.encode()) for d in docs)
    assert n_bytes > 1.5e6 and len(docs) > len(topics) + 300
    import json

    dump_doc = module_docstrings(json.__file__)[1]  # json.dump's docstring
    assert dump_doc.startswith("Serialize ``obj`` as a JSON formatted stream")
    assert sum(d.count(dump_doc) for d in docs) == 1
    assert builtin_corpus() == docs and builtin_corpus() is not docs  # a fresh list each call


def test_deterministic_and_nothing_imported():
    code = textwrap.dedent("""
        import hashlib, sys
        before = set(sys.modules)
        from fastllm.corpus import builtin_corpus
        docs = builtin_corpus()
        new = set(sys.modules) - before
        assert not new & {"this", "antigravity", "turtle", "turtledemo", "tkinter", "idlelib", "smtplib"}, new
        print(hashlib.sha256("\\x00".join(docs).encode()).hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import hashlib

    # the same corpus in another process, and nothing else printed (importing `this` prints the Zen of Python)
    assert out == hashlib.sha256("\x00".join(builtin_corpus()).encode()).hexdigest() + "\n"


def test_module_docstrings_in_source_order(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(textwrap.dedent('''\
        # -*- coding: latin-1 -*-
        """Module doc: café."""
        x = "not a docstring"
        try:
            import fast
        except ImportError:
            def fallback():
                """Fallback doc."""
        class A:
            """Class doc.

                Indented detail.
            """
            def method(self):
                """Method doc."""
                def inner():
                    """Inner doc."""
            async def run(self):
                """Async doc."""
        def after():
            """After doc."""
        f = lambda: None
        '''), encoding="latin-1")
    assert module_docstrings(src) == ["Module doc: café.", "Fallback doc.", "Class doc.\n\nIndented detail.",
                                      "Method doc.", "Inner doc.", "Async doc.", "After doc."]
    bad = tmp_path / "py2.py"
    bad.write_text('print "hello"\n')
    assert module_docstrings(bad) == []
    assert module_docstrings(tmp_path / "missing.py") == []


def test_stdlib_sources_skip_tests_and_third_party(tmp_path):
    for rel in ("a.py", "pkg/__init__.py", "pkg/b.py", "pkg/test_b.py", "test/x.py", "pkg/tests/y.py",
                "site-packages/numpy/z.py", "encodings/utf_8.py", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text('"""doc"""\n')
    got = [Path(p).relative_to(tmp_path).as_posix() for p in stdlib_sources(str(tmp_path))]
    assert got == ["a.py", "pkg/__init__.py", "pkg/b.py"]


@pytest.mark.skipif(not HAS_SOURCES, reason="this Python installation has no standard-library sources")
def test_validation_split_is_large(tmp_path):
    from fastllm.data import prepare
    from fastllm.tokenizer import Tokenizer

    docs = builtin_corpus()
    tok = Tokenizer.train(docs, 2048, special_tokens=["<|endoftext|>"], progress=False)
    tok.save(tmp_path / "tok.tiktoken")
    st = prepare(None, tmp_path / "tok.tiktoken", tmp_path / "data", val_fraction=0.1, progress=False)
    assert st.documents == len(docs)
    assert st.val_tokens > 30_000 and st.val_tokens > 0.05 * (st.train_tokens + st.val_tokens)
