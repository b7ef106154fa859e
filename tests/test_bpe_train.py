"""BPE training: the native incremental trainer gives exactly the merges of a straightforward Python reference
(full recount per merge, same tie-break), on real text and on tie-heavy corpora, for several vocab sizes;
chunk counting split among threads gives regex.findall's counts; progress callback; files as input."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fastllm import _C, Tokenizer

regex = pytest.importorskip("regex")

EOT = "<|endoftext|>"


def ref_chunk_counts(texts: list[str], pat: str, specials: list[str]) -> Counter:
    """Chunks of each text between special tokens, as regex.findall finds them, counted."""
    counts: Counter = Counter()
    split = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    for t in texts:
        for piece in split.split(t) if split else [t]:
            counts.update(c.encode() for c in regex.findall(pat, piece))
    return counts


def ref_train(counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Byte-level BPE, the obvious way: recount every adjacent pair (weighted by chunk count) per merge, take
    the highest count, ties to the smallest (left, right); skip a pair whose bytes are already a token;
    replace the pair left to right without overlap in every chunk."""
    words = [(list(w), c) for w, c in counts.items()]
    toks = [bytes([i]) for i in range(256)]
    vocab = set(toks)
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words:
            for p in zip(w, w[1:]):
                pairs[p] += c
        best = None
        for p, c in pairs.items():
            if toks[p[0]] + toks[p[1]] in vocab:
                continue
            if best is None or (-c, p) < best:
                best = (-c, p)
        if best is None:
            break
        a, b = best[1]
        new = len(toks)
        toks.append(toks[a] + toks[b])
        vocab.add(toks[-1])
        merges.append((a, b))
        for w, _ in words:
            i, out = 0, []
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            w[:] = out
    return merges


def merges_of(tok: Tokenizer) -> list[bytes]:
    n = tok.vocab_size - len(tok.special_tokens)
    return [tok.token_to_bytes(i) for i in range(256, n)]


def as_bytes(merges: list[tuple[int, int]]) -> list[bytes]:
    toks = [bytes([i]) for i in range(256)]
    for a, b in merges:
        toks.append(toks[a] + toks[b])
    return toks[256:]


@pytest.fixture(scope="module")
def topics() -> str:
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def tie_corpus(seed: int) -> str:
    """Few distinct short words over a tiny alphabet with small counts: many equal pair counts and runs."""
    r = random.Random(seed)
    words = ["".join(r.choice("abc") for _ in range(r.randint(1, 9))) for _ in range(40)]
    return " ".join(r.choice(words) for _ in range(300)) + " aaaa aaaaaaa abab " + EOT + " ccc"


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_matches_reference_real_text(pattern, topics):
    text = topics[:25_000] + EOT + topics[100_000:110_000]
    pat = {"gpt2": _C.pattern_string("gpt2"), "gpt4": _C.pattern_string("gpt4")}[pattern]
    ref = as_bytes(ref_train(ref_chunk_counts([text], pat, [EOT]), 700))
    assert len(ref) == 700
    for vocab_size in (257, 258, 300, 700, 957):  # merges of a smaller vocab are a prefix of a larger one's
        tok = Tokenizer.train([text], vocab_size, pattern=pattern, special_tokens=(EOT,), progress=False)
        assert merges_of(tok) == ref[: vocab_size - 257]
        assert tok.special_tokens == {EOT: vocab_size - 1}


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_ties(seed):
    text = tie_corpus(seed)
    ref = as_bytes(ref_train(ref_chunk_counts([text], _C.pattern_string("gpt4"), [EOT]), 200))
    for vocab_size in (260, 280, 1000):
        tok = Tokenizer.train(text, vocab_size, special_tokens=(EOT,), progress=False)
        n = vocab_size - 257
        assert merges_of(tok) == ref[:n]  # when the pairs run out, both stop early
        assert tok.vocab_size == 257 + min(n, len(ref))


def test_custom_pattern_matches_reference():
    pat = r"\w+|\s+|[^\w\s]+"
    text = tie_corpus(7) + " Hello, hello; HELLO!! 123 456"
    ref = as_bytes(ref_train(ref_chunk_counts([text], pat, []), 50))
    tok = Tokenizer.train(text, 256 + 50, pattern=pat, special_tokens=(), progress=False)
    assert merges_of(tok) == ref


