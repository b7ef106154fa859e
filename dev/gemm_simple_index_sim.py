"""Lab check (no GPU) of gemm_simple_kernel in csrc/cuda/matmul.cu: a numpy mirror of its 1-D grid, tile loads
(all 4 transposes) and thread -> output mapping on odd shapes, against numpy. Mirrors the formulas.
    python dev/gemm_simple_index_sim.py     (~1 s)
"""

import numpy as np

BM = BN = 64
BK = 16
TH = 256


def sim(A, B, M, N, K, TA, TB, lda, ldb):
    C = np.full((M, N), np.nan)
    tiles_m = -(-M // BM)
    tiles_n = -(-N // BN)
    for bid in range(tiles_m * tiles_n):
        m0 = (bid % tiles_m) * BM
        n0 = (bid // tiles_m) * BN
        acc = np.zeros((TH, 4, 4))
        for k0 in range(0, K, BK):
            As = np.full((BK, BM + 1), np.nan)
            Bs = np.full((BK, BN + 2), np.nan)
            for tid in range(TH):
                for i in range(tid, BM * BK, TH):
                    mm, kk = (i % BM, i // BM) if TA else (i // BK, i % BK)
                    m, k = m0 + mm, k0 + kk
                    As[kk, mm] = (A[k * lda + m] if TA else A[m * lda + k]) if (m < M and k < K) else 0
                for i in range(tid, BN * BK, TH):
                    nn, kk = (i // BK, i % BK) if TB else (i % BN, i // BN)
                    n, k = n0 + nn, k0 + kk
                    Bs[kk, nn] = (B[n * ldb + k] if TB else B[k * ldb + n]) if (n < N and k < K) else 0
            tid = np.arange(TH)
            tx, ty = tid % 16, tid // 16
            for kk in range(BK):
                a = np.stack([As[kk, ty + 16 * i] for i in range(4)], 1)
                b = np.stack([Bs[kk, 2 * tx + 32 * (j // 2) + j % 2] for j in range(4)], 1)
                acc += a[:, :, None] * b[:, None, :]
        for tid in range(TH):
            tx, ty = tid % 16, tid // 16
            for i in range(4):
                for jj in range(2):
                    r, c = m0 + ty + 16 * i, n0 + 2 * tx + 32 * jj
                    for e in range(2):
                        if r < M and c + e < N:
                            C[r, c + e] = acc[tid, i, 2 * jj + e]
    return C


rng = np.random.default_rng(0)
for M, N, K in [(7, 13, 5), (127, 129, 33), (65, 130, 17), (1, 1, 1)]:
    for TA in (0, 1):
        for TB in (0, 1):
            opA = rng.standard_normal((M, K))
            opB = rng.standard_normal((K, N))
            sA = opA.T if TA else opA
            sB = opB.T if TB else opB
            C = sim(
                np.ascontiguousarray(sA).ravel(),
                np.ascontiguousarray(sB).ravel(),
                M,
                N,
                K,
                TA,
                TB,
                sA.shape[1],
                sB.shape[1],
            )
            err = np.abs(C - opA @ opB).max()
            print(M, N, K, TA, TB, err)
            assert err < 1e-9
