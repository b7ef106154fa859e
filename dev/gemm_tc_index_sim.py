"""Lab check (no GPU needed) of gemm_tc_kernel's index math in csrc/cuda/matmul.cu: a Python mirror of load_stage
(cp.async chunks with src-size zero fill), the ldmatrix lane addresses (plain and .trans), the mma.m16n8k16 fragment
layouts (PTX ISA 9.7.14.5.8) and the epilogue mapping, run on small odd shapes for all four transposes with padded
row strides (garbage past the extents) against numpy. Mirrors the formulas, so update it with the kernel.
    python dev/gemm_tc_index_sim.py     (~6 s)
"""

import numpy as np

BM = BN = 128
BK = 32
STAGES = 4
PAD = 8
WM = 64
WN = 32
GROUP_M = 8


def tile(kcontig):
    rows = 128 if kcontig else BK
    ld = (BK if kcontig else 128) + PAD
    return rows, ld, rows * ld, (BK if kcontig else 128) // 8


def load_stage(s, g, ld, mn0, mn_ext, k0, K, kcontig):
    rows, LD, el, cpr = tile(kcontig)
    for tid in range(256):
        for r in range(2):
            c = tid + r * 256
            row, col = c // cpr, (c % cpr) * 8
            if kcontig:
                mn, k = mn0 + row, k0 + col
                valid = K - k if mn < mn_ext else 0
                off = mn * ld + k
            else:
                k, mn = k0 + row, mn0 + col
                valid = mn_ext - mn if k < K else 0
                off = k * ld + mn
            valid = max(0, min(8, valid))
            dst = row * LD + col
            s[dst : dst + 8] = 0
            if valid:
                s[dst : dst + valid] = g[off : off + valid]


def ldmatrix(s, addrs, trans):
    # addrs[l]: element index of row l%8 of matrix l//8; returns regs[lane][q] = (lo, hi)
    regs = np.zeros((32, 4, 2))
    for q in range(4):
        mat = np.stack([s[addrs[8 * q + r] : addrs[8 * q + r] + 8] for r in range(8)])
        for l in range(32):
            g, t = l // 4, l % 4
            if not trans:
                regs[l, q] = mat[g, 2 * t : 2 * t + 2]
            else:
                regs[l, q] = mat[2 * t : 2 * t + 2, g]
    return regs


def mma(d, a, b0, b1):
    # d: (32,4), a: (32,4,2), b0,b1: (32,2)
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2 * t : 2 * t + 2] = a[l, 0]
        A[g + 8, 2 * t : 2 * t + 2] = a[l, 1]
        A[g, 2 * t + 8 : 2 * t + 10] = a[l, 2]
        A[g + 8, 2 * t + 8 : 2 * t + 10] = a[l, 3]
        B[2 * t : 2 * t + 2, g] = b0[l]
        B[2 * t + 8 : 2 * t + 10, g] = b1[l]
    D = A @ B
    for l in range(32):
        g, t = l // 4, l % 4
        d[l] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]


def gemm_sim(Ag, lda, Bg, ldb, M, N, K, TA, TB, ldc):
    C = np.full((M, ldc), np.nan)
    kA, kB = (not TA), TB
    _, LDA, ELA, _ = tile(kA)
    _, LDB, ELB, _ = tile(kB)
    tiles_m, tiles_n = -(-M // BM), -(-N // BN)
    seen = set()
    for pid in range(tiles_m * tiles_n):
        group = GROUP_M * tiles_n
        first_m = (pid // group) * GROUP_M
        gsize = min(tiles_m - first_m, GROUP_M)
        tm = first_m + (pid % group) % gsize
        tn = (pid % group) // gsize
        assert (tm, tn) not in seen and tm < tiles_m and tn < tiles_n
        seen.add((tm, tn))
        m0, n0 = tm * BM, tn * BN
        sA = np.zeros(STAGES * ELA)
        sB = np.zeros(STAGES * ELB)
        acc = np.zeros((8, 4, 4, 32, 4))
        ktiles = -(-K // BK)
        for kt in range(ktiles):
            st = kt % STAGES
            load_stage(sA[st * ELA : (st + 1) * ELA], Ag, lda, m0, M, kt * BK, K, kA)
            load_stage(sB[st * ELB : (st + 1) * ELB], Bg, ldb, n0, N, kt * BK, K, kB)
            for warp in range(8):
                wm, wn = (warp // 4) * WM, (warp % 4) * WN
                a_lane = []
                b_lane = []
                for lane in range(32):
                    q, r8 = lane // 8, lane % 8
                    a_lane.append(
                        ((wm + (q & 1) * 8 + r8) * LDA + (q >> 1) * 8)
                        if not TA
                        else (((q >> 1) * 8 + r8) * LDA + wm + (q & 1) * 8)
                    )
                    b_lane.append(
                        ((wn + (q >> 1) * 8 + r8) * LDB + (q & 1) * 8)
                        if TB
                        else (((q & 1) * 8 + r8) * LDB + wn + (q >> 1) * 8)
                    )
                a_s = np.array(a_lane) + st * ELA
                b_s = np.array(b_lane) + st * ELB
                for kk in (0, 16):
                    af = [
                        ldmatrix(sA, a_s + ((i * 16 * LDA + kk) if not TA else (kk * LDA + i * 16)), TA)
                        for i in range(4)
                    ]
                    bf = [
                        ldmatrix(sB, b_s + ((jp * 16 * LDB + kk) if TB else (kk * LDB + jp * 16)), not TB)
                        for jp in range(2)
                    ]
                    for i in range(4):
                        for j in range(4):
                            mma(acc[warp, i, j], af[i], bf[j // 2][:, (j % 2) * 2], bf[j // 2][:, (j % 2) * 2 + 1])
        for warp in range(8):
            wm, wn = (warp // 4) * WM, (warp % 4) * WN
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for i in range(4):
                    for j in range(4):
                        row, col = m0 + wm + i * 16 + g, n0 + wn + j * 8 + 2 * t
                        for h in range(2):
                            rr = row + 8 * h
                            for e in range(2):
                                if rr < M and col + e < N:
                                    C[rr, col + e] = acc[warp, i, j, lane, 2 * h + e]
    return C[:, :N]


rng = np.random.default_rng(0)
for M, N, K in [(200, 136, 72), (130, 260, 40), (8, 8, 8), (129, 8, 33)]:
    for TA in (False, True):
        for TB in (False, True):
            pad = 8
            opA = rng.standard_normal((M, K))
            opB = rng.standard_normal((K, N))
            # storage with row stride rounded up to 8 (+8 extra for padded-ld case)
            if TA:
                st = opA.T
            else:
                st = opA
            lda = -(-st.shape[1] // 8) * 8 + pad
            Ag = np.zeros((st.shape[0], lda))
            Ag[:, : st.shape[1]] = st
            Ag[:, st.shape[1] :] = 1e9
            stb = opB.T if TB else opB
            ldb = -(-stb.shape[1] // 8) * 8
            Bg = np.zeros((stb.shape[0], ldb))
            Bg[:, : stb.shape[1]] = stb
            Bg[:, stb.shape[1] :] = 1e9
            C = gemm_sim(Ag.ravel(), lda, Bg.ravel(), ldb, M, N, K, TA, TB, N + 2)
            ref = opA @ opB
            err = np.nanmax(np.abs(C - ref)) if not np.isnan(C).any() else np.inf
            print(M, N, K, TA, TB, "max err", err)
            assert err < 1e-9, "index math is wrong"
