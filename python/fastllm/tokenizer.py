"""Byte-level BPE tokenizer, exactly compatible with tiktoken (and HF ``tokenizers`` through tokenizer.json).

The work is native (csrc/tokenizer): pre-tokenization by hand-written scanners for the GPT-2 and GPT-4
(cl100k) patterns, BPE by merge priority with a per-thread chunk cache, multi-threaded training.
This module holds the policy: special tokens, surrogate repair, file formats, errors.

Conventions
  - Ids are returned as 1-D ``numpy.int32`` arrays that own the native buffer (tiktoken returns lists;
    ``ids.tolist()`` converts). ``decode`` accepts any integer sequence or array.
  - Token id = rank: ids 0..255 are the single bytes in byte order (for trained tokenizers), merges follow in
    training order, special tokens come last.
  - Lone surrogates in input text (not encodable as UTF-8) are replaced by U+FFFD before encoding, as tiktoken
    does (valid surrogate pairs are joined first), so ``decode(encode(s)) == s`` holds for every ``s``
    without lone surrogates.
  - Patterns: ``"gpt2"``, ``"gpt4"`` (cl100k), ``"llama3"``, ``"qwen2"``, ``"smollm"`` (native scanners, fast;
    the last three are the splits of Llama 3's (and OLMo 2's, SmolLM3's), Qwen2/2.5/3's and SmolLM's
    tokenizer.json, recognised in those files) or any other regex string (found with the ``regex`` module in
    Python, then encoded natively; slower).
  - Hugging Face tokenizer.json options: an NFC/NFKC/NFD/NFKD normalizer (applied before encoding), added tokens
    (``special`` ones are special tokens; the others are always matched, as HF does), and a post-processor that
    puts a BOS token before every text (``bos_token``; ``encode`` never adds it, callers do, see
    fastllm.sample).
  - SentencePiece-style tokenizer.json files (Llama 2, TinyLlama, Mistral 7B, Gemma) run in the same native encoder:
    their tokens are held with U+2581 as a space, BPE starts from characters, a character that is no token becomes
    its byte-fallback tokens <0xNN> (else <unk>), and each stretch of text between special tokens gets the leading
    space the file's Prepend normalizer or Metaspace pre-tokenizer asks for (BpeEncoder.set_sentencepiece);
    patterns "whole" (no split) and "metaspace" (split before spaces). `decode` strips one leading space and
    decodes runs of byte tokens as HF's decoder does. A folder's SentencePiece ``tokenizer.model`` without a
    tokenizer.json is converted to one as transformers' LlamaConverter does (fastllm.spm).

>>> tok = Tokenizer.train(["hello world, hello there"] * 10, vocab_size=270, progress=False)
>>> ids = tok.encode("hello world")
>>> tok.decode(ids)
'hello world'
>>> tok.encode("<|endoftext|>", allowed_special="all").tolist() == [tok.special_tokens["<|endoftext|>"]]
True
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np

from . import _C
from .fileio import atomic_write, read_json

__all__ = ["Tokenizer", "GPT2_PATTERN", "GPT4_PATTERN", "NATIVE_PATTERNS"]

# pre-tokenized by native scanners; "whole" (the text is one chunk) and "metaspace" (a chunk starts at each space) are
# the splits of SentencePiece-style tokenizer.json files
NATIVE_PATTERNS = ("gpt2", "gpt4", "llama3", "qwen2", "smollm", "whole", "metaspace")
GPT2_PATTERN: str = _C.pattern_string("gpt2")
GPT4_PATTERN: str = _C.pattern_string("gpt4")
# The regex of each native pattern, and other spellings of the same patterns (tiktoken's r50k/cl100k strings, HF
# ByteLevel's regex), select the native pre-tokenizer.
_PATTERN_ALIASES = {
    **{_C.pattern_string(name): name for name in NATIVE_PATTERNS},
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": "gpt2",
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": "gpt2",
}

# HF tokenizers runs Oniguruma (Ruby syntax), where `$` also matches before every newline and `{1,3}+` is not
# possessive but a repetition; these rewrites mean the same under Oniguruma as the originals under `regex`
# (`\s++` runs to the end of the text whenever `$` matches; nothing follows `\p{N}{1,3}` in its branch).
_HF_REWRITES = [(r"\p{N}{1,3}+", r"\p{N}{1,3}"), (r"\s++$", r"\s++\z")]


def _to_hf_regex(pat: str) -> str:
    for a, b in _HF_REWRITES:
        pat = pat.replace(a, b)
    return pat


_PATTERN_ALIASES[_to_hf_regex(GPT4_PATTERN)] = "gpt4"
_NORMALIZERS = ("NFC", "NFKC", "NFD", "NFKD")  # HF normalizer types fastllm applies (unicodedata's forms)
_SENTENCEPIECE = (
    "fastllm reads SentencePiece-style BPE tokenizer.json files (Llama 2, Mistral, TinyLlama, Gemma: Metaspace or "
    "Prepend/Replace('\u2581'), byte fallback) and byte-level BPE ones (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM)"
)
_META = "\u2581"  # SentencePiece's space

_MAX_ID = 2**28  # ids index dense tables (as in csrc/tokenizer/bpe.cpp): larger ones come from corrupt files
_SIDECAR_FORMAT = "fastllm-bpe"
_SIDECAR_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]
IdsLike = Union[Sequence[int], np.ndarray]


def _threads(threads) -> int:
    """A thread count: None -> fastllm's (set_num_threads); else an int in [1, 1024] (ValueError otherwise)."""
    if threads is None:
        return _C.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be an int, got {type(threads).__name__}")
    if not 1 <= threads <= _C.MAX_THREADS:
        raise ValueError(f"threads = {threads} is out of range [1, {_C.MAX_THREADS}]")
    return int(threads)


def _repair_surrogates(text: str) -> str:
    """tiktoken's policy: join valid surrogate pairs, replace lone surrogates by U+FFFD.

    >>> _repair_surrogates("a\\ud800b")
    'a\\ufffdb'
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level tokenizer.json files.

    >>> m = _bytes_to_unicode(); m[ord("a")], m[ord(" ")], len(m)
    ('a', 'Ġ', 256)
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]  # mapped to 256, 257, ... in byte order
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_B2U = _bytes_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}
# HF's byte-level pre-tokenizer (GPT-2's split) and decoder, as GPT-2's tokenizer.json writes them
_HF_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _read_ranks(path: PathLike) -> dict[bytes, int]:
    """Parse a tiktoken rank file (``base64(token) rank`` per line); errors name the file and line."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    ranks: dict[bytes, int] = {}
    seen_rank: dict[int, int] = {}  # rank -> its line
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: invalid base64 token {parts[0][:60]!r}") from e
        try:
            rank = int(parts[1])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: invalid rank {parts[1][:20]!r}") from e
        if not token or not 0 <= rank < _MAX_ID:
            raise ValueError(f"{path}:{lineno}: empty token or rank {rank} out of range [0, 2**28)")
        if token in ranks:
            raise ValueError(
                f"{path}:{lineno}: token {token!r} already has rank {ranks[token]} (line {seen_rank[ranks[token]]})"
            )
        if rank in seen_rank:
            raise ValueError(f"{path}:{lineno}: rank {rank} is used twice (line {seen_rank[rank]})")
        ranks[token] = rank
        seen_rank[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}:1: no tokens (empty or truncated file)")
    top = max(seen_rank)
    if top >= len(ranks) + (1 << 16):  # tables are sized by the largest id: a sparse file would take GBs
        raise ValueError(f"{path}:{seen_rank[top]}: rank {top} with only {len(ranks)} tokens: ranks must be "
                         f"dense (below {len(ranks) + (1 << 16)})")
    return ranks


