// csr_mm: y = x @ Wᵀ for an unstructured-sparse weight W in CSR form, on the CPU (decode shapes).
//
// Layout (admm_kernels/backends/reference.py): crow int64 (rows+1), col int16 or int32 (nnz; int16
// whenever cols <= 32767, which halves the index traffic), values (nnz) fp32/bf16/fp16. x (batch, cols)
// any float dtype -> y (batch, rows), x's dtype, accumulated in fp32.
//
// Bytes per stored weight: 4 (fp32) + 2 (int16 index); at 90 % sparsity that is 0.6 bytes per dense
// weight against the dense GEMV's 4, so a memory-bound kernel can be several times faster.
// AVX2 paths (taken when the CPU has AVX2, see simd_load.h; scalar loops otherwise):
//   batch 1: per row, 8 indices widened to int32 and one vgatherdps from x (x is in L1/L2: 16-44 KB);
//   batch > 1: x is transposed once into xt (cols, P) with P = batch rounded up to 8 (at most 32 per
//     pass), so each stored weight is one broadcast and P/8 FMAs on contiguous xt[col, :] - no gathers.
// Threads: at::parallel_for over output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "simd_load.h"

namespace admm_kernels {
namespace {

constexpr int64_t kMaxPanel = 32;  // batch rows per transposed pass (4 accumulator registers)

#ifdef ADMM_SIMD_AVX2
ADMM_AVX2_BEGIN
namespace avx2 {  // admm_kernels::(anonymous)::avx2: this file's AVX2 paths (see simd_load.h)
using admm_kernels::avx2::hsum;
using admm_kernels::avx2::load8;

inline __m256i load8i(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load8i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// row_dot's vector part: the sum over [lo, j_end) with j_end = lo + a multiple of 8 (written to *j_end).
template <typename T, typename I>
float row_dot(const float* __restrict x, const T* __restrict v, const I* __restrict col, int64_t lo,
              int64_t hi, int64_t* j_end) {
  // Two accumulators (FMA latency), folded into `total` every 256 weights (blocked summation).
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  int64_t j = lo;
  while (j + 16 <= hi) {
    const int64_t stop = std::min<int64_t>(hi, j + 256);
    for (; j + 16 <= stop; j += 16) {
      a0 = _mm256_fmadd_ps(load8(v + j), _mm256_i32gather_ps(x, load8i(col + j), 4), a0);
      a1 = _mm256_fmadd_ps(load8(v + j + 8), _mm256_i32gather_ps(x, load8i(col + j + 8), 4), a1);
    }
    total = _mm256_add_ps(total, _mm256_add_ps(a0, a1));
    a0 = _mm256_setzero_ps();
    a1 = _mm256_setzero_ps();
  }
  for (; j + 8 <= hi; j += 8)
    a0 = _mm256_fmadd_ps(load8(v + j), _mm256_i32gather_ps(x, load8i(col + j), 4), a0);
  *j_end = j;
  return hsum(_mm256_add_ps(total, a0));
}

// row_panel with AVX2: xt (cols, P), P % 8 == 0, P <= kMaxPanel; writes y[b*ldy] for b < nb.
template <typename T, typename I>
void row_panel(const float* __restrict xt, int64_t P, const T* __restrict v, const I* __restrict col,
               int64_t lo, int64_t hi, float* __restrict y, int64_t ldy, int64_t nb) {
  // Blocked summation (partial sums folded every kBlock weights): each lane otherwise chains every
  // weight of the row, several times the error of a dense GEMM's blocked sums.
  constexpr int64_t kBlock = 32;
  __m256 acc[kMaxPanel / 8], total[kMaxPanel / 8];
  const int64_t nc = P / 8;
  for (int64_t c = 0; c < nc; ++c) total[c] = _mm256_setzero_ps();
  for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
    const int64_t j1 = std::min<int64_t>(hi, j0 + kBlock);
    for (int64_t c = 0; c < nc; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 w = _mm256_set1_ps(static_cast<float>(v[j]));
      const float* xr = xt + static_cast<int64_t>(col[j]) * P;
      for (int64_t c = 0; c < nc; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * c), acc[c]);
    }
    for (int64_t c = 0; c < nc; ++c) total[c] = _mm256_add_ps(total[c], acc[c]);
  }
  alignas(32) float out[kMaxPanel];
  for (int64_t c = 0; c < nc; ++c) _mm256_store_ps(out + 8 * c, total[c]);
  for (int64_t b = 0; b < nb; ++b) y[b * ldy] = out[b];
}

}  // namespace avx2
ADMM_AVX2_END
#endif  // ADMM_SIMD_AVX2

// Batch 1: y[r] = sum_j v[j] * x[col[j]]. `simd`: the AVX2 path may run (checked once by the caller).
template <typename T, typename I>
float row_dot(const float* __restrict x, const T* __restrict v, const I* __restrict col, int64_t lo,
              int64_t hi, bool simd) {
  float s = 0.f;
  int64_t j = lo;
#ifdef ADMM_SIMD_AVX2
  if constexpr (!std::is_same_v<T, double>) {
    if (simd) s = avx2::row_dot<T, I>(x, v, col, lo, hi, &j);
  }
#endif
  (void)simd;
  double tail = 0.0;
  for (; j < hi; ++j) tail += static_cast<double>(static_cast<float>(v[j]) * x[col[j]]);
  return static_cast<float>(s + tail);
}

// Batch > 1: xt (cols, P), P % 8 == 0, P <= kMaxPanel; writes y[b*ldy] for b < nb.
template <typename T, typename I>
void row_panel(const float* __restrict xt, int64_t P, const T* __restrict v, const I* __restrict col,
               int64_t lo, int64_t hi, float* __restrict y, int64_t ldy, int64_t nb, bool simd) {
#ifdef ADMM_SIMD_AVX2
  if constexpr (!std::is_same_v<T, double>) {
    if (simd) {
      avx2::row_panel<T, I>(xt, P, v, col, lo, hi, y, ldy, nb);
      return;
    }
  }
#endif
  (void)simd;
  double out[kMaxPanel] = {};
  for (int64_t j = lo; j < hi; ++j) {
    const float w = static_cast<float>(v[j]);
    const float* xr = xt + static_cast<int64_t>(col[j]) * P;
    for (int64_t b = 0; b < P; ++b) out[b] += static_cast<double>(w * xr[b]);
  }
  for (int64_t b = 0; b < nb; ++b) y[b * ldy] = out[b];
}

template <typename T, typename I>
void csr_run(const at::Tensor& xf, const int64_t* crow, const I* col, const T* v, int64_t rows, int64_t cols,
             at::Tensor& y) {
  const int64_t batch = xf.size(0);
  const int64_t nnz = crow[rows];
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(1, rows));
  const int64_t grain = std::max<int64_t>(1, 16384 / (per_row * batch));
#ifdef ADMM_SIMD_AVX2
  const bool simd = admm_kernels::avx2::enabled();
#else
  const bool simd = false;
#endif
  if (batch == 1) {
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) yp[r] = row_dot<T, I>(xp, v, col, crow[r], crow[r + 1], simd);
    });
    return;
  }
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxPanel) {
    const int64_t nb = std::min<int64_t>(kMaxPanel, batch - b0);
    const int64_t P = (nb + 7) / 8 * 8;
    at::Tensor xt = at::zeros({cols, P}, xf.options());
    xt.narrow(1, 0, nb).copy_(xf.narrow(0, b0, nb).t());
    const float* xtp = xt.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        row_panel<T, I>(xtp, P, v, col, crow[r], crow[r + 1], yp + b0 * rows + r, rows, nb, simd);
    });
  }
}

