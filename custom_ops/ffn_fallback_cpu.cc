// CPU kernel of ai.tardis::FfnFallback. See ffn_fallback.h for the contract.
//
// Both schedules read only the W1/W2 rows of flagged neurons, and software-prefetch the next
// flagged row while the current one streams (flagged rows are scattered, one 4 KiB page each, so
// the hardware prefetchers alone leave the kernel latency-bound):
//  - few tokens (decode): each token's flagged neurons are cut into chunks of 16; a task
//    recomputes z and accumulates r_i * w2[i, :] for one chunk into its own partial row, then
//    y = y_folded + the token's partial rows in chunk order.
//  - many tokens (prefill): one block of tokens per thread; inside a block the loop runs over
//    neurons, so a flagged W1/W2 row is read from memory once and reused from cache by every
//    token of the block that flags it.
// Chunks and blocks depend on the inputs and the machine, never on the session's thread count,
// so results are the same for any intra-op thread count. Inner loops are plain contiguous loops
// written so that -O3 vectorises them at the baseline ISA (no AVX needed at run time).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "ffn_fallback.h"
#include "tardis_math.h"

namespace tardis {
namespace {

// ---- element conversion -------------------------------------------------------------------

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float v) { return v; }

// IEEE half -> float, branch-free and in int32 arithmetic only (SSE2 has signed 32-bit compares
// only), so that loops over half rows vectorise at the baseline ISA.
inline float to_float(uint16_t h) {
  const int32_t bits = h;
  const int32_t sign = -(bits >> 15) & INT32_MIN;
  const int32_t magnitude = bits & 0x7fff;
  const int32_t shifted = magnitude << 13;
  // Exponent rebias by a multiply: exact for normal and subnormal halves.
  const auto finite = static_cast<int32_t>(float_to_bits(bits_to_float(static_cast<uint32_t>(shifted)) * 0x1p112f));
  const int32_t special = -static_cast<int32_t>(magnitude >= 0x7c00);  // inf and NaN keep their payload
  return bits_to_float(static_cast<uint32_t>((special & (shifted | 0x7f800000)) | (~special & finite) | sign));
}

// float -> IEEE half, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= (127u + 16u) << 23) {                      // overflow, inf or NaN
    out = u > (255u << 23) ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {                      // result is subnormal or zero
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = static_cast<uint16_t>(float_to_bits(bits_to_float(u) + bits_to_float(magic)) - magic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

inline void store(float v, float* out) { *out = v; }
inline void store(float v, uint16_t* out) { *out = float_to_half(v); }

// ---- vector loops ---------------------------------------------------------------------------

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorise the dot

// Software prefetch of a weight row that will be read soon. Flagged rows are scattered (one
// 4 KiB page each), so the hardware prefetchers ramp up too late; prefetching the next flagged
// row while the current one streams through the ALUs is what makes the kernel bandwidth-bound.
template <typename W>
inline void prefetch(const W* p) {
  __builtin_prefetch(p, 0, 3);
}

template <typename W>
inline void prefetch_row(const W* row, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);
  for (int64_t j = 0; j < n; j += kLine) prefetch(row + j);
}

// dot(x, w) with float accumulation in a fixed order (lane-wise, then a pairwise tree). When
// `next` is given, the row of the same length there is prefetched along the way.
template <typename W>
inline float dot(const float* __restrict x, const W* __restrict w, int64_t n, const W* next = nullptr) {
  float acc[kLanes] = {};
  int64_t j = 0;
  if (next != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      prefetch(next + j);
      for (int k = 0; k < kLanes; ++k) acc[k] += x[j + k] * to_float(w[j + k]);
    }
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) acc[k] += x[j + k] * to_float(w[j + k]);
    }
  }
  for (int k = 0; j < n; ++j, ++k) acc[k] += x[j] * to_float(w[j]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// y += r * w; prefetches the row at `next` (same length) when given.
template <typename W>
inline void axpy(float* __restrict y, float r, const W* __restrict w, int64_t n, const W* next = nullptr) {
  int64_t j = 0;
  if (next != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      prefetch(next + j);
      for (int k = 0; k < kLanes; ++k) y[j + k] += r * to_float(w[j + k]);
    }
  }
  for (; j < n; ++j) y[j] += r * to_float(w[j]);
}

template <typename T>
inline void to_float_row(const T* __restrict src, float* __restrict dst, int64_t n, const T* next = nullptr) {
  int64_t j = 0;
  if (next != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      prefetch(next + j);
      for (int k = 0; k < kLanes; ++k) dst[j + k] = to_float(src[j + k]);
    }
  }
  for (; j < n; ++j) dst[j] = to_float(src[j]);
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) store(src[j], dst + j);
}

// ---- per-neuron parameters ------------------------------------------------------------------

template <typename T>
struct Neurons {
  const FallbackArgs<T>& a;
  const float* slope() const { return a.lines; }
  const float* intercept() const { return a.lines + a.h; }
  const float* lo() const { return a.lines + 2 * a.h; }
  const float* hi() const { return a.lines + 3 * a.h; }

