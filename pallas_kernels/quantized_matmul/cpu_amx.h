// AMX tile product of the quantized matmul's bfloat16 pair panel (cpu_kernel.cc, prefill path), for CPUs
// with AMX-BF16 (Intel Sapphire Rapids and later; the build's -march=native defines __AMX_BF16__).
//
// The panel's layout is already AMX's B-operand layout: pair-row q holds, for each of its 64 columns, the
// 32-bit pair (w[2q, c], w[2q + 1, c]), so one B tile (16 pair-rows x 16 columns, 64 bytes a row) is the
// panel at pair-row q0, column 16 v, with a row stride of 64 columns x 4 bytes. An A tile is 16 rows of
// the bfloat16 activations x 32 values of K (64 bytes a row, the row stride K x 2 bytes). TDPBF16PS
// multiplies the pairs exactly and accumulates in float32 (inputs and results flush denormals to zero, as
// vdpbf16ps does), so the numbers differ from the vdpbf16ps path only in the order of the float32 sums.
//
// A register block is 32 rows x 32 columns: C tiles 0-3 (rows 0-15 / 16-31 x columns 0-15 / 16-31), A tiles
// 4-5, B tiles 6-7; each loaded tile is used twice. Row tails are copied into a zero-padded 32-row buffer.
// Linux grants a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); without the
// grant, or with JAXINFER_CPU_AMX=0 in the environment, Enabled() is false and the vdpbf16ps path runs.

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define JAXINFER_HAVE_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace jaxinfer_amx {

constexpr int kRows = 16;       // rows of an A / C tile
constexpr int kBlockRows = 32;  // activation rows per register block
constexpr int kKStep = 32;      // K values per A tile row (16 pairs)

inline bool Enabled() {
  static const bool ok = [] {
    const char* env = std::getenv("JAXINFER_CPU_AMX");
    if (env != nullptr && env[0] == '0') return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight 16 x 64-byte tiles on this thread (released by Release()).
inline void Configure() {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kRows;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

inline void Release() { _tile_release(); }

// y[32][32] (float32, row stride 32) = a[32 rows, K] (bfloat16, row stride lda elements) times the panel's
// 32 columns starting at column vector v0 (pairs: [K/2, panel_cols] uint32). K is a multiple of 32.
inline void Block(const uint16_t* a, int64_t lda, const uint32_t* pairs, int64_t panel_cols, int v0, int64_t k,
                  float* y) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t a_stride = lda * 2, b_stride = panel_cols * 4;
  const uint32_t* b0 = pairs + v0 * 16;
  for (int64_t k0 = 0; k0 < k; k0 += kKStep) {
    _tile_loadd(4, a + k0, a_stride);
    _tile_loadd(5, a + kRows * lda + k0, a_stride);
    const uint32_t* b = b0 + (k0 / 2) * panel_cols;
    _tile_loadd(6, b, b_stride);
    _tile_loadd(7, b + 16, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, y, 32 * 4);
  _tile_stored(1, y + 16, 32 * 4);
  _tile_stored(2, y + kRows * 32, 32 * 4);
  _tile_stored(3, y + kRows * 32 + 16, 32 * 4);
}

}  // namespace jaxinfer_amx

#endif
