"""Token shards and the data loader: round trips, exact shifted windows, determinism, resume, corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastllm.data import HEADER_SIZE, DataLoader, read_shard, write_shard


@pytest.mark.parametrize("V,dtype", [(300, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_shard_round_trip(tmp_path, V, dtype):
    toks = np.random.default_rng(0).integers(0, V, 1000)
    write_shard(tmp_path / "train_000000.bin", toks, V)
    got = read_shard(tmp_path / "train_000000.bin")
    assert got.dtype == dtype and np.array_equal(got, toks)
    assert (tmp_path / "train_000000.bin").stat().st_size == HEADER_SIZE + 1000 * np.dtype(dtype).itemsize


def test_shard_rejects_out_of_range_tokens(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        write_shard(tmp_path / "x.bin", np.array([1, 10]), 10)


def test_corrupt_and_truncated_shards(tmp_path):
    p = tmp_path / "train_000000.bin"
    write_shard(p, np.arange(100), 300)
    data = p.read_bytes()
    p.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="train_000000.bin.*truncated"):
        read_shard(p)
    p.write_bytes(b"NOTASHRD" + data[8:])
    with pytest.raises(ValueError, match="train_000000.bin.*not a fastllm token shard"):
        read_shard(p)
    p.write_bytes(data[:10])
    with pytest.raises(ValueError, match="truncated shard header"):
        read_shard(p)


def make_shards(tmp_path, sizes=(1000, 517), V=50):
    rng = np.random.default_rng(0)
    shards = []
    for i, n in enumerate(sizes):
        toks = rng.integers(0, V, n)
        write_shard(tmp_path / f"train_{i:06d}.bin", toks, V)
        shards.append(toks)
    return shards


def test_windows_are_exactly_shifted_tokens(tmp_path):
    shards = make_shards(tmp_path)
    T = 16
    loader = DataLoader(tmp_path, "train", B=4, T=T, seed=3)
    assert len(loader) == (1000 - 1) // T + (517 - 1) // T
    seen = set()
    for _ in range(len(loader) // 4):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == np.int32
        assert np.array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            # each window is a contiguous slice of some shard at a multiple of T
            hits = [(s, o) for s, toks in enumerate(shards) for o in range(0, toks.size - T, T)
                    if np.array_equal(toks[o:o + T], row_x) and toks[o + T] == row_y[-1]]
            assert hits
            seen.add(hits[0])
    assert len(seen) == (len(loader) // 4) * 4  # no window repeats within an epoch


def test_loader_is_deterministic_and_resumable(tmp_path):
    make_shards(tmp_path)
    a = DataLoader(tmp_path, "train", B=3, T=8, seed=7)
    b = DataLoader(tmp_path, "train", B=3, T=8, seed=7)
    batches = [a.next_batch()[0] for _ in range(100)]  # crosses epochs
    for i in range(40):
        assert np.array_equal(b.next_batch()[0], batches[i])
    state = b.state_dict()
    c = DataLoader(tmp_path, "train", B=3, T=8, seed=7)
    c.load_state_dict(state)
    for i in range(40, 100):
        assert np.array_equal(c.next_batch()[0], batches[i])
    other = DataLoader(tmp_path, "train", B=3, T=8, seed=8)
    assert not np.array_equal(other.next_batch()[0], batches[0])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        DataLoader(tmp_path, "train", 2, 8)
    write_shard(tmp_path / "train_000000.bin", np.arange(5), 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        DataLoader(tmp_path, "train", 2, 8)
    with pytest.raises(ValueError, match="positive"):
        DataLoader(tmp_path, "train", 0, 8)


# ---- prepare: text files / JSONL -> shards --------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from fastllm.data import builtin_corpus
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.train(builtin_corpus()[:20], 600, special_tokens=["<|endoftext|>"], progress=False)
    path = tmp_path_factory.mktemp("tok") / "tok.tiktoken"
    tok.save(path)
    return path


def write_corpus(folder, n_docs=30):
    import json

    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(20 + i)) for i in range(n_docs)]
    (folder / "a.txt").write_text("<|endoftext|>".join(docs[:10]), encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(docs[10], encoding="utf-8")
    with open(folder / "sub" / "c.jsonl", "w", encoding="utf-8") as f:
        for d in docs[11:]:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def split_docs(tokens, tok):
    eot = tok.start_token
    cuts = np.flatnonzero(np.asarray(tokens) == eot)
    return [tok.decode(np.asarray(tokens[a + 1:b])) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def test_prepare_round_trips_documents(tmp_path, tok_path):
    from fastllm.data import prepare
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    (tmp_path / "corpus").mkdir()
    docs = write_corpus(tmp_path / "corpus")
    st = prepare([str(tmp_path / "corpus")], tok_path, tmp_path / "data", val_fraction=0.1, shard_tokens=300,
                 progress=False)
    train = np.concatenate([read_shard(p) for p in sorted((tmp_path / "data").glob("train_*.bin"))])
    val = np.concatenate([read_shard(p) for p in sorted((tmp_path / "data").glob("val_*.bin"))])
    assert st.train_tokens == train.size and st.val_tokens == val.size and len(st.shards) > 2
    # every 10th document goes to val; shards concatenate to the documents in order, each after <|endoftext|>
    assert split_docs(val, tok) == [d for i, d in enumerate(docs) if i % 10 == 9]
    assert split_docs(train, tok) == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert (tmp_path / "data" / "tokenizer.tiktoken").exists()


def test_prepare_with_a_llama_tokenizer(tmp_path):
    """A tokenizer without <|endoftext|> that puts a BOS before every text (Llama 2's, Mistral's, Llama 3's) prepares
    shards with each document after that BOS, as those models were trained (it was refused); one with neither is
    refused by name."""
    pytest.importorskip("sentencepiece")
    from hf_families import sentencepiece_doc

    from fastllm.data import prepare
    from fastllm.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(sentencepiece_doc(800)))
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert tok.eot_token is None and tok.start_token == tok.special_tokens["<s>"]
    (tmp_path / "corpus").mkdir()
    docs = write_corpus(tmp_path / "corpus")
    prepare([str(tmp_path / "corpus")], tmp_path / "tokenizer.json", tmp_path / "data", val_fraction=0.1,
            progress=False)
    train = np.concatenate([read_shard(p) for p in sorted((tmp_path / "data").glob("train_*.bin"))])
    assert train[0] == tok.start_token and split_docs(train, tok) == [d for i, d in enumerate(docs) if i % 10 != 9]
    doc = sentencepiece_doc(800)
    doc["post_processor"] = None  # no BOS, no <|endoftext|>
    (tmp_path / "none.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"neither a BOS token .* nor <\|endoftext\|> to start each document"):
        prepare([str(tmp_path / "corpus")], tmp_path / "none.json", tmp_path / "data2", progress=False)


def test_prepare_rerun_skips_and_resumes(tmp_path, tok_path):
    import json

    from fastllm.data import prepare

    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    prepare([str(tmp_path / "corpus")], tok_path, out, shard_tokens=200, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    again = prepare([str(tmp_path / "corpus")], tok_path, out, shard_tokens=200, progress=False)
    assert again.skipped == len(before)
    # an interrupted run: the manifest lists only the first shards and is not done
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["done"] = manifest["shards"][:2], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    for p in out.glob("*.bin"):
        if p.name not in {s["name"] for s in manifest["shards"]}:
            p.unlink()
    resumed = prepare([str(tmp_path / "corpus")], tok_path, out, shard_tokens=200, progress=False)
    assert resumed.skipped == 2
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == before  # byte-identical shards


def test_prepare_bad_input(tmp_path, tok_path):
    from fastllm.data import prepare

    with pytest.raises(FileNotFoundError, match="nope"):
        prepare([str(tmp_path / "nope")], tok_path, tmp_path / "d", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        prepare([str(tmp_path / "bad.jsonl")], tok_path, tmp_path / "d", progress=False)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bin.txt.*UTF-8"):
        prepare([str(tmp_path / "bin.txt")], tok_path, tmp_path / "d", progress=False)


def write_docs(path, n, words=40):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Doc {i}: " + " ".join(f"w{(i * 3 + j) % 97}" for j in range(words))}) + "\n")


@pytest.mark.parametrize("frac", [0.1, 0.25, 0.4, 0.5, 0.6, 0.7])
def test_val_fraction_is_exact(tmp_path, tok_path, frac):
    """floor(n * frac) of n whole documents go to val, spread evenly (0.4 and 0.6 used to give the same 50%
    split, 0.7 put every document in val)."""
    from fastllm.data import prepare
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    write_docs(tmp_path / "c.jsonl", 40)
    st = prepare([str(tmp_path / "c.jsonl")], tok_path, tmp_path / "d", val_fraction=frac, progress=False)
    assert st.split == "documents"
    val = split_docs(np.concatenate([read_shard(p) for p in sorted((tmp_path / "d").glob("val_*.bin"))]), tok)
    train = split_docs(np.concatenate([read_shard(p) for p in sorted((tmp_path / "d").glob("train_*.bin"))]), tok)
    assert len(val) == int(40 * frac + 1e-9) and len(train) == 40 - len(val)
    firsts = [int(d.split(":")[0].split()[1]) for d in val]
    assert max(np.diff(firsts), default=1) <= int(1 / frac) + 1  # spread, not bunched at one end


def test_one_file_gets_a_val_split_at_a_paragraph(tmp_path, tok_path):
    """One text file (one document) used to give no val split at all (and `val loss nan` in training): now
    its last ~val_fraction, cut at a paragraph break, is the val split; train + val give back the text."""
    from fastllm.data import builtin_corpus, prepare
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    text = "\n\n".join(builtin_corpus()[:30])
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    st = prepare([str(tmp_path / "book.txt")], tok_path, tmp_path / "d", val_fraction=0.1, progress=False)
    assert st.split == "within" and st.documents == 1 and st.val_tokens > 0
    assert 0.05 < st.val_tokens / (st.train_tokens + st.val_tokens) < 0.2
    (train,) = split_docs(read_shard(tmp_path / "d" / "train_000000.bin"), tok)
    (val,) = split_docs(read_shard(tmp_path / "d" / "val_000000.bin"), tok)
    assert train + val == text and train.endswith("\n\n") and not val.startswith("\n")


def test_tiny_or_empty_val_split_warns(tmp_path, tok_path):
    from fastllm.data import prepare

    (tmp_path / "one.txt").write_text("hi", encoding="utf-8")
    with pytest.warns(UserWarning, match="only 0 tokens.*missing"):
        st = prepare([str(tmp_path / "one.txt")], tok_path, tmp_path / "d", progress=False)
    assert st.val_tokens == 0
    write_docs(tmp_path / "c.jsonl", 5)
    with pytest.warns(UserWarning, match="validation split has only .* tokens.*noisy"):
        prepare([str(tmp_path / "c.jsonl")], tok_path, tmp_path / "d2", val_fraction=0.1, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no val wanted: no warning
        prepare([str(tmp_path / "c.jsonl")], tok_path, tmp_path / "d3", val_fraction=0, progress=False)


def test_split_text_cuts_at_paragraphs():
    from fastllm.data import split_text

    text = "".join(f"Paragraph {i} " + "x" * 50 + "\n\n" for i in range(20))
    head, tail = split_text(text, 0.1)
    assert head + tail == text and tail.startswith("Paragraph 18") and head.endswith("\n\n")
    head, tail = split_text("one long line without breaks " * 10, 0.2)
    assert head + tail == "one long line without breaks " * 10 and 0.1 < len(tail) / len(head + tail) < 0.3


# ---- manifests and shards (issue 23) -------------------------------------------------------------------


def test_corrupt_manifest_is_named_and_recovered(tmp_path, tok_path):
    from fastllm.data import prepare

    write_docs(tmp_path / "c.jsonl", 30)
    out = tmp_path / "d"
    prepare([str(tmp_path / "c.jsonl")], tok_path, out, shard_tokens=300, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    for bad in ('{"version": 2, "shards": [', '[1, 2]', '{"version": 2, "fingerprint": "x", "shards": [{"a": 1}]}'):
        (out / "manifest.json").write_text(bad)
        with pytest.warns(UserWarning, match="manifest.json") if bad != "[1, 2]" else _no_warning():
            st = prepare([str(tmp_path / "c.jsonl")], tok_path, out, shard_tokens=300, progress=False)
        assert st.skipped == 0 and {p.name: p.read_bytes() for p in out.glob("*.bin")} == before
        assert json_load(out / "manifest.json")["done"]


def json_load(path):
    import json

    return json.loads(path.read_text())


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_small_shards_do_not_rewrite_the_manifest_each_time(tmp_path, tok_path, monkeypatch):
    """--shard-tokens 1 used to rewrite and fsync the manifest after every shard (quadratic)."""
    from fastllm import data

    write_docs(tmp_path / "c.jsonl", 20, words=10)
    writes = []
    real = data.write_json
    monkeypatch.setattr(data, "write_json", lambda p, obj: (writes.append(str(p)), real(p, obj))[1])
    st = data.prepare([str(tmp_path / "c.jsonl")], tok_path, tmp_path / "d", shard_tokens=7, progress=False)
    assert len(st.shards) > 30
    assert sum(w.endswith("manifest.json") for w in writes) <= 3


def test_loader_refuses_a_shard_of_another_vocabulary(tmp_path):
    """A stray shard from another tokenizer used to fail at a random step without a name; now the loader
    checks every shard's vocabulary when it opens."""
    write_shard(tmp_path / "train_000000.bin", np.arange(100) % 50, 50)
    write_shard(tmp_path / "train_000001.bin", np.arange(100) % 50, 50)
    write_shard(tmp_path / "train_000002.bin", np.arange(100) % 300, 300)
    with pytest.raises(ValueError, match=r"train_000002.bin: shard of a 300-token vocabulary among shards of 50"):
        DataLoader(tmp_path, "train", 2, 8)


def test_huge_vocabulary_ids_are_refused(tmp_path):
    """An id near 2**28 (a sparse rank file, or a shard header claiming such a vocabulary) would size the
    tokenizer's tables and the model's embedding by it (GBs): refused naming the file."""
    import base64
    import json
    import struct

    from fastllm.tokenizer import _read_ranks

    ranks = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    ranks.append(base64.b64encode(b"ab") + b" %d" % (2**28 - 5))
    (tmp_path / "sparse.tiktoken").write_bytes(b"\n".join(ranks) + b"\n")
    with pytest.raises(ValueError, match=r"sparse.tiktoken:257: rank 268435451 .*dense"):
        _read_ranks(tmp_path / "sparse.tiktoken")
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    tok.save(tmp_path / "sp.tiktoken")
    side = json_load(tmp_path / "sp.tiktoken.json")
    side["special_tokens"] = {"<|endoftext|>": 2**28 - 3}
    (tmp_path / "sp.tiktoken.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"sp.tiktoken.json:1: special token '<\|endoftext\|>' has id 268435453"):
        Tokenizer.load(tmp_path / "sp.tiktoken")
    p = tmp_path / "train_000000.bin"
    write_shard(p, np.arange(10), 70000)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<I", raw, 24, 2**28)  # the header's vocab_size
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train_000000.bin: corrupt shard header"):
        read_shard(p)
    with pytest.raises(ValueError, match="vocab_size"):
        write_shard(tmp_path / "x.bin", np.arange(3), 2**28)


def test_prepare_on_dask_gives_the_same_shards(tmp_path, tok_path):
    """`prepare(..., dask=...)` tokenizes the batches and writes the shards on the workers: the same shards
    and manifest as on one machine, in both split modes."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from fastllm.data import prepare

    write_docs(tmp_path / "a.jsonl", 45)
    (tmp_path / "b.txt").write_text("\n\n".join(f"Paragraph {i}: " + "word " * 30 for i in range(40)))
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    client = Client(cluster)
    try:
        for name, inputs, frac in (("docs", ["a.jsonl", "b.txt"], 0.1), ("within", ["b.txt"], 0.1)):
            ins = [str(tmp_path / i) for i in inputs]
            one = prepare(ins, tok_path, tmp_path / f"{name}1", val_fraction=frac, shard_tokens=500, progress=False)
            two = prepare(ins, tok_path, tmp_path / f"{name}2", val_fraction=frac, shard_tokens=500, progress=False,
                          dask=client)
            assert one.split == two.split == ("documents" if name == "docs" else "within")
            assert one.shards == two.shards and len(one.shards) > 2
            for s in one.shards:
                assert (tmp_path / f"{name}1" / s).read_bytes() == (tmp_path / f"{name}2" / s).read_bytes()
            m1, m2 = (json_load(tmp_path / f"{name}{k}" / "manifest.json") for k in (1, 2))
            assert m1 == m2
    finally:
        client.close()
        cluster.close()


def test_finished_run_with_a_shard_deleted_rebuilds_it(tmp_path, tok_path):
    from fastllm.data import prepare

    write_docs(tmp_path / "c.jsonl", 30)
    out = tmp_path / "d"
    first = prepare([str(tmp_path / "c.jsonl")], tok_path, out, shard_tokens=300, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    (out / first.shards[1]).unlink()
    again = prepare([str(tmp_path / "c.jsonl")], tok_path, out, shard_tokens=300, progress=False)
    assert again.skipped == len(before) - 1 and {p.name: p.read_bytes() for p in out.glob("*.bin")} == before
    assert not (out / ".work").exists()


def test_cli_prepare_warns_in_one_line(tmp_path, tok_path, capsys):
    from fastllm.cli import main

    (tmp_path / "one.txt").write_text("A single short document.", encoding="utf-8")
    assert main(["prepare", str(tmp_path / "one.txt"), "--tokenizer", str(tok_path), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "fastllm: warning: the validation split has only" in cap.err and "val split: the end of each" in cap.out
    (tmp_path / "d" / "manifest.json").write_text("{oops")
    assert main(["prepare", str(tmp_path / "one.txt"), "--tokenizer", str(tok_path), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    manifest = str(tmp_path / "d" / "manifest.json")
    assert f"fastllm: warning: {manifest}: corrupt manifest" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "one.txt"), "--tokenizer", str(tok_path), "--out",
                 str(tmp_path / "one.txt"), "--no-progress"]) == 1
    assert "fastllm: error: --out" in capsys.readouterr().err


def write_parquet(path, rows: list[dict]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several row groups, as big files have


def vocab(tok) -> list[bytes]:
    return [tok.token_to_bytes(i) for i in range(tok.n_vocab) if i not in tok.special_tokens.values()]


def test_parquet_documents_tokenizer_and_prepare(tmp_path, tok_path, capsys):
    """Parquet files with a "text" column (FineWeb's and most Hub datasets' form: other columns beside it) are
    documents for `prepare` and `tokenizer train` like JSONL ones; `tokenizer train` reads a folder's files as
    prepare does (it read each file's raw bytes: the JSON of a `fastllm clean` shard went into the vocabulary)."""
    from fastllm.cli import main
    from fastllm.data import _input_files, iter_documents, prepare
    from fastllm.tokenizer import Tokenizer

    docs = [f"Document {i}: " + " ".join(f"wörd{(i * 7 + j) % 50}" for j in range(20 + i)) for i in range(12)]
    for d in ("pq", "js"):
        (tmp_path / d).mkdir()
    write_parquet(tmp_path / "pq" / "part-0.parquet",
                  [{"id": f"<urn:{i}>", "text": t, "score": 3.5} for i, t in enumerate(docs)])
    (tmp_path / "js" / "clean_000000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert list(iter_documents(_input_files([str(tmp_path / "pq")]))) == docs
    for d in ("pq", "js"):
        assert main(["tokenizer", "train", str(tmp_path / d), "--vocab-size", "300", "--out",
                     str(tmp_path / f"{d}.tiktoken"), "--no-progress"]) == 0
        tok = Tokenizer.load(tmp_path / f"{d}.tiktoken")
        assert vocab(tok) == vocab(Tokenizer.train(docs, 300))  # the documents' vocabulary, no JSON in it
        st = prepare([str(tmp_path / d)], tok_path, tmp_path / f"{d}_data", val_fraction=0.25, progress=False)
        assert st.train_tokens > 0
    # --max-chars: the first N characters of the corpus, the last document cut (nanochat's tok_train --max_chars)
    first = [docs[0], docs[1], docs[2][:10]]
    n = sum(map(len, first))
    assert main(["tokenizer", "train", str(tmp_path / "pq"), "--vocab-size", "300", "--out",
                 str(tmp_path / "first.tiktoken"), "--max-chars", str(n), "--no-progress"]) == 0
    assert vocab(Tokenizer.load(tmp_path / "first.tiktoken")) == vocab(Tokenizer.train(first, 300))
    assert f"on 3 documents ({n:,} characters)" in capsys.readouterr().out
    for split in ("train", "val"):
        a, b = (np.concatenate([read_shard(p) for p in sorted((tmp_path / f"{d}_data").glob(f"{split}_*.bin"))])
                for d in ("pq", "js"))
        assert np.array_equal(a, b)


def test_bad_parquet_is_named(tmp_path):
    from fastllm.fileio import iter_records

    write_parquet(tmp_path / "no_text.parquet", [{"content": "a"}])
    with pytest.raises(ValueError, match=r"no_text.parquet: no column 'text' \(columns: \['content'\]\)"):
        list(iter_records(tmp_path / "no_text.parquet", columns=["text"]))
    write_parquet(tmp_path / "good.parquet", [{"text": "x" * 100 + str(i)} for i in range(50)])
    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "fake.parquet").write_text('{"text": "not parquet"}\n')
    for name in ("cut.parquet", "fake.parquet"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable Parquet file"):
            list(iter_records(tmp_path / name))
    assert [w for w, _ in iter_records(tmp_path / "good.parquet")][-1].endswith("good.parquet:50")


def test_compressed_inputs(tmp_path, tok_path):
    """JSONL and text as corpora ship them compressed (Dolma .json.gz, RedPajama/the Pile .jsonl.zst, .xz, .bz2)
    are read like the plain files, in folders too; a damaged stream names the file (and line) instead of
    stopping with a bare zlib/EOF error."""
    import bz2
    import gzip
    import lzma

    from fastllm.data import _input_files, iter_documents, prepare

    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(20 + i)) for i in range(8)]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:6])).encode()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c" / "b.txt.xz").write_bytes(lzma.compress(docs[6].encode()))
    (tmp_path / "c" / "c.md.bz2").write_bytes(bz2.compress(docs[7].encode()))
    (tmp_path / "c" / "notes.gz").write_bytes(gzip.compress(b"not a corpus file"))  # no .txt/.jsonl inside
    assert list(iter_documents(_input_files([str(tmp_path / "c")]))) == docs
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "part.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    assert list(iter_documents(_input_files([str(tmp_path / "z")]))) == docs[:6]
    st = prepare([str(tmp_path / "z")], tok_path, tmp_path / "data", val_fraction=0.25, progress=False)
    assert st.train_tokens > 0 and st.val_tokens > 0
    big = "".join(json.dumps({"text": f"doc {i} " + "x" * 200}) + "\n" for i in range(2000)).encode()
    cut = gzip.compress(big)
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz:\d+: damaged gzip"):
        list(iter_documents([tmp_path / "cut.jsonl.gz"]))
    (tmp_path / "cut.txt.gz").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(ValueError, match=r"cut.txt.gz: damaged gzip"):
        list(iter_documents([tmp_path / "cut.txt.gz"]))
    cut = zstandard.ZstdCompressor().compress(big)  # zstandard's own reader would end quietly at the cut
    (tmp_path / "cut.jsonl.zst").write_bytes(cut[: len(cut) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut.jsonl.zst:\d+: damaged zstd \(EOFError"):
        list(iter_documents([tmp_path / "cut.jsonl.zst"]))
    two = zstandard.ZstdCompressor().compress(lines[:100]) + zstandard.ZstdCompressor().compress(lines[100:])
    (tmp_path / "z" / "part.jsonl.zst").write_bytes(two)  # frames one after another, as zstd -c a b > c writes
    assert list(iter_documents(_input_files([str(tmp_path / "z")]))) == docs[:6]


def test_json_files_c4_dolma_and_arrays(tmp_path, tok_path):
    """C4 and Dolma ship JSON Lines named .json.gz: read as records (they were tokenized as raw JSON text when
    named, and skipped in folders); a .json file holding one array of records (datasets' json loader reads both)
    too; a plain .json in a folder (`fastllm clean`'s summary.json) is not a corpus file."""
    import gzip

    from fastllm.data import _input_files, iter_documents, prepare
    from fastllm.fileio import iter_records

    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(20 + i)) for i in range(8)]
    (tmp_path / "c4").mkdir()
    lines = "".join(json.dumps({"text": t, "url": "https://x"}) + "\n" for t in docs[:6])
    (tmp_path / "c4" / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c4" / "summary.json").write_text(json.dumps({"documents": 6}))
    files = _input_files([str(tmp_path / "c4")])
    assert [f.name for f in files] == ["c4-train.00000-of-01024.json.gz"]
    assert list(iter_documents(files)) == docs[:6]
    (tmp_path / "array.json").write_text("\ufeff" + json.dumps([{"text": t} for t in docs[6:]], indent=2))
    (tmp_path / "lines.json").write_text(lines)
    assert list(iter_documents(_input_files([str(tmp_path / "array.json"), str(tmp_path / "lines.json")]))) == \
        docs[6:] + docs[:6]
    assert [w for w, _ in iter_records(tmp_path / "array.json")] == [f"{tmp_path / 'array.json'}: record {n}"
                                                                     for n in (1, 2)]
    st = prepare([str(tmp_path / "c4")], tok_path, tmp_path / "data", val_fraction=0.25, progress=False)
    assert st.documents == 6
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"bad.json:2: bad JSON"):
        list(iter_documents([tmp_path / "bad.json"]))
    (tmp_path / "meta.json").write_text('[{"name": "a"}]')
    with pytest.raises(ValueError, match=r"meta.json: record 1: expected a JSON object with a string 'text'"):
        list(iter_documents([tmp_path / "meta.json"]))


def test_files_with_a_byte_order_mark(tmp_path):
    """JSONL and text saved by Windows tools start with a UTF-8 BOM: the JSONL's first line was 'bad JSON' and
    stopped prepare, and a text file's first document began with U+FEFF. A BOM inside the text stays."""
    import gzip

    from fastllm.data import iter_documents

    docs = ["First document, with é.", "Second \ufeff one."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8-sig")
    (tmp_path / "b.txt").write_text("<|endoftext|>".join(docs), encoding="utf-8-sig")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("<|endoftext|>".join(docs).encode("utf-8-sig")))
    for name in ("a.jsonl", "b.txt", "c.txt.gz"):
        assert list(iter_documents([tmp_path / name])) == docs, name
    from fastllm.tokenizer import Tokenizer

    (tmp_path / "d.txt").write_text(docs[0], encoding="utf-8-sig")  # trained on the text, not on its BOM
    a, b = (Tokenizer.train([x], 400, special_tokens=(), progress=False) for x in (tmp_path / "d.txt", docs[0]))
    assert [a.token_to_bytes(i) for i in range(a.n_vocab)] == [b.token_to_bytes(i) for i in range(b.n_vocab)]


def test_no_val_split_reads_the_inputs_once(tmp_path, tok_path, monkeypatch):
    """With val_fraction=0 the documents were counted first (a whole extra pass over the corpus, for a split
    that is not made); now they are read once, to tokenize them."""
    import fastllm.data as D

    (tmp_path / "corpus").mkdir()
    docs = write_corpus(tmp_path / "corpus")
    seen = []
    real = D.iter_documents

    def counting(files):
        for d in real(files):
            seen.append(d)
            yield d

    monkeypatch.setattr(D, "iter_documents", counting)
    st = D.prepare([str(tmp_path / "corpus")], tok_path, tmp_path / "data", val_fraction=0, progress=False)
    assert st.documents == len(docs) == len(seen) and st.val_tokens == 0 and st.split == "none"
