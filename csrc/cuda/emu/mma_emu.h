/* fastllm's CUDA emulator: mma.cuh's tensor-core building blocks as warp exchanges (see include/cuda_runtime.h).
Fragment layouts as in the PTX ISA and mma.cuh's comments; the bf16 products are summed in fp32, k in order. */
#pragma once
#include <cstdint>

#include "cuda_runtime.h"

namespace fastllm::cuda {

inline uint32_t smem_addr(const void* p) { return ::emu::smem_offset(p); }
inline void cp_async16(uint32_t dst, const void* src, int src_bytes) { ::emu::cp_async(dst, src, 16, src_bytes); }
inline void cp_async4(uint32_t dst, const void* src, int src_bytes) { ::emu::cp_async(dst, src, 4, src_bytes); }
inline void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ::emu::cp_async_wait(N); }

namespace emu_detail {
inline uint16_t ld16(uint32_t addr) {
    uint16_t v;
    std::memcpy(&v, ::emu::smem_pointer(addr), 2);
    return v;
}
inline float bf16_bits_to_f32(uint32_t h) {
    uint32_t u = (h & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    if ((int32_t)addr % 16 != 0) ::emu::fault("ldmatrix: a row address is not 16-byte aligned");
    const uint32_t* rows = ::emu::warp_exchange(0xffffffffu, &addr, 1, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
    const int l = ::emu::lane_id();
    for (int q = 0; q < 4; q++) {
        uint32_t lo, hi;
        if (!trans) {  // row l/4, columns 2(l%4), 2(l%4)+1 of matrix q
            lo = ld16(rows[8 * q + l / 4] + 4 * (l % 4));
            hi = ld16(rows[8 * q + l / 4] + 4 * (l % 4) + 2);
        } else {  // the same of its transpose: rows 2(l%4), 2(l%4)+1, column l/4
            lo = ld16(rows[8 * q + 2 * (l % 4)] + 2 * (l / 4));
            hi = ld16(rows[8 * q + 2 * (l % 4) + 1] + 2 * (l / 4));
        }
        r[q] = lo | hi << 16;
    }
}
}  // namespace emu_detail

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_detail::ldmatrix_x4(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_detail::ldmatrix_x4(r, addr, true); }

// the warp's whole 16x8 product A @ B is formed once (by the last lane to arrive) and written over the
// exchanged words: lane l's four results land in its words 0..3; each lane then adds them to its accumulators
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const uint32_t* out = ::emu::warp_exchange(0xffffffffu, mine, 6, "mma.sync.m16n8k16", [](uint32_t* all) {
        auto half = [](uint32_t w, int odd) { return emu_detail::bf16_bits_to_f32(odd ? w >> 16 : w); };
        // A (16x16): lane (r%8)*4 + (c%8)/2, register (r>=8) + 2(c>=8); B (16x8): lane n*4 + (k%8)/2, register
        // 4 + (k>=8)
        float A[16][16], Bt[8][16];
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++)
                A[r][c] = half(all[6 * ((r % 8) * 4 + (c % 8) / 2) + (r >= 8) + 2 * (c >= 8)], c & 1);
        for (int n = 0; n < 8; n++)
            for (int k = 0; k < 16; k++) Bt[n][k] = half(all[6 * (n * 4 + (k % 8) / 2) + 4 + (k >= 8)], k & 1);
        for (int l = 0; l < 32; l++) {  // d: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
            const int g = l / 4, t = l % 4;
            for (int i = 0; i < 4; i++) {
                const float* ar = A[g + 8 * (i >> 1)];
                const float* bc = Bt[2 * t + (i & 1)];
                float acc = 0.f;
                for (int k = 0; k < 16; k++) acc += ar[k] * bc[k];  // bf16 products are exact in fp32
                std::memcpy(&all[6 * l + i], &acc, 4);
            }
        }
    });
    const int l = ::emu::lane_id();
    for (int i = 0; i < 4; i++) {
        float p;
        std::memcpy(&p, &out[6 * l + i], 4);
        d[i] += p;
    }
}

}  // namespace fastllm::cuda
