// sparse_nm_mm: y = x @ Wᵀ for a packed N:M weight W on the CPU (decode shapes: a few rows of x).
//
// Layout (admm_kernels/backends/reference.py, "sparse inference ops"): values (rows, k = cols*n/m) in
// fp32/bf16/fp16, meta (rows, meta_bytes) uint8 holding the in-group position of value j at bit offset
// j*bits of the row (bits = ceil(log2 m)). x (batch, cols) any float dtype -> y (batch, rows), x's dtype,
// accumulated in fp32.
//
// Why it can beat a dense GEMV: at batch 1 a dense fp32 GEMV is memory bound (4 bytes a weight). 2:4 in
// fp32 reads 2 bytes + 1/4 byte of metadata per dense weight (fp16 storage: 1.25 bytes), so the bound
// is 1.8x (3.2x) lower. The kernel must therefore decode positions without leaving the memory roof:
// 2:4 fast path (AVX2, taken when the CPU has it: see simd_load.h), 8 values = 4 groups = 16 inputs per step:
//   * the 16 metadata bits are broadcast and shifted per lane by 2*lane: the low 2 bits of lane l are
//     then value l's in-group position, which is all vpermilps (in-128-bit-lane permute) reads;
//   * x is pre-swizzled once per call so each 128-bit half of a register holds one whole group; two
//     in-lane permutes and one blend give the 8 inputs matching the 8 stored values; one FMA.
//   ~8 single-uop instructions for 8 weights, no gathers (vgatherdps is microcoded on AMD Zen) and
//   no cross-lane vpermps (several uops on Zen).
//   The decoded index is reused for every row of x in the batch chunk.
// Other N:M: a scalar decode loop (bit extraction per value), the batch chunk inner-most.
// Threads: at::parallel_for over output rows; each row's packed values (a few KB) stay in L1 while
// all batch chunks of x pass over them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>

#include "simd_load.h"

namespace admm_kernels {
namespace {

// Batch rows handled together: each needs its own accumulator register(s); 4 keeps the 2:4 loop's
// live registers (4 acc + index + weights + 2 inputs) well under AVX2's 16.
constexpr int64_t kBatchChunk = 4;

#ifdef ADMM_SIMD_AVX2
ADMM_AVX2_BEGIN
namespace avx2 {  // admm_kernels::(anonymous)::avx2: this file's AVX2 paths (see simd_load.h)
using admm_kernels::avx2::hsum;
using admm_kernels::avx2::load8;

// One output row, BB rows of x (x rows are ldx apart), 2:4 layout. Writes y[b*ldy].
// xs is x "swizzled" per 16-input block as [0..3, 8..11, 4..7, 12..15] (swizzle_x below), so one aligned
// load gives groups (0 | 2) and the next groups (1 | 3), one group per 128-bit half. vpermilps then
// picks inside each half using the 2 low bits of each lane's index - which are exactly the stored
// 2-bit positions, so decoding is a broadcast and one variable shift. Blending lanes 0,1,4,5 of the
// first with lanes 2,3,6,7 of the second gives the inputs of values 0..7 in stored order.
// (vpermps on the natural layout, 2+ uops on Zen, measured the same 3.5 ms here; the batch-1 path
// below is what made the difference.)
// x (natural layout) serves the scalar tail (values of a final incomplete 16-input block).
template <typename T, int BB>
inline void row_24(const float* __restrict xs, const float* __restrict x, int64_t ldx, const T* __restrict v,
                   const uint8_t* __restrict md, int64_t k, float* __restrict y, int64_t ldy) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  // Two accumulator sets alternate so that at batch 1 consecutive FMAs do not wait on each other
  // (FMA latency 4-5 cycles vs ~2 cycles of work per step).
  __m256 acc0[BB], acc1[BB];
  for (int b = 0; b < BB; ++b) {
    acc0[b] = _mm256_setzero_ps();
    acc1[b] = _mm256_setzero_ps();
  }
  auto step = [&](int64_t j, __m256* acc) {
    uint16_t m16;
    std::memcpy(&m16, md + j / 4, 2);
    const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(m16), shifts);
    const __m256 w = load8(v + j);
    const int64_t base = 2 * j;  // 8 values of 2:4 cover 16 inputs
    for (int b = 0; b < BB; ++b) {
      const float* xb = xs + b * ldx + base;
      const __m256 a = _mm256_permutevar_ps(_mm256_loadu_ps(xb), idx);
      const __m256 c = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), idx);
      acc[b] = _mm256_fmadd_ps(w, _mm256_blend_ps(a, c, 0xCC), acc[b]);
    }
  };
  // Blocked summation: the partial sums are folded into `total` every kBlock values, so no lane adds
  // more than kBlock/16 terms in a row (a 4096x11008 row would otherwise chain 344 additions per lane,
  // several times the error of a dense GEMM's blocked sums).
  constexpr int64_t kBlock = 512;
  __m256 total[BB];
  for (int b = 0; b < BB; ++b) total[b] = _mm256_setzero_ps();
  int64_t j = 0;
  while (j + 16 <= k) {
    const int64_t stop = std::min<int64_t>(k, j + kBlock);
    for (; j + 16 <= stop; j += 16) {
      step(j, acc0);
      step(j + 8, acc1);
    }
    for (int b = 0; b < BB; ++b) {
      total[b] = _mm256_add_ps(total[b], _mm256_add_ps(acc0[b], acc1[b]));
      acc0[b] = _mm256_setzero_ps();
      acc1[b] = _mm256_setzero_ps();
    }
  }
  if (j + 8 <= k) {
    step(j, acc0);
    j += 8;
  }
  float s[BB];
  for (int b = 0; b < BB; ++b) s[b] = hsum(_mm256_add_ps(total[b], acc0[b]));
  for (; j < k; ++j) {  // tail: fewer than 8 values left (cols % 16 != 0)
    const int pos = (md[j / 4] >> (2 * (j % 4))) & 3;
    const int64_t c = (j / 2) * 4 + pos;
    const float w = static_cast<float>(v[j]);
    for (int b = 0; b < BB; ++b) s[b] += w * x[b * ldx + c];
  }
  for (int b = 0; b < BB; ++b) y[b * ldy] = s[b];
}

