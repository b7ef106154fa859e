"""fastllm's BPE tokenizer against tiktoken and HF tokenizers, in one process:
    python benchmarks/bench_tokenizer.py [CORPUS ...] [--vocab 32768] [--pattern gpt4] [--threads N]
                                         [--ranks PATH] [--repeats 3] [--no-train]
Trains (or loads, --ranks) 32k ranks on the corpus, builds the tiktoken Encoding and the HF tokenizer
(tokenizer.json via save_hf) with the same ranks, checks that all three give the same ids, then prints encode
and decode MB/s (UTF-8 bytes of text) on 1 thread (one encode of the whole corpus) and on N threads
(batch of documents), with ratios (> 1: fastllm faster). fastllm's per-thread chunk caches are emptied
before every timed encode (cold cache: no help from the previous repeat). Also times training against HF's
BpeTrainer on the same documents (same pattern, full byte alphabet). Default corpora: pydoc_data.topics +
stdlib sources (~6 MB, English and code) and, when the system has gettext catalogs (/usr/share/locale),
~6 MB of their translations (multilingual)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def default_corpus(limit: int = 6_000_000) -> list[str]:
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    n = sum(len(d.encode()) for d in docs)
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "test" in path.split(os.sep)[-2:][0]:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            d = f.read()
        docs.append(d)
        n += len(d.encode())
        if n >= limit:
            break
    return docs


def multilingual_corpus(limit: int = 6_000_000, root: str = "/usr/share/locale") -> list[str]:
    """Translated messages from the system's gettext catalogs (*.mo), one language after another in turn:
    real multilingual text (CJK, Cyrillic, Arabic, Greek, Hebrew, Indic, Latin scripts). Empty if none."""
    import collections
    import gettext

    by_lang: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "*", "LC_MESSAGES", "*.mo"))):
        if not os.path.basename(path).startswith("iso_"):  # skip lists of country/language names
            by_lang[path.split(os.sep)[-3]].append(path)
    iters = [iter(v) for _, v in sorted(by_lang.items())]
    docs: list[str] = []
    n = 0
    while iters and n < limit:
        alive = []
        for it in iters:
            path = next(it, None)
            if path is None:
                continue
            alive.append(it)
            try:
                with open(path, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog
            except Exception:
                continue
            d = "\n".join(v for k, v in catalog.items() if k and isinstance(v, str))
            if d:
                docs.append(d)
                n += len(d.encode())
            if n >= limit:
                break
        iters = alive
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="*", help="text files (default: pydoc topics + stdlib sources)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--pattern", default="gpt4", choices=["gpt2", "gpt4"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ranks", help="load ranks from this fastllm save() file instead of training")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    args = p.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # HF tokenizers' thread pool

    from common import header, set_threads

    import fastllm

    if args.corpus:
        sets = {"files": []}
        for path in args.corpus:
            with open(path, encoding="utf-8", errors="replace") as f:
                sets["files"].append(f.read())
    else:
        sets = {"english (pydoc + stdlib)": default_corpus()}
        ml = multilingual_corpus()
        if ml:
            sets["multilingual (gettext catalogs)"] = ml
    set_threads(args.threads)
    print(header("tokenizer", args.threads))
    for name, docs in sets.items():
        print(f"\n=== {name}")
        run_corpus(args, docs)
    print(f"({fastllm.info()['simd']}, {os.getloadavg()[0]:.2f} load at the end)")


def run_corpus(args, docs: list[str]) -> None:
    import tiktoken
    import tokenizers
    from common import bench, print_table

    import fastllm
    from fastllm import Tokenizer

    text = "".join(docs)
    mb = len(text.encode()) / 1e6
    print(
        f"corpus: {len(docs)} documents, {mb:.2f} MB; vocab {args.vocab}, pattern {args.pattern}; "
        f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}"
    )

    # ---- training
    if args.ranks:
        tok = Tokenizer.load(args.ranks)
    else:
        t0 = time.perf_counter()
        tok = Tokenizer.train(docs, args.vocab, pattern=args.pattern, progress=False, threads=args.threads)
        t_ours = time.perf_counter() - t0
    if not args.no_train and not args.ranks:
        from tokenizers import models, pre_tokenizers, trainers

        hf_t = tokenizers.Tokenizer(models.BPE())
        bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=args.pattern == "gpt2")
        if args.pattern == "gpt4":
            from fastllm.tokenizer import _to_hf_regex

            split = pre_tokenizers.Split(tokenizers.Regex(_to_hf_regex(tok.pat_str)), "isolated")
            hf_t.pre_tokenizer = pre_tokenizers.Sequence([split, bl])
        else:
            hf_t.pre_tokenizer = bl
        trainer = trainers.BpeTrainer(
            vocab_size=args.vocab,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        t0 = time.perf_counter()
        hf_t.train_from_iterator(docs, trainer=trainer)
        t_hf = time.perf_counter() - t0
        print(f"\ntraining {args.vocab} vocab on {mb:.2f} MB, {args.threads} threads:")
        print_table(
            [[f"{t_ours:.2f}", f"{t_hf:.2f}", f"{t_hf / t_ours:.1f}x"]],
            ["fastllm s", "HF BpeTrainer s", "HF/fastllm"],
        )

    # ---- equivalent tokenizers
    specials = tok.special_tokens
    ranks = {tok.token_to_bytes(i): i for i in range(tok.n_vocab) if i not in specials.values()}
    enc = tiktoken.Encoding("bench", pat_str=tok.pat_str, mergeable_ranks=ranks, special_tokens=specials)
    with tempfile.TemporaryDirectory() as d:
        tok.save_hf(os.path.join(d, "tokenizer.json"))
        hf = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = tok.encode_ordinary(text)
    ids_list = ids.tolist()
    same_tt = enc.encode_ordinary(text) == ids_list
    same_hf = hf.encode(text, add_special_tokens=False).ids == ids_list
    print(
        f"\n{len(ids)} tokens ({len(text.encode()) / len(ids):.2f} bytes/token); same ids: "
        f"tiktoken {same_tt}, HF {same_hf}"
    )

    # ---- encode / decode
    doc_ids = [tok.encode_ordinary(d) for d in docs]
    doc_lists = [a.tolist() for a in doc_ids]
    T = args.threads
    cases = {
        "encode 1 thread": {
            "fastllm": lambda: (fastllm._C.bpe_clear_caches(), tok.encode_ordinary(text)),
            "tiktoken": lambda: enc.encode_ordinary(text),
            "HF": lambda: hf.encode(text, add_special_tokens=False),
        },
        f"encode {T} threads (batch of docs)": {
            "fastllm": lambda: (
                fastllm._C.bpe_clear_caches(),
                tok.encode_batch(docs, threads=T, disallowed_special=()),
            ),
            "tiktoken": lambda: enc.encode_ordinary_batch(docs, num_threads=T),
            "HF": lambda: hf.encode_batch(docs, add_special_tokens=False),
        },
        "decode 1 thread": {
            "fastllm": lambda: tok.decode(ids),
            "tiktoken": lambda: enc.decode(ids_list),
            "HF": lambda: hf.decode(ids_list),
        },
        f"decode {T} threads (batch of docs)": {
            "fastllm": lambda: tok.decode_batch(doc_ids, threads=T),
            "tiktoken": lambda: enc.decode_batch(doc_lists, num_threads=T),
            "HF": lambda: hf.decode_batch(doc_lists),
        },
    }
    rows = []
    for name, fns in cases.items():
        r = bench(fns, repeats=args.repeats, warmup=1)
        f = r["fastllm"]["median"]
        rows.append(
            [
                name,
                f"{mb / f:.1f}",
                f"{mb / r['tiktoken']['median']:.1f}",
                f"{mb / r['HF']['median']:.1f}",
                f"{r['tiktoken']['median'] / f:.2f}x",
                f"{r['HF']['median'] / f:.2f}x",
            ]
        )
    print()
    print_table(rows, ["MB/s", "fastllm", "tiktoken", "HF", "tiktoken/fastllm", "HF/fastllm"])


if __name__ == "__main__":
    main()
