// gram_update on the CPU: G[i, j] += sum_r x[r, i] x[r, j] for i <= j only (half the FLOPs of x^T x).
//
// Contract (admm_kernels/backends/reference.py): G (in, in) float32 or float64, updated in place; x
// (n, in) of any float dtype and strides, converted to G's dtype; the strict lower triangle of G is
// neither read nor written.
//
// How: the upper triangle is cut into T x T tiles (bi <= bj); the tiles run in parallel (at::parallel_for),
// each one single-threaded BLAS call (MKL drops to one thread inside a parallel region):
//   off-diagonal tile: G[bi, bj] += x[:, bi]^T x[:, bj]           (addmm_ straight into G, ld = in)
//   diagonal tile:     G[bi, bi] += triu(x[:, bi]^T x[:, bi])     (via a T x T scratch, upper half added)
// The diagonal tiles waste T/(2 in) of the full product's FLOPs.
// Measured (2-core AVX2 EPYC, shared and loaded, best of 4, speed-up over G.addmm_(x.T, x)):
//   x 4096 x 4096 fp32: tiles in parallel T=512 1.96x, T=256 1.56x (x 2048 x 4096: 1.83x, 86 % of the
//   fp32 matmul peak measured in the same run, counting the half product's FLOPs);
//   x 2048 x 2048: tiles T=256 1.60x, T=512 1.52x; row strips G[a:a+T, a+T:] as one multi-threaded GEMM
//   each: 0.62x (T=256), 1.01x (T=512); recursive halving (big square GEMMs): 0.67x / 1.04x.
// MKL's threaded GEMM is far from its peak on the thin strip shapes, independent tiles are not.
// Inputs whose dtype differs from G's (bf16/fp16: those GEMMs are ~90x slower than fp32 on this CPU),
// or whose layout BLAS cannot take, are converted chunk of rows by chunk of rows, so the temporary stays
// bounded (kChunkElems).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace admm_kernels {
namespace {

// Tile width: 512 (measured best at in = 4096, above), halved (down to 128) while there are fewer than
// 4 tiles per thread, so that small layers still keep every core busy.
int64_t tile_width(int64_t in) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t t = 512;
  while (t > 128) {
    const int64_t nb = (in + t - 1) / t;
    if (nb * (nb + 1) / 2 >= want) break;
    t /= 2;
  }
  return t;
}

// Rows converted per chunk: at most 8M elements (32 MB fp32) of temporary.
constexpr int64_t kChunkElems = int64_t(1) << 23;

// True when BLAS can read x directly as the GEMM operand (unit stride along one dimension).
bool blas_friendly(const at::Tensor& x) {
  return x.stride(1) == 1 || x.stride(0) == 1;
}

template <typename T>
void add_upper(T* G, int64_t ldg, const T* tmp, int64_t t) {
  // G[i, j] += tmp[i, j] for i <= j < t; rows in parallel (t rows of up to t elements each).
  at::parallel_for(0, t, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* g = G + i * ldg;
      const T* s = tmp + i * t;
      for (int64_t j = i; j < t; ++j) g[j] += s[j];
    }
  });
}

void diag_block(at::Tensor& G, const at::Tensor& xc, int64_t a, int64_t t) {
  const int64_t in = G.size(0);
  const at::Tensor xa = xc.narrow(1, a, t);
  const at::Tensor diag = at::mm(xa.t(), xa);  // (t, t), contiguous
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gram_update", [&] {
    add_upper<scalar_t>(G.mutable_data_ptr<scalar_t>() + a * in + a, in, diag.const_data_ptr<scalar_t>(), t);
  });
}

void offdiag_block(at::Tensor& G, const at::Tensor& xc, int64_t a, int64_t ta, int64_t b, int64_t tb) {
  at::Tensor blk = G.narrow(0, a, ta).narrow(1, b, tb);
  blk.addmm_(xc.narrow(1, a, ta).t(), xc.narrow(1, b, tb));
}

// G += triu(xc^T xc) for xc (rows, in) of G's dtype with a BLAS-friendly layout; G contiguous.
void triangle_update(at::Tensor& G, const at::Tensor& xc) {
  const int64_t in = G.size(0);
  const int64_t T = tile_width(in);
  const int64_t nb = (in + T - 1) / T;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (block row, block col), row <= col
  for (int64_t i = 0; i < nb; ++i) {
    for (int64_t j = i; j < nb; ++j) tiles.emplace_back(i, j);
  }
  // Grain 1: every tile is a GEMM of T*T*rows FMAs (milliseconds), so scheduling costs nothing.
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t a = tiles[q].first * T, b = tiles[q].second * T;
      const int64_t ta = std::min(T, in - a), tb = std::min(T, in - b);
      if (a == b) {
        diag_block(G, xc, a, ta);
      } else {
        offdiag_block(G, xc, a, ta, b, tb);
      }
    }
  });
}

void gram_update_cpu(at::Tensor& G, const at::Tensor& x) {
  TORCH_CHECK(G.dim() == 2 && G.size(0) == G.size(1), "gram_update: G must be square (in, in), got shape ",
              G.sizes());
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble,
              "gram_update: G must be float32 or float64, got ", G.scalar_type());
  TORCH_CHECK(x.dim() == 2, "gram_update: x must be 2-D (n, in), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gram_update: x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) == G.size(0), "gram_update: x has ", x.size(1), " columns, G is ", G.size(0), " x ",
              G.size(1));
  TORCH_CHECK(G.device().is_cpu(), "gram_update: G must be a CPU tensor, got device ", G.device());
  TORCH_CHECK(x.device().is_cpu(), "gram_update: x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(at::has_internal_overlap(G) != at::MemOverlap::Yes,
              "gram_update: G has internally overlapping memory (an expanded view?)");
  const int64_t n = x.size(0), in = x.size(1);
  if (n == 0 || in == 0) return;

  // A non-contiguous G is updated through a contiguous copy (its lower triangle is copied back as it
  // was). An x sharing G's memory must be read before G changes: copy it.
  at::Tensor Gc = G.is_contiguous() ? G : G.contiguous();
  const at::Tensor xs = x.is_alias_of(G) ? x.clone() : x;

  if (xs.scalar_type() == G.scalar_type() && blas_friendly(xs)) {
    triangle_update(Gc, xs);
  } else {
    const int64_t rows = std::max<int64_t>(1, kChunkElems / in);
    for (int64_t r = 0; r < n; r += rows) {
      const at::Tensor chunk = xs.narrow(0, r, std::min(rows, n - r))
                                   .to(G.scalar_type(), /*non_blocking=*/false, /*copy=*/false,
                                       at::MemoryFormat::Contiguous);
      triangle_update(Gc, chunk);
    }
  }
  if (!Gc.is_same(G)) G.copy_(Gc);
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_kernels, CPU, m) { m.impl("gram_update", &gram_update_cpu); }

}  // namespace admm_kernels
