"""`fastllm clean --dask`: the same pipeline on a Dask cluster (`pip install 'fastllm[dask]'`), the same files out.

  stage 1   pipeline.process_batch mapped over batches of input files on the workers (their outputs in the
            shared `out/.work`, so resume works as on one machine)
  exact     a shuffle on the hash: each batch's (hash, row) pairs go to bucket hash % P; a bucket keeps the
            first row of each hash and returns the others (the duplicates)
  near      a shuffle on the LSH band keys of the remaining documents: each bucket links the rows that share
            a key (star edges to the smallest), then the connected components are found by the alternating
            large-star / small-star rounds of Kiveris et al. (2014), each round a shuffle of the edges by node:
            at the fixed point every component is a star around its smallest row, and the leaves are dropped
  shards    pipeline.write_shard mapped over the shard specs: the workers write the shards
(stage 1 and the shards go through fastllm.executor.Executor, which also runs them on this machine).
The driver holds only per-file counts, the rows dropped and the shard specs. Rows are global document numbers
in input order, so "first" means the same as on one machine and the outputs are identical.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

from .pipeline import dedup_keys


def dedup(client, work: Path, entries: list[dict], P: int) -> tuple[np.ndarray, int, int]:
    """(keep mask over all documents in input order, exact duplicates, near duplicates) with shuffles of
    `P` buckets on the cluster of `client`."""
    c = client
    segments = _segments(entries)  # per batch: [(start row in its npz, docs, global row)]
    n = sum(e["docs"] for e in entries)
    # exact: shuffle (hash, row) by hash; each bucket returns the rows that repeat an earlier hash
    maps = [c.submit(_hash_buckets, str(work), b, segs, P, pure=False) for b, segs in segments.items()]
    dropped = c.gather(_reduce(c, maps, P, _repeats))
    exact = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
    keep = np.ones(n, bool)
    keep[exact] = False
    # near: shuffle (band key, row) of the remaining rows by key; buckets emit star edges per shared key
    gone = c.scatter(exact, broadcast=True)
    maps = [c.submit(_key_buckets, str(work), b, segs, gone, P, pure=False) for b, segs in segments.items()]
    edges = _reduce(c, maps, P, _link, P)
    leaves = components(c, edges, P)
    keep[leaves] = False
    return keep, int(exact.size), int(leaves.size)


def components(client, edges: list, P: int) -> np.ndarray:
    """Rows that are not the smallest of their connected component. `edges`: futures, one per bucket, each a
    list of P (2, m) arrays (both directions of every edge) already split by the bucket of their first node."""
    c = client
    parts = _reduce(c, edges, P, _union)
    previous = None
    while True:
        large = [c.submit(_large_star, p, P, pure=False) for p in parts]
        parts = _reduce(c, large, P, _union)
        small = [c.submit(_small_star, p, P, pure=False) for p in parts]
        parts = _reduce(c, small, P, _union)
        sig = tuple(sum(x) for x in zip(*c.gather([c.submit(_signature, p, pure=False) for p in parts])))
        if sig == previous:
            break
        previous = sig
    leaves = c.gather([c.submit(_leaves, p, pure=False) for p in parts])
    return np.unique(np.concatenate(leaves)) if leaves else np.zeros(0, np.int64)


def _reduce(client, maps: list, P: int, fn, *args) -> list:
    """A shuffle's reduce side: for each of the P buckets, `fn(its piece from every map task, *args)`, as futures."""
    columns = ([client.submit(operator.getitem, f, j, pure=False) for f in maps] for j in range(P))
    return [client.submit(fn, column, *args, pure=False) for column in columns]


def _segments(entries: list[dict]) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {}
    row = 0
    for e in entries:
        if e["docs"]:
            out.setdefault(e["batch"], []).append((e["start"], e["docs"], row))
            row += e["docs"]
    return out


def _rows_of(work: str, batch: str, segs: list[tuple[int, int, int]]):
    """(hashes, band keys, global rows) of a batch's documents that belong to this run's inputs."""
    entries = [{"batch": batch, "start": s, "docs": d} for s, d, _ in segs]
    hashes, lsh = dedup_keys(Path(work), entries)
    rows = np.concatenate([np.arange(g, g + d) for _, d, g in segs])
    return hashes, lsh, rows


