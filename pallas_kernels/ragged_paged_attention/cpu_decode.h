// The CPU attention kernel's decode path (included by cpu_kernel.cc; see RunDecodeItem).

#pragma once

#include "cpu_attention_common.h"
#include "cpu_blocked.h"  // DotBf16, kHaveBf16Dot

namespace jaxinfer_rpa_cpu {

constexpr int kDecodeMaxQ = 16;  // query vectors per decode item (rows x group members)

// Entries [off, off + 16) of a cache, unscaled, as float32 (exact for every cache type).
template <KvType kT>
inline VF Widen(const void* base, int64_t off) {
  if constexpr (kT == KvType::kF32) {
    return LoadF(static_cast<const float*>(base) + off);
  } else if constexpr (kT == KvType::kBf16) {
    return LoadBf16(static_cast<const uint16_t*>(base) + off);
  } else if constexpr (kT == KvType::kI8) {
    return ToF(LoadI8(static_cast<const int8_t*>(base) + off));
  } else {
    const float* table = kT == KvType::kE4M3 ? Fp8().e4m3fn : Fp8().e5m2;
    const uint8_t* src = static_cast<const uint8_t*>(base) + off;
    VF x;
    for (int i = 0; i < kLanes; ++i) x[i] = table[src[i]];
    return x;
  }
}

#if defined(JAXINFER_AVX2_ONLY)
constexpr bool kAvx2DecodePV = true;
// Entries [off, off + 8) of a cache, unscaled, as float32 (Widen for one ymm register).
template <KvType kT>
inline __m256 Widen8(const void* base, int64_t off) {
  if constexpr (kT == KvType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + off);
  } else if constexpr (kT == KvType::kBf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (kT == KvType::kI8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + off));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else {
    const float* table = kT == KvType::kE4M3 ? Fp8().e4m3fn : Fp8().e5m2;
    const uint8_t* src = static_cast<const uint8_t*>(base) + off;
    return _mm256_setr_ps(table[src[0]], table[src[1]], table[src[2]], table[src[3]], table[src[4]], table[src[5]],
                          table[src[6]], table[src[7]]);
  }
}
#else
constexpr bool kAvx2DecodePV = false;
#endif

