// 16-lane float / int vectors and bfloat16 / int8 conversions shared by the C++ CPU kernels
// (pallas_kernels/*/cpu_kernel.cc). cpu_build.py puts this folder on the include path and hashes its
// headers into the build cache key, so an edit here rebuilds every kernel.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// AVX2 + FMA without AVX-512 (16 ymm registers): the kernels' own register blocks for such CPUs, where the
// generic 16-lane vector code keeps its accumulators in memory.
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define JAXINFER_AVX2_ONLY 1
#endif

// Forces inlining of small vector helpers that take or return 16-lane vectors: where GCC keeps one out of
// line (it did for Exp and TransposeSum in the decode attention once that function shrank), an AVX2 build
// passes each vector through memory.
#if defined(__GNUC__) || defined(__clang__)
#define JAXINFER_INLINE inline __attribute__((always_inline))
#else
#define JAXINFER_INLINE inline
#endif

namespace jaxinfer_cpu {

constexpr int kLanes = 16;  // floats per vector (512 bits; the compiler splits it where narrower)

typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
typedef uint32_t VU __attribute__((vector_size(64)));
typedef uint16_t VH __attribute__((vector_size(32)));

// A prefetch of the cache line at `addr` that the optimizer keeps. GCC (12, -O2 and up) treats
// __builtin_prefetch as free of side effects and, under -ffinite-loops, deletes a loop whose body is only
// prefetches: the decode attention's look-ahead loop had compiled to nothing.
inline void Prefetch(const void* addr) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(addr)));
#else
  __builtin_prefetch(addr);
#endif
}

// x in every lane (a plain broadcast; `VF{} + x` would add 0.0f first, an extra scalar op per call).
inline VF Splat(float x) {
  VF v;
#if defined(__AVX512F__)
  const __m512 b = _mm512_set1_ps(x);
  std::memcpy(&v, &b, sizeof(v));
#else
  for (int l = 0; l < kLanes; ++l) v[l] = x;
#endif
  return v;
}

inline VF LoadF(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreF(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 16 bfloat16 values as float32 (exact: a bfloat16 is the top half of a float32).
inline VF LoadBf16(const uint16_t* src) {
  VH h;
  std::memcpy(&h, src, sizeof(h));
  return (VF)(__builtin_convertvector(h, VU) << 16);  // a same-size vector cast reinterprets the bits
}

// 16 int8 values, sign-extended to int32.
inline VI LoadI8(const int8_t* src) {
  VI v;
#if defined(__AVX512F__)
  const __m512i r = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  std::memcpy(&v, &r, sizeof(v));
#elif defined(__AVX2__)
  const __m256i lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m256i hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8)));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  for (int i = 0; i < kLanes; ++i) v[i] = src[i];
#endif
  return v;
}

inline VF ToF(VI v) { return __builtin_convertvector(v, VF); }

// exp(x) lane-wise for x <= 0 (-inf -> ~0): Cody-Waite range reduction and a degree-6 polynomial,
// relative error ~2e-7. Lanes above 0 are clamped to 0 (they are masked by the caller).
JAXINFER_INLINE VF Exp(VF x) {
  x = x < -87.0f ? Splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38, the smallest value produced
  x = x > 0.0f ? Splat(0.0f) : x;
  const VF magic = Splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds to an integer
  VF n = (x * 1.44269504088896341f + magic) - magic;
  VF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VF p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * (VF)bits;  // a cast between same-size vector types reinterprets the bits
}

}  // namespace jaxinfer_cpu
