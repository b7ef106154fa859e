"""fastllm.Tokenizer: ids identical to tiktoken (same ranks, both patterns) and to HF tokenizers
(tokenizer.json), round trips (hypothesis), special tokens, files (tiktoken, sidecar, tokenizer.json) and bad
input.

Ranks are trained once per module on part of the corpus (vocab ~3k keeps it fast); the corpus is several MB of
real text: pydoc_data.topics, stdlib sources, and Unicode-heavy strings."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllm import Tokenizer

tiktoken = pytest.importorskip("tiktoken")

EOT = "<|endoftext|>"
FIM = "<|fim_middle|>"

UNICODE_SAMPLES = [
    "",
    " ",
    "a",
    "\n",
    "\r\n",
    "\r\n\r\n  \t\n",
    "   \n\n   x",
    "hello world",
    "Hello, World! It's 2024; we'll see. I'M here, YOU'RE there, they've gone, she'd go.",
    "数学是研究数量、结构、变化以及空间等概念的一门学科。東京都は日本の首都です。한국어 텍스트입니다.",
    "العربية هي لغة سامية. مرحبا بالعالم! ١٢٣٤٥٦٧٨٩٠",
    "עברית: שלום עולם. Ελληνικά: Γειά σου Κόσμε. Русский: Привет, мир!",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖🤖 ☕",
    "combining: e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319 n\u0303",
    "digits 1 12 123 1234 12345 123456789012345678901234567890 3.14159 1,000,000 ٣٤٥ ⅷ ²³",
    "tabs\tand\t\tspaces    and\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\x0b\x0c\x1c\x85",
    "mixed    \n  \t \r\n\r\r\n   end   ",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve ’s",
    "x" * 300 + " " + "!" * 400 + " " * 500 + "\n" * 200 + "中" * 300 + "1" * 301,
    "a\u0000b\u0001c\u007f\u0080\u00ff\uffff\U0010ffff\U0001f600",
    "<|endoftext|> is special, <|fim_middle|> too; <|endoftext is not.",
]


def _stdlib_text(limit: int) -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts, n = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            t = f.read()
        parts.append(t)
        n += len(t)
        if n >= limit:
            break
    return "".join(parts)


@pytest.fixture(scope="module")
def corpus() -> str:
    import pydoc_data.topics

    topics = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return topics + _stdlib_text(2_500_000) + "\n".join(UNICODE_SAMPLES) * 20


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def pair(request, corpus):
    """(fastllm Tokenizer, equivalent tiktoken Encoding), ranks trained on the first 600 kB."""
    tok = Tokenizer.train(
        corpus[:600_000] + "\n".join(UNICODE_SAMPLES),
        vocab_size=3000,
        pattern=request.param,
        special_tokens=(EOT, FIM),
        progress=False,
    )
    ranks = {tok.token_to_bytes(i): i for i in range(tok.vocab_size - 2)}
    enc = tiktoken.Encoding(
        f"test_{request.param}", pat_str=tok.pat_str, mergeable_ranks=ranks, special_tokens=tok.special_tokens
    )
    return tok, enc


# ---- parity with tiktoken


def test_corpus_matches_tiktoken(pair, corpus):
    tok, enc = pair
    ids = tok.encode_ordinary(corpus)
    assert ids.dtype == np.int32 and ids.ndim == 1
    expected = enc.encode_ordinary(corpus)
    assert len(ids) == len(expected)
    assert ids.tolist() == expected
    assert tok.decode(ids) == corpus


@pytest.mark.parametrize("i", range(len(UNICODE_SAMPLES)))
def test_samples_match_tiktoken(pair, i):
    tok, enc = pair
    s = UNICODE_SAMPLES[i]
    assert tok.encode_ordinary(s).tolist() == enc.encode_ordinary(s)
    assert tok.encode(s, allowed_special="all").tolist() == enc.encode(s, allowed_special="all")
    assert tok.decode(tok.encode_ordinary(s)) == s


def test_long_chunks_heap_path(pair):
    """Chunks over 128 bytes take the heap merge loop; check it against tiktoken and the naive loop."""
    tok, enc = pair
    rng = np.random.default_rng(0)
    for n in (129, 200, 1000, 5000):
        for alphabet in ("ab", "the", " ", "!?.", "数学是"):
            s = "".join(rng.choice(list(alphabet), n))
            assert tok.encode_ordinary(s).tolist() == enc.encode_ordinary(s), (n, alphabet)
            # the whole string as one chunk: heap loop (fast path) == naive loop
            assert tok._core.encode_chunks([s]).tolist() == tok._core.encode_chunk_naive(s.encode())


def test_encode_chunk_matches_naive(pair, corpus):
    tok, _ = pair
    import regex

    for chunk in regex.findall(tok.pat_str, corpus[-200_000:])[:20000:7]:
        assert tok._core.encode_chunks([chunk]).tolist() == tok._core.encode_chunk_naive(chunk.encode())


def test_encode_batch(pair, corpus):
    tok, enc = pair
    texts = [corpus[i : i + 5000] for i in range(0, 200_000, 5000)] + UNICODE_SAMPLES
    for threads in (1, 2):
        out = tok.encode_batch(texts, threads=threads, disallowed_special=())
        assert [a.tolist() for a in out] == [enc.encode_ordinary(t) for t in texts]
    out = tok.encode_batch([f"a{EOT}b", "c"], allowed_special="all")
    assert [a.tolist() for a in out] == [enc.encode(f"a{EOT}b", allowed_special="all"), enc.encode("c")]
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode_batch(["x", EOT])
    assert tok.encode_batch([]) == []


def test_python_threads(pair, corpus):
    """encode releases the GIL; concurrent calls from Python threads (own caches) give the same ids."""
    from concurrent.futures import ThreadPoolExecutor

    tok, enc = pair
    texts = [corpus[i * 40_000 : (i + 1) * 40_000] for i in range(8)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(tok.encode_ordinary, texts))
    assert [a.tolist() for a in got] == [enc.encode_ordinary(t) for t in texts]


# ---- special tokens


def test_special_tokens(pair):
    tok, enc = pair
    s = f"hello {EOT} world{FIM}x{EOT}"
    assert tok.encode(s, allowed_special="all").tolist() == enc.encode(s, allowed_special="all")
    assert tok.encode(s, allowed_special={EOT}, disallowed_special=()).tolist() == enc.encode(
        s, allowed_special={EOT}, disallowed_special=()
    )
    assert tok.encode(s, disallowed_special=()).tolist() == enc.encode_ordinary(s)
    assert tok.encode_ordinary(s).tolist() == enc.encode_ordinary(s)
    with pytest.raises(ValueError, match="disallowed special token '<\\|endoftext\\|>'"):
        tok.encode(s)
    with pytest.raises(ValueError, match="fim_middle"):
        tok.encode(s, allowed_special={EOT})
    # names that are not special tokens, as tiktoken takes them: allowed, they allow nothing; disallowed, the text
    # may not contain them
    u = "x <|unknown|> y"
    assert tok.encode(u, allowed_special={"<|unknown|>"}).tolist() == enc.encode(u, allowed_special={"<|unknown|>"})
    assert tok.encode("x", disallowed_special={"<|unknown|>"}).tolist() == enc.encode("x")
    for f in (tok.encode, enc.encode):
        with pytest.raises(ValueError, match="<\\|unknown\\|>"):
            f(u, disallowed_special={"<|unknown|>"})
    with pytest.raises(TypeError, match="allowed_special"):
        tok.encode("x", allowed_special="<|endoftext|>")
    assert tok.special_tokens == {EOT: 2998, FIM: 2999}
    assert tok.token_to_bytes(2998) == EOT.encode()
    assert tok.decode([2998]) == EOT
    assert tok.vocab_size == tok.n_vocab == 3000
    assert tok.eot_token == 2998


# ---- round trips


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
    | st.text(alphabet=" \t\r\n\x0b\x0caZ1'.é中")
)
def test_roundtrip_hypothesis(pair, s):
    tok, enc = pair
    ids = tok.encode_ordinary(s)
    assert tok.decode(ids, errors="strict") == s
    assert ids.tolist() == enc.encode_ordinary(s)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, categories=("Cs", "Ll", "Zs"))))
def test_surrogates_policy(pair, s):
    """Lone surrogates become U+FFFD (tiktoken's policy); pairs are joined."""
    tok, enc = pair
    fixed = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids = tok.encode(s)
    assert tok.decode(ids) == fixed
    assert ids.tolist() == enc.encode(s)
    assert [a.tolist() for a in tok.encode_batch([s, "ok"])] == [enc.encode(s), enc.encode("ok")]


# ---- decode and bad input


def test_decode_errors(pair):
    tok, _ = pair
    bad = [ord("a"), 0xFF, ord("b")]  # byte tokens: 0xff is never valid UTF-8
    assert tok.decode(bad) == "a\ufffdb"
    assert tok.decode(np.array(bad, np.int64), errors="ignore") == "ab"
    with pytest.raises(ValueError, match="byte 1 .*token index 1, id 255"):
        tok.decode(bad, errors="strict")
    assert tok.decode_bytes(bad) == b"a\xffb"
    assert tok.decode([]) == "" and tok.decode_bytes(np.zeros(0, np.int32)) == b""
    for ids in ([1, 3000], [-1], [10**12], np.array([5, 70000], np.uint32), [1, 2**70]):
        with pytest.raises(ValueError, match=str(int(np.asarray(ids)[-1]))):
            tok.decode(ids)
    with pytest.raises(ValueError, match="3000"):
        tok.token_to_bytes(3000)
    with pytest.raises(ValueError, match="-5"):
        tok.token_to_bytes(-5)
    with pytest.raises(TypeError, match="integers"):
        tok.decode(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        tok.encode_batch(["a", 3])


def test_decode_batch(pair, corpus):
    tok, enc = pair
    texts = [corpus[i : i + 3000] for i in range(0, 60_000, 3000)] + UNICODE_SAMPLES
    ids = [tok.encode_ordinary(t) for t in texts]
    for threads in (1, 2):
        assert tok.decode_batch(ids, threads=threads) == texts
        assert tok.decode_batch([a.tolist() for a in ids], threads=threads) == enc.decode_batch(ids)
    assert tok.decode_batch([[97, 0xFF]]) == ["a\ufffd"]
    with pytest.raises(ValueError, match="byte 1"):
        tok.decode_batch([[97], [97, 0xFF]], errors="strict")
    with pytest.raises(ValueError, match="5000 at index 1 of ids\\[1\\]"):
        tok.decode_batch([[97], [97, 5000]])


def test_constructor_errors():
    base = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="byte 65"):
        Tokenizer({k: v for k, v in base.items() if k != b"A"})
    with pytest.raises(ValueError, match="assigned twice"):
        Tokenizer({**base, b"ab": 3})
    with pytest.raises(ValueError, match="assigned twice"):
        Tokenizer(base, special_tokens={EOT: 5})
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100, progress=False)
    with pytest.raises(TypeError, match="texts_or_paths"):
        Tokenizer.train([b"abc"], vocab_size=300, progress=False)
    with pytest.raises(ValueError, match="regex"):
        Tokenizer(base, pattern="(unclosed")


