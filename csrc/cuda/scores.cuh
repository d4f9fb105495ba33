// Reading a score of any supported element type as fp32 (the comparison precision of every mask op).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace admm_kernels {
namespace cuda {

__device__ __forceinline__ float score_to_float(float v) { return v; }
__device__ __forceinline__ float score_to_float(double v) { return static_cast<float>(v); }  // like .float()
__device__ __forceinline__ float score_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float score_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Calls f(T{}) with T the C++ type of `type`; returns f's result.
template <typename F>
cudaError_t dispatch_score_type(ScoreType type, F&& f) {
  switch (type) {
    case ScoreType::kFloat32: return f(float{});
    case ScoreType::kFloat64: return f(double{});
    case ScoreType::kFloat16: return f(__half{});
    case ScoreType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace admm_kernels
