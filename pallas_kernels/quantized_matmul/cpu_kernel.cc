// Weight-only quantized matmul for the CPU, as an XLA FFI custom call (see cpu.py, which builds and
// registers it).
//
//   x      [M, K]  float32 or bfloat16
//   value  int8 [K, N] (int8 levels) or int8 [K/2, N] (int4, split-half per group, see packing.py)
//   scale  [G, N]  float32, float16 or bfloat16 (G = K / g; G = 1 for per-channel int8)
//   offset [G, N]  same dtype as scale (asymmetric int4), else a 1-element dummy
//   out    [M, N]  float32 or bfloat16
//   out[m, n] = sum_k x[m, k] * (scale[k / g, n] * q[k, n] (+ offset[k / g, n]))  (int8_activations:
//   x quantized per 32-block first, see below)
//
// Two paths, chosen by M (attribute gemv_max_m):
//  * M <= gemv_max_m (decode): the packed weights are streamed once (a row of K is N contiguous bytes)
//    in chunks of 4 rows across ranges of up to 2048 output columns (long sequential runs: runs of one
//    or a few cache lines per row left the memory at a third of its streaming rate); where that gives
//    too few items for the threads, K is split too, into slices of whole groups whose float32 partial
//    sums are added after the parallel loop. Each 16-byte piece is sign-extended / unpacked to int32 and
//    converted to float32 in registers and multiplied into per-group float32 accumulators for up to 8
//    activation rows at a time (int4 with bfloat16 activations on AVX512-BF16: the two nibbles of a byte
//    become one exact bfloat16 pair by a table lookup, multiplied by vdpbf16ps); at the end of a group
//    the accumulators are scaled (and the asymmetric offset added as offset * sum(x over the group)).
//    Nothing the size of the weight is written anywhere.
//  * larger M (prefill): per block of 64 output columns the weight is dequantized once into a panel
//    (scale * q (+ offset), exactly the reference's float32 dequantization) that stays in the L2 cache,
//    then multiplied with blocks of 6 activation rows (x 64 columns; on AVX2 without AVX-512, x 16 columns,
//    see PanelDotF32). Where there are many blocks (the LM head) a work
//    item takes up to 8 neighbouring blocks and builds their panels in one pass over the packed rows (each
//    row's bytes for all of them read together: one visit of its page instead of one per block). With
//    bfloat16 activations on a CPU with AVX512-BF16 the panel is stored as bfloat16 pairs of adjacent K
//    rows (the reference also rounds the dequantized weight to the activations' dtype) and the product
//    uses vdpbf16ps (float32 accumulation), or AMX tiles (TDPBF16PS, 32 x 32 register blocks,
//    cpu_amx.h) on a CPU with AMX-BF16 when K is a multiple of 32; otherwise it is a float32 panel with
//    float32 FMAs.
//  * int8_activations (attribute), AVX512-VNNI, M > gemv_max_m, K and the group size multiples of 32:
//    instead of the panel above, each row of x is quantized to int8 per block of 32 (once per call) and
//    the column block's weight levels go into a vpdpbusd panel (cpu_vnni.h, which states the numerics),
//    3 activation rows x 64 columns per register block.
// Work items (column blocks, and row blocks for the decode path) are spread over XLA's intra-op
// thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_amx.h"
#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "cpu_vnni.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxinfer_cpu;  // NOLINT: the shared vector types and helpers

constexpr int kNV = 4;       // vectors per column block
constexpr int kNB = kNV * kLanes;  // 64 output columns per block
constexpr int kMB = 8;       // activation rows per decode-path block
constexpr int kPanelMB = 6;  // activation rows per prefill-path block
constexpr int kPrefetchRows = 16;  // packed weight rows fetched ahead while a panel is built

enum class WKind { kI8, kI4S, kI4A };  // int8, signed int4, unsigned int4 (+ offset)
enum class SKind { kF32, kF16, kBf16 };

inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int shift = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++shift;
      }
      u = sign | (static_cast<uint32_t>(113 - shift) << 23) | ((m & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <SKind S>
inline float ScalarScale(const void* base, int64_t i) {
  if constexpr (S == SKind::kF32) return static_cast<const float*>(base)[i];
  if constexpr (S == SKind::kBf16) return Bf16ToF32(static_cast<const uint16_t*>(base)[i]);
  return F16ToF32(static_cast<const uint16_t*>(base)[i]);
}

// 16 scales (or offsets) starting at element i, as float32.
template <SKind S>
inline VF LoadScale(const void* base, int64_t i) {
  if constexpr (S == SKind::kF32) {
    return LoadF(static_cast<const float*>(base) + i);
  } else if constexpr (S == SKind::kBf16) {
    return LoadBf16(static_cast<const uint16_t*>(base) + i);
  } else {
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        static_cast<const uint16_t*>(base) + i)));
    VF v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
#else
    VF v;
    for (int l = 0; l < kLanes; ++l) v[l] = F16ToF32(static_cast<const uint16_t*>(base)[i + l]);
    return v;
#endif
  }
}

struct Problem {
  int64_t m, k, n, g, groups;
  const int8_t* value;
  const void* scale;
  const void* offset;  // asymmetric int4 only
  const float* x;      // float32 [M, K] (a converted copy when the input is bfloat16)
  const uint16_t* xb;  // bfloat16 [M, K] input (prefill bf16 path), else null
  const uint32_t* xpair;  // bfloat16 x pairs [M, K/2] (int4 decode path, bfloat16 x: AccumulatePairs), else null
  const float* xsum;   // [M, groups] sums of x over each group (asymmetric only)
  void* out;
  bool out_bf16;
#if defined(JAXINFER_HAVE_VNNI)
  const vnni::Acts* acts;  // quantized activations: the int8 dot path (cpu_vnni.h), else null
#endif
};

inline void StoreOut(const Problem& p, int64_t row, int64_t col, VF y, int valid) {
  if (p.out_bf16) {
    uint16_t* o = static_cast<uint16_t*>(p.out) + row * p.n + col;
    for (int l = 0; l < valid; ++l) o[l] = F32ToBf16(y[l]);
  } else {
    float* o = static_cast<float*>(p.out) + row * p.n + col;
    if (valid == kLanes) {
      StoreF(o, y);
    } else {
      for (int l = 0; l < valid; ++l) o[l] = y[l];
    }
  }
}

// Level(s) of packed row `r` at column `col`: int8 -> lo; int4 -> lo (first half of the group) and hi.
template <WKind W>
inline void Levels(const int8_t* src, VF* lo, VF* hi) {
  const VI v = LoadI8(src);
  if constexpr (W == WKind::kI8) {
    *lo = ToF(v);
  } else if constexpr (W == WKind::kI4S) {
    *lo = ToF((v << 28) >> 28);
    *hi = ToF(v >> 4);
  } else {
    *lo = ToF(v & 15);
    *hi = ToF((v >> 4) & 15);
  }
}

// Group j's scales of the 16 columns at col, and its offsets (asymmetric int4; zero otherwise).
template <WKind W, SKind S>
inline void GroupScale(const Problem& p, int64_t j, int64_t col, VF* sc, VF* off) {
  *sc = LoadScale<S>(p.scale, j * p.n + col);
  *off = VF{};
  if constexpr (W == WKind::kI4A) *off = LoadScale<S>(p.offset, j * p.n + col);
}

