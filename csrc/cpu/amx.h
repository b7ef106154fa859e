// The AMX tiles (Intel Sapphire Rapids and later) for the bf16 GEMM (matmul.cpp) and the w8a8 matmul
// (matmul_w8a8.cpp): the tile configuration, one 32 x 32 block of C over a run of k, the instructions themselves
// (AmxTiles) and a C++ model of them that runs on any CPU (AmxEmu), so the kernels' data movement is tested
// everywhere (fastllm._C.set_amx_emulation).
#pragma once
#include "cpu/intrin.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "common.h"

namespace fastllm::cpu {

inline float bf16_to_float(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// AMX: a 32 x 32 block of C in four 16 x 16 fp32 tiles (tmm0 = rows 0-15 x columns 0-15, tmm1 = rows 0-15 x
// columns 16-31, tmm2/tmm3 the same for rows 16-31); per block of 16 pairs of k, the two A tiles (tmm4/5: rows
// 0-15/16-31, 16 rows x 16 pairs, from pack_panels_amx_a) and the two B tiles (tmm6/7: columns 0-15/16-31, 16
// pairs deep x 16 columns, from the 32-wide VNNI panel: row stride 128 bytes) feed four TDPBF16PS, each 16 x 16 x
// 32 bf16 products (8192), 4 x the VDPBF16PS kernel's per-instruction work. The tiles go to a 32 x 32 buffer, then
// the usual epilogue. Every tile is 16 rows x 64 bytes (palette 1).
// AmxTiles runs the instructions; AmxEmu is a plain C++ model of the same tile registers and instructions (Intel
// SDM: TILELOADD, TDPBF16PS, TILESTORED), so the kernel's data movement is tested on every CPU (_C.amx_emulation).
// It does not model the hardware's denormal flushing (DAZ/FTZ), which changes nothing at bf16 tolerances.

struct TileConfig {  // the 64-byte operand of LDTILECFG
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
inline TileConfig amx_tile_config() {
    TileConfig cfg;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    return cfg;
}

// One 32 x 32 block over kb blocks of 16 pairs of k, the result into t (32 x 32 floats). A: 32 rows of pairs, tile
// rows lda bytes apart (64 in a packed panel; the weight matrix's row in bytes when read in place), the next block
// of 16 pairs a_step bytes on; B: a 32-wide VNNI panel (rows of 128 bytes). The int8 form (w8a8) is the same with
// groups of 4 bytes for pairs (a 64-byte tile row: 16 groups), TDPBUSD for TDPBF16PS and int32 sums in t.
#define FASTLLM_AMX_BLOCK(ZERO, LOAD, DP, STORE)                                                       \
    ZERO(0); ZERO(1); ZERO(2); ZERO(3);                                                                \
    for (int64_t b = 0; b < kb; b++, a += a_step, bm += 2048) {                                         \
        LOAD(4, a, lda); LOAD(5, a + 16 * lda, lda); LOAD(6, bm, 128); LOAD(7, bm + 64, 128);           \
        DP(0, 4, 6); DP(1, 4, 7); DP(2, 5, 6); DP(3, 5, 7);                                             \
    }                                                                                                  \
    STORE(0, t, 128); STORE(1, t + 16, 128); STORE(2, t + 512, 128); STORE(3, t + 528, 128)

// The tiles are configured at the start of each blocked GEMM on each thread and released at its end: other code
// in the process (oneDNN inside PyTorch, say) configures tiles its own way or releases them, and a tile
// instruction without our configuration faults.
#ifndef FASTLLM_SIMDE  // SIMDe has no AMX: there AmxTiles is the model (below), and the CPU reports no AMX
struct AmxTiles {
    FASTLLM_TARGET_AMX static void begin() {
        // static: the whole 64 bytes are in memory (the intrinsic's asm declares a read of only 8 of them)
        alignas(64) static const TileConfig cfg = amx_tile_config();
        _tile_loadconfig(&cfg);
    }
    FASTLLM_TARGET_AMX static void end() { _tile_release(); }
    FASTLLM_TARGET_AMX static void block(int64_t kb, const char* a, int64_t lda, int64_t a_step, const char* bm,
                                         float* t) {
        FASTLLM_AMX_BLOCK(_tile_zero, _tile_loadd, _tile_dpbf16ps, _tile_stored);
    }
    // The int8 twin (w8a8): A rows of u8, 16 groups of 4 k per tile row; B a w8a8 panel (32 outputs x groups of 4
    // s8, rows of 128 bytes); TDPBUSD; t 32 x 32 int32 (exact sums).
    FASTLLM_TARGET_AMX_INT8 static void block_i8(int64_t kb, const char* a, int64_t lda, int64_t a_step,
                                                 const char* bm, int32_t* t) {
        FASTLLM_AMX_BLOCK(_tile_zero, _tile_loadd, _tile_dpbusd, _tile_stored);
    }
};
#endif

struct AmxEmu {
    struct Regs {
        TileConfig cfg;
        bool configured = false;  // as after TILERELEASE: a tile instruction faults (#UD)
        alignas(64) uint8_t tmm[8][16][64];
    };
    static Regs& regs() {
        static thread_local Regs r;
        return r;
    }
    static void begin() { regs().cfg = amx_tile_config(), regs().configured = true; }
    static void end() { regs().configured = false; }
    static void check() {
        if (!regs().configured) throw std::logic_error("AMX emulation: a tile instruction without a configuration");
    }
    static void zero(int t) {
        check();
        std::memset(regs().tmm[t], 0, sizeof(regs().tmm[t]));
    }
    static void load(int t, const void* base, int64_t stride) {
        check();
        for (int r = 0; r < regs().cfg.rows[t]; r++)
            std::memcpy(regs().tmm[t][r], static_cast<const char*>(base) + r * stride, regs().cfg.colsb[t]);
    }
    static void store(int t, void* base, int64_t stride) {
        check();
        for (int r = 0; r < regs().cfg.rows[t]; r++)
            std::memcpy(static_cast<char*>(base) + r * stride, regs().tmm[t][r], regs().cfg.colsb[t]);
    }
    static void dp(int c, int a, int b) {  // TDPBF16PS: c[m][n] += sum_k a[m][2k] b[k][2n] + a[m][2k+1] b[k][2n+1]
        check();
        const TileConfig& g = regs().cfg;
        if (g.rows[a] != g.rows[c] || g.colsb[b] != g.colsb[c] || g.rows[b] != g.colsb[a] / 4)
            throw std::logic_error("AMX emulation: tile shapes do not fit TDPBF16PS");  // the hardware's #UD
        for (int m = 0; m < g.rows[c]; m++) {
            float* cm = reinterpret_cast<float*>(regs().tmm[c][m]);
            const uint16_t* am = reinterpret_cast<const uint16_t*>(regs().tmm[a][m]);
            for (int k = 0; k < g.colsb[a] / 4; k++) {
                const uint16_t* bk = reinterpret_cast<const uint16_t*>(regs().tmm[b][k]);
                for (int n = 0; n < g.colsb[c] / 4; n++) {
                    cm[n] += bf16_to_float(am[2 * k]) * bf16_to_float(bk[2 * n]);
                    cm[n] += bf16_to_float(am[2 * k + 1]) * bf16_to_float(bk[2 * n + 1]);
                }
            }
        }
    }
    static void dpbusd(int c, int a, int b) {  // TDPBUSD: c[m][n] += sum_k sum_i u8(a[m][4k+i]) * s8(b[k][4n+i])
        check();
        const TileConfig& g = regs().cfg;
        if (g.rows[a] != g.rows[c] || g.colsb[b] != g.colsb[c] || g.rows[b] != g.colsb[a] / 4)
            throw std::logic_error("AMX emulation: tile shapes do not fit TDPBUSD");
        for (int m = 0; m < g.rows[c]; m++) {
            int32_t* cm = reinterpret_cast<int32_t*>(regs().tmm[c][m]);
            const uint8_t* am = regs().tmm[a][m];
            for (int k = 0; k < g.colsb[a] / 4; k++) {
                const int8_t* bk = reinterpret_cast<const int8_t*>(regs().tmm[b][k]);
                for (int n = 0; n < g.colsb[c] / 4; n++)
                    for (int i = 0; i < 4; i++) cm[n] += int32_t(am[4 * k + i]) * int32_t(bk[4 * n + i]);
            }
        }
    }
    static void block(int64_t kb, const char* a, int64_t lda, int64_t a_step, const char* bm, float* t) {
        FASTLLM_AMX_BLOCK(zero, load, dp, store);
    }
    static void block_i8(int64_t kb, const char* a, int64_t lda, int64_t a_step, const char* bm, int32_t* t) {
        FASTLLM_AMX_BLOCK(zero, load, dpbusd, store);
    }
};
#ifdef FASTLLM_SIMDE
using AmxTiles = AmxEmu;
#endif

}  // namespace fastllm::cpu
