// N:M mask for any n <= m (see kernels.h). One thread per element: its rank in its group is
// #{i : s_i > s_j} + #{i < j : s_i == s_j} (stable descending order, ties keep the smaller column), and
// it is kept when rank < n. The m reads of a group are shared by the m neighbouring threads of a warp
// (served from L1), so the kernel streams the scores once from memory for the usual m <= 32.
#include <cstdint>

#include "kernels.h"
#include "scores.cuh"

namespace admm_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void nm_mask_kernel(const T* __restrict__ s, int64_t rows, int64_t cols, int64_t s0, int64_t s1, int n,
                               int m, uint8_t* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / cols, c = idx % cols;
    const int64_t g0 = c - c % m;
    const T* row = s + r * s0;
    const float v = score_to_float(row[c * s1]);
    int rank = 0;
    for (int i = 0; i < m; ++i) {
      const int64_t ci = g0 + i;
      const float vi = score_to_float(row[ci * s1]);
      rank += (vi > v) || (vi == v && ci < c);
    }
    out[idx] = rank < n ? 1 : 0;
  }
}

}  // namespace

cudaError_t launch_nm_mask(const void* scores, ScoreType type, int64_t rows, int64_t cols, int64_t s0,
                           int64_t s1, int n, int m, uint8_t* out, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 65536 ? want : 65536);
  return dispatch_score_type(type, [&](auto tag) {
    using T = decltype(tag);
    nm_mask_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(scores), rows, cols, s0, s1, n, m, out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace admm_kernels