// Batch 1 (the decode case), written out with named accumulators, 16 values a step and a software
// prefetch 2 KB ahead in the value stream. Measured single thread, 4096x4096 fp32 values, batch 1:
// row_24<float, 1> 2.65 ms; this without prefetch 2.34 ms; prefetch 1 KB ahead 2.34 ms; 2 KB ahead
// 1.6-2.0 ms (dense GEMV 3.0-3.4 ms in the same runs): the hardware prefetcher alone does not keep
// enough of a single row stream in flight.
template <typename T>
inline float row_24_b1(const float* __restrict xs, const float* __restrict x, const T* __restrict v,
                       const uint8_t* __restrict md, int64_t k) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  int64_t j = 0;
  while (j + 16 <= k) {
    const int64_t stop = std::min<int64_t>(k, j + 512);  // blocked summation, as in row_24
    for (; j + 16 <= stop; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(v + j + 2048 / sizeof(T)), _MM_HINT_T0);
      uint32_t m32;
      std::memcpy(&m32, md + j / 4, 4);
      const __m256i i0 = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(m32 & 0xFFFF)), shifts);
      const __m256i i1 = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(m32 >> 16)), shifts);
      const float* xb = xs + 2 * j;
      const __m256 a0 = _mm256_permutevar_ps(_mm256_loadu_ps(xb), i0);
      const __m256 c0 = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), i0);
      const __m256 a1 = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 16), i1);
      const __m256 c1 = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 24), i1);
      acc0 = _mm256_fmadd_ps(load8(v + j), _mm256_blend_ps(a0, c0, 0xCC), acc0);
      acc1 = _mm256_fmadd_ps(load8(v + j + 8), _mm256_blend_ps(a1, c1, 0xCC), acc1);
    }
    total = _mm256_add_ps(total, _mm256_add_ps(acc0, acc1));
    acc0 = _mm256_setzero_ps();
    acc1 = _mm256_setzero_ps();
  }
  if (j + 8 <= k) {
    uint16_t m16;
    std::memcpy(&m16, md + j / 4, 2);
    const __m256i i0 = _mm256_srlv_epi32(_mm256_set1_epi32(m16), shifts);
    const float* xb = xs + 2 * j;
    const __m256 a0 = _mm256_permutevar_ps(_mm256_loadu_ps(xb), i0);
    const __m256 c0 = _mm256_permutevar_ps(_mm256_loadu_ps(xb + 8), i0);
    total = _mm256_fmadd_ps(load8(v + j), _mm256_blend_ps(a0, c0, 0xCC), total);
    j += 8;
  }
  float s = hsum(total);
  for (; j < k; ++j) s += static_cast<float>(v[j]) * x[(j / 2) * 4 + ((md[j / 4] >> (2 * (j % 4))) & 3)];
  return s;
}

