"""Every CPU kernel against its PyTorch equivalent, side by side in one process:
    python benchmarks/bench_kernels.py [--threads 2] [--only matmul,attention,...]
Each family lives in benchmarks/bench_<op>.py with a `run(threads, quick)` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

FAMILIES = ["matmul", "attention", "softmax_ce", "layernorm", "gelu", "embedding", "adamw"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(FAMILIES))
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    args = p.parse_args()
    for name in args.only.split(","):
        try:
            mod = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError:
            print(f"(no benchmarks/bench_{name}.py yet)")
            continue
        mod.run(threads=args.threads, quick=args.quick)
        print()


if __name__ == "__main__":
    main()
