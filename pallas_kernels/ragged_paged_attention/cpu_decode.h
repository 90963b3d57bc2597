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

// Lane j of the result is the sum of the lanes of p[j] (16 vectors in, one out): a transposing
// reduction tree, 15 pairs of shuffles instead of 16 separate horizontal sums.
inline VF TransposeSum(const VF* p) {
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

inline float MaxLanes(VF x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

// A decode work item: one KV head of one sequence and its nq = rows * group <= kNQ query vectors
// (query m: row row0 + m / g, group member m % g; queries past nq are zeros whose output is
// dropped). Per block of 16 keys, each key row is widened to float32 once, in registers, and used by
// every query vector of the item: Q K^T as nv products per (query, key) reduced by one transposing
// sum per query (scores for 16 keys in one vector), a lane-wise online softmax, and P V with each
// widened value vector multiplied into kNQ x kC accumulators held in registers (kC vectors of
// head_dim at a time). No widened tile is stored.
//
// kNV: head_dim / 16 (4, 8 or 16). kDot (bfloat16 queries on a bf16 cache with AVX512-BF16): Q K^T
// runs on vdpbf16ps straight from the pages (exact products, float32 sums; no widening of keys).
template <KvType kT, int kNV, int kNQ, bool kDot>
void RunDecodeItem(const Params& p, const Item& it) {
  constexpr int64_t d = int64_t{kNV} * kLanes;
  constexpr int kC = std::min(kNV, kNQ <= 1 ? 16 : kNQ <= 2 ? 8 : kNQ <= 4 ? 4 : kNQ <= 8 ? 2 : 1);
  constexpr int kW = (kNV + 1) / 2;  // bf16 pair vectors per query (kDot)
  const int64_t g = p.hq / p.hkv;
  const int64_t h = it.head0;
  const int64_t nq = (it.row1 - it.row0) * g;  // <= kNQ
  const int64_t ps = p.page_size;
  constexpr bool kScaled = kT == KvType::kI8 || kT == KvType::kE4M3 || kT == KvType::kE5M2;

  alignas(64) VF qf[kNQ][kNV];      // scaled float32 queries (not kDot)
  alignas(64) VU qw[kNQ][kW];       // bf16 query pairs (kDot)
  alignas(64) VF acc[kNQ][kNV];     // unnormalized outputs
  alignas(64) VF part[kNQ][kKeyBlock];  // per-key partial products, then reused
  alignas(64) float w[kNQ][kKeyBlock];  // this block's weights (times the value scales)
  alignas(64) float ks[kKeyBlock], vs[kKeyBlock];
  VF lsum[kNQ];
  float mrun[kNQ], alpha[kNQ], pos[kNQ];

  for (int m = 0; m < kNQ; ++m) {
    const int64_t mm = std::min<int64_t>(m, nq - 1);
    pos[m] = static_cast<float>(it.kv_len - it.q_len + (it.row0 + mm / g - it.q_start));  // exact: < 2^24
    const int64_t src = ((it.row0 + mm / g) * p.hq + h * g + mm % g) * d;
    for (int c = 0; c < kNV; ++c) {
      VF x{};
      if (m < nq) {
        x = p.q_bf16 ? LoadBf16(static_cast<const uint16_t*>(p.q) + src + c * kLanes)
                     : LoadF(static_cast<const float*>(p.q) + src + c * kLanes);
      }
      qf[m][c] = x * p.sm_scale;
      acc[m][c] = VF{};
    }
    if constexpr (kDot) {
      for (int c = 0; c < kW; ++c) {
        VU x{};
        if (m < nq) std::memcpy(&x, static_cast<const uint16_t*>(p.q) + src + c * 2 * kLanes, sizeof(x));
        qw[m][c] = x;
      }
    }
    lsum[m] = VF{};
    mrun[m] = kNegInf;
  }

  const int64_t min_pos = static_cast<int64_t>(pos[0]);
  const int64_t max_pos = static_cast<int64_t>(pos[nq - 1]);
  const int64_t hi = std::min(it.kv_len, max_pos + 1);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, min_pos - p.window + 1) : 0;
  constexpr size_t kElem = kT == KvType::kF32 ? 4 : kT == KvType::kBf16 ? 2 : 1;
  constexpr size_t kRowBytes = d * kElem;
  const float score_scale = kDot ? p.sm_scale : 1.0f;  // float32 queries are scaled up front
  auto cache_row = [&](int64_t key) {
    int64_t page = p.page_indices[it.seq * p.pages_per_seq + key / ps];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), p.num_pages - 1);
    return (page * ps + key % ps) * p.hkv + h;
  };
  VF iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = static_cast<float>(i);

  for (int64_t kb = lo; kb < hi; kb += kKeyBlock) {
    const int64_t nk = std::min<int64_t>(kKeyBlock, hi - kb);
    // Pages are scattered, so the hardware prefetcher cannot see the next block coming.
    for (int64_t key = kb + kKeyBlock; key < std::min<int64_t>(kb + 2 * kKeyBlock, hi); ++key) {
      const int64_t row = cache_row(key);
      for (size_t b = 0; b < kRowBytes; b += 64) {
        __builtin_prefetch(static_cast<const char*>(p.k) + row * kRowBytes + b);
        __builtin_prefetch(static_cast<const char*>(p.v) + row * kRowBytes + b);
      }
    }
    int64_t rows[kKeyBlock];
    for (int64_t j = 0; j < nk; ++j) {
      rows[j] = cache_row(kb + j);
      ks[j] = (kScaled ? p.k_scale[rows[j]] : 1.0f) * score_scale;
      vs[j] = kScaled ? p.v_scale[rows[j]] : 1.0f;
    }
    for (int64_t j = nk; j < kKeyBlock; ++j) ks[j] = vs[j] = 0.0f;

    // Q K^T: one key row in registers at a time, used by every query.
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t off = rows[j] * d;
      if constexpr (kDot) {
        VU kr[kW];
        for (int c = 0; c < kW; ++c) std::memcpy(&kr[c], static_cast<const uint16_t*>(p.k) + off + c * 2 * kLanes, sizeof(VU));
        for (int m = 0; m < kNQ; ++m) {
          VF a0 = DotBf16(VF{}, kr[0], qw[m][0]), a1{};
          for (int c = 1; c < kW; ++c) {
            if (c & 1) {
              a1 = DotBf16(a1, kr[c], qw[m][c]);
            } else {
              a0 = DotBf16(a0, kr[c], qw[m][c]);
            }
          }
          part[m][j] = a0 + a1;
        }
      } else {
        VF kr[kNV];
        for (int c = 0; c < kNV; ++c) kr[c] = Widen<kT>(p.k, off + c * kLanes);
        for (int m = 0; m < kNQ; ++m) {
          VF a0 = qf[m][0] * kr[0], a1 = qf[m][1 % kNV] * kr[1 % kNV];
          if (kNV == 1) a1 = VF{};
          for (int c = 2; c < kNV; c += 2) {
            a0 += qf[m][c] * kr[c];
            if (c + 1 < kNV) a1 += qf[m][c + 1] * kr[c + 1];
          }
          part[m][j] = a0 + a1;
        }
      }
    }
    for (int64_t j = nk; j < kKeyBlock; ++j) {
      for (int m = 0; m < kNQ; ++m) part[m][j] = VF{};
    }
    // Softmax, lane-wise over the block's keys.
    const VF kpos = iota + static_cast<float>(kb);
    const VF kscale = LoadF(ks), vscale = LoadF(vs);
    for (int m = 0; m < kNQ; ++m) {
      VF s = TransposeSum(part[m]) * kscale;
      if (p.soft_cap > 0) {
        for (int i = 0; i < kLanes; ++i) s[i] = p.soft_cap * std::tanh(s[i] / p.soft_cap);
      }
      VI ok = (kpos <= pos[m]) & (kpos < static_cast<float>(kb + nk));
      if (p.window > 0) ok &= kpos > pos[m] - static_cast<float>(p.window);
      s = ok ? s : Splat(kNegInf);
      const float mx = MaxLanes(s);
      if (mx == kNegInf) {  // no key of this block is visible to this query
        alpha[m] = 1.0f;
        StoreF(w[m], VF{});
        continue;
      }
      const float m_new = std::max(mrun[m], mx);
      alpha[m] = Exp(Splat(mrun[m] - m_new))[0];  // m = -inf -> ~0 (acc and lsum are 0 then)
      mrun[m] = m_new;
      VF e = Exp(s - m_new);
      e = ok ? e : Splat(0.0f);
      lsum[m] = lsum[m] * alpha[m] + e;
      StoreF(w[m], e * vscale);
    }
    // P V: kC vectors of head_dim at a time, kNQ x kC accumulators in registers.
    for (int c0 = 0; c0 < kNV; c0 += kC) {
      VF o[kNQ][kC];
      for (int m = 0; m < kNQ; ++m) {
        for (int cc = 0; cc < kC; ++cc) o[m][cc] = acc[m][c0 + cc] * alpha[m];
      }
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t off = rows[j] * d + c0 * kLanes;
        VF vr[kC];
        for (int cc = 0; cc < kC; ++cc) vr[cc] = Widen<kT>(p.v, off + cc * kLanes);
        for (int m = 0; m < kNQ; ++m) {
          const VF wm = Splat(w[m][j]);
          for (int cc = 0; cc < kC; ++cc) o[m][cc] += wm * vr[cc];
        }
      }
      for (int m = 0; m < kNQ; ++m) {
        for (int cc = 0; cc < kC; ++cc) acc[m][c0 + cc] = o[m][cc];
      }
    }
  }
  // Normalize and store.
  for (int64_t m = 0; m < nq; ++m) {
    float l = 0.0f;
    for (int i = 0; i < kLanes; ++i) l += lsum[m][i];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const int64_t dst = ((it.row0 + m / g) * p.hq + h * g + m % g) * d;
    for (int c = 0; c < kNV; ++c) {
      const VF o = acc[m][c] * inv;
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

// Whether an item takes the decode path: one KV head, head_dim 64 / 128 / 256, <= kDecodeMaxQ queries.
inline bool DecodeFits(const Params& p, const Item& it) {
  const int64_t nq = (it.row1 - it.row0) * (p.hq / p.hkv);
  return !it.blocked && it.head1 - it.head0 == 1 && nq <= kDecodeMaxQ && (p.d == 64 || p.d == 128 || p.d == 256);
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
