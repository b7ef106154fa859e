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

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import time
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from .checkpoint import copy_tokenizer
from .fileio import COMPRESSION_SUFFIXES, atomic_write, data_suffix, iter_records, read_text, write_json
from .tokenizer import Tokenizer

MAGIC = b"FLLMTOK1"
VERSION = 1
HEADER = struct.Struct("<8sIIQI")  # magic, version, itemsize, count, vocab_size
HEADER_SIZE = 64
EOT = "<|endoftext|>"
MANIFEST_VERSION = 2
MAX_VOCAB = 1 << 24  # larger token ids mean a broken (sparse) tokenizer: its model would not fit in memory


# ---- shard files ---------------------------------------------------------------------------------------


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write token ids as a shard (uint16 when the vocabulary fits, else uint32), atomically."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"{path}: vocab_size must be in [1, {MAX_VOCAB:,}], got {vocab_size:,}")
    dtype = _dtype(vocab_size)
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
    magic, version, itemsize, count, vocab = HEADER.unpack_from(raw)
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
    if not 0 < vocab <= (1 << 16 if itemsize == 2 else MAX_VOCAB):
        raise ValueError(f"{path}: corrupt shard header (vocabulary size {vocab} with {itemsize}-byte ids; "
                         f"at most {MAX_VOCAB:,})")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype, "r", offset=HEADER_SIZE, shape=(count,))


