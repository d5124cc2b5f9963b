// CPU kernel of ai.tardis::FfnFallback. See ffn_fallback.h for the contract.
//
// Tokens are taken in blocks (up to 2 MiB of x rows, at most 512 tokens). A block of up to two
// tokens (decode) runs the fused schedule described at `decode_part` below; larger blocks run three
// parallel phases:
//  A1. flags, split over chunks of neurons: a chunk tests its neurons' windows for every token
//      of the block (contiguous z_hat reads; float compares equivalent to the contract's double
//      ones) and lists, for each flagged neuron, the tokens that flag it.
//  A2. residuals, same chunks: each flagged neuron's W1 row is read once (the next one
//      prefetched meanwhile) and dotted with the x rows of its tokens four at a time (one W1
//      load feeds four products; the block's x rows stay in cache); the residuals r_i(z) go to
//      per-token pair lists, neurons in increasing order. Without W1ᵀ (residuals from z_hat) a
//      neuron's residuals are computed eight at a time (`residuals_batch`: vectorised erfc/exp).
//  B.  accumulation, split over tiles of 64 output columns: the tile's W2 segments of the
//      block's flagged neurons are packed contiguously (rows 4 KiB apart would alias in L1/L2;
//      each W2 byte is read from memory once per block), then per token 64 accumulators live
//      in registers while the token's pairs add r * w2[i, tile].
// Only the W1/W2 rows of neurons flagged by some token of the block are read. Int8 rows (row_scales
// set) are read as int8: the decode schedule adds W2's converted on the fly (axpy_int8_row) and
// converts W1ᵀ's once for its dot; phases A2 and B convert a row or tile segment once per block.
// With the low-rank predictor fused in (FallbackArgs::v), z_hat is computed where it is tested: a
// decode part first sums its neurons' z_hat over the rows of V, two at a time (`lowrank_z`), phase
// A1 packs its chunk's V columns once and sums each token's z_hat from them in registers
// (`lowrank_z_packed`).
//
// Chunks, tiles and blocks depend on the shapes only, and every output element is summed in an
// order that does not depend on which thread does what, so results are bitwise the same for
// any intra-op thread count. The hot loops are compiled for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2 + FMA) and the baseline ISA, chosen at load time (GCC function multiversioning); on a
// given machine the result is fixed, across machines it may differ in the last bits (FMA).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ffn_fallback.h"
#include "tardis_math.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(TARDIS_NO_MULTIVERSION)
#define TARDIS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define TARDIS_CLONES __attribute__((noinline))
#endif

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

TARDIS_CLONES void half_to_float_row(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
}

// An int8 row as the contract reads it: dst[j] = float(src[j]) * scale, rounded to float.
TARDIS_CLONES void int8_to_float_row(const int8_t* __restrict src, float scale, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]) * scale;
}

void float_to_half_row(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_half(src[j]);
}

// ---- vector loops ---------------------------------------------------------------------------

