"""Step 1 of the pipeline: raw web pages on disk -> clean training text (JSONL shards for `fastllm prepare`).

Stages, each a plain function of one document so that they also map over a Dask/Ray dataset (README):
  read       HTML files, WARC files (fastwarc, plain/gz/zst/lz4) and JSONL ({"html": ...} or {"text": ...})
  extract    decode the bytes (BOM > HTTP header > <meta charset> > valid UTF-8 > uchardet detection), then main
             text with resiliparse's main-content heuristics (boilerplate: nav, footer, scripts, menus)
  lang       py3langid (its model ships in the wheel; nothing is downloaded) -> (code, probability), `lang` filter
  quality    Gopher / C4 / FineWeb-style rules, each with a threshold in CleanConfig and a reason in the summary
  pii        e-mail and IPv4/IPv6 addresses -> placeholders
  dedup      exact (64-bit hash of NFKC-lowercased, punctuation-free text, first copy kept) then near-duplicates:
             MinHash over word 5-grams (numpy, `num_perm` = bands x rows permutations) + LSH banding; documents
             sharing any band are joined into connected components (vectorised label propagation) and only the
             first document of each component is kept, as in FineWeb.

Driver `clean(inputs, out_dir, cfg)`: input files are processed in parallel batches (spawn-started worker
processes, tqdm bar over files); a batch's surviving documents, exact hashes and LSH band keys go to
`out/.work/<batch>.{docs,npz}` and then `<batch>.done.json` lists each file's key (path, size, mtime, config)
and its rows, all written atomically, so a re-run skips every input already done, file by file. The global
dedup then reads the keys in input order and writes `clean_NNNNNN.jsonl` shards ({"text", "url", "lang"} per
line, atomic) plus `summary.json` (per-stage kept/dropped counts with reasons, bad inputs). Bad inputs
(unreadable, corrupt, binary, empty folders) are counted and reported; documents read before a corruption are
kept. Memory: one batch of documents per worker, and 8 bytes x (1 + bands) per document for the global dedup.

Performance notes (2 cores, see benchmarks/bench_clean.py): extraction dominates. On the test pages resiliparse
was ~12-20x faster than trafilatura with the same recall and similar precision; selectolax + tag stripping was
faster still but kept menus/sidebars built from plain <div>s. uchardet (resiliparse) detected Shift-JIS, GBK,
cp1251 and Latin-1 correctly in ~0.1 ms where charset-normalizer took 1-30 ms and read Latin-1 as cp1250.
Own numpy MinHash instead of datasketch: the same algorithm without datasketch's scipy dependency.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import ipaddress
import json
import os
import re
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .fileio import atomic_write, write_json
from .options import option

HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".html.gz", ".htm.gz")
WARC_SUFFIXES = (".warc", ".warc.gz", ".warc.zst", ".warc.lz4", ".arc", ".arc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
STAGES = ("read", "extract", "lang", "quality", "exact_dedup", "near_dedup")


@dataclasses.dataclass
class CleanConfig:
    """Thresholds of every stage. A filter is off at its neutral value (0 for minimums, inf for maximums)."""

    lang: tuple[str, ...] | None = option(None, "keep only documents in these languages, ISO 639-1 codes as "
                                                "py3langid labels them, e.g. en de (default: all languages)")
    min_lang_score: float = option(0.65, "with --lang: minimum py3langid probability of the top language (0-1)")
    min_words: int = option(50, "minimum words per document (Gopher)")
    max_words: int = option(100_000, "maximum words per document (Gopher)")
    min_mean_word_len: float = option(3.0, "minimum mean word length in characters (Gopher; not for CJK text)")
    max_mean_word_len: float = option(10.0, "maximum mean word length in characters (Gopher)")
    max_symbol_ratio: float = option(0.1, "maximum ('#' + '...' + '…') per word (Gopher)")
    max_bullet_lines: float = option(0.9, "maximum fraction of lines that start with a bullet (Gopher)")
    max_ellipsis_lines: float = option(0.3, "maximum fraction of lines that end with an ellipsis (Gopher)")
    min_alpha_words: float = option(0.8, "minimum fraction of words with a letter (Gopher)")
    min_stop_words: int = option(2, "minimum English stop words (the, be, to, of, and, that, have, with) per "
                                    "English document (Gopher)")
    max_dup_lines: float = option(0.3, "maximum fraction of lines that repeat an earlier line (Gopher)")
    max_dup_line_chars: float = option(0.2, "maximum fraction of characters in repeated lines (Gopher)")
    min_punct_lines: float = option(0.12, "minimum fraction of lines that end in terminal punctuation (FineWeb, "
                                          "after C4)")
    max_short_lines: float = option(0.67, "maximum fraction of lines under 30 characters (FineWeb)")
    max_lorem_ipsum: int = option(0, "occurrences of 'lorem ipsum' allowed per document (C4)")
    scrub_pii: bool = option(True, "replace e-mail and IP addresses with placeholders")
    dedup: bool = option(True, "remove exact duplicates and MinHash-LSH near-duplicates (first one kept)")
    minhash_bands: int = option(14, "LSH bands; bands x rows MinHash permutations (14 x 8 finds pairs with "
                                    "Jaccard >= ~0.8 with probability > 0.9, FineWeb's setting)")
    minhash_rows: int = option(8, "MinHash rows per LSH band")
    shingle_words: int = option(5, "MinHash shingle length in words")
    shard_docs: int = option(100_000, "documents per output shard clean_NNNNNN.jsonl")
    processes: int = option(0, "worker processes (0: one per CPU core; 1: all in this process)")

    def per_file_key(self) -> dict:
        """The settings that change a file's work output (a re-run with other values redoes the files)."""
        d = dataclasses.asdict(self)
        for k in ("shard_docs", "processes", "dedup"):
            d.pop(k)
        d["lang"] = sorted(d["lang"]) if d["lang"] else None
        return d


