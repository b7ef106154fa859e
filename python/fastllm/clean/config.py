"""CleanConfig: the thresholds of every stage of `fastllm clean`, checked once (one `--flag` each on the CLI)."""

from __future__ import annotations

import dataclasses
import difflib
import math

from ..options import option

# the English (and fallback) values of the per-language thresholds: Gopher's and FineWeb's
ENGLISH = dict(min_mean_word_len=3.0, max_mean_word_len=10.0, min_alpha_words=0.8, max_dup_lines=0.3,
               min_punct_lines=0.12, max_short_lines=0.67)


@dataclasses.dataclass
class CleanConfig:
    """Thresholds of every stage. A filter is off at its neutral value (0 for minimums, inf for maximums).
    The six thresholds that default to None are per language: unset, English text takes Gopher's/FineWeb's
    value (in the help text; ENGLISH) and, with `lang_rules` (default), other languages FineWeb-2's value for that
    language (no short-line rule; README table); a value set here applies to every language."""

    lang: tuple[str, ...] | None = option(None, "keep only documents in these languages, ISO 639-1 codes as "
                                                "py3langid labels them, e.g. en de (default: all languages)")
    min_lang_score: float = option(0.65, "with --lang: minimum py3langid probability of the top language (0-1)")
    lang_rules: bool = option(True, "per-language thresholds, stop words and word counting (FineWeb-2's; off: the "
                                    "English values, or the ones given, for every language)")
    min_words: int = option(50, "minimum words per document (Gopher; words of languages written without spaces "
                                "are estimated from characters)")
    max_words: int = option(100_000, "maximum words per document (Gopher)")
    min_mean_word_len: float | None = option(None, "minimum mean word length in characters, for every language "
                                                   "(default: per language; English 3, Gopher; none for languages "
                                                   "written without spaces)")
    max_mean_word_len: float | None = option(None, "maximum mean word length in characters, for every language "
                                                   "(default: per language; English 10, Gopher)")
    max_symbol_ratio: float = option(0.1, "maximum ('#' + '...' + '…') per word (Gopher)")
    max_bullet_lines: float = option(0.9, "maximum fraction of lines that start with a bullet (Gopher)")
    max_ellipsis_lines: float = option(0.3, "maximum fraction of lines that end with an ellipsis (Gopher)")
    min_alpha_words: float | None = option(None, "minimum fraction of words with a letter, for every language "
                                                 "(default: per language; English 0.8, Gopher)")
    min_stop_words: int = option(2, "minimum stop words per document (English: the, be, to, of, and, that, have, "
                                    "with; Gopher)")
    max_dup_lines: float | None = option(None, "maximum fraction of lines that repeat an earlier line, for every "
                                               "language (default: per language; English 0.3, Gopher)")
    max_dup_line_chars: float = option(0.2, "maximum fraction of characters in repeated lines (Gopher)")
    min_punct_lines: float | None = option(None, "minimum fraction of lines that end in terminal punctuation, for "
                                                 "every language (default: per language; English 0.12, FineWeb "
                                                 "after C4)")
    max_short_lines: float | None = option(None, "maximum fraction of lines under 30 characters, for every "
                                                 "language (default: English 0.67, FineWeb; other languages none)")
    max_lorem_ipsum: int = option(0, "occurrences of 'lorem ipsum' allowed per document (C4)")
    scrub_pii: bool = option(True, "replace e-mail and IP addresses with placeholders")
    dedup: bool = option(True, "remove exact duplicates and MinHash-LSH near-duplicates (first one kept)")
    minhash_bands: int = option(14, "LSH bands; bands x rows MinHash permutations (14 x 8 finds pairs with "
                                    "Jaccard >= ~0.8 with probability > 0.9, FineWeb's setting)")
    minhash_rows: int = option(8, "MinHash rows per LSH band")
    shingle_words: int = option(5, "MinHash shingle length in words")
    shard_docs: int = option(100_000, "documents per output shard clean_NNNNNN.jsonl")
    processes: int = option(0, "worker processes (0: one per CPU core this process may use; 1: all in this "
                               "process; with --dask local: the LocalCluster's workers)")

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
