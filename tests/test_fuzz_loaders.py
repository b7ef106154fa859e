"""Fuzzing the file loaders: valid files (a tokenizer as .tiktoken + .json sidecar, an HF tokenizer.json, GPT-2's
vocab.json + merges.txt, safetensors, token shards, a prepare manifest, an HF model folder, a fastllm checkpoint) are
damaged -- bytes flipped, inserted, deleted, truncated, duplicated; for JSON files and safetensors headers also any
value replaced by random JSON or a key removed -- and loaded again. Every outcome must be a successful load or a
ValueError / OSError whose message names the damaged file: never another exception, a crash or a hang
(faulthandler aborts the run after a while).

Each loader gets a bounded number of examples (a few seconds); FASTLLM_FUZZ_EXAMPLES raises it for a longer run,
e.g. FASTLLM_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_loaders.py."""

from __future__ import annotations

import faulthandler
import json
import os
import struct
import warnings

import numpy as np
import pytest

from fastllm import Tokenizer, checkpoint, hf
from fastllm.data import DataLoader, prepare, read_shard, write_shard
from fastllm.fileio import load_safetensors, save_safetensors
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FASTLLM_FUZZ_EXAMPLES", "60"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True, scope="module")
def _no_hang():
    """A loader that hangs fails the run (with every thread's traceback) instead of blocking CI."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---- damage ------------------------------------------------------------------------------------------------

byte_edits = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]), st.integers(0, 2**31),
              st.binary(min_size=1, max_size=8)),
    min_size=1, max_size=4,
)


def damage_bytes(data: bytes, edits) -> bytes:
    """Apply byte edits: each picks a position (modulo the length) and changes the bytes there."""
    b = bytearray(data)
    for kind, at, payload in edits:
        i = at % (len(b) + 1)
        if kind == "flip" and i < len(b):
            b[i] ^= 1 << (payload[0] % 8)
        elif kind == "set" and i < len(b):
            b[i:i + len(payload)] = payload
        elif kind == "insert":
            b[i:i] = payload
        elif kind == "delete":
            del b[i:i + payload[0] % 64 + 1]
        elif kind == "truncate":
            del b[i:]
        elif kind == "repeat":
            b[i:i] = b[i:i + payload[0] % 64 + 1]
    return bytes(b)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths_of(doc, prefix=()):
    """Every path (tuple of keys / indices) to a value inside a JSON document, the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):  # (long lists: their head is enough)
            out += paths_of(v, prefix + (i,))
    return out


def damage_json(doc, pick: int, value, delete: bool):
    """A copy of doc with the value at one path replaced by `value` (or its key deleted)."""
    doc = json.loads(json.dumps(doc))
    path = paths_of(doc)[pick % len(paths_of(doc))]
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


json_edits = st.tuples(st.integers(0, 2**31), json_values, st.booleans())


def damaged(path, data: bytes, edits) -> None:
    """Write `data` damaged: byte edits (a list) or a JSON edit (a tuple) of the JSON document in `data` (of a
    safetensors file: of its header, the tensor bytes kept)."""
    if isinstance(edits, tuple) and path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.dumps(damage_json(json.loads(data[8:8 + n]), *edits)).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
    elif isinstance(edits, tuple):
        path.write_text(json.dumps(damage_json(json.loads(data), *edits)))
    else:
        path.write_bytes(damage_bytes(data, edits))


def expect_clean(load, path) -> None:
    """load() succeeds or raises ValueError / OSError naming the file at `path`."""
    try:
        load()
    except (ValueError, OSError) as e:
        assert path.name in str(e), f"{type(e).__name__} does not name {path.name}: {e}"


def edits_for(path) -> st.SearchStrategy:
    return byte_edits | json_edits if path.suffix in (".json", ".safetensors") else byte_edits


# ---- the valid files -----------------------------------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 123 4567 <|endoftext|> hello\n" * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One valid file of each kind: {name: (path, bytes)} in its own folder (restored before each example)."""
    root = tmp_path_factory.mktemp("valid")
    tok = Tokenizer.train([TEXT], vocab_size=300, progress=False)
    (root / "tok").mkdir()
    tok.save(root / "tok" / "t.tiktoken")
    (root / "hftok").mkdir()
    tok.save_hf(root / "hftok" / "tokenizer.json")
    (root / "gpt2tok").mkdir()
    doc = json.loads((root / "hftok" / "tokenizer.json").read_text())
    (root / "gpt2tok" / "vocab.json").write_text(json.dumps(doc["model"]["vocab"]))
    (root / "gpt2tok" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in
                                                                              doc["model"]["merges"]))
    (root / "st").mkdir()
    save_safetensors(root / "st" / "x.safetensors", {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                      "b": np.arange(4, dtype=np.int64)}, {"k": "v"})
    (root / "shards").mkdir()
    write_shard(root / "shards" / "train_000000.bin", np.arange(200) % 300, 300)
    write_shard(root / "shards" / "train_000001.bin", np.arange(150) % 300, 300)
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(TEXT)
    prepare([str(root / "corpus")], root / "tok" / "t.tiktoken", root / "prep", val_fraction=0.5, shard_tokens=100,
            progress=False)
    model = GPT(GPTConfig(block_size=8, vocab_size=300, n_layer=1, n_head=2, n_embd=8))
    hf.save_pretrained(model, root / "hfmodel", max_shard_bytes=2000)  # sharded: index + shards
    checkpoint.save(root / "run", 3, model, AdamW(model), {"pos": 1}, kind="train", rng=np.random.default_rng(0))
    out = {}
    for rel in ("tok/t.tiktoken", "tok/t.tiktoken.json", "hftok/tokenizer.json", "gpt2tok/vocab.json",
                "gpt2tok/merges.txt", "st/x.safetensors", "shards/train_000000.bin", "prep/manifest.json",
                "hfmodel/config.json", "hfmodel/model.safetensors.index.json",
                "hfmodel/model-00001-of-00004.safetensors", "run/ckpt_000003/model.safetensors",
                "run/ckpt_000003/optimizer.safetensors", "run/ckpt_000003/state.json"):
        out[rel] = (root / rel, (root / rel).read_bytes())
    return out