// Lane j of the result is the sum of the lanes of p[j] (16 vectors in, one out): a transposing
// reduction tree, 15 pairs of shuffles instead of 16 separate horizontal sums.
JAXINFER_INLINE VF TransposeSum(const VF* p) {
  VF c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i) {
    c[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    d[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    e[i] = SHUFFLE(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return SHUFFLE(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// One KV head's state in a decode item: its kNQ query vectors (float32 scaled, and bf16 pairs for
// kDot), unnormalized outputs, running denominators (lane-wise) and maxima.
template <int kNV, int kNQ>
struct DecodeHead {
  static constexpr int kW = (kNV + 1) / 2;  // bf16 pair vectors per query
  VF qf[kNQ][kNV];
  VU qw[kNQ][kW];
  VF acc[kNQ][kNV];
  VF lsum[kNQ];
  float mrun[kNQ];
};

// One block of keys (cache rows rows[j] + hh, j < nk; positions kb + j) for one head's queries.
template <KvType kT, int kNV, int kNQ, bool kDot>
inline void DecodeBlock(const Params& p, DecodeHead<kNV, kNQ>& st, const int64_t* rows, int64_t hh, int64_t kb,
                        int64_t nk, const float* pos, float score_scale) {
  constexpr int64_t d = int64_t{kNV} * kLanes;
  constexpr int kC = std::min(kNV, kNQ <= 1 ? 16 : kNQ <= 2 ? 8 : kNQ <= 4 ? 4 : kNQ <= 8 ? 2 : 1);
  constexpr int kW = DecodeHead<kNV, kNQ>::kW;
  constexpr bool kScaled = kT == KvType::kI8 || kT == KvType::kE4M3 || kT == KvType::kE5M2;
  alignas(64) VF part[kNQ][kKeyBlock];  // per-key partial products
  alignas(64) float w[kNQ][kKeyBlock];  // weights times the value scales
  alignas(64) float ks[kKeyBlock], vs[kKeyBlock];
  float alpha[kNQ];
  for (int64_t j = 0; j < nk; ++j) {
    ks[j] = (kScaled ? p.k_scale[rows[j] + hh] : 1.0f) * score_scale;
    vs[j] = kScaled ? p.v_scale[rows[j] + hh] : 1.0f;
  }
  for (int64_t j = nk; j < kKeyBlock; ++j) ks[j] = vs[j] = 0.0f;
  // Each key's rows are read where they lie in the pages (RunDecodeItem prefetches them two blocks
  // ahead); copying them to the stack first cost a libc memmove call per row.
  constexpr size_t kRowBytes = d * (kT == KvType::kF32 ? 4 : kT == KvType::kBf16 ? 2 : 1);
  const char* krow[kKeyBlock];
  const char* vrow[kKeyBlock];
  for (int64_t j = 0; j < nk; ++j) {
    krow[j] = static_cast<const char*>(p.k) + (rows[j] + hh) * kRowBytes;
    vrow[j] = static_cast<const char*>(p.v) + (rows[j] + hh) * kRowBytes;
  }

  // Q K^T: one key row in registers at a time, used by every query.
  for (int64_t j = 0; j < nk; ++j) {
    if constexpr (kDot) {
      VU kr[kW];
      for (int c = 0; c < kW; ++c) std::memcpy(&kr[c], reinterpret_cast<const uint16_t*>(krow[j]) + c * 2 * kLanes, sizeof(VU));
      for (int m = 0; m < kNQ; ++m) {
        VF a0 = DotBf16(VF{}, kr[0], st.qw[m][0]), a1{};
        for (int c = 1; c < kW; ++c) {
          if (c & 1) {
            a1 = DotBf16(a1, kr[c], st.qw[m][c]);
          } else {
            a0 = DotBf16(a0, kr[c], st.qw[m][c]);
          }
        }
        part[m][j] = a0 + a1;
      }
    } else if constexpr (kAvx2DecodePV) {
#if defined(JAXINFER_AVX2_ONLY)
      // The generic code below on AVX2 stored each part[m][j] through general registers. Same sums here
      // on ymm halves: part = (q0 k0 + q2 k2 + ...) + (q1 k1 + q3 k3 + ...), lane-wise.
      __m256 kr[2 * kNV];
#pragma GCC unroll 32
      for (int c = 0; c < 2 * kNV; ++c) kr[c] = Widen8<kT>(krow[j], c * 8);
#pragma GCC unroll 16
      for (int m = 0; m < kNQ; ++m) {
        const float* q = reinterpret_cast<const float*>(st.qf[m]);
        __m256 a0l = _mm256_mul_ps(_mm256_loadu_ps(q), kr[0]), a0h = _mm256_mul_ps(_mm256_loadu_ps(q + 8), kr[1]);
        __m256 a1l = _mm256_mul_ps(_mm256_loadu_ps(q + 16), kr[2]);
        __m256 a1h = _mm256_mul_ps(_mm256_loadu_ps(q + 24), kr[3]);
#pragma GCC unroll 16
        for (int c = 2; c < kNV; c += 2) {
          a0l = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 16), kr[2 * c], a0l);
          a0h = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 16 + 8), kr[2 * c + 1], a0h);
          a1l = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 16 + 16), kr[2 * c + 2], a1l);
          a1h = _mm256_fmadd_ps(_mm256_loadu_ps(q + c * 16 + 24), kr[2 * c + 3], a1h);
        }
        float* dst = reinterpret_cast<float*>(&part[m][j]);
        _mm256_storeu_ps(dst, _mm256_add_ps(a0l, a1l));
        _mm256_storeu_ps(dst + 8, _mm256_add_ps(a0h, a1h));
      }
#endif
    } else {
      VF kr[kNV];
      for (int c = 0; c < kNV; ++c) kr[c] = Widen<kT>(krow[j], c * kLanes);
      for (int m = 0; m < kNQ; ++m) {
        VF a0 = st.qf[m][0] * kr[0], a1 = st.qf[m][1] * kr[1];
        for (int c = 2; c < kNV; c += 2) {
          a0 += st.qf[m][c] * kr[c];
          a1 += st.qf[m][c + 1] * kr[c + 1];
        }
        part[m][j] = a0 + a1;
      }
    }
  }
  for (int64_t j = nk; j < kKeyBlock; ++j) {
    for (int m = 0; m < kNQ; ++m) part[m][j] = VF{};
  }
  // Softmax, lane-wise over the block's keys.
  VF kpos;
  for (int i = 0; i < kLanes; ++i) kpos[i] = static_cast<float>(kb + i);  // exact: positions < 2^24
  const VF kscale = LoadF(ks), vscale = LoadF(vs);
  for (int m = 0; m < kNQ; ++m) {
    VF s = TransposeSum(part[m]) * kscale;
    if (p.soft_cap > 0) {
      for (int i = 0; i < kLanes; ++i) s[i] = p.soft_cap * std::tanh(s[i] / p.soft_cap);
    }
    VI ok = (kpos <= pos[m]) & (kpos < static_cast<float>(kb + nk));
    if (p.window > 0) ok &= kpos > pos[m] - static_cast<float>(p.window);
    s = ok ? s : Splat(kNegInf);
    const float mx = HorizontalMax(s);
    if (mx == kNegInf) {  // no key of this block is visible to this query
      alpha[m] = 1.0f;
      StoreF(w[m], VF{});
      continue;
    }
    const float m_new = std::max(st.mrun[m], mx);
    alpha[m] = Exp(Splat(st.mrun[m] - m_new))[0];  // m = -inf -> ~0 (acc and lsum are 0 then)
    st.mrun[m] = m_new;
    VF e = Exp(s - m_new);
    e = ok ? e : Splat(0.0f);
    st.lsum[m] = st.lsum[m] * alpha[m] + e;
    StoreF(w[m], e * vscale);
  }
  // P V: kC vectors of head_dim at a time, kNQ x kC accumulators in registers.
