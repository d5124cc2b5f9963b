// CUDA kernel of ai.tardis::FfnFallback. See ffn_fallback.h for the contract.
//
// Two launches on the caller's stream, for slices of tokens:
//  1. residual_kernel, one block per (token, chunk of 128 neurons): tests the chunk's flags,
//     compacts the flagged neurons in index order, and gives each to a warp, which recomputes
//     z = x . w1t[i] + b1[i] and stores (i, residual) in a scratch list.
//  2. accumulate_kernel, one block per (token, 32 output columns): 8 warps walk the flagged
//     lists (warp w takes entries w, w+8, ...), each lane owning one column, and sum
//     y = y_folded + sum_w partial_w in a fixed order (deterministic, no atomics).
// Only the W1/W2 rows of flagged neurons are read. Scratch (the lists) comes from ONNX Runtime's
// allocator inside a session, else from CUDA's stream-ordered allocator (cudaMallocAsync), so
// nothing here synchronises the stream.
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
constexpr int kChunk = 128;                       // neurons per residual block (one per thread)
constexpr int kResidualWarps = kChunk / kWarp;
constexpr int kColumnWarps = 8;                   // warps per accumulate block (32 columns)
constexpr int kUnroll = 4;                        // W2 rows a warp loads at once
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kScratchBudget = size_t{64} << 20;  // bytes of (index, residual) lists per slice

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float v, float* p) { *p = v; }
__device__ __forceinline__ void store(float v, __half* p) { *p = __float2half_rn(v); }

struct Scratch {
  int32_t* neuron;  // [tokens, h]: per chunk, the flagged neurons in index order
  float* r;         // [tokens, h]: their residuals
  int32_t* count;   // [tokens, chunks]
};

template <typename T>
__global__ void residual_kernel(FallbackArgs<T> a, Scratch s, int chunks) {
  const int64_t t = blockIdx.x;
  const int chunk = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t i = static_cast<int64_t>(chunk) * kChunk + threadIdx.x;

  bool flag = false;
  if (i < a.h) {
    flag = is_flagged(load(a.z_hat + t * a.h + i), lower_bound(a.lines[kLo * a.h + i], a.margin),
                      upper_bound(a.lines[kHi * a.h + i], a.margin));
  }

  // Ordered compaction of the flagged neurons of this chunk.
  __shared__ int warp_count[kResidualWarps];
  __shared__ int32_t list[kChunk];
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_count[warp] = __popc(ballot);
  __syncthreads();
  int offset = 0, total = 0;
  for (int w = 0; w < kResidualWarps; ++w) {
    offset += w < warp ? warp_count[w] : 0;
    total += warp_count[w];
  }
  if (flag) list[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(i);
  __syncthreads();

  const int64_t base = t * a.h + static_cast<int64_t>(chunk) * kChunk;
  if (threadIdx.x == 0) s.count[t * chunks + chunk] = total;
  const T* x = a.x + t * a.d;
  for (int k = warp; k < total; k += kResidualWarps) {
    const int32_t n = list[k];
    const T* w = a.w1t + static_cast<int64_t>(n) * a.d;
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t j = lane; j < a.d; j += kWarp) acc += load(x + j) * load(w + j);
    for (int width = kWarp / 2; width > 0; width /= 2) acc += __shfl_xor_sync(kFullMask, acc, width);
    if (lane == 0) {
      const float z = acc + load(a.b1 + n);
      s.neuron[base + k] = n;
      s.r[base + k] = residual(z, a.lines[kSlope * a.h + n], a.lines[kIntercept * a.h + n], a.approximate);
    }
  }
}

template <typename T>
__global__ void accumulate_kernel(FallbackArgs<T> a, Scratch s, int chunks) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + lane;
  const bool active = c < a.d;

  float partial = 0.0f;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int total = s.count[t * chunks + chunk];
    const int64_t base = t * a.h + static_cast<int64_t>(chunk) * kChunk;
    // Entries k, k + 8, k + 16, ... of this warp, four at a time so that their W2 loads are in
    // flight together; the summation order stays that of the plain loop.
    int k = warp;
    for (; k + (kUnroll - 1) * kColumnWarps < total; k += kUnroll * kColumnWarps) {
      float r[kUnroll], w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t n = s.neuron[base + k + u * kColumnWarps];
        r[u] = s.r[base + k + u * kColumnWarps];
        w[u] = active ? load(a.w2 + n * a.d + c) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) partial += r[u] * w[u];
    }
    for (; k < total; k += kColumnWarps) {
      const int64_t n = s.neuron[base + k];
      if (active) partial += s.r[base + k] * load(a.w2 + n * a.d + c);
    }
  }

  __shared__ float parts[kColumnWarps][kWarp];
  parts[warp][lane] = partial;
  __syncthreads();
  if (warp == 0 && active) {
    float acc = load(a.y_folded + t * a.d + c);
    for (int w = 0; w < kColumnWarps; ++w) acc += parts[w][lane];
    store(acc, a.y + t * a.d + c);
  }
}

