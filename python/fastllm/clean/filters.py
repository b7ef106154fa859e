"""Quality rules (Gopher / C4 / FineWeb), aware of the language, and PII scrubbing.

Words. Languages written with spaces between words are split at whitespace (as before; English is unchanged).
Chinese, Japanese, Thai, Lao, Khmer, Burmese and Tibetan have no spaces between words: their word count is
estimated from the characters of their script divided by the mean characters per word, measured with the
segmenters the field uses (jieba for Chinese: 1.76, TinySegmenter for Japanese: 2.04, PyThaiNLP newmm for
Thai: 4.73, on the gettext catalogues of a Debian system; see benchmarks/bench_clean.py --segmenters). The
per-message ratio varies little (p10-p90 1.6-2.0 for Chinese, 3.3-7.5 for Thai), so the estimate serves the
count rules as well as segmenting would, at memory speed instead of 0.05-0.15 MB/s, and with no dependency.
The mean-word-length rule is skipped for these languages (a character is not a word).

Thresholds. With `CleanConfig.lang_rules`, a language other than English takes FineWeb-2's values for that
language (languages_fw2.py, derived by FineWeb-2 from each language's statistics): mean word length bounds,
fraction of words with a letter, stop words (at least `min_stop_words` of them), fraction of duplicated lines
and of lines ending in punctuation; like FineWeb-2 it has no short-line rule. Stop words of languages without
spaces (and Korean, whose stop words are particles inside words) are counted as substrings.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections import Counter

import regex

from .config import ENGLISH, CleanConfig
from .languages_fw2 import FW2

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_CJK_SPLIT = re.compile(f"({_CJK.pattern})")
_ALPHA = re.compile(r"[^\W\d_]")
_BULLETS = ("•", "●", "○", "▪", "■", "◦", "‣", "-", "*", "·", "–", "—", "➢", "►", "▶")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»", "。", "！", "？", "…", ")")  # English (Gopher/FineWeb)
_TERMINAL_ANY = regex.compile(r"[\p{Sentence_Terminal}\p{Pe}\p{Pf}\"'”’»…]$")  # every script
_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_WORD = regex.compile(r"\w+['’]?")

# scripts written without spaces between words -> mean characters per word (see the module docstring)
_HAN_KANA = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_NO_SPACE = {  # language: (characters of its script, characters per word)
    "zh": (_HAN_KANA, 1.76), "yue": (_HAN_KANA, 1.76), "wuu": (_HAN_KANA, 1.76), "ja": (_HAN_KANA, 2.04),
    "th": ("\u0e00-\u0e7f", 4.73), "lo": ("\u0e80-\u0eff", 4.73), "km": ("\u1780-\u17ff", 4.73),
    "my": ("\u1000-\u109f", 4.73), "dz": ("\u0f00-\u0fff", 4.73),
}
_SUBSTRING_STOPS = set(_NO_SPACE) | {"ko"}


@dataclasses.dataclass(frozen=True)
class LangRules:
    """The thresholds that differ between languages (the rest come from CleanConfig)."""

    min_mean_word_len: float
    max_mean_word_len: float
    min_alpha_words: float
    max_dup_lines: float
    min_punct_lines: float
    max_short_lines: float
    stop_words: frozenset
    script: re.Pattern | None  # characters of a script without spaces between words, else None
    chars_per_word: float
    english: bool  # Gopher/FineWeb's English rules exactly


_SCRIPTS = {lang: re.compile(f"[{chars}]") for lang, (chars, _) in _NO_SPACE.items()}


def lang_rules(lang: str | None, cfg: CleanConfig) -> LangRules:
    """The rules for text in `lang`: the thresholds set in `cfg`, else English's (for English, for an unknown
    language `None` and with `lang_rules` off) or FineWeb-2's for that language."""
    return _lang_rules(lang, cfg.lang_rules, *(getattr(cfg, k) for k in ENGLISH))


@functools.lru_cache(maxsize=1024)
def _lang_rules(lang: str | None, per_language: bool, *values) -> LangRules:
    cfg = dict(zip(ENGLISH, values))
    english = lang == "en" or lang is None or not per_language
    own = dict(ENGLISH)
    stops = _STOP_WORDS if lang == "en" else frozenset()
    script, cpw = None, 1.0
    if not english:
        own["max_short_lines"] = float("inf")  # FineWeb-2 drops the short-line rule for every language
        if lang in FW2:
            lo, hi, alpha, dup, punct, words = FW2[lang]
            own.update(min_mean_word_len=lo, max_mean_word_len=hi, min_alpha_words=alpha, max_dup_lines=dup,
                       min_punct_lines=punct)
            stops = frozenset(w.lower() for w in words)
        if lang in _NO_SPACE:
            script, cpw = _SCRIPTS[lang], _NO_SPACE[lang][1]
    values = {k: v if cfg[k] is None else cfg[k] for k, v in own.items()}
    return LangRules(**values, stop_words=stops, script=script, chars_per_word=cpw, english=english)