def test_custom_pattern_and_gaps():
    """A custom regex goes through Python `regex`; ids may have gaps (like cl100k's specials)."""
    ranks = {bytes([b]): b for b in range(256)}
    for k, t in enumerate([b"ab", b"abc", b" ab", b"cd"]):
        ranks[t] = 256 + k
    pat = r"\w+|\s+|[^\w\s]+"
    tok = Tokenizer(ranks, pattern=pat, special_tokens={EOT: 1000})
    enc = tiktoken.Encoding("c", pat_str=pat, mergeable_ranks=ranks, special_tokens={EOT: 1000})
    for s in ["abc abcd  ab!", f"x{EOT}abc{EOT}", "", EOT]:
        assert tok.encode(s, allowed_special="all").tolist() == enc.encode(s, allowed_special="all")
        assert tok.encode_ordinary(s).tolist() == enc.encode_ordinary(s)
    assert tok.n_vocab == 1001 and tok.vocab_size == 261
    with pytest.raises(ValueError, match="not assigned"):
        tok.decode([500])
    tr = Tokenizer.train([f"abc abc{EOT}abd ab"] * 3, vocab_size=262, pattern=pat, progress=False)
    assert tr.pattern == pat and tr.vocab_size == 260  # only 3 merges exist: training stops early
    assert [tr.token_to_bytes(i) for i in range(256, 260)] == [b"ab", b"abc", b"abd", EOT.encode()]


