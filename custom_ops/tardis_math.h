// The scalar math of ai.tardis::FfnFallback, shared by the CPU and the CUDA kernel.
//
// Mirrors tardis_onnx/reference.py (the float64 oracle):
//   flagged(z_hat)  = NOT (z_hat >= lo - margin AND z_hat <= hi + margin)   (NaN is flagged)
//   residual(z)     = GELU(z) - (a z + c)
// The window bounds are compared in double so that a z_hat exactly on lo - margin decides
// the same way as the oracle; the residual itself is computed in float.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define TARDIS_HD __host__ __device__ __forceinline__
#else
#define TARDIS_HD inline
#endif

namespace tardis {

// Row order of the packed `lines` input ([4, h] float32), as reference.pack_lines writes it.
enum LinesRow { kSlope = 0, kIntercept = 1, kLo = 2, kHi = 3 };

// GELU variants; the values match the `approximate` attribute ("none" -> 0, "tanh" -> 1).
enum Approximate { kGeluErf = 0, kGeluTanh = 1 };

// GELU(z). Written without the 1 + erf / 1 + tanh cancellation so that large negative z keeps
// its relative accuracy in float:
//   erf form:  0.5 z erfc(-z / sqrt 2)
//   tanh form: z / (1 + exp(-2u)),  u = sqrt(2/pi) (z + 0.044715 z^3)    (= 0.5 z (1 + tanh u))
// Limits agree with the oracle: GELU(+inf) = +inf, GELU(-inf) = NaN (-inf * 0), GELU(NaN) = NaN.
TARDIS_HD float gelu(float z, int approximate) {
  if (approximate == kGeluTanh) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return z / (1.0f + expf(-2.0f * u));
  }
  return 0.5f * z * erfcf(-0.7071067811865476f * z);
}

// Exact residual of neuron i: GELU(z) - (a z + c).
TARDIS_HD float residual(float z, float slope, float intercept, int approximate) {
  return gelu(z, approximate) - (slope * z + intercept);
}

// Lower and upper flag bounds of one neuron: lo - margin and hi + margin, in double.
TARDIS_HD double lower_bound(float lo, float margin) { return static_cast<double>(lo) - static_cast<double>(margin); }
TARDIS_HD double upper_bound(float hi, float margin) { return static_cast<double>(hi) + static_cast<double>(margin); }

// True when the predicted pre-activation lies outside [lower, upper] or is NaN.
TARDIS_HD bool is_flagged(float z_hat, double lower, double upper) {
  const double z = static_cast<double>(z_hat);
  return !(z >= lower && z <= upper);
}

}  // namespace tardis