#if defined(JAXINFER_AVX2_ONLY)
  // AVX2 (16 ymm registers, two per 16-lane vector): kNQ x kC vectors were up to 24 ymm accumulators,
  // kept on the stack. Here kNQ x kCB ymm (at most 10 for kNQ <= 5; kNQ >= 6 takes one at a time).
  if constexpr (kAvx2DecodePV) {
    constexpr int kCh = 2 * kNV;  // ymm chunks of head_dim
    constexpr int kCB = kNQ <= 1 ? 8 : kNQ <= 2 ? 4 : kNQ <= 5 ? 2 : 1;
    for (int c0 = 0; c0 < kCh; c0 += kCB) {
      __m256 o[kNQ][kCB];
#pragma GCC unroll 16
      for (int m = 0; m < kNQ; ++m) {
        const __m256 a = _mm256_set1_ps(alpha[m]);
        const float* acc = reinterpret_cast<const float*>(st.acc[m]);
#pragma GCC unroll 8
        for (int cc = 0; cc < kCB; ++cc) o[m][cc] = _mm256_mul_ps(_mm256_loadu_ps(acc + (c0 + cc) * 8), a);
      }
      for (int64_t j = 0; j < nk; ++j) {
        __m256 vr[kCB];
#pragma GCC unroll 8
        for (int cc = 0; cc < kCB; ++cc) vr[cc] = Widen8<kT>(vrow[j], (c0 + cc) * 8);
#pragma GCC unroll 16
        for (int m = 0; m < kNQ; ++m) {
          const __m256 wm = _mm256_broadcast_ss(&w[m][j]);
#pragma GCC unroll 8
          for (int cc = 0; cc < kCB; ++cc) o[m][cc] = _mm256_fmadd_ps(wm, vr[cc], o[m][cc]);
        }
      }
#pragma GCC unroll 16
      for (int m = 0; m < kNQ; ++m) {
        float* acc = reinterpret_cast<float*>(st.acc[m]);
#pragma GCC unroll 8
        for (int cc = 0; cc < kCB; ++cc) _mm256_storeu_ps(acc + (c0 + cc) * 8, o[m][cc]);
      }
    }
    return;
  }
#endif
  for (int c0 = 0; c0 < kNV; c0 += kC) {
    VF o[kNQ][kC];
    for (int m = 0; m < kNQ; ++m) {
      for (int cc = 0; cc < kC; ++cc) o[m][cc] = st.acc[m][c0 + cc] * alpha[m];
    }
    for (int64_t j = 0; j < nk; ++j) {
      VF vr[kC];
      for (int cc = 0; cc < kC; ++cc) vr[cc] = Widen<kT>(vrow[j], (c0 + cc) * kLanes);
      for (int m = 0; m < kNQ; ++m) {
        const VF wm = Splat(w[m][j]);
        for (int cc = 0; cc < kC; ++cc) o[m][cc] += wm * vr[cc];
      }
    }
    for (int m = 0; m < kNQ; ++m) {
      for (int cc = 0; cc < kC; ++cc) st.acc[m][c0 + cc] = o[m][cc];
    }
  }
}

