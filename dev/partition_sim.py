"""Lab check (no GPU) of host-side partitioning in csrc/cuda: gemm_tc_kernel grouped rasterisation is a bijection
onto tiles; bias_backward row slices cover every row once (P <= 65535); lmhead_cross_entropy chunks at the padded
stride fit the scratch and cover every row once. Mirrors the formulas.
    python dev/partition_sim.py
"""

import numpy as np

# tc rasterisation: bijection onto tiles for many grids
for tm in range(1, 40):
    for tn in range(1, 12):
        seen = set()
        for pid in range(tm * tn):
            group = 8 * tn
            first = (pid // group) * 8
            gs = min(tm - first, 8)
            t = (first + (pid % group) % gs, (pid % group) // gs)
            assert t[0] < tm and t[1] < tn and t not in seen
            seen.add(t)
print("raster ok")
# bias_backward partitioning: every row in exactly one slice, P <= 65535, no empty slice
for M in [1, 2, 63, 64, 65, 5000, 16384, 10**6, 10**8]:
    for N in [1, 3, 31, 33, 40, 1000, 50257]:
        cb = (N + 31) // 32
        P = (1024 + cb - 1) // cb
        P = min(P, (M + 63) // 64)
        P = max(min(P, 65535), 1)
        rows = (M + P - 1) // P
        P = (M + rows - 1) // rows
        assert 1 <= P <= 65535 and (P - 1) * rows < M <= P * rows
print("bias ok")
# lmhead chunking: chunk*ld fits the scratch, every row covered once
for V in [1, 5, 7, 8, 257, 1000, 50257]:
    for cr in [1, 2, 3, 7, 64, 100, 2560]:
        for N in [1, 10, 37, 300]:
            ld = (V + 7) // 8 * 8
            chunk = cr * V // ld
            if chunk < 1:
                ld, chunk = V, cr
            assert chunk * ld <= cr * V and ld >= V and chunk >= 1
            cov = np.zeros(N, int)
            for r0 in range(0, N, chunk):
                cov[r0 : r0 + min(chunk, N - r0)] += 1
            assert (cov == 1).all()
print("lmhead ok")
