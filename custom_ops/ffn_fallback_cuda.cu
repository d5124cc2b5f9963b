// CUDA kernel of ai.tardis::FfnFallback. See ffn_fallback.h for the contract.
//
// Two launches on the caller's stream, for slices of tokens. Decode (at most kDecodeTokens tokens;
// latency-bound: few blocks, so the work per thread must be short and its loads independent):
//  1. residual_kernel, one block per (token, chunk of 128 neurons): tests the chunk's flags,
//     compacts the flagged neurons in index order, and gives each to a warp, which recomputes
//     z = x . w1t[i] + b1[i] (without w1t: z_hat[i] + b1[i]) and stores (i, residual) in a scratch list.
//  2. accumulate_kernel, one block per (token, 32 output columns): warp w walks the lists of
//     chunks w, w+16, ..., each lane owning one column, and the block sums
//     y = y_folded + sum_w partial_w in a fixed order.
// More tokens (many blocks; throughput-bound):
//  1. chunk_kernel, one block per (token, chunk of 128 neurons): tests the chunk's flags,
//     compacts the flagged neurons in index order, gives each to a warp, which recomputes
//     z = x . w1t[i] + b1[i] and its residual, then the block sums residual * w2[i, :] over its
//     flagged neurons into one partial row of d floats.
//  2. sum_kernel, one thread per (token, output column): y = y_folded + the chunks' partial rows,
//     in chunk order.
// With the low-rank predictor fused in (a.v set), the thread that tests a neuron's window computes
// its z_hat = code . V[:, i] itself (`predicted`).
// Both paths are deterministic (fixed summation orders, no atomics).
// Only the W1/W2 rows of flagged neurons are read. Scratch comes from ONNX Runtime's allocator
// inside a session, else from CUDA's stream-ordered allocator (cudaMallocAsync), so nothing here
// synchronises the stream.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ffn_fallback.h"
#include "tardis_math.h"

#define TARDIS_EXPORT extern "C" __attribute__((visibility("default")))

namespace tardis {
namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 128;                       // neurons per chunk block (one per thread)
constexpr int kChunkWarps = kChunk / kWarp;
constexpr int kColumnWarps = 16;                  // warps per accumulate block (32 columns)
constexpr int kUnroll = 4;                        // W2 rows an accumulate warp loads at once
constexpr int kSumThreads = 256;                  // columns per sum block
constexpr int64_t kDecodeTokens = 8;              // up to this many tokens: the decode path
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kScratchBudget = size_t{64} << 20;  // scratch bytes per token slice

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float v, float* p) { *p = v; }
__device__ __forceinline__ void store(float v, __half* p) { *p = __float2half_rn(v); }

// Neuron i's predicted pre-activation for token t: z_hat, or with the low-rank predictor fused in,
// code . V[:, i] (float accumulation, r increasing; code = the last a.rank columns of y_folded).
template <typename T>
__device__ __forceinline__ float predicted(const FallbackArgs<T>& a, int64_t t, int64_t i) {
  if (a.v == nullptr) return load(a.z_hat + t * a.h + i);
  const T* code = a.y_folded + t * a.folded_stride + a.d;
  float acc = 0.0f;
#pragma unroll 4
  for (int64_t r = 0; r < a.rank; ++r) acc += load(code + r) * load(a.v + r * a.h + i);
  return acc;
}

// ---- decode path (few tokens): flagged lists, then columns walk the lists ----

struct Lists {
  int32_t* neuron;  // [tokens, h]: per chunk, the flagged neurons in index order
  float* r;         // [tokens, h]: their residuals
  int32_t* count;   // [tokens, chunks]
};

