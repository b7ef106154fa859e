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
