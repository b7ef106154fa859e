"""Web-page cleaning throughput (fastllm.clean): pages/s and MB/s of each stage, then the whole `clean()` run
with 1 and 2 processes, and (if installed) the extractor comparison behind the choice of resiliparse.
    python benchmarks/bench_clean.py [--pages 3000] [--quick]
Corpus (generated, nothing downloaded): Python's pydoc topics cut into article-sized pieces, each wrapped in a
page with navigation, sidebar, cookie banner, scripts and footer; 10% exact and 10% near duplicates; a tenth of
the pages in windows-1251 / Latin-1 / Shift-JIS with their own prose. Stage MB/s count the stage's input (HTML
bytes for read/extract, extracted text for the rest). Single stages run in this process, one page at a time."""

from __future__ import annotations

import argparse
import html
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import load_note, print_table  # noqa: E402

from fastllm import clean as C  # noqa: E402

FOREIGN = {
    "windows-1251": "Комитет собрался во вторник, чтобы обсудить новый бюджет, и большинство членов согласились, "
    "что план нуждается в доработке перед голосованием. Владельцы кафе заявили, что предложение игнорирует "
    "расходы малого бизнеса каждой зимой.",
    "latin-1": "Le comité s'est réuni mardi pour discuter du nouveau budget, et la plupart des membres ont convenu "
    "que le plan devait être retravaillé avant le vote. Les propriétaires de cafés ont déclaré que la "
    "proposition ignorait les coûts élevés.",
    "shift_jis": "委員会は火曜日に新しい予算について話し合うために会合を開き、ほとんどのメンバーが計画にはさらなる"
    "作業が必要だと同意した。カフェの経営者たちは、その提案は小さな企業が毎年冬に直面する費用を無視していると述べた。",
}
NAV = "".join(f'<li><a href="/{w.lower()}">{w}</a></li>' for w in "Home News Sport Weather About Contact".split())


def wrap(i: int, paras: list[str], charset: str) -> str:
    side = "".join(f'<li><a href="/r{i}-{k}">Read more: story {k * 7 + i}</a></li>' for k in range(8))
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paras)
    return (
        f'<!DOCTYPE html><html><head><meta charset="{charset}"><title>Page {i}</title>'
        f"<style>.x{{color:red}}</style><script>window.dataLayer=[{{page:{i}}}];</script></head><body>"
        f'<header><div class="logo">Example</div><nav><ul>{NAV}</ul></nav></header>'
        f'<div class="cookie-banner">We use cookies. <button>Accept all</button></div>'
        f"<main><article><h1>Page {i}</h1>{body}</article></main>"
        f'<aside class="sidebar"><h3>Related</h3><ul>{side}</ul></aside>'
        f"<footer><p>Copyright 2024 Example Ltd.</p><ul>{NAV}</ul><script>track({i});</script></footer></body></html>"
    )


def corpus(n: int, seed: int = 0) -> list[bytes]:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    paras = [p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if len(p.strip()) > 80]
    pages: list[bytes] = []
    for i in range(n):
        r = rng.random()
        if r < 0.1 and pages:  # exact duplicate
            pages.append(pages[rng.randrange(len(pages))])
            continue
        if r < 0.2 and pages:  # near duplicate: the same page with a word added
            src = pages[rng.randrange(len(pages))]
            pages.append(src.replace(b"<p>", b"<p>Updated: ", 1))
            continue
        if r < 0.3:
            enc = rng.choice(list(FOREIGN))
            text = [FOREIGN[enc] + f" ({i}, {k})" for k in range(rng.randint(3, 6))]
            pages.append(wrap(i, text, enc).encode(enc))
            continue
        pages.append(wrap(i, rng.sample(paras, rng.randint(3, 10)), "utf-8").encode())
    return pages


def timed(fn, items) -> tuple[list, float]:
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - t0


