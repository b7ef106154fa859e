"""Small shared pieces of the post-training and evaluation tests (test_eval, test_tasks): a byte-level tokenizer,
JSONL files, supervised batches, and one OpenMP thread per test (deterministic and fair on a busy machine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastllm
from fastllm.tokenizer import Tokenizer

EOT = 256


@pytest.fixture(autouse=True)
def one_thread():
    """Import it into a test module to run each of its tests on one thread."""
    n = fastllm.get_num_threads()
    fastllm.set_num_threads(1)
    yield
    fastllm.set_num_threads(n)


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens and <|endoftext|> = 256."""
    return Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": EOT})


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def supervised_batch(tok, pairs) -> tuple[np.ndarray, np.ndarray]:
    """(idx, targets) for (prompt, answer) pairs: rows prompt + answer + <|endoftext|>, right-padded, loss on the
    answer and the <|endoftext|> only (targets -1 elsewhere)."""
    seqs = [(len(tok.encode(p)), tok.encode(p).tolist() + tok.encode(a).tolist() + [EOT]) for p, a in pairs]
    T = max(len(s) for _, s in seqs) - 1
    idx, tg = np.full((len(seqs), T), EOT, np.int32), np.full((len(seqs), T), -1, np.int32)
    for i, (n, s) in enumerate(seqs):
        idx[i, :len(s) - 1] = s[:-1]
        tg[i, n - 1:len(s) - 1] = s[n:]
    return idx, tg
