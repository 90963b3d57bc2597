// Row reductions of a logits matrix for the sampler on the CPU, as XLA FFI custom calls (see cpu.py,
// which builds and registers them).
//
//   JaxinferRowArgmaxCpu:    x f32[S, V] -> i32[S]: the first index of each row's largest value; a NaN
//                            counts as the largest (jnp.argmax's convention), so a row with a NaN gives its
//                            first NaN.
//   JaxinferRowLogsumexpCpu: x f32[S, V] -> f32[S]: log(sum(exp(x))) per row, as jax.nn.logsumexp: the row
//                            maximum m is subtracted first (0 when m is not finite), so rows of -inf give
//                            -inf, a +inf gives +inf and a NaN gives NaN.
//
// XLA:CPU runs the sampler's jnp versions as several passes over the whole [S, V] matrix, one of which
// writes a broadcast of the row maxima back to memory; here each row is read once for the argmax, and
// twice for the log-sum-exp (its maximum, then the sum of exponentials, the second read from the L2
// cache: a row of the default model's 49,152 logits is 192 KiB). Rows are spread over XLA's intra-op
// thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxinfer_cpu;  // NOLINT: the shared vector types and helpers

constexpr int64_t kParallelMinElements = 1 << 16;  // smaller matrices run on the calling thread alone
constexpr float kInf = std::numeric_limits<float>::infinity();

int32_t ArgmaxRow(const float* x, int64_t v) {
  int64_t i = 0;
  float best = -kInf;
  int64_t at = 0;
  bool nan = false;
  if (v >= kLanes) {
    // Per lane: the largest value seen and its first index (strictly greater replaces); any NaN.
    VF bv = LoadF(x);
    VI bi;
    for (int l = 0; l < kLanes; ++l) bi[l] = l;
    VI seen_nan = bv != bv;
    VI idx = bi;
    for (i = kLanes; i + kLanes <= v; i += kLanes) {
      idx += kLanes;
      const VF xv = LoadF(x + i);
      const VI gt = xv > bv;
      bv = gt ? xv : bv;
      bi = gt ? idx : bi;
      seen_nan |= xv != xv;
    }
    for (int l = 0; l < kLanes; ++l) nan |= seen_nan[l] != 0;
    best = bv[0];
    at = bi[0];
    for (int l = 1; l < kLanes; ++l) {
      if (bv[l] > best || (bv[l] == best && bi[l] < at)) {
        best = bv[l];
        at = bi[l];
      }
    }
  } else {
    best = x[0];
    at = 0;
    i = 1;
  }
  for (; i < v; ++i) {  // the tail: later indices, so only a strictly larger value replaces
    if (x[i] > best) {
      best = x[i];
      at = i;
    }
    nan |= std::isnan(x[i]);
  }
  if (nan) {
    for (int64_t j = 0; j < v; ++j)
      if (std::isnan(x[j])) return static_cast<int32_t>(j);
  }
  return static_cast<int32_t>(at);
}

float LogsumexpRow(const float* x, int64_t v) {
  int64_t i = 0;
  VF mv = Splat(-kInf);
  VI seen_nan{};
  for (; i + kLanes <= v; i += kLanes) {
    const VF xv = LoadF(x + i);
    mv = xv > mv ? xv : mv;
    seen_nan |= xv != xv;
  }
  float m = -kInf;
  bool nan = false;
  for (int l = 0; l < kLanes; ++l) {
    m = std::max(m, mv[l]);
    nan |= seen_nan[l] != 0;
  }
  for (int64_t j = i; j < v; ++j) {
    m = std::max(m, x[j]);
    nan |= std::isnan(x[j]);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (m == kInf) return kInf;
  if (m == -kInf) return -kInf;
  // Every x - m <= 0 here, the range Exp takes. Four accumulators shorten the dependency chains.
  VF s0{}, s1{}, s2{}, s3{};
  const VF mm = Splat(m);
  i = 0;
  for (; i + 4 * kLanes <= v; i += 4 * kLanes) {
    s0 += Exp(LoadF(x + i) - mm);
    s1 += Exp(LoadF(x + i + kLanes) - mm);
    s2 += Exp(LoadF(x + i + 2 * kLanes) - mm);
    s3 += Exp(LoadF(x + i + 3 * kLanes) - mm);
  }
  for (; i + kLanes <= v; i += kLanes) s0 += Exp(LoadF(x + i) - mm);
  const VF s = (s0 + s1) + (s2 + s3);
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += s[l];
  for (; i < v; ++i) total += std::exp(static_cast<double>(x[i] - m));
  return static_cast<float>(std::log(total)) + m;
}

template <typename T, typename Fn>
ffi::Error ForRows(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, T* out, Fn fn) {
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] <= 0) return ffi::Error::InvalidArgument("expected x [S, V] with V > 0");
  const int64_t s = d[0], v = d[1];
  const float* base = x.typed_data();
  const int64_t helpers = s * v < kParallelMinElements ? 0 : std::max<int64_t>(pool.num_threads(), 1) - 1;
  ParallelFor(pool, s, helpers, [&](int64_t r) { out[r] = fn(base + r * v, v); });
  return ffi::Error::Success();
}

ffi::Error RowArgmaxCpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  return ForRows(pool, x, out->typed_data(), ArgmaxRow);
}

ffi::Error RowLogsumexpCpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  return ForRows(pool, x, out->typed_data(), LogsumexpRow);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferRowArgmaxCpu, RowArgmaxCpu,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferRowLogsumexpCpu, RowLogsumexpCpu,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