at::Tensor csr_mm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      int64_t cols) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "csr_mm: x must be (batch, ", cols, "), got ", x.sizes());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && crow.scalar_type() == at::kLong,
              "csr_mm: crow must be 1-D int64 (rows+1), got ", crow.scalar_type(), " ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && (col.scalar_type() == at::kShort || col.scalar_type() == at::kInt),
              "csr_mm: col must be 1-D int16 or int32, got ", col.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), "csr_mm: values (", values.numel(),
              ") and col (", col.numel(), ") must have the same length");
  const int64_t rows = crow.numel() - 1;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor cr = crow.contiguous(), cc = col.contiguous(), vc = values.contiguous();
  TORCH_CHECK(cr.data_ptr<int64_t>()[rows] == vc.numel(), "csr_mm: crow[-1] != nnz");
  at::Tensor y = at::empty({xf.size(0), rows}, xf.options());
  if (xf.size(0) == 0 || rows == 0) return y.to(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "csr_mm", [&] {
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    if (cc.scalar_type() == at::kShort)
      csr_run<scalar_t, int16_t>(xf, cr.data_ptr<int64_t>(), cc.data_ptr<int16_t>(), vp, rows, cols, y);
    else
      csr_run<scalar_t, int32_t>(xf, cr.data_ptr<int64_t>(), cc.data_ptr<int32_t>(), vp, rows, cols, y);
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_kernels, CPU, m) { m.impl("csr_mm", &csr_mm_cpu); }

}  // namespace admm_kernels
