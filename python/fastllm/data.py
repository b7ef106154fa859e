"""Token shards and the data loader.

Shard file (`train_000000.bin`, `val_000000.bin`): a 64-byte little-endian header
    magic b"FLLMTOK1" | version u32 | itemsize u32 (2: uint16, 4: uint32) | count u64 | vocab_size u32 | pad
followed by `count` token ids. Every document starts with the end-of-text token (GPT-2 convention), so
shards can be concatenated and windows may span documents. Shards are memory-mapped on read.

`prepare()` tokenizes text files / folders / JSONL files (field "text") in parallel into shards plus a
validation split, writes each shard atomically and records progress in `manifest.json`, so a re-run with the
same inputs and tokenizer skips the shards already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .fileio import atomic_write, iter_jsonl, write_json

MAGIC = b"FLLMTOK1"
VERSION = 1
HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, count, vocab_size
HEADER_SIZE = 64
EOT = "<|endoftext|>"


# ---- shard files ---------------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write token ids as a shard (uint16 when the vocabulary fits, else uint32), atomically."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids outside [0, {vocab_size})")
    head = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, tokens.size, vocab_size)
    with atomic_write(path) as f:
        f.write(head.ljust(HEADER_SIZE, b"\0"))
        f.write(tokens.astype(dtype).tobytes())


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens; ValueError naming the file if it is not a shard, truncated or corrupt."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{path}: truncated shard header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, itemsize, count, _vocab = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a fastllm token shard (magic {magic!r})")
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version} is not supported (expected {VERSION})")
    if itemsize not in (2, 4):
        raise ValueError(f"{path}: corrupt shard header (itemsize {itemsize})")
    expect = HEADER_SIZE + count * itemsize
    if size != expect:
        raise ValueError(f"{path}: shard header says {count} tokens ({expect} bytes) but the file has {size} bytes "
                         "(truncated or corrupt)")
    if count == 0:
        return np.zeros(0, np.uint16 if itemsize == 2 else np.uint32)
    return np.memmap(path, np.uint16 if itemsize == 2 else np.uint32, "r", offset=HEADER_SIZE, shape=(count,))


def shard_vocab_size(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return HEADER.unpack_from(f.read(HEADER.size))[4]


# ---- tokenizer files ---------------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.tiktoken"  # the copy kept beside shards and in checkpoints (+ its .json sidecar)


def copy_tokenizer(src: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy a tokenizer into `folder`: one saved by Tokenizer.save (rank file + `.json` sidecar) becomes
    TOKENIZER_FILE (+ sidecar); a HF tokenizer.json is copied as tokenizer.json."""
    src = Path(src)
    if src.suffix == ".json" and not Path(str(src) + ".json").exists():
        pairs = [(src, Path(folder) / "tokenizer.json")]
    else:
        pairs = [(Path(str(src) + sfx), Path(folder) / (TOKENIZER_FILE + sfx)) for sfx in ("", ".json")]
    for a, b in pairs:
        if not a.exists():
            raise FileNotFoundError(f"tokenizer file {a} not found (saved with Tokenizer.save?)")
        if a.resolve() != b.resolve():
            with atomic_write(b) as f:
                f.write(a.read_bytes())
    return pairs[0][1]