template <WKind W>
inline float ScalarLevel(const Problem& p, int64_t k, int64_t col) {
  if constexpr (W == WKind::kI8) {
    return p.value[k * p.n + col];
  } else {
    const int64_t j = k / p.g, r = k % p.g, h = p.g / 2;
    const int32_t b = p.value[(j * h + (r % h)) * p.n + col];
    const bool high = r >= h;
    if constexpr (W == WKind::kI4S) return static_cast<float>(high ? (b >> 4) : ((b << 28) >> 28));
    return static_cast<float>(high ? ((b >> 4) & 15) : (b & 15));
  }
}

// ---------------------------------------------------------------------------------------------------
// Decode path. An item is rows [m0, m0 + MB), a range of up to kItemCols columns and a range of groups.
// It sweeps the packed weight in chunks of kRowChunk packed rows across the whole column range (runs of
// contiguous bytes, friendly to the prefetcher and the TLB even when a row of N is many pages long),
// keeping the float32 partial sums of the current group and the scaled totals in two small buffers (in
// L1 for up to 2 rows). Groups of at most kRowChunk packed rows are instead swept a few whole groups at a
// time, each group's partial sums staying in registers.
constexpr int kItemCols = 2048;
constexpr int kRowChunk = 4;
constexpr int kGemvPrefetchRows = 16;

#if defined(__AVX512BF16__)
// bfloat16 bits of a small integer (exact: |v| < 256).
constexpr uint16_t SmallIntBf16(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const int a = v < 0 ? -v : v;
  int e = 0;
  while ((a >> (e + 1)) != 0) ++e;
  return static_cast<uint16_t>(sign | ((127 + e) << 7) | ((a << (7 - e)) & 0x7F));
}

// The 16 int4 levels as bfloat16, indexed by the stored nibble (vpermw reads the first 16 words).
template <WKind W>
struct LevelTable {
  static constexpr uint16_t Entry(int i) {
    return i >= 16 ? 0 : SmallIntBf16(W == WKind::kI4S && i >= 8 ? i - 16 : i);
  }
  alignas(64) static constexpr uint16_t kWords[32] = {
      Entry(0),  Entry(1),  Entry(2),  Entry(3),  Entry(4),  Entry(5),  Entry(6),  Entry(7),
      Entry(8),  Entry(9),  Entry(10), Entry(11), Entry(12), Entry(13), Entry(14), Entry(15),
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
};

// AccumulateRows for int4 with bfloat16 x: a packed byte holds the levels of K rows r and g/2 + r of one
// column, so its two nibbles become one bfloat16 pair (a table lookup: exact, the levels are small
// integers) and one vdpbf16ps multiplies the 16 columns' pairs with x's pair (x[k(r)], x[k(r) + g/2], built
// once per call in QuantizedMatmulCpu): both products exact in float32, added to the float32 sums (as the
// float path, in another order). Prefetches past the weight's end are harmless (no fault).
template <WKind W, int MB, int NV>
inline __attribute__((always_inline)) void AccumulatePairs(const Problem& p, int64_t m0, int64_t n0, int64_t j,
                                                           int64_t r0, int64_t r1, VF (&a)[MB][NV]) {
  const int64_t prow = p.g / 2;
  const __m512i table = _mm512_load_si512(LevelTable<W>::kWords);
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  const uint32_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = p.xpair + (m0 + i) * (p.k / 2) + j * prow;
  const int8_t* base = p.value + j * prow * p.n + n0;
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[i][v], &a[i][v], sizeof(VF));
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = base + r * p.n;
    Prefetch(row + kGemvPrefetchRows * p.n);
    __m512bh w[NV];
    for (int v = 0; v < NV; ++v) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + v * kLanes)));
      // 32-bit lane = low nibble | high nibble << 16 (0xA8: C & (A | B))
      const __m512i idx = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), nibbles, 0xA8);
      w[v] = (__m512bh)_mm512_permutexvar_epi16(idx, table);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xr[i][r]));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv, w[v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(&a[i][v], &acc[i][v], sizeof(VF));
}
#endif

// a[i][v] += sum over packed rows r in [r0, r1) of group j of x[m0 + i, k(r)] * level(r, n0 + 16 v + lane)
// (int4: both halves of the group, rows r and g/2 + r of x).
template <WKind W, int MB, int NV>
inline __attribute__((always_inline)) void AccumulateRows(const Problem& p, int64_t m0, int64_t n0, int64_t j,
                                                          int64_t r0, int64_t r1, VF (&a)[MB][NV]) {
  constexpr bool kI4 = W != WKind::kI8;
#if defined(__AVX512BF16__)
  if constexpr (kI4) {
    if (p.xpair != nullptr) return AccumulatePairs<W, MB, NV>(p, m0, n0, j, r0, r1, a);
  }
#endif
  const int64_t prow = kI4 ? p.g / 2 : p.g;
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = p.x + (m0 + i) * p.k + j * p.g;
  const int8_t* base = p.value + j * prow * p.n + n0;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* row = base + r * p.n;
    Prefetch(row + kGemvPrefetchRows * p.n);
    VF lo[NV], hi[NV];
    for (int v = 0; v < NV; ++v) Levels<W>(row + v * kLanes, &lo[v], &hi[v]);
    for (int i = 0; i < MB; ++i) {
      const VF xl = Splat(xr[i][r]);
      for (int v = 0; v < NV; ++v) a[i][v] += xl * lo[v];
      if constexpr (kI4) {
        const VF xh = Splat(xr[i][p.g / 2 + r]);
        for (int v = 0; v < NV; ++v) a[i][v] += xh * hi[v];
      }
    }
  }
}

// Group j's partial sums a[i] (the 16 columns at col) scaled into y[i * kItemCols + lane]; the
// asymmetric offset adds offset * sum(x over the group).
template <WKind W, SKind S, int MB>
inline __attribute__((always_inline)) void AddGroup(const Problem& p, int64_t m0, int64_t j, int64_t col,
                                                    const VF (&a)[MB], float* y) {
  VF sc, off;
  GroupScale<W, S>(p, j, col, &sc, &off);
  for (int i = 0; i < MB; ++i) {
    float* yp = y + i * kItemCols;
    VF t = LoadF(yp) + a[i] * sc;
    if constexpr (W == WKind::kI4A) t += off * p.xsum[(m0 + i) * p.groups + j];
    StoreF(yp, t);
  }
}

// Packed rows [r0, r1) of group j into acc[MB][kItemCols] for the NV vectors at column n0 (acc points
// at that column block's first lane; rows of acc are kItemCols apart).
template <WKind W, int MB, int NV>
inline void GemvChunk(const Problem& p, int64_t m0, int64_t n0, int64_t j, int64_t r0, int64_t r1, float* acc) {
  VF a[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = LoadF(acc + i * kItemCols + v * kLanes);
  AccumulateRows<W, MB, NV>(p, m0, n0, j, r0, r1, a);
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) StoreF(acc + i * kItemCols + v * kLanes, a[i][v]);
}

