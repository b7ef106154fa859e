"""CleanConfig: the thresholds of every stage of `fastllm clean`, checked once (one `--flag` each on the CLI)."""

from __future__ import annotations

import dataclasses
import difflib
import math

# the English (and fallback) values of the per-language thresholds: Gopher's and FineWeb's
ENGLISH = dict(min_mean_word_len=3.0, max_mean_word_len=10.0, min_alpha_words=0.8, max_dup_lines=0.3,
               min_punct_lines=0.12, max_short_lines=0.67)


@dataclasses.dataclass
class CleanConfig:
    """Thresholds of every stage. A filter is off at its neutral value (0 for minimums, inf for maximums).
    The six thresholds that default to None are per language: unset, English text takes Gopher's/FineWeb's
    value (in the comment) and, with `lang_rules` (default), other languages FineWeb-2's value for that
    language (no short-line rule; README table); a value set here applies to every language."""

    lang: tuple[str, ...] | None = None  # keep only these ISO 639-1 codes (py3langid labels); None: all
    min_lang_score: float = 0.65  # py3langid probability of the top language (when `lang` is set)
    lang_rules: bool = True  # per-language thresholds, stop words and word counting (False: these values for all)
    min_words: int = 50  # Gopher (words of languages written without spaces are estimated from characters)
    max_words: int = 100_000  # Gopher
    min_mean_word_len: float | None = None  # Gopher: 3 (not for languages written without spaces)
    max_mean_word_len: float | None = None  # Gopher: 10
    max_symbol_ratio: float = 0.1  # ('#' + '...' / '…') per word, Gopher
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet, Gopher
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis, Gopher
    min_alpha_words: float | None = None  # fraction of words with a letter, Gopher: 0.8
    min_stop_words: int = 2  # stop words (English: the, be, to, of, and, that, have, with), Gopher
    max_dup_lines: float | None = None  # fraction of lines that repeat an earlier line, Gopher: 0.3
    max_dup_line_chars: float = 0.2  # fraction of characters in repeated lines, Gopher
    min_punct_lines: float | None = None  # fraction of lines ending in terminal punctuation, FineWeb: 0.12
    max_short_lines: float | None = None  # fraction of lines under 30 characters, FineWeb: 0.67 (English)
    max_lorem_ipsum: int = 0  # occurrences of "lorem ipsum" allowed, C4
    scrub_pii: bool = True  # e-mail and IP addresses -> placeholders
    dedup: bool = True  # exact + MinHash-LSH near-duplicate removal
    minhash_bands: int = 14  # LSH bands x rows = permutations; 14 x 8: pairs with Jaccard >= ~0.8 are found
    minhash_rows: int = 8  # ... with probability > 0.9 (FineWeb's setting)
    shingle_words: int = 5  # MinHash shingle length in words
    shard_docs: int = 100_000  # documents per output shard
    processes: int = 0  # worker processes (0: one per CPU core, 1: in this process; with Dask: workers of `local`)

    def per_file_key(self) -> dict:
        """The settings that change a file's work output (a re-run with other values redoes the files)."""
        d = dataclasses.asdict(self)
        for k in ("shard_docs", "processes", "dedup"):
            d.pop(k)
        d["lang"] = sorted(d["lang"]) if d["lang"] else None
        return d

    def checked(self) -> CleanConfig:
        """A copy with `lang` as a tuple, every value checked: ValueError naming the field and the value."""
        lang = (self.lang,) if isinstance(self.lang, str) else tuple(self.lang) if self.lang else None
        cfg = dataclasses.replace(self, lang=lang)
        if lang:
            from .extract import known_languages

            known = known_languages()
            for code in lang:
                if code not in known:
                    near = difflib.get_close_matches(code, known, 3, 0.5)
                    raise ValueError(f"lang: unknown language code {code!r} (py3langid knows {len(known)}: "
                                     f"{' '.join(known)}){f'; did you mean {near}?' if near else ''}")
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, bool) or v is None or f.name == "lang":
                continue
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"{f.name} must be a number >= 0, got {v!r}")
        for name in ("minhash_bands", "minhash_rows", "shingle_words", "shard_docs"):
            if getattr(cfg, name) < 1 or int(getattr(cfg, name)) != getattr(cfg, name):
                raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
        for name in ("min_lang_score", "min_alpha_words", "min_punct_lines"):
            if getattr(cfg, name) is not None and getattr(cfg, name) > 1:
                raise ValueError(f"{name} is a fraction in [0, 1], got {getattr(cfg, name)!r}")
        return cfg
