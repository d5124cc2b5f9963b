// ai.tardis::FfnFallback kernels, independent of ONNX Runtime.
//
// For every token (row of the flattened leading dims):
//   y = y_folded + sum over flagged neurons i of residual_i(z_i) * w2[i, :]
//   z_i = dot(x, w1t[i]) + b1[i]           (recomputed exactly, float accumulation)
// or, without w1t (null: the predictor is accurate enough to stand for the pre-activation, e.g. an
// int8 copy of W1), z_i = z_hat[i] + b1[i]: no W1 row is read.
// where neuron i is flagged when z_hat[i] lies outside [lo_i - margin, hi_i + margin] (or is NaN).
// z_hat comes either as a tensor or, with the low-rank predictor fused in (`v` set), from the code
// c = x·U that the folded MatMul appends to each y_folded row: z_hat[i] = sum over r of c[r] * v[r, i]
// (r increasing, float accumulation).
// Element type T is float or IEEE half (passed as its uint16_t bits); `lines` is always float32.
// With `row_scales` set (int8 rows, the --quantize int8 rewrite), w1t and w2 are null and their
// rows come as int8 in w1t_q and w2_q: row k stands for q[k, :] * scale[k] (scale: row_scales[k] for
// W1ᵀ, row_scales[h + k] for W2). Rows are converted to float as float(q) * scale, except where
// decode adds a W2 row: (r * scale) * float(q), with no converted copy.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tardis {

template <typename T>
struct FallbackArgs {
  const T* x;            // [tokens, d]
  const T* y_folded;     // [tokens, folded_stride]: the folded output in the first d columns
  const T* z_hat;        // [tokens, h]; unused (may be null) when v is set
  const T* w1t;          // [h, d]  (W1 transposed: neuron i's input weights contiguous), or null:
                         //         z from z_hat (then z_hat is given, v is null)
  const T* b1;           // [h]
  const T* w2;           // [h, d]
  const float* lines;    // [4, h]  slope, intercept, lo, hi
  T* y;                  // [tokens, d]
  int64_t tokens;
  int64_t d;
  int64_t h;
  float margin;
  int approximate;       // 0: erf GELU, 1: tanh GELU
  const T* v;            // [rank, h] second low-rank factor, or null (then z_hat is read)
  int64_t rank;          // 0 when v is null
  int64_t folded_stride; // row length of y_folded: d, or d + rank when v is set
  const int8_t* w1t_q = nullptr;      // [h, d] int8 rows of W1ᵀ, or null (then w1t, or neither)
  const int8_t* w2_q = nullptr;       // [h, d] int8 rows of W2 when row_scales is set
  const float* row_scales = nullptr;  // [2, h]: scales of the W1ᵀ rows, then of the W2 rows; or null
};

// Runs fn(data, i) for every i in [0, total), possibly concurrently; the CPU kernel's only
// view of a thread pool. A null `run` means serial execution.
struct ParallelRunner {
  void (*run)(void* context, void (*fn)(void*, size_t), size_t total, void* data);
  void* context;
};

// CPU kernel (ffn_fallback_cpu.cc). T is float or uint16_t (half bits). Results do not depend on
// how many threads `runner` uses.
template <typename T>
void ffn_fallback_cpu(const FallbackArgs<T>& args, const ParallelRunner& runner);

// CPU: backs the 2 MiB-aligned pages of a read-only weight buffer with transparent huge pages
// (madvise MADV_HUGEPAGE, then MADV_COLLAPSE to do it now; Linux >= 6.1, contents unchanged). The
// fallback reads scattered 4 KiB rows of W1 and W2, each on its own 4 KiB page: with huge pages
// they cost no page walk (benchmarks/row_reads.c on a 2-core EPYC VM, 490 random rows, 2 threads,
// next row prefetched: 28-41 GB/s with 4 KiB pages, 37-40 GB/s with 2 MiB pages). Does nothing
// where unsupported or refused, or with TARDIS_HUGE_PAGES=0. Called once per weight tensor, when
// a kernel is created.
void back_with_huge_pages(const void* data, size_t bytes);

#ifdef USE_CUDA
// Device scratch for the CUDA kernel. `free` is called right after the kernels are enqueued, so
// the memory must be stream-ordered (ONNX Runtime's arena on its compute stream is). A null
// `alloc` selects CUDA's stream-ordered allocator (cudaMallocAsync / cudaFreeAsync).
struct DeviceScratch {
  void* (*alloc)(void* context, size_t bytes);
  void (*free)(void* context, void* pointer);
  void* context;
};

// CUDA kernel (ffn_fallback_cuda.cu): enqueues on `stream` (a cudaStream_t), does not synchronise.
// Returns nullptr on success, else a static error message.
template <typename T>
const char* ffn_fallback_cuda(const FallbackArgs<T>& args, void* stream, const DeviceScratch& scratch);
#endif

}  // namespace tardis