def _core_of_ranks(ranks: dict[bytes, int], path: PathLike):
    """The native encoder of the ranks read from the rank file `path` (errors name it)."""
    try:
        return _C.BpeEncoder.from_ranks(list(ranks), list(ranks.values()))
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from e


class Tokenizer:
    """Byte-level BPE tokenizer with tiktoken semantics.

    Build it from tiktoken-style mergeable ranks, train it, or load it from a file.

    >>> ranks = {bytes([b]): b for b in range(256)}
    >>> ranks[b"ab"] = 256
    >>> tok = Tokenizer(ranks, pattern="gpt2", special_tokens={"<|endoftext|>": 257})
    >>> tok.encode("abc").tolist()
    [256, 99]
    >>> tok.n_vocab, tok.vocab_size
    (258, 258)
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        """`mergeable_ranks`: token bytes -> rank (= id), all 256 single bytes included, as tiktoken's
        ``Encoding(name, pat_str, mergeable_ranks, special_tokens)``. `pattern`: one of NATIVE_PATTERNS or a regex."""
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(
                f"mergeable_ranks must be a dict bytes -> int, got {type(mergeable_ranks).__name__}"
            )
        for t, r in mergeable_ranks.items():
            if not isinstance(t, bytes):
                raise TypeError(f"mergeable_ranks keys must be bytes, got {type(t).__name__}")
            if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 <= r < _MAX_ID:
                raise ValueError(f"mergeable_ranks[{t[:40]!r}] = {r!r} is not an int in [0, 2**28)")
        core = _C.BpeEncoder.from_ranks(list(mergeable_ranks), list(mergeable_ranks.values()))
        self._init(core, pattern, special_tokens)

    # -- construction helpers

    @classmethod
    def _from_core(cls, core, pattern: str, special_tokens: dict[str, int] | None) -> Tokenizer:
        self = cls.__new__(cls)
        self._init(core, pattern, special_tokens)
        return self

    def _init(self, core, pattern: str, special_tokens: dict[str, int] | None) -> None:
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be one of {NATIVE_PATTERNS} or a regex string, got {type(pattern).__name__}")
        self._pattern = _PATTERN_ALIASES.get(pattern, pattern)
        self._regex = None
        if self._pattern not in NATIVE_PATTERNS:
            try:
                import regex
            except ImportError as e:  # pragma: no cover
                raise ImportError("custom patterns need the `regex` module (pip install regex)") from e
            try:
                self._regex = regex.compile(self._pattern)
            except regex.error as e:
                raise ValueError(f"pattern is not a valid regex: {e}") from e
        special_tokens = dict(special_tokens or {})
        for s, i in special_tokens.items():
            if not isinstance(s, str):
                raise TypeError(f"special token names must be str, got {s!r}")
            if not s:
                raise ValueError("special token names must not be empty")
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
                raise TypeError(f"special token {s!r}: id must be an int, got {i!r}")
            if not 0 <= i < _MAX_ID:
                raise ValueError(f"special token {s!r}: id {i} is negative or too large (ids are in [0, 2**28))")
            core.add_special(s.encode("utf-8"), int(i))
        self._core = core
        self._special = {s: int(i) for s, i in special_tokens.items()}
        self._is_ranks = True  # tiktoken semantics (rank = id); False for HF merge-priority files
        self._normalizer: str | None = None  # a unicodedata form applied before encoding (HF normalizer)
        self._plain: frozenset[str] = frozenset()  # special tokens always matched (HF added tokens not "special")
        self._bos: int | None = None  # what HF's post-processor puts before every text
        self._strip_space = False  # decode drops one leading space (SentencePiece files' Strip decoder)
        self._hf_doc: dict | None = None  # the tokenizer.json a SentencePiece-style tokenizer came from (save_hf)
        self._fallback: frozenset[int] = frozenset()  # SentencePiece's byte-fallback ids
        self._strip: dict[str, str] = {}  # HF added tokens' lstrip / rstrip: name -> "l" | "r" | "lr"

    def _set_hf_options(self, normalizer: str | None = None, plain_tokens=(), bos_token: int | None = None,
                        strip: dict[str, str] | None = None) -> None:
        """The HF tokenizer.json features beyond tiktoken's (see the module doc); ValueError on bad values.
        strip: special token -> "l", "r" or "lr": the whitespace it takes with it (HF's lstrip / rstrip)."""
        if normalizer not in (None, *_NORMALIZERS):
            raise ValueError(f"normalizer must be one of {_NORMALIZERS} or None, got {normalizer!r}")
        plain = frozenset(plain_tokens)
        strip = dict(strip or {})
        for t in plain | set(strip):
            if t not in self._special:
                raise ValueError(f"added token {t!r} is not one of the tokenizer's special tokens")
        for t, v in strip.items():
            if v not in ("l", "r", "lr"):
                raise ValueError(f"strip of {t!r} must be 'l', 'r' or 'lr', got {v!r}")
            self._core.set_strip(self._special[t], "l" in v, "r" in v)
        if bos_token is not None and bos_token not in self._special.values():
            raise ValueError(f"bos_token {bos_token!r} is not the id of a special token")
        self._normalizer, self._plain, self._bos, self._strip = normalizer, plain, bos_token, strip

    # -- properties

    @property
    def pattern(self) -> str:
        """The native pattern's name (NATIVE_PATTERNS) or the custom regex string."""
        return self._pattern

    @property
    def pat_str(self) -> str:
        """The regex string of the pattern (what tiktoken calls pat_str)."""
        return _C.pattern_string(self._pattern) if self._pattern in NATIVE_PATTERNS else self._pattern

    @property
    def bos_token(self) -> int | None:
        """The id a Hugging Face tokenizer puts before every text (Llama 3's <|begin_of_text|>), else None.
        `encode` does not add it; prompts for the model should start with it (fastllm.sample does)."""
        return self._bos

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id (a copy)."""
        return dict(self._special)

    @property
    def plain_tokens(self) -> frozenset[str]:
        """The special tokens that are text to the model (HF added tokens not marked "special", like Qwen's
        <tool_call>): `encode` always matches them, and they may be written like any text."""
        return self._plain

    @property
    def eot_token(self) -> int | None:
        """Id of ``<|endoftext|>`` if it is a special token, else None."""
        return self._special.get("<|endoftext|>")

    @property
    def start_token(self) -> int | None:
        """The id a new document starts with: the BOS (Llama 3's <|begin_of_text|>), else <|endoftext|> (which
        fastllm's shards put before every document), else None."""
        return self._bos if self._bos is not None else self.eot_token

    @property
    def n_vocab(self) -> int:
        """Largest id + 1 (the embedding table size); equals `vocab_size` unless ids have gaps."""
        return int(self._core.n_vocab)

    @property
    def vocab_size(self) -> int:
        """Number of tokens: byte tokens + merges + special tokens."""
        return int(self._core.n_tokens)

    def __repr__(self) -> str:
        pat = self._pattern if self._regex is None else "custom"
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pattern={pat!r}, special_tokens={len(self._special)})"
        )

    # -- encoding

    def _normalize(self, text: str) -> str:
        if self._normalizer is None:
            return text
        import unicodedata

        return unicodedata.normalize(self._normalizer, _repair_if_needed(text))

    def _allowed_ids(
        self,
        text_or_texts: str | list[str],
        allowed_special: Literal["all"] | Collection[str],
        disallowed_special: Literal["all"] | Collection[str],
    ) -> list[int]:
        """tiktoken's special-token policy: check disallowed ones are absent, return the allowed ids."""
        if allowed_special == "all":
            allowed = set(self._special)
        else:  # names that are not special tokens of this tokenizer allow nothing (as in tiktoken)
            allowed = self._special_names(allowed_special, "allowed_special", "set") & set(self._special) | self._plain
        if disallowed_special == "all":
            disallowed = set(self._special) - allowed
        else:  # any string: the text may not contain it (as in tiktoken)
            disallowed = self._special_names(disallowed_special, "disallowed_special", "collection") - self._plain
        if disallowed:
            texts = [text_or_texts] if isinstance(text_or_texts, str) else text_or_texts
            for text in texts:
                hits = [(text.find(s), -len(s), s) for s in disallowed if s in text]
                if hits:
                    tok = min(hits)[2]
                    raise ValueError(
                        f"Encountered text corresponding to disallowed special token {tok!r}. Pass it in "
                        "allowed_special to encode it as a special token, or disallowed_special=() to "
                        "encode it as ordinary text."
                    )
        return sorted(self._special[s] for s in allowed)

    @staticmethod
    def _special_names(names: Collection[str], arg: str, kind: str) -> set[str]:
        """The set of strings `names` given as the argument `arg` (other than "all"), checked."""
        if isinstance(names, str):
            raise TypeError(f"{arg} must be 'all' or a {kind} of str")
        names = set(names)
        for s in names:
            if not isinstance(s, str):
                raise TypeError(f"{arg} must be 'all' or a {kind} of str, got an element {s!r}")
        return names

    def _encode_custom(self, text: str, allowed_ids: list[int], starts: list[int] | None = None) -> np.ndarray:
        """Custom patterns: Python regex finds the chunks (between allowed specials), C++ encodes them. `starts`
        (if given) gets each token's first byte in text, as encode_offsets."""
        parts: list[np.ndarray] = []

        def ordinary(a: int, b: int) -> None:  # text[a:b], between special tokens
            ids = self._core.encode_chunks(self._regex.findall(text[a:b]))
            parts.append(ids)
            if starts is not None:  # (the tokens spell the stretch: byte-level BPE)
                sizes = np.asarray([len(self._core.token_bytes(i)) for i in ids.tolist()], np.int64)
                starts.extend((len(text[:a].encode("utf-8")) + np.cumsum(sizes) - sizes).tolist())

        pos = 0
        if allowed_ids:
            names = [s for s, i in self._special.items() if i in set(allowed_ids)]
            rx, order = _specials_regex(frozenset(names), frozenset((s, self._strip.get(s, "")) for s in names))
            for m in rx.finditer(text):
                if m.start() > pos:
                    ordinary(pos, m.start())
                parts.append(np.array([self._special[order[int(m.lastgroup[1:])]]], np.int32))
                if starts is not None:
                    starts.append(len(text[: m.start()].encode("utf-8")))
                pos = m.end()
        if pos < len(text) or not parts:
            ordinary(pos, len(text))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _encode_native(self, text: str, allowed_ids: list[int]) -> np.ndarray:
        if self._regex is not None:
            return self._encode_custom(text, allowed_ids)
        return self._core.encode(text, self._pattern, allowed_ids)

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> np.ndarray:
        """Encode text to ids (int32 array), with tiktoken's special-token rules: text matching an allowed
        special token becomes its id; text matching a disallowed one raises ValueError naming it; other
        special tokens (disallowed_special=()) are encoded as ordinary text.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|eot|>": 256})
        >>> tok.encode("hi<|eot|>", allowed_special={"<|eot|>"}).tolist()
        [104, 105, 256]
        >>> tok.encode("hi<|eot|>", disallowed_special=()).tolist()[:3]
        [104, 105, 60]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = self._normalize(text)
        allowed = self._allowed_ids(text, allowed_special, disallowed_special)
        try:
            return self._encode_native(text, allowed)
        except UnicodeEncodeError:
            return self._encode_native(_repair_surrogates(text), allowed)

    def encode_offsets(
        self, text: str, allowed_special: Literal["all"] | Collection[str] = "all"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, starts): `encode(text, allowed_special)` and the byte offset in the UTF-8 of the text (normalized
        if the tokenizer normalizes) where each token starts, as HF's offset mapping (start only): the whitespace a
        special token with lstrip/rstrip takes belongs to it, and the space a SentencePiece tokenizer puts before
        a stretch of text starts where that text starts.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)} | {b"ab": 256})
        >>> [a.tolist() for a in tok.encode_offsets("ab\u00e9")]
        [[256, 195, 169], [0, 2, 3]]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = _repair_if_needed(self._normalize(text))
        allowed = self._allowed_ids(text, allowed_special, disallowed_special=())
        if self._regex is None:
            return self._core.encode_offsets(text, self._pattern, allowed)
        starts: list[int] = []
        ids = self._encode_custom(text, allowed, starts)
        return ids, np.asarray(starts, np.int64)

    def encode_ordinary(self, text: str) -> np.ndarray:
        """Encode text, treating special tokens as ordinary text.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)})
        >>> tok.encode_ordinary("ab").tolist()
        [97, 98]
        """
        return self.encode(text, allowed_special=frozenset(), disallowed_special=())

    def encode_prompt(self, text: str) -> np.ndarray:
        """A text prompt's ids as the model should see them, as HF's ``tokenizer(text)`` encodes it (and vLLM a
        completions prompt): special tokens in the text are matched, and the BOS token (`bos_token`, e.g. Llama 3's
        <|begin_of_text|>) goes first unless the text starts with it. An empty text is a new document: [bos], else
        [<|endoftext|>], else [].

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
        >>> tok.encode_prompt("").tolist(), tok.encode_prompt("a<|endoftext|>").tolist()
        ([256], [97, 256])
        """
        ids = self.encode(text, allowed_special="all")
        if self._bos is not None and (ids.size == 0 or ids[0] != self._bos):
            return np.concatenate([np.asarray([self._bos], np.int32), ids])
        if ids.size == 0 and self.start_token is not None:
            return np.asarray([self.start_token], np.int32)
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        threads: int | None = None,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[np.ndarray]:
        """encode() of each text, in parallel over texts on `threads` native threads (default: fastllm's
        thread count) with the GIL released.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)})
        >>> [a.tolist() for a in tok.encode_batch(["a", "bc"], threads=2)]
        [[97], [98, 99]]
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        threads = _threads(threads)
        texts = [self._normalize(t) for t in texts]
        allowed = self._allowed_ids(texts, allowed_special, disallowed_special)
        if self._regex is not None:
            return [self._encode_custom(_repair_if_needed(t), allowed) for t in texts]
        try:
            return self._core.encode_batch(texts, self._pattern, allowed, threads)
        except UnicodeEncodeError:
            texts = [_repair_if_needed(t) for t in texts]
            return self._core.encode_batch(texts, self._pattern, allowed, threads)

    # -- decoding

    @staticmethod
    def _ids_array(ids: IdsLike) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"ids must be a 1-D sequence of ints, got ndim={a.ndim}")
        if a.size == 0:
            return np.zeros(0, np.int64)
        if a.dtype.kind == "O" and all(isinstance(x, int) and not isinstance(x, bool) for x in a.tolist()):
            bad = next(x for x in a.tolist() if not -(2**63) <= x < 2**63)  # ints too big for int64
            raise ValueError(f"token id {bad} is out of range")
        if a.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {a.dtype}")
        if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.max() > np.iinfo(np.int64).max:
            raise ValueError(f"token id {int(a.max())} is out of range")
        return a.astype(np.int64, copy=False)

    def decode_bytes(self, ids: IdsLike) -> bytes:
        """Concatenated bytes of the tokens; ValueError naming the first id out of range.

        >>> Tokenizer({bytes([b]): b for b in range(256)}).decode_bytes([104, 105])
        b'hi'
        """
        return self._core.decode_bytes(self._ids_array(ids))

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids that ``decode(..., skip_special_tokens=True)`` drops: the special tokens' ids except those of
        `plain_tokens` (HF added tokens not marked special, like Qwen's <tool_call>, which HF's decode keeps)."""
        return frozenset(i for s, i in self._special.items() if s not in self._plain)

    def decode(self, ids: IdsLike, errors: str = "replace", skip_special_tokens: bool = False) -> str:
        """Decode ids to text. Bytes that are not valid UTF-8 become U+FFFD (errors="replace", the default)
        or raise ValueError naming the byte position and token (errors="strict"); any `bytes.decode` handler
        works. skip_special_tokens: leave out the special tokens (`special_ids`), as HF's
        ``decode(ids, skip_special_tokens=True)`` does; the bytes around them join as if they were not there.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|eot|>": 256})
        >>> tok.decode([104, 105, 255])
        'hi\\ufffd'
        >>> tok.decode([104, 256, 105]), tok.decode([104, 256, 105], skip_special_tokens=True)
        ('h<|eot|>i', 'hi')
        """
        arr = self._ids_array(ids)
        kept = np.flatnonzero(~np.isin(arr, list(self.special_ids))) if skip_special_tokens else None
        text_ids = arr if kept is None else arr[kept]
        try:
            text = self._core.decode(text_ids, errors)
            if self._fallback and errors == "replace" and "\ufffd" in text:
                text = self._decode_runs(text_ids)
            return self._stripped(text)
        except UnicodeDecodeError as e:
            ends = np.cumsum([len(self._core.token_bytes(i)) for i in text_ids.tolist()])
            k = int(np.searchsorted(ends, e.start, side="right"))  # the token holding the bad byte
            k = k if kept is None else int(kept[k])  # (its index in `ids`)
            raise ValueError(
                f"ids do not decode to valid UTF-8: {e.reason} at byte {e.start} "
                f"(token index {k}, id {int(arr[k])})"
            ) from e

    def _decode_runs(self, arr: np.ndarray) -> str:
        """HF's ByteFallback decoder: each run of byte-fallback tokens is its text if it is valid UTF-8, else one
        U+FFFD per token (Python's "replace" keeps the valid bytes of an invalid run)."""
        pieces, run = [], bytearray()
        for i in arr.tolist() + [-1]:
            if i in self._fallback:
                run += self._core.token_bytes(i)
                continue
            if run:
                pieces.append(byte_run_text(run))
                run.clear()
            if i >= 0:
                pieces.append(self._core.token_bytes(i).decode("utf-8", "replace"))
        return "".join(pieces)

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """The ids of a SentencePiece-style tokenizer's byte-fallback tokens <0x00>..<0xFF> (empty otherwise): a
        run of them decodes as a whole (see `decode`)."""
        return self._fallback

    @property
    def strips_leading_space(self) -> bool:
        """Whether `decode` drops one leading space (SentencePiece files' Strip decoder: the token of a text's first
        word carries the space before it)."""
        return self._strip_space

    def _stripped(self, text: str) -> str:
        """SentencePiece files decode with one leading space stripped (their tokens carry the space before a word)."""
        return text[1:] if self._strip_space and text.startswith(" ") else text

    def decode_batch(
        self, batch: Sequence[IdsLike], errors: str = "replace", threads: int | None = None,
        skip_special_tokens: bool = False,
    ) -> list[str]:
        """decode() of each id sequence, the byte concatenation done in parallel on `threads` native threads.

        >>> tok = Tokenizer({bytes([b]): b for b in range(256)})
        >>> tok.decode_batch([[104, 105], [], np.array([33])])
        ['hi', '', '!']
        """
        arrays = [self._ids_array(ids) for ids in batch]
        threads = _threads(threads)
        if skip_special_tokens:
            skip = list(self.special_ids)
            arrays = [a[~np.isin(a, skip)] for a in arrays]
        try:
            texts = self._core.decode_batch(arrays, errors, threads)
            return [self.decode(a) if self._fallback and errors == "replace" and "\ufffd" in t else self._stripped(t)
                    for a, t in zip(arrays, texts)]
        except UnicodeDecodeError:
            if skip_special_tokens:  # (the position in the caller's ids)
                return [self.decode(ids, errors, True) for ids in batch]
            return [self.decode(a, errors) for a in arrays]  # raises with the position

    def token_to_bytes(self, id: int) -> bytes:
        """The bytes of one token (special tokens: their UTF-8).

        >>> Tokenizer({bytes([b]): b for b in range(256)}).token_to_bytes(65)
        b'A'
        """
        if not isinstance(id, (int, np.integer)) or isinstance(id, bool):
            raise TypeError(f"id must be an int, got {type(id).__name__}")
        return self._core.token_bytes(int(id))

    # -- training

    @classmethod
    def train(
        cls,
        texts_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        progress: bool = True,
        threads: int | None = None,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer of `vocab_size` tokens (256 bytes + merges + special tokens).

        `texts_or_paths`: a text, a path, or an iterable of them. Paths (``os.PathLike``, e.g. pathlib.Path) are
        read as UTF-8 (a leading BOM dropped, undecodable bytes -> U+FFFD); a ``str`` is always text. Special
        tokens are cut out of the texts before counting. Chunk counting runs on `threads` native threads
        (default: fastllm's thread count); merges are learned incrementally, highest pair count first, ties to
        the smallest (left id, right id); a pair whose bytes are already a token is skipped. Training stops
        early (smaller vocabulary) when no pair is left. `progress` shows a tqdm bar of merges.

        >>> tok = Tokenizer.train(["aaabdaaabac"], vocab_size=259, special_tokens=(), progress=False)
        >>> [tok.token_to_bytes(i) for i in range(256, 259)]
        [b'aa', b'ab', b'aaab']
        """
        if isinstance(texts_or_paths, (str, os.PathLike)):
            texts_or_paths = [texts_or_paths]
        texts: list[str] = []
        for i, item in enumerate(texts_or_paths):
            if isinstance(item, os.PathLike):
                with open(item, encoding="utf-8-sig", errors="replace") as f:
                    texts.append(f.read())
            elif isinstance(item, str):
                texts.append(item)
            else:
                raise TypeError(
                    f"texts_or_paths[{i}] must be a str (text) or os.PathLike, got {type(item).__name__}"
                )
        texts = [_repair_if_needed(t) for t in texts]
        specials = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
        for i, s in enumerate(specials):
            if not isinstance(s, str) or not s:
                raise ValueError(f"special_tokens[{i}] must be a non-empty str, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens has duplicates: {specials}")
        vocab_size = int(vocab_size)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be >= 256 + {len(specials)} special tokens, got {vocab_size}")
        threads = _threads(threads)
        pat = _PATTERN_ALIASES.get(pattern, pattern)

        bar = None
        callback = None
        if progress and n_merges > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_merges, desc="bpe merges", unit="merge")

            def callback(done: int, total: int) -> None:
                bar.update(done - bar.n)

        every = max(1, n_merges // 200)
        try:
            if pat in NATIVE_PATTERNS:
                merges = _C.train_bpe(texts, pat, specials, n_merges, threads, callback, every)
            else:
                probe = cls._from_core(
                    _C.BpeEncoder.from_ranks([bytes([b]) for b in range(256)], list(range(256))), pat, None
                )
                chunks: list[str] = []
                for t in texts:
                    for piece in _split_on(t, specials):
                        chunks.extend(probe._regex.findall(piece))
                merges = _C.train_bpe_chunks(chunks, n_merges, callback, every)
        finally:
            if bar is not None:
                bar.close()
        tokens = [bytes([b]) for b in range(256)]
        for a, b in merges:
            tokens.append(tokens[a] + tokens[b])
        core = _C.BpeEncoder.from_ranks(tokens, list(range(len(tokens))))
        return cls._from_core(core, pat, {s: len(tokens) + k for k, s in enumerate(specials)})

    # -- files

    def _regular_tokens(self) -> list[tuple[int, bytes]]:
        core = self._core
        return [
            (i, core.token_bytes(i))
            for i in range(core.n_vocab)
            if core.valid_id(i) and not core.is_special(i)
        ]

    def _require_ranks(self, what: str) -> None:
        if not self._is_ranks:
            raise ValueError(
                f"{what}: this tokenizer merges by HF merge priority (loaded from a tokenizer.json), which "
                "the tiktoken rank format cannot express; use save_hf"
            )

    def save_tiktoken(self, path: PathLike) -> None:
        """Write the mergeable ranks in tiktoken's format: ``base64(token) rank`` per line, by rank
        (readable by ``tiktoken.load.load_tiktoken_bpe``). Pattern and special tokens are not stored (see
        `save`)."""
        self._require_ranks("save_tiktoken")
        lines = [base64.b64encode(t) + b" " + str(i).encode() for i, t in self._regular_tokens()]
        with atomic_write(path) as f:
            f.write(b"\n".join(lines) + b"\n")

    @classmethod
    def load_tiktoken(
        cls, path: PathLike, pattern: str = "gpt4", special_tokens: dict[str, int] | None = None
    ) -> Tokenizer:
        """Read a tiktoken rank file (e.g. written by `save_tiktoken` or shipped with tiktoken).

        Corrupt or truncated files raise ValueError naming the file and line."""
        return cls._from_core(_core_of_ranks(_read_ranks(path), path), pattern, special_tokens)

    def save(self, path: PathLike) -> None:
        """Save to `path` (tiktoken rank file, see `save_tiktoken`) plus the sidecar ``<path>.json`` holding
        the pattern, the special tokens and the number of ranks: ``{"format": "fastllm-bpe", "version": 1,
        "pattern": "gpt4" | <regex>, "special_tokens": {name: id}, "n_ranks": N}`` (plus, for a tokenizer read from
        a Hugging Face file, "normalizer", "plain_tokens", "bos_token" and "strip" when set). Both written atomically.

        >>> import tempfile, os
        >>> tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|eot|>": 256})
        >>> d = tempfile.mkdtemp(); tok.save(os.path.join(d, "t.tiktoken"))
        >>> Tokenizer.load(os.path.join(d, "t.tiktoken")).special_tokens
        {'<|eot|>': 256}
        """
        self._require_ranks("save")
        side = {
            "format": _SIDECAR_FORMAT,
            "version": _SIDECAR_VERSION,
            "pattern": self._pattern,
            "special_tokens": self._special,
            "n_ranks": len(self._regular_tokens()),
        }
        extras = {"normalizer": self._normalizer, "plain_tokens": sorted(self._plain), "bos_token": self._bos,
                  "strip": self._strip}
        side.update({k: v for k, v in extras.items() if v not in (None, [], {})})
        self.save_tiktoken(path)
        with atomic_write(os.fspath(path) + ".json") as f:
            f.write((json.dumps(side, indent=1, ensure_ascii=False) + "\n").encode())

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Load what `save` wrote (the rank file and its ``.json`` sidecar)."""
        side_path = os.fspath(path) + ".json"
        side = read_json(side_path)
        if not isinstance(side, dict) or side.get("format") != _SIDECAR_FORMAT:
            raise ValueError(
                f"{side_path}:1: not a fastllm tokenizer sidecar (format != {_SIDECAR_FORMAT!r})"
            )
        if side.get("version") != _SIDECAR_VERSION:
            raise ValueError(f"{side_path}:1: unsupported version {side.get('version')!r}")
        for key, typ in (("pattern", str), ("special_tokens", dict), ("n_ranks", int)):
            if not isinstance(side.get(key), typ):
                raise ValueError(f"{side_path}:1: missing or bad {key!r}")
        for name, i in side["special_tokens"].items():  # tables are sized by the largest id (see _read_ranks)
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < side["n_ranks"] + (1 << 16):
                raise ValueError(f"{side_path}:1: special token {name!r} has id {i!r}: ids must be dense "
                                 f"(below n_ranks + 65536 = {side['n_ranks'] + (1 << 16)})")
        ranks = _read_ranks(path)
        if len(ranks) != side["n_ranks"]:
            raise ValueError(
                f"{os.fspath(path)}:{len(ranks)}: {len(ranks)} ranks but the sidecar says {side['n_ranks']} "
                "(truncated file?)"
            )
        core = _core_of_ranks(ranks, path)
        try:
            tok = cls._from_core(core, side["pattern"], side["special_tokens"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{side_path}:1: {e}") from e
        try:
            tok._set_hf_options(side.get("normalizer"), side.get("plain_tokens") or (), side.get("bos_token"),
                                side.get("strip"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{side_path}:1: {e}") from None
        return tok

    def save_hf(self, path: PathLike) -> None:
        """Write a GPT-2-style HF ``tokenizer.json`` (BPE model over the byte-level alphabet, vocab + merges,
        special tokens as added_tokens, ByteLevel pre-tokenizer and decoder) that ``tokenizers.Tokenizer
        .from_file`` loads and encodes to the same ids. tiktoken semantics are expressed as
        ``ignore_merges=true`` (a chunk that is a token is taken whole) and one merge per split of every token
        into two tokens, ordered by the token's rank. A SentencePiece-style tokenizer writes the file it was read
        from."""
        if self._hf_doc is not None:
            with atomic_write(path) as f:
                f.write(json.dumps(self._hf_doc, ensure_ascii=False).encode("utf-8"))
            return
        vocab = {_hf_token(t): i for i, t in self._regular_tokens()}
        # HF gives an added token that model.vocab lacks the next id after the vocab's: one inside their range
        # (GPT-NeoX's <|endoftext|> = 0, <|padding|> = 1) is listed in the vocab too, as HF's own files list it
        top = max(vocab.values(), default=-1)
        vocab.update({s: i for s, i in self._special.items() if i < top})
        vocab = dict(sorted(vocab.items(), key=lambda x: x[1]))
        merges = [[_hf_token(self._core.token_bytes(a)), _hf_token(self._core.token_bytes(b))]
                  for a, b, _prio, _res in self._core.pairs()]
        if self._pattern == "gpt2":
            pre = _HF_BYTE_LEVEL
        elif self._pattern == "smollm":
            pre = {"type": "Sequence",
                   "pretokenizers": [{"type": "Digits", "individual_digits": True}, _HF_BYTE_LEVEL]}
        else:
            pre = {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": _to_hf_regex(self.pat_str)},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {**_HF_BYTE_LEVEL, "use_regex": False},
                ],
            }
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                _hf_added_token(i, s, special=s not in self._plain, strip=self._strip.get(s, ""))
                for s, i in sorted(self._special.items(), key=lambda x: x[1])
            ],
            "normalizer": None if self._normalizer is None else {"type": self._normalizer},
            "pre_tokenizer": pre,
            "post_processor": self._hf_post_processor(),
            "decoder": {**_HF_BYTE_LEVEL, "add_prefix_space": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": bool(self._core.whole_chunk_lookup),
                "vocab": vocab,
                "merges": merges,
            },
        }
        with atomic_write(path) as f:
            f.write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))

    def _hf_post_processor(self) -> dict | None:
        """HF's TemplateProcessing that puts bos_token before every text (None without one)."""
        if self._bos is None:
            return None
        name = next(s for s, i in self._special.items() if i == self._bos)
        return {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": name, "type_id": 0}},
                                                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {name: {"id": name, "ids": [self._bos], "tokens": [name]}}}

    @classmethod
    def from_pretrained(cls, path: PathLike) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder: ``tokenizer.json``, else GPT-2's classic
        ``vocab.json`` + ``merges.txt`` (special tokens from ``tokenizer_config.json``, default
        ``<|endoftext|>``), else a fastllm ``tokenizer.tiktoken``, else a SentencePiece BPE ``tokenizer.model``
        (converted as transformers' LlamaConverter does, with ``tokenizer_config.json``'s settings: fastllm.spm;
        needs the sentencepiece and protobuf packages). `path` may also name one of those files. Ids are those
        HF tokenizers gives for the same files."""
        path = os.fspath(path)
        if os.path.isfile(path):
            name, folder = os.path.basename(path), os.path.dirname(path)
            if name == "vocab.json" or name == "merges.txt":
                return load_vocab_merges(folder)
            if name == "tokenizer.model":
                return cls._from_sentencepiece_model(folder)
            return cls.load_hf(path) if name.endswith(".json") else cls.load(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
        found = find_hf_tokenizer(path)
        if found is not None:
            return cls.load_hf(found) if found.name == "tokenizer.json" else load_vocab_merges(path)
        rank_file = os.path.join(path, "tokenizer.tiktoken")
        if os.path.exists(rank_file + ".json"):
            return cls.load(rank_file)
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            return cls._from_sentencepiece_model(path)
        raise FileNotFoundError(
            f"{path}: no tokenizer.json, vocab.json + merges.txt, tokenizer.tiktoken or tokenizer.model in this folder"
        )

    @classmethod
    def _from_sentencepiece_model(cls, folder: str) -> Tokenizer:
        """A folder's SentencePiece tokenizer.model (no tokenizer.json), converted as transformers' LlamaConverter
        converts it (fastllm.spm; needs the sentencepiece and protobuf packages)."""
        from .spm import sentencepiece_folder_doc

        model = os.path.join(folder, "tokenizer.model")
        return cls._from_hf_doc(sentencepiece_folder_doc(folder), f"{model} (converted to tokenizer.json)")

    @classmethod
    def load_hf(cls, path: PathLike) -> Tokenizer:
        """Read a byte-level BPE ``tokenizer.json`` (written by `save_hf`, by HF tokenizers' own trainer, or shipped
        with a GPT-2, Llama 3, Qwen2/2.5/3 or SmolLM checkpoint: then tokens merge by the merges' order, as HF
        does). Added tokens become special tokens (those HF marks non-special are always matched); a unicode
        normalizer and a BOS post-processor are kept (see the module doc). What fastllm cannot reproduce exactly
        raises ValueError naming the field: other normalizers and pre-tokenizers, add_prefix_space, dropout, added
        tokens with single_word (lstrip/rstrip are kept). SentencePiece-style files (Llama 2, TinyLlama, Mistral 7B:
        Metaspace or Prepend/Replace, byte fallback, <unk>) load too, see the module doc."""
        path = os.fspath(path)
        return cls._from_hf_doc(read_json(path), path)

    @classmethod
    def _from_hf_doc(cls, doc, path: str) -> Tokenizer:
        """load_hf on a parsed tokenizer.json document; errors name `path`."""

        def bad(msg: str) -> ValueError:
            return ValueError(f"{path}:1: {msg}")

        model = doc.get("model") if isinstance(doc, dict) else None
        if (
            not isinstance(model, dict)
            or model.get("type", "BPE") != "BPE"
            or not isinstance(model.get("vocab"), dict)
        ):
            raise bad("not a BPE tokenizer.json (model.type must be 'BPE' with a vocab)")
        sp = _SentencePiece.of(doc, bad) if model.get("byte_fallback") or _is_sentencepiece(doc) else None
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") + (() if sp else ("unk_token",)):
            if model.get(key) not in (None, ""):
                raise bad(f"model.{key}={model.get(key)!r} is not supported")
        normalizer = None if sp else _hf_normalizer(doc.get("normalizer"), bad)
        pattern = sp.pattern if sp else _hf_pattern(doc.get("pre_tokenizer"), bad)

        def token_bytes(piece: str) -> bytes:  # KeyError: not in the byte-level alphabet
            return piece.replace(_META, " ").encode("utf-8") if sp else bytes(_U2B[c] for c in piece)

        added = doc.get("added_tokens") or []
        specials: dict[str, int] = {}
        plain: list[str] = []  # added tokens HF does not mark special: matched in any text
        strip: dict[str, str] = {}
        for t in added:
            if (
                not isinstance(t, dict)
                or not isinstance(t.get("content"), str)
                or not t["content"]
                or not isinstance(t.get("id"), int)
                or not 0 <= t["id"] < _MAX_ID
            ):
                raise bad(f"bad added_tokens entry {t!r}")
            if t.get("single_word"):
                raise bad(f"added token {t['content']!r} has single_word=true, which is not supported")
            if specials.get(t["content"], t["id"]) != t["id"]:
                raise bad(f"added token {t['content']!r} has two ids, {specials[t['content']]} and {t['id']}")
            specials[t["content"]] = t["id"]
            if t.get("lstrip") or t.get("rstrip"):  # (Phi-3's tokens take the whitespace after them)
                strip[t["content"]] = "l" * bool(t.get("lstrip")) + "r" * bool(t.get("rstrip"))
            if t.get("special") is False:
                plain.append(t["content"])
        special_of_id = {i: s for s, i in specials.items()}
        bos = _hf_bos(doc.get("post_processor"), specials, bad)

        tokens, ids = [], []
        byte_ids = [-1] * 256  # SentencePiece's byte-fallback tokens <0x00>..<0xFF>
        for s, i in model["vocab"].items():
            if not isinstance(i, int) or not 0 <= i < _MAX_ID:
                raise bad(f"vocab id of {s!r} is not an int in [0, 2**28): {i!r}")
            if i in special_of_id:  # GPT-2's files list <|endoftext|> in both; a different token is an error
                if s != special_of_id[i]:
                    raise bad(f"id {i} is both the vocab token {s!r} and the added token {special_of_id[i]!r}")
                continue
            if sp and sp.byte_fallback and _BYTE_PIECE.fullmatch(s):
                byte_ids[int(s[3:5], 16)] = i
                continue
            try:
                tokens.append(token_bytes(s))
            except KeyError:
                raise bad(f"vocab token {s!r} is not in the byte-level alphabet") from None
            ids.append(i)
        index = dict(zip(tokens, ids))
        merges = []
        for k, m in enumerate(model.get("merges") or []):
            parts = m.split(" ") if isinstance(m, str) else m
            if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
                raise bad(f"merge {k} is malformed: {m!r}")
            try:
                a, b = (token_bytes(p) for p in parts)
            except KeyError:
                raise bad(f"merge {k} {m!r} is not in the byte-level alphabet") from None
            if a not in index or b not in index:
                raise bad(f"merge {k} {m!r} uses a token missing from the vocab (or a byte-fallback token)")
            merges.append((index[a], index[b]))
        ignore_merges = bool(model.get("ignore_merges", False))
        core = None
        is_ranks = False
        if ignore_merges and not sp and len(index) >= 256 and all(bytes([x]) in index for x in range(256)):
            # Written with tiktoken semantics (save_hf, Llama 3)? Then use them exactly (rank = id).
            try:
                cand = _C.BpeEncoder.from_ranks(tokens, ids)
            except ValueError:
                cand = None  # from_merges below reports the problem
            if cand is not None and [(a, b) for a, b, _p, _r in cand.pairs()] == merges:
                core, is_ranks = cand, True
        if core is None:
            try:
                core = _C.BpeEncoder.from_merges(tokens, ids, merges, ignore_merges)
                if sp:
                    core.set_sentencepiece(byte_ids, sp.unk_id(model, specials, bad), sp.fuse_unk, sp.prefix)
            except ValueError as e:
                raise bad(str(e)) from e
        try:
            tok = cls._from_core(core, pattern, specials)
            tok._set_hf_options(normalizer, plain, bos, strip)
        except ValueError as e:
            raise bad(str(e)) from e
        tok._is_ranks = is_ranks
        if sp:
            tok._strip_space, tok._hf_doc = sp.strip, doc
            tok._fallback = frozenset(i for i in byte_ids if i >= 0)
        return tok


def byte_run_text(run: bytes) -> str:
    """A run of byte-fallback tokens (one byte each) as HF's ByteFallback decoder gives it."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _hf_token(token: bytes) -> str:
    """A token's bytes in the byte-level alphabet of tokenizer.json files."""
    return "".join(_B2U[b] for b in token)


def _hf_added_token(id: int, content: str, special: bool, strip: str = "") -> dict:
    """An entry of a tokenizer.json's added_tokens (matched as it is, no normalization; `strip` "l" / "r": with
    the whitespace to its left / right)."""
    return {"id": id, "content": content, "single_word": False, "lstrip": "l" in strip, "rstrip": "r" in strip,
            "normalized": False, "special": special}


def _repair_if_needed(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _repair_surrogates(text)


def _split_on(text: str, specials: Sequence[str]) -> list[str]:
    """Pieces of text between occurrences of the special tokens (used for training with custom patterns)."""
    if not specials:
        return [text]
    out, pos = [], 0
    for m in _specials_regex(frozenset(specials))[0].finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
    return out + [text[pos:]]


# Rust's char::is_whitespace (Unicode White_Space): what HF's lstrip / rstrip take (as whitespace_at in bpe.cpp)
_WHITE_SPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*"


@functools.lru_cache(maxsize=64)
def _specials_regex(names: frozenset[str], strip: frozenset[tuple[str, str]] = frozenset()):
    """(A compiled regex matching any of the special tokens `names`, the longest first, with the whitespace `strip`
    gives them (name, "l" | "r" | "lr"); the names in the order of its groups g0, g1, ...)."""
    import regex

    flags, order = dict(strip), sorted(names, key=lambda s: (-len(s), s))
    alts = [(_WHITE_SPACE if "l" in flags.get(s, "") else "") + f"(?:{regex.escape(s)})" +
            (_WHITE_SPACE if "r" in flags.get(s, "") else "") for s in order]  # fmt: skip
    return regex.compile("|".join(f"(?P<g{k}>{a})" for k, a in enumerate(alts))), order


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback token, as HF's BPE names them


@dataclass(frozen=True)
class _SentencePiece:
    """What a SentencePiece-style tokenizer.json asks for, in the terms of the native encoder
    (BpeEncoder.set_sentencepiece): pattern "whole" or "metaspace", a prefix space rule, and the decoder's
    strip of one leading space."""

    pattern: str
    prefix: str  # "none" | "first" | "always" | "every"
    strip: bool
    byte_fallback: bool
    fuse_unk: bool
    unk: str | None

    @classmethod
    def of(cls, doc: dict, bad) -> _SentencePiece:
        """The options of `doc`; ValueError (from `bad`) naming what fastllm cannot reproduce exactly."""
        model, norm, pre, dec = doc["model"], doc.get("normalizer"), doc.get("pre_tokenizer"), doc.get("decoder")
        # Llama 2's legacy files: normalizer Sequence[Prepend('▁'), Replace(' ', '▁')] and no pre-tokenizer;
        # later ones (transformers' legacy=False): a Metaspace pre-tokenizer and no normalizer.
        steps = _items(norm, "normalizers")
        kinds = [n.get("type") if isinstance(n, dict) else None for n in steps]
        known = ({"type": "Prepend", "prepend": _META},
                 {"type": "Replace", "pattern": {"String": " "}, "content": _META})
        if any(n not in known for n in steps) or len(set(kinds)) != len(kinds):
            raise bad(f"normalizer {json.dumps(norm, ensure_ascii=False)[:200]} is not supported ({_SENTENCEPIECE})")
        prefix, pattern = ("every" if "Prepend" in kinds else "none"), "whole"
        metas = _items(pre, "pretokenizers")
        # Gemma's files (transformers' GemmaConverter) split at spaces after the Replace normalizer: none are left
        if "Replace" in kinds and metas == [{"type": "Split", "pattern": {"String": " "},
                                             "behavior": "MergedWithPrevious", "invert": False}]:
            metas = []
        if metas:
            m = metas[0]
            if len(metas) != 1 or not isinstance(m, dict) or m.get("type") != "Metaspace" or steps:
                raise bad(f"pre_tokenizer {json.dumps(pre, ensure_ascii=False)[:200]} is not supported "
                          f"({_SENTENCEPIECE})")
            if m.get("replacement", _META) != _META:
                raise bad(f"Metaspace replacement {m['replacement']!r} is not supported (only {_META!r})")
            scheme = _prepend_scheme(m)
            if scheme not in ("always", "first", "never"):
                raise bad(f"Metaspace prepend_scheme {scheme!r} is not supported")
            prefix = "none" if scheme == "never" else scheme
            pattern = "metaspace" if m.get("split", True) else "whole"
        elif "Replace" not in kinds:
            raise bad(f"a SentencePiece-style file with neither a Metaspace pre-tokenizer nor a Replace(' ', "
                      f"{_META!r}) normalizer is not supported ({_SENTENCEPIECE})")
        # the decoder: '▁' back to spaces (Replace or Metaspace), the bytes of <0xNN> tokens, maybe the strip of
        # the space the prefix put before the first word
        strip = spaces = False
        byte_fallback = bool(model.get("byte_fallback"))
        for d in _items(dec, "decoders"):
            kind = d.get("type") if isinstance(d, dict) else None
            if kind == "Strip" and d.get("content") == " " and d.get("start") == 1 and not d.get("stop"):
                strip = True
            elif kind == "Metaspace" and d.get("replacement", _META) == _META:
                strip, spaces = _prepend_scheme(d) != "never", True
            elif d == {"type": "Replace", "pattern": {"String": _META}, "content": " "}:
                spaces = True
            elif d != {"type": "Fuse"} and not (d == {"type": "ByteFallback"} and byte_fallback):
                spaces = False  # (an unknown step: refused below)
                break
        if not spaces or byte_fallback != ({"type": "ByteFallback"} in _items(dec, "decoders")):
            raise bad(f"decoder {json.dumps(dec, ensure_ascii=False)[:200]} is not supported ({_SENTENCEPIECE})")
        unk = model.get("unk_token")
        if unk is not None and not isinstance(unk, str):
            raise bad(f"model.unk_token must be a string, got {unk!r}")
        return cls(pattern, prefix, strip, byte_fallback, bool(model.get("fuse_unk")), unk)

    def unk_id(self, model: dict, specials: dict[str, int], bad) -> int:
        """The id of the unknown token (-1 without one)."""
        if self.unk is None:
            return -1
        i = specials.get(self.unk, model["vocab"].get(self.unk))
        if not isinstance(i, int):
            raise bad(f"model.unk_token {self.unk!r} is not in the vocab")
        return i


def _prepend_scheme(metaspace: dict) -> str:
    """A Metaspace pre-tokenizer's or decoder's prepend_scheme (older files: add_prefix_space, default true)."""
    return metaspace.get("prepend_scheme") or ("always" if metaspace.get("add_prefix_space", True) else "never")


def _items(node, key: str) -> list:
    """The steps of an HF normalizer / pre-tokenizer / decoder: [] for null, the list of a Sequence, else [node]."""
    if node is None:
        return []
    if isinstance(node, dict) and node.get("type") == "Sequence":
        return list(node.get(key) or [])
    return [node]


def _is_sentencepiece(doc: dict) -> bool:
    """A tokenizer.json in SentencePiece's style: Metaspace pre-tokenizer or decoder, a normalizer that writes
    U+2581 for spaces, or a byte-fallback decoder (Llama 2, Mistral v0.1, TinyLlama)."""
    text = json.dumps([doc.get("normalizer"), doc.get("pre_tokenizer"), doc.get("decoder")], ensure_ascii=False)
    return any(k in text for k in ('"Metaspace"', '"ByteFallback"', "\u2581"))


def _hf_normalizer(norm, bad) -> str | None:
    """The unicodedata form of an HF normalizer (None, NFC, NFKC, NFD, NFKD, or a Sequence of one of them)."""
    if norm is None:
        return None
    if isinstance(norm, dict) and norm.get("type") == "Sequence":
        items = norm.get("normalizers") or []
        if not items:
            return None
        if len(items) == 1:
            return _hf_normalizer(items[0], bad)
    if isinstance(norm, dict) and norm.get("type") in _NORMALIZERS:
        return norm["type"]
    raise bad(f"normalizer {json.dumps(norm)[:200]} is not supported (only {', '.join(_NORMALIZERS)})")


def _hf_bos(post, specials: dict[str, int], bad) -> int | None:
    """The token HF's post-processor puts before a single text (TemplateProcessing "<bos> $A"), or None for
    post-processors that add nothing (ByteLevel, none); anything else is refused by name."""
    if post is None or not isinstance(post, dict):
        return None
    kind = post.get("type")
    if kind == "ByteLevel":
        return None
    if kind == "Sequence":
        found = [_hf_bos(p, specials, bad) for p in post.get("processors") or []]
        found = [b for b in found if b is not None]
        if len(found) > 1:
            raise bad("post_processor adds more than one BOS token")
        return found[0] if found else None
    if kind != "TemplateProcessing":
        raise bad(f"post_processor of type {kind!r} is not supported (only TemplateProcessing and ByteLevel)")
    pieces = []
    for item in post.get("single") or []:
        if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict):
            pieces.append(("special", item["SpecialToken"].get("id")))
        elif isinstance(item, dict) and "Sequence" in item:
            pieces.append(("text", None))
        else:
            raise bad(f"post_processor template item {item!r} is not understood")
    if [k for k, _ in pieces] not in (["text"], ["special", "text"]):
        raise bad(f"post_processor template {[v or '$A' for _, v in pieces]} is not supported (only '$A' or "
                  "'<bos> $A': fastllm adds no tokens after the text)")
    if pieces[0][0] == "text":
        return None
    name = pieces[0][1]
    if name not in specials:
        raise bad(f"post_processor BOS token {name!r} is not an added token")
    return specials[name]


def _hf_pattern(pre, bad) -> str:
    """The pre-tokenizer of an HF byte-level tokenizer.json as a pattern: a native one's name or a regex."""

    def check_byte_level(p) -> None:
        if p.get("add_prefix_space"):
            raise bad("ByteLevel add_prefix_space=true is not supported")

    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        check_byte_level(pre)
        if pre.get("use_regex", True):
            return "gpt2"
        raise bad("ByteLevel without use_regex needs a Split pre-tokenizer before it")
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers") or []
        types = [p.get("type") if isinstance(p, dict) else None for p in items]
        # The regex's matches are the pieces: "Isolated" (HF makes the text between matches a piece too; a custom
        # pattern's findall leaves it out: the same where the regex matches all text, as the native patterns do)
        # or "Removed" with invert (that text left out: tiktoken conversions' form, allenai's dolma2 of OLMo 2)
        if (
            types == ["Split", "ByteLevel"]
            and (items[0].get("behavior"), bool(items[0].get("invert"))) in (("Isolated", False), ("Removed", True))
            and isinstance(items[0].get("pattern"), dict)
            and isinstance(items[0]["pattern"].get("Regex"), str)
            and not items[1].get("use_regex", True)
        ):
            check_byte_level(items[1])
            return items[0]["pattern"]["Regex"]
        if types == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
            check_byte_level(items[1])
            return "smollm"  # StarCoder's: every digit alone, then GPT-2's split
    raise bad(f"unsupported pre_tokenizer {json.dumps(pre)[:200]}")


# ---- Hugging Face tokenizer files (GPT-2's vocab.json + merges.txt) ------------------------------------


def vocab_merges_doc(vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                     special_tokens: list[str] | None = None) -> dict:  # fmt: skip
    """A tokenizer.json document for GPT-2's classic vocab.json + merges.txt pair (byte-level BPE, merges by
    priority = line order, GPT-2 pre-tokenizer, no prefix space), as HF's GPT2TokenizerFast builds it.
    `special_tokens` (default: <|endoftext|> if it is in the vocab) become added tokens."""
    vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
    vocab = read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}:1: expected a JSON object token -> id")
    merges = []
    with open(merges_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{merges_path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if (lineno == 1 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{merges_path}:{lineno}: expected '<left> <right>', got {line[:60]!r}")
            merges.append(parts)
    if special_tokens is None:
        special_tokens = [t for t in ("<|endoftext|>",) if t in vocab]
    added = []
    for s in special_tokens:
        if s not in vocab:
            raise ValueError(f"{vocab_path}: special token {s!r} is not in the vocab")
        added.append(_hf_added_token(vocab[s], s, special=True))
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": dict(_HF_BYTE_LEVEL),
        "decoder": dict(_HF_BYTE_LEVEL),
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": False},
    }


def _special_tokens_from_config(folder: Path) -> list[str] | None:
    """Special tokens named by tokenizer_config.json (added_tokens_decoder, bos/eos/unk), if any."""
    p = folder / "tokenizer_config.json"
    if not p.exists():
        return None
    conf = read_json(p)
    if not isinstance(conf, dict):
        raise ValueError(f"{p}:1: expected a JSON object")
    out: list[str] = []
    decoder = conf.get("added_tokens_decoder")
    for t in decoder.values() if isinstance(decoder, dict) else ():
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            out.append(t["content"])
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        t = conf.get(k)
        t = t.get("content") if isinstance(t, dict) else t
        if isinstance(t, str) and t not in out:
            out.append(t)
    return out or None


def load_vocab_merges(folder: str | os.PathLike) -> Tokenizer:
    """Tokenizer from vocab.json + merges.txt in `folder` (special tokens from tokenizer_config.json)."""
    folder = Path(folder)
    specials = _special_tokens_from_config(folder)
    vocab_path = folder / "vocab.json"
    if specials is not None:
        vocab = read_json(vocab_path)
        specials = [s for s in specials if isinstance(vocab, dict) and s in vocab]
    doc = vocab_merges_doc(vocab_path, folder / "merges.txt", specials)
    return Tokenizer._from_hf_doc(doc, f"{vocab_path} (with merges.txt)")


def find_hf_tokenizer(folder: str | os.PathLike) -> Path | None:
    """tokenizer.json, else vocab.json (with merges.txt beside it), else None."""
    folder = Path(folder)
    for p in (folder / "tokenizer.json", folder / "vocab.json"):
        if p.exists() and (p.name != "vocab.json" or (folder / "merges.txt").exists()):
            return p
    return None
