// RMSNorm, residual add + RMSNorm and SwiGLU over rows, as XLA FFI custom calls (see cpu.py, which builds
// and registers them). Every array is [R, E] row-major, float32 or bfloat16 (both operands and the results
// in the same dtype); a row's arithmetic is float32 and each result is rounded once to the dtype:
//
//   JaxinferRmsNormCpu:    y = x * rsqrt(mean(x^2) + eps) * scale          (scale f32[E], eps an attribute)
//   JaxinferAddRmsNormCpu: s = x + a (rounded), y = RMSNorm(s); returns (y, s)
//   JaxinferSwigluCpu:     y = silu(g) * u; with bfloat16 operands silu(g) is rounded to bfloat16 before
//                          the product (PyTorch's rounding, as the XLA path does)
//
// XLA:CPU ran each of these as a fusion that converts every bfloat16 element on its own: 0.2-0.6 ms per call
// at a 512-token step's shapes of the default model (30-40 ms of the step over 30 layers); here a row is read
// and written once with 16-lane vectors, rows spread over XLA's intra-op thread pool. bfloat16 results are
// rounded to nearest even (vcvtneps2bf16 where the CPU has AVX512-BF16, which flushes float32 denormals to
// zero).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxinfer_cpu;  // NOLINT: the shared vector types and helpers

constexpr int64_t kParallelMinElements = 1 << 15;  // smaller arrays run on the calling thread alone
constexpr int64_t kItemElements = 1 << 13;         // elements per work item (whole rows)

// 16 values at p as float32, and back (bfloat16 rounded to nearest even; NaN stays NaN).
inline VF Load(const float* p) { return LoadF(p); }
inline VF Load(const uint16_t* p) { return LoadBf16(p); }

inline void Store(float* p, VF v) { StoreF(p, v); }
inline void Store(uint16_t* p, VF v) {
#if defined(__AVX512BF16__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(f));
#else
  for (int l = 0; l < kLanes; ++l) p[l] = F32ToBf16(v[l]);
#endif
}

inline float Load1(const float* p) { return *p; }
inline float Load1(const uint16_t* p) { return Bf16ToF32(*p); }
inline void Store1(float* p, float v) { *p = v; }
inline void Store1(uint16_t* p, float v) { *p = F32ToBf16(v); }

// The value a float32 takes when stored as T and read back.
inline VF Round(VF v, const float*) { return v; }
inline VF Round(VF v, const uint16_t*) {
  uint16_t h[kLanes];
  Store(h, v);
  return LoadBf16(h);
}

// y[0:e] = x * rsqrt(mean(x^2) + eps) * scale for one row (x read twice, the second time from L1).
template <typename T>
void NormRow(const T* x, const float* scale, float eps, int64_t e, T* y) {
  VF acc0 = Splat(0.0f), acc1 = Splat(0.0f);
  int64_t i = 0;
  for (; i + 2 * kLanes <= e; i += 2 * kLanes) {
    const VF a = Load(x + i), b = Load(x + i + kLanes);
    acc0 += a * a;
    acc1 += b * b;
  }
  for (; i + kLanes <= e; i += kLanes) {
    const VF a = Load(x + i);
    acc0 += a * a;
  }
  const VF acc = acc0 + acc1;
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; i < e; ++i) sum += Load1(x + i) * Load1(x + i);
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(e) + eps);
  const VF rv = Splat(r);
  i = 0;
  for (; i + kLanes <= e; i += kLanes) Store(y + i, Load(x + i) * rv * LoadF(scale + i));
  for (; i < e; ++i) Store1(y + i, Load1(x + i) * r * scale[i]);
}

// s = x + a (rounded to T), then NormRow(s).
template <typename T>
void AddNormRow(const T* x, const T* a, const float* scale, float eps, int64_t e, T* y, T* s) {
  int64_t i = 0;
  for (; i + kLanes <= e; i += kLanes) Store(s + i, Load(x + i) + Load(a + i));
  for (; i < e; ++i) Store1(s + i, Load1(x + i) + Load1(a + i));
  NormRow(static_cast<const T*>(s), scale, eps, e, y);
}