// Dot products accumulate in 16 float lanes (element j into lane j % 16), kept as two 8-float
// vectors (one ymm each with AVX2 or AVX-512, two xmm each at the baseline: GCC keeps 32-byte
// vectors in registers on every target, wider ones it spills without AVX-512), then fold the
// lanes by a fixed pairwise tree. The arithmetic is the same for every ISA except for FMA
// contraction where the target has FMA.
constexpr int kLanes = 16;
constexpr int kHalf = 8;
typedef float Vec __attribute__((vector_size(kHalf * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// ---- GELU eight at a time ----------------------------------------------------------------------

typedef int32_t IVec __attribute__((vector_size(kHalf * sizeof(int32_t))));

inline Vec splat(float v) { return Vec{} + v; }
inline Vec min_vec(Vec a, Vec b) { return a < b ? a : b; }
inline Vec max_vec(Vec a, Vec b) { return a > b ? a : b; }

// exp(x): n = round(x / ln 2) (Cody-Waite split of ln 2), a degree-7 Taylor polynomial on the rest, times
// 2^n; within 2 ulp; 0 below -87 (-inf included), inf above 88, NaN stays NaN.
inline Vec exp_vec(Vec x) {
  const Vec clamped = max_vec(min_vec(x, splat(88.0f)), splat(-87.0f));
  const Vec n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const Vec r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  Vec p = splat(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  Vec out = x < -87.0f ? splat(0.0f) : p * scale;
  out = x > 88.0f ? splat(INFINITY) : out;
  return x != x ? x : out;
}

// erfc(u) after N. Juffa's erff (StackOverflow 35148198; ONNX Runtime's MLAS uses the same polynomials):
// for t = |u| <= 0.927734375, erf(t) = t + t·P(t²); beyond, erfc(t) = exp(R(t)); erfc(-t) = 2 - erfc(t).
inline Vec erfc_vec(Vec u) {
  const Vec t = u < 0 ? -u : u;
  const Vec s = t * t;
  Vec p = splat(-5.96761703e-4f);
  for (const float c : {4.99119423e-3f, -2.67681349e-2f, 1.12819925e-1f, -3.76125336e-1f, 1.28379166e-1f}) {
    p = p * s + c;
  }
  const Vec small = 1.0f - (p * t + t);
  const Vec tb = min_vec(t, splat(10.0f));  // erfc(10) is 0 in float; an infinite t would make R NaN
  Vec r = (splat(-1.72853470e-5f) * tb + 3.83197126e-4f) * (tb * tb) + (splat(-3.88396438e-3f) * tb + 2.42546219e-2f);
  for (const float c : {-1.06777877e-1f, -6.34846687e-1f, -1.28717512e-1f}) r = r * tb + c;
  const Vec positive = t <= 0.927734375f ? small : exp_vec(r * tb - tb);
  const Vec out = u < 0 ? 2.0f - positive : positive;
  return u != u ? u : out;
}

// r[k] = GELU(z[k]) - (slope[k] z[k] + intercept[k]) for k < n, eight at a time: `residual`'s formulas with
// erfc and exp above (measured against double GELU on [-30, 30] in steps of 1e-5: the scalar's absolute error,
// <= 4e-7 (erf) and 5e-7 (tanh); relative error <= 7e-5 where |GELU| > 1e-8); the tail through `residual`.
TARDIS_CLONES void residuals_batch(const float* __restrict z, const float* __restrict slope,
                                   const float* __restrict intercept, int approximate, int64_t n, float* __restrict r) {
  int64_t k = 0;
  for (; k + kHalf <= n; k += kHalf) {
    const Vec x = load(z + k);
    Vec g;
    if (approximate == kGeluTanh) {
      g = x / (1.0f + exp_vec(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
    } else {
      g = 0.5f * x * erfc_vec(x * -0.7071067811865476f);
    }
    store(r + k, g - (load(slope + k) * x + load(intercept + k)));
  }
  for (; k < n; ++k) r[k] = residual(z[k], slope[k], intercept[k], approximate);
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) prefetch(c + b);
}

inline float fold(Vec lo, Vec hi, const float* x, const float* w, int64_t j, int64_t n) {
  float lane[kLanes];
  std::memcpy(lane, &lo, sizeof lo);
  std::memcpy(lane + kHalf, &hi, sizeof hi);
  for (int k = 0; j < n; ++j, ++k) lane[k] += x[j] * w[j];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) lane[k] += lane[k + width];
  }
  return lane[0];
}

// out[k] = dot(x[k], w) for M rows x[k] sharing one row w (each W load feeds M products). The
// arithmetic of each product is the same for any M. Along the way one cache line of each of the P
// rows next[0..P) (same length as w) is prefetched per line of w; none when next[0] is null.
template <int M, int P>
inline void dots(const float* const* x, const float* __restrict w, int64_t n, const float* const* next, float* out) {
  Vec lo[M], hi[M];
  for (int k = 0; k < M; ++k) lo[k] = hi[k] = Vec{};
  const auto step = [&](int64_t j) {
    const Vec wl = load(w + j), wh = load(w + j + kHalf);
    for (int k = 0; k < M; ++k) {
      lo[k] += load(x[k] + j) * wl;
      hi[k] += load(x[k] + j + kHalf) * wh;
    }
  };
  int64_t j = 0;
  if (next[0] != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      for (int p = 0; p < P; ++p) prefetch(next[p] + j);
      step(j);
    }
  }
  for (; j + kLanes <= n; j += kLanes) step(j);
  for (int k = 0; k < M; ++k) out[k] = fold(lo[k], hi[k], x[k], w, j, n);
}

// z[k] = dot(x_block[token[k]], w) for the m tokens that flag one neuron; prefetches `next`.
TARDIS_CLONES void neuron_dots(const float* x_block, int64_t d, const int32_t* token, int64_t m, const float* w,
                               const float* next, float* z) {
  const float* first[1] = {next};
  const float* none[1] = {nullptr};
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    const float* x[4] = {x_block + token[k] * d, x_block + token[k + 1] * d, x_block + token[k + 2] * d,
                         x_block + token[k + 3] * d};
    dots<4, 1>(x, w, d, k == 0 ? first : none, z + k);
  }
  const float* const* ahead = k == 0 ? first : none;
  if (m - k == 3) {
    const float* x[3] = {x_block + token[k] * d, x_block + token[k + 1] * d, x_block + token[k + 2] * d};
    dots<3, 1>(x, w, d, ahead, z + k);
  } else if (m - k == 2) {
    const float* x[2] = {x_block + token[k] * d, x_block + token[k + 1] * d};
    dots<2, 1>(x, w, d, ahead, z + k);
  } else if (m - k == 1) {
    const float* x[1] = {x_block + token[k] * d};
    dots<1, 1>(x, w, d, ahead, z + k);
  }
}

// acc[0:n] += r * w[0:n]; prefetches the row at `next` (same length) when given.
TARDIS_CLONES void axpy_row(float* __restrict acc, float r, const float* __restrict w, int64_t n, const float* next) {
  const Vec rv = Vec{} + r;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    if (next != nullptr) prefetch(next + j);
    store(acc + j, load(acc + j) + rv * load(w + j));
    store(acc + j + kHalf, load(acc + j + kHalf) + rv * load(w + j + kHalf));
  }
  for (; j < n; ++j) acc[j] += r * w[j];
}

// acc[0:n] += rs * float(q[0:n]): an int8 row times its residual and scale (rs = r * scale), converted
// as it is added.
TARDIS_CLONES void axpy_int8_row(float* __restrict acc, float rs, const int8_t* __restrict q, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += rs * static_cast<float>(q[j]);
}

// out[k] = dot(x[k], w) for m = 1 or 2 rows x[k]; along the way streams in the row `next` (same
// length as w, may be null), one cache line per line of w.
TARDIS_CLONES void dots_prefetch(const float* const* x, int m, const float* __restrict w, int64_t n, const float* next,
                                 float* out) {
  const float* ahead[1] = {next};
  if (m == 1) {
    dots<1, 1>(x, w, n, ahead, out);
  } else {
    dots<2, 1>(x, w, n, ahead, out);
  }
}

// acc[0:n] += part[0:n]
TARDIS_CLONES void add_row(float* __restrict acc, const float* __restrict part, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += part[j];
}

// acc[0:n] = (acc[0:n] + r0 * w0[0:n]) + r1 * w1[0:n], the same arithmetic as two axpy_row calls;
// prefetches the rows next0 and next1 (same length) when next0 is given.
TARDIS_CLONES void axpy_two_rows(float* __restrict acc, float r0, const float* __restrict w0, float r1,
                                 const float* __restrict w1, int64_t n, const float* next0, const float* next1) {
  const Vec rv0 = Vec{} + r0, rv1 = Vec{} + r1;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    if (next0 != nullptr) {
      prefetch(next0 + j);
      prefetch(next1 + j);
    }
    for (int64_t k = j; k < j + kLanes; k += kHalf) {
      Vec sum = load(acc + k) + rv0 * load(w0 + k);
      store(acc + k, sum + rv1 * load(w1 + k));
    }
  }
  for (; j < n; ++j) {
    acc[j] += r0 * w0[j];
    acc[j] += r1 * w1[j];
  }
}

// The low-rank predictor fused in: z[0:n] = sum over r < rank (increasing) of code[r] * v[r, 0:n],
// V rows `stride` apart. Two rows at a time (the sums stay in L1, each of z's loads and stores
// serves two rows), each V row segment one contiguous stream, the next two prefetched meanwhile
// (benchmarks/decode_kernel.cc, d = 1024, rank 64, cold weights, run in turn with one row at a time:
// nothing flagged 17.5-17.9 -> 13.7-14.5 us, 5% flagged 77-80 -> 73-77 us; four rows at a time or
// two unprefetched were slower than one). Half rows are converted through `row` ([n] floats).
TARDIS_CLONES void lowrank_z(const float* code, int64_t rank, const float* v, int64_t stride, int64_t n, float* z,
                             float*) {
  std::fill(z, z + n, 0.0f);
  int64_t r = 0;
  for (; r + 2 <= rank; r += 2) {
    const float* next0 = r + 2 < rank ? v + (r + 2) * stride : nullptr;
    const float* next1 = r + 3 < rank ? v + (r + 3) * stride : next0;
    axpy_two_rows(z, code[r], v + r * stride, code[r + 1], v + (r + 1) * stride, n, next0, next1);
  }
  if (r < rank) axpy_row(z, code[r], v + r * stride, n, nullptr);
}

