"""The `clean()` driver: per-file stages in parallel, then the global dedup, then the output shards.

  1. per file (an executor maps `process_batch` over batches of files): read -> extract -> lang -> quality
     -> pii -> dedup keys. A batch's surviving documents, exact hashes and LSH band keys go to
     `out/.work/<batch>.{docs,npz}`, then `<batch>.done.json` lists each file's key (path, size, mtime,
     config), rows and counts, all written atomically, so a re-run skips every input already done.
  2. dedup in input order: exact (first copy of each hash kept), then near duplicates (first document of each
     connected component of documents sharing an LSH band key kept).
  3. shards `clean_NNNNNN.jsonl` ({"text", "url", "lang"} per line, `shard_docs` each, atomic) + summary.json.
Stage 1 and the shards run through fastllm.executor.Executor (processes here, or Dask workers with `dask=`);
the dedup runs here with numpy, or on the cluster as shuffles (distributed.py): the same files either way.
Memory here: one batch per worker, 8 bytes x (1 + bands) per document for the dedup (1 byte with Dask).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..executor import Executor
from ..fileio import atomic_write, write_json
from .config import CleanConfig
from .dedup import exact_hash, lsh_keys, minhash, near_dup_components
from .extract import detect_language, extract_text
from .filters import quality_reason, scrub_pii
from .readers import REASONS, InputError, list_inputs, read_pages

STAGES = ("read", "extract", "lang", "quality", "exact_dedup", "near_dedup")


def process_page(page: dict, cfg: CleanConfig, stats: Counter | None = None) -> dict | None:
    """One page from read_pages -> {"text", "url", "lang", "hash", "lsh"} or None (the reason is counted in
    `stats` as "<stage>.dropped.<reason>"; survivors as "<stage>.kept")."""
    stats = Counter() if stats is None else stats
    if "html" in page:
        try:
            text = extract_text(page["html"], page.get("charset"), main_content=not page.get("fragment"))
        except Exception:  # the parser rejects it: count, never stop the run
            stats["extract.dropped.parse_error"] += 1
            return None
    else:
        text = "\n".join(ln.rstrip() for ln in page["text"].splitlines() if ln.strip())  # indented code stays
    if not text:
        stats["extract.dropped.empty"] += 1
        return None
    stats["extract.kept"] += 1
    lang, score = detect_language(text)
    if cfg.lang:
        if lang not in cfg.lang:
            stats[f"lang.dropped.other_language.{lang}"] += 1
            return None
        if score < cfg.min_lang_score:
            stats["lang.dropped.low_score"] += 1
            return None
    stats["lang.kept"] += 1
    reason = quality_reason(text, cfg, lang)
    if reason:
        stats[f"quality.dropped.{reason}"] += 1
        return None
    stats["quality.kept"] += 1
    if cfg.scrub_pii:
        text = scrub_pii(text, stats)
    doc = {"text": text, "url": page.get("url", ""), "lang": lang}
    if cfg.dedup:
        doc["hash"] = exact_hash(text)
        sig = minhash(text, cfg.minhash_bands * cfg.minhash_rows, cfg.shingle_words)
        doc["lsh"] = lsh_keys(sig, cfg.minhash_bands, cfg.minhash_rows)
    return doc


# ---- stage 1: a batch of files -------------------------------------------------------------------------


def _file_key(path: Path, cfg_key: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{cfg_key}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def process_batch(args: tuple[list[tuple[Path, str]], str, CleanConfig]) -> list[dict]:
    """Stages 1-6 on a batch of input files. Writes `<batch>.docs` (JSON lines), `<batch>.npz` (exact hashes,
    LSH keys) and last `<batch>.done.json`: one entry per file {"path", "key", "batch", "start" (first doc
    row), "docs", "offset"/"length" (its bytes in .docs), "stats", "used", "bad" ({"reason", "error"} or
    None)}, so resume works file by file."""
    files, work, cfg = args
    work = Path(work)
    name = hashlib.sha256("|".join(k for _, k in files).encode()).hexdigest()[:24]
    entries: list[dict] = []
    hashes: list[int] = []
    lsh: list[np.ndarray] = []
    with atomic_write(work / f"{name}.docs", "wb") as out:
        for path, key in files:
            stats: Counter = Counter()
            bad = None
            start, offset = len(hashes) if cfg.dedup else 0, out.tell()
            n_docs = n_pages = 0
            try:
                for page in read_pages(path, stats):
                    n_pages += 1
                    stats["read.kept"] += 1
                    doc = process_page(page, cfg, stats)
                    if doc is None:
                        continue
                    if cfg.dedup:
                        hashes.append(doc.pop("hash"))
                        lsh.append(doc.pop("lsh"))
                    out.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
                    n_docs += 1
            except InputError as e:  # documents read before the damage are kept
                bad = {"reason": e.reason, "error": str(e)}
            except OSError as e:
                bad = {"reason": "unreadable", "error": f"{type(e).__name__}: {e}"}
            except Exception as e:  # a reader that breaks on this file must not stop the run
                bad = {"reason": "corrupt", "error": f"{type(e).__name__}: {e}"}
            entries.append({"path": str(path), "key": key, "batch": name, "start": start, "docs": n_docs,
                            "offset": offset, "length": out.tell() - offset, "stats": dict(stats),
                            "used": bad is None or n_pages > 0 or bool(stats), "bad": bad})
    nb = cfg.minhash_bands
    with atomic_write(work / f"{name}.npz") as f:
        np.savez(f, hash=np.array(hashes, np.uint64),
                 lsh=np.array(lsh, np.uint64).reshape(len(lsh), nb) if lsh else np.zeros((0, nb), np.uint64))
    write_json(work / f"{name}.done.json", entries)
    return entries


def _batches(files: list[tuple[Path, str]], procs: int, max_files: int = 64, max_bytes: int = 64 << 20):
    """Consecutive files in groups: at most `max_files` / `max_bytes`, and about 4 groups per process."""
    per = max(1, min(max_files, -(-len(files) // (4 * procs))))
    batch: list[tuple[Path, str]] = []
    size = 0
    for f in files:
        try:
            nbytes = os.stat(f[0]).st_size
        except OSError:
            nbytes = 0
        if batch and (len(batch) >= per or size + nbytes > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += nbytes
    if batch:
        yield batch


# ---- stage 3: shards -----------------------------------------------------------------------------------


def shard_specs(out: Path, work: Path, entries: list[dict], keep: np.ndarray, shard_docs: int) -> list[dict]:
    """The kept documents, in input order, cut into shards of `shard_docs`: per shard its path and pieces
    {"batch", "offset", "length", "rows"} (rows: line numbers within that file's bytes of the batch)."""
    specs: list[list[dict]] = []
    cur: list[dict] = []
    n_cur = i = 0
    for e in entries:
        if not e["docs"]:
            continue
        rows = np.flatnonzero(keep[i:i + e["docs"]])
        i += e["docs"]
        while rows.size:
            take = rows[: shard_docs - n_cur]
            cur.append({"batch": e["batch"], "offset": e["offset"], "length": e["length"], "rows": take.tolist()})
            n_cur += take.size
            rows = rows[take.size:]
            if n_cur == shard_docs:
                specs.append(cur)
                cur, n_cur = [], 0
    if cur or not specs:
        specs.append(cur)
    return [{"path": str(out / f"clean_{j:06d}.jsonl"), "work": str(work), "pieces": p} for j, p in enumerate(specs)]


def write_shard(spec: dict) -> str:
    """Write one shard from its spec (shard_specs), atomically; returns its path."""
    work = Path(spec["work"])
    with atomic_write(spec["path"], "wb") as out:
        for piece in spec["pieces"]:
            with open(work / f"{piece['batch']}.docs", "rb") as f:
                f.seek(piece["offset"])
                lines = f.read(piece["length"]).splitlines(keepends=True)
            out.writelines(lines[r] for r in piece["rows"])
    return spec["path"]


def dedup_keys(work: Path, entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Exact hashes (n,) and LSH band keys (n, bands) of every document, in input order."""
    npz: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hashes, lsh = [], []
    for e in entries:
        if e["docs"]:
            if e["batch"] not in npz:
                with np.load(work / f"{e['batch']}.npz") as z:
                    npz[e["batch"]] = (z["hash"], z["lsh"])
            h, k = npz[e["batch"]]
            hashes.append(h[e["start"]:e["start"] + e["docs"]])
            lsh.append(k[e["start"]:e["start"] + e["docs"]])
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros((0, 1), np.uint64)
    return np.concatenate(hashes), np.concatenate(lsh)


def dedup_local(work: Path, entries: list[dict]) -> tuple[np.ndarray, int, int]:
    """(keep mask over all documents in input order, exact duplicates, near duplicates), in this process."""
    hashes, lsh = dedup_keys(work, entries)
    n = hashes.size
    _, first = np.unique(hashes, return_index=True)
    keep = np.zeros(n, bool)
    keep[first] = True
    idx = np.flatnonzero(keep)
    near = near_dup_components(lsh[idx]) != np.arange(len(idx))
    keep[idx[near]] = False
    return keep, int(n - idx.size), int(near.sum())


# ---- the driver ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class CleanSummary:
    out_dir: str
    documents: int  # written to the shards
    shards: list[str]
    stages: dict  # stage -> {"in", "kept", "dropped": {reason: count}}
    pii: dict  # {"email": n, "ip": n}
    bad_inputs: list[dict]  # {"path", "reason", "error"}: inputs not used, or used only up to their damage
    files: int  # input files found (regular files)
    used: int  # input files read (in this run or an earlier one)
    unused: dict  # reason -> number of inputs not used (files and named paths)
    skipped: int  # inputs already done by an earlier run
    seconds: float

    def table(self, max_bad: int = 20) -> str:
        lines = [f"{'stage':12s} {'in':>9s} {'kept':>9s} {'dropped':>9s}  reasons"]
        for st, d in self.stages.items():
            why = ", ".join(f"{k} {v}" for k, v in sorted(d["dropped"].items(), key=lambda kv: -kv[1]))
            lines.append(f"{st:12s} {d['in']:9d} {d['kept']:9d} {d['in'] - d['kept']:9d}  {why}")
        lines.append(f"pii: {self.pii.get('email', 0)} e-mail and {self.pii.get('ip', 0)} IP addresses replaced")
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.unused.items(), key=lambda kv: -kv[1]))
        lines.append(f"inputs: {self.files} files, {self.used} used ({self.skipped} done by an earlier run), "
                     f"{sum(self.unused.values())} not used{f': {why}' if why else ''}")
        for b in self.bad_inputs[:max_bad]:
            lines.append(f"bad input: {b['path']}: {b['reason']}: {b['error']}")
        if len(self.bad_inputs) > max_bad:
            lines.append(f"... and {len(self.bad_inputs) - max_bad} more bad inputs in summary.json")
        return "\n".join(lines)


def clean(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, cfg: CleanConfig | None = None,
          progress: bool = True, dask=None) -> CleanSummary:
    """Clean web pages and text (files or folders of any kind: HTML, feeds, WARC, JSONL, plain text, compressed
    or not) into `out_dir`/clean_NNNNNN.jsonl. `dask`: None (processes on this machine), "local" (a Dask
    LocalCluster), a scheduler address "tcp://host:8786" or a distributed.Client; the output is the same.
    ValueError when no input could be used at all (summary.json still says why).

    >>> s = clean(["crawl/"], "corpus/", CleanConfig(lang=("en", "de")))   # doctest: +SKIP
    >>> print(s.table())                                                    # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    try:
        import py3langid  # noqa: F401
        import resiliparse  # noqa: F401
    except ImportError as e:
        raise ImportError(f"fastllm clean needs the 'clean' extra: pip install 'fastllm[clean]' ({e})") from None
    cfg = (cfg or CleanConfig()).checked()
    t0 = time.time()
    out = Path(os.path.abspath(out_dir))  # absolute: Dask workers may run in another folder
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    paths, bad = list_inputs(inputs, exclude=[out])
    cfg_key = json.dumps(cfg.per_file_key(), sort_keys=True)
    files: list[tuple[Path, str]] = []
    for p in paths:
        try:
            files.append((Path(os.path.abspath(p)), _file_key(p, cfg_key)))
        except OSError as e:
            bad.append({"path": str(p), "reason": "unreadable", "error": e.strerror or str(e)})

    # 1. inputs done by earlier runs: their entries in the batch markers
    index: dict[str, dict] = {}
    for marker in work.glob("*.done.json"):
        try:
            for e in json.loads(marker.read_text()):
                if "used" in e:  # markers of an older version are redone
                    index[e["key"]] = e
        except (OSError, ValueError, KeyError, TypeError):
            pass
    pending = [f for f in files if f[1] not in index]
    skipped = len(files) - len(pending)

    # 2. the rest, in parallel batches; then the dedup and the shards
    with Executor(cfg.processes, dask) as ex:
        jobs = [(b, str(work), cfg) for b in _batches(pending, ex.workers)]
        bar = tqdm(total=len(pending), desc="clean", unit="file", disable=not progress)
        docs = 0
        try:
            for entries in ex.map_unordered(process_batch, jobs):
                for e in entries:
                    index[e["key"]] = e
                    docs += e["docs"]
                bar.update(len(entries))
                bar.set_postfix(docs=docs)
        finally:
            bar.close()
        entries = [index[k] for _, k in files]
        stats: Counter = Counter()
        for e in entries:
            stats.update(e["stats"])
            if e["bad"]:
                bad.append({"path": e["path"], **e["bad"]})
        n = sum(e["docs"] for e in entries)
        keep, n_exact, n_near = np.ones(n, bool), 0, 0
        if cfg.dedup and n:
            if ex.client is not None:
                from .distributed import dedup

                keep, n_exact, n_near = dedup(ex.client, work, entries, 2 * ex.workers)
            else:
                keep, n_exact, n_near = dedup_local(work, entries)
        stats["exact_dedup.dropped.duplicate"] += n_exact
        stats["near_dedup.dropped.near_duplicate"] += n_near
        stats["exact_dedup.kept"] = n - n_exact
        stats["near_dedup.kept"] = int(keep.sum())
        specs = shard_specs(out, work, entries, keep, cfg.shard_docs)
        ex.map(write_shard, specs)
    shards = [Path(s["path"]) for s in specs]
    for stale in out.glob("clean_*.jsonl"):  # shards of an earlier, larger run
        if stale not in shards:
            stale.unlink()

    stages = {}
    prev = stats["read.kept"] + sum(v for k, v in stats.items() if k.startswith("read.dropped."))
    for st in STAGES:
        drop = f"{st}.dropped."
        dropped = {k[len(drop):]: v for k, v in stats.items() if k.startswith(drop) and v}
        stages[st] = {"in": prev, "kept": stats[f"{st}.kept"], "dropped": dropped}
        prev = stats[f"{st}.kept"]
    used = sum(1 for e in entries if e["used"])
    used_paths = {e["path"] for e in entries if e["used"]}
    unused = Counter(b["reason"] for b in bad if b["path"] not in used_paths)
    summary = CleanSummary(out_dir=str(out), documents=int(keep.sum()), shards=[s.name for s in shards],
                           stages=stages, pii={"email": stats["pii.email"], "ip": stats["pii.ip"]}, bad_inputs=bad,
                           files=len(files), used=used, unused={r: unused[r] for r in REASONS if unused[r]},
                           skipped=skipped, seconds=time.time() - t0)
    write_json(out / "summary.json", dataclasses.asdict(summary))
    if used == 0:
        why = ", ".join(f"{v} {k}" for k, v in summary.unused.items()) or "no input files"
        eg = "; ".join(f"{b['path']}: {b['error']}" for b in bad[:3])
        raise ValueError(f"no usable input ({why}{f': {eg}' if eg else ''}"
                         f"{', ...' if len(bad) > 3 else ''}); details in {out / 'summary.json'}")
    return summary