# ---- read ----------------------------------------------------------------------------------------------


def input_kind(path: Path) -> str | None:
    """'html' | 'warc' | 'jsonl' from the file name; None for other files."""
    name = path.name.lower()
    for kind, suffixes in (("warc", WARC_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("html", HTML_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def list_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """Expand files and folders (recursively, by suffix) -> (input files, bad inputs {"path", "error"})."""
    files: list[Path] = []
    bad: list[dict] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and input_kind(q) and ".work" not in q.parts)
            if not found:
                bad.append({"path": str(p), "error": "folder holds no .html/.warc/.jsonl files"})
            files += found
        elif p.is_file():
            files.append(p)
        else:
            bad.append({"path": str(p), "error": "not found"})
    return list(dict.fromkeys(files)), bad


def _open(path: Path):
    return (
        gzip.open(path, "rb") if path.name.lower().endswith(".gz") and input_kind(path) != "warc" else open(path, "rb")
    )


def read_pages(path: str | os.PathLike, stats: Counter | None = None) -> Iterator[dict]:
    """Documents of one input file as dicts: {"html": bytes|str, "charset": str|None, "url": str} for pages,
    {"text": str, "url": str} for JSONL records that carry text only. Records that cannot be read are counted
    in `stats` ("read.dropped.<reason>"); errors that end the file (I/O, a corrupt WARC) propagate."""
    path = Path(path)
    stats = Counter() if stats is None else stats
    kind = input_kind(path)
    if kind is None:  # a file named explicitly: sniff
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        kind = "warc" if head.startswith(b"WARC/") else "jsonl" if head.startswith(b"{") else "html"
    if kind == "html":
        with _open(path) as f:
            data = f.read()
        if b"\0" in data[:4096]:
            stats["read.dropped.binary"] += 1
            return
        yield {"html": data, "charset": None, "url": str(path)}
    elif kind == "warc":
        yield from _read_warc(path, stats)
    else:
        with _open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    url = str(rec.get("url") or rec.get("id") or f"{path}:{lineno}")
                    if isinstance(rec.get("html"), str):
                        yield {"html": rec["html"], "charset": None, "url": url}
                    elif isinstance(rec.get("text"), str):
                        yield {"text": rec["text"], "url": url}
                    else:
                        stats["read.dropped.no_text_or_html_field"] += 1
                except (ValueError, AttributeError):  # bad JSON / bad UTF-8 / not an object
                    stats["read.dropped.bad_json_line"] += 1


def _read_warc(path: Path, stats: Counter) -> Iterator[dict]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with open(path, "rb") as f:
        for rec in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
            ctype = (rec.http_content_type or "text/html").lower()
            if "html" not in ctype:
                stats["read.dropped.not_html"] += 1
                continue
            data = rec.reader.read()
            if not data:
                stats["read.dropped.empty_record"] += 1
                continue
            yield {"html": data, "charset": rec.http_charset, "url": rec.headers.get("WARC-Target-URI", "")}


# ---- extract -------------------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.I)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# WHATWG: these labels mean the superset encoding browsers actually use.
_SUPERSETS = {
    "iso-8859-1": "cp1252",
    "latin-1": "cp1252",
    "ascii": "cp1252",
    "us-ascii": "cp1252",
    "iso-8859-9": "cp1254",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "euc-kr": "cp949",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
}


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    try:
        name = codecs.lookup(label.strip().strip("\"'")).name
    except LookupError:
        return None
    if name == "utf-16-le" or name == "utf-16-be" or name == "utf-16":  # a page that declares UTF-16 but got
        return None  # here without a BOM is almost always mislabelled ASCII-compatible text
    return _SUPERSETS.get(name.replace("_", "-"), _SUPERSETS.get(name, name))


def decode_html(data: bytes | str, http_charset: str | None = None) -> str:
    """Bytes of a page -> str: BOM, then the HTTP charset, then <meta charset>/http-equiv in the first 4 KB,
    then strict UTF-8, then uchardet detection; a declared charset that leaves over 1% replacement characters
    gives way to detection."""
    if isinstance(data, str):
        return data
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return data.decode(enc, errors="replace")
    m = _META_CHARSET.search(data, 0, 4096)
    for declared in (_codec(http_charset), _codec(m.group(1).decode("ascii")) if m else None):
        if declared:
            text = data.decode(declared, errors="replace")
            if text.count("\ufffd") <= len(text) // 100:
                return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from resiliparse.parse.encoding import detect_encoding

    enc = _codec(detect_encoding(data[:65536])) or "cp1252"
    return data.decode(enc, errors="replace")


def extract_text(html: bytes | str, http_charset: str | None = None) -> str:
    """Main text of a page (boilerplate removed), paragraphs on their own lines."""
    from resiliparse.extract.html2text import extract_plain_text

    text = extract_plain_text(decode_html(html, http_charset), main_content=True, alt_texts=False)
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


# ---- language ------------------------------------------------------------------------------------------

_LANGID = None


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid over the first 3000 characters (its cost is linear)."""
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, p = _LANGID.classify(text[:3000])
    return str(lang), float(p)


# ---- quality -------------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_CJK_SPLIT = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")
_ALPHA = re.compile(r"[^\W\d_]")
_BULLETS = ("•", "●", "○", "▪", "■", "◦", "‣", "-", "*", "·", "–", "—", "➢", "►", "▶")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»", "。", "！", "？", "…", ")")
_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))


def words_of(text: str) -> list[str]:
    """Whitespace words; runs of CJK characters (no spaces between words) count one word per character."""
    if not _CJK.search(text):
        return text.split()
    return [w for w in _CJK_SPLIT.split(text.replace("\n", " ")) for w in (w.split() if not _CJK.match(w) else [w])]


def quality_reason(text: str, cfg: CleanConfig, lang: str | None = None) -> str | None:
    """The name of the first quality rule the text fails, or None when it passes them all."""
    words = words_of(text)
    n = len(words)
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    cjk = len(_CJK.findall(text)) > 0.3 * len(text)
    if not cjk:
        mean = sum(map(len, words)) / n
        if mean < cfg.min_mean_word_len or mean > cfg.max_mean_word_len:
            return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if sum(1 for w in words if _ALPHA.search(w)) / n < cfg.min_alpha_words:
        return "alpha_words"
    if lang == "en" and cfg.min_stop_words > 0:
        if sum(1 for w in words if w.lower() in _STOP_WORDS) < cfg.min_stop_words:
            return "stop_words"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    nl = max(len(lines), 1)
    if sum(1 for ln in lines if ln.startswith(_BULLETS)) / nl > cfg.max_bullet_lines:
        return "bullet_lines"
    if sum(1 for ln in lines if ln.endswith(("...", "…"))) / nl > cfg.max_ellipsis_lines:
        return "ellipsis_lines"
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for ln in lines:
        if ln in seen:
            dup_lines += 1
            dup_chars += len(ln)
        seen.add(ln)
    if dup_lines / nl > cfg.max_dup_lines:
        return "dup_lines"
    if dup_chars / max(sum(map(len, lines)), 1) > cfg.max_dup_line_chars:
        return "dup_line_chars"
    if sum(1 for ln in lines if ln.endswith(_TERMINAL)) / nl < cfg.min_punct_lines:
        return "line_punctuation"
    if sum(1 for ln in lines if len(ln) < 30) / nl > cfg.max_short_lines:
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


# ---- dedup keys ----------------------------------------------------------------------------------------

_NOT_WORD = re.compile(r"[\W_]+")


def exact_hash(text: str) -> int:
    """64-bit hash of the text NFKC-normalised, lowercased, with punctuation and whitespace collapsed."""
    norm = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


_PERM_CACHE: dict[int, np.ndarray] = {}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scrambles every input bit into every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def minhash(text: str, num_perm: int = 112, shingle: int = 5) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of the set of word `shingle`-grams of the normalised text.
    Shingle hashes: crc32 of each word, mixed to 64 bits, combined over the window by a polynomial; the j-th
    "permutation" is mix64(h ^ seed_j) (top 32 bits) -- one (n_shingles, num_perm) numpy pass. A plain
    multiply-shift family (a_j * h + b_j) was tried first: its minima are correlated and the Jaccard estimate
    was off by 3+ standard deviations on near-duplicate pages."""
    if num_perm not in _PERM_CACHE:
        _PERM_CACHE[num_perm] = np.random.default_rng(1).integers(0, 2**63, num_perm, dtype=np.uint64)
    seeds = _PERM_CACHE[num_perm]
    words = words_of(_NOT_WORD.sub(" ", text.lower()))
    if not words:
        return np.full(num_perm, 0xFFFFFFFF, np.uint32)
    with np.errstate(over="ignore"):
        wh = _mix64(np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words)))
        k = min(shingle, len(words))
        sh = np.zeros(len(words) - k + 1, np.uint64)
        for i in range(k):  # polynomial combination of k consecutive word hashes
            sh = sh * np.uint64(0x100000001B3) + wh[i : len(wh) - k + 1 + i]
        sh = np.unique(sh)
        sig = (_mix64(sh[:, None] ^ seeds[None, :]) >> np.uint64(32)).min(axis=0)
    return sig.astype(np.uint32)


