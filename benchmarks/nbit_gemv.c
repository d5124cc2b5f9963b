// Could a predictor read at 2–4 bits inside the fallback op run at memory speed here? One token's z_hat = x·W1
// from a quantized W1, timed on cold weights against the machine's streaming read of the same bytes.
//
//     gcc -O2 -fopenmp -mavx2 -mfma -o /tmp/nbit_gemv benchmarks/nbit_gemv.c && /tmp/nbit_gemv [threads]
//
// Per neuron (a row of W1ᵀ), blocks of 32 inputs with one float scale each (as MatMulNBits' block 32); the
// activations rounded to int8 once per token (one scale, as accuracy_level 4 does). int4: byte j of a block
// holds input j (low nibble) and input j + 16 (high nibble), codes 0..15 around 8; int2: byte j holds inputs
// j, j + 8, j + 16, j + 24, codes 0..3 around 2; int8: one signed byte each. The dot runs on unsigned × signed
// bytes (_mm256_maddubs_epi16), taking off the zero point through the block's activation sum (int8: signs
// moved onto the codes, so that no int16 pair saturates).
// Each variant cycles through enough copies of its weights (>= 256 MiB) that they come from memory, not the
// 32 MiB L3; "stream" reads the same bytes as one contiguous sum. Prints median µs and GB/s per shape
// (numbers only mean something on an idle machine).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kBlock = 32, kRepeats = 31 };
static const size_t kSpan = (size_t)256 << 20;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int compare(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 unsigned codes of one block as bytes in input order.
static inline __m256i codes(const uint8_t* p, int bits) {
  if (bits == 8) return _mm256_loadu_si256((const __m256i*)p);
  if (bits == 4) {
    __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  }
  __m128i b = _mm_loadl_epi64((const __m128i*)p), m = _mm_set1_epi8(0x03);  // 8 bytes, 4 codes each
  __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
  __m128i hi = _mm_unpacklo_epi64(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
  return _mm256_set_m128i(hi, lo);
}

static float x_scale_of(const float* x, int d) {
  float amax = 0.0f;
  for (int j = 0; j < d; ++j) amax = amax > __builtin_fabsf(x[j]) ? amax : __builtin_fabsf(x[j]);
  return amax / 127.0f;
}

// Code of input j (0..31) of a block, by the layouts above: the scalar reference.
static int code_of(const uint8_t* block, int j, int bits) {
  if (bits == 8) return (int8_t)block[j];
  if (bits == 4) return j < 16 ? block[j] & 15 : block[j - 16] >> 4;
  return (block[j % 8] >> (2 * (j / 8))) & 3;
}

// z[i] = x_scale · Σ_b scale[i,b] · (Σ_j code[i,j]·xq[j] − zero·Σ_j xq[j]) over the neurons of [first, last).
static void gemv(const uint8_t* w, const float* scales, const int8_t* xq, const int32_t* xsum, float x_scale,
                 int d, int bits, int first, int last, float* z) {
  const int blocks = d / kBlock, row_bytes = d * bits / 8, block_bytes = kBlock * bits / 8;
  const int zero = bits == 8 ? 0 : 1 << (bits - 1);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = first; i < last; ++i) {
    const uint8_t* row = w + (size_t)i * row_bytes;
    const float* s = scales + (size_t)i * blocks;
    __m256 acc = _mm256_setzero_ps();  // 8 lanes of scaled partial dots: one horizontal sum per neuron
    float offset = 0.0f;
    for (int b = 0; b < blocks; ++b) {
      __m256i x = _mm256_loadu_si256((const __m256i*)(xq + b * kBlock));
      __m256i c = codes(row + b * block_bytes, bits), pairs;
      if (bits == 8) {  // signed codes: |x| × (code with x's sign), which cannot saturate the int16 pairs
        pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(c, x));
      } else {
        pairs = _mm256_maddubs_epi16(c, x);
      }
      __m256i dot = _mm256_madd_epi16(pairs, ones);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[b]), acc);
      offset += s[b] * (float)xsum[b];
    }
    z[i] = (hsum_ps(acc) - (float)zero * offset) * x_scale;
  }
}

