// The CPU kernel alone at decode, without ONNX Runtime: how long one token's FfnFallback takes.
//
//     g++ -O2 -std=c++17 -fopenmp -Icustom_ops -o /tmp/decode_kernel benchmarks/decode_kernel.cc
//         custom_ops/ffn_fallback_cpu.cc && /tmp/decode_kernel [fraction] [threads]      (one line)
//
// d = 1024, h = 4096, the low-rank predictor fused in (rank 64), fp32. 24 copies of the weights (own
// buffers, 32 MiB of W1ᵀ/W2 each, backed by huge pages as the op does), called in turn so that every
// call reads its weights from memory, as a model's layers do. Each repeat draws a new code c = x·U
// (z_hat ~ N(0, 1)) and times, in turn, the op with every window widened to everything (its fixed
// part: V, the window tests, the output) and with windows at ±q flagging `fraction` (default 0.05) of
// the neurons. The pool is OpenMP's (dynamic, `threads` default 2), not ONNX Runtime's. Prints the
// medians per call. For quick A/B of kernel changes: build both and run them in turn.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ffn_fallback.h"

namespace {

int g_threads = 2;

void omp_runner(void*, void (*fn)(void*, size_t), size_t total, void* data) {
#pragma omp parallel for num_threads(g_threads) schedule(dynamic, 1)
  for (long i = 0; i < static_cast<long>(total); ++i) fn(data, static_cast<size_t>(i));
}

struct Weights {
  std::vector<float> w1t, w2, v, b1, lines;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  constexpr long d = 1024, h = 4096, rank = 64, copies = 24, repeats = 40, warmup = 3;
  const double fraction = argc > 1 ? std::atof(argv[1]) : 0.05;
  g_threads = argc > 2 ? std::atoi(argv[2]) : 2;
  if (!(fraction > 0 && fraction < 1) || g_threads < 1) {
    std::fprintf(stderr, "usage: decode_kernel [fraction in (0, 1)] [threads >= 1]\n");
    return 2;
  }
  // The window half-width q with P(|z| > q) = fraction for z ~ N(0, 1), by bisection on erfc.
  double lo = 0, hi = 10;
  for (int k = 0; k < 100; ++k) ((std::erfc((lo + hi) / 2 / std::sqrt(2.0)) > fraction) ? lo : hi) = (lo + hi) / 2;
  const auto q = static_cast<float>(lo);

  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Weights> layers(copies);
  for (Weights& w : layers) {
    w.w1t.resize(h * d);
    w.w2.resize(h * d);
    w.v.resize(rank * h);
    w.b1.assign(h, 0.0f);
    w.lines.resize(4 * h);
    for (float& e : w.w1t) e = normal(rng) / 32.0f;
    for (float& e : w.w2) e = normal(rng) / 64.0f;
    for (float& e : w.v) e = normal(rng);
    for (long i = 0; i < h; ++i) {
      w.lines[i] = 0.5f;                 // slope
      w.lines[h + i] = 0.1f;             // intercept
      w.lines[2 * h + i] = -q;           // lo
      w.lines[3 * h + i] = q;            // hi
    }
    tardis::back_with_huge_pages(w.w1t.data(), w.w1t.size() * sizeof(float));
    tardis::back_with_huge_pages(w.w2.data(), w.w2.size() * sizeof(float));
  }
  std::vector<float> x(d), y_folded(d + rank), y(d);
  for (float& e : x) e = normal(rng);
  for (float& e : y_folded) e = normal(rng);

  std::vector<double> fixed_us, flagged_us;
  for (long repeat = 0; repeat < repeats; ++repeat) {
    double norm = 0;  // a fresh code of norm 1: z_hat = c·V ~ N(0, 1) per neuron
    for (long r = 0; r < rank; ++r) norm += (y_folded[d + r] = normal(rng)) * y_folded[d + r];
    for (long r = 0; r < rank; ++r) y_folded[d + r] /= static_cast<float>(std::sqrt(norm));
    for (const float margin : {3.0e38f, 0.0f}) {
      const auto start = std::chrono::steady_clock::now();
      for (const Weights& w : layers) {
        const tardis::FallbackArgs<float> args{x.data(),     y_folded.data(), nullptr, w.w1t.data(), w.b1.data(),
                                               w.w2.data(),  w.lines.data(),  y.data(), 1,           d,
                                               h,            margin,          0,       w.v.data(),   rank,
                                               d + rank};
        tardis::ffn_fallback_cpu(args, tardis::ParallelRunner{omp_runner, nullptr});
      }
      const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
      if (repeat >= warmup) (margin > 0 ? fixed_us : flagged_us).push_back(took.count() / copies);
    }
  }
  std::printf("d %ld, h %ld, rank %ld, %d threads: nothing flagged %.1f us; %.0f%% flagged %.1f us (medians per call)\n",
              d, h, rank, g_threads, median(fixed_us), 100 * fraction, median(flagged_us));
  return y[0] == 12345.0f;  // keeps the results live
}
