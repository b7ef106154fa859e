"""Pre-tokenizer throughput: fastllm._C.pretokenize (native scanner + building the list of str) and the scan
alone (_C._pretokenize_count, no Python objects) vs regex.findall with the same pattern, in MB/s of UTF-8.
    python benchmarks/bench_pretokenize.py [--quick]
Texts: Python's pydoc topics (ASCII-heavy English/code) and a multilingual sample (CJK, Arabic, Devanagari,
emoji, Cyrillic). Single-threaded (the scan is one pass; threads do not apply)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import regex  # noqa: E402
from common import bench, header, print_table  # noqa: E402
from fastllm import _C  # noqa: E402

MULTILINGUAL = (
    "日本語のテキスト、中文文本。한국어 텍스트입니다. مرحبا بالعالم ١٢٣ हिन्दी पाठ देवनागरी में ०१२ "
    "Привет, мир! Это тест. Ελληνικά κείμενα. emoji 👍🏽 👨‍👩‍👧‍👦 don't it's 2024\n"
)


def texts(quick: bool) -> dict[str, str]:
    from pydoc_data.topics import topics

    pydoc = "\n".join(topics[k] for k in sorted(topics))
    multi = MULTILINGUAL * (len(pydoc) // len(MULTILINGUAL) // 4)
    if quick:
        pydoc, multi = pydoc[:100_000], multi[:50_000]
    return {"pydoc": pydoc, "multilingual": multi}


def run(threads: int = 1, quick: bool = False) -> None:
    print(header("pretokenize (MB/s of UTF-8)", 1))
    rows = []
    for tname, text in texts(quick).items():
        mb = len(text.encode("utf-8")) / 1e6
        for pat in ["gpt2", "gpt4"]:
            compiled = regex.compile(_C.pattern_string(pat))
            assert _C.pretokenize(text, pat) == compiled.findall(text)
            res = bench(
                {
                    "fastllm": lambda t=text, p=pat: _C.pretokenize(t, p),
                    "scan": lambda t=text, p=pat: _C._pretokenize_count(t, p),
                    "regex": lambda t=text, c=compiled: c.findall(t),
                },
                repeats=3 if quick else 7,
                warmup=1,
            )
            f, s, r = (res[k]["median"] for k in ("fastllm", "scan", "regex"))
            rows.append(
                [tname, pat, f"{mb:.2f}", f"{mb / f:.0f}", f"{mb / s:.0f}", f"{mb / r:.1f}", f"{r / f:.1f}x"]
            )
    print_table(rows, ["text", "pattern", "MB", "fastllm MB/s", "scan MB/s", "regex MB/s", "regex/fastllm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    run(quick=args.quick)


if __name__ == "__main__":
    main()
