// AVX2 code paths of the CPU sparse kernels (sparse_nm.cpp, sparse_unstructured.cpp), chosen at run time.
//
// A local build uses -march=native, a wheel or sdist build the portable x86-64 baseline (setup.py,
// tools/build_flags.py): a wheel compiled with AVX2 everywhere would die with an illegal instruction on
// a CPU without it. So the AVX2 paths are always compiled, but only the functions defined between
// ADMM_AVX2_BEGIN and ADMM_AVX2_END get the avx2,fma,f16c target (the compiler's target pragma), and
// the callers take them only when avx2::enabled() says the CPU has those instructions (cpuid, read
// once). Everything defined between the two macros lives in a namespace named `avx2`:
// tests/test_build_flags.py disassembles a portable build and checks that only functions of such a
// namespace use VEX-encoded (AVX) instructions.
//
// ADMM_KERNELS_NO_AVX2=1 in the environment makes enabled() false (read on first use): the scalar
// fallbacks, which an older CPU runs, can then be tested on this one.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ADMM_SIMD_AVX2 1
#if defined(__clang__)
#define ADMM_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define ADMM_AVX2_END _Pragma("clang attribute pop")
#else
#define ADMM_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define ADMM_AVX2_END _Pragma("GCC pop_options")
#endif
#endif

#ifdef ADMM_SIMD_AVX2
namespace admm_kernels {
namespace avx2 {

// True when the AVX2 paths may run: the CPU has AVX2, FMA and F16C and ADMM_KERNELS_NO_AVX2 is unset.
inline bool enabled() {
  static const bool ok = [] {
    const char* off = std::getenv("ADMM_KERNELS_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return true;  // the whole build already targets AVX2 (-march=native on an AVX2 machine)
#else
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  }();
  return ok;
}

}  // namespace avx2
}  // namespace admm_kernels

ADMM_AVX2_BEGIN
namespace admm_kernels {
namespace avx2 {

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

}  // namespace avx2
}  // namespace admm_kernels
ADMM_AVX2_END
#endif  // ADMM_SIMD_AVX2
