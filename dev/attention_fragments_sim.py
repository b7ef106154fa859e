"""Lab notebook: a numpy model of the warp-level tensor-core kernels in csrc/cuda/attention.cu, to check their
index math without a GPU. ldmatrix (.x4, with/without .trans) and mma.m16n8k16 are modelled from the PTX ISA
fragment tables (lane = 4 * groupID + threadID_in_group), shared memory as a flat bf16 array addressed in bytes,
and the forward / backward kernels are transcribed statement by statement (warps run one after the other between
barriers; cp.async is a plain copy). The results are compared with a float64 reference.

    python dev/attention_fragments_sim.py      # a few shapes, prints the max errors (bf16-level ~1e-3)
"""

from __future__ import annotations

import numpy as np

L = np.arange(32)
G, CQ = L >> 2, L & 3  # groupID, threadID_in_group


def bf16(x):
    x = np.asarray(x, np.float32)
    u = np.ascontiguousarray(x).reshape(-1).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).reshape(x.shape)


class Smem:
    def __init__(self, n_bf16, n_f32=0):
        self.h = np.zeros(n_bf16, np.float32)  # bf16 values, 2 bytes each
        self.f = np.zeros(n_f32, np.float32)

    def ldmatrix_x4(self, addr, trans=False):
        """addr: (32,) byte addresses -> (32, 4, 2) registers of 2 bf16 each (low, high)."""
        out = np.zeros((32, 4, 2), np.float32)
        for i in range(4):
            rows = addr[8 * i : 8 * i + 8] // 2  # element index of each of the 8 row starts
            for lane in range(32):
                for e in range(2):
                    if not trans:
                        out[lane, i, e] = self.h[rows[lane >> 2] + 2 * (lane & 3) + e]
                    else:
                        out[lane, i, e] = self.h[rows[2 * (lane & 3) + e] + (lane >> 2)]
        return out