def find_tokenizer(folder: str | os.PathLike) -> Path | None:
    """fastllm's tokenizer copy in `folder`, else a HF tokenizer.json (from `fastllm convert`), else None."""
    for name in (TOKENIZER_FILE, "tokenizer.json"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def checkpoint_tokenizer(folder: str | os.PathLike, override: str | os.PathLike | None = None):
    """The tokenizer at `override` if given, else the one find_tokenizer finds in `folder` (either format);
    FileNotFoundError naming the folder if there is none."""
    from .tokenizer import Tokenizer

    path = override or find_tokenizer(folder)
    if path is None:
        raise FileNotFoundError(f"no tokenizer in {folder} ({TOKENIZER_FILE} or tokenizer.json); pass one explicitly")
    return Tokenizer.from_pretrained(path)


# ---- documents -----------------------------------------------------------------------------------------


def _input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".md", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {inp}")
    if not files:
        raise ValueError(f"no input files (.txt, .md, .jsonl) found in {inputs}")
    return files


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Documents from text files (split at <|endoftext|>) and JSONL files (one {"text": ...} per line)."""
    for path in files:
        if path.suffix == ".jsonl":
            for where, obj in iter_jsonl(path):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{where}: expected a JSON object with a string 'text' field")
                yield obj["text"]
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
            for doc in text.split(EOT):
                if doc.strip():
                    yield doc


def builtin_corpus() -> list[str]:
    """Python's own documentation, shipped with every Python: the pydoc topics and the standard library's
    docstrings (~2 MB of English; see fastllm.corpus)."""
    from .corpus import builtin_corpus

    return builtin_corpus()


# ---- prepare -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareStats:
    out_dir: str
    train_tokens: int
    val_tokens: int
    documents: int
    shards: list[str]
    skipped: int  # shards found finished from an earlier run


def _fingerprint(files: list[Path], tok_path: Path, params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(tok_path.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def prepare(inputs: list[str] | None, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
            val_fraction: float = 0.05, shard_tokens: int = 50_000_000, threads: int | None = None,
            progress: bool = True) -> PrepareStats:
    """Tokenize `inputs` (files or folders; None = the built-in corpus) with the tokenizer file into
    `out_dir`/{train,val}_NNNNNN.bin. Every `round(1/val_fraction)`-th document goes to the val split."""
    from tqdm.auto import tqdm

    from .tokenizer import Tokenizer

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = Path(tokenizer)
    tok = Tokenizer.from_pretrained(tok_path)
    if EOT not in tok.special_tokens:
        raise ValueError(f"tokenizer {tok_path} has no {EOT} special token to separate documents")
    eot = tok.special_tokens[EOT]
    V = tok.n_vocab

    files = _input_files(inputs) if inputs else []
    params = dict(val_fraction=val_fraction, shard_tokens=shard_tokens, inputs=[str(f) for f in files])
    fp = _fingerprint(files, tok_path, params)
    manifest_path = out / "manifest.json"
    manifest = {"fingerprint": fp, "shards": [], "done": False}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fp and all((out / s["name"]).exists() for s in old["shards"]):
            manifest = old
    if manifest["done"]:
        return _stats(out, manifest, skipped=len(manifest["shards"]))
    for stale in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        if stale.name not in {s["name"] for s in manifest["shards"]}:
            stale.unlink()
    copy_tokenizer(tok_path, out)
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    # per split: documents below `done_docs` are in finished shards, plus the first `done_skip` tokens of the
    # document `done_docs` (a shard boundary can fall inside a document)
    done_docs, done_skip, n_shards = {"train": 0, "val": 0}, {"train": 0, "val": 0}, {"train": 0, "val": 0}
    for s in manifest["shards"]:
        done_docs[s["split"]], done_skip[s["split"]] = s["docs_end"], s["skip_tokens"]
        n_shards[s["split"]] += 1
    skipped = len(manifest["shards"])
    buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}

    def split_of(i: int) -> str:
        return "val" if every and i % every == every - 1 else "train"

    def flush(split: str, doc: int, doc_len: int, final: bool) -> None:
        """Write full shards of `split`; `doc` is the index of the last document appended (doc_len tokens)."""
        while counts[split] >= shard_tokens or (final and counts[split] > 0):
            toks = np.concatenate(buffers[split])
            name = f"{split}_{n_shards[split]:06d}.bin"
            write_shard(out / name, toks[:shard_tokens], V)
            rest = toks[shard_tokens:]
            buffers[split], counts[split] = ([rest] if rest.size else []), rest.size
            n_shards[split] += 1
            # rest, if any, is the tail of document `doc`: record how much of it is already written
            entry = dict(name=name, split=split, tokens=int(min(toks.size, shard_tokens)),
                         docs_end=doc if rest.size else doc + 1, skip_tokens=doc_len - rest.size if rest.size else 0)
            manifest["shards"].append(entry)
            write_json(manifest_path, manifest)

    docs = iter_documents(files) if files else iter(builtin_corpus())
    batch: list[tuple[int, str]] = []
    start = min(done_docs.values())
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)

    def run_batch() -> None:
        # ordinary encoding: special-token text inside documents is just text
        ids = tok.encode_batch([t for _, t in batch], threads=threads, disallowed_special=())
        for (i, _), doc_ids in zip(batch, ids):
            split = split_of(i)
            toks = np.concatenate([[eot], np.asarray(doc_ids, np.int64)]).astype(np.uint32)
            full = toks.size
            if i == done_docs[split] and done_skip[split]:
                toks = toks[done_skip[split]:]  # resuming inside this document
            buffers[split].append(toks)
            counts[split] += toks.size
            flush(split, i, full, False)
        bar.update(len(batch))
        batch.clear()

    i = -1
    for i, doc in enumerate(docs):
        if i < start or i < done_docs[split_of(i)]:
            continue
        batch.append((i, doc))
        if sum(len(t) for _, t in batch) > 8_000_000:
            run_batch()
    if batch:
        run_batch()
    for split in ("train", "val"):
        flush(split, i, 0, True)
    bar.close()
    if not any(s["split"] == "train" for s in manifest["shards"]):
        raise ValueError("no training tokens: the inputs hold no documents")
    manifest["done"] = True
    manifest["vocab_size"] = V
    write_json(manifest_path, manifest)
    return _stats(out, manifest, skipped)


def _stats(out: Path, manifest: dict, skipped: int) -> PrepareStats:
    sh = manifest["shards"]
    return PrepareStats(str(out), sum(s["tokens"] for s in sh if s["split"] == "train"),
                        sum(s["tokens"] for s in sh if s["split"] == "val"),
                        max([s["docs_end"] for s in sh], default=0), [s["name"] for s in sh], skipped)


# ---- loader --------------------------------------------------------------------------------------------


class DataLoader:
    """(B, T) input windows and their shifted targets from the shards of one split.

    Each shard is cut into non-overlapping windows of T+1 tokens (stride T); every epoch visits all windows
    in an order drawn from (seed, epoch). `state_dict()` / `load_state_dict()` save and restore the position,
    so a resumed run sees exactly the batches an uninterrupted one would.

    >>> loader = DataLoader("data", "train", B=8, T=256, seed=0)
    >>> x, y = loader.next_batch()          # y[:, t] == x[:, t + 1] within a window
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, B: int, T: int, seed: int = 0,
                 shuffle: bool = True):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        self.paths = sorted(Path(data_dir).glob(f"{split}_*.bin"))
        if not self.paths:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir} (run `fastllm prepare` first)")
        self.shards = [read_shard(p) for p in self.paths]
        self.B, self.T, self.seed, self.shuffle = B, T, seed, shuffle
        counts = [max(0, (s.size - 1) // T) for s in self.shards]
        self.windows = np.concatenate([np.stack([np.full(c, i), np.arange(c) * T], 1) for i, c in enumerate(counts)
                                       if c] or [np.zeros((0, 2), np.int64)])
        if len(self.windows) == 0:
            raise ValueError(f"{split} shards in {data_dir} hold {sum(s.size for s in self.shards)} tokens, "
                             f"fewer than one window of T+1={T + 1}")
        self.vocab_size = shard_vocab_size(self.paths[0])
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        """Windows per epoch."""
        return len(self.windows)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((self.B, self.T), np.int32)
        y = np.empty((self.B, self.T), np.int32)
        for b in range(self.B):
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            shard, off = self.windows[self._order[self.pos]]
            self.pos += 1
            w = self.shards[shard][off:off + self.T + 1]
            x[b], y[b] = w[:-1], w[1:]
        return x, y

    def reset(self) -> None:
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "pos": int(self.pos), "seed": self.seed, "T": self.T, "B": self.B}

    def load_state_dict(self, state: dict) -> None:
        if state.get("T", self.T) != self.T:
            raise ValueError(f"loader state is for T={state['T']}, this loader has T={self.T}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