def shard_vocab_size(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return HEADER.unpack_from(f.read(HEADER.size))[4]


# ---- documents -----------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def _input_files(inputs: list[str], exclude: list[str | os.PathLike] = ()) -> list[Path]:
    """Files named, and the .txt/.md/.jsonl/.parquet files inside folders, also compressed (.jsonl.zst, .txt.gz, ...:
    fastllm.fileio.open_input), and compressed .json files (C4's and Dolma's .json.gz: JSON Lines; a plain .json in a
    folder is more likely metadata, such as `fastllm clean`'s summary.json); recursively; never inside `exclude` or a
    `.work` folder, where fastllm keeps its own work files)."""
    skip = [os.path.realpath(e) + os.sep for e in exclude]
    files: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and (data_suffix(q) in TEXT_SUFFIXES or (
                            data_suffix(q) == ".json" and q.suffix in COMPRESSION_SUFFIXES))
                            and ".work" not in q.parts and not os.path.realpath(q).startswith(tuple(skip)))
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise ValueError(f"input {inp} is not a regular file or folder")
        else:
            raise FileNotFoundError(f"input not found: {inp}")
    if not files:
        raise ValueError(f"no input files ({', '.join(TEXT_SUFFIXES)}, .json.gz) found in {inputs}")
    return list(dict.fromkeys(files))


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Documents from text files (split at <|endoftext|>), JSONL files (one {"text": ...} per line; also named
    .json, as C4 and Dolma name theirs, or a .json file holding one array of such objects: fileio.iter_records), both
    maybe compressed (.gz/.bz2/.xz/.zst: Dolma, C4, RedPajama, the Pile), and Parquet files (their "text" column, as
    FineWeb and most Hugging Face datasets ship it)."""
    for path in files:
        if data_suffix(path) in (".jsonl", ".json", ".parquet"):
            for where, obj in iter_records(path, columns=["text"]):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{where}: expected a JSON object with a string 'text' field")
                yield obj["text"]
        else:
            for doc in read_text(path).split(EOT):
                if doc.strip():
                    yield doc


def builtin_corpus() -> list[str]:
    """Python's own documentation, shipped with every Python: the pydoc topics and the standard library's
    docstrings (~2 MB of English; see fastllm.corpus)."""
    from .corpus import builtin_corpus  # here: text that only the demo and the default corpus need

    return builtin_corpus()


# ---- the validation split ------------------------------------------------------------------------------

MIN_VAL_DOCS = 2  # fewer whole documents for validation than this: split inside the documents instead
TINY_VAL_TOKENS = 1024  # a warning below this many validation tokens (one window of T = 1024)


def is_val(i: int, frac: Fraction) -> bool:
    """Whether document i goes to the val split when whole documents are split: after n documents, exactly
    floor(n * frac) of them are in val, spread evenly (frac = 1/k: every k-th document).

    >>> [i for i in range(10) if is_val(i, Fraction(1, 4))]
    [3, 7]
    """
    return (i + 1) * frac.numerator // frac.denominator > i * frac.numerator // frac.denominator


def split_text(text: str, frac: float) -> tuple[str, str]:
    r"""A document cut into (train, val) with about `frac` of its characters in val: at the paragraph break
    nearest to that point whose val share is within [frac/2, 2 frac], else such a line break, else the
    nearest whitespace, else exactly there.

    >>> split_text("First part.\n\nSecond part, a bit longer.", 0.5)
    ('First part.\n\n', 'Second part, a bit longer.')
    """
    n = len(text)
    target = round(n * (1 - frac))
    lo, hi = round(n * (1 - 2 * frac)), round(n * (1 - frac / 2))
    for sep in ("\n\n", "\n"):
        cuts = [m.end() for m in re.finditer(re.escape(sep) + "+", text[lo:hi + len(sep)])]
        cuts = [lo + c for c in cuts if 0 < lo + c < n]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - target))
            return text[:cut], text[cut:]
    ws = [m.start() for m in re.finditer(r"\s", text[max(lo, 0):hi])]
    cut = min((max(lo, 0) + w for w in ws), key=lambda c: abs(c - target), default=target)
    return text[:cut], text[cut:]


def _pieces(i: int, doc: str, mode: str, frac: Fraction) -> list[tuple[str, str]]:
    """(split, text) pieces of document number i, in order."""
    if mode == "documents":
        return [("val" if is_val(i, frac) else "train", doc)]
    if mode == "within":
        head, tail = split_text(doc, float(frac))
        return [("train", head), ("val", tail)] if tail.strip() else [("train", head)]
    return [("train", doc)]


# ---- prepare -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareStats:
    out_dir: str
    train_tokens: int
    val_tokens: int
    documents: int
    shards: list[str]
    skipped: int  # shards found finished from an earlier run
    split: str = "documents"  # "documents" (whole documents to val), "within" (each document's tail), "none"


def _fingerprint(files: list[Path], tok_path: Path, params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(tok_path.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load_manifest(path: Path, fingerprint: str) -> dict | None:
    """The manifest of an earlier run with the same inputs, or None. A corrupt one is reported and ignored
    (the run starts over and rewrites it), so it never blocks a re-run."""
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
            return None  # another version's manifest: start over
        if not isinstance(m.get("shards"), list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and s.get("split") in ("train", "val")
                and isinstance(s.get("tokens"), int) for s in m["shards"]):
            raise ValueError("bad 'shards' list")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        warnings.warn(f"{path}: corrupt manifest ({e}); starting over: every shard is written again", stacklevel=3)
        return None
    return m if m.get("fingerprint") == fingerprint else None


_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    """The tokenizer at `path`, loaded once per process (the workers of an Executor too)."""
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_pretrained(path)
    return _TOKENIZERS[key]


def _documents(sources: list[str] | list[Path] | None) -> Iterator[str]:
    """The documents of input files, or of the built-in corpus when there are none."""
    return iter_documents([Path(p) for p in sources]) if sources else iter(builtin_corpus())


def _count_documents(sources: list[str] | None) -> int:
    return sum(1 for _ in _documents(sources))


def _tokenize_batch(job: dict, on_pieces=None) -> dict:
    """Tokenize one batch of input files into `<work>/<key>.{train,val}.tok` (raw ids, every piece after
    the tokenizer's start_token: <|endoftext|>, or Llama's BOS), then write `<key>.json` {"docs", "train", "val"}
    (token counts): the batch is done.
    `on_pieces(n)` is called after every n pieces encoded (a progress bar)."""
    tok = _tokenizer(job["tokenizer"])
    eot = tok.start_token  # <|endoftext|>, or the BOS of a tokenizer that puts one before every text (Llama)
    dtype = _dtype(tok.n_vocab)
    work, key = Path(job["work"]), job["key"]
    frac = Fraction(*job["frac"])
    counts = {"train": 0, "val": 0}
    with atomic_write(work / f"{key}.train.tok") as ft, atomic_write(work / f"{key}.val.tok") as fv:
        outs = {"train": ft, "val": fv}
        batch: list[tuple[str, str]] = []

        def run() -> None:
            # ordinary encoding: special-token text inside documents is just text
            ids = tok.encode_batch([t for _, t in batch], threads=job["threads"], disallowed_special=())
            for (split, _), doc_ids in zip(batch, ids):
                toks = np.concatenate([[eot], np.asarray(doc_ids, np.int64)]).astype(dtype)
                outs[split].write(toks.tobytes())
                counts[split] += toks.size
            if on_pieces is not None:
                on_pieces(len(batch))
            batch.clear()

        size = n_docs = 0
        for n_docs, doc in enumerate(_documents(job["sources"]), 1):
            for piece in _pieces(job["offset"] + n_docs - 1, doc, job["mode"], frac):
                batch.append(piece)
                size += len(piece[1])
                if size > 8_000_000:
                    run()
                    size = 0
        if batch:
            run()
    done = {"docs": n_docs, **counts}
    write_json(work / f"{key}.json", done)
    return done


def _write_token_shard(spec: dict) -> dict:
    """Write one shard from slices of the work files: spec {"path", "vocab_size", "pieces": [(file, a, b)]}."""
    dtype = _dtype(spec["vocab_size"])
    parts = [np.fromfile(f, dtype, count=b - a, offset=a * np.dtype(dtype).itemsize) for f, a, b in spec["pieces"]]
    toks = np.concatenate(parts) if parts else np.zeros(0, dtype)
    write_shard(spec["path"], toks, spec["vocab_size"])
    return {"name": Path(spec["path"]).name, "split": spec["split"], "tokens": int(toks.size)}


def _shard_specs(out: Path, work: Path, keys: list[str], done: dict[str, dict], shard_tokens: int,
                 V: int) -> list[dict]:
    """Per split, the batches' tokens in input order cut into shards of `shard_tokens` (the last one shorter)."""
    specs = []
    for split in ("train", "val"):
        shards: list[list[tuple[str, int, int]]] = [[]]  # each shard's pieces (file, first token, end)
        fill = 0
        for key in keys:
            a, total = 0, done[key][split]
            while a < total:
                if fill == shard_tokens:
                    shards.append([])
                    fill = 0
                b = min(total, a + shard_tokens - fill)
                shards[-1].append((str(work / f"{key}.{split}.tok"), a, b))
                fill += b - a
                a = b
        specs += [{"path": str(out / f"{split}_{n:06d}.bin"), "split": split, "vocab_size": V, "pieces": pieces}
                  for n, pieces in enumerate(shards) if pieces]
    return specs