template <typename T>
__global__ void residual_kernel(FallbackArgs<T> a, Lists s, int chunks) {
  const int64_t t = blockIdx.x;
  const int chunk = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t i = static_cast<int64_t>(chunk) * kChunk + threadIdx.x;

  bool flag = false;
  if (i < a.h) {
    flag = is_flagged(predicted(a, t, i), lower_bound(a.lines[kLo * a.h + i], a.margin),
                      upper_bound(a.lines[kHi * a.h + i], a.margin));
  }

  // Ordered compaction of the flagged neurons of this chunk.
  __shared__ int warp_count[kChunkWarps];
  __shared__ int32_t list[kChunk];
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_count[warp] = __popc(ballot);
  __syncthreads();
  int offset = 0, total = 0;
  for (int w = 0; w < kChunkWarps; ++w) {
    offset += w < warp ? warp_count[w] : 0;
    total += warp_count[w];
  }
  if (flag) list[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(i);
  __syncthreads();

  const int64_t base = t * a.h + static_cast<int64_t>(chunk) * kChunk;
  if (threadIdx.x == 0) s.count[t * chunks + chunk] = total;
  const T* x = a.x + t * a.d;
  for (int k = warp; k < total; k += kChunkWarps) {
    const int32_t n = list[k];
    float acc = 0.0f;
    if (a.w1t != nullptr) {  // uniform over the block: every lane takes the same branch
      const T* w = a.w1t + static_cast<int64_t>(n) * a.d;
#pragma unroll 4
      for (int64_t j = lane; j < a.d; j += kWarp) acc += load(x + j) * load(w + j);
      for (int width = kWarp / 2; width > 0; width /= 2) acc += __shfl_xor_sync(kFullMask, acc, width);
    }
    if (lane == 0) {
      const float z = (a.w1t != nullptr ? acc : load(a.z_hat + t * a.h + n)) + load(a.b1 + n);
      s.neuron[base + k] = n;
      s.r[base + k] = residual(z, a.lines[kSlope * a.h + n], a.lines[kIntercept * a.h + n], a.approximate);
    }
  }
}


template <typename T>
__global__ void accumulate_kernel(FallbackArgs<T> a, Lists s, int chunks) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + lane;
  const bool active = c < a.d;

  // Warp w takes chunks w, w + kColumnWarps, ...: few chunks per warp keeps the chain of dependent
  // loads short. The counts of its next 32 chunks are loaded at once, one per lane, then broadcast.
  float partial = 0.0f;
  for (int first = warp; first < chunks; first += kColumnWarps * kWarp) {
    const int mine = first + lane * kColumnWarps;
    const int my_count = mine < chunks ? s.count[t * chunks + mine] : 0;
    for (int j = 0; j < kWarp && first + j * kColumnWarps < chunks; ++j) {
      const int chunk = first + j * kColumnWarps;
      const int total = __shfl_sync(kFullMask, my_count, j);
      const int64_t base = t * a.h + static_cast<int64_t>(chunk) * kChunk;
      // kUnroll entries at a time so that their W2 loads are in flight together; the summation
      // order is that of the plain loop.
      int k = 0;
      for (; k + kUnroll <= total; k += kUnroll) {
        float r[kUnroll], w[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t n = s.neuron[base + k + u];
          r[u] = s.r[base + k + u];
          w[u] = active ? load(a.w2 + n * a.d + c) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) partial += r[u] * w[u];
      }
      for (; k < total; ++k) {
        const int64_t n = s.neuron[base + k];
        if (active) partial += s.r[base + k] * load(a.w2 + n * a.d + c);
      }
    }
  }

  __shared__ float parts[kColumnWarps][kWarp];
  parts[warp][lane] = partial;
  __syncthreads();
  if (warp == 0 && active) {
    float acc = load(a.y_folded + t * a.folded_stride + c);
    for (int w = 0; w < kColumnWarps; ++w) acc += parts[w][lane];
    store(acc, a.y + t * a.d + c);
  }
}

// ---- prefill path (many tokens): partial rows per chunk, then their sum ----

