"""Bytes -> text: charset decoding, main-text extraction (resiliparse) and language identification (py3langid).

Decoding order: a byte-order mark (UTF-8/16/32), then UTF-16/32 without one (told by where the NUL bytes
fall), then strict UTF-8 when there are bytes beyond ASCII, then the HTTP charset, then `<meta charset>` /
`<meta http-equiv>` / `<?xml encoding>` in the first 4 KB, then uchardet detection (resiliparse). UTF-8 comes
before the declarations because text in a legacy charset is practically never valid UTF-8, while UTF-8 pages
behind a stale Latin-1 meta tag or a server's default HTTP charset are common (trafilatura, behind FineWeb,
also takes UTF-8 first); 7-bit data follows its declaration (ISO-2022-JP is all ASCII bytes). A declared
charset that leaves over 1% replacement characters gives way to detection. uchardet detected Shift-JIS, GBK,
cp1251 and Latin-1 correctly in ~0.1 ms where charset-normalizer took 1-30 ms and read Latin-1 as cp1250.
"""

from __future__ import annotations

import codecs
import functools
import re

from .readers import unicode_encoding

_META_CHARSET = re.compile(
    rb"""(?:<meta[^>]{0,200}?charset|<\?xml[^>]{0,100}?encoding)\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.I)
# WHATWG: these labels mean the superset encoding browsers actually use.
_SUPERSETS = {
    "iso-8859-1": "cp1252", "latin-1": "cp1252", "ascii": "cp1252", "us-ascii": "cp1252", "iso-8859-9": "cp1254",
    "gb2312": "gb18030", "gbk": "gb18030", "shift_jis": "cp932", "euc-kr": "cp949", "tis-620": "cp874",
    "iso-8859-11": "cp874",
}
_WIDE = ("utf-16", "utf-32")


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    try:
        name = codecs.lookup(label.strip().strip("\"'")).name
    except LookupError:
        return None
    return _SUPERSETS.get(name.replace("_", "-"), _SUPERSETS.get(name, name))


def _wide_order(data: bytes, family: str) -> str | None:
    """A UTF-16/32 declaration without a BOM: the byte order whose strict decoding has the most characters
    of common scripts (ASCII, Latin, Cyrillic, CJK, Hangul, ...); None when neither order decodes."""
    best, best_score = None, -1.0
    unit = 2 if family == "utf-16" else 4
    for order in ("le", "be"):
        try:
            text = data[: len(data) // unit * unit].decode(f"{family}-{order}")[:2000]
        except UnicodeDecodeError:
            continue
        common = sum(1 for c in text if c < "\u0530" or "\u0e00" <= c < "\u0e80" or "\u3000" <= c < "\ua000"
                     or "\uac00" <= c < "\ud7b0")
        score = common / max(len(text), 1)
        if score > best_score:
            best, best_score = f"{family}-{order}", score
    return best


def decode_html(data: bytes | str, http_charset: str | None = None) -> str:
    """Bytes of a page or text file -> str (see the module docstring for the order of evidence)."""
    if isinstance(data, str):
        return data
    wide = unicode_encoding(data)
    if wide:
        return data[wide[1]:].decode(wide[0], errors="replace")
    if not data.isascii():
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    m = _META_CHARSET.search(data, 0, 4096)
    for declared in (_codec(http_charset), _codec(m.group(1).decode("ascii")) if m else None):
        if declared and declared.startswith(_WIDE):
            # UTF-16/32 declared but no BOM and no NUL pattern: CJK-only text (no NUL bytes), or a page the
            # server re-encoded (then it is ASCII-compatible and the declaration is stale)
            family = "utf-16" if declared.startswith("utf-16") else "utf-32"
            try:
                data.decode("utf-8")
                continue  # valid UTF-8: the declaration is stale
            except UnicodeDecodeError:
                order = _wide_order(data, family)
            if order:
                return data.decode(order, errors="replace")
        elif declared:
            text = data.decode(declared, errors="replace")
            if text.count("\ufffd") <= len(text) // 100:
                return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from resiliparse.parse.encoding import detect_encoding

    # uchardet's own label: its HTML5 mapping (the default) turns e.g. EUC-KR ("UHC") into utf-8
    enc = _codec(detect_encoding(data[:65536], html5_compatible=False)) or "cp1252"
    if enc.startswith(_WIDE) or enc == "utf-8":  # strict UTF-8 already failed
        enc = "cp1252"
    return data.decode(enc, errors="replace")


def extract_text(html: bytes | str, http_charset: str | None = None, main_content: bool = True) -> str:
    """Main text of a page (boilerplate removed: navigation, footers, scripts, menus), paragraphs on their own
    lines; the indentation of preformatted text (code in <pre>) is kept. `main_content=False` keeps all visible
    text (for feed items, which are fragments, not pages)."""
    from resiliparse.extract.html2text import extract_plain_text

    text = extract_plain_text(decode_html(html, http_charset), main_content=main_content, alt_texts=False)
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid over the first 3000 characters (its cost is linear)."""
    lang, p = _identifier().classify(text[:3000])
    return str(lang), float(p)


def known_languages() -> list[str]:
    """The language codes py3langid can output (what `--lang` accepts)."""
    return sorted(set(_identifier().nb_classes))
