"""fastllm's SentencePiece-style BPE (a Llama 2 tokenizer.json) against HF tokenizers and the sentencepiece library,
in one process:
    python benchmarks/bench_sentencepiece.py [--vocab 32000] [--threads 2] [--quick]
Trains a SentencePiece BPE model with Llama 2's settings (byte fallback, digits split, identity normalization) on
the first 2 MB of the corpus, writes the tokenizer.json transformers' converter writes for it (Llama 2's legacy
layout: Prepend + Replace normalizer, no pre-tokenizer), checks that the three give the same ids on every
document, then times encode (documents one after another on one thread, and the batch on --threads threads) and
decode, interleaved, medians. MB/s of UTF-8 text; ratios > 1: fastllm faster. Corpus: bench_tokenizer.py's English
+ code and, where the system has gettext catalogs, its multilingual text."""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from bench_tokenizer import default_corpus, multilingual_corpus  # noqa: E402
from common import bench, cli, header, print_table  # noqa: E402


def run(threads: int, quick: bool, vocab: int) -> None:
    import sentencepiece as spm
    import tokenizers
    from hf_families import sentencepiece_doc, sentencepiece_model

    import fastllm
    from fastllm import Tokenizer

    fastllm.set_num_threads(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # HF tokenizers' batch threads (read when its pool starts)
    limit = 1_000_000 if quick else 6_000_000
    corpora = {"english+code": default_corpus(limit), "multilingual": multilingual_corpus(limit)}
    corpora = {k: v for k, v in corpora.items() if v}
    train = "\n".join(d for docs in corpora.values() for d in docs)[: 2_000_000]
    model_file = sentencepiece_model(vocab, train)
    doc = sentencepiece_doc(model_file=model_file)
    path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    ours, hf = Tokenizer.from_pretrained(path), tokenizers.Tokenizer.from_file(path)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    print(header("SentencePiece-style BPE (Llama 2 tokenizer.json)", threads))
    print(f"vocab {ours.vocab_size}, trained on {len(train.encode()) / 1e6:.1f} MB; tokenizers "
          f"{tokenizers.__version__}, sentencepiece {spm.__version__}")
    rows = []
    for name, docs in corpora.items():
        rows += time_corpus(name, docs, ours, hf, sp, threads, 2 if quick else 5)
    print_table(rows, ["corpus", "MB", "what", "fastllm MB/s", "HF MB/s", "sentencepiece MB/s", "fastllm/HF",
                       "fastllm/sentencepiece"])


def time_corpus(name, docs, ours, hf, sp, threads: int, repeats: int) -> list[list[str]]:
    """Rows of MB/s of the three tokenizers on `docs` (after checking that they agree on every document)."""
    mb = sum(len(d.encode()) for d in docs) / 1e6
    ids = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
    assert [a.tolist() for a in ours.encode_batch(docs)] == ids, "fastllm and HF tokenizers differ"
    assert sp.encode(docs) == ids, "sentencepiece and HF tokenizers differ"
    one = bench({"fastllm": lambda: [ours.encode(d) for d in docs],
                 "HF": lambda: [hf.encode(d, add_special_tokens=False) for d in docs],
                 "sentencepiece": lambda: [sp.encode(d) for d in docs]}, repeats, 1)
    many = bench({"fastllm": lambda: ours.encode_batch(docs, threads=threads),
                  "HF": lambda: hf.encode_batch(docs, add_special_tokens=False),
                  "sentencepiece": lambda: sp.encode(docs, num_threads=threads)}, repeats, 1)
    dec = bench({"fastllm": lambda: ours.decode_batch(ids, threads=threads),
                 "HF": lambda: hf.decode_batch(ids),
                 "sentencepiece": lambda: sp.decode(ids, num_threads=threads)}, repeats, 1)
    rows = []
    for what, t in (("encode, 1 thread", one), (f"encode batch, {threads} threads", many),
                    (f"decode batch, {threads} threads", dec)):
        speed = {k: mb / v["median"] for k, v in t.items()}
        rows.append([name, f"{mb:.1f}", what, f"{speed['fastllm']:.1f}", f"{speed['HF']:.1f}",
                     f"{speed['sentencepiece']:.1f}", f"{speed['fastllm'] / speed['HF']:.2f}x",
                     f"{speed['fastllm'] / speed['sentencepiece']:.2f}x"])
    return rows


if __name__ == "__main__":
    cli(run, __doc__, vocab=("SentencePiece vocabulary size", 32000))
