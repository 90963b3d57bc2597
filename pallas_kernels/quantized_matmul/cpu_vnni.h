// The int8 dot path of the CPU quantized matmul (cpu_kernel.cc): dynamic activation quantization and
// AVX512-VNNI (vpdpbusd) panels. Only compiled for a CPU with AVX512-VNNI (kHaveVnni); cpu_kernel.cc
// keeps its bfloat16 / float32 paths everywhere else.
//
// Numerics (W8A8-style, as llama.cpp runs its quantized formats on the CPU):
//  * activations: each row of x in blocks of 32 along K, d = max|x| / 127 (float32), xq = x * (1 / d)
//    rounded to nearest (ties to even), int8 in [-127, 127] (a block of zeros: d = 0, xq = 0);
//  * weights as unsigned levels u = q + bias (int8: +128, signed int4: +8, asymmetric int4: the stored
//    0..15 with bias 0);
//  * per (row, 32-block b, column): s = sum(u * xq) - bias * sum(xq) = sum(q * xq), exact in int32;
//    out = sum_b float(s) * (d[row, b] * scale[group(b), col])
//          (+ offset[group(b), col] * (d[row, b] * sum(xq over b)) for asymmetric int4),
//    accumulated in float32 (per-channel symmetric weights: sum_b float(s) * d, times the scale at the end).
//
// The panel of a 64-column block holds u as [K/4][4 vectors][16 columns][4 consecutive K bytes]: one
// 512-bit load is the 4 K rows x 16 columns vpdpbusd multiplies with a broadcast of 4 activation bytes.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define JAXINFER_HAVE_VNNI 1
#endif

namespace jaxinfer_cpu {
namespace vnni {

constexpr int kBlock = 32;  // activation quantization block along K
constexpr int kCols = 64;   // columns of a panel (4 vectors of 16)

#if defined(JAXINFER_HAVE_VNNI)
constexpr bool kHaveVnni = true;

// Quantized activations of all M rows (computed once per call).
struct Acts {
  int64_t k = 0, kb = 0;          // K and K / 32
  const int8_t* q = nullptr;      // [M, K]
  const float* d = nullptr;       // [M, kb] block scales
  const int32_t* corr = nullptr;  // [M, kb] -bias * sum(xq over the block)
  const float* dsum = nullptr;    // [M, kb] d * sum(xq over the block) (asymmetric weights), else null
};

inline __m512 LoadRow16(const float* xf, const uint16_t* xb, int64_t i) {
  if (xb != nullptr) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(xf + i);
}

// Rows [m0, m1) of x (float32 xf or bfloat16 xb, [M, K]) into q / d / corr / dsum (the Acts arrays,
// writable); bias: the weights' level bias.
inline void QuantizeRows(const float* xf, const uint16_t* xb, int64_t m0, int64_t m1, int64_t k, int32_t bias,
                         int8_t* q, float* d, int32_t* corr, float* dsum) {
  const int64_t kb = k / kBlock;
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t i = m * k + b * kBlock;
      const __m512 a0 = LoadRow16(xf, xb, i), a1 = LoadRow16(xf, xb, i + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a0, absmask), _mm512_and_ps(a1, absmask)));
      const float db = amax / 127.0f;
      const float id = db != 0.0f ? 1.0f / db : 0.0f;
      // Default MXCSR rounding: to nearest, ties to even.
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, _mm512_set1_ps(id)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i + 16), _mm512_cvtepi32_epi8(q1));
      const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      d[m * kb + b] = db;
      corr[m * kb + b] = -bias * s;
      if (dsum != nullptr) dsum[m * kb + b] = db * static_cast<float>(s);
    }
  }
}

// 16 unsigned levels at columns [c, c + valid) (the rest zero) of packed row `row` of value (int8 [K, N]:
// K row `row`; int4 [K/2, N]: the low or `high` nibbles, see packing.py).
template <bool kI4, bool kAsym>
inline __m128i ULevels(const int8_t* value, int64_t n, int64_t row, bool high, int64_t c, int valid) {
  __m128i v;
  if (valid == 16) {
    v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(value + row * n + c));
  } else {
    alignas(16) int8_t tmp[16] = {};
    std::memcpy(tmp, value + row * n + c, valid);
    v = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  if constexpr (!kI4) return _mm_xor_si128(v, _mm_set1_epi8(static_cast<char>(0x80)));  // q + 128
  const __m128i nib = high ? _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)) : _mm_and_si128(v, _mm_set1_epi8(15));
  if constexpr (kAsym) return nib;
  return _mm_xor_si128(nib, _mm_set1_epi8(8));  // two's-complement nibble q -> q + 8
}

