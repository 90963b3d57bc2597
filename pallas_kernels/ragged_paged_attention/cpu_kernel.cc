// Ragged paged attention for the CPU, as an XLA FFI custom call (see cpu.py, which builds and
// registers it).
//
// Semantics are those of api.ragged_paged_attention on a token-major cache:
//   q      [T, Hq, D]            float32 or bfloat16
//   k, v   [P, page_size, Hkv, D] float32, bfloat16, int8, float8_e4m3fn or float8_e5m2
//   k_scale, v_scale [P, page_size, Hkv] float32 (quantized caches; ignored otherwise)
//   kv_lens i32[S], page_indices i32[S, pages_per_seq], cu_q_lens i32[S + 1], num_seqs i32[1]
//   out    [T, Hq, D] in q's dtype; rows of no sequence are zero.
// Row i of sequence s sits at position kv_lens[s] - q_len + i and attends to keys j <= position
// (and j > position - sliding_window when sliding_window > 0).
//
// Work is split into items spread over XLA's intra-op thread pool, longest first:
// - rows (decode, short chunks): (sequence, block of up to kRowBlock query rows, and all KV heads, or
//   one when there are too few items to keep the pool busy) with all their query vectors. With
//   head_dim 64, 128 or 256 and up to 16 query vectors per KV head the decode path runs them
//   (cpu_decode.h: each key / value row widened once, in registers, for every query vector of its
//   head); otherwise a flash-style online softmax over blocks of kKeyBlock keys read
//   straight from the pages (dequantized into float32 tiles; RunItem below);
// - blocked (prefill: q_len * group >= kMinBlockLanes): (sequence, block of rows, one KV head), with
//   all of its query vectors sharing each key / value tile (cpu_blocked.h).
// Nothing the size of the cache is ever copied. Metadata is clamped so that bad indices can never
// read outside the buffers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_attention_common.h"
#include "cpu_blocked.h"
#include "cpu_decode.h"
#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxinfer_cpu;      // NOLINT: the shared vector types and helpers
using namespace jaxinfer_rpa_cpu;  // NOLINT: the attention kernel's shared pieces

constexpr int kRowBlock = 8;   // query rows (tokens) per work item on the row path

// Lane permutation by a runtime index vector.
#if defined(__clang__)
inline VF SHUFFLE_VAR(VF a, VI idx) {
  VF r;
  for (int i = 0; i < 16; ++i) r[i] = a[idx[i] & 15];
  return r;
}
#else
#define SHUFFLE_VAR(a, idx) __builtin_shuffle(a, idx)
#endif

