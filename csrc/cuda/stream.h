// The current PyTorch CUDA stream, behind one function, so only this header depends on c10/cuda.
//
// c10/cuda headers need a CUDA build of torch (a CPU torch lacks c10/cuda/impl/cuda_cmake_macros.h), and
// the CI check of these sources runs `nvcc -fdevice-syntax-only` against a CPU torch: tools/
// check_cuda_syntax.py defines ADMM_SYNTAX_CHECK_ONLY, which swaps in the legacy default stream. Real
// builds (setup.py with a CUDA torch) never define it and use torch's current stream.
#pragma once

#include <cuda_runtime_api.h>

#ifndef ADMM_SYNTAX_CHECK_ONLY
#include <c10/cuda/CUDAStream.h>
#endif

namespace admm_kernels {
namespace cuda {

inline cudaStream_t current_stream(int device_index) {
#ifdef ADMM_SYNTAX_CHECK_ONLY
  (void)device_index;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream();
#endif
}

}  // namespace cuda
}  // namespace admm_kernels