def test_chunk_counts_threads(topics):
    """Counting split among threads (cut at safe line starts, special tokens removed) == regex.findall."""
    texts = [topics, f"x{EOT}y {EOT}", "", "tail \n  \nAbc"]
    for pattern in ("gpt2", "gpt4"):
        pat = _C.pattern_string(pattern)
        ref = ref_chunk_counts(texts, pat, [EOT])
        for threads in (1, 2, 5):
            got = _C.bpe_count_chunks(texts, pattern, [EOT], threads)
            assert got == dict(ref), (pattern, threads)


def test_deterministic_across_threads(topics):
    a = Tokenizer.train([topics], 2000, progress=False, threads=1)
    b = Tokenizer.train([topics], 2000, progress=False, threads=2)
    assert merges_of(a) == merges_of(b)


def test_progress_callback_and_abort(topics):
    seen: list[tuple[int, int]] = []
    merges = _C.train_bpe([topics[:50_000]], "gpt4", [], 300, 1, lambda d, t: seen.append((d, t)), 50)
    assert len(merges) == 300
    assert seen == [(k, 300) for k in range(50, 301, 50)] + [(300, 300)]

    def stop(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        _C.train_bpe([topics[:50_000]], "gpt4", [], 300, 1, stop, 10)


def test_tqdm_and_paths(tmp_path, topics, capsys):
    p = tmp_path / "corpus.txt"
    p.write_text(topics[:30_000], encoding="utf-8")
    a = Tokenizer.train(p, 400, progress=True)
    b = Tokenizer.train([topics[:30_000]], 400, progress=False)
    assert merges_of(a) == merges_of(b)
    c = Tokenizer.train([str(p)], 400, progress=False)  # a str is always text, even if it names a file
    assert merges_of(c) != merges_of(a)
    assert "bpe merges" in capsys.readouterr().err


def test_long_chunks_match_reference():
    """Chunks of thousands of bytes (runs of one character, a line without spaces, repeats that overlap):
    the occurrence-list trainer gives the reference's merges."""
    rnd = random.Random(3)
    text = ("a" * 3001 + " " + "ab" * 700 + "a " + "".join(rnd.choice("abc") for _ in range(4000)) + " "
            + "xyz" * 333 + "xy " + "aaab" * 250)
    ref = as_bytes(ref_train(ref_chunk_counts([text], _C.pattern_string("gpt4"), []), 300))
    tok = Tokenizer.train(text, 256 + 300, special_tokens=(), progress=False)
    assert merges_of(tok) == ref


def test_splits_of_long_tokens():
    """from_ranks finds every split of a token into two tokens (the merges tiktoken would do) also on the trie
    path taken for long tokens: same (left, right, priority) as the obvious enumeration."""
    tok = Tokenizer.train(["a" * 20_000 + " " + "ab" * 3000], 320, special_tokens=(), progress=False)
    toks = {tok.token_to_bytes(i): i for i in range(tok.n_vocab)}
    assert max(map(len, toks)) >= 8192  # long tokens: the trie path
    ref = sorted((toks[t[:k]], toks[t[k:]], i) for t, i in toks.items() for k in range(1, len(t))
                 if t[:k] in toks and t[k:] in toks)
    assert sorted((a, b, p) for a, b, p, _ in tok._core.pairs()) == ref


def test_long_runs_train_and_load_in_linear_time(tmp_path):
    """Training on a run of 300k copies of one character, then saving and loading the tokenizer, takes about
    a second (finding the splits of its long tokens took ~20 s per load, quadratic in the token length);
    a 4 MB line without spaces (one chunk) trains 500 merges in seconds (each merge rewrote the whole chunk:
    ~40 s). Generous bounds: the machine may be busy."""
    import time

    t0 = time.perf_counter()
    tok = Tokenizer.train(["a" * 300_000], 300, special_tokens=(EOT,), progress=False)
    tok.save(tmp_path / "t.tiktoken")
    again = Tokenizer.load(tmp_path / "t.tiktoken")
    assert time.perf_counter() - t0 < 15
    text = "a" * 123_457 + "b"
    assert again.decode(again.encode(text)) == text and again.encode(text).tolist() == tok.encode(text).tolist()
    rnd = random.Random(0)
    line = "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=4_000_000))
    t0 = time.perf_counter()
    tok = Tokenizer.train([line], 256 + 500, special_tokens=(), progress=False)
    assert time.perf_counter() - t0 < 15
    assert tok.vocab_size == 756 and tok.decode(tok.encode(line[:10_000])) == line[:10_000]