// Whole groups [j0, j1) for the NV vectors at column n0, scaled into y (y points at that column
// block's first lane; rows of y are kItemCols apart).
template <WKind W, SKind S, int MB, int NV>
inline void GemvGroups(const Problem& p, int64_t m0, int64_t n0, int64_t j0, int64_t j1, float* y) {
  const int64_t prow = W != WKind::kI8 ? p.g / 2 : p.g;
  for (int64_t j = j0; j < j1; ++j) {
    VF a[MB][NV];
    for (int i = 0; i < MB; ++i)
      for (int v = 0; v < NV; ++v) a[i][v] = VF{};
    AccumulateRows<W, MB, NV>(p, m0, n0, j, 0, prow, a);
    for (int v = 0; v < NV; ++v) {
      VF av[MB];
      for (int i = 0; i < MB; ++i) av[i] = a[i][v];
      AddGroup<W, S, MB>(p, m0, j, n0 + v * kLanes, av, y + v * kLanes);
    }
  }
}

// Where a decode item's results go: out (part == nullptr), or the float32 partial sums [M, N] of its
// slice of K (several slices are added up after the parallel loop).
inline void StoreGemv(const Problem& p, float* part, int64_t row, int64_t col, VF y, int valid) {
  if (part == nullptr) return StoreOut(p, row, col, y, valid);
  float* o = part + row * p.n + col;
  if (valid == kLanes) {
    StoreF(o, y);
  } else {
    for (int l = 0; l < valid; ++l) o[l] = y[l];
  }
}

// Columns [n0, n1) (fewer than 16) for rows [m0, m1), groups [j0, j1), scalar.
template <WKind W, SKind S>
void ScalarColumns(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t j0, int64_t j1,
                   float* part) {
  for (int64_t m = m0; m < m1; ++m) {
    VF y = VF{};
    for (int64_t c = n0; c < n1; ++c) {
      float acc = 0.0f;
      for (int64_t j = j0; j < j1; ++j) {
        float part = 0.0f;
        for (int64_t k = j * p.g; k < (j + 1) * p.g; ++k) part += p.x[m * p.k + k] * ScalarLevel<W>(p, k, c);
        acc += part * ScalarScale<S>(p.scale, j * p.n + c);
        if constexpr (W == WKind::kI4A) acc += ScalarScale<S>(p.offset, j * p.n + c) * p.xsum[m * p.groups + j];
      }
      y[c - n0] = acc;
    }
    StoreGemv(p, part, m, n0, y, static_cast<int>(n1 - n0));
  }
}

// Rows [m0, m0 + MB), columns [n0, n1) (whole vectors), groups [jb, je).
template <WKind W, SKind S, int MB>
void GemvRows(const Problem& p, int64_t m0, int64_t n0, int64_t n1, int64_t jb, int64_t je, float* part) {
  constexpr bool kI4 = W != WKind::kI8;
  // Vectors per register block: MB x NV accumulators plus the levels stay within the 32 vector registers.
  constexpr int NV = MB <= 4 ? kNV : 2;
  constexpr int kBlockCols = NV * kLanes;
  const int64_t prow = kI4 ? p.g / 2 : p.g;
  const int64_t nvec = (n1 - n0) / kLanes;  // whole vectors; the rest is ScalarColumns' job
  const int64_t nfull = nvec / NV;          // whole blocks of NV vectors
  alignas(64) float acc[MB * kItemCols];
  alignas(64) float y[MB * kItemCols];
  // rows of acc and y are kItemCols apart; only the item's nvec vectors of each are used
  const auto zero_rows = [nvec](float* buf) {
    for (int i = 0; i < MB; ++i) std::memset(buf + i * kItemCols, 0, sizeof(float) * nvec * kLanes);
  };
  zero_rows(y);
  if (prow <= kRowChunk) {
    const int64_t per = std::max<int64_t>(kRowChunk / prow, 1);
    for (int64_t j0 = jb; j0 < je; j0 += per) {
      const int64_t j1 = std::min<int64_t>(j0 + per, je);
      for (int64_t b = 0; b < nfull; ++b)
        GemvGroups<W, S, MB, NV>(p, m0, n0 + b * kBlockCols, j0, j1, y + b * kBlockCols);
      for (int64_t v = nfull * NV; v < nvec; ++v)
        GemvGroups<W, S, MB, 1>(p, m0, n0 + v * kLanes, j0, j1, y + v * kLanes);
    }
  }
  for (int64_t j = jb; j < je && prow > kRowChunk; ++j) {
    zero_rows(acc);
    for (int64_t r0 = 0; r0 < prow; r0 += kRowChunk) {
      const int64_t r1 = std::min<int64_t>(r0 + kRowChunk, prow);
      for (int64_t b = 0; b < nfull; ++b)
        GemvChunk<W, MB, NV>(p, m0, n0 + b * kBlockCols, j, r0, r1, acc + b * kBlockCols);
      for (int64_t v = nfull * NV; v < nvec; ++v)
        GemvChunk<W, MB, 1>(p, m0, n0 + v * kLanes, j, r0, r1, acc + v * kLanes);
    }
    for (int64_t v = 0; v < nvec; ++v) {
      VF av[MB];
      for (int i = 0; i < MB; ++i) av[i] = LoadF(acc + i * kItemCols + v * kLanes);
      AddGroup<W, S, MB>(p, m0, j, n0 + v * kLanes, av, y + v * kLanes);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int64_t v = 0; v < nvec; ++v)
      StoreGemv(p, part, m0 + i, n0 + v * kLanes, LoadF(y + i * kItemCols + v * kLanes), kLanes);
}

// One decode item: rows [m0, m1) (at most kMB), columns [n0, n1) (at most kItemCols), groups [j0, j1).
template <WKind W, SKind S>
void GemvItem(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t j0, int64_t j1,
              float* part) {
  const int64_t nv_end = n0 + (n1 - n0) / kLanes * kLanes;
  if (nv_end > n0) {
    switch (m1 - m0) {
      case 1: GemvRows<W, S, 1>(p, m0, n0, nv_end, j0, j1, part); break;
      case 2: GemvRows<W, S, 2>(p, m0, n0, nv_end, j0, j1, part); break;
      case 3: GemvRows<W, S, 3>(p, m0, n0, nv_end, j0, j1, part); break;
      case 4: GemvRows<W, S, 4>(p, m0, n0, nv_end, j0, j1, part); break;
      case 5: GemvRows<W, S, 5>(p, m0, n0, nv_end, j0, j1, part); break;
      case 6: GemvRows<W, S, 6>(p, m0, n0, nv_end, j0, j1, part); break;
      case 7: GemvRows<W, S, 7>(p, m0, n0, nv_end, j0, j1, part); break;
      default: GemvRows<W, S, 8>(p, m0, n0, nv_end, j0, j1, part); break;
    }
  }
  if (nv_end < n1) ScalarColumns<W, S>(p, m0, m1, nv_end, n1, j0, j1, part);
}

// ---------------------------------------------------------------------------------------------------
// Prefill path. The panel holds the dequantized weight of one column block: float32 [K, 64], or
// bfloat16 pairs [K/2, 64] (32-bit lane c of pair-row q = w[2q, c] | w[2q + 1, c] << 16).

// Dequantized float32 weights of K row k for the 16 columns starting at c (lanes past N are zero).
template <WKind W, SKind S>
inline void DequantGroupRows(const Problem& p, int64_t j, int64_t c, int valid, float* dst, int64_t ld) {
  // Writes rows k = j*g .. (j+1)*g - 1 of column lanes [c, c + 16) to dst[(k - j*g) * ld + lane].
  constexpr bool kI4 = W != WKind::kI8;
  const int64_t prow = kI4 ? p.g / 2 : p.g;
  if (valid == kLanes) {
    VF sc, off;
    GroupScale<W, S>(p, j, c, &sc, &off);
    for (int64_t r = 0; r < prow; ++r) {
      VF lo, hi;
      Levels<W>(p.value + (j * prow + r) * p.n + c, &lo, &hi);
      StoreF(dst + r * ld, sc * lo + off);
      if constexpr (kI4) StoreF(dst + (r + p.g / 2) * ld, sc * hi + off);
    }
    return;
  }
  for (int64_t r = 0; r < p.g; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      float w = 0.0f;
      if (l < valid) {
        w = ScalarScale<S>(p.scale, j * p.n + c + l) * ScalarLevel<W>(p, j * p.g + r, c + l);
        if constexpr (W == WKind::kI4A) w += ScalarScale<S>(p.offset, j * p.n + c + l);
      }
      dst[r * ld + l] = w;
    }
  }
}