def prepare(inputs: list[str] | None, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
            val_fraction: float = 0.05, shard_tokens: int = 50_000_000, threads: int | None = None,
            progress: bool = True, dask=None) -> PrepareStats:
    """Tokenize `inputs` (files or folders; None = the built-in corpus) with the tokenizer file into
    `out_dir`/{train,val}_NNNNNN.bin, each document after <|endoftext|> (a tokenizer with a BOS, as Llama's: after
    the BOS, as those models were trained). Validation split: whole documents,
    exactly floor(n * val_fraction) of the first n spread evenly, when that gives at least MIN_VAL_DOCS of
    them; otherwise (one or few documents) the last `val_fraction` of every document, cut at a paragraph
    break. A warning says when the validation set is empty or tiny.

    Batches of input files are tokenized into `out_dir/.work` (resumable batch by batch), then cut into
    shards (written atomically, listed in manifest.json, so a re-run skips finished shards). `dask`: run the
    batches and the shards on a Dask cluster ("local", "tcp://host:8786" or a Client); the files are the same.

    >>> prepare(["corpus/"], "tok.tiktoken", "data/")          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .executor import Executor

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tok_path = Path(os.path.abspath(tokenizer))
    tok = _tokenizer(str(tok_path))
    if tok.start_token is None:
        raise ValueError(f"tokenizer {tok_path} has neither a BOS token (a HF post-processor's) nor {EOT} to start "
                         "each document with")
    V = tok.n_vocab
    if V > MAX_VOCAB:
        raise ValueError(f"tokenizer {tok_path}: {V:,} token ids (its largest id is {V - 1:,}): more than "
                         f"{MAX_VOCAB:,}, which no shard or model here supports; are its ids sparse?")
    frac = Fraction(val_fraction).limit_denominator(1_000_000)

    files = _input_files(inputs, exclude=[out]) if inputs else []
    params = dict(val_fraction=val_fraction, shard_tokens=shard_tokens, inputs=[str(f) for f in files],
                  version=MANIFEST_VERSION)
    fp = _fingerprint(files, tok_path, params)
    manifest_path = out / "manifest.json"
    manifest = _load_manifest(manifest_path, fp) or {"version": MANIFEST_VERSION, "fingerprint": fp,
                                                     "vocab_size": V, "shards": [], "done": False}
    listed = len(manifest["shards"])
    manifest["shards"] = [s for s in manifest["shards"] if (out / s["name"]).exists()]
    if manifest["done"] and len(manifest["shards"]) == listed:
        return _stats(out, manifest, skipped=listed)
    manifest["done"] = False
    finished = {s["name"] for s in manifest["shards"]}
    for stale in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        if stale.name not in finished:
            stale.unlink()
    copy_tokenizer(tok_path, out)
    work = out / ".work"
    work.mkdir(exist_ok=True)

    # batches of input files (about 64 MB each), named by the run's fingerprint
    batches: list[list[str] | None] = []
    size = 0
    for f in files:
        if not batches or size > 64 << 20:
            batches.append([])
            size = 0
        batches[-1].append(os.path.abspath(f))  # absolute: Dask workers may run in another folder
        size += f.stat().st_size
    if not files:
        batches = [None]
    keys = [hashlib.sha256(f"{fp}|{i}".encode()).hexdigest()[:24] for i in range(len(batches))]
    for stale in work.iterdir():  # work files of runs with other inputs or settings
        if stale.name.split(".")[0] not in keys:
            stale.unlink()
    done: dict[str, dict] = {}
    for key in keys:
        with contextlib.suppress(OSError, ValueError):
            done[key] = json.loads((work / f"{key}.json").read_text())

    with Executor(1 if dask is None else 0, dask) as ex:
        # the split: whole documents when that gives at least MIN_VAL_DOCS of them (counting stops there)
        need = -(-MIN_VAL_DOCS * frac.denominator // frac.numerator) if frac else 0
        if ex.client is not None:
            counts = ex.map(_count_documents, batches)
            n_docs = sum(counts)
        else:
            n_docs = sum(1 for _ in itertools.islice(_documents(files), need)) if frac else 0
        mode = "none" if not frac else "documents" if n_docs >= need else "within"
        manifest["split"] = mode

        # 1. tokenize the batches not done yet: here in order (each batch's first document number follows from
        #    the batches before it), on Dask all at once (their first document numbers from the counts)
        def job(key: str, sources: list[str] | None, offset: int) -> dict:
            return dict(work=str(work), key=key, sources=sources, offset=offset, mode=mode,
                        frac=(frac.numerator, frac.denominator), tokenizer=str(tok_path), threads=threads)

        if ex.client is not None:
            bar = tqdm(total=len(batches), initial=len(done), desc="tokenizing", unit="batch", disable=not progress)
            offsets = np.cumsum([0, *counts[:-1]])
            todo = [job(k, s, int(o)) for k, s, o in zip(keys, batches, offsets) if k not in done]
            for _ in ex.map_unordered(_tokenize_batch, todo):
                bar.update(1)
            done = {k: json.loads((work / f"{k}.json").read_text()) for k in keys}
        else:
            bar = tqdm(desc="tokenizing", unit="piece", disable=not progress)  # pieces: documents or halves
            offset = 0
            for k, s in zip(keys, batches):
                if k not in done:
                    done[k] = _tokenize_batch(job(k, s, offset), bar.update)
                offset += done[k]["docs"]
        bar.close()
        n_docs = sum(done[k]["docs"] for k in keys)
        manifest["documents"] = n_docs

        # 2. the shards not written yet, from the work files (manifest rewritten at most every few seconds)
        specs = _shard_specs(out, work, keys, done, shard_tokens, V)
        tokens = {sp: sum(done[k][sp] for k in keys) for sp in ("train", "val")}
        if tokens["train"] == 0:
            raise ValueError("no training tokens: the inputs hold no documents")
        if frac and tokens["val"] < TINY_VAL_TOKENS:
            warnings.warn(f"the validation split has only {tokens['val']} tokens ({mode} split of {n_docs} "
                          f"documents at val_fraction {val_fraction}): validation loss will be "
                          f"{'missing' if not tokens['val'] else 'noisy'}; give more text or a larger val_fraction",
                          stacklevel=2)
        todo = [s for s in specs if Path(s["path"]).name not in finished]
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="shards", unit="shard",
                   disable=not progress)
        last = time.monotonic()
        for entry in ex.map_unordered(_write_token_shard, todo):
            manifest["shards"].append(entry)
            bar.update(1)
            if time.monotonic() - last > 5:
                _write_manifest(manifest_path, manifest)
                last = time.monotonic()
        bar.close()
    manifest["done"] = True
    _write_manifest(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return _stats(out, manifest, len(specs) - len(todo))


def _write_manifest(path: Path, manifest: dict) -> None:
    manifest["shards"].sort(key=lambda s: (s["split"] != "train", s["name"]))
    write_json(path, manifest)


def _stats(out: Path, manifest: dict, skipped: int) -> PrepareStats:
    sh = manifest["shards"]
    return PrepareStats(str(out), sum(s["tokens"] for s in sh if s["split"] == "train"),
                        sum(s["tokens"] for s in sh if s["split"] == "val"), manifest.get("documents", 0),
                        [s["name"] for s in sh], skipped, manifest.get("split", "documents"))


# ---- loader --------------------------------------------------------------------------------------------


class Epochs:
    """The order in which a loader visits n items: epoch after epoch, each a permutation drawn from (seed, epoch)
    (0..n-1 when not shuffled). The position (epoch, pos) is what a checkpoint saves: a resumed run sees exactly
    the items an uninterrupted one would. Shared by DataLoader, sft.PackedLoader and the reward model's pairs.

    >>> Epochs(4, seed=0).take(6)           # one epoch, then the first 2 of the next
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.seek(0, 0)

    def seek(self, epoch: int, pos: int) -> None:
        self.epoch, self.pos = int(epoch), int(pos)
        rng = np.random.default_rng([self.seed, self.epoch])
        self.order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)

    def take(self, k: int, cross: bool = True) -> np.ndarray:
        """The next k indices, continuing into the next epoch (or, not `cross`, stopping at the epoch's end)."""
        parts = []
        while k > 0:
            if self.pos >= self.n:
                self.seek(self.epoch + 1, 0)
            part = self.order[self.pos:self.pos + k]
            self.pos, k = self.pos + len(part), k - len(part)
            parts.append(part)
            if not cross:
                break
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


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
        vocabs = [shard_vocab_size(p) for p in self.paths]
        for p, v in zip(self.paths, vocabs):  # every shard, not just the first: a stray one fails here, named
            if v != vocabs[0]:
                raise ValueError(f"{p}: shard of a {v}-token vocabulary among shards of {vocabs[0]} tokens "
                                 f"({self.paths[0].name}): made with another tokenizer? re-run `fastllm prepare`")
        self.B, self.T, self.seed, self.shuffle = B, T, seed, shuffle
        counts = [max(0, (s.size - 1) // T) for s in self.shards]
        self.windows = np.concatenate([np.stack([np.full(c, i), np.arange(c) * T], 1) for i, c in enumerate(counts)
                                       if c] or [np.zeros((0, 2), np.int64)])
        if len(self.windows) == 0:
            raise ValueError(f"{split} shards in {data_dir} hold {sum(s.size for s in self.shards)} tokens, "
                             f"fewer than one window of T+1={T + 1}")
        self.vocab_size = vocabs[0]
        self.epochs = Epochs(len(self.windows), seed, shuffle)

    def __len__(self) -> int:
        """Windows per epoch."""
        return len(self.windows)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((self.B, self.T), np.int32)
        y = np.empty((self.B, self.T), np.int32)
        for b, i in enumerate(self.epochs.take(self.B)):
            shard, off = self.windows[i]
            w = self.shards[shard][off:off + self.T + 1]
            x[b], y[b] = w[:-1], w[1:]
        return x, y

    def reset(self) -> None:
        self.epochs.seek(0, 0)

    def state_dict(self) -> dict:
        return {**self.epochs.state_dict(), "seed": self.seed, "T": self.T, "B": self.B}

    def load_state_dict(self, state: dict) -> None:
        if state.get("T", self.T) != self.T:
            raise ValueError(f"loader state is for T={state['T']}, this loader has T={self.T}")
        self.epochs.seek(state["epoch"], state["pos"])
