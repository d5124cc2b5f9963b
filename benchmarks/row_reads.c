// How fast can this machine read scattered 4 KiB rows? The ceiling of the fallback's decode reads.
//
//     gcc -O2 -fopenmp -mavx2 -o /tmp/row_reads benchmarks/row_reads.c && /tmp/row_reads [threads]
//
// A decode token at d = 1024 with 5% of 4096 neurons flagged reads ~205 W1 rows and ~205 W2 rows of
// 4 KiB each, scattered over 32 MiB. This reads 490 random rows of a 64 MiB region (a different region
// each repeat, 1 GiB in all, so nothing is cached) on `threads` threads (default 2), and the same bytes
// as one contiguous stream, with 4 KiB or 2 MiB pages (madvise MADV_HUGEPAGE), without software
// prefetch or with the kernel's scheme (the next row streamed in, one line per line read). Prints the
// median time and GB/s of each (no third-party code; numbers only mean something on an idle machine).
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { kRow = 4096, kRows = 490, kRepeats = 41 };
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
    free(buffer);
  }
  return sink == 12345.0f;  // keeps the reads
}