template <typename T>
void rows_24(const float* xs, const float* x, int64_t batch, int64_t cols, const T* vals, const uint8_t* meta,
             int64_t k, int64_t meta_bytes, int64_t r0, int64_t r1, float* y, int64_t rows) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = vals + r * k;
    const uint8_t* md = meta + r * meta_bytes;
    for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
      const float* xb = x + b0 * cols;
      const float* xsb = xs + b0 * cols;
      float* yb = y + b0 * rows + r;
      switch (std::min<int64_t>(kBatchChunk, batch - b0)) {
        case 1: *yb = row_24_b1<T>(xsb, xb, v, md, k); break;
        case 2: row_24<T, 2>(xsb, xb, cols, v, md, k, yb, rows); break;
        case 3: row_24<T, 3>(xsb, xb, cols, v, md, k, yb, rows); break;
        default: row_24<T, 4>(xsb, xb, cols, v, md, k, yb, rows); break;
      }
    }
  }
}

}  // namespace avx2
ADMM_AVX2_END

// (batch, cols) -> same shape, each full 16-input block reordered [0..3, 8..11, 4..7, 12..15]. A plain
// loop: the same with clone + narrow/select/copy_ cost ~5 us of ATen overhead per call, which at decode
// sizes (SmolLM2's 576x576: ~50 us a layer) is 10 %.
at::Tensor swizzle_x(const at::Tensor& xf) {
  const int64_t batch = xf.size(0), cols = xf.size(1);
  const int64_t full = cols / 16 * 16;
  at::Tensor xs = at::empty_like(xf);
  const float* src = xf.data_ptr<float>();
  float* dst = xs.data_ptr<float>();
  static constexpr int kFrom[4] = {0, 8, 4, 12};
  for (int64_t b = 0; b < batch; ++b) {
    const float* s = src + b * cols;
    float* d = dst + b * cols;
    for (int64_t q = 0; q < full; q += 16)
      for (int part = 0; part < 4; ++part) std::memcpy(d + q + 4 * part, s + q + kFrom[part], 4 * sizeof(float));
    if (full < cols) std::memcpy(d + full, s + full, (cols - full) * sizeof(float));
  }
  return xs;
}
#endif  // ADMM_SIMD_AVX2

// Reads the metadata of one row value by value: the bit offset advances by `bits` per value and the
// group base by m every n values - no divisions in the loop (a 64-bit division per value made this
// path 10x slower than 2:4's: measured 17.8 ms vs 1.4 ms for a 2048x4096 1:4 layer at batch 1).
struct PosReader {
  const uint8_t* md;
  int bits;
  unsigned mask;
  int64_t bit = 0;
  inline unsigned next() {
    const int64_t byte = bit >> 3;
    const int sh = static_cast<int>(bit & 7);
    unsigned word = md[byte];
    if (sh + bits > 8) word |= static_cast<unsigned>(md[byte + 1]) << 8;  // field spans two bytes
    bit += bits;
    return (word >> sh) & mask;
  }
};

// Any N:M (and 2:4 without AVX2): scalar position decode, reused for a chunk of batch rows.
template <typename T>
void rows_generic(const float* x, int64_t batch, int64_t cols, const T* vals, const uint8_t* meta,
                  int64_t k, int64_t meta_bytes, int64_t n, int64_t m, int bits, int64_t r0, int64_t r1,
                  float* y, int64_t rows) {
  const unsigned mask = (1u << bits) - 1u;
  const int64_t groups = cols / m;
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = vals + r * k;
    for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
      const int64_t bb = std::min<int64_t>(kBatchChunk, batch - b0);
      // double accumulators: free in scalar code, and a sequential fp32 sum over a whole row would be
      // several times less accurate than the blocked sums of a dense GEMM (the tolerance rule of admm_kernels/backends/selfcheck.py).
      double s[kBatchChunk] = {0.0, 0.0, 0.0, 0.0};
      const float* xb = x + b0 * cols;
      PosReader rd{meta + r * meta_bytes, bits, mask};
      int64_t j = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = xb + g * m;
        for (int64_t t = 0; t < n; ++t, ++j) {
          const unsigned p = rd.next();
          // Positions of non-power-of-two M can encode values >= M: corrupt metadata must not read past x.
          TORCH_CHECK(p < static_cast<unsigned>(m), "sparse_nm_mm: position ", p, " out of range for m=", m);
          const float w = static_cast<float>(v[j]);
          for (int64_t b = 0; b < bb; ++b) s[b] += static_cast<double>(w * xg[b * cols + p]);
        }
      }
      for (int64_t b = 0; b < bb; ++b) y[(b0 + b) * rows + r] = static_cast<float>(s[b]);
    }
  }
}

// unpack_nm: dense (rows, cols) weight from the packed form, one pass (the pure-torch reference takes
// ~300 ms for 2048x4096 through bit tensors; SparseLinear needs this for large batches).
template <typename T>
void unpack_rows(const T* vals, const uint8_t* meta, int64_t k, int64_t meta_bytes, int64_t n, int64_t m,
                 int bits, int64_t cols, int64_t r0, int64_t r1, T* out) {
  const unsigned mask = (1u << bits) - 1u;
  const int64_t groups = cols / m;
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = vals + r * k;
    T* o = out + r * cols;
    std::fill(o, o + cols, T(0));
    PosReader rd{meta + r * meta_bytes, bits, mask};
    int64_t j = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t t = 0; t < n; ++t, ++j) {
        const unsigned p = rd.next();
        TORCH_CHECK(p < static_cast<unsigned>(m), "unpack_nm: position ", p, " out of range for m=", m);
        o[g * m + p] = v[j];
      }
  }
}

