"""Step 1 of the pipeline: raw web pages and text on disk -> clean training text (JSONL shards for `prepare`).

Stages, each a plain function of one document (so they also map over a Dask/Ray dataset):
  read       readers.py: any file by its content -- HTML/XHTML, RSS/Atom feeds (one document per item), WARC
             (own validating reader), JSONL ({"html"} or {"text"}), Parquet (the same columns), plain text and
             subtitles; gzip/bz2/xz/zstd
  extract    extract.py: charset decoding (BOM, UTF-16/32 without BOM, UTF-8, HTTP header, <meta charset>,
             uchardet), then main text with resiliparse (boilerplate: nav, footer, scripts, menus)
  lang       py3langid (its model ships in the wheel; nothing is downloaded) -> (code, probability), `lang` filter
  quality    filters.py: Gopher / C4 / FineWeb rules with FineWeb-2's per-language thresholds and stop words,
             words of languages written without spaces estimated from characters
  pii        e-mail and IPv4/IPv6 addresses -> placeholders
  dedup      dedup.py: exact (hash of the normalised text) then MinHash-LSH near duplicates, first copy kept
Driver: pipeline.py (`clean()`, processes on this machine) and distributed.py (the same on a Dask cluster).

Performance notes (2 cores, see benchmarks/bench_clean.py): extraction dominates. On the test pages resiliparse
was ~12-20x faster than trafilatura with the same recall and similar precision; selectolax + tag stripping was
faster still but kept menus/sidebars built from plain <div>s.
"""

from .config import CleanConfig
from .dedup import exact_hash, lsh_keys, minhash, near_dup_components
from .extract import decode_html, detect_language, extract_text, known_languages
from .filters import EMAIL_PLACEHOLDER, IP_PLACEHOLDER, lang_rules, quality_reason, scrub_pii, word_count, words_of
from .pipeline import STAGES, CleanSummary, clean, process_page
from .readers import InputError, list_inputs, read_pages, sniff

__all__ = [
    "CleanConfig", "CleanSummary", "EMAIL_PLACEHOLDER", "IP_PLACEHOLDER", "InputError", "STAGES", "clean",
    "decode_html", "detect_language", "exact_hash", "extract_text", "known_languages", "lang_rules", "list_inputs",
    "lsh_keys", "minhash", "near_dup_components", "process_page", "quality_reason", "read_pages", "scrub_pii",
    "sniff", "word_count", "words_of",
]
