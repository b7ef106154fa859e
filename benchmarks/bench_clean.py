"""Web-page cleaning throughput (fastllm.clean): pages/s and MB/s of each stage, then the whole `clean()` run
with 1 and 2 processes and on a Dask LocalCluster of 2 workers (interleaved runs, medians), and (if installed)
the extractor comparison behind the choice of resiliparse; `--segmenters` measures the characters per word of
Chinese/Japanese/Thai with jieba / TinySegmenter / PyThaiNLP (behind the word-count rule of filters.py).
    python benchmarks/bench_clean.py [--pages 3000] [--quick] [--segmenters]
Corpus (generated, nothing downloaded): Python's pydoc topics cut into article-sized pieces, each wrapped in a
page with navigation, sidebar, cookie banner, scripts and footer; 10% exact and 10% near duplicates; a tenth of
the pages in windows-1251 / Latin-1 / Shift-JIS / GBK / TIS-620 with their own prose. Stage MB/s count the
stage's input (HTML bytes for read/extract, extracted text for the rest). Single stages run in this process,
one page at a time."""

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

from common import header, print_table  # noqa: E402

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
    "gbk": "这个城市位于河流的南岸，历史悠久，文化丰富。每年春天，许多游客来到这里参观古老的寺庙和美丽的花园。"
    "当地居民大多从事农业和手工业，他们的生活简单而安静。",
    "cp874": "ประเทศไทยมีประวัติศาสตร์ที่ยาวนานและวัฒนธรรมที่หลากหลาย ผู้คนในหมู่บ้านเล็กๆ ทางภาคเหนือมักจะตื่นเช้าเพื่อไปทำงานในไร่นา"
    "ของพวกเขา การเกษตรเป็นอาชีพหลักของคนในชนบท และข้าวเป็นพืชที่สำคัญที่สุดของประเทศ",
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


def end_to_end(src: Path, tmp: Path, n: int, html_mb: float, repeats: int) -> dict[str, tuple[float, int, float]]:
    """clean() with 1 process, 2 processes and a Dask LocalCluster of 2 worker processes (started once, its
    start-up timed apart), interleaved `repeats` times -> {label: (median seconds, docs kept, re-run seconds)}."""
    import statistics

    configs = {"clean() processes=1": (1, None), "clean() processes=2": (2, None)}
    client = cluster = None
    try:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
        client.run(C.detect_language, "warm up")  # load the language model in the workers, as the pool does
        print(f"Dask LocalCluster of 2 workers started in {time.perf_counter() - t0:.1f}s (not in the times below)")
        configs["clean(dask=LocalCluster 2 workers)"] = (2, client)
    except ImportError:
        print("dask[distributed] not installed: no Dask rows")
    times: dict[str, list[float]] = {k: [] for k in configs}
    out: dict[str, tuple[float, int, float]] = {}
    try:
        for r in range(repeats):
            for label, (procs, dask) in configs.items():
                dest = tmp / f"out-{len(out)}-{r}-{procs}-{dask is not None}"
                t0 = time.perf_counter()
                s = C.clean([src], dest, C.CleanConfig(processes=procs), progress=False, dask=dask)
                times[label].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                C.clean([src], dest, C.CleanConfig(processes=procs), progress=False, dask=dask)
                out[label] = (0.0, s.documents, time.perf_counter() - t0)
        for label in configs:
            out[label] = (statistics.median(times[label]), *out[label][1:])
    finally:
        if client is not None:
            client.close()
            cluster.close()
    return out


def segmenters() -> None:
    """Characters per word of Chinese, Japanese and Thai as the field's segmenters cut them (jieba,
    TinySegmenter, PyThaiNLP newmm), on this system's gettext catalogues (real translated text), and their
    speed: the evidence behind fastllm.clean.filters' characters-per-word rule."""
    import gettext
    import glob
    import re

    import numpy as np

    try:
        import jieba
        import tinysegmenter
        from pythainlp.tokenize import word_tokenize
    except ImportError as e:
        print(f"\nsegmenters: {e.name} not installed (pip install jieba tinysegmenter pythainlp)")
        return
    jieba.setLogLevel(60)
    ts = tinysegmenter.TinySegmenter()
    langs = {"zh": ("zh_CN", r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]", jieba.lcut),
             "ja": ("ja", r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]", ts.tokenize),
             "th": ("th", r"[\u0e00-\u0e7f]", lambda s: word_tokenize(s, engine="newmm"))}
    rows = []
    for lang, (loc, script, seg) in langs.items():
        docs = []
        for f in sorted(glob.glob(f"/usr/share/locale/{loc}/LC_MESSAGES/*.mo")):
            try:
                with open(f, "rb") as fh:
                    docs += [v for v in gettext.GNUTranslations(fh)._catalog.values() if isinstance(v, str)]
            except (OSError, ValueError):
                continue
        rx = re.compile(script)
        docs = [d for d in docs if len(rx.findall(d)) >= 10]
        if not docs:
            continue
        t0 = time.perf_counter()
        per, chars, words = [], 0, 0
        for d in docs:
            ws = [w for w in seg(d) if rx.search(w)]
            c = sum(len(rx.findall(w)) for w in ws)
            chars, words = chars + c, words + len(ws)
            per.append(c / max(len(ws), 1))
        dt = time.perf_counter() - t0
        mb = sum(len(d.encode()) for d in docs) / 1e6
        rows.append([lang, str(len(docs)), f"{chars / words:.2f}", f"{np.percentile(per, 10):.2f}",
                     f"{np.percentile(per, 90):.2f}", f"{mb / dt:.2f}"])
    print("\nsegmenters on the gettext catalogues of this system:")
    print_table(rows, ["lang", "messages", "chars/word", "p10", "p90", "segmenter MB/s"])


def run(n_pages: int, quick: bool) -> None:
    print(header(f"clean stages | {n_pages} pages", os.cpu_count() or 1))
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
        runs = end_to_end(src, tmp, len(pages), html_mb, repeats=1 if quick else 2)
        for label, (dt, docs, rerun) in runs.items():
            rows.append([label, f"{len(pages) / dt:,.0f}", f"{html_mb / dt:.1f}", f"{dt:.2f}", str(docs),
                         f"{rerun:.2f}"])
        print()
        print_table(rows, ["end to end (median of interleaved runs)", "pages/s", "MB/s", "seconds", "docs kept",
                           "re-run s"])
        if not quick:
            extractor_comparison(pages)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="500 pages, no extractor comparison")
    ap.add_argument("--segmenters", action="store_true", help="only the CJK/Thai word segmentation measurement")
    a = ap.parse_args()
    if a.segmenters:
        segmenters()
    else:
        run(500 if a.quick else a.pages, a.quick)