TARDIS_CLONES void lowrank_z(const float* code, int64_t rank, const uint16_t* v, int64_t stride, int64_t n, float* z,
                             float* row) {
  std::fill(z, z + n, 0.0f);
  for (int64_t r = 0; r < rank; ++r) {
    if (r + 1 < rank) prefetch_bytes(v + (r + 1) * stride, n * static_cast<int64_t>(sizeof(uint16_t)));
    half_to_float_row(v + r * stride, row, n);
    axpy_row(z, code[r], row, n, nullptr);
  }
}

// The same sums from V columns packed contiguously ([rank, n], n neurons): tiles of 64 neurons keep
// their sums in registers over r (the prefill path, many tokens per packed block); the tail goes
// through lowrank_z. The sum order is lowrank_z's.
constexpr int64_t kLowRankTile = 64;

TARDIS_CLONES void lowrank_z_packed(const float* code, int64_t rank, const float* __restrict v, int64_t n,
                                    float* __restrict z) {
  constexpr int kVecs = kLowRankTile / kHalf;
  int64_t k0 = 0;
  for (; k0 + kLowRankTile <= n; k0 += kLowRankTile) {
    Vec acc[kVecs];
    for (int k = 0; k < kVecs; ++k) acc[k] = Vec{};
    for (int64_t r = 0; r < rank; ++r) {
      const Vec c = Vec{} + code[r];
      const float* row = v + r * n + k0;
      for (int k = 0; k < kVecs; ++k) acc[k] += c * load(row + k * kHalf);
    }
    for (int k = 0; k < kVecs; ++k) store(z + k0 + k * kHalf, acc[k]);
  }
  if (k0 < n) lowrank_z(code, rank, v + k0, n, n - k0, z + k0, nullptr);
}

// flag[k] = 1 when z[k] lies outside [lo[k] - margin, hi[k] + margin] (compared in double, as
// the contract says) or is NaN, else 0.
template <typename T>
inline void window_flags_exact_t(const T* __restrict z, const float* __restrict lo, const float* __restrict hi,
                                 float margin, int64_t n, uint8_t* __restrict flag) {
  const double m = margin;
  for (int64_t k = 0; k < n; ++k) {
    const double v = to_float(z[k]);
    flag[k] = static_cast<uint8_t>(!((v >= static_cast<double>(lo[k]) - m) & (v <= static_cast<double>(hi[k]) + m)));
  }
}

TARDIS_CLONES void window_flags_exact(const float* z, const float* lo, const float* hi, float margin, int64_t n,
                                      uint8_t* flag) {
  window_flags_exact_t(z, lo, hi, margin, n, flag);
}

TARDIS_CLONES void window_flags_exact(const uint16_t* z, const float* lo, const float* hi, float margin, int64_t n,
                                      uint8_t* flag) {
  window_flags_exact_t(z, lo, hi, margin, n, flag);
}

// Phase B's inner loop for one token and one tile of kTile output columns, accumulators in
// registers: acc[0:kTile] += r[p] * packed[entry[p]][0:kTile] for p < m (in that order); the
// packed row four pairs on is prefetched (the packed tile is L2-sized).
constexpr int kTile = 64;

TARDIS_CLONES void token_tile(const int32_t* __restrict entry, const float* __restrict r, int64_t m,
                              const float* __restrict packed, float* __restrict acc) {
  Vec a[kTile / kHalf];
  for (int k = 0; k < kTile / kHalf; ++k) a[k] = load(acc + k * kHalf);
  for (int64_t p = 0; p < m; ++p) {
    if (p + 4 < m) prefetch_bytes(packed + static_cast<int64_t>(entry[p + 4]) * kTile, kTile * sizeof(float));
    const float* w = packed + static_cast<int64_t>(entry[p]) * kTile;
    const Vec rv = Vec{} + r[p];
    for (int k = 0; k < kTile / kHalf; ++k) a[k] += rv * load(w + k * kHalf);
  }
  for (int k = 0; k < kTile / kHalf; ++k) store(acc + k * kHalf, a[k]);
}

// flag[k] = 1 when v[k] lies outside [lower[k], upper[k]] or is NaN, else 0.
TARDIS_CLONES void window_flags(const float* __restrict v, const float* __restrict lower, const float* __restrict upper,
                                int64_t n, uint8_t* __restrict flag) {
  // `&`, not `&&`: no branch, so the loop vectorises.
  for (int64_t k = 0; k < n; ++k) flag[k] = static_cast<uint8_t>(!((v[k] >= lower[k]) & (v[k] <= upper[k])));
}

// ---- window bounds in float ------------------------------------------------------------------

// For float z, (double)z >= L  <=>  z >= the least float >= L; likewise (double)z <= U  <=>
// z <= the greatest float <= U (NaN bounds stay NaN: never inside). So the contract's double
// test becomes two float compares, with the same decision for every z (NaN included).
inline float float_at_or_above(double bound) {
  const auto f = static_cast<float>(bound);
  return static_cast<double>(f) < bound ? std::nextafter(f, INFINITY) : f;
}

