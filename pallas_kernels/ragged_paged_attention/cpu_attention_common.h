// Shared by the CPU attention kernel's two paths (cpu_kernel.cc: rows; cpu_blocked.h: blocked
// prefill): cache types, parameters, work items, the exp polynomial and the cache-row loader.
// cpu_build.py hashes the headers next to a kernel source into its build cache key.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_simd.h"

namespace jaxinfer_rpa_cpu {

using namespace jaxinfer_cpu;  // NOLINT: the shared vector types and helpers

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, VI{__VA_ARGS__})
#endif

constexpr int kKeyBlock = 16;  // keys per online-softmax step: one score vector per query
constexpr int kMaxVecs = 16;   // head_dim <= 256
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Fp8Tables {
  float e4m3fn[256];
  float e5m2[256];
  Fp8Tables() {
    for (int b = 0; b < 256; ++b) {
      float sign = (b & 0x80) ? -1.0f : 1.0f;
      int e = (b >> 3) & 0xf, m = b & 7;  // e4m3fn: bias 7, no infinities, S.1111.111 is NaN
      if (e == 0xf && m == 7) {
        e4m3fn[b] = std::numeric_limits<float>::quiet_NaN();
      } else if (e == 0) {
        e4m3fn[b] = sign * std::ldexp(m / 8.0f, -6);
      } else {
        e4m3fn[b] = sign * std::ldexp(1.0f + m / 8.0f, e - 7);
      }
      e = (b >> 2) & 0x1f;  // e5m2: bias 15, IEEE-style infinities and NaNs
      m = b & 3;
      if (e == 0x1f) {
        e5m2[b] = m ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
      } else if (e == 0) {
        e5m2[b] = sign * std::ldexp(m / 4.0f, -14);
      } else {
        e5m2[b] = sign * std::ldexp(1.0f + m / 4.0f, e - 15);
      }
    }
  }
};

inline const Fp8Tables& Fp8() {
  static const Fp8Tables tables;
  return tables;
}

enum class KvType { kF32, kBf16, kI8, kE4M3, kE5M2 };

struct Params {
  const void* q;
  bool q_bf16;
  const void* k;
  const void* v;
  const float* k_scale;  // nullptr for float caches
  const float* v_scale;
  KvType kv_type;
  void* out;
  int64_t t, hq, hkv, d, num_pages, page_size, pages_per_seq;
  const int32_t* page_indices;
  float sm_scale;
  int64_t window;   // <= 0: none
  float soft_cap;   // <= 0: none
};

struct Item {
  int64_t seq, head0, head1, row0, row1;  // KV heads [head0, head1); rows index q / out
  int64_t q_start;                // first row of the sequence
  int64_t q_len, kv_len;
  int64_t cost;
  bool blocked;  // prefill rows of one KV head on the blocked path (RunBlockedItem)
};

// One (token, head) row of the cache, unscaled, as `nv` float vectors (zero past head_dim).
template <KvType kT>
inline void LoadRow(const void* base, int64_t row, int64_t d, int nv, VF* dst) {
  const int64_t off = row * d;
  for (int c = 0; c < nv; ++c) {
    const int64_t i0 = int64_t{c} * kLanes;
    if (i0 + kLanes <= d) {
      if constexpr (kT == KvType::kF32) {
        dst[c] = LoadF(static_cast<const float*>(base) + off + i0);
      } else if constexpr (kT == KvType::kBf16) {
        dst[c] = LoadBf16(static_cast<const uint16_t*>(base) + off + i0);
      } else if constexpr (kT == KvType::kI8) {
        dst[c] = ToF(LoadI8(static_cast<const int8_t*>(base) + off + i0));
      } else {
        const float* table = kT == KvType::kE4M3 ? Fp8().e4m3fn : Fp8().e5m2;
        const uint8_t* src = static_cast<const uint8_t*>(base) + off + i0;
        for (int i = 0; i < kLanes; ++i) dst[c][i] = table[src[i]];
      }
      continue;
    }
    VF x{};
    for (int64_t i = i0; i < d; ++i) {
      float f;
      if constexpr (kT == KvType::kF32) {
        f = static_cast<const float*>(base)[off + i];
      } else if constexpr (kT == KvType::kBf16) {
        f = Bf16ToF32(static_cast<const uint16_t*>(base)[off + i]);
      } else if constexpr (kT == KvType::kI8) {
        f = static_cast<const int8_t*>(base)[off + i];
      } else {
        f = (kT == KvType::kE4M3 ? Fp8().e4m3fn : Fp8().e5m2)[static_cast<const uint8_t*>(base)[off + i]];
      }
      x[i - i0] = f;
    }
    dst[c] = x;
  }
}

// One work item. kNV: float vectors per head (head_dim / 16 rounded up), 0 = runtime.

// Rows rows[0 .. n) of a cache of any type, as `nv` float vectors each (zero past head_dim). kD > 0:
// head_dim is kD (a compile-time constant, so the per-vector tail checks fold away).
template <KvType kT, int kD>
void LoadRows(const void* base, const int64_t* rows, int64_t n, int64_t d, int nv, VF* dst) {
  const int64_t dd = kD > 0 ? kD : d;
  for (int64_t j = 0; j < n; ++j) LoadRow<kT>(base, rows[j], dd, nv, dst + j * nv);
}

template <int kD>
void LoadRowsAny(KvType t, const void* base, const int64_t* rows, int64_t n, int64_t d, int nv, VF* dst) {
  switch (t) {
    case KvType::kF32: return LoadRows<KvType::kF32, kD>(base, rows, n, d, nv, dst);
    case KvType::kBf16: return LoadRows<KvType::kBf16, kD>(base, rows, n, d, nv, dst);
    case KvType::kI8: return LoadRows<KvType::kI8, kD>(base, rows, n, d, nv, dst);
    case KvType::kE4M3: return LoadRows<KvType::kE4M3, kD>(base, rows, n, d, nv, dst);
    case KvType::kE5M2: return LoadRows<KvType::kE5M2, kD>(base, rows, n, d, nv, dst);
  }
}

// Largest of the 16 lanes (a shuffle reduction tree).
JAXINFER_INLINE float HorizontalMax(VF x) {
  x = x > SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) ? x
      : SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  VF y = SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x = x > y ? x : y;
  y = SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x = x > y ? x : y;
  y = SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  x = x > y ? x : y;
  return x[0];
}

}  // namespace jaxinfer_rpa_cpu