// Walks nblk whole column blocks from n0 (n0 + 64 nblk <= N, nblk <= kMaxPanelBlocks) of the packed weight
// row by row, kStep packed rows at a time: each packed row's 64 nblk contiguous bytes consumed at once (one
// visit of its page for all the blocks), the rows kPrefetchRows ahead fetched meanwhile (rows N bytes
// apart, e.g. the LM head's 49152, fall into few cache sets and defeat the hardware prefetcher). Calls
// fn(b, j, r, sc, off) for block b, packed rows r .. r + kStep - 1 of group j, with the group's scales and
// offsets of that block's kNV vectors.
constexpr int kMaxPanelBlocks = 8;

template <WKind W, SKind S, int kStep, typename Fn>
inline void WalkBlockRows(const Problem& p, int64_t n0, int nblk, Fn fn) {
  const int64_t prow = W != WKind::kI8 ? p.g / 2 : p.g, rows = p.groups * prow;
  for (int64_t j = 0; j < p.groups; ++j) {
    VF sc[kMaxPanelBlocks * kNV], off[kMaxPanelBlocks * kNV];
    for (int v = 0; v < nblk * kNV; ++v) GroupScale<W, S>(p, j, n0 + v * kLanes, &sc[v], &off[v]);
    for (int64_t r = 0; r < prow; r += kStep) {
      const int64_t row = j * prow + r;
      for (int i = 0; i < kStep; ++i) {
        if (row + kPrefetchRows + i >= rows) continue;
        for (int b = 0; b < nblk; ++b) Prefetch(p.value + (row + kPrefetchRows + i) * p.n + n0 + b * kNB);
      }
      for (int b = 0; b < nblk; ++b) fn(b, j, r, sc + b * kNV, off + b * kNV);
    }
  }
}

// Float32 panel [K, 64] of a whole column block at n0 (n0 + 64 <= N).
template <WKind W, SKind S>
void BuildPanelF32Full(const Problem& p, int64_t n0, float* panel) {
  constexpr bool kI4 = W != WKind::kI8;
  const int64_t prow = kI4 ? p.g / 2 : p.g;
  WalkBlockRows<W, S, 1>(p, n0, 1, [&](int, int64_t j, int64_t r, const VF* sc, const VF* off) {
    float* dst = panel + j * p.g * kNB;
    for (int v = 0; v < kNV; ++v) {
      VF lo, hi;
      Levels<W>(p.value + (j * prow + r) * p.n + n0 + v * kLanes, &lo, &hi);
      StoreF(dst + r * kNB + v * kLanes, sc[v] * lo + off[v]);
      if constexpr (kI4) StoreF(dst + (r + p.g / 2) * kNB + v * kLanes, sc[v] * hi + off[v]);
    }
  });
}

// Float32 panel [K, 64] of the column block at n0.
template <WKind W, SKind S>
void BuildPanelF32(const Problem& p, int64_t n0, float* panel) {
  if (n0 + kNB <= p.n) return BuildPanelF32Full<W, S>(p, n0, panel);
  for (int v = 0; v < kNV; ++v) {
    const int64_t c = n0 + v * kLanes;
    const int valid = static_cast<int>(std::clamp<int64_t>(p.n - c, 0, kLanes));
    for (int64_t j = 0; j < p.groups; ++j) {
      DequantGroupRows<W, S>(p, j, c, valid, panel + j * p.g * kNB + v * kLanes, kNB);
    }
  }
}