static void run_shape(int d, int h, int threads) {
  printf("d = %d, h = %d, one token, %d threads\n", d, h, threads);
  float* x = malloc(sizeof(float) * d);
  int8_t* xq = aligned_alloc(64, d);
  int32_t* xsum = malloc(sizeof(int32_t) * (d / kBlock));
  float* z = aligned_alloc(64, sizeof(float) * h);
  for (int j = 0; j < d; ++j) x[j] = (float)rand() / RAND_MAX - 0.5f;
  for (int bits = 8; bits >= 2; bits /= 2) {
    const size_t weight_bytes = (size_t)h * d * bits / 8, scale_bytes = sizeof(float) * (size_t)h * (d / kBlock);
    const size_t one = weight_bytes + scale_bytes;
    const int copies = (int)((kSpan + one - 1) / one);
    uint8_t* w = aligned_alloc(64, weight_bytes * copies);
    float* scales = aligned_alloc(64, scale_bytes * copies);
    for (size_t k = 0; k < weight_bytes * copies; ++k) w[k] = (uint8_t)rand();
    if (bits == 8) {  // symmetric int8 codes, -127..127 (as quantizers write them): no -128 to negate
      for (size_t k = 0; k < weight_bytes * copies; ++k) w[k] = w[k] == 0x80 ? 0x81 : w[k];
    }
    for (size_t k = 0; k < scale_bytes / sizeof(float) * copies; ++k) scales[k] = 1e-3f;
    double gemv_us[kRepeats], stream_us[kRepeats];
    volatile uint64_t sink = 0;
    for (int r = 0; r < kRepeats; ++r) {
      const int c = r % copies;
      const uint8_t* wc = w + (size_t)c * weight_bytes;
      const float* sc = scales + (size_t)c * (scale_bytes / sizeof(float));
      double t0 = now_us();
      const float x_scale = x_scale_of(x, d);  // the token's int8 rounding, as accuracy_level 4 does it
      for (int j = 0; j < d; ++j) xq[j] = (int8_t)(x[j] / x_scale + (x[j] >= 0 ? 0.5f : -0.5f));
      for (int b = 0; b < d / kBlock; ++b) {
        int32_t s = 0;
        for (int j = 0; j < kBlock; ++j) s += xq[b * kBlock + j];
        xsum[b] = s;
      }
#pragma omp parallel num_threads(threads)
      {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        gemv(wc, sc, xq, xsum, x_scale, d, bits, (int)((int64_t)h * t / n), (int)((int64_t)h * (t + 1) / n), z);
      }
      gemv_us[r] = now_us() - t0;
      const int other = (r + copies / 2) % copies;  // a copy the GEMV did not just touch
      const uint64_t* words = (const uint64_t*)(w + (size_t)other * weight_bytes);
      const uint64_t* scale_words = (const uint64_t*)(scales + (size_t)other * (scale_bytes / sizeof(float)));
      t0 = now_us();
      uint64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total)
      for (size_t k = 0; k < weight_bytes / 8; ++k) total += words[k];
#pragma omp parallel for num_threads(threads) reduction(+ : total)
      for (size_t k = 0; k < scale_bytes / 8; ++k) total += scale_words[k];
      stream_us[r] = now_us() - t0;
      sink += total;
    }
    double error = 0.0;  // the last copy's z against the scalar reference, on the same rounded activations
    const int last = (kRepeats - 1) % copies, blocks = d / kBlock, zero = bits == 8 ? 0 : 1 << (bits - 1);
    for (int i = 0; i < 8; ++i) {
      const uint8_t* row = w + (size_t)last * weight_bytes + (size_t)i * (d * bits / 8);
      double want = 0.0;
      for (int b = 0; b < blocks; ++b) {
        long dot = 0;
        for (int j = 0; j < kBlock; ++j) dot += (long)(code_of(row + b * kBlock * bits / 8, j, bits) - zero) * xq[b * kBlock + j];
        want += 1e-3 * dot;
      }
      want *= x_scale_of(x, d);
      const double diff = __builtin_fabs(want - z[i]) / (__builtin_fabs(want) + 1e-6);
      error = diff > error ? diff : error;
    }
    qsort(gemv_us, kRepeats, sizeof(double), compare);
    qsort(stream_us, kRepeats, sizeof(double), compare);
    const double g = gemv_us[kRepeats / 2], s = stream_us[kRepeats / 2];
    printf("  int%d: %6.1f MiB  gemv %7.1f us (%5.1f GB/s)   stream %7.1f us (%5.1f GB/s)   rel. error %.1e\n", bits,
           one / 1048576.0, g, one / g / 1e3, s, one / s / 1e3, error);
    free(w);
    free(scales);
  }
  free(x);
  free(xq);
  free(xsum);
  free(z);
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2;
  const int shapes[][2] = {{768, 3072}, {1024, 4096}, {4544, 18176}};
  for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; ++k) run_shape(shapes[k][0], shapes[k][1], threads);
  return 0;
}
