// Fused ADMM element-wise step (see kernels.h): one read of W, U, M, B and one write of U, R per element,
// 25 bytes of traffic per element, so the kernel is bound by memory bandwidth; the contiguous path moves
// 4 elements per thread with 16-byte loads/stores (4-byte mask loads) to get close to copy bandwidth.
#include <cstdint>

#include "kernels.h"

namespace admm_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void step(float w, float& u, bool keep, float b, float rho, float& r) {
  const float s = w + u;
  const float z = keep ? s : 0.0f;
  u = s - z;
  r = b + rho * (z - u);
}

__global__ void dual_step_vec4(const float4* __restrict__ W, float4* U, const uchar4* __restrict__ M,
                               const float4* __restrict__ B, float rho, float4* R, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    const float4 w = W[i];
    float4 u = U[i];
    const uchar4 m = M[i];
    const float4 b = B[i];
    float4 r;
    step(w.x, u.x, m.x != 0, b.x, rho, r.x);
    step(w.y, u.y, m.y != 0, b.y, rho, r.y);
    step(w.z, u.z, m.z != 0, b.z, rho, r.z);
    step(w.w, u.w, m.w != 0, b.w, rho, r.w);
    U[i] = u;
    R[i] = r;
  }
}

// Contiguous elements [begin, end) one by one (unaligned data, or the tail after the vector part).
__global__ void dual_step_flat(const float* __restrict__ W, float* U, const uint8_t* __restrict__ M,
                               const float* __restrict__ B, float rho, float* R, int64_t begin, int64_t end) {
  for (int64_t i = begin + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < end;
       i += (int64_t)gridDim.x * blockDim.x) {
    float u = U[i], r;
    step(W[i], u, M[i] != 0, B[i], rho, r);
    U[i] = u;
    R[i] = r;
  }
}

// Any strides: one thread per element of a (rows, cols) grid, columns fastest.
__global__ void dual_step_strided(const float* W, float* U, const uint8_t* M, const float* B, float rho, float* R,
                                  int64_t rows, int64_t cols, DualStepStrides st) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t iu = r * st.u[0] + c * st.u[1];
    const int64_t ir = r * st.r[0] + c * st.r[1];
    float u = U[iu], out;
    step(W[r * st.w[0] + c * st.w[1]], u, M[r * st.m[0] + c * st.m[1]] != 0, B[r * st.b[0] + c * st.b[1]], rho,
         out);
    U[iu] = u;
    R[ir] = out;
  }
}

int blocks_for(int64_t work) {
  // Grid-stride loops: enough blocks to fill the GPU several times over, capped to keep launch cheap.
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

cudaError_t launch_dual_step(const float* W, float* U, const uint8_t* M, const float* B, float rho, float* R,
                             int64_t rows, int64_t cols, bool contiguous, const DualStepStrides& strides,
                             cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  if (!contiguous) {
    dual_step_strided<<<blocks_for(n), kThreads, 0, stream>>>(W, U, M, B, rho, R, rows, cols, strides);
    return cudaGetLastError();
  }
  int64_t done = 0;
  if (aligned(W, 16) && aligned(U, 16) && aligned(B, 16) && aligned(R, 16) && aligned(M, 4)) {
    const int64_t n4 = n / 4;
    if (n4 > 0) {
      dual_step_vec4<<<blocks_for(n4), kThreads, 0, stream>>>(
          reinterpret_cast<const float4*>(W), reinterpret_cast<float4*>(U), reinterpret_cast<const uchar4*>(M),
          reinterpret_cast<const float4*>(B), rho, reinterpret_cast<float4*>(R), n4);
      done = n4 * 4;
    }
  }
  if (done < n) {
    dual_step_flat<<<blocks_for(n - done), kThreads, 0, stream>>>(W, U, M, B, rho, R, done, n);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace admm_kernels