def words_of(text: str) -> list[str]:
    """Whitespace words; runs of CJK characters (no spaces between words) count one word per character."""
    if not _CJK.search(text):
        return text.split()
    return [w for w in _CJK_SPLIT.split(text.replace("\n", " ")) for w in (w.split() if not _CJK.match(w) else [w])]


def word_count(text: str, lang: str | None, cfg: CleanConfig | None = None) -> float:
    """Words in `text` as the quality rules count them (estimated from characters where words have no spaces).

    >>> word_count("这个城市位于河流的南岸", "zh")  # 11 Han characters / 1.76
    6.25
    """
    r = lang_rules(lang, cfg or CleanConfig())
    if r.script is None:
        return float(len(words_of(text) if r.english else text.split()))
    return len(r.script.findall(text)) / r.chars_per_word + sum(1 for w in text.split() if not r.script.search(w))


def _alpha_fraction(text: str, words: list[str], n: float, r: LangRules) -> float:
    """Fraction of the words that hold a letter. Without spaces between words, a run of the script is many
    words (estimated as word_count does), all with letters: counted per whitespace chunk, a number between two
    Thai or Khmer phrases weighed as much as each phrase, and a page with a date in every paragraph fell
    under FineWeb-2's threshold (0.9 for Thai) that was measured on segmented words."""
    if r.script is None:
        return sum(1 for w in words if _ALPHA.search(w)) / max(len(words), 1)
    alpha = len(r.script.findall(text)) / r.chars_per_word
    alpha += sum(1 for w in words if not r.script.search(w) and _ALPHA.search(w))
    return alpha / n


def _stop_word_count(text: str, words: list[str], r: LangRules, lang: str | None) -> int:
    if r.english:
        return sum(1 for w in words if w.lower() in r.stop_words)
    if lang in _SUBSTRING_STOPS:
        return sum(text.count(w) for w in r.stop_words)
    return sum(1 for w in _WORD.findall(text.lower()) if w in r.stop_words)


def quality_reason(text: str, cfg: CleanConfig, lang: str | None = None) -> str | None:
    """The name of the first quality rule the text fails, or None when it passes them all."""
    r = lang_rules(lang, cfg)
    words = words_of(text) if r.english else text.split()
    n = len(words) if r.script is None else word_count(text, lang, cfg)
    if n < max(cfg.min_words, 1e-9):
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    cjk = len(_CJK.findall(text)) > 0.3 * len(text)
    if r.script is None and not (r.english and cjk):
        mean = sum(map(len, words)) / len(words)
        if mean < r.min_mean_word_len or mean > r.max_mean_word_len:
            return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if _alpha_fraction(text, words, n, r) < r.min_alpha_words:
        return "alpha_words"
    if r.stop_words and cfg.min_stop_words > 0 and _stop_word_count(text, words, r, lang) < cfg.min_stop_words:
        return "stop_words"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    nl = max(len(lines), 1)
    if sum(1 for ln in lines if ln.startswith(_BULLETS)) / nl > cfg.max_bullet_lines:
        return "bullet_lines"
    if sum(1 for ln in lines if ln.endswith(("...", "…"))) / nl > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    distinct = set(lines)  # every line after the first copy of it is a repeat
    chars = sum(map(len, lines))
    if (len(lines) - len(distinct)) / nl > r.max_dup_lines:
        return "dup_lines"
    if (chars - sum(map(len, distinct))) / max(chars, 1) > cfg.max_dup_line_chars:
        return "dup_line_chars"
    ends = (lambda ln: ln.endswith(_TERMINAL)) if r.english else (lambda ln: _TERMINAL_ANY.search(ln) is not None)
    if sum(1 for ln in lines if ends(ln)) / nl < r.min_punct_lines:
        return "line_punctuation"
    if sum(1 for ln in lines if len(ln) < 30) / nl > r.max_short_lines:
        return "short_lines"
    if text.lower().count("lorem ipsum") > cfg.max_lorem_ipsum:
        return "lorem_ipsum"
    return None


# ---- PII -----------------------------------------------------------------------------------------------

EMAIL_PLACEHOLDER = "email@example.com"
IP_PLACEHOLDER = "0.0.0.0"
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def scrub_pii(text: str, stats: Counter | None = None) -> str:
    """E-mail addresses -> EMAIL_PLACEHOLDER, valid IPv4/IPv6 addresses -> IP_PLACEHOLDER. Dotted quads that
    are valid addresses are replaced even when they are really version numbers (1.2.3.4)."""

    def ip(m: re.Match) -> str:
        s = m.group(0)
        if ":" in s:  # IPv6: also need 2+ groups, one of 3+ hex digits, so that code like a[::2], 1::2 stays
            groups = [g for g in s.split(":") if g]
            if len(groups) < 2 or max(map(len, groups)) < 3:
                return s
        try:
            ipaddress.ip_address(s)
        except ValueError:
            return s
        if stats is not None:
            stats["pii.ip"] += 1
        return IP_PLACEHOLDER

    text, n = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    if stats is not None:
        stats["pii.email"] += n
    text = _IPV4.sub(ip, text)
    if ":" in text:
        text = _IPV6.sub(ip, text)
    return text