// A decode work item: KV heads [head0, head1) of one sequence over a block of rows, each head with
// its nq = rows * group <= kNQ query vectors (query m: row row0 + m / g, group member m % g; queries
// past nq are zeros whose output is dropped). Per block of 16 keys and head, each key row is widened
// to float32 once, in registers, and used by every query vector of the head: Q K^T as nv products
// per (query, key) reduced by one transposing sum per query (scores for 16 keys in one vector), a
// lane-wise online softmax, and P V with each widened value vector multiplied into kNQ x kC
// accumulators held in registers (kC vectors of head_dim at a time). No widened tile is stored. The
// heads of a block are done together: a token's rows for all heads are adjacent in a page.
//
// kNV: head_dim / 16 (4, 8 or 16). kDot (bfloat16 queries on a bf16 cache with AVX512-BF16): Q K^T
// runs on vdpbf16ps straight from the pages (exact products, float32 sums; no widening of keys).
template <KvType kT, int kNV, int kNQ, bool kDot>
void RunDecodeItem(const Params& p, const Item& it) {
  using Head = DecodeHead<kNV, kNQ>;
  constexpr int64_t d = int64_t{kNV} * kLanes;
  const int64_t g = p.hq / p.hkv;
  const int64_t nh = it.head1 - it.head0;
  const int64_t nq = (it.row1 - it.row0) * g;  // <= kNQ
  const int64_t ps = p.page_size;
  constexpr bool kScaled = kT == KvType::kI8 || kT == KvType::kE4M3 || kT == KvType::kE5M2;

  thread_local std::vector<Head> heads;
  if (static_cast<int64_t>(heads.size()) < nh) heads.resize(static_cast<size_t>(nh));
  float pos[kNQ];
  for (int m = 0; m < kNQ; ++m) {
    const int64_t mm = std::min<int64_t>(m, nq - 1);
    pos[m] = static_cast<float>(it.kv_len - it.q_len + (it.row0 + mm / g - it.q_start));  // exact: < 2^24
  }
  for (int64_t hh = 0; hh < nh; ++hh) {
    Head& st = heads[hh];
    for (int m = 0; m < kNQ; ++m) {
      const int64_t mm = std::min<int64_t>(m, nq - 1);
      const int64_t src = ((it.row0 + mm / g) * p.hq + (it.head0 + hh) * g + mm % g) * d;
      for (int c = 0; c < kNV; ++c) {
        VF x{};
        if (m < nq) {
          x = p.q_bf16 ? LoadBf16(static_cast<const uint16_t*>(p.q) + src + c * kLanes)
                       : LoadF(static_cast<const float*>(p.q) + src + c * kLanes);
        }
        st.qf[m][c] = x * p.sm_scale;
        st.acc[m][c] = VF{};
      }
      if constexpr (kDot) {
        for (int c = 0; c < Head::kW; ++c) {
          VU x{};
          if (m < nq) std::memcpy(&x, static_cast<const uint16_t*>(p.q) + src + c * 2 * kLanes, sizeof(x));
          st.qw[m][c] = x;
        }
      }
      st.lsum[m] = VF{};
      st.mrun[m] = kNegInf;
    }
  }

  const int64_t min_pos = static_cast<int64_t>(pos[0]);
  const int64_t max_pos = static_cast<int64_t>(pos[nq - 1]);
  const int64_t hi = std::min(it.kv_len, max_pos + 1);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, min_pos - p.window + 1) : 0;
  constexpr size_t kElem = kT == KvType::kF32 ? 4 : kT == KvType::kBf16 ? 2 : 1;
  const size_t span = static_cast<size_t>(nh * d) * kElem;  // bytes of a token's rows for the item's heads
  const float score_scale = kDot ? p.sm_scale : 1.0f;  // float32 queries are scaled up front
  const int32_t* table = p.page_indices + it.seq * p.pages_per_seq;
  auto page_row = [&](int64_t idx) {  // cache row of (first key of the sequence's page idx, head0)
    const int64_t page = std::min<int64_t>(std::max<int64_t>(table[idx], 0), p.num_pages - 1);
    return page * ps * p.hkv + it.head0;
  };
  // Cache rows of keys [k0, k0 + n) for head0, one division per call.
  auto block_rows = [&](int64_t k0, int64_t n, int64_t* rows) {
    if (n <= 0) return;
    int64_t idx = k0 / ps, slot = k0 - idx * ps, base = page_row(idx);
    for (int64_t j = 0; j < n; ++j) {
      if (slot == ps) {
        slot = 0;
        base = page_row(++idx);
      }
      rows[j] = base + slot++ * p.hkv;
    }
  };
  // Pages are scattered, so the hardware prefetcher cannot see the next blocks coming: each block
  // prefetches the one kAhead blocks on (its key / value rows and scales).
  constexpr int kAhead = 2;
  auto prefetch_block = [&](int64_t k0) {
    int64_t next[kKeyBlock];
    const int64_t n = std::min<int64_t>(kKeyBlock, hi - k0);
    block_rows(k0, n, next);
    for (int64_t j = 0; j < n; ++j) {
      for (size_t b = 0; b < span; b += 64) {
        Prefetch(static_cast<const char*>(p.k) + next[j] * d * kElem + b);
        Prefetch(static_cast<const char*>(p.v) + next[j] * d * kElem + b);
      }
      if (kScaled) {
        Prefetch(p.k_scale + next[j]);
        Prefetch(p.v_scale + next[j]);
      }
    }
  };
  for (int a = 0; a < kAhead; ++a) prefetch_block(lo + a * kKeyBlock);
  for (int64_t kb = lo; kb < hi; kb += kKeyBlock) {
    const int64_t nk = std::min<int64_t>(kKeyBlock, hi - kb);
    int64_t rows[kKeyBlock];
    block_rows(kb, nk, rows);
    prefetch_block(kb + kAhead * kKeyBlock);
    for (int64_t hh = 0; hh < nh; ++hh) {
      DecodeBlock<kT, kNV, kNQ, kDot>(p, heads[hh], rows, hh, kb, nk, pos, score_scale);
    }
  }
  // Normalize and store.
  for (int64_t hh = 0; hh < nh; ++hh) {
    const Head& st = heads[hh];
    for (int64_t m = 0; m < nq; ++m) {
      float l = 0.0f;
      for (int i = 0; i < kLanes; ++i) l += st.lsum[m][i];
      const float inv = l > 0 ? 1.0f / l : 0.0f;
      const int64_t dst = ((it.row0 + m / g) * p.hq + (it.head0 + hh) * g + m % g) * d;
      for (int c = 0; c < kNV; ++c) {
        const VF o = st.acc[m][c] * inv;
        for (int i = 0; i < kLanes; ++i) {
          if (p.q_bf16) {
            static_cast<uint16_t*>(p.out)[dst + c * kLanes + i] = F32ToBf16(o[i]);
          } else {
            static_cast<float*>(p.out)[dst + c * kLanes + i] = o[i];
          }
        }
      }
    }
  }
}