// Packed N:M geometry of `values` (checked against n, m, cols): bits per position, rows, stored values per
// row k, metadata bytes per row. `op` prefixes the error messages.
struct NMShape {
  int bits;
  int64_t rows, k, meta_bytes;
};

NMShape nm_shape(const char* op, const at::Tensor& values, int64_t n, int64_t m, int64_t cols) {
  TORCH_CHECK(m >= 2 && m <= 256 && n >= 1 && n < m && cols % m == 0, op, ": bad n=", n, " m=", m,
              " cols=", cols);
  NMShape s;
  s.bits = m <= 2 ? 1 : 64 - __builtin_clzll(static_cast<unsigned long long>(m - 1));
  s.rows = values.size(0);
  s.k = cols / m * n;
  s.meta_bytes = (s.k * s.bits + 7) / 8;
  TORCH_CHECK(values.dim() == 2 && values.size(1) == s.k, op, ": values must be (rows, ", s.k, "), got ",
              values.sizes());
  return s;
}

at::Tensor sparse_nm_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t n,
                            int64_t m, int64_t cols) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "sparse_nm_mm: x must be (batch, ", cols, "), got ",
              x.sizes());
  const NMShape shape = nm_shape("sparse_nm_mm", values, n, m, cols);
  const int bits = shape.bits;
  const int64_t rows = shape.rows, k = shape.k, meta_bytes = shape.meta_bytes;
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == rows &&
                  meta.size(1) == meta_bytes,
              "sparse_nm_mm: meta must be uint8 (", rows, ", ", meta_bytes, "), got ", meta.scalar_type(), " ",
              meta.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor vc = values.contiguous();
  const at::Tensor mc = meta.contiguous();
  const int64_t batch = xf.size(0);
  at::Tensor y = at::empty({batch, rows}, xf.options());
  if (batch == 0 || rows == 0) return y.to(x.scalar_type());
  const float* xp = xf.data_ptr<float>();
  const uint8_t* mp = mc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#ifdef ADMM_SIMD_AVX2
  const bool fast24 = n == 2 && m == 4 && vc.scalar_type() != at::kDouble && admm_kernels::avx2::enabled();
  const at::Tensor xs = fast24 ? swizzle_x(xf) : xf;
  const float* xsp = xs.data_ptr<float>();
#endif
  // ~16K multiply-adds per task: small layers stay on one thread (fork/join costs a few us).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * batch));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "sparse_nm_mm", [&] {
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
#ifdef ADMM_SIMD_AVX2
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (fast24) {
          avx2::rows_24<scalar_t>(xsp, xp, batch, cols, vp, mp, k, meta_bytes, r0, r1, yp, rows);
          return;
        }
      }
#endif
      rows_generic<scalar_t>(xp, batch, cols, vp, mp, k, meta_bytes, n, m, bits, r0, r1, yp, rows);
    });
  });
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

at::Tensor unpack_nm_cpu(const at::Tensor& values, const at::Tensor& meta, int64_t n, int64_t m, int64_t cols) {
  const NMShape shape = nm_shape("unpack_nm", values, n, m, cols);
  const int bits = shape.bits;
  const int64_t rows = shape.rows, k = shape.k, meta_bytes = shape.meta_bytes;
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == rows &&
                  meta.size(1) == meta_bytes,
              "unpack_nm: meta must be uint8 (", rows, ", ", meta_bytes, "), got ", meta.sizes());
  const at::Tensor vc = values.contiguous();
  const at::Tensor mc = meta.contiguous();
  at::Tensor out = at::empty({rows, cols}, vc.options());
  const uint8_t* mp = mc.data_ptr<uint8_t>();
  // Positions >= m (possible only in a corrupt file when m is not a power of two) would land outside
  // their group: PackedNM.validate() rejects such metadata when a checkpoint is loaded.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vc.scalar_type(), "unpack_nm", [&] {
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, cols)),
                     [&](int64_t r0, int64_t r1) { unpack_rows<scalar_t>(vp, mp, k, meta_bytes, n, m, bits, cols, r0, r1, op); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_kernels, CPU, m) {
  m.impl("sparse_nm_mm", &sparse_nm_mm_cpu);
  m.impl("unpack_nm", &unpack_nm_cpu);
}

}  // namespace admm_kernels