def _hash_buckets(work: str, batch: str, segs, P: int) -> list[np.ndarray]:
    hashes, _, rows = _rows_of(work, batch, segs)
    return _split(np.stack([hashes.view(np.int64), rows]), P)


def _repeats(pieces: list[np.ndarray]) -> np.ndarray:
    """Rows whose hash already occurs at a smaller row."""
    hr = np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), np.int64)
    order = np.lexsort((hr[1], hr[0]))
    h, r = hr[0][order], hr[1][order]
    again = np.r_[False, h[1:] == h[:-1]]
    return r[again]


def _key_buckets(work: str, batch: str, segs, gone: np.ndarray, P: int) -> list[np.ndarray]:
    _, lsh, rows = _rows_of(work, batch, segs)
    live = ~np.isin(rows, gone)
    keys = lsh[live].view(np.int64)  # (m, bands)
    return _split(np.stack([keys.reshape(-1), np.repeat(rows[live], keys.shape[1])]), P)


def _split(pairs: np.ndarray, P: int) -> list[np.ndarray]:
    """Pairs (2, m) split into P buckets by their first value (a hash, a band key, an edge's first node), read
    as uint64 (for the node numbers, never negative, the same as `node % P`)."""
    b = (pairs[0].view(np.uint64) % np.uint64(P)).astype(np.int64)
    return [pairs[:, b == j] for j in range(P)]


def _link(pieces: list[np.ndarray], P: int) -> list[np.ndarray]:
    """(key, row) pairs -> edges (row, smallest row sharing its key), both directions, split by first node."""
    kr = np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), np.int64)
    order = np.lexsort((kr[1], kr[0]))
    k, r = kr[0][order], kr[1][order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    first = np.repeat(r[starts], np.diff(np.r_[starts, k.size]))
    e = np.stack([r, first])[:, r != first]
    return _split(np.concatenate([e, e[::-1]], axis=1), P)


def _union(pieces: list[np.ndarray]) -> np.ndarray:
    """The distinct edges of a bucket, sorted by (first node, second node)."""
    e = np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), np.int64)
    return np.unique(e, axis=1) if e.size else e.reshape(2, 0)


def _group_min(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per edge, the smallest `v` among the edges with the same `u` (u sorted)."""
    if not u.size:
        return v
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return np.repeat(np.minimum.reduceat(v, starts), np.diff(np.r_[starts, u.size]))


def _large_star(edges: np.ndarray, P: int) -> list[np.ndarray]:
    """Large-star on a bucket holding both directions of every edge of its nodes: each node u links its larger
    neighbours to m(u) = min(u, neighbours). Returns the new edges, both directions, split by first node."""
    u, v = edges
    m = np.minimum(u, _group_min(u, v))
    sel = v > u
    e = np.stack([v[sel], m[sel]])
    return _split(np.concatenate([e, e[::-1]], axis=1), P)


def _small_star(edges: np.ndarray, P: int) -> list[np.ndarray]:
    """Small-star: each node u links itself and its smaller neighbours to the smallest of them. Output both
    directions, split by first node (the next large-star needs every node's full neighbourhood)."""
    u, v = edges
    sel = v < u
    u, v = u[sel], v[sel]
    m = _group_min(u, v)
    e = np.concatenate([np.stack([v, m]), np.stack([u, m])], axis=1)
    e = e[:, e[0] != e[1]]
    return _split(np.concatenate([e, e[::-1]], axis=1), P)


def _signature(edges: np.ndarray) -> tuple[int, int]:
    """(count, hash sum) of a bucket's edges: equal between rounds at the fixed point."""
    with np.errstate(over="ignore"):
        h = (edges[0].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ edges[1].astype(np.uint64)
        h = (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    return int(edges.shape[1]), int(h.sum(dtype=np.uint64))


def _leaves(edges: np.ndarray) -> np.ndarray:
    """At the fixed point every edge joins a node to its component's smallest: the larger end is a leaf."""
    u, v = edges
    return u[u > v]