def mma(d, a, b0, b1):
    """d (32, 4) fp32 += A (16x16 from a (32, 4, 2)) @ B (16x8 from b0, b1 (32, 2))."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    Cm = np.zeros((16, 8))
    for lane in range(32):
        g, c = lane >> 2, lane & 3
        for e in range(2):
            A[g, 2 * c + e] = a[lane, 0, e]
            A[g + 8, 2 * c + e] = a[lane, 1, e]
            A[g, 2 * c + 8 + e] = a[lane, 2, e]
            A[g + 8, 2 * c + 8 + e] = a[lane, 3, e]
            B[2 * c + e, g] = b0[lane, e]
            B[2 * c + 8 + e, g] = b1[lane, e]
            Cm[g, 2 * c + e] = d[lane, e]
            Cm[g + 8, 2 * c + e] = d[lane, 2 + e]
    D = A @ B + Cm
    for lane in range(32):
        g, c = lane >> 2, lane & 3
        for e in range(2):
            d[lane, e] = D[g, 2 * c + e]
            d[lane, 2 + e] = D[g + 8, 2 * c + e]


def acc_to_a(lo, hi):
    a = np.zeros((32, 4, 2), np.float32)
    a[:, 0] = bf16(lo[:, 0:2])
    a[:, 1] = bf16(lo[:, 2:4])
    a[:, 2] = bf16(hi[:, 0:2])
    a[:, 3] = bf16(hi[:, 2:4])
    return a


def lds_a(LD):
    return ((L & 15) * LD + (L >> 4) * 8) * 2


def lds_bn(LD):
    return (((L & 7) + ((L >> 4) << 3)) * LD + ((L >> 3) & 1) * 8) * 2


def lds_bt(LD):
    return (((L & 7) + ((L >> 3) & 1) * 8) * LD + (L >> 4) * 8) * 2


def shfl_xor(x, m):
    return x[L ^ m]


def load_rows(sm, dst, src, ld, r0, rows, T, HS, LD):
    """load_rows_async: rows r0.. of a flat global array `src` (row stride ld) into sm.h[dst:], zero past T."""
    for r in range(rows):
        t = r0 + r
        sm.h[dst + r * LD : dst + r * LD + HS] = src[t * ld : t * ld + HS] if t < T else 0.0


def flash_forward(qkv, T, NH, C, HS, MI, NW, BC, h, out, lse, b=0):
    BR, LD = 16 * MI * NW, HS + 8
    KC, DN, SN = HS // 16, HS // 8, BC // 8
    scale_log2 = 1.4426950408889634 / np.sqrt(HS)
    C3 = 3 * C
    flat = qkv.reshape(-1)
    qb = b * T * C3 + h * HS
    n_qt = (T + BR - 1) // BR
    for qt in range(n_qt):
        sm = Smem((BR + 4 * BC) * LD)
        Qs, Ks, Vs = 0, BR * LD, BR * LD + 2 * BC * LD
        q0 = qt * BR
        kend = min(T, q0 + BR)
        n_kt = (kend + BC - 1) // BC
        load_rows(sm, Qs, flat[qb:], C3, q0, BR, T, HS, LD)
        load_rows(sm, Ks, flat[qb + C :], C3, 0, BC, T, HS, LD)
        load_rows(sm, Vs, flat[qb + 2 * C :], C3, 0, BC, T, HS, LD)
        st = [
            dict(o=np.zeros((MI, DN, 32, 4)), m=np.full((MI, 2, 32), -np.inf), l=np.zeros((MI, 2, 32)), qf=None)
            for _ in range(NW)
        ]
        for j in range(n_kt):
            buf = j & 1
            if j + 1 < n_kt:
                load_rows(sm, Ks + (buf ^ 1) * BC * LD, flat[qb + C :], C3, (j + 1) * BC, BC, T, HS, LD)
                load_rows(sm, Vs + (buf ^ 1) * BC * LD, flat[qb + 2 * C :], C3, (j + 1) * BC, BC, T, HS, LD)
            for warp in range(NW):
                w = st[warp]
                wrow0 = q0 + warp * 16 * MI
                if j == 0:
                    qa = Qs * 2 + lds_a(LD) + warp * 16 * MI * LD * 2
                    w["qf"] = [
                        [sm.ldmatrix_x4(qa + (mi * 16 * LD + kc * 16) * 2) for kc in range(KC)] for mi in range(MI)
                    ]
                k0 = j * BC
                if not (k0 <= wrow0 + 16 * MI - 1):
                    continue
                ka = (Ks + buf * BC * LD) * 2 + lds_bn(LD)
                va = (Vs + buf * BC * LD) * 2 + lds_bt(LD)
                s = np.zeros((MI, SN, 32, 4))
                for kc in range(KC):
                    for np_ in range(SN // 2):
                        kf = sm.ldmatrix_x4(ka + (np_ * 16 * LD + kc * 16) * 2)
                        for mi in range(MI):
                            mma(s[mi, 2 * np_], w["qf"][mi][kc], kf[:, 0], kf[:, 1])
                            mma(s[mi, 2 * np_ + 1], w["qf"][mi][kc], kf[:, 2], kf[:, 3])
                if k0 + BC - 1 > wrow0 or k0 + BC > T:
                    for mi in range(MI):
                        for sn in range(SN):
                            for e in range(4):
                                key = k0 + sn * 8 + 2 * CQ + (e & 1)
                                qrow = wrow0 + mi * 16 + G + 8 * (e >> 1)
                                s[mi, sn, :, e] = np.where((key > qrow) | (key >= T), -np.inf, s[mi, sn, :, e])
                for mi in range(MI):
                    for hf in range(2):
                        mx = np.max(np.maximum(s[mi, :, :, 2 * hf], s[mi, :, :, 2 * hf + 1]), axis=0)
                        mx = np.maximum(mx, shfl_xor(mx, 1))
                        mx = np.maximum(mx, shfl_xor(mx, 2))
                        m_new = np.maximum(w["m"][mi, hf], mx)
                        ms = np.where(m_new == -np.inf, 0.0, m_new * scale_log2)
                        with np.errstate(invalid="ignore"):
                            alpha = np.exp2(w["m"][mi, hf] * scale_log2 - ms)
                        w["m"][mi, hf] = m_new
                        p0 = np.exp2(s[mi, :, :, 2 * hf] * scale_log2 - ms)
                        p1 = np.exp2(s[mi, :, :, 2 * hf + 1] * scale_log2 - ms)
                        s[mi, :, :, 2 * hf] = p0
                        s[mi, :, :, 2 * hf + 1] = p1
                        w["l"][mi, hf] = w["l"][mi, hf] * alpha + (p0 + p1).sum(0)
                        w["o"][mi, :, :, 2 * hf] *= alpha
                        w["o"][mi, :, :, 2 * hf + 1] *= alpha
                # P -> bf16 A fragments exactly as the kernel packs them: pa[mi][sn // 2][(sn & 1) * 2 + hf]
                pa_all = np.zeros((MI, BC // 16, 32, 4, 2), np.float32)
                for mi in range(MI):
                    for hf in range(2):
                        for sn in range(SN):
                            pa_all[mi, sn // 2, :, (sn & 1) * 2 + hf] = bf16(s[mi, sn, :, 2 * hf : 2 * hf + 2])
                for kk in range(BC // 16):
                    pa = [pa_all[mi, kk] for mi in range(MI)]
                    for dp in range(DN // 2):
                        vf = sm.ldmatrix_x4(va + (kk * 16 * LD + dp * 16) * 2, trans=True)
                        for mi in range(MI):
                            mma(w["o"][mi, 2 * dp], pa[mi], vf[:, 0], vf[:, 1])
                            mma(w["o"][mi, 2 * dp + 1], pa[mi], vf[:, 2], vf[:, 3])
        for warp in range(NW):
            w = st[warp]
            wrow0 = q0 + warp * 16 * MI
            for mi in range(MI):
                for hf in range(2):
                    sm_ = w["l"][mi, hf]
                    sm_ = sm_ + shfl_xor(sm_, 1)
                    sm_ = sm_ + shfl_xor(sm_, 2)
                    for lane in range(32):
                        row = wrow0 + mi * 16 + (lane >> 2) + 8 * hf
                        if row >= T:
                            continue
                        inv = 1.0 / sm_[lane]
                        for dn in range(DN):
                            col = h * HS + dn * 8 + 2 * (lane & 3)
                            out[b, row, col] = bf16(w["o"][mi, dn, lane, 2 * hf] * inv)
                            out[b, row, col + 1] = bf16(w["o"][mi, dn, lane, 2 * hf + 1] * inv)
                        if lane & 3 == 0:
                            lse[b, h, row] = (w["m"][mi, hf, lane] * scale_log2 + np.log2(sm_[lane])) * np.log(2)


def flash_backward(dqkv, dout, qkv, lse, D, T, NH, C, HS, BQ, NW, h, b=0):
    BK, LD, LDS = 16 * NW, HS + 8, BQ + 8
    KC, DN, QN = HS // 16, HS // 8, BQ // 8
    MT = BQ // 16
    PARTS = NW // MT
    DQ = HS // PARTS
    scale = 1 / np.sqrt(HS)
    scale_log2 = scale * 1.4426950408889634
    C3 = 3 * C
    flat, gflat = qkv.reshape(-1), dout.reshape(-1)
    qb, gb = b * T * C3 + h * HS, b * T * C + h * HS
    dq_acc = np.zeros((T, HS))
    n_kt = (T + BK - 1) // BK
    for kt in range(n_kt):
        sm = Smem((2 * BK + 4 * BQ) * LD + BK * LDS, 4 * BQ)
        Ks, Vs = 0, BK * LD
        Qs = 2 * BK * LD
        dOs = Qs + 2 * BQ * LD
        dSs = dOs + 2 * BQ * LD
        k0 = kt * BK
        it0, n_qt = k0 // BQ, (T + BQ - 1) // BQ
        load_rows(sm, Ks, flat[qb + C :], C3, k0, BK, T, HS, LD)
        load_rows(sm, Vs, flat[qb + 2 * C :], C3, k0, BK, T, HS, LD)
        dk = np.zeros((NW, DN, 32, 4))
        dv = np.zeros((NW, DN, 32, 4))

        def load_q_tile(it, buf, sm=sm, Qs=Qs, dOs=dOs):
            q0 = it * BQ
            load_rows(sm, Qs + buf * BQ * LD, flat[qb:], C3, q0, BQ, T, HS, LD)
            load_rows(sm, dOs + buf * BQ * LD, gflat[gb:], C, q0, BQ, T, HS, LD)
            for r in range(BQ):
                q = q0 + r
                sm.f[buf * BQ + r] = lse[b, h, q] if q < T else 0.0
                sm.f[2 * BQ + buf * BQ + r] = D[b, h, q] if q < T else 0.0

        load_q_tile(it0, 0)
        for it in range(it0, n_qt):
            buf = (it - it0) & 1
            if it + 1 < n_qt:
                load_q_tile(it + 1, buf ^ 1)
            q0 = it * BQ
            lse_t = sm.f[buf * BQ : (buf + 1) * BQ]
            D_t = sm.f[2 * BQ + buf * BQ : 2 * BQ + (buf + 1) * BQ]
            for warp in range(NW):
                kw = 16 * warp
                q_bn = (Qs + buf * BQ * LD) * 2 + lds_bn(LD)
                q_bt = (Qs + buf * BQ * LD) * 2 + lds_bt(LD)
                g_bn = (dOs + buf * BQ * LD) * 2 + lds_bn(LD)
                g_bt = (dOs + buf * BQ * LD) * 2 + lds_bt(LD)
                k_a = (Ks + kw * LD) * 2 + lds_a(LD)
                v_a = (Vs + kw * LD) * 2 + lds_a(LD)
                s = np.zeros((QN, 32, 4))
                for kc in range(KC):
                    ka = sm.ldmatrix_x4(k_a + kc * 16 * 2)
                    for np_ in range(QN // 2):
                        qf = sm.ldmatrix_x4(q_bn + (np_ * 16 * LD + kc * 16) * 2)
                        mma(s[2 * np_], ka, qf[:, 0], qf[:, 1])
                        mma(s[2 * np_ + 1], ka, qf[:, 2], qf[:, 3])
                need_mask = q0 < k0 + BK or q0 + BQ > T
                for qn in range(QN):
                    for e in range(4):
                        ql = qn * 8 + 2 * CQ + (e & 1)
                        key = k0 + kw + G + 8 * (e >> 1)
                        q = q0 + ql
                        pr = np.exp2(s[qn, :, e] * scale_log2 - lse_t[ql] * 1.4426950408889634)
                        s[qn, :, e] = np.where(need_mask & ((key > q) | (q >= T)), 0.0, pr)
                dp = np.zeros((QN, 32, 4))
                for kc in range(KC):
                    va = sm.ldmatrix_x4(v_a + kc * 16 * 2)
                    for np_ in range(QN // 2):
                        gf = sm.ldmatrix_x4(g_bn + (np_ * 16 * LD + kc * 16) * 2)
                        mma(dp[2 * np_], va, gf[:, 0], gf[:, 1])
                        mma(dp[2 * np_ + 1], va, gf[:, 2], gf[:, 3])
                for kk in range(BQ // 16):
                    pa = acc_to_a(s[2 * kk], s[2 * kk + 1])
                    for dpp in range(DN // 2):
                        gf = sm.ldmatrix_x4(g_bt + (kk * 16 * LD + dpp * 16) * 2, trans=True)
                        mma(dv[warp, 2 * dpp], pa, gf[:, 0], gf[:, 1])
                        mma(dv[warp, 2 * dpp + 1], pa, gf[:, 2], gf[:, 3])
                for qn in range(QN):
                    for e in range(4):
                        dp[qn, :, e] = s[qn, :, e] * (dp[qn, :, e] - D_t[qn * 8 + 2 * CQ + (e & 1)])
                for kk in range(BQ // 16):
                    da = acc_to_a(dp[2 * kk], dp[2 * kk + 1])
                    for lane in range(32):
                        g, c = lane >> 2, lane & 3
                        for e in range(2):
                            sm.h[dSs + (kw + g) * LDS + kk * 16 + 2 * c + e] = da[lane, 0, e]
                            sm.h[dSs + (kw + g + 8) * LDS + kk * 16 + 2 * c + e] = da[lane, 1, e]
                            sm.h[dSs + (kw + g) * LDS + kk * 16 + 8 + 2 * c + e] = da[lane, 2, e]
                            sm.h[dSs + (kw + g + 8) * LDS + kk * 16 + 8 + 2 * c + e] = da[lane, 3, e]
                    for dpp in range(DN // 2):
                        qf = sm.ldmatrix_x4(q_bt + (kk * 16 * LD + dpp * 16) * 2, trans=True)
                        mma(dk[warp, 2 * dpp], da, qf[:, 0], qf[:, 1])
                        mma(dk[warp, 2 * dpp + 1], da, qf[:, 2], qf[:, 3])
            # barrier, then dQ
            for warp in range(NW):
                mt, part = warp % MT, warp // MT
                ds_a = (dSs + mt * 16) * 2 + lds_bn(LDS)
                k_bt = (Ks + part * DQ) * 2 + lds_bt(LD)
                a = [sm.ldmatrix_x4(ds_a + kc * 16 * LDS * 2, trans=True) for kc in range(BK // 16)]
                q_lo = q0 + mt * 16 + G
                for ch in range(DQ // 32):
                    dq = np.zeros((4, 32, 4))
                    for kc in range(BK // 16):
                        for dpp in range(2):
                            kf = sm.ldmatrix_x4(k_bt + (kc * 16 * LD + ch * 32 + dpp * 16) * 2, trans=True)
                            mma(dq[2 * dpp], a[kc], kf[:, 0], kf[:, 1])
                            mma(dq[2 * dpp + 1], a[kc], kf[:, 2], kf[:, 3])
                    for hf in range(2):
                        for lane in range(32):
                            q = q_lo[lane] + 8 * hf
                            if q >= T:
                                continue
                            for dn in range(4):
                                d = part * DQ + ch * 32 + dn * 8 + 2 * (lane & 3)
                                dq_acc[q, d] += dq[dn, lane, 2 * hf]
                                dq_acc[q, d + 1] += dq[dn, lane, 2 * hf + 1]
        for warp in range(NW):
            kw = 16 * warp
            for hf in range(2):
                for lane in range(32):
                    key = k0 + kw + (lane >> 2) + 8 * hf
                    if key >= T:
                        continue
                    for dn in range(DN):
                        col = h * HS + dn * 8 + 2 * (lane & 3)
                        for e in range(2):
                            dqkv[b, key, C + col + e] += scale * dk[warp, dn, lane, 2 * hf + e]
                            dqkv[b, key, 2 * C + col + e] += dv[warp, dn, lane, 2 * hf + e]
    dqkv[b, :, h * HS : (h + 1) * HS] += scale * dq_acc


def reference(qkv, dout, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (
        qkv[..., i * C : (i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3).astype(np.float64) for i in range(3)
    )
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
    lse = np.log(np.exp(att - att.max(-1, keepdims=True)).sum(-1)) + att.max(-1)
    p = np.exp(att - lse[..., None])
    out = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3).astype(np.float64)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dp = dy @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(hs)
    grads = [g.transpose(0, 2, 1, 3).reshape(B, T, C) for g in (ds @ k, ds.transpose(0, 1, 3, 2) @ q, dv)]
    return out, lse, np.concatenate(grads, -1)


# ---- the simple "rows" kernels: warp transpose-reduce, base-2 online softmax per warp, the 4-warp merge, the
# flash-decoding split over blocks and the merge kernel (rows_forward_kernel / rows_merge_kernel), with the split
# plan of attention_kv_forward's launcher


def transpose_sum32(v):
    """v (32 lanes, 32 items) -> (32,): lane j ends with the sum over lanes of item j (transpose_step<16..1>)."""
    v = v.copy()
    for O in (16, 8, 4, 2, 1):
        upper = (L & O) != 0
        nv = v.copy()
        for i in range(O):
            send = np.where(upper, v[:, i], v[:, i + O])
            keep = np.where(upper, v[:, i + O], v[:, i])
            nv[:, i] = keep + send[L ^ O]
        v = nv
    return v[:, 0]


def exp2_diff(a, b):
    with np.errstate(invalid="ignore"):
        return np.where(a == -np.inf, 0.0, np.exp2(a - b))


def rows_forward(x, keys, vals, L_, chunk, nsplit, NW=4):
    """One query row: x (hs,) already times scale*log2e, keys/vals (maxT, hs); keys 0..L_-1 visible.
    Returns out (hs,), lse (natural log) through the split partials + merge like the kernels."""
    hs = x.shape[0]
    parts = []
    for split in range(nsplit):
        s_begin = split * chunk
        s_end = min(L_, s_begin + chunk)
        states = []
        for warp in range(NW):
            m, l_lane, acc = -np.inf, np.zeros(32), np.zeros(hs)
            s0 = s_begin + 32 * warp
            while s0 < s_end:
                n = min(s_end - s0, 32)
                partial = np.zeros((32, 32))  # [lane, item j]: lane's slice of dot(x, key j)
                for lane in range(32):
                    d = np.arange(lane, hs, 32)
                    partial[lane, :n] = keys[s0 : s0 + n][:, d] @ x[d]
                sc = transpose_sum32(partial)
                sc = np.where(L < n, sc, -np.inf)  # lanes >= n
                m_new = max(m, sc.max())
                alpha = exp2_diff(np.float64(m), m_new)
                pr = np.exp2(sc - m_new)
                l_lane = l_lane * alpha + pr
                acc = acc * alpha + pr[:n] @ vals[s0 : s0 + n]
                m = m_new
                s0 += 32 * NW
            states.append((m, l_lane.sum(), acc))
        M = max(s[0] for s in states)
        f = [exp2_diff(np.float64(s[0]), M) for s in states]
        Lsum = sum(s[1] * fw for s, fw in zip(states, f))
        acc = sum(s[2] * fw for s, fw in zip(states, f))
        parts.append((M, Lsum, acc))
    M = max(p[0] for p in parts)
    w = [exp2_diff(np.float64(p[0]), M) for p in parts]
    Lsum = sum(p[1] * wi for p, wi in zip(parts, w))
    o = sum(p[2] * wi for p, wi in zip(parts, w))
    inv = 1.0 / Lsum if Lsum > 0 else 0.0
    with np.errstate(divide="ignore"):
        return o * inv, (M + np.log2(Lsum)) * np.log(2)


def kv_split_plan(rows, maxT, sms=132):
    """chunk, nsplit as attention_kv_forward computes them."""
    want = 2 * sms
    chunk = maxT
    if rows < want:
        splits = (want + rows - 1) // rows
        chunk = (maxT + splits - 1) // splits
        chunk = ((chunk + 127) // 128) * 128
        chunk = max(chunk, 256)
    chunk = min(chunk, maxT)
    return chunk, (maxT + chunk - 1) // chunk


def rows_checks(rng):
    v = rng.standard_normal((32, 32))
    assert np.allclose(transpose_sum32(v), v.sum(0)), "transpose_sum32"
    for hs, maxT, L_, rows in [
        (64, 4096, 3005, 4),
        (80, 96, 23, 3),
        (8, 700, 700, 20),
        (48, 1000, 1, 2),
        (256, 600, 333, 264),
    ]:
        chunk, nsplit = kv_split_plan(rows, maxT)
        q, keys, vals = rng.standard_normal(hs), rng.standard_normal((maxT, hs)), rng.standard_normal((maxT, hs))
        keys[L_:] = np.nan  # never read
        vals[L_:] = np.nan
        scale = 1 / np.sqrt(hs)
        out, lse = rows_forward(q * scale * 1.4426950408889634, keys, vals, L_, chunk, nsplit)
        s = keys[:L_] @ q * scale
        ref_lse = np.log(np.exp(s - s.max()).sum()) + s.max()
        ref = np.exp(s - ref_lse) @ vals[:L_]
        e = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"rows hs={hs} L={L_} chunk={chunk} nsplit={nsplit}: out {e:.2e} lse {abs(lse - ref_lse):.2e}")
        assert e < 1e-10 and abs(lse - ref_lse) < 1e-10


def main():
    rng = np.random.default_rng(0)
    rows_checks(rng)
    # (HS, forward MI, NW, BC, backward BQ, NW, T): the configurations of FlashCfg first, then others
    cfgs = [
        (64, 2, 4, 64, 64, 4, 150),
        (128, 2, 4, 32, 32, 4, 161),
        (128, 1, 4, 64, 32, 4, 97),
        (64, 2, 4, 64, 64, 4, 1),
    ]
    for HS, MI, NWf, BC, BQ, NWb, T in cfgs:
        NH, h = 2, 1
        C = NH * HS
        qkv = bf16(rng.standard_normal((1, T, 3 * C)))
        dout = bf16(rng.standard_normal((1, T, C)))
        ref_out, ref_lse, ref_grad = reference(qkv, dout, NH)
        out = np.zeros((1, T, C), np.float32)
        lse = np.zeros((1, NH, T), np.float32)
        flash_forward(qkv, T, NH, C, HS, MI, NWf, BC, h, out, lse)
        sl = slice(h * HS, (h + 1) * HS)
        e_out = np.abs(out[..., sl] - ref_out[..., sl]).max() / np.abs(ref_out[..., sl]).max()
        e_lse = np.abs(lse[:, h] - ref_lse[:, h]).max()
        # backward with the simulated forward's out (bf16) and lse, D = rowsum(dout * out)
        D = np.zeros((1, NH, T), np.float32)
        D[0, h] = (dout[0, :, sl] * out[0, :, sl]).sum(-1)
        dqkv = np.zeros((1, T, 3 * C))
        flash_backward(dqkv, dout, qkv, lse, D, T, NH, C, HS, BQ, NWb, h)
        errs = []
        for i in range(3):
            cols = slice(i * C + h * HS, i * C + (h + 1) * HS)
            scale = max(np.abs(ref_grad[..., cols]).max(), 1e-2 * np.abs(ref_grad).max())
            errs.append(np.abs(dqkv[..., cols] - ref_grad[..., cols]).max() / scale)
        other = np.abs(dqkv[..., [i * C + j for i in range(3) for j in range(HS)]]).max()  # head 0 untouched
        print(
            f"HS={HS} T={T}: out {e_out:.2e} lse {e_lse:.2e} dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}"
            f" other head {other:.1e}"
        )
        assert e_out < 1e-2 and e_lse < 1e-3 and max(errs) < 3e-2 and other == 0


if __name__ == "__main__":
    main()