inline float float_at_or_below(double bound) {
  const auto f = static_cast<float>(bound);
  return static_cast<double>(f) > bound ? std::nextafter(f, -INFINITY) : f;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void parallel_for(const ParallelRunner& runner, size_t total, void (*fn)(void*, size_t), void* data) {
  if (total == 0) return;
  if (runner.run == nullptr || total == 1) {
    for (size_t i = 0; i < total; ++i) fn(data, i);
    return;
  }
  runner.run(runner.context, fn, total, data);
}

// ---- the schedule ----------------------------------------------------------------------------

// Tokens per block: a block's x rows (phase A) should stay in L2 / nearby L3; the larger the
// block, the more tokens share each W1/W2 row read, which outweighs x spilling from L2 to L3
// (measured: 2 MiB, 512 tokens at d = 1024, beat 1 MiB by 5%, 256 KiB by 40%).
constexpr int64_t kBlockBytes = int64_t{2} << 20;
constexpr int64_t kMaxBlockTokens = 512;
// W2 rows prefetched ahead while phase B packs a tile.
constexpr int64_t kPrefetchAhead = 6;
// W1 rows prefetched ahead in phase A2.
constexpr int64_t kRowsAhead = 1;
// Up to this many tokens a block runs the fused decode schedule (see `decode_part`); without W1ᵀ
// (residuals from z_hat: no x rows to dot) up to kFewPredicted tokens, as long as a part's partial
// rows (tokens × d floats) stay within kDecodePartialBytes: each flagged W2 row is then read once
// per call and added to the rows of the tokens that flag it (measured at d = 384, h = 1536, 8.6%
// flagged, 2 threads, one FFN: 12 tokens 156-161 -> 96-112 us, 32 tokens 259-274 -> 182-248 us, against
// the tiled prefill path, which packs the union of flagged W2 rows first).
constexpr int64_t kFewTokens = 2;
constexpr int64_t kFewPredicted = 64;
constexpr int64_t kDecodePartialBytes = int64_t{128} << 10;
// Decode: neurons per window-test batch; stride of the per-part counts (no false sharing).
constexpr int64_t kScan = 64;
constexpr int64_t kCountStride = 8;

// Decode row streaming: a listed neuron's W1 and W2 rows are fully prefetched kDecodeAhead
// neurons before their use, each while the same matrix's current row is read (one line per line:
// W1's during the dot, W2's during the axpy; fp32), and their first kDecodeTouchLines lines are
// touched as soon as the neuron is found flagged, which is up to kDecodeLag neurons earlier: the
// page walks and the hardware prefetchers start early (measured on a 2-core EPYC, cold caches:
// 5-15% faster than full prefetches alone, while prefetching more rows ahead gained nothing;
// spreading the two rows' prefetches over the dot and the axpy instead of both during the dot:
// flagged rows at 30-32 instead of 26-27 GB/s; touching 2 lines up to 8 neurons early instead of
// 1 line up to 4: op time -4%; touching none: +6%). Parts: the neuron range is cut into kDecodeParts.
constexpr int64_t kDecodeAhead = 1;
constexpr int64_t kDecodeLag = 8;
constexpr int64_t kDecodeTouchLines = 2;
constexpr int64_t kDecodeParts = 4;

// Phase A1 runs on the calling thread up to this many (token, neuron) window tests.
constexpr int64_t kSerialFlags = int64_t{1} << 15;

// Buffers that outlive a call: one set per calling thread (ONNX Runtime's threads persist), so
// steady-state calls allocate nothing (large fresh allocations cost a page fault per 4 KiB).
struct Workspace {
  // Phase A1 output, per chunk: flagged neurons, each with the tokens that flag it.
  struct alignas(64) Chunk {  // one per task: no false sharing between neighbours
    std::vector<int32_t> neuron, first, token, token_count;  // token_count: [nb] pairs per token
    int64_t entry_base = 0;                                  // global index of its first neuron
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> pair_cursor;  // [chunks, nb]: where chunk c writes token t's next pair
  // Phase A2 output: per token (CSR, neurons increasing), the global entry index and residual.
  std::vector<int64_t> row_begin;  // [nb + 1]
  std::vector<int32_t> pair_entry;
  std::vector<float> pair_r;
  std::vector<int32_t> entry_neuron;  // [entries]
  std::vector<float> x_float;         // half inputs: the block's x rows in float
  std::vector<float> partials;      // decode: [parts, nb, d]
  std::vector<int32_t> decode_neuron;  // decode: [h], part g's flagged neurons from g * part_neurons
  std::vector<uint64_t> decode_mask;   // decode: [h], which tokens flag them (bit t)
  std::vector<int64_t> decode_count;   // decode: [parts * kCountStride]
  std::vector<float> y_row;            // decode, half: one output row in float
  std::vector<float> code_float;       // fused low-rank predictor, half: the block's code rows in float
  std::vector<float> decode_z;         // decode, fused low-rank predictor: [nb, h] z_hat, by part
};

// Per-task scratch of the pool threads, reused across calls.
struct TaskScratch {
  std::vector<int32_t> hits;
  std::vector<float> packed;
  std::vector<float> w1_row, w2_row;  // decode, half: the current rows in float
  // Fused low-rank predictor: prefill, a chunk's V columns [rank, chunk]; decode, half: one V row segment.
  std::vector<float> v_chunk;
  std::vector<float> pre, slope, intercept, r;  // phase A2 from z_hat: a neuron's tokens' pre-activations, residuals
};

TaskScratch& task_scratch() {
  static thread_local TaskScratch scratch;
  return scratch;
}

template <typename T>
struct Fallback {
  using Chunk = Workspace::Chunk;
  const FallbackArgs<T>& a;
  Workspace& ws;
  int64_t block_tokens = 0, chunk_neurons = 0, n_chunks = 0, n_tiles = 0;

  // Current block.
  int64_t t0 = 0, nb = 0;
  const float* x_block = nullptr;  // [nb, d] in float
  // Fused low-rank predictor (a.v set): the block's code rows c = x·U in float, code_stride apart.
  const float* code_block = nullptr;
  int64_t code_stride = 0;

  // ---- weight rows: W1ᵀ (kW1) and W2 (kW2) as T (float or half) or as scaled int8 ----
  enum Matrix { kW1 = 0, kW2 = 1 };
  bool int8_rows() const { return a.row_scales != nullptr; }
  bool has_w1() const { return a.w1t != nullptr || a.w1t_q != nullptr; }
  // float rows are read in place; half and int8 rows are converted first.
  bool rows_in_place() const { return std::is_same_v<T, float> && !int8_rows(); }
  int64_t element_bytes() const { return int8_rows() ? 1 : static_cast<int64_t>(sizeof(T)); }
  int64_t row_bytes() const { return a.d * element_bytes(); }
  // Address of element j of row i of `m`.
  const void* row_address(Matrix m, int64_t i, int64_t j = 0) const {
    if (int8_rows()) return (m == kW1 ? a.w1t_q : a.w2_q) + i * a.d + j;
    return (m == kW1 ? a.w1t : a.w2) + i * a.d + j;
  }
  // Elements [j0, j0 + n) of row i of `m` in float, written to dst.
  void row_to_float(Matrix m, int64_t i, int64_t j0, int64_t n, float* dst) const {
    if (int8_rows()) {
      int8_to_float_row(static_cast<const int8_t*>(row_address(m, i, j0)), a.row_scales[m * a.h + i], dst, n);
    } else if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, row_address(m, i, j0), sizeof(float) * static_cast<size_t>(n));
    } else {
      half_to_float_row(static_cast<const uint16_t*>(row_address(m, i, j0)), dst, n);
    }
  }
  // Row i of `m` in float: the weights themselves when rows_in_place(), else converted into `scratch`.
  const float* row_float(Matrix m, int64_t i, std::vector<float>& scratch) const {
    if (rows_in_place()) return static_cast<const float*>(row_address(m, i));
    scratch.resize(static_cast<size_t>(a.d));
    row_to_float(m, i, 0, a.d, scratch.data());
    return scratch.data();
  }

  static void phase_a1(void* self, size_t c) { static_cast<Fallback*>(self)->flags(static_cast<int64_t>(c)); }
  static void phase_a2(void* self, size_t c) { static_cast<Fallback*>(self)->residuals(static_cast<int64_t>(c)); }
  static void phase_b(void* self, size_t k) { static_cast<Fallback*>(self)->accumulate(static_cast<int64_t>(k)); }

  void flags(int64_t c) {
    const int64_t h = a.h;
    const int64_t i0 = c * chunk_neurons;
    const int64_t cn = std::min(chunk_neurons, h - i0);
    Chunk& out = ws.chunks[c];
    out.neuron.clear();
    out.first.clear();
    out.token.clear();
    out.token_count.assign(static_cast<size_t>(nb), 0);

    std::vector<float> lower(static_cast<size_t>(cn)), upper(static_cast<size_t>(cn)), z_row;
    std::vector<float>& v_chunk = task_scratch().v_chunk;
    if (a.v != nullptr) {
      // The chunk's V columns, packed contiguous in float: rows h apart would alias in L1.
      z_row.resize(static_cast<size_t>(cn));
      v_chunk.resize(static_cast<size_t>(a.rank * cn));
      for (int64_t r = 0; r < a.rank; ++r) {
        const T* src = a.v + r * h + i0;
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(v_chunk.data() + r * cn, src, sizeof(float) * static_cast<size_t>(cn));
        } else {
          half_to_float_row(src, v_chunk.data() + r * cn, cn);
        }
      }
    }
    const float* lo = a.lines + kLo * h + i0;
    const float* hi = a.lines + kHi * h + i0;
    for (int64_t k = 0; k < cn; ++k) {
      lower[k] = float_at_or_above(lower_bound(lo[k], a.margin));
      upper[k] = float_at_or_below(upper_bound(hi[k], a.margin));
    }
    if constexpr (!std::is_same_v<T, float>) z_row.resize(static_cast<size_t>(cn));
    std::vector<int32_t> count(static_cast<size_t>(cn), 0);
    std::vector<int32_t>& hits = task_scratch().hits;
    hits.resize(static_cast<size_t>(cn * nb));
    std::vector<uint8_t> flag(static_cast<size_t>(ceil_div(cn, 8) * 8), 0);
    for (int64_t t = 0; t < nb; ++t) {
      const float* z;
      if (a.v != nullptr) {
        lowrank_z_packed(code_block + t * code_stride, a.rank, v_chunk.data(), cn, z_row.data());
        z = z_row.data();
      } else if constexpr (std::is_same_v<T, float>) {
        z = a.z_hat + (t0 + t) * h + i0;
      } else {
        half_to_float_row(a.z_hat + (t0 + t) * h + i0, z_row.data(), cn);
        z = z_row.data();
      }
      window_flags(z, lower.data(), upper.data(), cn, flag.data());
      for (int64_t k8 = 0; k8 < cn; k8 += 8) {
        uint64_t bits;
        std::memcpy(&bits, flag.data() + k8, sizeof bits);
        while (bits != 0) {
          const int64_t k = k8 + __builtin_ctzll(bits) / 8;
          hits[k * nb + count[k]++] = static_cast<int32_t>(t);
          ++out.token_count[t];
          bits &= bits - 1;
        }
      }
    }
    for (int64_t k = 0; k < cn; ++k) {
      if (count[k] == 0) continue;
      out.neuron.push_back(static_cast<int32_t>(i0 + k));
      out.first.push_back(static_cast<int32_t>(out.token.size()));
      out.token.insert(out.token.end(), hits.begin() + k * nb, hits.begin() + k * nb + count[k]);
    }
    out.first.push_back(static_cast<int32_t>(out.token.size()));
  }

  // z for each flagged neuron's tokens from one read of its W1 row (the next row prefetched),
  // the residuals, written to the tokens' pair lists.
  void residuals(int64_t c) {
    const int64_t h = a.h, d = a.d;
    const Chunk& ch = ws.chunks[c];
    int64_t* cursor = ws.pair_cursor.data() + c * nb;
    std::vector<float> w_row, r(static_cast<size_t>(nb));
    const float* slope = a.lines + kSlope * h;
    const float* intercept = a.lines + kIntercept * h;
    const auto n_entries = static_cast<int64_t>(ch.neuron.size());
    if (!has_w1()) {  // z from the prediction: no W1 row read; a neuron's residuals eight at a time
      TaskScratch& scratch = task_scratch();
      for (int64_t e = 0; e < n_entries; ++e) {
        const int64_t i = ch.neuron[e];
        const float b = to_float(a.b1[i]);
        const auto global = static_cast<int32_t>(ch.entry_base + e);
        const int32_t p0 = ch.first[e], m = ch.first[e + 1] - p0;
        for (std::vector<float>* v : {&scratch.pre, &scratch.r}) v->resize(static_cast<size_t>(m));
        scratch.slope.assign(static_cast<size_t>(m), slope[i]);
        scratch.intercept.assign(static_cast<size_t>(m), intercept[i]);
        for (int32_t k = 0; k < m; ++k) scratch.pre[k] = to_float(a.z_hat[(t0 + ch.token[p0 + k]) * h + i]) + b;
        residuals_batch(scratch.pre.data(), scratch.slope.data(), scratch.intercept.data(), a.approximate, m,
                        scratch.r.data());
        for (int32_t k = 0; k < m; ++k) {
          const int64_t p = cursor[ch.token[p0 + k]]++;
          ws.pair_entry[p] = global;
          ws.pair_r[p] = scratch.r[k];
        }
      }
      return;
    }
    const int64_t bytes = row_bytes();
    for (int64_t e = 1; e < std::min(kRowsAhead, n_entries); ++e) prefetch_bytes(row_address(kW1, ch.neuron[e]), bytes);
    for (int64_t e = 0; e < n_entries; ++e) {
      const int64_t i = ch.neuron[e];
      const void* next_row = e + kRowsAhead < n_entries ? row_address(kW1, ch.neuron[e + kRowsAhead]) : nullptr;
      const float* next = nullptr;  // float rows: the next one streams in during the dot
      if (rows_in_place()) {
        next = static_cast<const float*>(next_row);
      } else if (next_row != nullptr) {
        prefetch_bytes(next_row, bytes);
      }
      const float* w = row_float(kW1, i, w_row);
      const int64_t p0 = ch.first[e], m = ch.first[e + 1] - p0;
      const int32_t* token = ch.token.data() + p0;
      neuron_dots(x_block, d, token, m, w, next, r.data());
      const float b = to_float(a.b1[i]);
      const auto global = static_cast<int32_t>(ch.entry_base + e);
      for (int64_t k = 0; k < m; ++k) {
        const int64_t p = cursor[token[k]]++;
        ws.pair_entry[p] = global;
        ws.pair_r[p] = residual(r[k] + b, slope[i], intercept[i], a.approximate);
      }
    }
  }

  // One tile of kTile columns: y = y_folded + the tokens' pairs.
  void accumulate(int64_t tile) {
    const int64_t d = a.d;
    const auto n_entries = static_cast<int64_t>(ws.entry_neuron.size());
    const int64_t j0 = tile * kTile;
    const int64_t n = std::min<int64_t>(kTile, d - j0);
    std::vector<float>& packed = task_scratch().packed;
    packed.resize(static_cast<size_t>(n_entries * kTile));
    std::vector<float> acc(kTile);
    for (int64_t e = 0; e < n_entries; ++e) {
      if (e + kPrefetchAhead < n_entries) {
        prefetch_bytes(row_address(kW2, ws.entry_neuron[e + kPrefetchAhead], j0), n * element_bytes());
      }
      float* dst = packed.data() + e * kTile;
      row_to_float(kW2, ws.entry_neuron[e], j0, n, dst);
      std::fill(dst + n, dst + kTile, 0.0f);
    }
    for (int64_t t = 0; t < nb; ++t) {
      const T* src = a.y_folded + (t0 + t) * a.folded_stride + j0;
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(acc.data(), src, sizeof(float) * static_cast<size_t>(n));
      } else {
        half_to_float_row(src, acc.data(), n);
      }
      const int64_t p0 = ws.row_begin[t];
      token_tile(ws.pair_entry.data() + p0, ws.pair_r.data() + p0, ws.row_begin[t + 1] - p0, packed.data(), acc.data());
      T* dst = a.y + (t0 + t) * d + j0;
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(dst, acc.data(), sizeof(float) * static_cast<size_t>(n));
      } else {
        float_to_half_row(acc.data(), dst, n);
      }
    }
  }

  // ---- decode: few tokens, few flagged rows ----
  // One parallel pass, with no serial phase before it (the pool's worker is woken first thing),
  // over kDecodeParts fixed parts of the neuron range (the split depends on h only; ONNX
  // Runtime's pool starts the caller and the worker on different halves and lets either take
  // the other's remaining parts, so a late worker costs no idle wait): a part tests its
  // neurons' windows and streams the W1 and W2 rows of its flagged neurons (see kDecodeAhead),
  // computes the residuals and accumulates r * w2[i, :] into its own partial rows, neurons in
  // increasing order; then y = y_folded + the non-empty partials in part order.
  int64_t part_neurons = 0, n_parts = 0;

  static void phase_decode(void* self, size_t g) { static_cast<Fallback*>(self)->decode_part(static_cast<int64_t>(g)); }

  void decode_part(int64_t g) {
    const int64_t d = a.d, h = a.h;
    const int64_t i0 = g * part_neurons, i1 = std::min(h, i0 + part_neurons);
    int32_t* neuron = ws.decode_neuron.data() + i0;
    uint64_t* mask = ws.decode_mask.data() + i0;
    const float* lo = a.lines + kLo * h;
    const float* hi = a.lines + kHi * h;
    const int64_t full_bytes = row_bytes();
    const int64_t ahead = kDecodeAhead, lag = std::max(kDecodeAhead, kDecodeLag);
    const int64_t touch_bytes = std::min(full_bytes, kDecodeTouchLines * 64);
    float* partial = ws.partials.data() + g * nb * d;
    float* z_fused = a.v != nullptr ? ws.decode_z.data() : nullptr;  // [nb, h]: this part's columns
    if (z_fused != nullptr) {
      std::vector<float>& row = task_scratch().v_chunk;
      if constexpr (!std::is_same_v<T, float>) row.resize(static_cast<size_t>(i1 - i0));
      for (int64_t t = 0; t < nb; ++t) {
        lowrank_z(code_block + t * code_stride, a.rank, a.v + i0, h, i1 - i0, z_fused + t * h + i0, row.data());
      }
    }
    // Window tests kScan neurons at a time (vectorised); flagged neurons are listed in order and
    // processed once kDecodeLag more are listed, so the scan overlaps the row reads. A listed
    // neuron's first row lines are touched when it is found; its rows are fully prefetched then
    // if fewer than `ahead` are pending, else while the neuron `ahead` entries before it is
    // processed.
    int64_t n = 0, e = 0;
    uint8_t flag[kFewPredicted][kScan];
    for (int64_t k0 = i0; k0 < i1; k0 += kScan) {
      const int64_t cn = std::min<int64_t>(kScan, i1 - k0);
      const int64_t p1 = std::min(i1, k0 + 2 * kScan);  // the next batch's bounds and z_hat
      if (p1 > k0 + kScan) {
        const int64_t p0 = k0 + kScan;
        prefetch_bytes(lo + p0, (p1 - p0) * static_cast<int64_t>(sizeof(float)));
        prefetch_bytes(hi + p0, (p1 - p0) * static_cast<int64_t>(sizeof(float)));
        for (int64_t t = 0; z_fused == nullptr && t < nb; ++t) {
          prefetch_bytes(a.z_hat + (t0 + t) * h + p0, (p1 - p0) * static_cast<int64_t>(sizeof(T)));
        }
      }
      for (int64_t t = 0; t < nb; ++t) {
        if (z_fused != nullptr) {
          window_flags_exact(z_fused + t * h + k0, lo + k0, hi + k0, a.margin, cn, flag[t]);
        } else {
          window_flags_exact(a.z_hat + (t0 + t) * h + k0, lo + k0, hi + k0, a.margin, cn, flag[t]);
        }
        std::fill(flag[t] + cn, flag[t] + kScan, uint8_t{0});
      }
      for (int64_t k8 = 0; k8 < kScan; k8 += 8) {
        uint64_t bits = 0;  // byte k nonzero when some token flags neuron k0 + k8 + k
        for (int64_t t = 0; t < nb; ++t) {
          uint64_t word;
          std::memcpy(&word, flag[t] + k8, sizeof word);
          bits |= word;
        }
        while (bits != 0) {
          const int byte = __builtin_ctzll(bits) / 8;
          bits &= ~(uint64_t{0xff} << (8 * byte));
          uint64_t m = 0;  // bit t: token t flags it
          for (int64_t t = 0; t < nb; ++t) m |= static_cast<uint64_t>(flag[t][k8 + byte]) << t;
          const int64_t i = k0 + k8 + byte;
          const int64_t bytes = n < e + ahead ? full_bytes : touch_bytes;
          if (has_w1()) prefetch_bytes(row_address(kW1, i), bytes);
          prefetch_bytes(row_address(kW2, i), bytes);
          prefetch(a.lines + kSlope * h + i);
          prefetch(a.lines + kIntercept * h + i);
          prefetch(a.b1 + i);
          if (n == 0) std::fill(partial, partial + nb * d, 0.0f);
          neuron[n] = static_cast<int32_t>(i);
          mask[n] = m;
          ++n;
        }
      }
      for (; n - e > lag; ++e) process(neuron, mask, n, e, ahead, partial);
    }
    for (; e < n; ++e) process(neuron, mask, n, e, ahead, partial);
    ws.decode_count[g * kCountStride] = n;
  }

  // Neuron neuron[e]: z from its W1 row, r, partial rows += r * its W2 row; streams in the rows
  // of neuron[e + ahead] along the way when it is listed.
  void process(const int32_t* neuron, const uint64_t* mask, int64_t n, int64_t e, int64_t ahead, float* partial) {
    const int64_t d = a.d, h = a.h;
    const int64_t i = neuron[e];
    if (!has_w1()) {  // z from the prediction: only the W2 row is read
      process_predicted(neuron, mask, n, e, ahead, partial);
      return;
    }
    const void* next1 = e + ahead < n ? row_address(kW1, neuron[e + ahead]) : nullptr;
    const void* next2 = e + ahead < n ? row_address(kW2, neuron[e + ahead]) : nullptr;
    const float* x_rows[kFewTokens];
    float r[kFewTokens];
    int32_t tok[kFewTokens];
    int m = 0;
    for (int64_t t = 0; t < nb; ++t) {
      if (mask[e] >> t & 1u) {
        tok[m] = static_cast<int32_t>(t);
        x_rows[m++] = x_block + t * d;
      }
    }
    const float* w2 = nullptr;
    const float* next_w2 = nullptr;  // float rows: W1's next row streams in during the dot, W2's during the axpy
    if (int8_rows()) {  // W1ᵀ's row converted once for the dot; W2's added as it is read, below
      if (next1 != nullptr) {
        prefetch_bytes(next1, row_bytes());
        prefetch_bytes(next2, row_bytes());
      }
      dots_prefetch(x_rows, m, row_float(kW1, i, task_scratch().w1_row), d, nullptr, r);
    } else if (rows_in_place()) {
      w2 = static_cast<const float*>(row_address(kW2, i));
      next_w2 = static_cast<const float*>(next2);
      dots_prefetch(x_rows, m, static_cast<const float*>(row_address(kW1, i)), d, static_cast<const float*>(next1), r);
    } else {
      if (next1 != nullptr) {
        prefetch_bytes(next1, row_bytes());
        prefetch_bytes(next2, row_bytes());
      }
      TaskScratch& scratch = task_scratch();
      w2 = row_float(kW2, i, scratch.w2_row);
      dots_prefetch(x_rows, m, row_float(kW1, i, scratch.w1_row), d, nullptr, r);
    }
    const float b = to_float(a.b1[i]);
    const float slope = a.lines[kSlope * h + i], intercept = a.lines[kIntercept * h + i];
    for (int k = 0; k < m; ++k) {
      const float rk = residual(r[k] + b, slope, intercept, a.approximate);
      if (int8_rows()) {
        axpy_int8_row(partial + tok[k] * d, rk * a.row_scales[h + i], a.w2_q + i * d, d);
      } else {
        axpy_row(partial + tok[k] * d, rk, w2, d, k == 0 ? next_w2 : nullptr);
      }
    }
  }

  // process() without W1: r from z_hat + b1; the W2 row of neuron[e + ahead] streams in during the axpy.
  void process_predicted(const int32_t* neuron, const uint64_t* mask, int64_t n, int64_t e, int64_t ahead,
                         float* partial) {
    const int64_t d = a.d, h = a.h;
    const int64_t i = neuron[e];
    const void* next = e + ahead < n ? row_address(kW2, neuron[e + ahead]) : nullptr;
    const float* w2 = nullptr;
    const float* next_w2 = nullptr;
    if (rows_in_place()) {
      w2 = static_cast<const float*>(row_address(kW2, i));
      next_w2 = static_cast<const float*>(next);
    } else {
      if (next != nullptr) prefetch_bytes(next, row_bytes());
      if (!int8_rows()) w2 = row_float(kW2, i, task_scratch().w2_row);  // int8 rows: converted as added
    }
    const float b = to_float(a.b1[i]);
    const float slope = a.lines[kSlope * h + i], intercept = a.lines[kIntercept * h + i];
    bool first = true;
    for (uint64_t m = mask[e]; m != 0; m &= m - 1) {
      const int64_t t = __builtin_ctzll(m);
      const float rk = residual(to_float(a.z_hat[(t0 + t) * h + i]) + b, slope, intercept, a.approximate);
      if (int8_rows()) {
        axpy_int8_row(partial + t * d, rk * a.row_scales[h + i], a.w2_q + i * d, d);
      } else {
        axpy_row(partial + t * d, rk, w2, d, first ? next_w2 : nullptr);
      }
      first = false;
    }
  }

  void run_decode(const ParallelRunner& runner) {
    const int64_t d = a.d, h = a.h;
    n_parts = kDecodeParts;
    part_neurons = std::max<int64_t>(1, ceil_div(h, n_parts));
    n_parts = ceil_div(h, part_neurons);
    ws.decode_neuron.resize(static_cast<size_t>(h));
    ws.decode_mask.resize(static_cast<size_t>(h));
    ws.decode_count.resize(static_cast<size_t>(n_parts * kCountStride));
    ws.partials.resize(static_cast<size_t>(n_parts * nb * d));
    if (a.v != nullptr) ws.decode_z.resize(static_cast<size_t>(nb * h));
    parallel_for(runner, static_cast<size_t>(n_parts), phase_decode, this);
    for (int64_t t = 0; t < nb; ++t) {
      float* acc;
      if constexpr (std::is_same_v<T, float>) {
        acc = a.y + (t0 + t) * d;
        std::memcpy(acc, a.y_folded + (t0 + t) * a.folded_stride, sizeof(float) * static_cast<size_t>(d));
      } else {
        ws.y_row.resize(static_cast<size_t>(d));
        acc = ws.y_row.data();
        half_to_float_row(a.y_folded + (t0 + t) * a.folded_stride, acc, d);
      }
      for (int64_t g = 0; g < n_parts; ++g) {
        if (ws.decode_count[g * kCountStride] == 0) continue;
        add_row(acc, ws.partials.data() + (g * nb + t) * d, d);
      }
      if constexpr (!std::is_same_v<T, float>) float_to_half_row(acc, a.y + (t0 + t) * d, d);
    }
  }

  // code_block: the block's low-rank code rows (the last a.rank columns of y_folded) in float.
  void set_code_block() {
    const T* first = a.y_folded + t0 * a.folded_stride + a.d;
    if constexpr (std::is_same_v<T, float>) {
      code_block = first;
      code_stride = a.folded_stride;
    } else {
      ws.code_float.resize(static_cast<size_t>(nb * a.rank));
      for (int64_t t = 0; t < nb; ++t) {
        half_to_float_row(first + t * a.folded_stride, ws.code_float.data() + t * a.rank, a.rank);
      }
      code_block = ws.code_float.data();
      code_stride = a.rank;
    }
  }

  // Tokens up to which a block runs the decode schedule.
  int64_t few_tokens() const {
    if (has_w1()) return kFewTokens;
    return std::clamp<int64_t>(kDecodePartialBytes / (a.d * static_cast<int64_t>(sizeof(float))), kFewTokens,
                               kFewPredicted);
  }

  void run(const ParallelRunner& runner) {
    const int64_t d = a.d, h = a.h;
    block_tokens = std::clamp<int64_t>(kBlockBytes / (d * static_cast<int64_t>(sizeof(float))), 1, kMaxBlockTokens);
    block_tokens = ceil_div(a.tokens, ceil_div(a.tokens, block_tokens));  // even blocks
    // Few tokens: big chunks (cheap serial flag tests); many tokens: 64 neurons per chunk.
    chunk_neurons = std::clamp<int64_t>(ceil_div(1024, block_tokens), 64, 512);
    n_chunks = ceil_div(h, chunk_neurons);
    ws.chunks.resize(static_cast<size_t>(n_chunks));
    n_tiles = ceil_div(d, kTile);
    if constexpr (!std::is_same_v<T, float>) ws.x_float.resize(static_cast<size_t>(block_tokens * d));

    for (t0 = 0; t0 < a.tokens; t0 += block_tokens) {
      nb = std::min(block_tokens, a.tokens - t0);
      if constexpr (std::is_same_v<T, float>) {
        x_block = a.x + t0 * d;
      } else {
        half_to_float_row(a.x + t0 * d, ws.x_float.data(), nb * d);
        x_block = ws.x_float.data();
      }
      if (a.v != nullptr) set_code_block();
      if (nb <= few_tokens()) {
        run_decode(runner);
        continue;
      }
      // Few flag tests: not worth waking the thread pool for.
      parallel_for(nb * h <= kSerialFlags ? ParallelRunner{} : runner, static_cast<size_t>(n_chunks), phase_a1, this);
      // Global entry numbers and, per token, where each chunk's pairs go (neurons increasing).
      int64_t entries = 0;
      for (Chunk& ch : ws.chunks) {
        ch.entry_base = entries;
        entries += static_cast<int64_t>(ch.neuron.size());
      }
      ws.entry_neuron.clear();
      for (const Chunk& ch : ws.chunks) ws.entry_neuron.insert(ws.entry_neuron.end(), ch.neuron.begin(), ch.neuron.end());
      ws.row_begin.assign(static_cast<size_t>(nb + 1), 0);
      ws.pair_cursor.resize(static_cast<size_t>(n_chunks * nb));
      for (int64_t t = 0; t < nb; ++t) {
        int64_t p = ws.row_begin[t];
        for (int64_t c = 0; c < n_chunks; ++c) {
          ws.pair_cursor[c * nb + t] = p;
          p += ws.chunks[c].token_count[t];
        }
        ws.row_begin[t + 1] = p;
      }
      ws.pair_entry.resize(static_cast<size_t>(ws.row_begin[nb]));
      ws.pair_r.resize(static_cast<size_t>(ws.row_begin[nb]));
      parallel_for(runner, static_cast<size_t>(n_chunks), phase_a2, this);
      parallel_for(runner, static_cast<size_t>(n_tiles), phase_b, this);
    }
  }
};

}  // namespace

void back_with_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int kCollapse = 25;  // MADV_COLLAPSE (Linux 6.1), absent from older libc headers
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (const char* setting = std::getenv("TARDIS_HUGE_PAGES"); setting != nullptr && std::strcmp(setting, "0") == 0) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (data == nullptr || last <= first) return;
  // Whole huge pages inside the buffer only, so no neighbouring memory is touched; a refusal
  // (older kernel, file-backed weights, THP disabled) leaves the pages as they were.
  void* range = reinterpret_cast<void*>(first);
  if (madvise(range, last - first, MADV_HUGEPAGE) == 0) madvise(range, last - first, kCollapse);
#else
  (void)data;
  (void)bytes;
#endif
}

template <typename T>
void ffn_fallback_cpu(const FallbackArgs<T>& args, const ParallelRunner& runner) {
  if (args.tokens <= 0 || args.d <= 0) return;
  static thread_local Workspace workspace;
  Fallback<T>{args, workspace}.run(runner);
}

template void ffn_fallback_cpu<float>(const FallbackArgs<float>&, const ParallelRunner&);
template void ffn_fallback_cpu<uint16_t>(const FallbackArgs<uint16_t>&, const ParallelRunner&);

}  // namespace tardis