inline float HorizontalSum(VF x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// Query slot q = (row * nh + kv head) * g + group member; its KV head is (q / g) % nh.
template <KvType kT, int kNV>
void RunItem(const Params& p, const Item& it) {
  const int nv = kNV > 0 ? kNV : static_cast<int>((p.d + kLanes - 1) / kLanes);
  const int64_t d = kNV > 0 ? int64_t{kNV} * kLanes : p.d;  // kNV > 0: head_dim is exactly kNV vectors
  const int64_t g = p.hq / p.hkv;
  const int64_t nh = it.head1 - it.head0;
  const int64_t nrows = it.row1 - it.row0;
  const int64_t nq = nrows * nh * g;
  const int64_t ps = p.page_size;
  constexpr bool kScaled = kT == KvType::kI8 || kT == KvType::kE4M3 || kT == KvType::kE5M2;

  thread_local std::vector<VF> buf;
  buf.resize(static_cast<size_t>(nq * nv * 2 + 2 * nh * kKeyBlock * nv + kKeyBlock + 2 * nq));
  VF* qf = buf.data();                    // [nq, nv] scaled queries
  VF* acc = qf + nq * nv;                 // [nq, nv] unnormalized outputs
  VF* kb_f = acc + nq * nv;               // [nh, kKeyBlock, nv] keys
  VF* vb_f = kb_f + nh * kKeyBlock * nv;  // [nh, kKeyBlock, nv] values
  VF* part = vb_f + nh * kKeyBlock * nv;  // [kKeyBlock] per-key partial dot products
  VF* lsum = part + kKeyBlock;            // [nq] running denominators, lane-wise
  VF* sc = lsum + nq;                     // [nq] this block's scores, then weights
  thread_local std::vector<float> fbuf;
  fbuf.resize(static_cast<size_t>(2 * nq + 2 * nh * kKeyBlock));
  float* m = fbuf.data();                 // [nq] running max
  float* alpha = m + nq;                  // [nq] this block's rescaling of acc
  float* k_scale = alpha + nq;            // [nh, kKeyBlock]
  float* v_scale = k_scale + nh * kKeyBlock;
  int64_t pos[kRowBlock];

  for (int64_t r = 0; r < nrows; ++r) {
    pos[r] = it.kv_len - it.q_len + (it.row0 + r - it.q_start);
    for (int64_t gi = 0; gi < nh * g; ++gi) {
      const int64_t src = ((it.row0 + r) * p.hq + it.head0 * g + gi) * d;
      VF* dst = qf + (r * nh * g + gi) * nv;
      for (int c = 0; c < nv; ++c) {
        VF x{};
        for (int i = 0; i < kLanes && c * kLanes + i < d; ++i) {
          const int64_t at = src + c * kLanes + i;
          x[i] = p.q_bf16 ? Bf16ToF32(static_cast<const uint16_t*>(p.q)[at]) : static_cast<const float*>(p.q)[at];
        }
        dst[c] = x * p.sm_scale;
      }
    }
  }
  for (int64_t i = 0; i < nq * nv; ++i) acc[i] = VF{};
  for (int64_t q = 0; q < nq; ++q) {
    lsum[q] = VF{};
    m[q] = kNegInf;
  }

  const int64_t min_pos = pos[0], max_pos = pos[nrows - 1];
  const int64_t hi = std::min(it.kv_len, max_pos + 1);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, min_pos - p.window + 1) : 0;
  VF iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = static_cast<float>(i);

  const size_t elem = kT == KvType::kF32 ? 4 : kT == KvType::kBf16 ? 2 : 1;
  auto cache_row = [&](int64_t key) {  // row of (key, head0); the item's heads follow it
    int64_t page = p.page_indices[it.seq * p.pages_per_seq + key / ps];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), p.num_pages - 1);
    return (page * ps + key % ps) * p.hkv + it.head0;
  };
  const size_t row_bytes = d * elem;
  for (int64_t kb = lo; kb < hi; kb += kKeyBlock) {
    const int64_t nk = std::min<int64_t>(kKeyBlock, hi - kb);
    // Pages are scattered, so the hardware prefetcher cannot see the next block coming.
    for (int64_t key = kb + kKeyBlock; key < std::min<int64_t>(kb + 2 * kKeyBlock, hi); ++key) {
      const int64_t row = cache_row(key);
      for (size_t b = 0; b < nh * row_bytes; b += 64) {
        Prefetch(static_cast<const char*>(p.k) + row * row_bytes + b);
        Prefetch(static_cast<const char*>(p.v) + row * row_bytes + b);
      }
      if (kScaled) {
        Prefetch(p.k_scale + row);
        Prefetch(p.v_scale + row);
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t row = cache_row(kb + j);
      for (int64_t h = 0; h < nh; ++h) {
        LoadRow<kT>(p.k, row + h, d, nv, kb_f + (h * kKeyBlock + j) * nv);
        LoadRow<kT>(p.v, row + h, d, nv, vb_f + (h * kKeyBlock + j) * nv);
        k_scale[h * kKeyBlock + j] = kScaled ? p.k_scale[row + h] : 1.0f;
        v_scale[h * kKeyBlock + j] = kScaled ? p.v_scale[row + h] : 1.0f;
      }
    }
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t j = nk; j < kKeyBlock; ++j) {
        for (int c = 0; c < nv; ++c) kb_f[(h * kKeyBlock + j) * nv + c] = vb_f[(h * kKeyBlock + j) * nv + c] = VF{};
        k_scale[h * kKeyBlock + j] = v_scale[h * kKeyBlock + j] = 0.0f;
      }
    }
    const VF kpos = iota + static_cast<float>(kb);  // exact: positions < 2^24
    // Three passes over the block's queries (scores, softmax, P @ V) rather than one per query, so
    // the out-of-order core overlaps the long dependency chains of neighbouring queries.
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t h = (q / g) % nh;
      const VF* kh = kb_f + h * kKeyBlock * nv;
      const VF* qv = qf + q * nv;
      for (int j = 0; j < kKeyBlock; ++j) {
        const VF* kr = kh + j * nv;
        VF a = qv[0] * kr[0];
        for (int c = 1; c < nv; ++c) a += qv[c] * kr[c];
        part[j] = a;
      }
      sc[q] = TransposeSum(part) * LoadF(k_scale + h * kKeyBlock);
    }
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t h = (q / g) % nh;
      VF s = sc[q];
      if (p.soft_cap > 0) {
        for (int i = 0; i < kLanes; ++i) s[i] = p.soft_cap * std::tanh(s[i] / p.soft_cap);
      }
      const float rp = static_cast<float>(pos[q / (g * nh)]);
      VI ok = (kpos <= rp) & (kpos < static_cast<float>(kb + nk));
      if (p.window > 0) ok &= kpos > rp - static_cast<float>(p.window);
      s = ok ? s : Splat(kNegInf);
      const float mx = HorizontalMax(s);
      if (mx == kNegInf) {  // no key of this block is visible to this query
        alpha[q] = 1.0f;
        sc[q] = VF{};
        continue;
      }
      const float m_new = std::max(m[q], mx);
      alpha[q] = Exp(Splat(m[q] - m_new))[0];  // m = -inf -> ~0 (acc and lsum are 0 then)
      m[q] = m_new;
      VF e = Exp(s - m_new);
      e = ok ? e : Splat(0.0f);
      lsum[q] = lsum[q] * alpha[q] + e;
      sc[q] = e * LoadF(v_scale + h * kKeyBlock);  // zero past nk: padded keys add nothing
    }
    for (int64_t q = 0; q < nq; ++q) {
      const VF* vh = vb_f + ((q / g) % nh) * kKeyBlock * nv;
      const VF pv = sc[q];
      VF* a = acc + q * nv;
      // Two accumulators per vector (even / odd keys) halve the FMA dependency chains.
      VF o0[kNV > 0 ? kNV : kMaxVecs], o1[kNV > 0 ? kNV : kMaxVecs];
      for (int c = 0; c < nv; ++c) {
        o0[c] = a[c] * alpha[q];
        o1[c] = VF{};
      }
#pragma GCC unroll 8
      for (int j = 0; j < kKeyBlock; j += 2) {
        // Lanes j, j + 1 broadcast in registers.
        const VF w0 = SHUFFLE_VAR(pv, VI{} + j);
        const VF w1 = SHUFFLE_VAR(pv, VI{} + (j + 1));
        const VF* v0 = vh + j * nv;
        const VF* v1 = v0 + nv;
        for (int c = 0; c < nv; ++c) {
          o0[c] += w0 * v0[c];
          o1[c] += w1 * v1[c];
        }
      }
      for (int c = 0; c < nv; ++c) a[c] = o0[c] + o1[c];
    }
  }
  // Normalize and store.
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t gi = 0; gi < nh * g; ++gi) {
      const int64_t q = r * nh * g + gi;
      const float l = HorizontalSum(lsum[q]);
      const float inv = l > 0 ? 1.0f / l : 0.0f;
      const int64_t dst = ((it.row0 + r) * p.hq + it.head0 * g + gi) * d;
      for (int c = 0; c < nv; ++c) {
        const VF o = acc[q * nv + c] * inv;
        for (int i = 0; i < kLanes && c * kLanes + i < d; ++i) {
          const int64_t at = dst + c * kLanes + i;
          if (p.q_bf16) {
            static_cast<uint16_t*>(p.out)[at] = F32ToBf16(o[i]);
          } else {
            static_cast<float*>(p.out)[at] = o[i];
          }
        }
      }
    }
  }
}