# ---- files


def test_save_load(pair, tmp_path, corpus):
    tok, enc = pair
    p = tmp_path / "tok.tiktoken"
    tok.save(p)
    back = Tokenizer.load(p)
    text = corpus[:100_000]
    assert back.encode_ordinary(text).tolist() == tok.encode_ordinary(text).tolist()
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(p))
    assert ranks == enc._mergeable_ranks
    q = tmp_path / "plain.tiktoken"
    tok.save_tiktoken(q)
    again = Tokenizer.load_tiktoken(q, pattern=enc._pat_str, special_tokens=tok.special_tokens)
    assert again.pattern == tok.pattern  # recognised as the native pattern
    assert again.encode(text, disallowed_special=()).tolist() == enc.encode_ordinary(text)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_corrupt_files(pair, tmp_path):
    tok, _ = pair
    p = tmp_path / "t.tiktoken"
    tok.save(p)
    lines = p.read_bytes().splitlines()

    def write(ls):
        p.write_bytes(b"\n".join(ls) + b"\n")

    write(lines[:2] + [b"!!notbase64 2"] + lines[3:])
    with pytest.raises(ValueError, match="t.tiktoken:3: invalid base64"):
        Tokenizer.load(p)
    write(lines[:4] + [lines[4].split()[0]] + lines[5:])
    with pytest.raises(ValueError, match="t.tiktoken:5: expected"):
        Tokenizer.load(p)
    write(lines[:5] + [lines[5].split()[0] + b" x5"] + lines[6:])
    with pytest.raises(ValueError, match="t.tiktoken:6: invalid rank"):
        Tokenizer.load(p)
    write(lines[:7] + [lines[3]] + lines[8:])
    with pytest.raises(ValueError, match="t.tiktoken:8: token"):
        Tokenizer.load(p)
    write(lines[:9] + [lines[9].split()[0] + b" 99999999999"] + lines[10:])
    with pytest.raises(ValueError, match="t.tiktoken:10: .*out of range"):
        Tokenizer.load(p)
    with pytest.raises(ValueError, match="too large"):
        Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={EOT: 2**29})
    write(lines[:-100])  # truncated at a line boundary: the sidecar's count catches it
    with pytest.raises(ValueError, match="truncated"):
        Tokenizer.load(p)
    p.write_bytes(b"\n".join(lines)[:-7])  # truncated mid-line
    with pytest.raises(ValueError, match="t.tiktoken"):
        Tokenizer.load(p)
    write(lines[1:])  # byte 0 missing
    with pytest.raises(ValueError, match="t.tiktoken.*byte 0"):
        Tokenizer.load_tiktoken(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="t.tiktoken:1"):
        Tokenizer.load_tiktoken(p)
    write(lines)
    side = tmp_path / "t.tiktoken.json"
    side.write_text('{"format": "fastllm-bpe", "version": 1,\n "pattern": ')
    with pytest.raises(ValueError, match="t.tiktoken.json:2"):
        Tokenizer.load(p)
    side.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="t.tiktoken.json:1"):
        Tokenizer.load(p)
    h = tmp_path / "tokenizer.json"
    h.write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(ValueError, match="tokenizer.json:1: not a BPE"):
        Tokenizer.load_hf(h)
    h.write_text(
        '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, '
        '"pre_tokenizer": {"type": "ByteLevel"}}'
    )
    with pytest.raises(ValueError, match="tokenizer.json:1: merge 0"):
        Tokenizer.load_hf(h)
    h.write_text('{"model": {"type": "BPE",')
    with pytest.raises(ValueError, match="tokenizer.json:1: corrupt JSON"):
        Tokenizer.load_hf(h)