// The panel of the column block at n0 (K and g multiples of 32; lanes past N are zero, never stored).
// value: int8 [K, N] or int4 [K/2, N] with groups of g (split-half per group, see packing.py).
template <bool kI4, bool kAsym>
void BuildPanel(const int8_t* value, int64_t k, int64_t n, int64_t g, int64_t n0, uint8_t* panel) {
  const int64_t h = g / 2;
  for (int v = 0; v < kCols / 16; ++v) {
    const int64_t c = n0 + 16 * v;
    const int valid = static_cast<int>(c >= n ? 0 : (n - c < 16 ? n - c : 16));
    for (int64_t kk = 0; kk < k; kk += 4) {
      __m128i* dst = reinterpret_cast<__m128i*>(panel + (kk + v) * 64);  // quad kk / 4, vector v
      if (valid == 0) {
        for (int t = 0; t < 4; ++t) _mm_storeu_si128(dst + t, _mm_setzero_si128());
        continue;
      }
      int64_t row = kk;
      bool high = false;
      if constexpr (kI4) {  // K rows kk..kk+3 lie in one half of one group (h is a multiple of 16)
        const int64_t j = kk / g, r = kk - j * g;
        high = r >= h;
        row = j * h + (high ? r - h : r);
      }
      const __m128i r0 = ULevels<kI4, kAsym>(value, n, row, high, c, valid);
      const __m128i r1 = ULevels<kI4, kAsym>(value, n, row + 1, high, c, valid);
      const __m128i r2 = ULevels<kI4, kAsym>(value, n, row + 2, high, c, valid);
      const __m128i r3 = ULevels<kI4, kAsym>(value, n, row + 3, high, c, valid);
      // 4 x 16 byte transpose into 16 x 4: column l's 4 K bytes at bytes 4l..4l+3.
      const __m128i a_lo = _mm_unpacklo_epi8(r0, r1), a_hi = _mm_unpackhi_epi8(r0, r1);
      const __m128i b_lo = _mm_unpacklo_epi8(r2, r3), b_hi = _mm_unpackhi_epi8(r2, r3);
      _mm_storeu_si128(dst + 0, _mm_unpacklo_epi16(a_lo, b_lo));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(a_lo, b_lo));
      _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(a_hi, b_hi));
      _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(a_hi, b_hi));
    }
  }
}

// Rows [m0, m0 + MB) x the NV vectors at vector vbase of a panel into y[i * 64 + 16 * (vbase + v) + lane]
// (float32). ws / wo: the block's scales / offsets per group, float32 [groups][64]; bpg: 32-blocks per
// weight group; kPerChannel: one symmetric scale per column for all of K (applied once at the end).
template <bool kPerChannel, bool kAsym, int MB, int NV>
void Dot(const Acts& a, const uint8_t* panel, const float* ws, const float* wo, int64_t bpg, int64_t m0, int vbase,
         float* y) {
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int8_t* xq[MB];
  for (int i = 0; i < MB; ++i) xq[i] = a.q + (m0 + i) * a.k;
  for (int64_t b = 0; b < a.kb; ++b) {
    __m512i s[MB][NV];
    for (int i = 0; i < MB; ++i) {
      const __m512i c0 = _mm512_set1_epi32(a.corr[(m0 + i) * a.kb + b]);
      for (int v = 0; v < NV; ++v) s[i][v] = c0;
    }
    const uint8_t* pb = panel + b * (kBlock / 4) * 256 + vbase * 64;
    for (int t = 0; t < kBlock / 4; ++t) {
      __m512i w[NV];
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(pb + t * 256 + v * 64);
      for (int i = 0; i < MB; ++i) {
        int32_t x4;
        std::memcpy(&x4, xq[i] + b * kBlock + 4 * t, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
        for (int v = 0; v < NV; ++v) s[i][v] = _mm512_dpbusd_epi32(s[i][v], w[v], xv);
      }
    }
    if constexpr (kPerChannel) {
      for (int i = 0; i < MB; ++i) {
        const __m512 d = _mm512_set1_ps(a.d[(m0 + i) * a.kb + b]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][v]), d, acc[i][v]);
      }
    } else {
      const int64_t j = b / bpg;
      __m512 sc[NV], off[NV];
      for (int v = 0; v < NV; ++v) {
        sc[v] = _mm512_loadu_ps(ws + j * kCols + (vbase + v) * 16);
        if constexpr (kAsym) off[v] = _mm512_loadu_ps(wo + j * kCols + (vbase + v) * 16);
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 d = _mm512_set1_ps(a.d[(m0 + i) * a.kb + b]);
        for (int v = 0; v < NV; ++v)
          acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][v]), _mm512_mul_ps(sc[v], d), acc[i][v]);
        if constexpr (kAsym) {
          const __m512 ds = _mm512_set1_ps(a.dsum[(m0 + i) * a.kb + b]);
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(off[v], ds, acc[i][v]);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) {
      __m512 r = acc[i][v];
      if constexpr (kPerChannel) r = _mm512_mul_ps(r, _mm512_loadu_ps(ws + (vbase + v) * 16));
      _mm512_storeu_ps(y + i * kCols + (vbase + v) * 16, r);
    }
}
#else
constexpr bool kHaveVnni = false;
#endif

}  // namespace vnni
}  // namespace jaxinfer_cpu
