"""Web-page cleaning (fastllm.clean): charset decoding + boilerplate removal in five encodings, WARC and JSONL
input, each quality rule, PII, exact and near-duplicate removal, bad input, resume, and `prepare` on the output."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

pytest.importorskip("resiliparse")
pytest.importorskip("py3langid")

from fastllm import clean as C  # noqa: E402
from fastllm.clean import CleanConfig, clean, extract_text, quality_reason, scrub_pii  # noqa: E402

BOILER = ["Home", "About us", "Contact", "Privacy policy", "Subscribe to our newsletter", "Log in"]
FOOTER = "Copyright 2024 Examplecorp. All rights reserved."

PROSE = {  # (encoding, language): paragraphs with characters outside ASCII
    ("utf-8", "en"): [
        "The committee met on Tuesday to discuss the new budget, and most members agreed that the "
        "plan needed more work before the vote could take place.",
        "Naïve café owners in Zürich said the proposal — though well meant — ignored the costs "
        "that small businesses face every winter.",
    ],
    ("latin-1", "fr"): [
        "Le comité s'est réuni mardi pour discuter du nouveau budget, et la plupart des membres "
        "ont convenu que le plan devait être retravaillé avant le vote.",
        "Les propriétaires de cafés à Zürich ont déclaré que la proposition ignorait les coûts "
        "élevés que les petites entreprises doivent supporter chaque hiver.",
    ],
    ("shift_jis", "ja"): [
        "委員会は火曜日に新しい予算について話し合うために会合を開き、ほとんどのメンバーが計画には"
        "さらなる作業が必要だと同意した。",
        "チューリッヒのカフェの経営者たちは、その提案は善意によるものだが、小さな企業が毎年冬に"
        "直面する費用を無視していると述べた。",
    ],
    ("gbk", "zh"): [
        "委员会周二开会讨论新预算，大多数成员同意该计划在投票前需要更多工作。",
        "苏黎世的咖啡馆老板们表示，这项提议虽然出于好意，却忽视了小企业每年冬天都要面对的成本。",
    ],
    ("windows-1251", "ru"): [
        "Комитет собрался во вторник, чтобы обсудить новый бюджет, и большинство членов "
        "согласились, что план нуждается в доработке перед голосованием.",
        "Владельцы кафе в Цюрихе заявили, что предложение, хотя и сделано из лучших "
        "побуждений, игнорирует расходы малого бизнеса каждой зимой.",
    ],
}

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river garden winter market letter village morning "
    "history music window kitchen teacher doctor station mountain island forest bridge"
).split()
VERBS = "saw found liked remembered built painted visited described carried watched opened followed".split()


def prose(rng: random.Random, sentences: int = 12) -> str:
    """English-looking sentences with a fresh mix of words (distinct documents are far apart in Jaccard)."""
    out = []
    for _ in range(sentences):
        a, b, c, d, e = rng.sample(WORDS, 5)
        adj = rng.choice(["good", "late", "new", "quiet", "cold"])
        det = rng.choice(["every", "that", "one", "the"])
        out.append(
            f"The {a} {rng.choice(VERBS)} the old {b} near the {c} and it was {adj} for {det} {d} with "
            f"{rng.randint(2, 99)} {e}s."
        )
    return " ".join(out)


def page(paras: list[str], charset: str | None = "utf-8", title: str = "A page") -> str:
    nav = "".join(f'<li><a href="/{i}">{b}</a></li>' for i, b in enumerate(BOILER))
    meta = f'<meta charset="{charset}">' if charset else ""
    body = "".join(f"<p>{p}</p>" for p in paras)
    return (
        f"<!DOCTYPE html><html><head>{meta}<title>{title}</title><style>p {{color: red}}</style>"
        f"<script>var trackingBeacon = function() {{ return 'analyticsPixel'; }};</script></head><body>"
        f"<header><nav><ul>{nav}</ul></nav></header><main><article><h1>{title}</h1>{body}</article></main>"
        f"<footer><p>{FOOTER}</p><ul>{nav}</ul><script>trackPageview();</script></footer></body></html>"
    )


def assert_clean(text: str, paras: list[str]) -> None:
    for p in paras:
        assert p in text, (p, text)
    for b in [*BOILER, FOOTER, "trackingBeacon", "analyticsPixel", "trackPageview", "color: red"]:
        assert b not in text, (b, text)


# ---- extraction and decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["meta-charset", "detected"])
@pytest.mark.parametrize("enc,lang", list(PROSE), ids=[e for e, _ in PROSE])
def test_extract_decodes_and_drops_boilerplate(enc, lang, declared):
    paras = PROSE[enc, lang]
    data = page(paras * 2, enc if declared else None).encode(enc)
    text = extract_text(data)
    assert_clean(text, paras)
    assert C.detect_language(text)[0] == lang


@pytest.mark.parametrize("enc", ["shift_jis", "windows-1251"])
def test_http_charset_beats_a_wrong_meta(enc):
    paras = next(v for (e, _), v in PROSE.items() if e == enc)
    data = page(paras * 2, "utf-8").encode(enc)  # the page lies; the HTTP header is right
    assert_clean(extract_text(data, http_charset=enc), paras)
    assert_clean(extract_text(data), paras)  # invalid as UTF-8 -> detection


@pytest.mark.parametrize("declared", ["iso-8859-1", "windows-1251", "shift_jis", "gbk", "koi8-r"])
@pytest.mark.parametrize("enc,lang", list(PROSE), ids=[e for e, _ in PROSE])
def test_utf8_page_with_a_stale_charset_is_read_as_utf8(enc, lang, declared):
    """A page in UTF-8 whose meta tag or HTTP header names a legacy charset (an old template, a server's
    default) was decoded as that charset: mojibake like 'comitÃ©'. Valid UTF-8 beyond ASCII wins; a page that
    is really in the declared charset, and 7-bit ISO-2022-JP, still follow the declaration."""
    paras = PROSE[enc, lang]
    data = page(paras * 2, declared).encode("utf-8")
    assert_clean(extract_text(data), paras)
    assert_clean(extract_text(page(paras * 2, None).encode("utf-8"), http_charset=declared), paras)
    if enc != "utf-8":
        assert_clean(extract_text(page(paras * 2, "utf-8").encode(enc), http_charset=enc), paras)
    ja = PROSE["shift_jis", "ja"]
    assert_clean(extract_text(page(ja * 2, "iso-2022-jp").encode("iso-2022-jp")), ja)


def test_bom_and_str_input():
    paras = PROSE["utf-8", "en"]
    assert_clean(extract_text(b"\xef\xbb\xbf" + page(paras, None).encode()), paras)
    assert_clean(extract_text(page(paras, None).encode("utf-16")), paras)
    assert_clean(extract_text(page(paras, "latin-1")), paras)


# ---- quality rules -------------------------------------------------------------------------------------


def lines_text(rng, n=12):
    return "\n".join(prose(rng, 2) for _ in range(n))


@pytest.mark.parametrize(
    "reason,make",
    [
        ("too_few_words", lambda r: "A short note that says very little."),
        ("mean_word_length", lambda r: " ".join(["a b c d ok go to be it up."] * 20)),
        ("mean_word_length", lambda r: " ".join(["incomprehensibilities extraordinarily."] * 40)),
        ("symbol_ratio", lambda r: "\n".join(f"#tag{i} #news #sale {prose(r, 1)}" for i in range(12))),
        ("alpha_words", lambda r: prose(r, 4) + " " + " ".join(str(10007 * i) for i in range(300))),
        ("stop_words", lambda r: " ".join(r.choice(WORDS) + "s" for _ in range(100)) + "."),
        ("bullet_lines", lambda r: "\n".join(f"• {prose(r, 1)}" for _ in range(12))),
        ("ellipsis_lines", lambda r: "\n".join(prose(r, 1)[:-1] + " and then..." for _ in range(12))),
        ("dup_lines", lambda r: "\n".join([prose(r, 2)] * 5 + [prose(r, 2) for _ in range(5)])),
        ("dup_line_chars", lambda r: "\n".join([prose(r, 6)] * 2 + [prose(r, 1) for _ in range(8)])),
        ("line_punctuation", lambda r: "\n".join(prose(r, 1)[:-1] + " and so on" for _ in range(12))),
        ("short_lines", lambda r: prose(r, 8) + "\n" + "\n".join(f"Item {i} is here." for i in range(40))),
        ("lorem_ipsum", lambda r: prose(r, 6) + " Lorem ipsum dolor sit amet. " + prose(r, 6)),
    ],
)
def test_each_quality_rule_drops_its_case(reason, make):
    cfg = CleanConfig()
    rng = random.Random(reason)
    assert quality_reason(make(rng), cfg, "en") == reason
    # ... and normal prose passes every rule, in one paragraph or in many lines
    assert quality_reason(prose(rng, 12), cfg, "en") is None
    assert quality_reason(lines_text(rng), cfg, "en") is None


def test_quality_rules_are_configurable_and_cjk_aware():
    text = "A short note that says very little."
    assert quality_reason(text, CleanConfig()) == "too_few_words"
    assert quality_reason(text, CleanConfig(min_words=3, min_punct_lines=0, max_short_lines=1)) is None
    ja = "\n".join(PROSE["shift_jis", "ja"] * 2)
    assert quality_reason(ja, CleanConfig(max_dup_lines=1, max_dup_line_chars=1), "ja") is None


# ---- PII -----------------------------------------------------------------------------------------------


def test_pii_scrubbed():
    s = scrub_pii(
        "Write to jane.doe+news@mail.example.co.uk or call 10.0.0.12 / [2001:db8::8a2e:370:7334]. "
        "Version 1.2.3 and 999.1.2.3 and at 10:30:15 and a[::2], b[1::3] stay."
    )
    assert "jane.doe" not in s and "10.0.0.12" not in s and "2001:db8" not in s
    assert s.count(C.EMAIL_PLACEHOLDER) == 1 and s.count(C.IP_PLACEHOLDER) == 2
    assert "1.2.3 and 999.1.2.3" in s and "10:30:15" in s and "a[::2], b[1::3]" in s


# ---- MinHash -------------------------------------------------------------------------------------------


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    a = prose(rng, 40).split()
    b = list(a)
    for i in range(0, len(b), 60):  # a few word edits
        b[i] = "changed"

    def shingles(w):
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    sa, sb = shingles([x.lower().strip(".") for x in a]), shingles([x.lower().strip(".") for x in b])
    j = len(sa & sb) / len(sa | sb)
    est = np.mean(C.minhash(" ".join(a), 256) == C.minhash(" ".join(b), 256))
    assert abs(est - j) < 0.1
    other = C.minhash(prose(rng, 40), 256)
    assert np.mean(C.minhash(" ".join(a), 256) == other) < 0.1


def test_near_dup_components_chain():
    keys = np.array([[1, 2], [3, 2], [3, 9], [7, 8], [7, 10]], np.uint64)
    assert C.near_dup_components(keys).tolist() == [0, 0, 0, 3, 3]


# ---- the whole run -------------------------------------------------------------------------------------


def read_out(out):
    from fastllm.data import iter_documents

    return list(iter_documents(sorted(out.glob("clean_*.jsonl"))))


def test_clean_run_dedups_and_feeds_prepare(tmp_path):
    rng = random.Random(1)
    src = tmp_path / "pages"
    src.mkdir()
    base = [[prose(rng, 6), prose(rng, 6)] for _ in range(6)]
    for i, paras in enumerate(base):
        (src / f"page{i}.html").write_text(page(paras, title=f"Distinct {i}"), encoding="utf-8")
    (src / "z_exact_dup.html").write_text(page(base[0], title="Distinct 0"), encoding="utf-8")
    near = [p.replace(" the old ", " an old ", 1) for p in base[1]]  # small edits
    near[1] = near[1] + " One more short sentence here."
    (src / "z_near_dup.html").write_text(page(near, title="Distinct 1 (copy)"), encoding="utf-8")
    pii = [base[2][0] + " Mail bob@example.com from 192.168.0.7.", prose(rng, 6)]
    (src / "pii.html").write_text(page(pii, title="Contact page"), encoding="utf-8")
    fr = PROSE["latin-1", "fr"] * 4
    (src / "fr.html").write_bytes(page([p.replace(".", ". ") for p in fr], "latin-1").encode("latin-1"))

    s = clean([src], tmp_path / "out", CleanConfig(processes=1, lang=("en",)), progress=False)
    docs = read_out(tmp_path / "out")
    assert s.documents == len(docs) == 7, s.table()
    assert s.stages["exact_dedup"]["dropped"] == {"duplicate": 1}
    assert s.stages["near_dedup"]["dropped"] == {"near_duplicate": 1}
    assert s.stages["lang"]["dropped"] == {"other_language.fr": 1}
    assert s.pii == {"email": 1, "ip": 1}
    joined = "\n".join(docs)
    assert "bob@example.com" not in joined and C.EMAIL_PLACEHOLDER in joined
    for paras in base:
        assert paras[0] in joined  # every distinct page survives, boilerplate gone
    assert FOOTER not in joined and "Privacy policy" not in joined
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["documents"] == 7

    # `fastllm prepare` reads the folder directly (the .work folder holds no .jsonl)
    from fastllm.data import prepare
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.train(docs, 300, special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "tok.tiktoken")
    st = prepare(
        [str(tmp_path / "out")], tmp_path / "tok.tiktoken", tmp_path / "data", val_fraction=0.2, progress=False
    )
    assert st.documents == 7


def write_warc(f, records: list[tuple[bytes, str]]) -> None:
    """Response records written with warcio (gzip); the reader under test is our own."""
    pytest.importorskip("warcio")
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    w = WARCWriter(f, gzip=True)
    for i, (body, ctype) in enumerate(records):
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        w.write_record(
            w.create_warc_record(f"http://example.com/{i}", "response", payload=BytesIO(body), http_headers=http)
        )


def test_warc_and_jsonl_inputs_in_parallel(tmp_path):
    rng = random.Random(2)
    pages = [[prose(rng, 6), prose(rng, 6)] for _ in range(4)]
    ru = PROSE["windows-1251", "ru"]
    records = [
        (page(pages[0], None).encode(), "text/html; charset=utf-8"),
        (page(ru, None).encode("windows-1251"), "text/html; charset=windows-1251"),
        (page(pages[1], None).encode(), "text/html"),
        (page(pages[2], None).encode(), "image/png"),
    ]
    with open(tmp_path / "crawl.warc.gz", "wb") as f:
        write_warc(f, records)
    with open(tmp_path / "pages.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"url": "u1", "html": page(pages[3])}) + "\n")
        f.write(json.dumps({"id": "u2", "text": "\n".join(prose(rng, 3) for _ in range(4))}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"other": 1}) + "\n")

    s = clean(
        [tmp_path / "crawl.warc.gz", tmp_path / "pages.jsonl"],
        tmp_path / "out",
        CleanConfig(processes=2, min_words=30),
        progress=False,
    )
    docs = read_out(tmp_path / "out")
    assert s.documents == len(docs) == 5, s.table()
    assert s.stages["read"]["dropped"] == {"not_html": 1, "bad_json_line": 1, "no_text_or_html_field": 1}
    joined = "\n".join(docs)
    assert all(p in joined for p in ru) and pages[3][0] in joined and pages[2][0] not in joined
    urls = [json.loads(x)["url"] for x in open(next((tmp_path / "out").glob("clean_*.jsonl")))]
    assert "http://example.com/1" in urls and "u2" in urls


def test_bad_input_is_counted_and_run_continues(tmp_path):
    rng = random.Random(3)
    good = [[prose(rng, 6), prose(rng, 6)] for _ in range(3)]
    d = tmp_path / "in"
    d.mkdir()
    for i, paras in enumerate(good):
        (d / f"good{i}.html").write_text(page(paras), encoding="utf-8")
    (d / "garbage.html").write_bytes(os.urandom(3000) + b"\0")
    (d / "noise.html").write_bytes(bytes(random.Random(5).randrange(1, 256) for _ in range(5000)))
    (d / "corrupt.warc").write_bytes(b"WARC/1.0\r\nthis is not a warc header\r\n\r\n" + os.urandom(200))
    (d / "empty.html").write_bytes(b"")
    (d / "broken.html.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(100))  # unreadable: corrupt gzip
    (d / "dangling.html").symlink_to(tmp_path / "nowhere.html")
    with open(d / "tail_garbage.warc.gz", "wb") as f:  # two good pages, then the archive breaks
        write_warc(f, [(page([prose(rng, 6), prose(rng, 6)]).encode(), "text/html") for _ in range(2)])
        f.write(os.urandom(300))
    (tmp_path / "emptydir").mkdir()

    s = clean(
        [d, tmp_path / "emptydir", tmp_path / "missing.jsonl"],
        tmp_path / "out",
        CleanConfig(processes=1),
        progress=False,
    )
    assert s.documents == 5 and len(read_out(tmp_path / "out")) == 5, s.table()
    bad = {os.path.basename(b["path"]): b["reason"] for b in s.bad_inputs}
    assert bad == {"corrupt.warc": "corrupt", "broken.html.gz": "corrupt", "tail_garbage.warc.gz": "corrupt",
                   "emptydir": "empty", "missing.jsonl": "not_found", "dangling.html": "not_found",
                   "garbage.html": "binary", "empty.html": "empty"}, bad
    # every input not used is counted by reason; tail_garbage was used up to its damage
    assert s.unused == {"corrupt": 2, "empty": 2, "not_found": 2, "binary": 1}, s.unused
    assert s.files == 9 and s.used == 5  # regular files; used: good0-2, noise (all NBSP: an empty page), tail_garbage
    assert s.stages["extract"]["dropped"].get("empty", 0) >= 1  # the page of non-breaking spaces
    assert "bad input" in s.table()


def test_a_dead_worker_process_stops_the_run_instead_of_hanging():
    """A worker killed by the OS (memory) or a crash in a native parser: multiprocessing.Pool waited for its
    result forever, so `fastllm clean` hung without a word; now the run stops with an error saying so."""
    import subprocess
    import sys

    code = ("import os; from fastllm.executor import Executor\n"
            "with Executor(2) as ex:\n    ex.map(os._exit, [3, 3, 3])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "RuntimeError: a worker process running _exit died" in r.stderr, r.stderr


def test_resume_skips_done_inputs(tmp_path, monkeypatch):
    rng = random.Random(4)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        (d / f"p{i}.html").write_text(page([prose(rng, 6), prose(rng, 6)]), encoding="utf-8")
    cfg = CleanConfig(processes=1)
    s1 = clean([d], tmp_path / "out", cfg, progress=False)
    assert s1.skipped == 0 and s1.documents == 3
    first = read_out(tmp_path / "out")

    (d / "p3.html").write_text(page([prose(rng, 6), prose(rng, 6)]), encoding="utf-8")
    seen = []
    real = C.read_pages
    monkeypatch.setattr(C.pipeline, "read_pages", lambda p, st=None: (seen.append(p), real(p, st))[1])
    s2 = clean([d], tmp_path / "out", cfg, progress=False)
    assert [p.name for p in seen] == ["p3.html"] and s2.skipped == 3 and s2.documents == 4
    assert read_out(tmp_path / "out")[:3] == first
    assert s2.stages["quality"]["kept"] == 4  # counts of skipped inputs come from their done records

    s3 = clean([d], tmp_path / "out", CleanConfig(processes=1, min_words=10), progress=False)
    assert s3.skipped == 0  # other settings: redo


def test_cli_clean(tmp_path, capsys):
    from fastllm.cli import main

    rng = random.Random(6)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        (d / f"p{i}.html").write_text(page([prose(rng, 6), prose(rng, 6)]), encoding="utf-8")
    assert (
        main(["clean", str(d), "--out", str(tmp_path / "out"), "--lang", "en", "--processes", "1", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "near_dedup" in out and "2 documents" in out
    assert len(read_out(tmp_path / "out")) == 2


# ---- Dask ----------------------------------------------------------------------------------------------


def test_dask_local_cluster_gives_the_same_shards(tmp_path):
    """A 2-worker LocalCluster run writes the same shards and summary counts as the single-process run:
    exact duplicates (shuffle on the hash), near-duplicate chains (band-key join + distributed connected
    components) and several shards written by the workers; a re-run skips every input."""
    pytest.importorskip("distributed")
    rng = random.Random(11)
    src = tmp_path / "pages"
    src.mkdir()
    base = [[prose(rng, 6), prose(rng, 6)] for _ in range(10)]
    for i, paras in enumerate(base):
        (src / f"p{i:02d}.html").write_text(page(paras, title=f"Page {i}"), encoding="utf-8")
    (src / "q_exact.html").write_text(page(base[3], title="Page 3"), encoding="utf-8")
    (src / "q_exact2.html").write_text(page(base[3], title="Page 3"), encoding="utf-8")
    chain = base[5]
    for k in range(3):  # a chain of near duplicates: each a small edit of the previous one
        chain = [p.replace(" the old ", " an old ", 1).replace(" was ", " is ", 1) for p in chain]
        chain[1] += f" Edit {k}."
        (src / f"r_near{k}.html").write_text(page(chain, title=f"Page 5 v{k}"), encoding="utf-8")
    (src / "zz_binary.bin").write_bytes(b"\x00\x01" * 500)
    from distributed import Client, LocalCluster

    one = clean([src], tmp_path / "one", CleanConfig(processes=1, shard_docs=3), progress=False)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)  # worker processes
    client = Client(cluster)
    try:
        two = clean([src], tmp_path / "two", CleanConfig(shard_docs=3), progress=False, dask=client)
        again = clean([src], tmp_path / "two", CleanConfig(shard_docs=3), progress=False,
                      dask=cluster.scheduler_address)  # "tcp://127.0.0.1:port", as --dask takes it
    finally:
        client.close()
        cluster.close()
    assert one.stages == two.stages and one.unused == two.unused == {"binary": 1}
    assert one.stages["exact_dedup"]["dropped"] == {"duplicate": 2}
    assert one.stages["near_dedup"]["dropped"]["near_duplicate"] >= 2, one.table()
    assert one.shards == two.shards and len(one.shards) == 4
    for name in one.shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert again.skipped == again.files and again.shards == one.shards


def test_dask_components_match_numpy():
    """The distributed connected components (large-star / small-star rounds) drop exactly the rows that the
    one-machine label propagation does not keep, on random graphs with long chains."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from fastllm.clean import distributed as D

    rng = np.random.default_rng(0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        P = 4
        for n, bands in ((50, 3), (400, 6)):
            keys = rng.integers(0, n // 2, (n, bands)).astype(np.uint64) + np.arange(bands, dtype=np.uint64) * 10**6
            unique = rng.integers(10**9, 2**62, (n, bands)).astype(np.uint64)
            keys = np.where(rng.random((n, bands)) < 0.6, unique, keys)  # most band keys shared by nobody
            expect = np.flatnonzero(C.near_dup_components(keys) != np.arange(n))
            kr = np.stack([keys.view(np.int64).reshape(-1), np.repeat(np.arange(n), bands)])
            pieces = D._split(kr, P)
            edges = [client.submit(D._link, [pieces[j]], P) for j in range(P)]
            got = D.components(client, edges, P)
            assert got.tolist() == expect.tolist()


# ---- any input, by content (issue 22) ------------------------------------------------------------------

THAI = [
    "ประเทศไทยมีประวัติศาสตร์ที่ยาวนานและวัฒนธรรมที่หลากหลาย ผู้คนในหมู่บ้านเล็กๆ ทางภาคเหนือมักจะตื่นเช้าเพื่อไปทำงานในไร่นาของพวกเขา "
    "การเกษตรเป็นอาชีพหลักของคนในชนบท และข้าวเป็นพืชที่สำคัญที่สุดของประเทศ",
    "ในช่วงฤดูฝน ชาวนาจะเริ่มปลูกข้าวและดูแลแปลงนาอย่างใกล้ชิด เด็กๆ ได้เรียนรู้วิธีการทำนาจากพ่อแม่ และช่วยงานในวันหยุด "
    "ตลาดในเมืองมีผักและผลไม้สดจำหน่ายทุกเช้า",
    "นักท่องเที่ยวจำนวนมากเดินทางมาเยี่ยมชมวัดเก่าแก่และชิมอาหารพื้นเมืองที่มีรสชาติจัดจ้าน การท่องเที่ยวจึงเป็นแหล่งรายได้ที่สำคัญของหลายจังหวัด "
    "รัฐบาลได้สนับสนุนการพัฒนาโครงสร้างพื้นฐานเพื่อให้การเดินทางสะดวกยิ่งขึ้น",
]
CHINESE = [
    "这个城市位于河流的南岸，历史悠久，文化丰富。每年春天，许多游客来到这里参观古老的寺庙和美丽的花园。",
    "当地居民大多从事农业和手工业，他们的生活简单而安静。在市场上，人们可以买到新鲜的蔬菜、水果和各种传统小吃。",
    "近年来，政府投资修建了新的道路和学校，教育水平有了明显的提高。年轻人也开始在城市里寻找工作的机会，但是很多人仍然喜欢回到家乡过节。",
]
JA_DIALOGUE = [  # short lines ending in a closing bracket: old rules saw neither punctuation nor long lines
    "「今日はどこへ行くの？」", "「駅の近くの古い本屋さんに行ってみようと思っているんだ」",
    "「あの店は先月に閉まったと聞いたけど」", "「そうなの？それは残念だね」",
    "「でも、新しい店が川の向こうにできたらしいよ」", "「じゃあ、一緒にそこへ行ってみようか」",
    "「うん、午後は時間があるから大丈夫だよ」", "「それなら、昼ご飯を食べてから出かけよう」",
]


def test_thai_chinese_japanese_pages_are_kept(tmp_path):
    """Pages that the English-centric rules dropped (Thai: 'words' are whole phrases between spaces;
    Japanese dialogue: lines end in 」 and are short) are kept by the per-language rules; English-rule
    behaviour is still there with lang_rules=False."""
    cases = {"th": "\n".join(THAI), "zh": "\n".join(CHINESE), "ja": "\n".join(JA_DIALOGUE)}
    for lang, text in cases.items():
        assert C.detect_language(text)[0] == lang
        assert quality_reason(text, CleanConfig(), lang) is None, lang
    assert quality_reason(cases["th"], CleanConfig(lang_rules=False), "th") in ("too_few_words", "mean_word_length")
    assert quality_reason(cases["ja"], CleanConfig(lang_rules=False), "ja") in ("line_punctuation", "short_lines")
    # word counts of scripts without spaces: characters / measured characters per word
    assert 80 < C.word_count(cases["th"], "th") < 130 and 70 < C.word_count(cases["zh"], "zh") < 110


KHMER = [  # the khan (។) after a space, as many Khmer writers put it
    "ប្រទេសកម្ពុជាមានប្រវត្តិសាស្ត្រដ៏យូរលង់ និងវប្បធម៌ដ៏សម្បូរបែប ។ ប្រជាជននៅតាមភូមិតូចៗភាគច្រើនធ្វើស្រែចម្ការ ។",
    "ក្នុងរដូវវស្សា កសិករចាប់ផ្តើមដាំស្រូវ ហើយថែទាំស្រែរបស់ពួកគេយ៉ាងយកចិត្តទុកដាក់ ។ ក្មេងៗរៀនពីឪពុកម្តាយ ។",
    "ភ្ញៀវទេសចរជាច្រើនមកទស្សនាប្រាសាទបុរាណ និងភ្លក្សម្ហូបខ្មែរ ។ ទេសចរណ៍គឺជាប្រភពចំណូលដ៏សំខាន់នៃប្រទេស ។",
]


def test_numbers_between_phrases_of_scripts_without_spaces():
    """The alpha-words rule counts words as word_count does: a Thai page with a date or a price in each
    paragraph, or Khmer with its khan after a space, has few non-letter words, not one in every three
    whitespace chunks (both were dropped as alpha_words); a page of numbers with a few words still is."""
    dated = [f"เมื่อวันที่ {d} มกราคม {2560 + d} {p}" for d, p in enumerate(THAI * 2, 1)]
    priced = [f"{p} ราคา {100 * d} บาท" for d, p in enumerate(THAI * 2, 1)]
    for lang, paras in (("th", dated), ("th", priced), ("km", KHMER)):
        text = "\n".join(paras)
        assert C.detect_language(text)[0] == lang
        assert quality_reason(text, CleanConfig(), lang) is None, (lang, text[:80])
    prices = " ".join(f"ราคา {100 * d} บาท {d}" for d in range(40))
    assert quality_reason(prices, CleanConfig(), "th") == "alpha_words"


@pytest.mark.parametrize("lang,junk,reason", [
    ("zh", "首页\n新闻\n体育\n关于我们\n联系我们\n隐私政策", "too_few_words"),
    ("th", "หน้าแรก ข่าว กีฬา ติดต่อเรา " * 3, "too_few_words"),
    ("ja", "\n".join(["★★★ 今すぐ購入 ### 送料無料 ### セール中 ★★★ #####"] * 12), "symbol_ratio"),
    ("zh", "\n".join(CHINESE) + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("fr", "\n".join(["Accueil | Actualités | Contact | Mentions légales | Plan du site | Connexion"] * 8),
     "alpha_words"),
    ("fr", "\n".join(["Retour à l'accueil et à la page des actualités de la ville."] * 8), "dup_lines"),
    ("de", " ".join(f"{i * 7919} {i * 104729}" for i in range(60)) + " und der die das.", "alpha_words"),
], ids=["zh-menu", "th-menu", "ja-symbols", "zh-lorem", "fr-menu", "fr-repeated", "de-numbers"])
def test_junk_is_still_dropped_in_every_language(lang, junk, reason):
    assert quality_reason(junk, CleanConfig(), lang) == reason


def utf(text: str, enc: str, bom: bool) -> bytes:
    data = text.encode(enc)
    return ({"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-le": b"\xff\xfe\x00\x00",
             "utf-32-be": b"\x00\x00\xfe\xff"}[enc] if bom else b"") + data


@pytest.mark.parametrize("enc", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no-bom"])
def test_utf16_utf32_pages_are_read(tmp_path, enc, bom):
    """UTF-16/32 pages with or without a BOM (issue 23 #4: a BOM'd UTF-16 page was dropped as binary)."""
    paras = PROSE["windows-1251", "ru"] + [prose(random.Random(enc), 6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "page").write_bytes(utf(page(paras, enc.split("-l")[0].split("-b")[0]), enc, bom))
    s = clean([tmp_path / "in"], tmp_path / "out", CleanConfig(processes=1, min_words=10), progress=False)
    assert s.unused == {} and s.documents == 1, s.table()
    assert_clean(read_out(tmp_path / "out")[0], paras)


def test_utf16_declared_by_http_without_bom_or_ascii():
    """CJK-only UTF-16 has no NUL bytes to sniff: the HTTP charset says so, and the byte order is found."""
    text = "\n".join(CHINESE)
    for enc in ("utf-16-le", "utf-16-be"):
        assert C.decode_html(text.encode(enc), http_charset="utf-16") == text
    assert C.decode_html(b"\x00\x01" * 300) != ""  # real binary is not text: sniff() refuses it
    assert C.sniff(b"\x00\x01" * 300)[0] == "binary" and C.sniff(os.urandom(4000) + b"\0")[0] == "binary"


def test_every_input_kind_by_content(tmp_path):
    """Files named anything: HTML, XHTML and RSS/Atom saved as .xml, plain text in Latin-1, subtitles, JSONL
    named .json, a WARC named .bin, bz2/xz/gzip-compressed pages; and those that are not used, each counted
    with its reason."""
    import bz2
    import gzip
    import lzma

    rng = random.Random(21)
    d = tmp_path / "in"
    d.mkdir()
    P = {k: [prose(rng, 6), prose(rng, 6)] for k in
         ("dat", "xhtml", "rss1", "rss2", "atom1", "txt", "srt", "jsonl", "warc", "bz2", "xz", "gz", "zst")}
    (d / "page.dat").write_text(page(P["dat"]), encoding="utf-8")
    (d / "doc.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n'
                               '<html xmlns="http://www.w3.org/1999/xhtml">' + page(P["xhtml"])[15:], encoding="utf-8")
    items = "".join(f"<item><title>Item {k}</title><link>http://e.com/{k}</link><description>"
                    f"{html_escape('<p>' + P[k][0] + '</p><p>' + P[k][1] + '</p>')}</description></item>"
                    for k in ("rss1", "rss2"))
    (d / "feed.xml").write_bytes(f'<?xml version="1.0" encoding="windows-1252"?><rss version="2.0"><channel>'
                                 f"<title>News</title>{items}</channel></rss>".encode("cp1252"))
    (d / "atom.xml").write_text('<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>A</title>'
                                '<entry><title>Entry</title><link href="http://e.com/a"/><content type="html">'
                                f"<![CDATA[<p>{P['atom1'][0]}</p><p>{P['atom1'][1]}</p>]]></content></entry></feed>",
                                encoding="utf-8")
    (d / "notes.txt").write_bytes(("\n\n".join(P["txt"]) + "\nCafé crème à la française.").encode("latin-1"))
    cues = [f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i + 1:02d},000\n{s.strip()}\n" for i, s in
            enumerate((P["srt"][0] + " " + P["srt"][1]).split(". "))]
    (d / "movie.srt").write_text("\n".join(cues), encoding="utf-8")
    (d / "records.json").write_text(json.dumps({"url": "u", "text": "\n".join(P["jsonl"])}) + "\n")
    with open(d / "crawl.bin", "wb") as f:
        write_warc(f, [(page(P["warc"]).encode(), "text/html")])
    (d / "p.bz2").write_bytes(bz2.compress(page(P["bz2"]).encode()))
    (d / "p.xz").write_bytes(lzma.compress(page(P["xz"]).encode()))
    (d / "p.gz").write_bytes(gzip.compress(page(P["gz"]).encode()))
    zstandard = pytest.importorskip("zstandard")
    (d / "p.zst").write_bytes(zstandard.ZstdCompressor().compress(page(P["zst"]).encode()))
    (d / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (d / "a.zip").write_bytes(b"PK\x03\x04" + os.urandom(100))
    (d / "sitemap.xml").write_text('<?xml version="1.0"?><urlset><url><loc>http://e.com/</loc></url></urlset>')
    (d / "list.json").write_text('[{"a": 1},\n {"b": 2}]')
    (d / "blank.txt").write_text("  \n\n ")
    s = clean([d], tmp_path / "out", CleanConfig(processes=2, min_words=20), progress=False)
    joined = "\n".join(read_out(tmp_path / "out"))
    for k, paras in P.items():
        assert paras[0][:60] in joined, (k, s.table())
    assert "Café crème" in joined and "-->" not in joined and "00:00" not in joined
    assert s.unused == {"binary": 1, "unsupported": 3, "empty": 1}, s.table()
    urls = [json.loads(x)["url"] for x in (tmp_path / "out" / "clean_000000.jsonl").read_text().splitlines()]
    assert "http://e.com/rss1" in urls and "http://e.com/a" in urls
    assert "not used: unsupported 3, binary 1, empty 1" in s.table()


def test_parquet_inputs(tmp_path):
    """Parquet, as FineWeb and most Hub datasets ship web text, was reported as 'binary: NUL bytes' (a run on
    such shards alone ended in 'no usable input'): its "text" column (or "html", str or bytes) is read like
    JSONL records, null rows counted; no such column, a truncated file, or gzip around it is reported."""
    import gzip

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(22)
    texts = ["\n".join([prose(rng, 6), prose(rng, 6)]) for _ in range(3)]
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"text": [texts[0], None, texts[1]], "id": ["a", "b", "c"],
                             "url": ["http://e.com/0", None, None]}), d / "train-00000.parquet")
    pq.write_table(pa.table({"html": [page(texts[2].split("\n")).encode("cp1252")]}), d / "pages.bin")
    pq.write_table(pa.table({"content": ["x"]}), d / "other.parquet")
    (d / "cut.parquet").write_bytes((d / "train-00000.parquet").read_bytes()[:200])
    (d / "z.parquet.gz").write_bytes(gzip.compress((d / "other.parquet").read_bytes()))
    s = clean([d], tmp_path / "out", CleanConfig(processes=1, min_words=20), progress=False)
    docs = [json.loads(x) for x in (tmp_path / "out" / "clean_000000.jsonl").read_text().splitlines()]
    assert_clean(docs[0]["text"], texts[2].split("\n"))  # pages.bin, then train-00000.parquet
    assert [x["text"] for x in docs[1:]] == texts[:2] and [x["url"] for x in docs[1:]] == ["http://e.com/0", "c"]
    assert s.stages["read"]["dropped"] == {"no_text_or_html_field": 1}, s.table()
    assert s.unused == {"unsupported": 2, "corrupt": 1}, s.table()


def html_escape(s: str) -> str:
    import html

    return html.escape(s)


# ---- WARC damage (issue 23 #5) -------------------------------------------------------------------------


def warc_bytes(pages: list[list[str]], gz: bool) -> bytes:
    import io

    buf = io.BytesIO()
    pytest.importorskip("warcio")
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    w = WARCWriter(buf, gzip=gz)
    for i, paras in enumerate(pages):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"http://example.com/{i}", "response",
                                            payload=io.BytesIO(page(paras).encode()), http_headers=http))
    return buf.getvalue()