# ---- HF tokenizers


def test_hf_json_roundtrip(pair, tmp_path, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    tok, _ = pair
    p = tmp_path / "tokenizer.json"
    tok.save_hf(p)
    hf = tokenizers.Tokenizer.from_file(str(p))
    texts = [corpus[:150_000], corpus[-150_000:]] + UNICODE_SAMPLES
    for t in texts:
        assert hf.encode(t).ids == tok.encode(t, allowed_special="all").tolist()
    assert hf.decode(tok.encode_ordinary(UNICODE_SAMPLES[9]).tolist()) == UNICODE_SAMPLES[9]
    back = Tokenizer.load_hf(p)
    assert back.special_tokens == tok.special_tokens
    assert back.encode_ordinary(texts[0]).tolist() == tok.encode_ordinary(texts[0]).tolist()
    back.save(tmp_path / "x.tiktoken")  # recognised as rank semantics


def test_hf_trained_file(tmp_path, corpus):
    """A tokenizer.json written by HF's own byte-level BPE trainer: fastllm encodes by merge priority."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([corpus[:300_000]], trainer=trainer)
    p = tmp_path / "hf.json"
    hf.save(str(p))
    tok = Tokenizer.load_hf(p)
    assert tok.special_tokens == {EOT: 0}
    for t in [corpus[300_000:450_000], f"a{EOT}b"] + UNICODE_SAMPLES:
        ids = tok.encode(t, allowed_special="all")
        assert ids.tolist() == hf.encode(t).ids
        assert tok.decode(ids) == t
    with pytest.raises(ValueError, match="merge priority"):
        tok.save(tmp_path / "nope.tiktoken")
    q = tmp_path / "again.json"
    tok.save_hf(q)
    hf2 = tokenizers.Tokenizer.from_file(str(q))
    t = corpus[300_000:400_000]
    assert hf2.encode(t).ids == hf.encode(t).ids


def run_python(code: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (a crash or hang there fails the test instead of killing pytest)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_empty_special_token_is_refused():
    """An empty special token matches everywhere: the native splitter used to loop forever on it."""
    p = run_python("""
from fastllm import Tokenizer, _C
for f in (lambda: Tokenizer.train(["ab ab"], 300, special_tokens=[""], progress=False),
          lambda: _C.train_bpe(["ab ab"], "gpt4", [""], 10, 1, None, 1),
          lambda: _C.bpe_count_chunks(["ab ab"], "gpt4", ["x", ""], 1),
          lambda: Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"": 256})):
    try:
        f()
        print("accepted")
    except ValueError as e:
        print("ValueError", e)
