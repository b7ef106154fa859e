"""Pre-tokenizer (csrc/tokenizer/pretokenize.cpp): _C.pretokenize(text, pattern) must return exactly
regex.findall(pattern_string, text) for the built-in patterns: GPT-2, GPT-4 (cl100k), Llama 3, Qwen2, SmolLM.

Oracle: the `regex` module with the pattern strings (GPT-4's is checked to be tiktoken's cl100k pat_str), and
for the Hugging Face patterns HF `tokenizers`' own pre-tokenizers (Split on Llama 3's / Qwen2's regex as their
tokenizer.json files spell it, SmolLM's Digits + ByteLevel sequence).
Inputs: Python's pydoc topics (all of it), stdlib sources, hand-written tricky strings, every code point in
order and shuffled, hypothesis texts (a targeted alphabet of tricky characters, and arbitrary text), and an
exhaustive comparison of the scanner's character classes with regex for every code point.
Surrogate policy: lone surrogates (U+D800..U+DFFF) cannot be encoded as UTF-8, so they are excluded from
generated text and the binding rejects them with ValueError (tiktoken repairs them before encoding).
"""

from __future__ import annotations

import ast
import functools
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

regex = pytest.importorskip("regex")

from hf_families import LLAMA3_SPLIT, QWEN2_SPLIT  # noqa: E402

from fastllm import _C  # noqa: E402

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = ["gpt2", "gpt4", "llama3", "qwen2", "smollm", "whole", "metaspace"]


def tiktoken_pat_strs() -> dict[str, str]:
    """pat_str literals of tiktoken_ext/openai_public.py, read from its source (calling cl100k_base() would
    download the vocabulary)."""
    mod = pytest.importorskip("tiktoken_ext.openai_public")
    tree = ast.parse(open(mod.__file__).read())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "r50k_pat_str":
            out["r50k"] = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "cl100k_base":
            for d in ast.walk(node):
                if isinstance(d, ast.Dict):
                    for k, v in zip(d.keys, d.values):
                        if isinstance(k, ast.Constant) and k.value == "pat_str":
                            out["cl100k"] = ast.literal_eval(v)
    return out


COMPILED = {name: regex.compile(_C.pattern_string(name)) for name in PATTERNS}


def check(text: str, pattern: str) -> None:
    got = _C.pretokenize(text, pattern)
    want = COMPILED[pattern].findall(text)
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        pytest.fail(
            f"{pattern}: chunk {i} differs: got {got[max(0, i - 2) : i + 3]!r}, "
            f"want {want[max(0, i - 2) : i + 3]!r} ({len(got)} vs {len(want)} chunks)"
        )
    assert "".join(got) == text  # every character is covered by these patterns


# ---- pattern strings


def test_pattern_strings():
    assert _C.pattern_string("gpt2") == GPT2_PAT
    pats = tiktoken_pat_strs()
    assert _C.pattern_string("gpt4") == pats["cl100k"]


def test_hf_pattern_strings():
    assert _C.pattern_string("llama3") == LLAMA3_SPLIT
    assert _C.pattern_string("qwen2") == QWEN2_SPLIT


