// How fast can this machine read scattered 4 KiB rows? The ceiling of the fallback's decode reads.
//
//     gcc -O2 -fopenmp -mavx2 -mfma -o /tmp/row_reads benchmarks/row_reads.c && /tmp/row_reads [threads]
//
// A decode token at d = 1024 with 5% of 4096 neurons flagged reads ~205 W1 rows and ~205 W2 rows of
// 4 KiB each, scattered over 32 MiB. This reads 490 random rows of a 64 MiB region (a different region
// each repeat, 1 GiB in all, so nothing is cached) on `threads` threads (default 2), and the same bytes
// as one contiguous stream, with 4 KiB or 2 MiB pages (madvise MADV_HUGEPAGE), without software
// prefetch or with the kernel's scheme (the next row streamed in, one line per line read). Prints the
// median time and GB/s of each (no third-party code; numbers only mean something on an idle machine).
//
// Then: would one node that streams the folded weights while it reads the flagged rows hide the rows?
// It times, with 2 MiB pages, a GEMV over 4.25 MiB of column panels (x·[Wf | U] at d = 1024, laid out
// as MLAS packs a constant B), the 205 flagged neurons' W1 dot + W2 axpy (the kernel's decode work and
// prefetching), both one after the other, and both interleaved (a slice of panels after each neuron),
// the four in turn within every repeat so that a change of the machine's memory state hits them alike.
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { kRow = 4096, kRows = 490, kRepeats = 41, kD = 1024, kH = 4096, kCols = 1088, kFlagged = 205 };
static const size_t kTotal = (size_t)1 << 30, kRegion = (size_t)64 << 20;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

// Sums the rows starting at base + offset[k] (k in [0, kRows)); prefetch: stream row k+1 in while reading row k.
static float read_rows(const char* base, const size_t* offset, int prefetch, int threads) {
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), lo = kRows * t / threads, hi = kRows * (t + 1) / threads;
    __m256 acc = _mm256_setzero_ps();
    for (int k = lo; k < hi; ++k) {
      const float* row = (const float*)(base + offset[k]);
      const char* next = prefetch && k + 1 < hi ? base + offset[k + 1] : NULL;
      for (int j = 0; j < kRow / 4; j += 16) {
        if (next) _mm_prefetch(next + 4 * j, _MM_HINT_T0);
        acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_load_ps(row + j), _mm256_load_ps(row + j + 8)));
      }
    }
    float lane[8];
    _mm256_storeu_ps(lane, acc);
    for (int i = 0; i < 8; ++i) total += lane[i];
  }
  return total;
}

// ---- overlap: the folded GEMV and the flagged rows in one pass ----

static float x_token[kD] __attribute__((aligned(64)));

// acc[16 p .. 16 p + 16) = x · panel p, for panels [p0, p1) of kD x 16 floats each.
static void gemv_panels(const float* panels, int p0, int p1, float* acc) {
  for (int p = p0; p < p1; ++p) {
    const float* w = panels + (size_t)p * kD * 16;
    __m256 a[8];
    for (int q = 0; q < 8; ++q) a[q] = _mm256_setzero_ps();
    for (int k = 0; k < kD; k += 4) {
      for (int u = 0; u < 4; ++u) {
        const __m256 x = _mm256_broadcast_ss(x_token + k + u);
        a[2 * u] = _mm256_fmadd_ps(x, _mm256_load_ps(w + (k + u) * 16), a[2 * u]);
        a[2 * u + 1] = _mm256_fmadd_ps(x, _mm256_load_ps(w + (k + u) * 16 + 8), a[2 * u + 1]);
      }
    }
    _mm256_store_ps(acc + p * 16, _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6])));
    _mm256_store_ps(acc + p * 16 + 8, _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7])));
  }
}

// One flagged neuron: r = dot(x, w1) (the next W1 row streamed in meanwhile), out += r * w2 (the next
// W2 row streamed in meanwhile); next1/next2 may be null.
static void flagged_neuron(const float* w1, const float* w2, const float* next1, const float* next2, float* out) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int j = 0; j < kD; j += 16) {
    if (next1) _mm_prefetch((const char*)(next1 + j), _MM_HINT_T0);
    lo = _mm256_fmadd_ps(_mm256_load_ps(x_token + j), _mm256_load_ps(w1 + j), lo);
    hi = _mm256_fmadd_ps(_mm256_load_ps(x_token + j + 8), _mm256_load_ps(w1 + j + 8), hi);
  }
  float lane[8];
  _mm256_storeu_ps(lane, _mm256_add_ps(lo, hi));
  const __m256 r = _mm256_set1_ps(1e-3f * (lane[0] + lane[1] + lane[2] + lane[3] + lane[4] + lane[5] + lane[6] + lane[7]));
  for (int j = 0; j < kD; j += 16) {
    if (next2) _mm_prefetch((const char*)(next2 + j), _MM_HINT_T0);
    _mm256_store_ps(out + j, _mm256_fmadd_ps(r, _mm256_load_ps(w2 + j), _mm256_load_ps(out + j)));
    _mm256_store_ps(out + j + 8, _mm256_fmadd_ps(r, _mm256_load_ps(w2 + j + 8), _mm256_load_ps(out + j + 8)));
  }
}