// 1 / d for d in [1, 2]: the 14-bit reciprocal estimate and one Newton step (within ~2 ulp of float32).
inline VF Reciprocal(VF d) {
#if defined(__AVX512F__)
  __m512 dv;
  std::memcpy(&dv, &d, sizeof(dv));
  const __m512 r0 = _mm512_rcp14_ps(dv);
  VF r;
  std::memcpy(&r, &r0, sizeof(r));
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// silu(g) = g * sigmoid(g), with exp of a non-positive argument only: sigmoid(g) = 1 / (1 + exp(-g)) for
// g >= 0 and exp(g) / (1 + exp(g)) for g < 0.
inline VF Silu(VF g) {
  const VF neg = g < 0.0f ? g : -g;  // -|g| (NaN stays NaN)
  const VF e = Exp(neg);
  const VF num = g < 0.0f ? e : Splat(1.0f);
  return g * (num * Reciprocal(1.0f + e));
}

template <typename T>
void SwigluRow(const T* g, const T* u, int64_t e, T* y) {
  const T* tag = nullptr;
  int64_t i = 0;
  for (; i + kLanes <= e; i += kLanes) Store(y + i, Round(Silu(Load(g + i)), tag) * Load(u + i));
  if (i < e) {  // the tail through a padded vector, so it rounds the same way
    T gb[kLanes] = {}, ub[kLanes] = {}, yb[kLanes];
    std::copy(g + i, g + e, gb);
    std::copy(u + i, u + e, ub);
    Store(yb, Round(Silu(Load(gb)), tag) * Load(ub));
    std::copy(yb, yb + (e - i), y + i);
  }
}

// Rows [0, r) of width e, in items of whole rows, on the pool when the array is large enough.
template <typename Fn>
void ForRowBlocks(ffi::ThreadPool& pool, int64_t r, int64_t e, Fn fn) {
  const int64_t per = std::max<int64_t>(1, kItemElements / std::max<int64_t>(e, 1));
  const int64_t items = (r + per - 1) / per;
  const int64_t helpers = r * e < kParallelMinElements ? 0 : std::max<int64_t>(pool.num_threads(), 1) - 1;
  ParallelFor(pool, items, helpers, [&](int64_t it) {
    const int64_t r1 = std::min(r, (it + 1) * per);
    for (int64_t row = it * per; row < r1; ++row) fn(row);
  });
}

bool Rows(const ffi::AnyBuffer& x, int64_t* r, int64_t* e) {
  auto d = x.dimensions();
  if (d.size() != 2) return false;
  *r = d[0];
  *e = d[1];
  return true;
}

bool SupportedType(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::Error RmsNormCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, float eps,
                      ffi::Result<ffi::AnyBuffer> y) {
  int64_t r, e;
  if (!Rows(x, &r, &e) || scale.element_count() != e) return ffi::Error::InvalidArgument("expected x [R, E], scale [E]");
  if (!SupportedType(x.element_type()) || y->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("x and y must both be float32 or bfloat16");
  const float* s = scale.typed_data();
  if (x.element_type() == ffi::DataType::F32) {
    const float* xp = static_cast<const float*>(x.untyped_data());
    float* yp = static_cast<float*>(y->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { NormRow(xp + i * e, s, eps, e, yp + i * e); });
  } else {
    const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
    uint16_t* yp = static_cast<uint16_t*>(y->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { NormRow(xp + i * e, s, eps, e, yp + i * e); });
  }
  return ffi::Error::Success();
}

ffi::Error AddRmsNormCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> scale,
                         float eps, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> sum) {
  int64_t r, e, ra, ea;
  if (!Rows(x, &r, &e) || !Rows(a, &ra, &ea) || ra != r || ea != e || scale.element_count() != e)
    return ffi::Error::InvalidArgument("expected x [R, E], a [R, E], scale [E]");
  const auto t = x.element_type();
  if (!SupportedType(t) || a.element_type() != t || y->element_type() != t || sum->element_type() != t)
    return ffi::Error::InvalidArgument("x, a and the results must all be float32 or all bfloat16");
  const float* s = scale.typed_data();
  if (t == ffi::DataType::F32) {
    const float *xp = static_cast<const float*>(x.untyped_data()), *ap = static_cast<const float*>(a.untyped_data());
    float *yp = static_cast<float*>(y->untyped_data()), *sp = static_cast<float*>(sum->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { AddNormRow(xp + i * e, ap + i * e, s, eps, e, yp + i * e, sp + i * e); });
  } else {
    const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
    const uint16_t* ap = static_cast<const uint16_t*>(a.untyped_data());
    uint16_t *yp = static_cast<uint16_t*>(y->untyped_data()), *sp = static_cast<uint16_t*>(sum->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { AddNormRow(xp + i * e, ap + i * e, s, eps, e, yp + i * e, sp + i * e); });
  }
  return ffi::Error::Success();
}

ffi::Error SwigluCpu(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> y) {
  int64_t r, e, ru, eu;
  if (!Rows(g, &r, &e) || !Rows(u, &ru, &eu) || ru != r || eu != e)
    return ffi::Error::InvalidArgument("expected gate [R, F] and up [R, F]");
  const auto t = g.element_type();
  if (!SupportedType(t) || u.element_type() != t || y->element_type() != t)
    return ffi::Error::InvalidArgument("gate, up and the result must all be float32 or all bfloat16");
  if (t == ffi::DataType::F32) {
    const float *gp = static_cast<const float*>(g.untyped_data()), *up = static_cast<const float*>(u.untyped_data());
    float* yp = static_cast<float*>(y->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { SwigluRow(gp + i * e, up + i * e, e, yp + i * e); });
  } else {
    const uint16_t* gp = static_cast<const uint16_t*>(g.untyped_data());
    const uint16_t* up = static_cast<const uint16_t*>(u.untyped_data());
    uint16_t* yp = static_cast<uint16_t*>(y->untyped_data());
    ForRowBlocks(pool, r, e, [&](int64_t i) { SwigluRow(gp + i * e, up + i * e, e, yp + i * e); });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferRmsNormCpu, RmsNormCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferAddRmsNormCpu, AddRmsNormCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferSwigluCpu, SwigluCpu,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
