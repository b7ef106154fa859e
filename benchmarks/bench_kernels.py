"""Every kernel against its PyTorch equivalent, side by side in one process, on the CPU or the GPU:
    python benchmarks/bench_kernels.py [--threads 2] [--only matmul,attention,...] [--quick] [--device cpu|cuda]
                                       [--dtype ...] [--smoke]
Each family lives in benchmarks/bench_<op>.py with a `run(threads, quick, device, dtype, smoke)` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import add_device_args, check_device_args  # noqa: E402

FAMILIES = ["matmul", "attention", "softmax_ce", "layernorm", "gelu", "embedding", "adamw", "rmsnorm", "rope", "swiglu",
            "attention_gqa"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(FAMILIES))
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    add_device_args(p)
    args = p.parse_args()
    check_device_args(p, args)
    for name in args.only.split(","):
        try:
            mod = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError:
            print(f"(no benchmarks/bench_{name}.py yet)")
            continue
        mod.run(threads=args.threads, quick=args.quick, device=args.device, dtype=args.dtype, smoke=args.smoke)
        print()


if __name__ == "__main__":
    main()