enum { kGemv = 1, kRowsOnly = 2, kSequence = 3, kInterleaved = 4 };

// region: panels at 0, W1ᵀ at 8 MiB, W2 at 24 MiB; neuron: kFlagged increasing neuron indices.
static float gemv_and_rows(const char* region, const int* neuron, int mode, int threads) {
  const float* panels = (const float*)region;
  const float* w1t = (const float*)(region + ((size_t)8 << 20));
  const float* w2 = (const float*)(region + ((size_t)24 << 20));
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num();
    const int p0 = kCols / 16 * t / threads, p1 = kCols / 16 * (t + 1) / threads;
    const int e0 = kFlagged * t / threads, e1 = kFlagged * (t + 1) / threads;
    float acc[kCols] __attribute__((aligned(64))), out[kD] __attribute__((aligned(64)));
    memset(out, 0, sizeof out);
    memset(acc, 0, sizeof acc);
    int p = p0;
    for (int e = e0; mode != kGemv && e < e1; ++e) {
      const int i = neuron[e], next = e + 1 < e1 ? neuron[e + 1] : -1;
      flagged_neuron(w1t + (size_t)i * kD, w2 + (size_t)i * kD, next < 0 ? NULL : w1t + (size_t)next * kD,
                     next < 0 ? NULL : w2 + (size_t)next * kD, out);
      if (mode == kInterleaved) {
        const int until = p0 + (p1 - p0) * (e - e0 + 1) / (e1 - e0);
        gemv_panels(panels, p, until, acc);
        p = until;
      }
    }
    if (mode != kRowsOnly) gemv_panels(panels, p, p1, acc);
    for (int j = 0; j < kCols; j += 64) total += acc[j];
    for (int j = 0; j < kD; j += 64) total += out[j];
  }
  return total;
}

static int by_int(const void* a, const void* b) { return *(const int*)a - *(const int*)b; }

static float overlap(char* buffer, int threads) {
  static const char* names[] = {"", "folded GEMV (4.25 MiB)", "flagged rows (205 x 8 KiB)", "GEMV, then rows",
                                "GEMV and rows interleaved"};
  static double times[5][kRepeats];
  float sink = 0.0f;
  for (int k = 0; k < kD; ++k) x_token[k] = 1e-3f * (float)(k % 7);
  srand(11);
  for (int r = 0; r < kRepeats; ++r) {
    int neuron[kFlagged];
    for (int e = 0; e < kFlagged; ++e) neuron[e] = rand() % kH;
    qsort(neuron, kFlagged, sizeof(int), by_int);
    for (int mode = kGemv; mode <= kInterleaved; ++mode) {
      const char* region = buffer + (size_t)((r * 4 + mode) % (int)(kTotal / kRegion)) * kRegion;
      const double start = now_us();
      sink += gemv_and_rows(region, neuron, mode, threads);
      times[mode][r] = now_us() - start;
    }
  }
  for (int mode = kGemv; mode <= kInterleaved; ++mode) {
    qsort(times[mode] + 1, kRepeats - 1, sizeof(double), by_value);
    printf("2 MiB pages, %d threads, %-27s %7.1f us\n", threads, names[mode], times[mode][1 + (kRepeats - 1) / 2]);
  }
  return sink;
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2;
  float sink = 0.0f;
  for (int huge = 0; huge <= 1; ++huge) {
    char* buffer = aligned_alloc((size_t)2 << 20, kTotal);
    if (buffer == NULL) return 1;
    if (huge && madvise(buffer, kTotal, MADV_HUGEPAGE) != 0) printf("(2 MiB pages refused)\n");
    memset(buffer, 1, kTotal);
    for (int pattern = 0; pattern < 3; ++pattern) {  // contiguous; scattered; scattered + prefetch
      double times[kRepeats];
      size_t offset[kRows];
      srand(7);
      for (int r = 0; r < kRepeats; ++r) {
        const char* base = buffer + (size_t)(r % (kTotal / kRegion)) * kRegion;
        for (int k = 0; k < kRows; ++k) {
          offset[k] = pattern == 0 ? (size_t)k * kRow : (size_t)(rand() % (int)(kRegion / kRow)) * kRow;
        }
        const double start = now_us();
        sink += read_rows(base, offset, pattern == 2, threads);
        times[r] = now_us() - start;
      }
      qsort(times + 1, kRepeats - 1, sizeof(double), by_value);  // the first run is a warm-up
      const double median = times[1 + (kRepeats - 1) / 2];
      static const char* names[] = {"contiguous", "scattered rows", "scattered rows, prefetched"};
      printf("%s pages, %d threads, %-27s %7.1f us  %5.1f GB/s\n", huge ? "2 MiB" : "4 KiB", threads, names[pattern],
             median, kRows * (double)kRow / median / 1e3);
    }
    if (huge) sink += overlap(buffer, threads);
    free(buffer);
  }
  return sink == 12345.0f;  // keeps the reads
}