@pytest.fixture
def restore(files):
    """Returns a function that restores every valid file (hypothesis reuses the fixture's folders)."""

    def run():
        for path, data in files.values():
            path.write_bytes(data)

    return run


# ---- one test per loader ---------------------------------------------------------------------------------------


def fuzz_file(files, restore, rel: str, load, examples: int = EXAMPLES) -> None:
    path, data = files[rel]

    @settings(fuzz, max_examples=examples)
    @given(edits=edits_for(path))
    def run(edits):
        restore()
        damaged(path, data, edits)
        expect_clean(lambda: load(path), path)

    run()


@pytest.mark.parametrize("rel", ["tok/t.tiktoken", "tok/t.tiktoken.json"])
def test_tiktoken_files(files, restore, rel):
    rank_file = files["tok/t.tiktoken"][0]
    fuzz_file(files, restore, rel, lambda p: Tokenizer.load(rank_file).encode(TEXT, allowed_special="all"))


def test_hf_tokenizer_json(files, restore):
    fuzz_file(files, restore, "hftok/tokenizer.json",
              lambda p: Tokenizer.load_hf(p).encode(TEXT, allowed_special="all"))


@pytest.mark.parametrize("rel", ["gpt2tok/vocab.json", "gpt2tok/merges.txt"])
def test_vocab_and_merges(files, restore, rel):
    fuzz_file(files, restore, rel, lambda p: Tokenizer.from_pretrained(p.parent).encode(TEXT, allowed_special="all"))


@pytest.mark.parametrize("mmap", [False, True])
def test_safetensors(files, restore, mmap):
    fuzz_file(files, restore, "st/x.safetensors", lambda p: load_safetensors(p, mmap=mmap))


def test_shards(files, restore):
    def load(p):
        read_shard(p)
        loader = DataLoader(p.parent, "train", B=2, T=8)
        loader.next_batch()

    fuzz_file(files, restore, "shards/train_000000.bin", load)


def test_prepare_manifest(files, restore):
    """A rerun of prepare over a damaged manifest.json (a warning: the shards are made again) gives the same shards.
    (A rerun takes ~0.3 s: fewer examples.)"""
    manifest = files["prep/manifest.json"][0]
    out = manifest.parent
    expected = {p.name: p.read_bytes() for p in out.glob("*.bin")}

    def load(p):
        prepare([str(out.parent / "corpus")], out.parent / "tok" / "t.tiktoken", out, val_fraction=0.5,
                shard_tokens=100, progress=False)
        assert {q.name: q.read_bytes() for q in out.glob("*.bin")} == expected

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "manifest.json: ... damaged; preparing the shards again"
        fuzz_file(files, restore, "prep/manifest.json", load, examples=max(1, EXAMPLES // 4))


@pytest.mark.parametrize("rel", ["hfmodel/config.json", "hfmodel/model.safetensors.index.json",
                                 "hfmodel/model-00001-of-00004.safetensors"])
def test_hf_model_folder(files, restore, rel):
    fuzz_file(files, restore, rel, lambda p: hf.from_pretrained(p.parent))


@pytest.mark.parametrize("rel", ["run/ckpt_000003/model.safetensors", "run/ckpt_000003/optimizer.safetensors",
                                 "run/ckpt_000003/state.json"])
def test_checkpoint_folder(files, restore, rel):
    """A fastllm checkpoint as `--resume` reads it: the model (its GPTConfig in the metadata), then the optimizer
    state and state.json."""
    folder = files[rel][0].parent

    def load(p):
        model = checkpoint.load_model(folder.parent)
        checkpoint.load_optimizer(folder, AdamW(model))
        checkpoint.load_state(folder, "train")

    fuzz_file(files, restore, rel, load)


def test_damage_helpers_change_files(tmp_path):
    """The fuzzers test something: byte edits and JSON edits change valid files."""
    assert damage_bytes(b"abcdef", [("flip", 2, b"\x01")]) == b"abadef"  # c ^ 2
    assert damage_bytes(b"abcdef", [("truncate", 3, b"x")]) == b"abc"
    assert damage_json({"a": [1, 2]}, 2, "x", False) == {"a": ["x", 2]}
    assert damage_json({"a": [1, 2]}, 1, None, True) == {}
    assert struct.unpack("<Q", damage_bytes(struct.pack("<Q", 0), [("set", 0, b"\xff")]))[0] == 255
    f = tmp_path / "x.safetensors"
    save_safetensors(f, {"a": np.ones(2, np.float32)})
    damaged(f, f.read_bytes(), (2, "I32", False))  # a JSON edit of a safetensors header: "a"'s dtype
    assert load_safetensors(f)[0]["a"].tolist() == [0x3F800000] * 2  # (the tensor bytes kept: 1.0f's bits)