def test_warc_reader_matches_warcio():
    """Our reader yields the same records as warcio's ArchiveIterator (the reference), gzip or not."""
    import gzip
    import io

    from warcio.archiveiterator import ArchiveIterator

    rng = random.Random(31)
    pages = [[prose(rng, 3)] for _ in range(5)]
    for gz in (True, False):
        data = warc_bytes(pages, gz)
        ref = [(r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
               for r in ArchiveIterator(io.BytesIO(data)) if r.rec_type == "response"]
        f = gzip.GzipFile(fileobj=io.BytesIO(data)) if gz else io.BytesIO(data)
        ours = [(p["url"], p["html"]) for p in C.readers._read_warc(f, C.readers.Counter())]
        assert ours == ref and len(ours) == 5


def test_http_content_encodings():
    """Chunked transfer and gzip/deflate content encodings are undone; a body the crawler already decoded is kept;
    one that starts as gzip and breaks off is dropped and counted, like an undecodable deflate body."""
    import gzip
    import zlib

    html = b"<html><body><p>" + b"words " * 500 + b"</p></body></html>"
    raw = zlib.compressobj(wbits=-15)
    raw_deflate = raw.compress(html) + raw.flush()
    pieces = [html[i:i + 700] for i in range(0, len(html), 700)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    cases = [  # (content-encoding, transfer-encoding, body, what comes out: the html or None)
        ("gzip", "", gzip.compress(html), html), ("x-gzip", "", gzip.compress(html), html),
        ("deflate", "", zlib.compress(html), html), ("deflate", "", raw_deflate, html),
        ("", "chunked", chunked, html), ("identity", "", html, html),
        ("gzip", "", html, html),  # already decoded by the crawler
        ("gzip", "", gzip.compress(html)[:-40], None), ("deflate", "", b"\x00\xffnot deflate", None),
        ("br", "", html, None),
    ]
    for enc, te, body, want in cases:
        stats = C.readers.Counter()
        got = C.readers._http_body(body, {"content-encoding": enc, "transfer-encoding": te}, stats)
        assert got == want, (enc, te)
        assert sum(stats.values()) == (want is None), (enc, stats)


def test_truncated_warc_gz_is_reported(tmp_path):
    rng = random.Random(32)
    pages = [[prose(rng, 6), prose(rng, 6)] for _ in range(3)]
    data = warc_bytes(pages, True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.warc.gz").write_bytes(data[: len(data) - 200])  # inside the last record
    s = clean([tmp_path / "in"], tmp_path / "out", CleanConfig(processes=1), progress=False)
    assert s.documents == 2, s.table()
    assert [b["reason"] for b in s.bad_inputs] == ["corrupt"] and "cut.warc.gz" in s.bad_inputs[0]["path"]
    assert "gzip stream breaks off after 2 documents (those were read)" in s.bad_inputs[0]["error"]


def test_truncated_zst_is_reported(tmp_path):
    """A .zst cut inside its frame is reported as a corrupt input, after the documents before the cut."""
    zstandard = pytest.importorskip("zstandard")
    rng = random.Random(34)
    plain = warc_bytes([[prose(rng, 6), prose(rng, 6)] for _ in range(60)], False)
    assert len(plain) > C.readers.HEAD  # the damage is found while reading, after the first documents
    data = zstandard.ZstdCompressor().compress(plain)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.warc.zst").write_bytes(data[: len(data) - 30])
    s = clean([tmp_path / "in"], tmp_path / "out", CleanConfig(processes=1), progress=False)
    assert [b["reason"] for b in s.bad_inputs] == ["corrupt"] and "cut.warc.zst" in s.bad_inputs[0]["path"]
    assert 0 < s.documents < 60


@pytest.mark.parametrize("extra", [100, "whole"], ids=["too-long", "swallows-a-record"])
def test_wrong_content_length_does_not_swallow_the_next_record(tmp_path, extra):
    rng = random.Random(33)
    pages = [[prose(rng, 6), prose(rng, 6)] for _ in range(3)]
    data = warc_bytes(pages, False)
    first = data.index(b"Content-Length: ")
    end = data.index(b"\r\n", first)
    n = int(data[first + 16:end])
    second = data.index(b"WARC/1", first)
    third = data.index(b"WARC/1", second + 10)
    grow = (third - second) if extra == "whole" else extra  # "whole": the block ends exactly at record 3
    data = data[:first] + b"Content-Length: " + str(n + grow).encode() + data[end:]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.warc").write_bytes(data)
    s = clean([tmp_path / "in"], tmp_path / "out", CleanConfig(processes=1), progress=False)
    joined = "\n".join(read_out(tmp_path / "out"))
    assert pages[1][0] in joined and pages[2][0] in joined, s.table()  # the records after it are read
    assert pages[0][0] not in joined  # the damaged record is dropped, not kept with the next one inside
    assert s.stages["read"]["dropped"] == {"bad_record_length": 1}
    assert [b["reason"] for b in s.bad_inputs] == ["corrupt"] and "Content-Length" in s.bad_inputs[0]["error"]


# ---- unclear errors of clean (issue 23) ----------------------------------------------------------------


def test_cli_clean_errors(tmp_path, capsys):
    from fastllm.cli import main

    d = tmp_path / "in"
    d.mkdir()
    (d / "p.html").write_text(page([prose(random.Random(41), 6), prose(random.Random(42), 6)]), encoding="utf-8")
    assert main(["clean", str(d), "--out", str(tmp_path / "o"), "--lang", "xx", "--no-progress"]) == 1
    assert "lang: unknown language code 'xx'" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.bin").write_bytes(b"\x00\x01\x02" * 10)
    assert main(["clean", str(tmp_path / "bad"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastllm: error: no usable input (1 binary") and "x.bin" in err
    os.mkfifo(tmp_path / "fifo")
    assert main(["clean", "/dev/null", str(tmp_path / "fifo"), "--out", str(tmp_path / "o3"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "/dev/null: not a regular file (character device)" in err and "fifo: not a regular file (FIFO)" in err
    assert "not found" not in err


def test_out_inside_the_input_folder_is_not_read(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = random.Random(43)
    for i in range(2):
        (d / f"p{i}.html").write_text(page([prose(rng, 6), prose(rng, 6)]), encoding="utf-8")
    s1 = clean([d], d / "out", CleanConfig(processes=1), progress=False)
    s2 = clean([d], d / "out", CleanConfig(processes=1), progress=False)
    assert s1.files == s2.files == 2 and s2.skipped == 2 and s2.documents == 2


def test_no_dask_import_without_dask(tmp_path):
    """Without --dask nothing imports dask (the extra is optional)."""
    import subprocess
    import sys

    (tmp_path / "p.html").write_text(page([prose(random.Random(44), 6), prose(random.Random(45), 6)]))
    code = (f"import sys; from fastllm.clean import clean, CleanConfig; "
            f"clean([{str(tmp_path / 'p.html')!r}], {str(tmp_path / 'o')!r}, CleanConfig(processes=1), "
            f"progress=False); assert not [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


KOREAN = ("이 도시는 강의 남쪽에 위치하고 있으며 오랜 역사와 풍부한 문화를 가지고 있습니다. "
          "매년 봄이 되면 많은 관광객들이 오래된 사찰과 아름다운 정원을 방문합니다. "
          "지역 주민들은 대부분 농업과 수공업에 종사하며 조용하고 소박한 생활을 하고 있습니다. "
          "시장에서는 신선한 채소와 과일, 그리고 다양한 전통 간식을 살 수 있습니다.")


TRADITIONAL = ("這個城市位於河流的南岸，歷史悠久，文化豐富。每年春天，許多遊客來到這裡參觀古老的寺廟和美麗的花園。"
               "當地居民大多從事農業和手工業，他們的生活簡單而安靜。")


@pytest.mark.parametrize("enc,text", [("euc-kr", KOREAN), ("big5", TRADITIONAL),
                                      ("koi8-r", "\n".join(PROSE["windows-1251", "ru"])),
                                      ("cp1251", "\n".join(PROSE["windows-1251", "ru"])),
                                      ("shift_jis", "\n".join(PROSE["shift_jis", "ja"]))])
def test_plain_text_in_legacy_encodings(tmp_path, enc, text):
    """Plain text without any declaration is decoded by detection (EUC-KR used to come out as U+FFFD: the
    detector's HTML5 label mapping turned it into utf-8)."""
    (tmp_path / "notes").write_bytes(text.encode(enc))
    (page,) = C.read_pages(tmp_path / "notes")
    assert page["text"] == text


def test_cli_clean_dask_local(tmp_path, capsys):
    pytest.importorskip("distributed")
    from fastllm.cli import main

    d = tmp_path / "in"
    d.mkdir()
    rng = random.Random(46)
    for i in range(3):
        (d / f"p{i}.html").write_text(page([prose(rng, 6), prose(rng, 6)]), encoding="utf-8")
    assert main(["clean", str(d), "--out", str(tmp_path / "out"), "--dask", "local", "--processes", "1",
                 "--no-progress"]) == 0
    assert "3 documents" in capsys.readouterr().out and len(read_out(tmp_path / "out")) == 3
    assert main(["clean", str(d), "--out", str(tmp_path / "o2"), "--dask", "nowhere", "--no-progress"]) == 1
    assert "dask must be 'local' or a scheduler address" in capsys.readouterr().err


# ---- fuzzing the readers (issue 23: no input may crash or hang) -----------------------------------------


def _seed_files() -> dict[str, bytes]:
    import bz2
    import gzip

    rng = random.Random(50)
    paras = [prose(rng, 2), prose(rng, 2)]
    feed = ('<?xml version="1.0"?><rss><channel><item><title>T</title><link>http://e.com/</link><description>'
            f"&lt;p&gt;{paras[0]}&lt;/p&gt;</description></item></channel></rss>").encode()
    return {"warc": warc_bytes([paras, paras[::-1]], False), "warc.gz": warc_bytes([paras], True), "feed": feed,
            "html16": b"\xff\xfe" + page(paras, None).encode("utf-16-le"),
            "jsonl": (json.dumps({"text": paras[0]}) + "\n" + json.dumps({"html": page(paras)}) + "\n").encode(),
            "txt.bz2": bz2.compress(paras[0].encode()), "html.gz": gzip.compress(page(paras).encode())}


@pytest.mark.parametrize("kind", ["warc", "warc.gz", "feed", "html16", "jsonl", "txt.bz2", "html.gz"])
def test_readers_survive_damaged_files(tmp_path, kind):
    """Bytes flipped, cut, duplicated or inserted anywhere in every kind of input: read_pages yields pages or
    raises InputError (a reason for the summary), nothing else, and ends."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    seed = _seed_files()[kind]

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "dup", "insert"]), st.integers(0, 10**6),
                                         st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
    def run(edits):
        data = bytearray(seed)
        for op, pos, blob in edits:
            pos %= max(len(data), 1)
            if op == "flip" and data:
                data[pos] ^= blob[0] or 1
            elif op == "cut":
                del data[pos:]
            elif op == "dup":
                data[pos:pos] = data[pos:pos + 64]
            else:
                data[pos:pos] = blob
        path = tmp_path / "f"
        path.write_bytes(bytes(data))
        try:
            for p in C.read_pages(path):
                assert isinstance(p.get("html", p.get("text")), (str, bytes))
        except C.InputError as e:
            assert e.reason in C.readers.REASONS

    run()


def test_hard_wrapped_text_and_subtitles_become_paragraphs(tmp_path):
    """A .txt file wrapped at 70 columns is read as paragraphs (line rules then see sentences: Russian needs
    23% of lines to end in punctuation); subtitle cues are joined into sentences."""
    import textwrap

    rng = random.Random(51)
    words = " ".join(PROSE["windows-1251", "ru"]).replace(",", "").replace(".", "").split()
    paras = [" ".join(" ".join(rng.sample(words, 12)).capitalize() + "." for _ in range(8)) for _ in range(2)]
    wrapped = "\n\n".join(textwrap.fill(p, 70) for p in paras)
    (tmp_path / "book.txt").write_text(wrapped, encoding="utf-8")
    (text,) = [p["text"] for p in C.read_pages(tmp_path / "book.txt")]
    assert text == "\n\n".join(paras)
    assert quality_reason(wrapped, CleanConfig(), "ru") == "line_punctuation"  # what the wrapped lines would give
    assert quality_reason(text, CleanConfig(), "ru") is None
    cues = "".join(f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i + 1:02d},500\n<i>Line {i} of the talk</i>"
                   f"{'.' if i % 4 == 3 else ''}\n\n" for i in range(40))
    (tmp_path / "talk.srt").write_text(cues, encoding="utf-8")
    (text,) = [p["text"] for p in C.read_pages(tmp_path / "talk.srt")]
    paras = text.split("\n\n")
    assert all(p.endswith(".") for p in paras) and all(len(p) >= 200 for p in paras[:-1]) and len(paras) == 4
    assert "<i>" not in text and "-->" not in text and "00:00" not in text
    assert text.count("Line") == 40


def test_code_keeps_its_indentation():
    """Lines were stripped on both sides: Python in a page's <pre>, or indented code in a JSONL text, lost its
    indentation (and its meaning). Leading whitespace stays; lines of HTML prose have none (resiliparse)."""
    code = "def area(r):\n    if r < 0:\n        raise ValueError(r)\n\treturn 3.14159 * r * r"
    paras = [prose(random.Random(31), 6), prose(random.Random(32), 6)]
    html = page([paras[0]], title="Code").replace("</article>", f"<pre>{code}</pre><p>{paras[1]}</p></article>")
    text = extract_text(html)
    assert code in text and "\n" + paras[1] in text and text.startswith("Code\n" + paras[0][:20])
    doc = C.process_page({"text": paras[0] + "\n\n  " + code + "   \n" + paras[1], "url": "u"}, CleanConfig())
    assert doc["text"] == paras[0] + "\n  " + code + "\n" + paras[1]


def test_default_processes_follow_the_cores_this_process_may_use(monkeypatch):
    """processes=0 took os.cpu_count(): every core of the node, also under taskset or a Slurm/container cpuset
    of a few (a worker each, each with its own parser and language model in memory)."""
    from fastllm.executor import Executor

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert Executor(0).workers == 3 and Executor(2).workers == 2