template <KvType kT>
void RunItemForType(const Params& p, const Item& it) {
  switch (p.d) {
    case 64:
      return RunItem<kT, 4>(p, it);
    case 128:
      return RunItem<kT, 8>(p, it);
    default:
      return RunItem<kT, 0>(p, it);
  }
}

void RunItemAny(const Params& p, const Item& it) {
  switch (p.kv_type) {
    case KvType::kF32:
      return RunItemForType<KvType::kF32>(p, it);
    case KvType::kBf16:
      return RunItemForType<KvType::kBf16>(p, it);
    case KvType::kI8:
      return RunItemForType<KvType::kI8>(p, it);
    case KvType::kE4M3:
      return RunItemForType<KvType::kE4M3>(p, it);
    case KvType::kE5M2:
      return RunItemForType<KvType::kE5M2>(p, it);
  }
}


void RunAny(const Params& p, const Item& it) {
  if (DecodeFits(p, it)) return RunDecode(p, it);
  if (!it.blocked) return RunItemAny(p, it);
  const bool bf16 = kHaveBf16Dot && p.q_bf16 && p.kv_type != KvType::kF32 && p.d % 2 == 0;
  return bf16 ? RunBlocked<true>(p, it) : RunBlocked<false>(p, it);
}

ffi::Error RaggedPagedAttentionCpu(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                   ffi::AnyBuffer v, ffi::Buffer<ffi::F32> k_scale,
                                   ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> kv_lens,
                                   ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                                   ffi::Buffer<ffi::S32> num_seqs, ffi::Result<ffi::AnyBuffer> out,
                                   float sm_scale, int64_t sliding_window, float soft_cap) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2) {
    return ffi::Error::InvalidArgument("expected q [T, Hq, D], k/v [P, ps, Hkv, D], page_indices [S, P]");
  }
  Params p{};
  p.t = qd[0];
  p.hq = qd[1];
  p.d = qd[2];
  p.num_pages = kd[0];
  p.page_size = kd[1];
  p.hkv = kd[2];
  p.pages_per_seq = pd[1];
  const int64_t s_max = pd[0];
  if (kd[3] != p.d || p.hkv <= 0 || p.hq % p.hkv != 0 || p.num_pages <= 0 || p.page_size <= 0) {
    return ffi::Error::InvalidArgument("inconsistent q / cache shapes");
  }
  if (p.d > kLanes * kMaxVecs) {
    return ffi::Error::InvalidArgument("head_dim > 256");
  }
  if (kv_lens.element_count() != static_cast<size_t>(s_max) ||
      cu_q_lens.element_count() != static_cast<size_t>(s_max + 1) || num_seqs.element_count() != 1) {
    return ffi::Error::InvalidArgument("kv_lens, cu_q_lens, num_seqs do not match page_indices");
  }
  if (q.element_type() == ffi::F32) {
    p.q_bf16 = false;
  } else if (q.element_type() == ffi::BF16) {
    p.q_bf16 = true;
  } else {
    return ffi::Error::InvalidArgument("q must be float32 or bfloat16");
  }
  if (out->element_type() != q.element_type() || out->element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument("out must match q");
  }
  switch (k.element_type()) {
    case ffi::F32: p.kv_type = KvType::kF32; break;
    case ffi::BF16: p.kv_type = KvType::kBf16; break;
    case ffi::S8: p.kv_type = KvType::kI8; break;
    case ffi::F8E4M3FN: p.kv_type = KvType::kE4M3; break;
    case ffi::F8E5M2: p.kv_type = KvType::kE5M2; break;
    default:
      return ffi::Error::InvalidArgument("unsupported KV cache dtype");
  }
  if (v.element_type() != k.element_type() || v.element_count() != k.element_count()) {
    return ffi::Error::InvalidArgument("k and v must match");
  }
  const bool quantized = p.kv_type == KvType::kI8 || p.kv_type == KvType::kE4M3 || p.kv_type == KvType::kE5M2;
  const size_t n_scales = static_cast<size_t>(p.num_pages * p.page_size * p.hkv);
  if (quantized && (k_scale.element_count() != n_scales || v_scale.element_count() != n_scales)) {
    return ffi::Error::InvalidArgument("k_scale / v_scale must be [P, page_size, Hkv]");
  }
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.k_scale = quantized ? k_scale.typed_data() : nullptr;
  p.v_scale = quantized ? v_scale.typed_data() : nullptr;
  p.out = out->untyped_data();
  p.page_indices = page_indices.typed_data();
  p.sm_scale = sm_scale;
  p.window = sliding_window;
  p.soft_cap = soft_cap;

  std::memset(p.out, 0, out->size_bytes());
  const int32_t* lens = kv_lens.typed_data();
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t n_seqs = std::min<int64_t>(std::max<int32_t>(num_seqs.typed_data()[0], 0), s_max);
  const int64_t max_kv = p.pages_per_seq * p.page_size;
  // Sequences with many query lanes per KV head (q_len * group >= kMinBlockLanes: prefill) take the
  // blocked path, one item per (sequence, block of rows, KV head). The rest are units (sequence,
  // block of kRowBlock rows): with enough work items for the pool, an item takes all KV heads of a
  // unit (a token's rows for all heads are adjacent in a page); otherwise one head each.
  const int64_t g = p.hq / p.hkv;
  const int64_t block_rows = std::max<int64_t>(kLanes * kBlockVecs / g, 1);
  std::vector<Item> units, blocked;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t q0 = std::min<int64_t>(std::max<int32_t>(cu[s], 0), p.t);
    const int64_t q1 = std::min<int64_t>(std::max<int64_t>(cu[s + 1], q0), p.t);
    const int64_t kv_len = std::min<int64_t>(std::max<int32_t>(lens[s], 0), max_kv);
    if (q1 == q0 || kv_len == 0) continue;
    const bool block = (q1 - q0) * g >= kMinBlockLanes && g <= kLanes * kBlockVecs;
    const int64_t n_blocks = block ? (q1 - q0 + block_rows - 1) / block_rows : 0;
    const int64_t step = block ? (q1 - q0 + n_blocks - 1) / n_blocks : kRowBlock;  // even blocks
    for (int64_t r0 = q0; r0 < q1; r0 += step) {
      const int64_t r1 = std::min<int64_t>(r0 + step, q1);
      const int64_t last_pos = kv_len - (q1 - q0) + (r1 - 1 - q0);
      const int64_t keys = std::max<int64_t>(std::min(last_pos + 1, kv_len), 0);
      const int64_t cost = keys * (r1 - r0) + 64;  // per KV head
      if (block) {
        for (int64_t h = 0; h < p.hkv; ++h) blocked.push_back(Item{s, h, h + 1, r0, r1, q0, q1 - q0, kv_len, cost, true});
      } else {
        units.push_back(Item{s, 0, p.hkv, r0, r1, q0, q1 - q0, kv_len, cost * p.hkv, false});
      }
    }
  }
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  std::vector<Item> items = std::move(blocked);
  if (static_cast<int64_t>(units.size() + items.size()) >= 8 * threads) {
    items.insert(items.end(), units.begin(), units.end());
  } else {
    for (const Item& u : units) {
      for (int64_t h = 0; h < p.hkv; ++h) {
        Item it = u;
        it.head0 = h;
        it.head1 = h + 1;
        it.cost = u.cost / p.hkv;
        items.push_back(it);
      }
    }
  }
  if (items.empty()) return ffi::Error::Success();
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  ParallelFor(pool, static_cast<int64_t>(items.size()), threads - 1,
              [&p, &items](int64_t i) { RunAny(p, items[i]); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferRaggedPagedAttentionCpu, RaggedPagedAttentionCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()       // q
                                  .Arg<ffi::AnyBuffer>()       // k
                                  .Arg<ffi::AnyBuffer>()       // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Ret<ffi::AnyBuffer>()       // out
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
