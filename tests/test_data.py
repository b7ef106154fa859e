"""Token shards and the data loader: round trips, exact shifted windows, determinism, resume, corrupt files."""

from __future__ import annotations

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
    eot = tok.special_tokens["<|endoftext|>"]
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


def test_checkpoint_tokenizer_either_format(tmp_path):
    """The tokenizer of a checkpoint folder in either format (fastllm's rank file or a HF tokenizer.json, as
    `fastllm convert` leaves it), an explicit path first, and a clear error naming the folder without one."""
    from fastllm import Tokenizer
    from fastllm.data import TOKENIZER_FILE, checkpoint_tokenizer

    tok = Tokenizer.train(["the cat sat on the mat. " * 20], 280, special_tokens=[], progress=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "none").mkdir()
    tok.save(tmp_path / "a" / TOKENIZER_FILE)
    tok.save_hf(tmp_path / "b" / "tokenizer.json")
    for folder in ("a", "b"):
        assert checkpoint_tokenizer(tmp_path / folder).encode("the mat").tolist() == tok.encode("the mat").tolist()
    assert checkpoint_tokenizer(tmp_path / "none", tmp_path / "a" / TOKENIZER_FILE).n_vocab == tok.n_vocab
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*none"):
        checkpoint_tokenizer(tmp_path / "none")
