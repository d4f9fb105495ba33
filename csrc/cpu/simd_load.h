// AVX2 helpers shared by the CPU sparse kernels (sparse_nm.cpp, sparse_unstructured.cpp).
//
// ADMM_SIMD_AVX2 is defined when the compiler targets AVX2 + FMA + F16C (setup.py builds with
// -march=native); the kernels guard their vector paths with it and fall back to scalar loops otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ADMM_SIMD_AVX2 1
#endif

#ifdef ADMM_SIMD_AVX2
namespace admm_kernels {
namespace simd {

// 8 consecutive values widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the upper half of an fp32: widen to 32 bits and shift left by 16.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace simd
}  // namespace admm_kernels
#endif  // ADMM_SIMD_AVX2
