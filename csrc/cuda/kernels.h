// Launchers of the CUDA kernels (csrc/cuda/*_kernel.cu), plain C++ with raw pointers.
//
// The kernel translation units include no torch header at all, so `nvcc -fdevice-syntax-only` checks
// them in seconds; the torch glue (checks, allocation, dispatcher registration) is in ops_cuda.cpp, plain C++.
// Every launcher enqueues on `stream` and returns the launch status (cudaGetLastError()).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace admm_kernels {
namespace cuda {

// Element type of a scores tensor. Scores are compared as fp32, as the reference does (`.float()`).
enum class ScoreType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// (row, column) strides in elements of the five operands of the fused step.
struct DualStepStrides {
  int64_t w[2], u[2], m[2], b[2], r[2];
};

// Fused ADMM step on (rows, cols) float32 W, U, B, R and byte mask M (nonzero = kept), in place on U, R:
//   Z = (W + U) * M;  U <- U + W - Z;  R <- B + rho * (Z - U).
// `contiguous`: all five are row-major contiguous (strides then ignored; 16-byte vector path when aligned).
cudaError_t launch_dual_step(const float* W, float* U, const uint8_t* M, const float* B, float rho, float* R,
                             int64_t rows, int64_t cols, bool contiguous, const DualStepStrides& strides,
                             cudaStream_t stream);

// N:M mask: out[r * cols + c] = 1 when scores[r, c] is among the n largest of its group of m consecutive
// columns (ties: smaller column kept). scores: (rows, cols) with strides (s0, s1), cols % m == 0.
cudaError_t launch_nm_mask(const void* scores, ScoreType type, int64_t rows, int64_t cols, int64_t s0,
                           int64_t s1, int n, int m, uint8_t* out, cudaStream_t stream);

// Bytes of scratch memory launch_topk_mask needs (any alignment of 256 bytes, as allocators give).
size_t topk_workspace_bytes(int64_t rows, int64_t cols, bool per_row);

// Top-k pruning mask: prune the k smallest scores of the whole (rows, cols) tensor (per_row = false) or of
// each row, ties broken by the smaller flat (resp. column) index; out[r * cols + c] = 1 means kept.
// Requires rows * cols < 2^31 and 0 < k < length (k = 0 / k = length are handled by the caller).
cudaError_t launch_topk_mask(const void* scores, ScoreType type, int64_t rows, int64_t cols, int64_t s0,
                             int64_t s1, bool per_row, int64_t k, uint8_t* out, void* workspace,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace admm_kernels