template <typename T>
FallbackArgs<T> token_slice(const FallbackArgs<T>& a, int64_t t0, int64_t tokens) {
  FallbackArgs<T> s = a;
  s.x += t0 * a.d;
  s.y_folded += t0 * a.d;
  s.z_hat += t0 * a.h;
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
  if (a.h == 0) {
    return cudaMemcpyAsync(a.y, a.y_folded, sizeof(T) * a.tokens * a.d, cudaMemcpyDeviceToDevice, stream);
  }
  const int64_t chunks = (a.h + kChunk - 1) / kChunk;
  const int64_t column_blocks = (a.d + kWarp - 1) / kWarp;
  if (chunks > 65535 || column_blocks > 65535 || a.h > INT32_MAX) return cudaErrorInvalidConfiguration;

  // Token slices bound the scratch: (index, residual) per neuron plus one count per chunk.
  const size_t per_token = sizeof(int32_t) * a.h + sizeof(float) * a.h + sizeof(int32_t) * chunks;
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
  Scratch s{static_cast<int32_t*>(memory), nullptr, nullptr};
  s.r = reinterpret_cast<float*>(s.neuron + slice * a.h);
  s.count = reinterpret_cast<int32_t*>(s.r + slice * a.h);

  for (int64_t t0 = 0; t0 < a.tokens && err == cudaSuccess; t0 += slice) {
    const int64_t n = std::min(slice, a.tokens - t0);
    const FallbackArgs<T> part = token_slice(a, t0, n);
    residual_kernel<T><<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(chunks)), kChunk, 0, stream>>>(
        part, s, static_cast<int>(chunks));
    accumulate_kernel<T><<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(column_blocks)),
                           kColumnWarps * kWarp, 0, stream>>>(part, s, static_cast<int>(chunks));
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
  return FallbackArgs<__half>{h(a.x),     h(a.y_folded), h(a.z_hat), h(a.w1t),
                              h(a.b1),    h(a.w2),       a.lines,    reinterpret_cast<__half*>(a.y),
                              a.tokens,   a.d,           a.h,        a.margin,
                              a.approximate};
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

TARDIS_EXPORT int tardis_ffn_fallback_cuda_f32(const float* x, const float* y_folded, const float* z_hat,
                                               const float* w1t, const float* b1, const float* w2,
                                               const float* lines, float* y, int64_t tokens, int64_t d,
                                               int64_t h, float margin, int approximate, void* stream) {
  const tardis::FallbackArgs<float> args{x, y_folded, z_hat, w1t, b1, w2, lines, y, tokens, d, h, margin, approximate};
  return static_cast<int>(tardis::launch(args, static_cast<cudaStream_t>(stream), tardis::DeviceScratch{}));
}

// Half-precision variant: x, y_folded, z_hat, w1t, b1, w2 and y point to IEEE half data.
TARDIS_EXPORT int tardis_ffn_fallback_cuda_f16(const void* x, const void* y_folded, const void* z_hat,
                                               const void* w1t, const void* b1, const void* w2,
                                               const float* lines, void* y, int64_t tokens, int64_t d,
                                               int64_t h, float margin, int approximate, void* stream) {
  const auto p = [](const void* v) { return static_cast<const __half*>(v); };
  const tardis::FallbackArgs<__half> args{p(x),   p(y_folded), p(z_hat), p(w1t),  p(b1),     p(w2),      lines,
                                          static_cast<__half*>(y), tokens, d, h, margin, approximate};
  return static_cast<int>(tardis::launch(args, static_cast<cudaStream_t>(stream), tardis::DeviceScratch{}));
}

TARDIS_EXPORT const char* tardis_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
