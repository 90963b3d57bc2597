// The CPU attention kernel's blocked prefill path (included by cpu_kernel.cc; see RunBlockedItem).

#pragma once

#include "cpu_attention_common.h"

namespace jaxinfer_rpa_cpu {

constexpr int kBlockVecs = 4;    // query vectors per blocked item: up to 64 (row, group member) lanes
constexpr int kMinBlockLanes = 16;  // a sequence with q_len * group >= this takes the blocked path
constexpr int kKeyGroup = 4;     // keys per register block in Q K^T
constexpr int kDimGroup = 4;     // head_dim entries per register block in P V

#if defined(__AVX512BF16__)
constexpr bool kHaveBf16Dot = true;
// acc + a[2i] * b[2i] + a[2i+1] * b[2i+1] lane-wise, a and b holding bfloat16 pairs (vdpbf16ps).
inline VF DotBf16(VF acc, VU a, VU b) { return (VF)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b); }
#else
constexpr bool kHaveBf16Dot = false;
inline VF DotBf16(VF acc, VU, VU) { return acc; }  // never called (kHaveBf16Dot is false)
#endif

#if defined(JAXINFER_AVX2_ONLY)
constexpr bool kAvx2Blocks = true;
// AVX2 (16 ymm registers, two per 16-lane vector): the generic float32 blocks below (4 keys or entries x
// kQV vectors, up to 32 ymm accumulators) went through the stack on every step. These keep at most
// 16 / kQV ymm accumulators (8 at kQV = 4) in registers, the query / weight vectors read as FMA operands.
constexpr int Avx2Group(int qv) { return qv >= 3 ? 1 : qv == 2 ? 2 : 4; }  // divides kKeyBlock and 16

// sc[jj][:] = ks[jj] * sum_dd k[jj][dd] * qt[dd][:] for kG keys (rows of kr, dp apart); qt and sc rows
// hold kQV * 16 floats.
template <int kQV, int kG>
inline void ScoresAvx2(const float* kr, int64_t dp, int64_t d, const float* qt, const float* ks, float* sc) {
  constexpr int kW = 2 * kQV;  // ymm vectors per row
  __m256 acc[kG][kW];
#pragma GCC unroll 8
  for (int jj = 0; jj < kG; ++jj)
#pragma GCC unroll 8
    for (int c = 0; c < kW; ++c) acc[jj][c] = _mm256_setzero_ps();
  for (int64_t dd = 0; dd < d; ++dd) {
    const float* qd = qt + dd * kW * 8;
#pragma GCC unroll 8
    for (int jj = 0; jj < kG; ++jj) {
      const __m256 b = _mm256_broadcast_ss(kr + jj * dp + dd);
#pragma GCC unroll 8
      for (int c = 0; c < kW; ++c) acc[jj][c] = _mm256_fmadd_ps(b, _mm256_loadu_ps(qd + c * 8), acc[jj][c]);
    }
  }
#pragma GCC unroll 8
  for (int jj = 0; jj < kG; ++jj) {
    const __m256 s = _mm256_set1_ps(ks[jj]);
#pragma GCC unroll 8
    for (int c = 0; c < kW; ++c) _mm256_storeu_ps(sc + (jj * kW + c) * 8, _mm256_mul_ps(acc[jj][c], s));
  }
}

