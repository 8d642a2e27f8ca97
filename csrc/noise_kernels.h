// The CPU loops of the three noise steps, compiled twice like attention_kernels.h (see cpu_capability.h):
// by noise_steps.cpp for AVX2 and by kernels_avx512.cpp for AVX-512. They are passes over memory, at the
// speed of a one-op PyTorch kernel with the same traffic (make bench); on an AVX-512 CPU the 16-float
// build is what gets them there (the AVX2 one ran the samplers 5-10% slower, BENCHMARKS.md).
//
// Images are (B, M) contiguous float32 or bfloat16; each coefficient is float32 (B,), one per sample, so a
// batch may mix timesteps. The arithmetic repeats diffusion.py's reference formulas operation for operation
// (and the extension is built with -ffp-contract=off), so in float32 the results are bitwise equal to the
// reference in either build; bfloat16 images are computed in float32 and rounded once at the end.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu_capability.h"

namespace dit_kernels {

enum class NoiseStep { q_sample, ddpm, ddim };

// What the loops see of the tensors; noise_steps.cpp alone handles tensors.
struct NoiseArgs {
  NoiseStep step;
  int64_t B, M;            // samples, elements per sample
  bool bf16, clip;         // clip: clamp the predicted x0 to [-1, 1] (the samplers)
  const void* images[3];   // q_sample: x0, noise; the samplers: x_t, eps, noise
  const float* coefs[5];   // in the order of the op's arguments
  void* out;
};

namespace CPU_CAPABILITY {

// sample b's coefficients, rounded to the image dtype first as the reference's coef.to(x.dtype) does.
// Passed by value: a pointer could alias the output, and the compiler would then reload it per element
// instead of vectorising.
template <int NUM_COEFS>
struct SampleCoefs {
  float c[NUM_COEFS];
};

// f(b, coefficients of b) for every sample b, samples split across threads
template <typename scalar_t, int NUM_COEFS, typename F>
static void per_sample(const NoiseArgs& a, const F& f) {
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      SampleCoefs<NUM_COEFS> s;
      for (int c = 0; c < NUM_COEFS; ++c) s.c[c] = static_cast<float>(static_cast<scalar_t>(a.coefs[c][b]));
      f(b, s);
    }
  });
}

// x_t = coef_x0 * x0 + coef_noise * noise
template <typename scalar_t>
static void q_sample_loop(const NoiseArgs& a) {
  const auto *xp = static_cast<const scalar_t*>(a.images[0]), *np = static_cast<const scalar_t*>(a.images[1]);
  auto* op = static_cast<scalar_t*>(a.out);
  const int64_t M = a.M;
  per_sample<scalar_t, 2>(a, [&](int64_t b, const SampleCoefs<2> s) {
    const scalar_t *x = xp + b * M, *n = np + b * M;
    scalar_t* o = op + b * M;
#pragma omp simd
    for (int64_t i = 0; i < M; ++i)
      o[i] = static_cast<scalar_t>(s.c[0] * static_cast<float>(x[i]) + s.c[1] * static_cast<float>(n[i]));
  });
}

// both samplers start from x0 = sqrt_recip_alpha_bar * x_t - sqrt_recipm1_alpha_bar * eps, clamped if clip
static inline float predict_x0(float x, float eps, float recip, float recipm1, bool clip) {
  const float x0 = recip * x - recipm1 * eps;
  // branch-free ternaries, not std::min/max or an if: they map onto vmaxps / vminps / a blend, so the
  // loop vectorises; a NaN passes through, as in torch.clamp
  const float low = x0 < -1.0f ? -1.0f : x0;
  const float clamped = low > 1.0f ? 1.0f : low;
  return clip ? clamped : x0;
}

// the samplers share everything but the last line. DDPM:
//   x_{t-1} = mean_coef_x0 * x0 + mean_coef_xt * x_t + sigma * noise
// DDIM (Song et al. 2021, eq. 12), with eps re-derived from the (possibly clipped) x0:
//   x_{t-1} = sqrt_alpha_bar_prev * x0 + coef_eps * (sqrt_recip_alpha_bar * x_t - x0) / sqrt_recipm1_alpha_bar
//             + sigma * noise
template <typename scalar_t, bool DDIM>
static void sampler_loop(const NoiseArgs& a) {
  const auto *xp = static_cast<const scalar_t*>(a.images[0]), *ep = static_cast<const scalar_t*>(a.images[1]),
             *np = static_cast<const scalar_t*>(a.images[2]);
  auto* op = static_cast<scalar_t*>(a.out);
  const int64_t M = a.M;
  const bool clip = a.clip;
  per_sample<scalar_t, 5>(a, [&](int64_t b, const SampleCoefs<5> s) {
    const scalar_t *x = xp + b * M, *e = ep + b * M, *n = np + b * M;
    scalar_t* o = op + b * M;
#pragma omp simd
    for (int64_t i = 0; i < M; ++i) {
      const float xi = static_cast<float>(x[i]);
      const float x0 = predict_x0(xi, static_cast<float>(e[i]), s.c[0], s.c[1], clip);
      if constexpr (DDIM) {
        const float eps_x0 = (s.c[0] * xi - x0) / s.c[1];
        o[i] = static_cast<scalar_t>(s.c[2] * x0 + s.c[3] * eps_x0 + s.c[4] * static_cast<float>(n[i]));
      } else {
        const float mean = s.c[2] * x0 + s.c[3] * xi;
        o[i] = static_cast<scalar_t>(mean + s.c[4] * static_cast<float>(n[i]));
      }
    }
  });
}

template <typename scalar_t>
static void run_step(const NoiseArgs& a) {
  switch (a.step) {
    case NoiseStep::q_sample: return q_sample_loop<scalar_t>(a);
    case NoiseStep::ddpm: return sampler_loop<scalar_t, false>(a);
    case NoiseStep::ddim: return sampler_loop<scalar_t, true>(a);
  }
}

// the entry point noise_steps.cpp calls
void noise_step_kernel(const NoiseArgs& a) {
  if (a.bf16)
    run_step<c10::BFloat16>(a);
  else
    run_step<float>(a);
}

}  // namespace CPU_CAPABILITY
}  // namespace dit_kernels
