// Torch glue of the CUDA kernels: argument checks, output allocation, dispatcher registration.
//
// Registered for the CUDA dispatch key: admm_dual_step, nm_mask, prune_mask (schemas in admm_kernels/_ops.py).
// gram_update has no CUDA C++ kernel: on CUDA the registry uses the Triton triangle kernel (half the FLOPs)
// and otherwise the reference's cuBLAS GEMM (CompositeExplicitAutograd); a hand-written CUDA GEMM would
// not beat either.
//
// This file is plain C++, compiled by the host compiler like csrc/cpu/*.cpp; only the kernels
// (csrc/cuda/*_kernel.cu, behind kernels.h) go through nvcc, and no exception is thrown from a .cu file
// (the launchers return a cudaError_t). The syntax check of this file takes 4.4 s with g++ against 21.8 s
// for the same code as a .cu through nvcc (2 cores, one file at a time).
//
// Only light headers (no torch/extension.h, no ATen/cuda/*) so the syntax check stays fast.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "kernels.h"
#include "stream.h"

namespace admm_kernels {
namespace cuda {
namespace {

void check_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "admm_kernels CUDA ", what, " failed: ", cudaGetErrorString(err));
}

ScoreType score_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScoreType::kFloat32;
    case at::kDouble: return ScoreType::kFloat64;
    case at::kHalf: return ScoreType::kFloat16;
    case at::kBFloat16: return ScoreType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32/float64/float16/bfloat16, got ", t.scalar_type());
  }
  return ScoreType::kFloat32;
}

void check_cuda_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
}

// U and R are mutated (Tensor(a!) in the schema): the C++ signature must be the CPU kernel's, with
// non-const references. A different signature for the same op makes the dispatcher abort the process
// when _C is loaded ("Mismatch in kernel C++ signatures"), which only a real CUDA build shows.
void admm_dual_step(const at::Tensor& W_in, at::Tensor& U, const at::Tensor& M_in, const at::Tensor& B_in,
                    double rho, at::Tensor& R) {
  // The kernels write U and R element by element and promise __restrict__: outputs must not overlap
  // themselves or each other, and inputs that share memory with an output are read from copies (as on
  // the CPU).
  TORCH_CHECK_VALUE(at::has_internal_overlap(U) != at::MemOverlap::Yes,
                    "U has internally overlapping memory (an expanded view?)");
  TORCH_CHECK_VALUE(at::has_internal_overlap(R) != at::MemOverlap::Yes,
                    "R has internally overlapping memory (an expanded view?)");
  TORCH_CHECK_VALUE(!U.is_alias_of(R), "U and R must not share memory");
  auto unshared = [&](const at::Tensor& t) { return t.is_alias_of(U) || t.is_alias_of(R) ? t.clone() : t; };
  const at::Tensor W = unshared(W_in), M = unshared(M_in), B = unshared(B_in);
  const std::pair<const at::Tensor*, const char*> all[] = {{&W, "W"}, {&U, "U"}, {&M, "M"}, {&B, "B"}, {&R, "R"}};
  for (const auto& [t, name] : all) {
    check_cuda_2d(*t, name);
    TORCH_CHECK_VALUE(t->sizes() == W.sizes(), name, " has shape ", t->sizes(), ", expected W's ", W.sizes());
    TORCH_CHECK_VALUE(t->device() == W.device(), name, " is on ", t->device(), ", W on ", W.device());
    if (t != &M) TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(M.scalar_type() == at::kBool, "M must be a bool tensor, got ", M.scalar_type());
  c10::DeviceGuard guard(W.device());
  const bool contiguous =
      W.is_contiguous() && U.is_contiguous() && M.is_contiguous() && B.is_contiguous() && R.is_contiguous();
  DualStepStrides st{{W.stride(0), W.stride(1)},
                     {U.stride(0), U.stride(1)},
                     {M.stride(0), M.stride(1)},
                     {B.stride(0), B.stride(1)},
                     {R.stride(0), R.stride(1)}};
  check_ok(launch_dual_step(W.data_ptr<float>(), U.data_ptr<float>(), static_cast<const uint8_t*>(M.data_ptr()),
                            B.data_ptr<float>(), static_cast<float>(rho), R.data_ptr<float>(), W.size(0), W.size(1),
                            contiguous, st, current_stream(W.get_device())),
           "admm_dual_step");
}

at::Tensor nm_mask(const at::Tensor& scores, int64_t n, int64_t m) {
  check_cuda_2d(scores, "scores");
  const ScoreType type = score_type(scores, "scores");
  TORCH_CHECK_VALUE(m > 0, "m must be positive, got ", m);
  TORCH_CHECK_VALUE(n >= 0 && n <= m, "n must be in [0, m=", m, "], got ", n);
  TORCH_CHECK_VALUE(scores.size(1) % m == 0, "scores has ", scores.size(1), " columns, not a multiple of m=", m);
  c10::DeviceGuard guard(scores.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  check_ok(launch_nm_mask(scores.data_ptr(), type, scores.size(0), scores.size(1), scores.stride(0), scores.stride(1),
                          static_cast<int>(n), static_cast<int>(m), static_cast<uint8_t*>(out.data_ptr()),
                          current_stream(scores.get_device())),
           "nm_mask");
  return out;
}

at::Tensor prune_mask(const at::Tensor& scores, int64_t k, bool per_row) {
  check_cuda_2d(scores, "scores");
  const ScoreType type = score_type(scores, "scores");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  const int64_t length = per_row ? cols : rows * cols;
  TORCH_CHECK_VALUE(k >= 0 && k <= length, "k must be in [0, ", length, "], got ", k);
  TORCH_CHECK_VALUE(rows * cols < (int64_t{1} << 31), "scores of shape ", scores.sizes(),
                    " has 2^31 or more entries, beyond the CUDA top-k kernel's 32-bit indices");
  c10::DeviceGuard guard(scores.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  if (k == 0 || rows * cols == 0) return out.fill_(true);
  if (k == length) return out.fill_(false);
  at::Tensor ws = at::empty({static_cast<int64_t>(topk_workspace_bytes(rows, cols, per_row))},
                            scores.options().dtype(at::kByte));
  check_ok(launch_topk_mask(scores.data_ptr(), type, rows, cols, scores.stride(0), scores.stride(1), per_row, k,
                            static_cast<uint8_t*>(out.data_ptr()), ws.data_ptr(), current_stream(scores.get_device())),
           "prune_mask");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace admm_kernels

TORCH_LIBRARY_IMPL(admm_kernels, CUDA, m) {
  m.impl("admm_dual_step", &admm_kernels::cuda::admm_dual_step);
  m.impl("nm_mask", &admm_kernels::cuda::nm_mask);
  m.impl("prune_mask", &admm_kernels::cuda::prune_mask);
}