// partial: [tokens, chunks, d] floats, row (t, chunk) = sum of residual_i * w2[i, :] over the
// chunk's neurons flagged for token t (zeros when none is).
template <typename T>
__global__ void chunk_kernel(FallbackArgs<T> a, float* partial, int chunks) {
  const int64_t t = blockIdx.x;
  const int chunk = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t i = static_cast<int64_t>(chunk) * kChunk + threadIdx.x;

  bool flag = false;
  if (i < a.h) {
    flag = is_flagged(predicted(a, t, i), lower_bound(a.lines[kLo * a.h + i], a.margin),
                      upper_bound(a.lines[kHi * a.h + i], a.margin));
  }

  // Ordered compaction of the flagged neurons of this chunk.
  __shared__ int warp_count[kChunkWarps];
  __shared__ int32_t list[kChunk];
  __shared__ float r[kChunk];
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_count[warp] = __popc(ballot);
  __syncthreads();
  int offset = 0, total = 0;
  for (int w = 0; w < kChunkWarps; ++w) {
    offset += w < warp ? warp_count[w] : 0;
    total += warp_count[w];
  }
  if (flag) list[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(i);
  __syncthreads();

  const T* x = a.x + t * a.d;
  for (int k = warp; k < total; k += kChunkWarps) {
    const int32_t n = list[k];
    float acc = 0.0f;
    if (a.w1t != nullptr) {  // uniform over the block: every lane takes the same branch
      const T* w = a.w1t + static_cast<int64_t>(n) * a.d;
#pragma unroll 4
      for (int64_t j = lane; j < a.d; j += kWarp) acc += load(x + j) * load(w + j);
      for (int width = kWarp / 2; width > 0; width /= 2) acc += __shfl_xor_sync(kFullMask, acc, width);
    }
    if (lane == 0) {
      const float z = (a.w1t != nullptr ? acc : load(a.z_hat + t * a.h + n)) + load(a.b1 + n);
      r[k] = residual(z, a.lines[kSlope * a.h + n], a.lines[kIntercept * a.h + n], a.approximate);
    }
  }
  __syncthreads();

  float* out = partial + (t * chunks + chunk) * a.d;
  for (int64_t c = threadIdx.x; c < a.d; c += kChunk) {
    float acc = 0.0f;
#pragma unroll 4
    for (int k = 0; k < total; ++k) acc += r[k] * load(a.w2 + static_cast<int64_t>(list[k]) * a.d + c);
    out[c] = acc;
  }
}

template <typename T>
__global__ void sum_kernel(FallbackArgs<T> a, const float* partial, int chunks) {
  const int64_t t = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kSumThreads + threadIdx.x;
  if (c >= a.d) return;
  float acc = load(a.y_folded + t * a.folded_stride + c);
  const float* column = partial + t * chunks * a.d + c;
  for (int chunk = 0; chunk < chunks; ++chunk) acc += column[chunk * a.d];
  store(acc, a.y + t * a.d + c);
}

template <typename T>
FallbackArgs<T> token_slice(const FallbackArgs<T>& a, int64_t t0, int64_t tokens) {
  FallbackArgs<T> s = a;
  s.x += t0 * a.d;
  s.y_folded += t0 * a.folded_stride;
  if (s.z_hat != nullptr) s.z_hat += t0 * a.h;
  s.y += t0 * a.d;
  s.tokens = tokens;
  return s;
}

template <typename T>
cudaError_t launch(const FallbackArgs<T>& a, cudaStream_t stream, const DeviceScratch& scratch) {
  if (a.tokens < 0 || a.d < 0 || a.h < 0 || (a.approximate != kGeluErf && a.approximate != kGeluTanh)) {
    return cudaErrorInvalidValue;
  }
  if (a.tokens == 0 || a.d == 0) return cudaSuccess;
  if (a.folded_stride != a.d + (a.v != nullptr ? a.rank : 0)) return cudaErrorInvalidValue;
  if (a.h == 0) {
    return cudaMemcpy2DAsync(a.y, sizeof(T) * a.d, a.y_folded, sizeof(T) * a.folded_stride, sizeof(T) * a.d, a.tokens,
                             cudaMemcpyDeviceToDevice, stream);
  }
  if ((a.v == nullptr) == (a.z_hat == nullptr)) return cudaErrorInvalidValue;
  const int64_t chunks = (a.h + kChunk - 1) / kChunk;
  const bool decode = a.tokens <= kDecodeTokens;
  const int64_t column_blocks = decode ? (a.d + kWarp - 1) / kWarp : (a.d + kSumThreads - 1) / kSumThreads;
  if (chunks > 65535 || column_blocks > 65535 || a.h > INT32_MAX) return cudaErrorInvalidConfiguration;

  // Token slices bound the scratch: per token, the (index, residual) lists and one count per chunk
  // (decode), or one partial row of d floats per chunk.
  const size_t per_token = decode ? (sizeof(int32_t) + sizeof(float)) * a.h + sizeof(int32_t) * chunks
                                  : sizeof(float) * chunks * a.d;
  const int64_t slice = std::max<int64_t>(1, std::min<int64_t>(a.tokens, kScratchBudget / per_token));
  const size_t bytes = per_token * slice;

  void* memory = nullptr;
  bool async = true;
  cudaError_t err = cudaSuccess;
  if (scratch.alloc != nullptr) {
    memory = scratch.alloc(scratch.context, bytes);
    if (memory == nullptr) return cudaErrorMemoryAllocation;
  } else {
    err = cudaMallocAsync(&memory, bytes, stream);
    if (err == cudaErrorNotSupported) {  // no stream-ordered allocator: plain allocation
      cudaGetLastError();
      async = false;
      err = cudaMalloc(&memory, bytes);
    }
    if (err != cudaSuccess) return err;
  }
  Lists lists{static_cast<int32_t*>(memory), nullptr, nullptr};
  lists.r = reinterpret_cast<float*>(lists.neuron + slice * a.h);
  lists.count = reinterpret_cast<int32_t*>(lists.r + slice * a.h);
  float* partial = static_cast<float*>(memory);

  for (int64_t t0 = 0; t0 < a.tokens && err == cudaSuccess; t0 += slice) {
    const int64_t n = std::min(slice, a.tokens - t0);
    const FallbackArgs<T> part = token_slice(a, t0, n);
    const dim3 by_chunk(static_cast<unsigned>(n), static_cast<unsigned>(chunks));
    const dim3 by_columns(static_cast<unsigned>(n), static_cast<unsigned>(column_blocks));
    if (decode) {
      residual_kernel<T><<<by_chunk, kChunk, 0, stream>>>(part, lists, static_cast<int>(chunks));
      accumulate_kernel<T><<<by_columns, kColumnWarps * kWarp, 0, stream>>>(part, lists, static_cast<int>(chunks));
    } else {
      chunk_kernel<T><<<by_chunk, kChunk, 0, stream>>>(part, partial, static_cast<int>(chunks));
      sum_kernel<T><<<by_columns, kSumThreads, 0, stream>>>(part, partial, static_cast<int>(chunks));
    }
    err = cudaGetLastError();
  }
  if (scratch.alloc != nullptr) {
    scratch.free(scratch.context, memory);  // stream-ordered: later work on `stream` runs after ours
    return err;
  }
  if (async) {
    const cudaError_t free_err = cudaFreeAsync(memory, stream);
    return err != cudaSuccess ? err : free_err;
  }
  const cudaError_t sync_err = cudaStreamSynchronize(stream);
  cudaFree(memory);
  return err != cudaSuccess ? err : sync_err;
}

// Host-side half bits -> device __half view of the same arguments.
FallbackArgs<__half> as_half(const FallbackArgs<uint16_t>& a) {
  const auto h = [](const uint16_t* p) { return reinterpret_cast<const __half*>(p); };
  return FallbackArgs<__half>{h(a.x),     h(a.y_folded), h(a.z_hat),     h(a.w1t),
                              h(a.b1),    h(a.w2),       a.lines,        reinterpret_cast<__half*>(a.y),
                              a.tokens,   a.d,           a.h,            a.margin,
                              a.approximate, h(a.v),     a.rank,         a.folded_stride};
}

const char* message(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

template <>
const char* ffn_fallback_cuda<float>(const FallbackArgs<float>& args, void* stream, const DeviceScratch& scratch) {
  return message(launch(args, static_cast<cudaStream_t>(stream), scratch));
}

template <>
const char* ffn_fallback_cuda<uint16_t>(const FallbackArgs<uint16_t>& args, void* stream,
                                        const DeviceScratch& scratch) {
  return message(launch(as_half(args), static_cast<cudaStream_t>(stream), scratch));
}

}  // namespace tardis

// ---- C entry points (ctypes tests and other hosts): device pointers, returns a cudaError_t ----
// Give z_hat (v null, rank 0) or the low-rank factor v [rank, h] (z_hat null; then y_folded rows
// are d + rank long, the code x·U after the folded output).

TARDIS_EXPORT int tardis_ffn_fallback_cuda_f32(const float* x, const float* y_folded, const float* z_hat,
                                               const float* w1t, const float* b1, const float* w2,
                                               const float* lines, const float* v, float* y, int64_t tokens,
                                               int64_t d, int64_t h, int64_t rank, float margin, int approximate,
                                               void* stream) {
  const tardis::FallbackArgs<float> args{x, y_folded, z_hat, w1t,    b1,          w2, lines,
                                         y, tokens,   d,     h,      margin, approximate, v, rank,
                                         d + rank};
  return static_cast<int>(tardis::launch(args, static_cast<cudaStream_t>(stream), tardis::DeviceScratch{}));
}

// Half-precision variant: x, y_folded, z_hat, w1t, b1, w2, v and y point to IEEE half data.
TARDIS_EXPORT int tardis_ffn_fallback_cuda_f16(const void* x, const void* y_folded, const void* z_hat,
                                               const void* w1t, const void* b1, const void* w2,
                                               const float* lines, const void* v, void* y, int64_t tokens,
                                               int64_t d, int64_t h, int64_t rank, float margin, int approximate,
                                               void* stream) {
  const auto p = [](const void* q) { return static_cast<const __half*>(q); };
  const tardis::FallbackArgs<__half> args{p(x),        p(y_folded), p(z_hat), p(w1t), p(b1),
                                          p(w2),       lines,       static_cast<__half*>(y), tokens, d,
                                          h,           margin,      approximate, p(v), rank,
                                          d + rank};
  return static_cast<int>(tardis::launch(args, static_cast<cudaStream_t>(stream), tardis::DeviceScratch{}));
}

TARDIS_EXPORT const char* tardis_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