def extractor_comparison(pages: list[bytes], n: int = 300) -> None:
    """Speed and quality of the extractors on the same pages: share of article paragraphs recovered and share
    of output words that are not article words (boilerplate)."""
    cands = {"resiliparse (chosen)": lambda h: C.extract_text(h)}
    try:
        import trafilatura

        cands["trafilatura"] = lambda h: trafilatura.extract(C.decode_html(h)) or ""
    except ImportError:
        pass
    try:
        from selectolax.lexbor import LexborHTMLParser

        def sel(h):
            t = LexborHTMLParser(C.decode_html(h))
            t.strip_tags(["script", "style", "nav", "header", "footer", "aside", "noscript"])
            return t.body.text(separator="\n") if t.body else ""

        cands["selectolax + tag strip"] = sel
    except ImportError:
        pass
    import re

    sample = [p for p in pages if b'charset="utf-8"' in p][:n]
    golds = [[html.unescape(x) for x in re.findall(r"<p>(.*?)</p>", p.decode(), re.S)[:-1]] for p in sample]
    rows = []
    for name, fn in cands.items():
        outs, dt = timed(fn, sample)
        rec = sum(
            sum(" ".join(g.split()) in " ".join(o.split()) for g in gold) / len(gold) for o, gold in zip(outs, golds)
        ) / len(sample)
        extra = 0.0
        for o, gold in zip(outs, golds):
            gw = set(" ".join(gold).split())
            ow = o.split()
            extra += sum(w not in gw for w in ow) / max(len(ow), 1)
        mb = sum(map(len, sample)) / 1e6
        rows.append([name, f"{len(sample) / dt:,.0f}", f"{mb / dt:.1f}", f"{rec:.3f}", f"{extra / len(sample):.3f}"])
    print("\nextractors on", len(sample), "UTF-8 pages:")
    print_table(rows, ["extractor", "pages/s", "MB/s", "paragraphs recovered", "non-article words"])


def run(n_pages: int, quick: bool) -> None:
    print(f"clean stages | {n_pages} pages | {load_note()}")
    pages = corpus(n_pages)
    html_mb = sum(map(len, pages)) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench_clean_"))
    try:
        src = tmp / "pages"
        src.mkdir()
        for i, p in enumerate(pages):
            (src / f"{i:06d}.html").write_bytes(p)
        files = sorted(src.iterdir())
        cfg = C.CleanConfig()
        rows = []

        def row(name, secs, count, mb):
            rows.append([name, f"{count / secs:,.0f}", f"{mb / secs:,.1f}", f"{secs:.2f}"])

        C.detect_language("warm up: load the language model")  # ~0.5 s once per process
        got, dt = timed(lambda f: list(C.read_pages(f)), files)
        row("read (HTML files)", dt, len(files), html_mb)
        _, dt = timed(C.decode_html, pages)
        row("decode charset", dt, len(pages), html_mb)
        texts, dt = timed(C.extract_text, pages)
        row("extract (decode + main text)", dt, len(pages), html_mb)
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        langs, dt = timed(C.detect_language, texts)
        row("language id", dt, len(texts), text_mb)
        _, dt = timed(lambda t: C.quality_reason(t, cfg, "en"), texts)
        row("quality rules", dt, len(texts), text_mb)
        _, dt = timed(C.scrub_pii, texts)
        row("PII scrub", dt, len(texts), text_mb)
        _, dt = timed(C.exact_hash, texts)
        row("exact hash", dt, len(texts), text_mb)
        nb, nr = cfg.minhash_bands, cfg.minhash_rows
        keys, dt = timed(lambda t: C.lsh_keys(C.minhash(t, nb * nr, cfg.shingle_words), nb, nr), texts)
        row("MinHash + LSH keys", dt, len(texts), text_mb)
        import numpy as np

        t0 = time.perf_counter()
        C.near_dup_components(np.stack(keys))
        row("near-dup components (all)", time.perf_counter() - t0, len(texts), text_mb)
        print_table(rows, ["stage", "pages/s", "MB/s", "seconds"])
        print(
            f"corpus: {html_mb:.1f} MB of HTML -> {text_mb:.1f} MB of text; languages "
            f"{dict(Counter(lang for lang, _ in langs).most_common(4))}"
        )

        rows = []
        for procs in (1, 2):
            out = tmp / f"out{procs}"
            t0 = time.perf_counter()
            s = C.clean([src], out, C.CleanConfig(processes=procs), progress=False)
            dt = time.perf_counter() - t0
            rows.append(
                [
                    f"clean() processes={procs}",
                    f"{len(pages) / dt:,.0f}",
                    f"{html_mb / dt:.1f}",
                    f"{dt:.2f}",
                    str(s.documents),
                ]
            )
            t0 = time.perf_counter()
            C.clean([src], out, C.CleanConfig(processes=procs), progress=False)
            dt = time.perf_counter() - t0
            rows.append(["  re-run (all inputs done)", f"{len(pages) / dt:,.0f}", "", f"{dt:.2f}", ""])
        print()
        print_table(rows, ["end to end", "pages/s", "MB/s", "seconds", "docs kept"])
        print(s.table())
        if not quick:
            extractor_comparison(pages)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="500 pages, no extractor comparison")
    a = ap.parse_args()
    run(500 if a.quick else a.pages, a.quick)