def lsh_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[bands] band keys of a MinHash signature (band index mixed in so bands never collide)."""
    sig = np.ascontiguousarray(sig[: bands * rows], np.uint32).reshape(bands, rows)
    return np.array(
        [
            int.from_bytes(
                hashlib.blake2b(row.tobytes(), digest_size=8, salt=i.to_bytes(16, "little")).digest(), "little"
            )
            for i, row in enumerate(sig)
        ],
        np.uint64,
    )


def near_dup_components(keys: np.ndarray) -> np.ndarray:
    """keys: uint64 (n, bands). Documents sharing a key in any band are linked; returns each document's
    component label = the smallest index in its component (label propagation + pointer jumping, vectorised)."""
    n = keys.shape[0]
    labels = np.arange(n)
    if n == 0:
        return labels
    groups = []
    for j in range(keys.shape[1]):
        order = np.argsort(keys[:, j], kind="stable")
        k = keys[order, j]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, n])
        if (sizes > 1).any():
            groups.append((order, starts, sizes))
    while True:
        old = labels.copy()
        for order, starts, sizes in groups:
            gmin = np.minimum.reduceat(labels[order], starts)
            labels[order] = np.minimum(labels[order], np.repeat(gmin, sizes))
        while True:  # pointer jumping: follow labels to their roots
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
        if np.array_equal(labels, old):
            return labels


# ---- one document through stages 2-6 (also what a Dask/Ray map calls) ---------------------------------


def process_page(page: dict, cfg: CleanConfig, stats: Counter | None = None) -> dict | None:
    """One page from read_pages -> {"text", "url", "lang", "hash", "lsh"} or None (the reason is counted in
    `stats` as "<stage>.dropped.<reason>"; survivors as "<stage>.kept")."""
    stats = Counter() if stats is None else stats
    if "html" in page:
        try:
            text = extract_text(page["html"], page.get("charset"))
        except Exception:  # the parser rejects it: count, never stop the run
            stats["extract.dropped.parse_error"] += 1
            return None
    else:
        text = "\n".join(ln.strip() for ln in page["text"].splitlines() if ln.strip())
    if not text:
        stats["extract.dropped.empty"] += 1
        return None
    stats["extract.kept"] += 1
    lang, score = detect_language(text)
    if cfg.lang:
        if lang not in cfg.lang:
            stats[f"lang.dropped.other_language.{lang}"] += 1
            return None
        if score < cfg.min_lang_score:
            stats["lang.dropped.low_score"] += 1
            return None
    stats["lang.kept"] += 1
    reason = quality_reason(text, cfg, lang)
    if reason:
        stats[f"quality.dropped.{reason}"] += 1
        return None
    stats["quality.kept"] += 1
    if cfg.scrub_pii:
        text = scrub_pii(text, stats)
    doc = {"text": text, "url": page.get("url", ""), "lang": lang}
    if cfg.dedup:
        doc["hash"] = exact_hash(text)
        sig = minhash(text, cfg.minhash_bands * cfg.minhash_rows, cfg.shingle_words)
        doc["lsh"] = lsh_keys(sig, cfg.minhash_bands, cfg.minhash_rows)
    return doc


# ---- driver --------------------------------------------------------------------------------------------


def _file_key(path: Path, cfg_key: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{cfg_key}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _process_batch(args: tuple[list[tuple[Path, str]], Path, CleanConfig]) -> list[dict]:
    """Run stages 1-6 on a batch of input files. Writes `<batch>.docs` (JSON lines), `<batch>.npz` (exact
    hashes, LSH keys) and last `<batch>.done.json`: one entry per file {"path", "key", "start" (first doc row),
    "docs", "offset"/"length" (its bytes in .docs), "stats", "errors"}, so resume works file by file."""
    files, work, cfg = args
    name = hashlib.sha256("|".join(k for _, k in files).encode()).hexdigest()[:24]
    entries: list[dict] = []
    hashes: list[int] = []
    lsh: list[np.ndarray] = []
    with atomic_write(work / f"{name}.docs", "wb") as out:
        for path, key in files:
            stats: Counter = Counter()
            errors: list[str] = []
            start, offset = len(hashes) if cfg.dedup else 0, out.tell()
            n_docs = 0
            try:
                for page in read_pages(path, stats):
                    stats["read.kept"] += 1
                    doc = process_page(page, cfg, stats)
                    if doc is None:
                        continue
                    if cfg.dedup:
                        hashes.append(doc.pop("hash"))
                        lsh.append(doc.pop("lsh"))
                    out.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
                    n_docs += 1
            except Exception as e:  # I/O error, corrupt archive: keep what was read, report the rest
                errors.append(f"{type(e).__name__}: {e}")
            entries.append(
                {
                    "path": str(path),
                    "key": key,
                    "batch": name,
                    "start": start,
                    "docs": n_docs,
                    "offset": offset,
                    "length": out.tell() - offset,
                    "stats": dict(stats),
                    "errors": errors,
                }
            )
    nb = cfg.minhash_bands
    with atomic_write(work / f"{name}.npz") as f:
        np.savez(
            f,
            hash=np.array(hashes, np.uint64),
            lsh=np.array(lsh, np.uint64).reshape(len(lsh), nb) if lsh else np.zeros((0, nb), np.uint64),
        )
    write_json(work / f"{name}.done.json", entries)
    return entries


@dataclasses.dataclass
class CleanSummary:
    out_dir: str
    documents: int  # written to the shards
    shards: list[str]
    stages: dict  # stage -> {"in", "kept", "dropped": {reason: count}}
    pii: dict  # {"email": n, "ip": n}
    bad_inputs: list[dict]  # {"path", "error"}
    files: int
    skipped: int  # inputs already done by an earlier run
    seconds: float

    def table(self) -> str:
        lines = [f"{'stage':12s} {'in':>9s} {'kept':>9s} {'dropped':>9s}  reasons"]
        for st, d in self.stages.items():
            why = ", ".join(f"{k} {v}" for k, v in sorted(d["dropped"].items(), key=lambda kv: -kv[1]))
            lines.append(f"{st:12s} {d['in']:9d} {d['kept']:9d} {d['in'] - d['kept']:9d}  {why}")
        lines.append(f"pii: {self.pii.get('email', 0)} e-mail and {self.pii.get('ip', 0)} IP addresses replaced")
        for b in self.bad_inputs:
            lines.append(f"bad input: {b['path']}: {b['error']}")
        return "\n".join(lines)


def _batches(files: list[tuple[Path, str]], procs: int, max_files: int = 64, max_bytes: int = 64 << 20):
    """Consecutive files in groups: at most `max_files` / `max_bytes`, and about 4 groups per process."""
    per = max(1, min(max_files, -(-len(files) // (4 * procs))))
    batch: list[tuple[Path, str]] = []
    size = 0
    for f in files:
        try:
            nbytes = f[0].stat().st_size
        except OSError:
            nbytes = 0
        if batch and (len(batch) >= per or size + nbytes > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += nbytes
    if batch:
        yield batch


def clean(
    inputs: list[str | os.PathLike], out_dir: str | os.PathLike, cfg: CleanConfig | None = None, progress: bool = True
) -> CleanSummary:
    """Clean web pages (files/folders of .html, .warc[.gz], .jsonl) into `out_dir`/clean_NNNNNN.jsonl."""
    from tqdm.auto import tqdm

    try:
        import fastwarc  # noqa: F401
        import py3langid  # noqa: F401
        import resiliparse  # noqa: F401
    except ImportError as e:
        raise ImportError(f"fastllm clean needs the 'clean' extra: pip install 'fastllm[clean]' ({e})") from None
    cfg = cfg or CleanConfig()
    if isinstance(cfg.lang, str):
        cfg = dataclasses.replace(cfg, lang=(cfg.lang,))
    if cfg.minhash_bands < 1 or cfg.minhash_rows < 1 or cfg.shingle_words < 1 or cfg.shard_docs < 1:
        raise ValueError("minhash_bands, minhash_rows, shingle_words and shard_docs must be positive")
    t0 = time.time()
    out = Path(out_dir)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    paths, bad = list_inputs(inputs)
    cfg_key = json.dumps(cfg.per_file_key(), sort_keys=True)
    files: list[tuple[Path, str]] = []
    for p in paths:
        try:
            files.append((p, _file_key(p, cfg_key)))
        except OSError as e:
            bad.append({"path": str(p), "error": f"unreadable: {e}"})

    # 1. inputs done by earlier runs: their entries in the batch markers
    index: dict[str, dict] = {}
    for marker in work.glob("*.done.json"):
        try:
            for e in json.loads(marker.read_text()):
                index[e["key"]] = e
        except (OSError, ValueError, KeyError, TypeError):
            pass
    pending = [f for f in files if f[1] not in index]
    skipped = len(files) - len(pending)

    # 2. the rest, in parallel batches
    procs = cfg.processes or os.cpu_count() or 1
    jobs = [(b, work, cfg) for b in _batches(pending, procs)]
    bar = tqdm(total=len(pending), desc="clean", unit="file", disable=not progress)
    pool = None
    if procs == 1 or len(jobs) <= 1:
        it = map(_process_batch, jobs)
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(min(procs, len(jobs)))  # spawn, not fork: OpenMP in the parent
        it = pool.imap_unordered(_process_batch, jobs)
    try:
        docs = 0
        for entries in it:
            for e in entries:
                index[e["key"]] = e
                docs += e["docs"]
            bar.update(len(entries))
            bar.set_postfix(docs=docs)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    # 3. per-stage counts and the dedup keys, in input order
    stats: Counter = Counter()
    entries = [index[k] for _, k in files]
    npz: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hashes, lsh = [], []
    for e in entries:
        stats.update(e["stats"])
        bad += [{"path": e["path"], "error": err} for err in e["errors"]]
        if cfg.dedup and e["docs"]:
            if e["batch"] not in npz:
                with np.load(work / f"{e['batch']}.npz") as z:
                    npz[e["batch"]] = (z["hash"], z["lsh"])
            h, k = npz[e["batch"]]
            hashes.append(h[e["start"] : e["start"] + e["docs"]])
            lsh.append(k[e["start"] : e["start"] + e["docs"]])
    npz.clear()
    n = sum(e["docs"] for e in entries)
    keep = np.ones(n, bool)
    if cfg.dedup and n:
        _, first = np.unique(np.concatenate(hashes), return_index=True)
        keep = np.zeros(n, bool)
        keep[first] = True
        stats["exact_dedup.dropped.duplicate"] += int(n - keep.sum())
        idx = np.flatnonzero(keep)
        near = near_dup_components(np.concatenate(lsh)[idx]) != np.arange(len(idx))
        keep[idx[near]] = False
        stats["near_dedup.dropped.near_duplicate"] += int(near.sum())
    stats["exact_dedup.kept"] = int(n - stats["exact_dedup.dropped.duplicate"])
    stats["near_dedup.kept"] = int(keep.sum())

    # 4. shards and summary
    shards = _write_shards(out, work, entries, keep, cfg.shard_docs)
    stages = {}
    prev = stats["read.kept"] + sum(v for k, v in stats.items() if k.startswith("read.dropped."))
    for st in STAGES:
        dropped: Counter = Counter()
        for k, v in stats.items():
            if k.startswith(f"{st}.dropped.") and v:
                dropped[k[len(st) + 9 :]] += v
        stages[st] = {"in": prev, "kept": stats[f"{st}.kept"], "dropped": dict(dropped)}
        prev = stats[f"{st}.kept"]
    summary = CleanSummary(
        out_dir=str(out),
        documents=int(keep.sum()),
        shards=[s.name for s in shards],
        stages=stages,
        pii={"email": stats["pii.email"], "ip": stats["pii.ip"]},
        bad_inputs=bad,
        files=len(files),
        skipped=skipped,
        seconds=time.time() - t0,
    )
    write_json(out / "summary.json", dataclasses.asdict(summary))
    return summary


def _write_shards(out: Path, work: Path, entries: list[dict], keep: np.ndarray, shard_docs: int) -> list[Path]:
    """The kept documents, in input order, into clean_NNNNNN.jsonl of `shard_docs` lines each (atomically)."""
    shards: list[Path] = []
    buf: list[bytes] = []

    def flush():
        p = out / f"clean_{len(shards):06d}.jsonl"
        with atomic_write(p, "wb") as f:
            f.writelines(buf)
        shards.append(p)
        buf.clear()

    i = 0
    handles: dict[str, object] = {}
    try:
        for e in entries:
            if not e["docs"]:
                continue
            if e["batch"] not in handles:
                handles[e["batch"]] = open(work / f"{e['batch']}.docs", "rb")
            f = handles[e["batch"]]
            f.seek(e["offset"])
            for line in f.read(e["length"]).splitlines(keepends=True):
                if keep[i]:
                    buf.append(line)
                    if len(buf) >= shard_docs:
                        flush()
                i += 1
    finally:
        for f in handles.values():
            f.close()
    if buf or not shards:
        flush()
    for stale in out.glob("clean_*.jsonl"):  # shards of an earlier, larger run
        if stale not in shards:
            stale.unlink()
    return shards
