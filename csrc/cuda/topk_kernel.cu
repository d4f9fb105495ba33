// Top-k pruning mask with the reference's exact tie rule, by radix select (see kernels.h).
//
// Pruning the k smallest scores with ties broken by the smaller index is pruning the k smallest compound
// keys (score, index). We select the k-th compound key by radix select, never sorting:
//   keys   : scores as fp32 (-0.0 canonicalised to +0.0, as the two compare equal in torch.sort) mapped to
//            uint32 whose unsigned order is the float order (negatives: flip all bits; others: the sign bit);
//   4 passes over the key, 8 bits each, most significant first: a block histograms (in shared memory) the
//            digit of the keys that match the prefix chosen so far, adding into a (problem, 256) table;
//            a select kernel scans the table, takes the bin holding the kk-th key and reduces kk;
//   then, unless every entry equal to the threshold key T is pruned (the usual case, detected on the device:
//            the index passes then return at once), up to 4 passes select the kk-th smallest index among
//            the entries equal to T (only as many as the index width needs);
//   mask   : keep = key > T || (key == T && index > I).
// A "problem" is the whole tensor (per_row = false; index = flat row-major index) or one row. No host sync.
// Memory traffic: ~10 streaming passes over 4-byte keys (+ the scores once), e.g. ~2 GB for 4096 x 11008.
#include <cstdint>

#include "kernels.h"
#include "scores.cuh"

namespace admm_kernels {
namespace cuda {
namespace {

constexpr int kBins = 256;
constexpr int kHistThreads = 256;
constexpr int kChunk = 16 * kHistThreads;  // elements per histogram block
constexpr int kMaxGridY = 65535;

struct State {  // per problem
  uint32_t tkey;  // threshold key (its prefix while the key passes run)
  uint32_t tidx;  // threshold index (its prefix while the index passes run)
  int32_t kk;     // rank (1-based) of the wanted compound key among those matching the prefixes
  int32_t skip;   // 1: every entry equal to tkey is pruned; no index passes needed
};

template <typename T>
__global__ void keys_kernel(const T* __restrict__ s, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                            uint32_t* __restrict__ keys) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    float v = score_to_float(s[r * s0 + c * s1]);
    if (v == 0.0f) v = 0.0f;  // -0.0 -> +0.0
    const uint32_t bits = __float_as_uint(v);
    keys[i] = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
}

__global__ void init_kernel(State* st, int problems, int32_t k) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < problems) st[p] = State{0u, 0u, k, 0};
}

// Histogram of one 8-bit digit (at `shift`) of the keys (index_stage = false) or of the indices of the
// entries whose key equals the threshold (index_stage = true), over entries matching the prefix above it.
__global__ void hist_kernel(const uint32_t* __restrict__ keys, int64_t length, int problems,
                            const State* __restrict__ st, uint32_t* __restrict__ hist, int shift, bool index_stage) {
  __shared__ uint32_t local[kBins];
  const uint32_t himask = shift + 8 >= 32 ? 0u : (~0u << (shift + 8));
  for (int p = blockIdx.y; p < problems; p += gridDim.y) {
    const State s = st[p];
    if (index_stage && s.skip) continue;  // uniform over the block
    for (int t = threadIdx.x; t < kBins; t += blockDim.x) local[t] = 0;
    __syncthreads();
    const uint32_t* k = keys + (int64_t)p * length;
    const int64_t begin = (int64_t)blockIdx.x * kChunk;
    const int64_t end = begin + kChunk < length ? begin + kChunk : length;
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      const uint32_t key = k[e];
      if (index_stage) {
        const uint32_t idx = static_cast<uint32_t>(e);
        if (key == s.tkey && ((idx ^ s.tidx) & himask) == 0) atomicAdd(&local[(idx >> shift) & 0xFF], 1u);
      } else if (((key ^ s.tkey) & himask) == 0) {
        atomicAdd(&local[(key >> shift) & 0xFF], 1u);
      }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < kBins; t += blockDim.x) {
      if (local[t]) atomicAdd(&hist[(int64_t)p * kBins + t], local[t]);
    }
    __syncthreads();
  }
}