""", timeout=60)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 4, p.stderr
    assert all(line.startswith("ValueError") for line in lines), lines
    assert "special_tokens[0]" in lines[0] and "special_tokens[1] is empty" in lines[2]


def test_thread_counts_are_checked():
    """Thread counts beyond 1024 (or below 1) raise a ValueError naming `threads`: 100000 used to segfault
    every native path."""
    import fastllm

    tok = Tokenizer({bytes([b]): b for b in range(256)})
    for bad in (0, -1, 100_000, 2**70):
        with pytest.raises(ValueError, match="threads"):
            tok.encode_batch(["a"], threads=bad)
        with pytest.raises(ValueError, match="threads"):
            tok.decode_batch([[97]], threads=bad)
        with pytest.raises(ValueError, match="threads"):
            Tokenizer.train(["ab ab"], 260, threads=bad, progress=False)
        with pytest.raises(ValueError, match="threads"):
            fastllm.set_num_threads(bad)
    assert [a.tolist() for a in tok.encode_batch(["a", "b"], threads=1024)] == [[97], [98]]


def test_huge_omp_num_threads_is_capped():
    """OMP_NUM_THREADS=100000 is lowered to 1024 with a warning, for the main thread and any other thread."""
    p = run_python("""
import threading, numpy as np, fastllm
from fastllm import ops
assert fastllm.get_num_threads() == 1024
x = np.ones((4, 64, 3 * 64), np.float32)
ops.attention_forward(x, 4)
t = threading.Thread(target=lambda: print("thread", float(ops.attention_forward(x, 4)[0].sum())))
t.start(); t.join()
tok = fastllm.Tokenizer.train(["hello world " * 100], 270, progress=False)
print(len(tok.encode_batch(["hello"] * 8)))
""", timeout=300, OMP_NUM_THREADS="100000")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "thread 16384.0" in p.stdout and p.stdout.strip().endswith("8")
    assert "OMP_NUM_THREADS asks for 100000 threads; using 1024" in p.stderr


def test_bad_ranks_and_special_ids_are_named():
    """Ranks or special ids beyond 2**28 (int32 even) give a ValueError naming the token, not pybind11's
    'incompatible function arguments' listing the whole vocabulary."""
    base = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match=r"mergeable_ranks\[b'ab'\] = 1099511627776"):
        Tokenizer({**base, b"ab": 2**40})
    with pytest.raises(ValueError, match="special token '<x>': id 1099511627776"):
        Tokenizer(base, special_tokens={"<x>": 2**40})


def test_hf_added_token_reusing_a_vocab_id(tmp_path):
    """An added token whose id the vocab gives to another token is an error naming both (the byte token used
    to be dropped: decode(encode('a\\x05b')) == 'ab'); the same token listed in both (GPT-2) is fine."""
    tok = Tokenizer({bytes([b]): b for b in range(256)}, pattern="gpt2", special_tokens={EOT: 256})
    p = tmp_path / "tokenizer.json"
    tok.save_hf(p)
    doc = json.loads(p.read_text())
    doc["model"]["vocab"][EOT] = 256  # GPT-2 style: <|endoftext|> in the vocab and in added_tokens
    p.write_text(json.dumps(doc))
    assert Tokenizer.load_hf(p).decode(Tokenizer.load_hf(p).encode("a\x05b")) == "a\x05b"
    doc["added_tokens"].append({**doc["added_tokens"][0], "id": 5, "content": "<x>"})
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"tokenizer.json:1: id 5 is both the vocab token .* and the added token "
                                         r"'<x>'"):
        Tokenizer.load_hf(p)
    doc["added_tokens"][-1].update(id=300, content=EOT)
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="two ids, 256 and 300"):
        Tokenizer.load_hf(p)