// Whether a row item takes the decode path: head_dim 64 / 128 / 256, <= kDecodeMaxQ queries per head.
inline bool DecodeFits(const Params& p, const Item& it) {
  const int64_t nq = (it.row1 - it.row0) * (p.hq / p.hkv);
  return !it.blocked && nq <= kDecodeMaxQ && (p.d == 64 || p.d == 128 || p.d == 256);
}

template <KvType kT, int kNV, bool kDot>
void RunDecodeForNV(const Params& p, const Item& it) {
  const int64_t nq = (it.row1 - it.row0) * (p.hq / p.hkv);
  if (nq <= 1) return RunDecodeItem<kT, kNV, 1, kDot>(p, it);
  if (nq <= 2) return RunDecodeItem<kT, kNV, 2, kDot>(p, it);
  if (nq <= 3) return RunDecodeItem<kT, kNV, 3, kDot>(p, it);
  if (nq <= 4) return RunDecodeItem<kT, kNV, 4, kDot>(p, it);
  if (nq <= 6) return RunDecodeItem<kT, kNV, 6, kDot>(p, it);
  if (nq <= 8) return RunDecodeItem<kT, kNV, 8, kDot>(p, it);
  if (nq <= 12) return RunDecodeItem<kT, kNV, 12, kDot>(p, it);
  return RunDecodeItem<kT, kNV, 16, kDot>(p, it);
}

template <KvType kT, bool kDot>
void RunDecodeForType(const Params& p, const Item& it) {
  switch (p.d) {
    case 64: return RunDecodeForNV<kT, 4, kDot>(p, it);
    case 128: return RunDecodeForNV<kT, 8, kDot>(p, it);
    default: return RunDecodeForNV<kT, 16, kDot>(p, it);
  }
}

// An item for which DecodeFits holds.
inline void RunDecode(const Params& p, const Item& it) {
  switch (p.kv_type) {
    case KvType::kF32: return RunDecodeForType<KvType::kF32, false>(p, it);
    case KvType::kBf16:
      if (kHaveBf16Dot && p.q_bf16) return RunDecodeForType<KvType::kBf16, kHaveBf16Dot>(p, it);
      return RunDecodeForType<KvType::kBf16, false>(p, it);
    case KvType::kI8: return RunDecodeForType<KvType::kI8, false>(p, it);
    case KvType::kE4M3: return RunDecodeForType<KvType::kE4M3, false>(p, it);
    case KvType::kE5M2: return RunDecodeForType<KvType::kE5M2, false>(p, it);
  }
}

}  // namespace jaxinfer_rpa_cpu
