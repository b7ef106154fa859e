"""Constrained decoding: generation that must match a JSON schema or a Lark grammar.

At every step the grammar says which tokens may come next; the others get a logit of -inf before sampling,
so the text always stays a prefix of something the grammar accepts, and once the grammar is complete only
the stop tokens are left. This is how `fastllm serve` answers `response_format` (JSON mode and JSON
schemas) and forced tool calls.

Why llguidance and not our own code: it is the engine vLLM, SGLang and llama.cpp use for structured output
(Rust, no torch, a ~3 MB wheel), it covers JSON Schema (refs, anyOf, enums, bounds, patterns) and Lark
grammars, and it computes a mask over a 150k-token vocabulary in well under a millisecond. Writing a JSON
Schema compiler is not fastllm's mission; the kernels are. Needs the `serve` extra (or pip install llguidance).

>>> guide = Guide(tokenizer, stop_tokens=[im_end])
>>> constraint = guide.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
>>> m = constraint.matcher()          # one per sequence
>>> logits[~m.allowed(len(logits))] = -np.inf; t = sample(logits); m.accept(t)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INSTALL_HINT = 'constrained decoding needs llguidance: pip install "fastllm[serve]" (or pip install llguidance)'

# JSON written as json.dumps writes it (what models have seen most): ", " and ": ", no other whitespace, so a
# weak model cannot spend its tokens on spaces
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return llguidance


class _Vocab:
    """A fastllm Tokenizer as llguidance's TokenizerWrapper wants it: every id's bytes, the special ids."""

    def __init__(self, tokenizer, eos: int):
        self.tokenizer = tokenizer
        self.tokens = [tokenizer.decode_bytes([i]) for i in range(tokenizer.n_vocab)]
        self.eos_token_id, self.bos_token_id = eos, None
        plain = tokenizer.plain_tokens  # text like any other (Qwen's <tool_call>): a grammar's literal may use them
        self.special_token_ids = sorted(i for s, i in tokenizer.special_tokens.items() if s not in plain)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text).tolist()


class Guide:
    """Grammars over one tokenizer; a completed grammar ends at one of `stop_tokens`."""

    def __init__(self, tokenizer, stop_tokens: Sequence[int]):
        llg = _llguidance()
        stops = [int(t) for t in stop_tokens]
        if not stops:
            raise ValueError("constrained decoding needs a stop token to end on")
        self.tokenizer = tokenizer
        self._tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer, stops[0])), eos_token=stops)

    def json_schema(self, schema) -> Constraint:
        """Text that is one JSON value matching `schema` (a dict; True / {} is any JSON value)."""
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as e:
            raise ValueError(f"not a JSON schema: {e}") from None
        return Constraint(self, grammar)

    def lark(self, source: str) -> Constraint:
        """Text that a Lark grammar accepts (llguidance's dialect: `%json{schema}` embeds a JSON schema)."""
        return Constraint(self, _llguidance().LLMatcher.grammar_from_lark(source))


class Constraint:
    """A compiled grammar; `matcher()` starts one sequence on it. ValueError (llguidance's message) if it does
    not compile."""

    def __init__(self, guide: Guide, grammar: str):
        self.guide = guide
        self._first = _llguidance().LLMatcher(guide._tok, grammar, log_level=0)
        if self._first.is_error():
            raise ValueError(self._first.get_error())

    def matcher(self) -> Matcher:
        return Matcher(self._first.deep_copy(), self.guide.tokenizer.n_vocab)  # (the first never advances)


class Matcher:
    """Where one sequence stands in its grammar."""

    def __init__(self, m, n_vocab: int):
        self._m, self.n_vocab = m, n_vocab

    def allowed(self, size: int) -> np.ndarray:
        """(size,) bool: the tokens that may come next (ids past the tokenizer's never do)."""
        bits = np.frombuffer(self._m.compute_bitmask(), np.uint8)
        out = np.zeros(size, bool)
        n = min(size, self.n_vocab)
        out[:n] = np.unpackbits(bits, bitorder="little", count=n).astype(bool)
        return out

    def accept(self, token: int) -> None:
        """Advance past `token` (ValueError if the grammar does not allow it)."""
        if not self._m.consume_token(int(token)):
            raise ValueError(f"token {token} does not fit the grammar: {self._m.get_error()}")

    @property
    def complete(self) -> bool:
        """The text so far is a whole match: a stop token may follow."""
        return self._m.is_accepting()