// ot[d0 + i][:] = alpha * ot[d0 + i][:] + sum_j w[j][:] * v[j][d0 + i] for kG entries i (v rows dp apart);
// ot and w rows hold kQV * 16 floats.
template <int kQV, int kG>
inline void WeightedSumAvx2(const float* vt, int64_t dp, int64_t d0, int64_t nk, const float* w, const float* alpha,
                            float* ot) {
  constexpr int kW = 2 * kQV;
  __m256 acc[kG][kW];
#pragma GCC unroll 8
  for (int i = 0; i < kG; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < kW; ++c)
      acc[i][c] = _mm256_mul_ps(_mm256_loadu_ps(ot + ((d0 + i) * kW + c) * 8), _mm256_loadu_ps(alpha + c * 8));
  for (int64_t j = 0; j < nk; ++j) {
    const float* vr = vt + j * dp + d0;
    const float* wj = w + j * kW * 8;
#pragma GCC unroll 8
    for (int i = 0; i < kG; ++i) {
      const __m256 b = _mm256_broadcast_ss(vr + i);
#pragma GCC unroll 8
      for (int c = 0; c < kW; ++c) acc[i][c] = _mm256_fmadd_ps(b, _mm256_loadu_ps(wj + c * 8), acc[i][c]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kG; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < kW; ++c) _mm256_storeu_ps(ot + ((d0 + i) * kW + c) * 8, acc[i][c]);
}
#else
constexpr bool kAvx2Blocks = false;
template <int kQV, int kG>  // declared only: calls sit in branches discarded when kAvx2Blocks is false
void ScoresAvx2(const float* kr, int64_t dp, int64_t d, const float* qt, const float* ks, float* sc);
template <int kQV, int kG>
void WeightedSumAvx2(const float* vt, int64_t dp, int64_t d0, int64_t nk, const float* w, const float* alpha,
                     float* ot);
constexpr int Avx2Group(int) { return 1; }
#endif

// Round to the nearest bfloat16, kept in the top half of each lane (finite, non-negative x).
inline VU RoundBf16High(VF x) {
  const VU u = (VU)x;
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

// A blocked work item (prefill rows): one KV head and up to 16 * kQV query lanes, lane m being row
// row0 + m / g, group member m % g. Queries and outputs are held transposed ([head_dim][lanes]), so
// Q K^T is a sum over head_dim of a broadcast key entry times a query vector, P V a sum over keys of
// a broadcast value entry times a weight vector, and the online softmax runs lane-wise over key
// vectors (no horizontal reductions). Each dequantized key / value tile serves every lane.
//
// kBf16 (bfloat16 queries, a 16- or 8-bit cache, even head_dim, AVX512-BF16): both products run on
// vdpbf16ps over bfloat16 pairs with float32 accumulation. Queries and cache entries are bfloat16
// values already (int8 and fp8 values are exact in bfloat16), so Q K^T is exact products summed in
// float32; the softmax stays float32 and only the weights are rounded to bfloat16 (relative error
// <= 2^-9 each) before P V.
template <int kD, int kQV, bool kBf16>
void RunBlockedItem(const Params& p, const Item& it) {
  const int64_t d = kD > 0 ? kD : p.d;
  const int nv = static_cast<int>((d + kLanes - 1) / kLanes);
  const int64_t dp = int64_t{nv} * kLanes;  // head_dim padded to whole vectors
  const int64_t g = p.hq / p.hkv;
  const int64_t h = it.head0;
  const int64_t nrows = it.row1 - it.row0;
  const int64_t nm = nrows * g;  // <= kLanes * kQV
  const int64_t ps = p.page_size;
  const bool scaled = p.k_scale != nullptr;
  const int64_t qrows = kBf16 ? dp / 2 : d;  // rows of the transposed queries (pairs of entries in bf16)

  thread_local std::vector<VF> buf;
  buf.resize(static_cast<size_t>((qrows + dp) * kQV + kKeyBlock * kQV + kKeyBlock / 2 * kQV + 4 * kKeyBlock * nv));
  VF* qt = buf.data();                 // [qrows][kQV] queries (f32, scaled; or raw bf16 pairs)
  VF* ot = qt + qrows * kQV;           // [dp][kQV] unnormalized outputs
  VF* sc = ot + dp * kQV;              // [kKeyBlock][kQV] scores, then weights
  VU* wp = reinterpret_cast<VU*>(sc + kKeyBlock * kQV);  // [kKeyBlock / 2][kQV] bf16 weight pairs
  VF* kt = reinterpret_cast<VF*>(wp + kKeyBlock / 2 * kQV);  // [kKeyBlock][nv] keys (unscaled)
  VF* vt = kt + kKeyBlock * nv;        // [kKeyBlock][nv] values (unscaled)
  VU* pt = reinterpret_cast<VU*>(vt + kKeyBlock * nv);  // bf16: keys [kKeyBlock][kw] as pairs of
  // entries, then values [kKeyBlock / 2][dp] as pairs of keys
  const float* ktf = reinterpret_cast<const float*>(kt);
  const float* vtf = reinterpret_cast<const float*>(vt);
  const uint32_t* kpw = reinterpret_cast<const uint32_t*>(pt);
  const int64_t kw = (nv + 1) / 2 * kLanes;  // words per key row in bf16 pairs
  const uint32_t* vpw = kpw + kKeyBlock * kw;
  float ks[kKeyBlock], vs[kKeyBlock];

  // Lane positions; lanes past nm repeat the last row (their output is dropped).
  const int64_t pos0 = it.kv_len - it.q_len + (it.row0 - it.q_start);
  VF posv[kQV];
  for (int c = 0; c < kQV; ++c) {
    for (int i = 0; i < kLanes; ++i) {
      const int64_t m = std::min<int64_t>(c * kLanes + i, nm - 1);
      posv[c][i] = static_cast<float>(pos0 + m / g);  // exact: positions < 2^24
    }
  }
  for (int64_t i = 0; i < qrows * kQV; ++i) qt[i] = VF{};
  for (int64_t m = 0; m < nm; ++m) {
    const int64_t src = ((it.row0 + m / g) * p.hq + h * g + m % g) * d;
    if constexpr (kBf16) {
      uint32_t* qw = reinterpret_cast<uint32_t*>(qt);
      const uint16_t* qs = static_cast<const uint16_t*>(p.q) + src;
      for (int64_t i = 0; i < d / 2; ++i) {
        qw[i * kQV * kLanes + m] = qs[2 * i] | (static_cast<uint32_t>(qs[2 * i + 1]) << 16);
      }
    } else {
      float* qf = reinterpret_cast<float*>(qt);
      for (int64_t dd = 0; dd < d; ++dd) {
        const float x = p.q_bf16 ? Bf16ToF32(static_cast<const uint16_t*>(p.q)[src + dd])
                                 : static_cast<const float*>(p.q)[src + dd];
        qf[dd * kQV * kLanes + m] = x * p.sm_scale;
      }
    }
  }
  for (int64_t i = 0; i < dp * kQV; ++i) ot[i] = VF{};
  VF mrun[kQV], lsum[kQV];
  for (int c = 0; c < kQV; ++c) {
    mrun[c] = Splat(kNegInf);
    lsum[c] = VF{};
  }

  const int64_t min_pos = pos0, max_pos = pos0 + nrows - 1;
  const int64_t hi = std::min(it.kv_len, max_pos + 1);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, min_pos - p.window + 1) : 0;
  const size_t elem = p.kv_type == KvType::kF32 ? 4 : p.kv_type == KvType::kBf16 ? 2 : 1;
  const size_t row_bytes = d * elem;
  const float score_scale = kBf16 ? p.sm_scale : 1.0f;  // f32 queries are scaled up front
  auto cache_row = [&](int64_t key) {
    int64_t page = p.page_indices[it.seq * p.pages_per_seq + key / ps];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), p.num_pages - 1);
    return (page * ps + key % ps) * p.hkv + h;
  };
  for (int64_t kb = lo; kb < hi; kb += kKeyBlock) {
    const int64_t nk = std::min<int64_t>(kKeyBlock, hi - kb);
    for (int64_t key = kb + kKeyBlock; key < std::min<int64_t>(kb + 2 * kKeyBlock, hi); ++key) {
      const int64_t row = cache_row(key);
      for (size_t b = 0; b < row_bytes; b += 64) {
        Prefetch(static_cast<const char*>(p.k) + row * row_bytes + b);
        Prefetch(static_cast<const char*>(p.v) + row * row_bytes + b);
      }
    }
    int64_t rows[kKeyBlock];
    for (int64_t j = 0; j < nk; ++j) {
      rows[j] = cache_row(kb + j);
      ks[j] = (scaled ? p.k_scale[rows[j]] : 1.0f) * score_scale;
      vs[j] = scaled ? p.v_scale[rows[j]] : 1.0f;
    }
    LoadRowsAny<kD>(p.kv_type, p.k, rows, nk, d, nv, kt);
    LoadRowsAny<kD>(p.kv_type, p.v, rows, nk, d, nv, vt);
    for (int64_t j = nk; j < kKeyBlock; ++j) {
      for (int c = 0; c < nv; ++c) kt[j * nv + c] = vt[j * nv + c] = VF{};
      ks[j] = vs[j] = 0.0f;
    }
    if constexpr (kBf16) {  // exact: every entry is a bfloat16 value
      VU* kp = pt;
      for (int64_t j = 0; j < kKeyBlock; ++j) {  // word i of key j: entries (2i, 2i + 1)
        for (int c = 0; c < nv; c += 2) {
          const VU lo_h = (VU)kt[j * nv + c], hi_h = c + 1 < nv ? (VU)kt[j * nv + c + 1] : VU{};
          const VU even = SHUFFLE(lo_h, hi_h, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
          const VU odd = SHUFFLE(lo_h, hi_h, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
          const VU w = (even >> 16) | (odd & 0xffff0000u);  // bf16 bits of entries c*16 .. c*16+31
          kp[j * kw / kLanes + c / 2] = w;
        }
      }
      VU* vp = pt + kKeyBlock * kw / kLanes;  // word dd of pair jp: keys (2jp, 2jp + 1)
      for (int64_t jp = 0; jp < kKeyBlock / 2; ++jp) {
        for (int c = 0; c < nv; ++c) {
          vp[jp * nv + c] = ((VU)vt[2 * jp * nv + c] >> 16) | ((VU)vt[(2 * jp + 1) * nv + c] & 0xffff0000u);
        }
      }
    }

    // Scores: sc[j][c] = sum_dd k[j][dd] * q[dd][c], kKeyGroup keys x kQV vectors per register block.
    if constexpr (kAvx2Blocks && !kBf16) {
      constexpr int kG = Avx2Group(kQV);
      for (int64_t j0 = 0; j0 < nk; j0 += kG) {
        ScoresAvx2<kQV, kG>(ktf + j0 * dp, dp, d, reinterpret_cast<const float*>(qt), ks + j0,
                            reinterpret_cast<float*>(sc + j0 * kQV));
      }
    } else {
      for (int64_t j0 = 0; j0 < nk; j0 += kKeyGroup) {
        VF acc[kKeyGroup][kQV];
        for (int jj = 0; jj < kKeyGroup; ++jj) {
          for (int c = 0; c < kQV; ++c) acc[jj][c] = VF{};
        }
        if constexpr (kBf16) {
          const uint32_t* kr = kpw + j0 * kw;
          for (int64_t i = 0; i < d / 2; ++i) {
            const VU* qd = reinterpret_cast<const VU*>(qt) + i * kQV;
            for (int jj = 0; jj < kKeyGroup; ++jj) {
              const VU b = VU{} + kr[jj * kw + i];
              for (int c = 0; c < kQV; ++c) acc[jj][c] = DotBf16(acc[jj][c], b, qd[c]);
            }
          }
        } else {
          const float* kr = ktf + j0 * dp;
          for (int64_t dd = 0; dd < d; ++dd) {
            const VF* qd = qt + dd * kQV;
            for (int jj = 0; jj < kKeyGroup; ++jj) {
              const VF b = Splat(kr[jj * dp + dd]);
              for (int c = 0; c < kQV; ++c) acc[jj][c] += b * qd[c];
            }
          }
        }
        for (int jj = 0; jj < kKeyGroup; ++jj) {
          for (int c = 0; c < kQV; ++c) sc[(j0 + jj) * kQV + c] = acc[jj][c] * ks[j0 + jj];
        }
      }
    }
    if (p.soft_cap > 0) {
      float* f = reinterpret_cast<float*>(sc);
      for (int64_t i = 0; i < kKeyBlock * kQV * kLanes; ++i) f[i] = p.soft_cap * std::tanh(f[i] / p.soft_cap);
    }
    // Masking is needed where a key can be invisible to some lane: the causal diagonal, the window's
    // edge, or a partial block (whose unused scores are stale).
    const bool masked = kb + kKeyBlock - 1 > min_pos || nk < kKeyBlock || (p.window > 0 && kb <= max_pos - p.window);
    if (masked) {
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const float kp = static_cast<float>(kb + j);
        for (int c = 0; c < kQV; ++c) {
          VI ok = posv[c] >= kp;
          if (j >= nk) ok = VI{};
          if (p.window > 0) ok &= posv[c] < kp + static_cast<float>(p.window);
          sc[j * kQV + c] = ok ? sc[j * kQV + c] : Splat(kNegInf);
        }
      }
    }
    VF alpha[kQV], muse[kQV];
    for (int c = 0; c < kQV; ++c) {
      VF mx = sc[c];
      for (int64_t j = 1; j < kKeyBlock; ++j) mx = mx > sc[j * kQV + c] ? mx : sc[j * kQV + c];
      const VF mnew = mrun[c] > mx ? mrun[c] : mx;
      muse[c] = mnew == kNegInf ? Splat(0.0f) : mnew;  // lanes that have seen no key yet
      alpha[c] = Exp(mrun[c] - muse[c]);  // -inf -> ~0, and acc, lsum are 0 there
      mrun[c] = mnew;
    }
    for (int c = 0; c < kQV; ++c) {
      VF l = lsum[c] * alpha[c];
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const VF s = sc[j * kQV + c];
        VF e = Exp(s - muse[c]);
        if (masked) e = s == kNegInf ? Splat(0.0f) : e;
        l += e;
        sc[j * kQV + c] = e * vs[j];  // zero past nk
      }
      lsum[c] = l;
    }
    // P V: ot[dd][c] = alpha * ot[dd][c] + sum_j w[j][c] * v[j][dd], kDimGroup entries x kQV vectors.
    if constexpr (kBf16) {
      const int64_t npairs = (nk + 1) / 2;
      for (int64_t jp = 0; jp < npairs; ++jp) {
        for (int c = 0; c < kQV; ++c) {
          wp[jp * kQV + c] = (RoundBf16High(sc[2 * jp * kQV + c]) >> 16) | RoundBf16High(sc[(2 * jp + 1) * kQV + c]);
        }
      }
      for (int64_t d0 = 0; d0 < dp; d0 += kDimGroup) {
        VF acc[kDimGroup][kQV];
        for (int i = 0; i < kDimGroup; ++i) {
          for (int c = 0; c < kQV; ++c) acc[i][c] = ot[(d0 + i) * kQV + c] * alpha[c];
        }
        for (int64_t jp = 0; jp < npairs; ++jp) {
          const uint32_t* vr = vpw + jp * dp + d0;
          for (int i = 0; i < kDimGroup; ++i) {
            const VU b = VU{} + vr[i];
            for (int c = 0; c < kQV; ++c) acc[i][c] = DotBf16(acc[i][c], b, wp[jp * kQV + c]);
          }
        }
        for (int i = 0; i < kDimGroup; ++i) {
          for (int c = 0; c < kQV; ++c) ot[(d0 + i) * kQV + c] = acc[i][c];
        }
      }
    } else if constexpr (kAvx2Blocks) {
      constexpr int kG = Avx2Group(kQV);
      for (int64_t d0 = 0; d0 < dp; d0 += kG) {
        WeightedSumAvx2<kQV, kG>(vtf, dp, d0, nk, reinterpret_cast<const float*>(sc),
                                 reinterpret_cast<const float*>(alpha), reinterpret_cast<float*>(ot));
      }
    } else {
      for (int64_t d0 = 0; d0 < dp; d0 += kDimGroup) {
        VF acc[kDimGroup][kQV];
        for (int i = 0; i < kDimGroup; ++i) {
          for (int c = 0; c < kQV; ++c) acc[i][c] = ot[(d0 + i) * kQV + c] * alpha[c];
        }
        for (int64_t j = 0; j < nk; ++j) {
          const float* vr = vtf + j * dp + d0;
          for (int i = 0; i < kDimGroup; ++i) {
            const VF b = Splat(vr[i]);
            for (int c = 0; c < kQV; ++c) acc[i][c] += b * sc[j * kQV + c];
          }
        }
        for (int i = 0; i < kDimGroup; ++i) {
          for (int c = 0; c < kQV; ++c) ot[(d0 + i) * kQV + c] = acc[i][c];
        }
      }
    }
  }
  // Normalize and store.
  const float* otf = reinterpret_cast<const float*>(ot);
  const float* lf = reinterpret_cast<const float*>(lsum);
  for (int64_t m = 0; m < nm; ++m) {
    const float l = lf[m];
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    const int64_t dst = ((it.row0 + m / g) * p.hq + h * g + m % g) * d;
    for (int64_t dd = 0; dd < d; ++dd) {
      const float o = otf[dd * kQV * kLanes + m] * inv;
      if (p.q_bf16) {
        static_cast<uint16_t*>(p.out)[dst + dd] = F32ToBf16(o);
      } else {
        static_cast<float*>(p.out)[dst + dd] = o;
      }
    }
  }
}

template <int kD, bool kBf16>
void RunBlockedForDim(const Params& p, const Item& it) {
  const int64_t nm = (it.row1 - it.row0) * (p.hq / p.hkv);
  switch ((nm + kLanes - 1) / kLanes) {
    case 1: return RunBlockedItem<kD, 1, kBf16>(p, it);
    case 2: return RunBlockedItem<kD, 2, kBf16>(p, it);
    case 3: return RunBlockedItem<kD, 3, kBf16>(p, it);
    default: return RunBlockedItem<kD, kBlockVecs, kBf16>(p, it);
  }
}

template <bool kBf16>
void RunBlocked(const Params& p, const Item& it) {
  switch (p.d) {
    case 64: return RunBlockedForDim<64, kBf16>(p, it);
    case 128: return RunBlockedForDim<128, kBf16>(p, it);
    default: return RunBlockedForDim<0, kBf16>(p, it);
  }
}

}  // namespace jaxinfer_rpa_cpu