#if defined(JAXINFER_AVX2_ONLY)
// AVX2 (16 ymm registers): the generic loop below keeps MB x 64 columns of accumulators, 2 MB x kNV = 48
// ymm registers at MB = 6, and spilled them on every FMA (the panel path ran at 5-11 GFLOP/s on a 2-core
// Zen 3). Here one 16-column vector (2 ymm) at a time: 2 MB accumulators + 2 weights + 1 broadcast <= 15
// registers. Same products, each (row, column) summed over K in the same order.
template <int MB>
void PanelDotF32(const Problem& p, const float* panel, int64_t m0, int64_t n0) {
  for (int v = 0; v < kNV; ++v) {
    const int64_t c = n0 + v * kLanes;
    const int valid = static_cast<int>(std::clamp<int64_t>(p.n - c, 0, kLanes));
    if (valid <= 0) break;
    __m256 lo[MB], hi[MB];
    for (int i = 0; i < MB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    const float* w = panel + v * kLanes;
    const float* x = p.x + m0 * p.k;
    for (int64_t k = 0; k < p.k; ++k) {
      const __m256 w0 = _mm256_loadu_ps(w + k * kNB), w1 = _mm256_loadu_ps(w + k * kNB + 8);
      for (int i = 0; i < MB; ++i) {
        const __m256 xv = _mm256_broadcast_ss(x + i * p.k + k);
        lo[i] = _mm256_fmadd_ps(xv, w0, lo[i]);
        hi[i] = _mm256_fmadd_ps(xv, w1, hi[i]);
      }
    }
    alignas(64) float y[MB][kLanes];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      _mm256_store_ps(y[i], lo[i]);
      _mm256_store_ps(y[i] + 8, hi[i]);
    }
    for (int i = 0; i < MB; ++i) StoreOut(p, m0 + i, c, LoadF(y[i]), valid);
  }
}
#else
template <int MB>
void PanelDotF32(const Problem& p, const float* panel, int64_t m0, int64_t n0) {
  VF acc[MB][kNV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v] = VF{};
  for (int64_t k = 0; k < p.k; ++k) {
    VF w[kNV];
    for (int v = 0; v < kNV; ++v) w[v] = LoadF(panel + k * kNB + v * kLanes);
    for (int i = 0; i < MB; ++i) {
      const VF xv = Splat(p.x[(m0 + i) * p.k + k]);
      for (int v = 0; v < kNV; ++v) acc[i][v] += xv * w[v];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < kNV; ++v) {
      const int64_t c = n0 + v * kLanes;
      const int valid = static_cast<int>(std::clamp<int64_t>(p.n - c, 0, kLanes));
      if (valid > 0) StoreOut(p, m0 + i, c, acc[i][v], valid);
    }
}
#endif

#if defined(__AVX512BF16__)
constexpr bool kHaveBf16Dot = true;

// bfloat16 pairs of two float32 vectors (K rows 2q and 2q + 1): 32-bit lane c = bf16(a[c]) | bf16(b[c]) << 16,
// rounded to nearest even by vcvtne2ps2bf16. That instruction flushes float32 denormals to zero, as the
// dot products that read the panel (vdpbf16ps, TDPBF16PS) do with bfloat16 denormals anyway, so the
// products equal those of a software rounding that keeps them.
inline VU PackPair(VF a, VF b) {
  __m512 fa, fb;
  std::memcpy(&fa, &a, sizeof(fa));
  std::memcpy(&fb, &b, sizeof(fb));
  // words 0-15: a, words 16-31: b; then interleaved so that word 2c = a[c], word 2c + 1 = b[c]
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(fb, fa);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i r = _mm512_permutexvar_epi16(idx, both);
  VU out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// bfloat16 pair panel [K/2, 64] from a float32 panel (weights are finite).
void PairPanel(const float* f32, int64_t k, uint32_t* pairs) {
  for (int64_t q = 0; q < k / 2; ++q) {
    for (int v = 0; v < kNV; ++v) {
      const VU pair = PackPair(LoadF(f32 + (2 * q) * kNB + v * kLanes), LoadF(f32 + (2 * q + 1) * kNB + v * kLanes));
      std::memcpy(pairs + q * kNB + v * kLanes, &pair, sizeof(pair));
    }
  }
}

// bfloat16 pair panels [K/2, 64] of nblk whole column blocks from n0 (n0 + 64 nblk <= N; block b's panel at
// pairs + b K/2 64) straight from the packed weight: the same numbers as BuildPanelF32 then PairPanel (each
// weight scale * level (+ offset) in float32, then rounded), without the float32 panel in between; two
// packed rows at a time.
template <WKind W, SKind S>
void BuildPairPanelFull(const Problem& p, int64_t n0, int nblk, uint32_t* pairs) {
  constexpr bool kI4 = W != WKind::kI8;
  const int64_t prow = kI4 ? p.g / 2 : p.g;
  WalkBlockRows<W, S, 2>(p, n0, nblk, [&](int b, int64_t j, int64_t r, const VF* sc, const VF* off) {
    const int8_t* row = p.value + (j * prow + r) * p.n + n0 + b * kNB;
    uint32_t* panel = pairs + b * (p.k / 2) * kNB;
    // K rows j*g + r, r + 1 (int4: the low nibbles; the high ones are K rows j*g + g/2 + r, r + 1)
    uint32_t* lo_dst = panel + ((j * p.g + r) / 2) * kNB;
    uint32_t* hi_dst = panel + ((j * p.g + p.g / 2 + r) / 2) * kNB;
    for (int v = 0; v < kNV; ++v) {
      VF lo0, hi0, lo1, hi1;
      Levels<W>(row + v * kLanes, &lo0, &hi0);
      Levels<W>(row + p.n + v * kLanes, &lo1, &hi1);
      const VU a = PackPair(sc[v] * lo0 + off[v], sc[v] * lo1 + off[v]);
      std::memcpy(lo_dst + v * kLanes, &a, sizeof(a));
      if constexpr (kI4) {
        const VU b = PackPair(sc[v] * hi0 + off[v], sc[v] * hi1 + off[v]);
        std::memcpy(hi_dst + v * kLanes, &b, sizeof(b));
      }
    }
  });
}

template <int MB>
void PanelDotBf16(const Problem& p, const uint32_t* pairs, int64_t m0, int64_t n0) {
  __m512 acc[MB][kNV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t kp = p.k / 2;
  for (int64_t q = 0; q < kp; ++q) {
    __m512bh w[kNV];
    for (int v = 0; v < kNV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(pairs + q * kNB + v * kLanes);
    for (int i = 0; i < MB; ++i) {
      int32_t xx;
      std::memcpy(&xx, p.xb + (m0 + i) * p.k + 2 * q, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xx);
      for (int v = 0; v < kNV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv, w[v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < kNV; ++v) {
      const int64_t c = n0 + v * kLanes;
      const int valid = static_cast<int>(std::clamp<int64_t>(p.n - c, 0, kLanes));
      VF y;
      std::memcpy(&y, &acc[i][v], sizeof(y));
      if (valid > 0) StoreOut(p, m0 + i, c, y, valid);
    }
}
#else
constexpr bool kHaveBf16Dot = false;
#endif

#if defined(JAXINFER_HAVE_AMX)
// Rows [m0, m1) of nblk neighbouring column blocks from n0 with AMX tiles (cpu_amx.h); K a multiple of 32.
// Block b's pair panel is at pairs + b * panel. Rows go outermost: a 32-row block of x (32 x K bfloat16)
// is read into the L1 cache once and used for every column block, where a block-outer order streamed all
// of the item's rows from L2 again for each block (about 1.3x slower tile products in a probe).
void AmxRows(const Problem& p, const uint32_t* pairs, int64_t panel, int nblk, int64_t m0, int64_t m1,
             int64_t n0) {
  namespace amx = jaxinfer_amx;
  thread_local std::vector<uint16_t> pad;
  alignas(64) float y[amx::kBlockRows * 32];
  amx::Configure();
  for (int64_t m = m0; m < m1; m += amx::kBlockRows) {
    const int64_t rows = std::min<int64_t>(amx::kBlockRows, m1 - m);
    const uint16_t* a = p.xb + m * p.k;
    if (rows < amx::kBlockRows) {  // a row tail: zero rows below it, so the tiles never read past x
      pad.assign(static_cast<size_t>(amx::kBlockRows * p.k), 0);
      std::memcpy(pad.data(), a, static_cast<size_t>(rows * p.k) * sizeof(uint16_t));
      a = pad.data();
    }
    for (int b = 0; b < nblk; ++b) {
      const int64_t nb = n0 + b * kNB;
      const int nvec = static_cast<int>(std::min<int64_t>((p.n - nb + kLanes - 1) / kLanes, kNV));
      for (int v0 = 0; v0 < nvec; v0 += 2) {
        amx::Block(a, p.k, pairs + b * panel, kNB, v0, p.k, y);
        for (int64_t i = 0; i < rows; ++i)
          for (int v = v0; v < std::min(v0 + 2, nvec); ++v) {
            const int64_t c = nb + v * kLanes;
            StoreOut(p, m + i, c, LoadF(y + i * 32 + (v - v0) * kLanes),
                     static_cast<int>(std::min<int64_t>(p.n - c, kLanes)));
          }
      }
    }
  }
  amx::Release();
}
#endif

template <int MB>
void PanelRows(const Problem& p, const void* panel, bool bf16, int64_t m0, int64_t n0) {
#if defined(__AVX512BF16__)
  if (bf16) return PanelDotBf16<MB>(p, static_cast<const uint32_t*>(panel), m0, n0);
#endif
  (void)bf16;
  PanelDotF32<MB>(p, static_cast<const float*>(panel), m0, n0);
}

// A row tail of r < kPanelMB rows in one register block (MB counts down to the one that matches): one row
// at a time left its few accumulators waiting on the FMA latency, and read the panel once per row.
template <int MB>
void PanelTail(const Problem& p, const void* panel, bool bf16, int64_t m, int64_t r, int64_t n0) {
  if constexpr (MB > 0) {
    if (r == MB) return PanelRows<MB>(p, panel, bf16, m, n0);
    PanelTail<MB - 1>(p, panel, bf16, m, r, n0);
  }
}

// Rows [m0, m1) of the column block at n0 times its panel.
inline void PanelRowRange(const Problem& p, const void* panel, bool bf16, int64_t m0, int64_t m1, int64_t n0) {
  int64_t m = m0;
  for (; m + kPanelMB <= m1; m += kPanelMB) PanelRows<kPanelMB>(p, panel, bf16, m, n0);
  PanelTail<kPanelMB - 1>(p, panel, bf16, m, m1 - m, n0);
}

#if defined(JAXINFER_HAVE_VNNI)
constexpr int kVnniMB = 3;  // activation rows per int8 register block
constexpr int kVnniNV = 4;  // 16-column vectors per int8 register block

template <bool kPerChannel, bool kAsym, int MB>
void VnniRows(const Problem& p, const uint8_t* panel, const float* ws, const float* wo, int64_t m0, int64_t n0) {
  alignas(64) float y[MB * vnni::kCols];
  const int nvec = static_cast<int>(std::min<int64_t>((p.n - n0 + kLanes - 1) / kLanes, kNV));
  for (int vb = 0; vb < nvec; vb += kVnniNV)
    vnni::Dot<kPerChannel, kAsym, MB, kVnniNV>(*p.acts, panel, ws, wo, p.g / vnni::kBlock, m0, vb, y);
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < nvec; ++v) {
      const int64_t c = n0 + v * kLanes;
      StoreOut(p, m0 + i, c, LoadF(y + i * vnni::kCols + v * kLanes), static_cast<int>(std::min<int64_t>(p.n - c, kLanes)));
    }
}

// A row tail of r < kVnniMB rows (MB counts down to the one that matches).
template <bool kPerChannel, bool kAsym, int MB>
void VnniTail(const Problem& p, const uint8_t* panel, const float* ws, const float* wo, int64_t m, int64_t r,
              int64_t n0) {
  if constexpr (MB > 0) {
    if (r == MB) return VnniRows<kPerChannel, kAsym, MB>(p, panel, ws, wo, m, n0);
    VnniTail<kPerChannel, kAsym, MB - 1>(p, panel, ws, wo, m, r, n0);
  }
}

template <bool kPerChannel, bool kAsym>
void VnniBlock(const Problem& p, const uint8_t* panel, const float* ws, const float* wo, int64_t m0, int64_t m1,
               int64_t n0) {
  int64_t m = m0;
  for (; m + kVnniMB <= m1; m += kVnniMB) VnniRows<kPerChannel, kAsym, kVnniMB>(p, panel, ws, wo, m, n0);
  VnniTail<kPerChannel, kAsym, kVnniMB - 1>(p, panel, ws, wo, m, m1 - m, n0);
}

// One int8-path item: the column block at n0 as a vpdpbusd panel with float32 scales (and offsets),
// rows [m0, m1).
template <WKind W, SKind S>
void VnniPanelItem(const Problem& p, int64_t m0, int64_t m1, int64_t n0) {
  constexpr bool kI4 = W != WKind::kI8, kAsym = W == WKind::kI4A;
  thread_local std::vector<uint8_t> panel;
  thread_local std::vector<float> ws, wo;
  panel.resize(static_cast<size_t>(p.k * vnni::kCols));
  ws.resize(static_cast<size_t>(p.groups * vnni::kCols));
  wo.resize(kAsym ? ws.size() : 0);
  vnni::BuildPanel<kI4, kAsym>(p.value, p.k, p.n, p.g, n0, panel.data());
  for (int64_t j = 0; j < p.groups; ++j)
    for (int v = 0; v < kNV; ++v) {
      const int64_t c = n0 + v * kLanes;
      float* dst = ws.data() + j * vnni::kCols + v * kLanes;
      float* odst = kAsym ? wo.data() + j * vnni::kCols + v * kLanes : nullptr;
      if (p.n - c >= kLanes) {
        VF sc, off;
        GroupScale<W, S>(p, j, c, &sc, &off);
        StoreF(dst, sc);
        if (kAsym) StoreF(odst, off);
        continue;
      }
      for (int l = 0; l < kLanes; ++l) {
        const bool in = c + l < p.n;
        dst[l] = in ? ScalarScale<S>(p.scale, j * p.n + c + l) : 0.0f;
        if (kAsym) odst[l] = in ? ScalarScale<S>(p.offset, j * p.n + c + l) : 0.0f;
      }
    }
  if (W == WKind::kI8 && p.groups == 1) {
    VnniBlock<true, false>(p, panel.data(), ws.data(), nullptr, m0, m1, n0);
  } else {
    VnniBlock<false, kAsym>(p, panel.data(), ws.data(), wo.data(), m0, m1, n0);
  }
}
#endif

// Rows [m0, m1) of the column block at n0 (a block's tail, an odd group size, no bfloat16 dot): a float32
// panel, then (bfloat16 activations) its pairs.
template <WKind W, SKind S>
void PanelBlock(const Problem& p, int64_t m0, int64_t m1, int64_t n0) {
  thread_local std::vector<float> f32;
  thread_local std::vector<uint32_t> pairs;
  const bool bf16 = kHaveBf16Dot && p.xb != nullptr;
  f32.resize(static_cast<size_t>(p.k * kNB));
  BuildPanelF32<W, S>(p, n0, f32.data());
  const void* panel = f32.data();
#if defined(__AVX512BF16__)
  if (bf16) {
    pairs.resize(static_cast<size_t>(p.k / 2 * kNB));
    PairPanel(f32.data(), p.k, pairs.data());
    panel = pairs.data();
#if defined(JAXINFER_HAVE_AMX)
    if (p.k % jaxinfer_amx::kKStep == 0 && jaxinfer_amx::Enabled()) return AmxRows(p, pairs.data(), 0, 1, m0, m1, n0);
#endif
  }
#endif
  PanelRowRange(p, panel, bf16, m0, m1, n0);
}

#if defined(__AVX512BF16__)
// Rows [m0, m1) of nblk column blocks from n0 times their bfloat16 pair panels (block b's at pairs + b * panel).
inline void PairPanelRows(const Problem& p, const uint32_t* pairs, int64_t panel, int nblk, int64_t m0, int64_t m1,
                          int64_t n0) {
#if defined(JAXINFER_HAVE_AMX)
  if (p.k % jaxinfer_amx::kKStep == 0 && jaxinfer_amx::Enabled()) return AmxRows(p, pairs, panel, nblk, m0, m1, n0);
#endif
  for (int b = 0; b < nblk; ++b) PanelRowRange(p, pairs + b * panel, true, m0, m1, n0 + b * kNB);
}
#endif

// One prefill item: rows [m0, m1), the column blocks from n0 to n1 (at most kMaxPanelBlocks).
template <WKind W, SKind S>
void PanelItem(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(JAXINFER_HAVE_VNNI)
  if (p.acts != nullptr) {
    for (int64_t nb = n0; nb < n1; nb += kNB) VnniPanelItem<W, S>(p, m0, m1, nb);
    return;
  }
#endif
#if defined(__AVX512BF16__)
  thread_local std::vector<uint32_t> pairs;
  const bool bf16 = p.xb != nullptr;
  // whole blocks, pairs of rows within each group (an even group size): the pair panels directly, the
  // packed rows of all the item's whole blocks read in one pass
  if (bf16 && p.g % 2 == 0 && (W == WKind::kI8 || (p.g / 2) % 2 == 0)) {
    const int nfull = static_cast<int>((std::min(n1, p.n) - n0) / kNB);
    if (nfull > 0) {
      const int64_t panel = p.k / 2 * kNB;
      pairs.resize(static_cast<size_t>(nfull * panel));
      BuildPairPanelFull<W, S>(p, n0, nfull, pairs.data());
      PairPanelRows(p, pairs.data(), panel, nfull, m0, m1, n0);
      n0 += nfull * kNB;
    }
  }
#endif
  for (; n0 < n1; n0 += kNB) PanelBlock<W, S>(p, m0, m1, n0);
}

// ---------------------------------------------------------------------------------------------------
struct Item {
  int64_t m0, m1, n0, n1;
  int64_t j0 = 0, j1 = 0;  // decode path: groups of K
  float* part = nullptr;   // decode path: float32 partial sums of this slice of K, or nullptr (out)
};

template <WKind W, SKind S>
void RunItem(const Problem& p, const Item& it, bool gemv) {
  if (gemv) {
    GemvItem<W, S>(p, it.m0, it.m1, it.n0, it.n1, it.j0, it.j1, it.part);
  } else {
    PanelItem<W, S>(p, it.m0, it.m1, it.n0, it.n1);
  }
}

template <WKind W>
void RunItemS(const Problem& p, const Item& it, bool gemv, SKind s) {
  switch (s) {
    case SKind::kF32: return RunItem<W, SKind::kF32>(p, it, gemv);
    case SKind::kF16: return RunItem<W, SKind::kF16>(p, it, gemv);
    case SKind::kBf16: return RunItem<W, SKind::kBf16>(p, it, gemv);
  }
}

void RunItemAny(const Problem& p, const Item& it, bool gemv, WKind w, SKind s) {
  switch (w) {
    case WKind::kI8: return RunItemS<WKind::kI8>(p, it, gemv, s);
    case WKind::kI4S: return RunItemS<WKind::kI4S>(p, it, gemv, s);
    case WKind::kI4A: return RunItemS<WKind::kI4A>(p, it, gemv, s);
  }
}

ffi::Error QuantizedMatmulCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> value,
                              ffi::AnyBuffer scale, ffi::AnyBuffer offset, ffi::Result<ffi::AnyBuffer> out,
                              int64_t group_size, int64_t int4, int64_t asymmetric, int64_t gemv_max_m,
                              int64_t parallel_min_bytes, int64_t int8_activations) {
  auto xd = x.dimensions();
  auto vd = value.dimensions();
  auto sd = scale.dimensions();
  if (xd.size() != 2 || vd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("expected x [M, K], value [K or K/2, N], scale [G, N]");
  }
  Problem p{};
  p.m = xd[0];
  p.k = xd[1];
  p.n = vd[1];
  p.g = group_size > 0 ? group_size : p.k;
  if (p.k <= 0 || p.n <= 0 || p.g <= 0 || p.k % p.g != 0 || (int4 && p.g % 2 != 0)) {
    return ffi::Error::InvalidArgument("K must be a positive multiple of the (even, for int4) group size");
  }
  p.groups = p.k / p.g;
  if (vd[0] != (int4 ? p.k / 2 : p.k) || sd[0] != p.groups || sd[1] != p.n) {
    return ffi::Error::InvalidArgument("value / scale shapes do not match x and the group size");
  }
  SKind s;
  switch (scale.element_type()) {
    case ffi::F32: s = SKind::kF32; break;
    case ffi::F16: s = SKind::kF16; break;
    case ffi::BF16: s = SKind::kBf16; break;
    default: return ffi::Error::InvalidArgument("scale must be float32, float16 or bfloat16");
  }
  const WKind w = !int4 ? WKind::kI8 : (asymmetric ? WKind::kI4A : WKind::kI4S);
  if (w == WKind::kI4A && (offset.element_type() != scale.element_type() ||
                           offset.element_count() != scale.element_count())) {
    return ffi::Error::InvalidArgument("offset must match scale");
  }
  if (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16) {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
  if ((out->element_type() != ffi::F32 && out->element_type() != ffi::BF16) ||
      out->element_count() != static_cast<size_t>(p.m * p.n)) {
    return ffi::Error::InvalidArgument("out must be float32 or bfloat16 [M, N]");
  }
  if (p.m == 0) return ffi::Error::Success();
  p.value = value.typed_data();
  p.scale = scale.untyped_data();
  p.offset = w == WKind::kI4A ? offset.untyped_data() : nullptr;
  p.out = out->untyped_data();
  p.out_bf16 = out->element_type() == ffi::BF16;

  const bool gemv = p.m <= gemv_max_m;
  const bool x_bf16 = x.element_type() == ffi::BF16;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t weight_bytes = vd[0] * vd[1];
  // Small products run on the calling thread alone: waking pool threads costs more than they save.
  const int64_t helpers = weight_bytes * std::max<int64_t>(p.m, 1) < parallel_min_bytes ? 0 : threads - 1;
#if defined(JAXINFER_HAVE_VNNI)
  // The int8 dot path (cpu_vnni.h): asked for, panel path, K and the weight groups in whole 32-blocks.
  vnni::Acts acts;
  std::vector<int8_t> xq;
  std::vector<float> xscale, xdsum;
  std::vector<int32_t> xcorr;
  p.acts = nullptr;
  if (int8_activations && !gemv && p.k % vnni::kBlock == 0 && p.g % vnni::kBlock == 0) {
    acts.k = p.k;
    acts.kb = p.k / vnni::kBlock;
    xq.resize(static_cast<size_t>(p.m * p.k));
    xscale.resize(static_cast<size_t>(p.m * acts.kb));
    xcorr.resize(xscale.size());
    if (w == WKind::kI4A) xdsum.resize(xscale.size());
    const int32_t bias = w == WKind::kI8 ? 128 : (w == WKind::kI4S ? 8 : 0);
    const float* xf = x_bf16 ? nullptr : static_cast<const float*>(x.untyped_data());
    const uint16_t* xb = x_bf16 ? static_cast<const uint16_t*>(x.untyped_data()) : nullptr;
    constexpr int64_t kRowsPerTask = 32;
    float* dsum = xdsum.empty() ? nullptr : xdsum.data();
    ParallelFor(pool, (p.m + kRowsPerTask - 1) / kRowsPerTask, helpers, [&](int64_t t) {
      vnni::QuantizeRows(xf, xb, t * kRowsPerTask, std::min(p.m, (t + 1) * kRowsPerTask), p.k, bias, xq.data(),
                         xscale.data(), xcorr.data(), dsum);
    });
    acts.q = xq.data();
    acts.d = xscale.data();
    acts.corr = xcorr.data();
    acts.dsum = dsum;
    p.acts = &acts;
  }
  const bool int8_path = p.acts != nullptr;
#else
  (void)int8_activations;
  const bool int8_path = false;
#endif
  // The bfloat16 dot reads x as stored; every other path reads a float32 copy.
  const bool panel_bf16 = !gemv && x_bf16 && kHaveBf16Dot && p.k % 2 == 0;
  std::vector<float> xf;
  if (int8_path) {
    // reads only the quantized activations
  } else if (panel_bf16) {
    p.xb = static_cast<const uint16_t*>(x.untyped_data());
  } else if (x_bf16) {
    const uint16_t* xh = static_cast<const uint16_t*>(x.untyped_data());
    xf.resize(static_cast<size_t>(p.m * p.k));
    for (int64_t i = 0; i < p.m * p.k; ++i) xf[i] = Bf16ToF32(xh[i]);
    p.x = xf.data();
  } else {
    p.x = static_cast<const float*>(x.untyped_data());
  }
#if defined(__AVX512BF16__)
  // int4 decode path with bfloat16 x: x[m, k(r)] | x[m, k(r) + g/2] << 16 per packed row r (AccumulatePairs)
  std::vector<uint32_t> xpair;
  if (gemv && x_bf16 && w != WKind::kI8) {
    const uint16_t* xh = static_cast<const uint16_t*>(x.untyped_data());
    const int64_t kp = p.k / 2, prow = p.g / 2;
    xpair.resize(static_cast<size_t>(p.m * kp));
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t q = 0; q < kp; ++q) {
        const int64_t k = q / prow * p.g + q % prow;
        xpair[m * kp + q] = xh[m * p.k + k] | static_cast<uint32_t>(xh[m * p.k + k + prow]) << 16;
      }
    p.xpair = xpair.data();
  }
#endif
  std::vector<float> xsum;
  if (w == WKind::kI4A && gemv) {  // the panel path adds the offset into the dequantized weight
    xsum.resize(static_cast<size_t>(p.m * p.groups));
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t j = 0; j < p.groups; ++j) {
        float s0 = 0.0f;
        for (int64_t k = j * p.g; k < (j + 1) * p.g; ++k) s0 += p.x[m * p.k + k];
        xsum[m * p.groups + j] = s0;
      }
    p.xsum = xsum.data();
  }

  const int64_t nblocks = (p.n + kNB - 1) / kNB;
  std::vector<Item> items;
  std::vector<float> parts;  // decode path split over K: [slices, M, N] float32 partial sums
  int64_t slices = 1;
  if (gemv) {
    // Column ranges as wide as kItemCols (each packed row's bytes of an item are one sequential run: the
    // memory streams them at full speed, where runs of a few cache lines leave it at a third of that),
    // balanced; where that gives fewer than 2 items per thread, K is split into slices of whole groups
    // too, each slice adding into its own float32 partial sums.
    const int64_t ncol = (nblocks + kItemCols / kNB - 1) / (kItemCols / kNB);
    const int64_t width = (nblocks + ncol - 1) / ncol * kNB;
    slices = std::clamp<int64_t>((2 * threads + ncol - 1) / ncol, 1, p.groups);
    if (helpers == 0) slices = 1;
    if (slices > 1) parts.assign(static_cast<size_t>(slices * p.m * p.n), 0.0f);
    for (int64_t sl = 0; sl < slices; ++sl) {
      const int64_t j0 = p.groups * sl / slices, j1 = p.groups * (sl + 1) / slices;
      float* part = slices > 1 ? parts.data() + sl * p.m * p.n : nullptr;
      for (int64_t m0 = 0; m0 < p.m; m0 += kMB)
        for (int64_t c = 0; c < p.n; c += width)
          items.push_back(Item{m0, std::min(m0 + kMB, p.m), c, std::min(c + width, p.n), j0, j1, part});
    }
  } else {
    // Several column blocks per item where there are many (the LM head): their panels are built in one
    // pass over the packed rows (WalkBlockRows), as long as the panels stay well inside L2 and there are
    // >= 8 items per thread. Split rows only when there are too few items to keep the pool busy (each row
    // split dequantizes the panels again).
    const int64_t panel_bytes = p.k * kNB * 2;  // bfloat16 pairs
    const int64_t per = std::clamp<int64_t>(std::min<int64_t>(nblocks / (8 * threads), (512 << 10) / panel_bytes), 1,
                                            kMaxPanelBlocks);
    const int64_t nitems = (nblocks + per - 1) / per;
    int64_t splits = 1;
    while (nitems * splits < 4 * threads && p.m / (splits * 2) >= 4 * kPanelMB) splits *= 2;
    const int64_t rows = (p.m + splits - 1) / splits;
    for (int64_t b = 0; b < nblocks; b += per)
      for (int64_t m0 = 0; m0 < p.m; m0 += rows)
        items.push_back(Item{m0, std::min(m0 + rows, p.m), b * kNB, std::min((b + per) * kNB, p.n)});
  }

  ParallelFor(pool, static_cast<int64_t>(items.size()), helpers,
              [&p, &items, gemv, w, s](int64_t i) { RunItemAny(p, items[i], gemv, w, s); });
  if (slices > 1) {  // out = the slices' partial sums added in slice order
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t c = 0; c < p.n; c += kLanes) {
        const int valid = static_cast<int>(std::min<int64_t>(kLanes, p.n - c));
        VF y = VF{};
        for (int64_t sl = 0; sl < slices; ++sl) {
          const float* src = parts.data() + (sl * p.m + m) * p.n + c;
          if (valid == kLanes) {
            y += LoadF(src);
          } else {
            for (int l = 0; l < valid; ++l) y[l] += src[l];
          }
        }
        StoreOut(p, m, c, y, valid);
      }
  }
  return ffi::Error::Success();
}

}  // namespace

// Whether the bfloat16 panel path multiplies on AMX tiles in this process (cpu.py: amx_enabled()).
extern "C" int JaxinferQuantizedMatmulAmx() {
#if defined(JAXINFER_HAVE_AMX)
  return jaxinfer_amx::Enabled() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQuantizedMatmulCpu, QuantizedMatmulCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::S8>>()    // value
                                  .Arg<ffi::AnyBuffer>()          // scale
                                  .Arg<ffi::AnyBuffer>()          // offset
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("int4")
                                  .Attr<int64_t>("asymmetric")
                                  .Attr<int64_t>("gemv_max_m")
                                  .Attr<int64_t>("parallel_min_bytes")
                                  .Attr<int64_t>("int8_activations"));