  bool flagged(int64_t token, int64_t i) const {
    return is_flagged(to_float(a.z_hat[token * a.h + i]), lower_bound(lo()[i], a.margin),
                      upper_bound(hi()[i], a.margin));
  }

  // Residual of neuron i for an input row already in float; prefetches `next_w1_row` meanwhile.
  float residual_of(const float* x_row, const T* w1_row, int64_t i, const T* next_w1_row = nullptr) const {
    const float z = dot(x_row, w1_row, a.d, next_w1_row) + to_float(a.b1[i]);
    return residual(z, slope()[i], intercept()[i], a.approximate);
  }
};

void parallel_for(const ParallelRunner& runner, size_t total, void (*fn)(void*, size_t), void* data) {
  if (total == 0) return;
  if (runner.run == nullptr || total == 1) {
    for (size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  runner.run(runner.context, fn, total, data);
}

size_t hardware_threads() {
  static const size_t n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// ---- schedule 1: few tokens -----------------------------------------------------------------

constexpr int64_t kPairsPerChunk = 16;  // flagged (token, neuron) pairs per task

template <typename T>
struct FewTokens {
  const FallbackArgs<T>& a;
  Neurons<T> neurons;
  std::vector<float> x_float{};       // x rows in float (half inputs only)
  std::vector<int32_t> neuron{};      // flagged neuron of each pair, grouped by token, increasing
  std::vector<int32_t> chunk_token{}; // token of each chunk
  std::vector<int64_t> chunk_begin{}; // first pair of each chunk, plus the end
  std::vector<int64_t> token_chunk{}; // first chunk of each token, plus the end
  std::vector<float> partial{};       // [chunks, d] partial sums of r_i * w2[i, :]

  const float* x_row(int64_t t) const {
    if constexpr (std::is_same_v<T, float>) {
      return a.x + t * a.d;
    } else {
      return x_float.data() + t * a.d;
    }
  }

  static void chunk_task(void* self_ptr, size_t chunk) {
    auto& self = *static_cast<FewTokens*>(self_ptr);
    const FallbackArgs<T>& a = self.a;
    const int64_t d = a.d;
    const float* x = self.x_row(self.chunk_token[chunk]);
    float* acc = self.partial.data() + static_cast<int64_t>(chunk) * d;
    const int64_t begin = self.chunk_begin[chunk], end = self.chunk_begin[chunk + 1];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = self.neuron[p];
      const bool more = p + 1 < end;
      const float r = self.neurons.residual_of(x, a.w1t + i * d, i, more ? a.w1t + self.neuron[p + 1] * d : nullptr);
      axpy(acc, r, a.w2 + i * d, d, more ? a.w2 + self.neuron[p + 1] * d : nullptr);
    }
  }

  // y[t] = y_folded[t] + the token's partial sums, in chunk order.
  static void reduce_task(void* self_ptr, size_t token) {
    auto& self = *static_cast<FewTokens*>(self_ptr);
    const FallbackArgs<T>& a = self.a;
    const int64_t d = a.d;
    const auto t = static_cast<int64_t>(token);
    std::vector<float> buffer;
    float* acc;
    if constexpr (std::is_same_v<T, float>) {
      acc = a.y + t * d;
      std::memcpy(acc, a.y_folded + t * d, sizeof(float) * static_cast<size_t>(d));
    } else {
      buffer.resize(static_cast<size_t>(d));
      acc = buffer.data();
      to_float_row(a.y_folded + t * d, acc, d);
    }
    for (int64_t c = self.token_chunk[t]; c < self.token_chunk[t + 1]; ++c) {
      const float* part = self.partial.data() + c * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += part[j];
    }
    if constexpr (!std::is_same_v<T, float>) store_row(acc, a.y + t * d, d);
  }

  void run(const ParallelRunner& runner) {
    if constexpr (!std::is_same_v<T, float>) {
      x_float.resize(static_cast<size_t>(a.tokens * a.d));
      to_float_row(a.x, x_float.data(), a.tokens * a.d);
    }
    token_chunk.assign(1, 0);
    for (int64_t t = 0; t < a.tokens; ++t) {
      const auto first = static_cast<int64_t>(neuron.size());
      for (int64_t i = 0; i < a.h; ++i) {
        if (neurons.flagged(t, i)) neuron.push_back(static_cast<int32_t>(i));
      }
      const auto last = static_cast<int64_t>(neuron.size());
      for (int64_t p = first; p < last; p += kPairsPerChunk) {
        chunk_begin.push_back(p);
        chunk_token.push_back(static_cast<int32_t>(t));
      }
      token_chunk.push_back(static_cast<int64_t>(chunk_token.size()));
    }
    chunk_begin.push_back(static_cast<int64_t>(neuron.size()));
    const auto chunks = chunk_token.size();
    partial.assign(chunks * static_cast<size_t>(a.d), 0.0f);
    parallel_for(runner, chunks, chunk_task, this);
    parallel_for(runner, static_cast<size_t>(a.tokens), reduce_task, this);
  }
};

// ---- schedule 2: many tokens ----------------------------------------------------------------

template <typename T>
struct ManyTokens {
  const FallbackArgs<T>& a;
  Neurons<T> neurons;
  int64_t block_tokens;

  static void block_task(void* self_ptr, size_t block) {
    auto& self = *static_cast<ManyTokens*>(self_ptr);
    const FallbackArgs<T>& a = self.a;
    const int64_t t0 = static_cast<int64_t>(block) * self.block_tokens;
    const int64_t nb = std::min(self.block_tokens, a.tokens - t0);
    const int64_t d = a.d;

    // Float views of this block's x rows and accumulators (for float, y itself accumulates).
    std::vector<float> x_buf, acc_buf, w1_buf, w2_buf;
    const float* x_rows;
    float* acc_rows;
    if constexpr (std::is_same_v<T, float>) {
      x_rows = a.x + t0 * d;
      acc_rows = a.y + t0 * d;
      std::memcpy(acc_rows, a.y_folded + t0 * d, sizeof(float) * static_cast<size_t>(nb * d));
    } else {
      x_buf.resize(static_cast<size_t>(nb * d));
      acc_buf.resize(static_cast<size_t>(nb * d));
      w1_buf.resize(static_cast<size_t>(d));
      w2_buf.resize(static_cast<size_t>(d));
      to_float_row(a.x + t0 * d, x_buf.data(), nb * d);
      to_float_row(a.y_folded + t0 * d, acc_buf.data(), nb * d);
      x_rows = x_buf.data();
      acc_rows = acc_buf.data();
    }

    // The block's flagged neurons in increasing order, each with the tokens that flag it.
    std::vector<int32_t> ids, first_hit, hits;
    for (int64_t i = 0; i < a.h; ++i) {
      const auto before = static_cast<int32_t>(hits.size());
      for (int64_t k = 0; k < nb; ++k) {
        if (self.neurons.flagged(t0 + k, i)) hits.push_back(static_cast<int32_t>(k));
      }
      if (static_cast<int32_t>(hits.size()) > before) {
        ids.push_back(static_cast<int32_t>(i));
        first_hit.push_back(before);
      }
    }
    first_hit.push_back(static_cast<int32_t>(hits.size()));

    const float* slope = self.neurons.slope();
    const float* intercept = self.neurons.intercept();
    const auto entries = static_cast<int64_t>(ids.size());
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t i = ids[e];
      const T* w1_row = a.w1t + i * d;
      const T* w2_row = a.w2 + i * d;
      // The next entry's rows are prefetched while the first token of this entry streams.
      const T* next_w1 = e + 1 < entries ? a.w1t + ids[e + 1] * d : nullptr;
      const T* next_w2 = e + 1 < entries ? a.w2 + ids[e + 1] * d : nullptr;
      const float b = to_float(a.b1[i]);
      const int64_t m0 = first_hit[e], m1 = first_hit[e + 1];
      if (std::is_same_v<T, float> || m1 - m0 == 1) {
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t k = hits[m];
          const bool first = m == m0;
          const float z = dot(x_rows + k * d, w1_row, d, first ? next_w1 : nullptr) + b;
          axpy(acc_rows + k * d, residual(z, slope[i], intercept[i], a.approximate), w2_row, d,
               first ? next_w2 : nullptr);
        }
      } else {
        // Half rows shared by several tokens are converted once (exact, so the result is the
        // same as converting on the fly).
        to_float_row(w1_row, w1_buf.data(), d, next_w1);
        to_float_row(w2_row, w2_buf.data(), d, next_w2);
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t k = hits[m];
          const float z = dot(x_rows + k * d, w1_buf.data(), d) + b;
          axpy(acc_rows + k * d, residual(z, slope[i], intercept[i], a.approximate), w2_buf.data(), d);
        }
      }
    }
    if constexpr (!std::is_same_v<T, float>) store_row(acc_rows, a.y + t0 * d, nb * d);
  }

  void run(const ParallelRunner& runner) {
    const int64_t blocks = (a.tokens + block_tokens - 1) / block_tokens;
    parallel_for(runner, static_cast<size_t>(blocks), block_task, this);
  }
};

}  // namespace

template <typename T>
void ffn_fallback_cpu(const FallbackArgs<T>& args, const ParallelRunner& runner) {
  if (args.tokens <= 0 || args.d <= 0) return;
  const Neurons<T> neurons{args};
  const auto threads = static_cast<int64_t>(hardware_threads());
  if (args.tokens == 1 || args.tokens < threads) {
    FewTokens<T>{args, neurons}.run(runner);
    return;
  }
  // One block of tokens per hardware thread (large blocks share flagged rows between more
  // tokens), at most 64 tokens and fewer when rows are long, so that a block's x and
  // accumulator rows stay in cache.
  const int64_t max_block = std::clamp<int64_t>(65536 / args.d, 1, 64);
  const int64_t balanced = (args.tokens + threads - 1) / threads;
  ManyTokens<T>{args, neurons, std::clamp<int64_t>(balanced, 1, max_block)}.run(runner);
}

template void ffn_fallback_cpu<float>(const FallbackArgs<float>&, const ParallelRunner&);
template void ffn_fallback_cpu<uint16_t>(const FallbackArgs<uint16_t>&, const ParallelRunner&);

}  // namespace tardis
