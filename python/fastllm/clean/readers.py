"""Inputs of `fastllm clean`: find the files, tell what each one is by its content, and read its documents.

A file's kind comes from its first 64 KB (after decompression), never from its name:
  compressed   gzip / bz2 / xz / zstd (zstd needs Python 3.14 or the `zstandard` package) around any kind below
  warc         "WARC/1.x" records: response (HTTP) and resource records with an HTML or plain-text payload
  feed         RSS 0.9x/2.0, RSS 1.0 (RDF) and Atom: one document per item/entry
  html         HTML and XHTML pages (a doctype, <html>/<head>/<body>, or several common tags)
  jsonl        JSON Lines with an "html" or a "text" field per object
  parquet      Parquet with an "html" or a "text" column (FineWeb's and most Hub datasets' files; needs pyarrow)
  text         anything else that decodes as text (plain text, Markdown, subtitles: SRT/WebVTT cues removed)
Files that cannot be used are reported with a reason: `binary` (NUL bytes outside UTF-16/32, many control
bytes, image/executable signatures), `unsupported` (archives, PDF, other XML, lz4, a FIFO or device),
`corrupt` (bad compression, a WARC record that does not parse), `empty`, `not_found`, `unreadable`.

The WARC reader is our own (a few dozen lines over the stdlib decompressors) so that damage is reported, not
hidden: a truncated file raises after the complete records it holds, and a record whose Content-Length is
wrong (the block is not followed by CRLF CRLF, or its WARC-Block-Digest does not match) is dropped and reading
resumes at the next record instead of swallowing it.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import io
import json
import os
import re
import stat
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..fileio import DECOMPRESS_ERRORS, iter_parquet, open_decompressed

HEAD = 65536  # bytes of a file looked at to tell its kind
REASONS = ("unsupported", "binary", "corrupt", "empty", "not_found", "unreadable")


class InputError(ValueError):
    """A file that cannot be used (or only partly): `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- finding the files ---------------------------------------------------------------------------------


def list_inputs(inputs: list[str | os.PathLike],
                exclude: list[str | os.PathLike] = ()) -> tuple[list[Path], list[dict]]:
    """Expand files and folders (recursively, every file) -> (regular files, bad inputs {"path", "reason",
    "error"}). Folders in `exclude` (the output folder) and `.work` folders are never read; special files
    (FIFOs, devices, sockets) are reported, never opened."""
    skip = {os.path.realpath(p) for p in exclude}
    files: list[Path] = []
    bad: list[dict] = []

    def add(p: Path, explicit: bool) -> None:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            what = "a dangling symbolic link" if os.path.islink(p) else "not found"
            bad.append({"path": str(p), "reason": "not_found", "error": what})
            return
        except OSError as e:
            bad.append({"path": str(p), "reason": "unreadable", "error": e.strerror or str(e)})
            return
        if stat.S_ISREG(st.st_mode):
            files.append(p)
        elif stat.S_ISDIR(st.st_mode):
            if os.path.realpath(p) in skip:
                return
            before = len(files) + len(bad)
            def unreadable(e: OSError) -> None:
                bad.append({"path": e.filename, "reason": "unreadable", "error": e.strerror or str(e)})

            for root, dirs, names in os.walk(p, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs
                                 if d != ".work" and os.path.realpath(os.path.join(root, d)) not in skip)
                for name in sorted(names):
                    add(Path(root) / name, False)
            if explicit and len(files) + len(bad) == before:
                bad.append({"path": str(p), "reason": "empty", "error": "folder holds no files"})
        else:
            kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "character device" if stat.S_ISCHR(st.st_mode)
                    else "block device" if stat.S_ISBLK(st.st_mode) else "socket")
            bad.append({"path": str(p), "reason": "unsupported", "error": f"not a regular file ({kind})"})

    for inp in inputs:
        add(Path(inp), True)
    return list(dict.fromkeys(files)), bad


# ---- telling a file's kind -----------------------------------------------------------------------------

_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_SIGNATURES = (  # (magic, reason, what)
    (b"\x89PNG\r\n\x1a\n", "binary", "PNG image"), (b"\xff\xd8\xff", "binary", "JPEG image"),
    (b"GIF87a", "binary", "GIF image"), (b"GIF89a", "binary", "GIF image"), (b"\x7fELF", "binary", "executable"),
    (b"MZ", "binary", "executable"), (b"\x00asm", "binary", "WebAssembly"), (b"OggS", "binary", "audio"),
    (b"ID3", "binary", "audio"), (b"fLaC", "binary", "audio"), (b"%PDF-", "unsupported", "PDF document"),
    (b"PK\x03\x04", "unsupported", "zip archive"), (b"7z\xbc\xaf\x27\x1c", "unsupported", "7z archive"),
    (b"Rar!", "unsupported", "rar archive"), (b"\x04\x22\x4d\x18", "unsupported", "lz4-compressed"),
    (b"filedesc://", "unsupported", "ARC file (the format before WARC)"),
    (b"SQLite format 3", "binary", "SQLite database"),
)
_UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                 (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_HTML_START = re.compile(r"<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>]", re.I)
_HTML_TAG = re.compile(r"<(?:p|div|span|a|br|table|td|li|ul|h[1-6]|meta|title|script|style|article|section)[\s>/]",
                       re.I)
_XML_ROOT = re.compile(r"<([A-Za-z_][\w:.-]*)")
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b")


def unicode_encoding(data: bytes) -> tuple[str, int] | None:
    """(codec, BOM length) of UTF-8/16/32 text told by a byte-order mark, or for UTF-16/32 without one by where
    its NUL bytes fall (ASCII-range characters -- markup, digits, spaces -- have NUL high bytes); else None."""
    for bom, enc in _UNICODE_BOMS:
        if data.startswith(bom):
            return enc, len(bom)
    n = min(len(data), 4096) // 4 * 4
    if n < 16:
        return None
    z = [data[i:n:4].count(0) / (n // 4) for i in range(4)]
    even, odd = (z[0] + z[2]) / 2, (z[1] + z[3]) / 2
    enc = ("utf-32-le" if z[0] < 0.5 and min(z[2], z[3]) > 0.9 else  # the top bytes of a code point are 0
           "utf-32-be" if z[3] < 0.5 and min(z[0], z[1]) > 0.9 else
           "utf-16-le" if odd > 0.2 and even < odd / 10 else
           "utf-16-be" if even > 0.2 and odd < even / 10 else None)
    if enc is None:
        return None
    text = data[:n].decode(enc, errors="replace")  # text, not binary that happens to have NULs in a pattern
    bad = sum(1 for c in text if (c < " " and c not in "\t\n\r\f\v\x1b") or c == "\ufffd" or "\x7f" <= c < "\xa0")
    return (enc, 0) if bad <= 0.02 * len(text) else None


def sniff(head: bytes) -> tuple[str, str]:
    r"""Kind of a (decompressed) file from its first bytes -> (kind, detail); kind is one of "warc", "parquet",
    "feed", "html", "jsonl", "text", or a reason from REASONS for a file that cannot be used.

    >>> sniff(b"<!DOCTYPE html><html><body><p>Hi</p></body></html>"), sniff(b"\x89PNG\r\n\x1a\n....")
    (('html', ''), ('binary', 'PNG image'))
    """
    if not head.strip():
        return "empty", "no content" if not head else "only whitespace"
    if head.startswith(b"WARC/"):
        return "warc", ""
    if head.startswith(b"PAR1"):
        return "parquet", ""
    for magic, reason, what in _SIGNATURES:
        if head.startswith(magic):
            return reason, what
    enc = unicode_encoding(head)
    if enc is None:
        if b"\0" in head:
            return "binary", "NUL bytes (not UTF-16/32 text)"
        if sum(head.count(c) for c in _CONTROL) > 0.05 * len(head):
            return "binary", "control bytes"
        text = head.decode("latin-1")
    else:
        text = head[enc[1]:].decode(enc[0], errors="replace")
    s = text.lstrip("\ufeff \t\r\n")
    if s.startswith("{"):
        first = s.split("\n", 1)[0]
        try:
            ok = isinstance(json.loads(first), dict)
        except ValueError:
            ok = "\n" not in s and len(head) >= HEAD  # one long first line cut by the head: trust the brace
        return ("jsonl", "") if ok else ("unsupported", "JSON, not JSON Lines")
    if s.startswith("["):
        try:
            json.loads(s)
            return "unsupported", "JSON array, not JSON Lines"
        except ValueError:
            pass
    low = s[:4096].lower()
    if low.startswith(("<?xml", "<rss", "<feed", "<rdf:")):
        body = re.sub(r"<\?.*?\?>|<!--.*?-->|<!doctype[^>]*>", "", s[:8192], flags=re.S | re.I)
        m = _XML_ROOT.search(body)
        root = m.group(1).lower() if m else ""
        if root in ("rss", "feed", "rdf:rdf") or root.endswith(":rdf"):
            return "feed", root
        if root == "html" or root.endswith(":html"):
            return "html", "xhtml"
        return "unsupported", f"XML document <{root or '?'}>"
    if _HTML_START.search(low) or len(_HTML_TAG.findall(low)) >= 3:
        return "html", ""
    return "text", ""


def _open_decompressed(path: Path, kind: str):
    """A decompressing reader of the file (it closes the file when closed)."""
    try:
        return open_decompressed(path, kind)
    except ImportError as e:  # zstd without a module to read it
        raise InputError("unsupported", str(e)) from None


def open_input(path: str | os.PathLike) -> tuple[io.BufferedIOBase, str, str, str]:
    """Open a file, decompressing as its magic bytes say -> (binary stream, kind, detail, compression).
    Raises InputError for files that cannot be used; the caller closes the stream."""
    path = Path(path)
    try:
        raw = open(path, "rb", buffering=HEAD)
    except OSError as e:
        raise InputError("unreadable", e.strerror or str(e)) from None
    try:
        magic = raw.read(8)
        raw.seek(0)
        compression = next((name for m, name in _COMPRESSED if magic.startswith(m)), "")
        if compression:  # the head from a decompressor of its own, so that damage past the head is found later
            raw.close()
            head = b""
            try:
                with _open_decompressed(path, compression) as d:
                    while len(head) < HEAD and (chunk := d.read(4096)):
                        head += chunk
            except DECOMPRESS_ERRORS as e:
                if not head:
                    raise InputError("corrupt", f"{compression} stream: {e}") from None
            f = _open_decompressed(path, compression)  # (a read-ahead buffer here would hit damage early)
        else:
            f, head = raw, raw.peek(HEAD)[:HEAD]
        kind, detail = sniff(head)
        if kind == "parquet" and compression:  # its reader seeks; Parquet compresses its own pages anyway
            kind, detail = "unsupported", "Parquet file (read uncompressed)"
        if kind in REASONS:
            raise InputError(kind, f"{detail}{f' inside {compression}' if compression else ''}")
        return f, kind, detail, compression
    except BaseException:
        raw.close()
        raise


# ---- reading documents ---------------------------------------------------------------------------------


def read_pages(path: str | os.PathLike, stats: Counter | None = None) -> Iterator[dict]:
    """Documents of one input file, whatever its kind (see the module docstring), as dicts:
    {"html": bytes | str, "charset": str | None, "url": str} for pages (plus "fragment": True for feed items,
    which are not whole pages), {"text": str, "url": str} for plain text. Records that cannot be used are
    counted in `stats` ("read.dropped.<reason>"). A file that cannot be used at all, or whose damage is found
    while reading (after the documents before it were yielded), raises InputError with the reason."""
    path = Path(path)
    stats = Counter() if stats is None else stats
    f, kind, _, compression = open_input(path)

    def pages() -> Iterator[dict]:
        if kind == "warc":
            yield from _read_warc(f, stats)
        elif kind == "jsonl":
            yield from _read_jsonl(f, path, stats)
        elif kind == "parquet":
            yield from _read_parquet(path, stats)
        else:
            data = f.read()
            if kind == "feed":
                yield from _read_feed(data, str(path), stats)
            elif kind == "html":
                yield {"html": data, "charset": None, "url": str(path)}
            else:
                yield {"text": unwrap(strip_subtitles(decode_bytes(data))), "url": str(path)}

    n = 0
    with f:
        try:
            for page in pages():
                yield page
                n += 1
        except DECOMPRESS_ERRORS as e:
            if isinstance(e, InputError):
                raise
            raise InputError("corrupt", f"{compression or 'file'} stream breaks off after {n} documents "
                                        f"(those were read): {type(e).__name__}: {e}") from None


def _read_jsonl(f, path: Path, stats: Counter) -> Iterator[dict]:
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


def _read_parquet(path: Path, stats: Counter) -> Iterator[dict]:
    """Rows of a Parquet file as JSONL records are read: its "html" column, else its "text" column; "url" or
    "id" names each document."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("unsupported", "a Parquet file: reading it needs pyarrow (pip install pyarrow)") from None
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow.ArrowInvalid: truncated, not Parquet
        raise InputError("corrupt", f"not a readable Parquet file ({type(e).__name__}: {e})") from None
    field = next((c for c in ("html", "text") if c in names), None)
    if field is None:
        raise InputError("unsupported", f"Parquet file without an 'html' or 'text' column (columns: {names})")
    try:
        for where, row in iter_parquet(path, [c for c in (field, "url", "id") if c in names]):
            url = str(row.get("url") or row.get("id") or where)
            if not isinstance(row.get(field), (str, bytes) if field == "html" else str):
                stats["read.dropped.no_text_or_html_field"] += 1
            elif field == "html":  # str, or bytes (a binary column) decoded like a page's bytes
                yield {"html": row["html"], "charset": None, "url": url}
            else:
                yield {"text": row["text"], "url": url}
    except ValueError as e:  # a damaged page: the rows before it were read
        raise InputError("corrupt", str(e).removeprefix(f"{path}: ")) from None


def decode_bytes(data: bytes | str, http_charset: str | None = None) -> str:
    from .extract import decode_html

    return decode_html(data, http_charset)


_CUE_TIME = re.compile(r"^\s*(?:\d{1,2}:)?\d{1,2}:\d{2}[,.]\d{1,3}\s*-->")
_SENTENCE_END = re.compile(r"[.!?…。！？」』\"'”’»)]$")


def strip_subtitles(text: str) -> str:
    """SRT / WebVTT subtitles -> their spoken text: cue numbers, timings and styling removed, cues joined into
    paragraphs of whole sentences (at least ~200 characters); other text unchanged."""
    lines = text.splitlines()
    if sum(1 for ln in lines[:200] if _CUE_TIME.match(ln)) < 3:
        return text
    paras, cur = [], []
    for i, ln in enumerate(lines):
        s = ln.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not s or _CUE_TIME.match(s) or (s.isdigit() and _CUE_TIME.match(nxt)) or s.startswith(("WEBVTT", "NOTE ")):
            continue
        cur.append(re.sub(r"</?[ibuv][^>]*>|\{\\[^}]*\}", "", s))
        if _SENTENCE_END.search(cur[-1]) and sum(map(len, cur)) >= 200:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


_NO_SPACE = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef\u0e00-\u0e7f]")  # scripts without spaces


def unwrap(text: str) -> str:
    """Plain text hard-wrapped at a fixed width (most lines close to the longest, 40-100 characters) -> one
    line per paragraph (paragraphs are separated by blank lines), so that line rules see paragraphs."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    lens = sorted(len(ln) for ln in lines if ln.strip())
    if len(lens) < 5:
        return text
    width = lens[int(0.9 * (len(lens) - 1))]
    if not 40 <= width <= 100 or sum(1 for n in lens if n >= 0.7 * width) < 0.5 * len(lens):
        return text
    paras, cur = [], []
    for ln in lines + [""]:
        if ln.strip():
            cur.append(ln.strip())
        elif cur:
            joined = cur[0]
            for nxt in cur[1:]:  # no space between characters of scripts written without spaces
                joined += ("" if _NO_SPACE.match(joined[-1]) and _NO_SPACE.match(nxt) else " ") + nxt
            paras.append(joined)
            cur = []
    return "\n\n".join(paras)


# ---- feeds ---------------------------------------------------------------------------------------------

_ITEM = re.compile(r"<(item|entry)[\s>].*?</\1\s*>", re.S | re.I)
_FIELD = re.compile(r"<((?:\w+:)?(?:title|description|summary|content|encoded|link|id|guid))(\s[^>]*)?>(.*?)</\1\s*>",
                    re.S | re.I)
_CDATA = re.compile(r"<!\[CDATA\[(.*?)\]\]>", re.S)
_LINK_HREF = re.compile(r"""<link\s[^>]*?href\s*=\s*["']([^"']+)["']""", re.I)


def _read_feed(data: bytes, url: str, stats: Counter) -> Iterator[dict]:
    """One page per RSS item / Atom entry: its title and its richest body (content > description/summary),
    which feeds carry as escaped HTML or CDATA. Parsed with regular expressions, not an XML parser, because
    real feeds are often not well-formed XML (bad entities, stray '&')."""
    import html

    text = decode_bytes(data)
    n = 0
    for m in _ITEM.finditer(text):
        fields: dict[str, str] = {}
        for f in _FIELD.finditer(m.group(0)):
            name = f.group(1).lower().split(":")[-1]
            value = _CDATA.sub(lambda c: c.group(1), f.group(3)).strip()
            if "<" not in value or name in ("title", "link", "id", "guid"):  # escaped HTML -> HTML
                value = html.unescape(value)
            fields.setdefault(name, value)
        body = fields.get("encoded") or fields.get("content") or fields.get("description") or fields.get("summary")
        link = fields.get("link") or (lambda h: h.group(1) if h else "")(_LINK_HREF.search(m.group(0)))
        if not body and not fields.get("title"):
            stats["read.dropped.empty_feed_item"] += 1
            continue
        title = fields.get("title", "")
        page = f"<h1>{html.escape(re.sub('<[^>]+>', '', title))}</h1>\n{body or ''}" if title else body
        n += 1
        yield {"html": page, "charset": None, "url": link or fields.get("id") or fields.get("guid") or f"{url}#{n}",
               "fragment": True}
    if n == 0:
        stats["read.dropped.empty_feed"] += 1


# ---- WARC ----------------------------------------------------------------------------------------------


class _Stream:
    """A binary stream with readline/read and a push-back buffer (for resynchronising after a bad record)."""

    def __init__(self, f):
        self.f, self.pending, self.pos = f, b"", 0

    def readline(self, limit: int = 1 << 16) -> bytes:
        i = self.pending.find(b"\n", 0, limit)
        if i >= 0 or len(self.pending) >= limit:
            n = i + 1 if i >= 0 else limit
            line, self.pending = self.pending[:n], self.pending[n:]
        else:  # the rest of the line (all of it when nothing is pushed back) from the stream
            line, self.pending = self.pending, b""
            line += self.f.readline(limit - len(line))
        self.pos += len(line)
        return line

    def read(self, n: int) -> bytes:
        out = self.pending[:n]
        self.pending = self.pending[n:]
        while len(out) < n:
            chunk = self.f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        self.pos += len(out)
        return out

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending
        self.pos -= len(data)

    def seek_record(self, data: bytes) -> bool:
        """Push back `data` (bytes after a bad record's header) and move to the next "WARC/" line in it or in
        the rest of the stream; False at the end of the stream."""
        sep = b"\r\n\r\nWARC/"
        while True:
            i = data.find(sep)
            if i >= 0:
                self.unread(data[i + 4:])
                return True
            more = self.f.read(1 << 20)
            self.pos += len(more)
            if not more:
                return False
            data = data[-(len(sep) - 1):] + more


def _digest_ok(spec: str | None, block: bytes) -> bool:
    """WARC-Block-Digest check (sha1/sha256/md5 in base32 or hex); True when absent or unknown."""
    if not spec or ":" not in spec:
        return True
    algo, _, value = spec.partition(":")
    try:
        h = hashlib.new(algo.strip().lower().replace("-", ""), block).digest()
    except ValueError:
        return True
    value = value.strip()
    return value.upper() == base64.b32encode(h).decode() or value.lower() == h.hex()


def _read_warc(f, stats: Counter) -> Iterator[dict]:
    r = _Stream(f)
    records = bad = 0
    first_bad = ""
    while True:
        start = r.pos
        line = r.readline()
        while line.strip() == b"" and line:
            start = r.pos
            line = r.readline()
        if not line:
            break
        if not line.startswith(b"WARC/"):
            raise InputError("corrupt", f"record {records + 1} at byte {start}: expected a 'WARC/1.x' line, got "
                                        f"{line[:40]!r}")
        headers: dict[str, str] = {}
        while True:
            h = r.readline()
            if not h:
                raise InputError("corrupt", f"record {records + 1} at byte {start}: header cut off (truncated file)")
            if h in (b"\r\n", b"\n"):
                break
            k, sep, v = h.decode("utf-8", "replace").partition(":")
            if not sep:
                raise InputError("corrupt", f"record {records + 1} at byte {start}: bad header line {h[:60]!r}")
            headers[k.strip().lower()] = v.strip()
        try:
            length = int(headers["content-length"])
            if length < 0:
                raise ValueError
        except (KeyError, ValueError):
            raise InputError("corrupt", f"record {records + 1} at byte {start}: missing or bad Content-Length "
                                        f"{headers.get('content-length')!r}") from None
        block = r.read(length)
        end = r.read(4)
        records += 1
        if len(block) < length and b"\r\n\r\nWARC/" not in block:
            raise InputError("corrupt", f"record {records} at byte {start}: truncated ({len(block)} of {length} "
                                        f"bytes); {records - 1 - bad} complete records before it were read")
        if end != b"\r\n\r\n" or not _digest_ok(headers.get("warc-block-digest"), block):
            # the Content-Length is wrong: drop this record and resume at the next "WARC/" line
            stats["read.dropped.bad_record_length"] += 1
            bad += 1
            first_bad = first_bad or f"record {records} at byte {start}"
            if not r.seek_record(block + end):
                break
            continue
        page = _warc_page(headers, block, stats)
        if page is not None:
            yield page
    if bad:
        raise InputError("corrupt", f"{bad} WARC record(s) whose Content-Length does not match the data were "
                                    f"dropped (first: {first_bad}); the records around them were read")


def _warc_page(headers: dict[str, str], block: bytes, stats: Counter) -> dict | None:
    wtype = headers.get("warc-type", "").lower()
    url = headers.get("warc-target-uri", "")
    if wtype == "response" and headers.get("content-type", "application/http").lower().startswith("application/http"):
        head, sep, body = block.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = block.partition(b"\n\n")
        fields = (ln.partition(":") for ln in head.decode("latin-1").splitlines()[1:])
        http = {k.strip().lower(): v.strip() for k, _, v in fields}
        ctype = http.get("content-type", "text/html")
        body = _http_body(body, http, stats)
        if body is None:
            return None
    elif wtype in ("response", "resource"):
        ctype, body = headers.get("content-type", "text/html"), block
    else:
        return None  # request, metadata, warcinfo, revisit, conversion: no page
    low = ctype.lower()
    charset = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", ctype, re.I)
    charset = charset.group(1) if charset else None
    if not body:
        stats["read.dropped.empty_record"] += 1
        return None
    if "html" in low:
        return {"html": body, "charset": charset, "url": url}
    if low.startswith("text/plain"):
        return {"text": decode_bytes(body, charset), "url": url}
    stats["read.dropped.not_html"] += 1
    return None


def _http_body(body: bytes, http: dict[str, str], stats: Counter) -> bytes | None:
    """Undo chunked transfer encoding and gzip/deflate content encoding (as crawlers may store them)."""
    if "chunked" in http.get("transfer-encoding", "").lower():
        out, i = [], 0
        try:
            while True:
                j = body.index(b"\r\n", i)
                n = int(body[i:j].split(b";")[0], 16)
                if n == 0:
                    break
                out.append(body[j + 2:j + 2 + n])
                i = j + 4 + n
            body = b"".join(out)
        except ValueError:
            pass  # not really chunked (the crawler already decoded it): keep the bytes
    enc = http.get("content-encoding", "").lower().strip()
    if enc in ("gzip", "x-gzip", "deflate"):
        try:
            body = zlib.decompress(body, 47 if enc != "deflate" else 15)
        except zlib.error:
            try:  # deflate: maybe raw (no zlib header); gzip: kept if the crawler already decoded it, but a body
                # that starts with gzip's magic bytes and does not decompress is broken (truncated, say)
                if enc == "deflate":
                    body = zlib.decompress(body, -15)
                elif body.startswith(b"\x1f\x8b"):
                    raise
            except zlib.error:
                stats["read.dropped.bad_content_encoding"] += 1
                return None
    elif enc not in ("", "identity", "none"):
        stats["read.dropped.unsupported_content_encoding"] += 1
        return None
    return body