def hf_pre_tokenizer(pattern: str):
    """HF tokenizers' pre-tokenizer as the checkpoints' tokenizer.json files configure it."""
    tk = pytest.importorskip("tokenizers")
    P = tk.pre_tokenizers
    if pattern == "gpt2":
        return P.ByteLevel(add_prefix_space=False, use_regex=True)
    if pattern == "smollm":
        return P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex_str = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[pattern]
    return P.Sequence([P.Split(tk.Regex(regex_str), "isolated"), P.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("pattern", ["gpt2", "llama3", "qwen2", "smollm"])
def test_hf_pre_tokenizers_agree(pattern):
    """The native chunks are HF's pieces (which HF shows in its byte-level alphabet)."""
    from fastllm.tokenizer import _B2U

    pre = hf_pre_tokenizer(pattern)
    texts = TRICKY + [TRICKY_JOINED, corpus_text()[:100_000]]
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\r", "\t", "a", "B", "1", "23", ".", "'", "s", "LL", "\u00e9", "\u3000", "\u00a0",
                "!", "\u0663", "\u216b", "\u0085", "\u65e5", "\U0001f600"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(3000)]
    for text in texts:
        ours = ["".join(_B2U[b] for b in c.encode()) for c in _C.pretokenize(text, pattern)]
        assert ours == [p for p, _ in pre.pre_tokenize_str(text)], repr(text[:200])


def test_gpt2_equals_tiktoken_r50k_form():
    # tiktoken's faster r50k spelling must split the same way as the original GPT-2 pattern we implement
    r50k = regex.compile(tiktoken_pat_strs()["r50k"])
    text = corpus_text()[:200_000] + TRICKY_JOINED
    assert r50k.findall(text) == _C.pretokenize(text, "gpt2")


# ---- corpora


def corpus_text() -> str:
    topics = pytest.importorskip("pydoc_data.topics").topics
    return "\n".join(topics[k] for k in sorted(topics))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pydoc_topics(pattern):
    check(corpus_text(), pattern)


STDLIB_FILES = ["os.py", "textwrap.py", "difflib.py", "tokenize.py", "_pydecimal.py"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", STDLIB_FILES)
def test_stdlib_sources(pattern, name):
    path = os.path.join(os.path.dirname(os.__file__), name)
    with open(path, encoding="utf-8") as f:
        check(f.read(), pattern)


TRICKY = [
    "",
    " ",
    "a",
    "'",
    "hello world",
    "Hello, World! It's 2024... don't you'll we've I'm he'd they're",
    "'s 'S 'LL 'Ll 'lL 'VE 'Re 'D 'M 'T 'x 'ſ 'ſt \u212a 'K 'ǅ",
    "a'",
    "end with quote '",
    "''s '''ll ' s 'l 'v 're'",
    "trailing spaces   ",
    "   leading spaces",
    "a  b   c    d\t\te\t \tf",
    "line\r\nline\r\n\r\n  \r\n\tx\n\n\n  y \n ",
    "\r\r\n\n\r \r x\r\n",
    "x \n",
    "x  \n  \n y",
    "\u00a0x\u00a0\u00a0y \u00a0 z\u2028w\u2029v\u3000u\u3000\u3000t\u0085s\x0b\x0cr\x1c\x1d\x1e\x1fq",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "مرحبا بالعالم ١٢٣٤٥ ۱۲۳",
    "हिन्दी पाठ देवनागरी में ०१२३४५ क्षत्रिय",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ a😀b",
    "digits 1234567 12 1 123 ٣٤٥٦ ൬൭൮ 𝟘𝟙𝟚𝟛 ⅫⅣ ² ³ ½ ⑳ 〇",
    "Ⅻ Roman ⅻ numerals ⅰⅱⅲ",
    "superscript x² y³ z⁴ ₁₂",
    "combining e\u0301 a\u0308 \u0301\u0301x n\u0303",
    "mixed123abc456def 7890",
    "punct !!! ??? ... --- ___ *** ### $$$ %%% @@@\n\r\n",
    " !\n",
    "!!\r\n\r\nx",
    "a\n\nb",
    "tabs\tand\ttabs\t",
    "\t\t\t",
    "\n",
    "\r\n",
    "  \t  ",
    "x\u200by\u200dz\ufeffw",
    "𐍈𐌰𐌹 gothic 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01\x7f\x80\x9f control",
    "'\u017f'S",
    "'ll've're'd'm't's",
    "$123.45 €99 ¥1000",
    "https://example.com/path?q=1&r='s'",
]
TRICKY_JOINED = " ".join(TRICKY) + "\n".join(TRICKY)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("text", TRICKY + [TRICKY_JOINED], ids=range(len(TRICKY) + 1))
def test_tricky(pattern, text):
    check(text, pattern)


@functools.cache
def all_code_points() -> str:
    return "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_code_point(pattern):
    text = all_code_points()
    check(text, pattern)
    chars = list(text[:0x30000])  # shuffled: every class next to every other
    random.Random(0).shuffle(chars)
    check("".join(chars), pattern)


# ---- character classes, exhaustively


def tables_origin() -> str:
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "tokenizer", "unicode_tables.h")
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return "(unicode_tables.h not found)"


def test_char_classes_match_regex():
    flags = np.frombuffer(_C._pretokenize_char_classes(), dtype=np.uint8)
    assert flags.shape == (0x110000,)
    all_cp = "".join(map(chr, range(0x110000)))
    want = np.zeros(0x110000, np.uint8)
    for bit, pat in [(1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")]:
        for m in regex.finditer(pat, all_cp):
            want[m.start() : m.end()] |= bit
    bad = np.flatnonzero(flags != want)
    assert bad.size == 0, (
        f"{bad.size} code points differ, e.g. (cp, ours, regex's) "
        f"{[(hex(c), int(flags[c]), int(want[c])) for c in bad[:10]]}; "
        f"tables: {tables_origin()}; installed regex is {regex.__version__}: "
        "rerun scripts/gen_unicode_tables.py if they differ"
    )


@pytest.mark.parametrize("pattern", ["gpt4", "llama3", "qwen2"])
def test_case_insensitive_contractions(pattern):
    # every code point regex accepts for a contraction letter under (?i), and only those, forms a contraction
    pat4 = COMPILED[pattern]
    for tail in ["s", "d", "m", "t", "ll", "ve", "re"]:
        variants = {""}
        for ch in tail:
            alts = regex.findall(f"(?i:{ch})", all_code_points())
            alts += ["\u212a", "\u0131"]  # KELVIN SIGN, dotless i: fold-related but not accepted
            variants = {v + a for v in variants for a in alts}
        for v in sorted(variants):
            text = f"x'{v}y"
            assert _C.pretokenize(text, pattern) == pat4.findall(text), text


# ---- property tests


TRICKY_ALPHABET = list(
    "aZsSdDmMtTlLvVeErRkK\u017f\u212a\u0131'\u2019\" \t\n\r\x0b\x0c\x1c\x1f"
    "\u0085\u00a0\u1680\u2000\u2028\u2029"
    "\u202f\u3000\u200b\u200d\ufeff019\u0663\u06f3\u0966\u2160\u216b\u00b2\u00bd\u2460\u3007"
    "\u4e2d\u65e5\u00e9\u0301\u093f\u0915\u094d\u0627\u064b!.,-_#$()\U0001f600\U0001f3fd\U0001f468\U0001d400"
    "\U0001d7d8\U00010348\x00\x7f\x80"
)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(TRICKY_ALPHABET), max_size=40))
def test_hypothesis_tricky(pattern, text):
    check(text, pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_hypothesis_arbitrary(pattern, text):
    check(text, pattern)


# ---- bad input


def test_bad_pattern():
    with pytest.raises(ValueError, match="pattern.*gpt3"):
        _C.pretokenize("abc", "gpt3")
    with pytest.raises(ValueError, match="pattern.*cl100k"):
        _C.pattern_string("cl100k")


def test_bad_text():
    with pytest.raises(ValueError, match="text"):
        _C.pretokenize("a\ud800b", "gpt2")
    with pytest.raises(TypeError):
        _C.pretokenize(b"bytes", "gpt2")
