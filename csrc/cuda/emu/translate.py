"""Turns a .cu file into C++ for fastllm's CUDA emulator (FASTLLM_CUDA=emulate): the two CUDA constructs a
header cannot express are rewritten, every line keeps its number (#line points errors at the .cu file):

    kernel<T><<<grid, block, smem, stream>>>(a, b)
        -> ::emu::launch("kernel<T>", kernel<T>, ::emu::LaunchCfg(grid, block, smem, stream), a, b)
    extern __shared__ __align__(16) T name[];
        -> T* name = (T*)::emu::dynamic_smem();

Usage: python translate.py in.cu out.cpp
"""

from __future__ import annotations

import re
import sys

EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
IDENT = re.compile(r"[\w:]")


def _match_forward(s: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes s[i] == open_."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_!r} at offset {i}")


def _kernel_start(s: str, end: int) -> int:
    """Start of the kernel expression that ends at s[end] (exclusive): name, qualified name, template args."""
    i = end
    while i > 0 and s[i - 1].isspace():
        i -= 1
    if s[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(s[i], 0)
            if depth == 0:
                break
    while i > 0 and IDENT.match(s[i - 1]):
        i -= 1
    return i


def translate(src: str) -> str:
    src = EXTERN_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = ({m[1]}*)::emu::dynamic_smem();", src)
    out, pos = [], 0
    while (lt := src.find("<<<", pos)) >= 0:
        gt = src.index(">>>", lt)
        paren = gt + 3
        while src[paren].isspace():
            paren += 1
        if src[paren] != "(":
            raise ValueError(f"launch without arguments at line {src.count(chr(10), 0, lt) + 1}")
        close = _match_forward(src, paren, "(", ")")
        k0 = _kernel_start(src, lt)
        kernel = src[k0:lt].strip()
        cfg, args = src[lt + 3 : gt], src[paren + 1 : close - 1]
        gap = src[k0:lt].count("\n") + src[gt:paren].count("\n")  # newlines dropped: put them back
        name = " ".join(kernel.split())
        call = f'::emu::launch("{name}", {" ".join(kernel.split())}, ::emu::LaunchCfg({cfg})'
        call += (", " + args if args.strip() else "") + ")" + "\n" * gap
        out.append(src[pos:k0] + call)
        pos = close
    out.append(src[pos:])
    return "".join(out)


def main() -> None:
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        text = translate(f.read())
    with open(out_path, "w") as f:
        f.write(f'#line 1 "{src_path}"\n' + text)


if __name__ == "__main__":
    main()