// One block of 256 threads per problem: inclusive scan of the histogram, pick the bin with the kk-th entry.
__global__ void select_kernel(const uint32_t* __restrict__ hist, State* st, int shift, bool index_stage,
                              bool last_key_pass) {
  __shared__ uint32_t cum[kBins];
  const int p = blockIdx.x, t = threadIdx.x;
  State s = st[p];
  if (index_stage && s.skip) return;
  const uint32_t h = hist[(int64_t)p * kBins + t];
  cum[t] = h;
  __syncthreads();
  for (int off = 1; off < kBins; off <<= 1) {  // Hillis-Steele scan
    const uint32_t add = t >= off ? cum[t - off] : 0u;
    __syncthreads();
    cum[t] += add;
    __syncthreads();
  }
  const uint32_t incl = cum[t], excl = incl - h;
  const uint32_t kk = static_cast<uint32_t>(s.kk);
  if (excl < kk && kk <= incl) {  // exactly one thread: 1 <= kk <= total
    s.kk = static_cast<int32_t>(kk - excl);
    if (index_stage) {
      s.tidx |= static_cast<uint32_t>(t) << shift;
    } else {
      s.tkey |= static_cast<uint32_t>(t) << shift;
      if (last_key_pass) s.skip = (kk - excl == h) ? 1 : 0;
    }
    st[p] = s;
  }
}

__global__ void mask_kernel(const uint32_t* __restrict__ keys, int64_t length, int problems,
                            const State* __restrict__ st, uint8_t* __restrict__ out) {
  const int64_t total = length * problems;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int p = static_cast<int>(i / length);
    const uint32_t e = static_cast<uint32_t>(i - (int64_t)p * length);
    const State s = st[p];
    const uint32_t key = keys[i];
    out[i] = (key > s.tkey || (key == s.tkey && !s.skip && e > s.tidx)) ? 1 : 0;
  }
}

size_t round_up(size_t n) { return (n + 255) / 256 * 256; }

int grid_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<int>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

int index_passes(int64_t length) {
  int bits = 0;
  for (int64_t v = length - 1; v > 0; v >>= 1) ++bits;
  const int p = (bits + 7) / 8;
  return p > 0 ? p : 1;
}

}  // namespace

size_t topk_workspace_bytes(int64_t rows, int64_t cols, bool per_row) {
  const int64_t problems = per_row ? rows : 1;
  const int64_t length = per_row ? cols : rows * cols;
  const int passes = 4 + index_passes(length);
  return round_up(sizeof(uint32_t) * rows * cols) + round_up(sizeof(State) * problems) +
         round_up(sizeof(uint32_t) * kBins * problems * passes);
}

cudaError_t launch_topk_mask(const void* scores, ScoreType type, int64_t rows, int64_t cols, int64_t s0,
                             int64_t s1, bool per_row, int64_t k, uint8_t* out, void* workspace,
                             cudaStream_t stream) {
  const int problems = static_cast<int>(per_row ? rows : 1);
  const int64_t length = per_row ? cols : rows * cols;
  const int passes = 4 + index_passes(length);
  char* ws = static_cast<char*>(workspace);
  uint32_t* keys = reinterpret_cast<uint32_t*>(ws);
  State* st = reinterpret_cast<State*>(ws + round_up(sizeof(uint32_t) * rows * cols));
  uint32_t* hist = reinterpret_cast<uint32_t*>(ws + round_up(sizeof(uint32_t) * rows * cols) +
                                               round_up(sizeof(State) * problems));
  const size_t hist_bytes = sizeof(uint32_t) * kBins * problems * passes;

  cudaError_t err = dispatch_score_type(type, [&](auto tag) {
    using T = decltype(tag);
    keys_kernel<T><<<grid_for(rows * cols, 256), 256, 0, stream>>>(static_cast<const T*>(scores), rows, cols, s0, s1,
                                                                  keys);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(hist, 0, hist_bytes, stream)) != cudaSuccess) return err;
  init_kernel<<<(problems + 255) / 256, 256, 0, stream>>>(st, problems, static_cast<int32_t>(k));

  const dim3 hgrid(static_cast<unsigned>((length + kChunk - 1) / kChunk),
                   static_cast<unsigned>(problems < kMaxGridY ? problems : kMaxGridY));
  const int first_index_shift = 8 * (index_passes(length) - 1);
  for (int pass = 0; pass < passes; ++pass) {
    const bool index_stage = pass >= 4;
    const int shift = index_stage ? first_index_shift - 8 * (pass - 4) : 24 - 8 * pass;
    uint32_t* h = hist + (int64_t)pass * problems * kBins;
    hist_kernel<<<hgrid, kHistThreads, 0, stream>>>(keys, length, problems, st, h, shift, index_stage);
    select_kernel<<<problems, kBins, 0, stream>>>(h, st, shift, index_stage, !index_stage && shift == 0);
  }
  mask_kernel<<<grid_for(rows * cols, 256), 256, 0, stream>>>(keys, length, problems, st, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace admm_kernels
