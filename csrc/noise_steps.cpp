// The three elementwise noise steps of diffusion.py, fused into one pass over the images on the CPU.
//
// Images are (B, ...) float32 or bfloat16; each coefficient is float32 (B,), one per sample, so a batch
// may mix timesteps. The arithmetic repeats diffusion.py's reference formulas operation for operation
// (and the extension is built with -ffp-contract=off), so in float32 the results are bitwise equal to
// the reference; bfloat16 images are computed in float32 and rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <utility>

namespace dit_kernels {

// -----------------------------------------------------------------------------
// checks shared by the three ops

using Named = std::pair<const char*, const at::Tensor*>;

static void check_images(std::initializer_list<Named> images) {
  const auto& [first_name, first] = *images.begin();
  TORCH_CHECK(first->dim() >= 1, first_name, " must be (B, C, H, W), got ", first->dim(), " dims");
  TORCH_CHECK(first->scalar_type() == at::kFloat || first->scalar_type() == at::kBFloat16, first_name,
              " must be float32 or bfloat16, got ", first->scalar_type());
  for (const auto& [name, t] : images) {
    TORCH_CHECK(t->device() == first->device(), name, " must be on ", first_name, "'s device ", first->device(),
                ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == first->scalar_type(), name, " must have ", first_name, "'s dtype ",
                first->scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == first->sizes(), name, " must have ", first_name, "'s shape ", first->sizes(), ", got ",
                t->sizes());
  }
}

static void check_coefs(const at::Tensor& x, std::initializer_list<Named> coefs) {
  for (const auto& [name, t] : coefs) {
    TORCH_CHECK(t->device() == x.device(), name, " must be on the images' device ", x.device(), ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0), name, " must be (B,) with B=", x.size(0), ", got ",
                t->sizes());
  }
}

// f(b, a) for every sample b, samples split across threads. a holds sample b's coefficients, rounded to
// the image dtype first as the reference's coef.to(x.dtype) does. It is passed by value: a pointer could
// alias the output, and the compiler would then reload it per element instead of vectorising.
template <typename scalar_t, int NUM_COEFS, typename F>
static void per_sample(int64_t B, const at::Tensor (&coefs)[NUM_COEFS], const F& f) {
  const float* coef_ptrs[NUM_COEFS];
  for (int c = 0; c < NUM_COEFS; ++c) {
    const at::Tensor& coef = coefs[c];
    coef_ptrs[c] = coef.data_ptr<float>();
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::array<float, NUM_COEFS> a;
      for (int c = 0; c < NUM_COEFS; ++c) a[c] = static_cast<float>(static_cast<scalar_t>(coef_ptrs[c][b]));
      f(b, a);
    }
  });
}

// -----------------------------------------------------------------------------
// the per-element formulas; out, the images and the coefficients are contiguous

// x_t = coef_x0 * x0 + coef_noise * noise
template <typename scalar_t>
static void q_sample_kernel(at::Tensor& out, const at::Tensor& x0, const at::Tensor& noise,
                            const at::Tensor (&coefs)[2]) {
  const int64_t M = x0.numel() / x0.size(0);
  const scalar_t *xp = x0.data_ptr<scalar_t>(), *np = noise.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  per_sample<scalar_t, 2>(x0.size(0), coefs, [&](int64_t b, const std::array<float, 2> a) {
    const scalar_t *x = xp + b * M, *n = np + b * M;
    scalar_t* o = op + b * M;
#pragma omp simd
    for (int64_t i = 0; i < M; ++i)
      o[i] = static_cast<scalar_t>(a[0] * static_cast<float>(x[i]) + a[1] * static_cast<float>(n[i]));
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
static void sampler_kernel(at::Tensor& out, const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                           const at::Tensor (&coefs)[5], bool clip) {
  const int64_t M = x_t.numel() / x_t.size(0);
  const scalar_t *xp = x_t.data_ptr<scalar_t>(), *ep = eps.data_ptr<scalar_t>(), *np = noise.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  per_sample<scalar_t, 5>(x_t.size(0), coefs, [&](int64_t b, const std::array<float, 5> a) {
    const scalar_t *x = xp + b * M, *e = ep + b * M, *n = np + b * M;
    scalar_t* o = op + b * M;
#pragma omp simd
    for (int64_t i = 0; i < M; ++i) {
      const float xi = static_cast<float>(x[i]);
      const float x0 = predict_x0(xi, static_cast<float>(e[i]), a[0], a[1], clip);
      if constexpr (DDIM) {
        const float eps_x0 = (a[0] * xi - x0) / a[1];
        o[i] = static_cast<scalar_t>(a[2] * x0 + a[3] * eps_x0 + a[4] * static_cast<float>(n[i]));
      } else {
        const float mean = a[2] * x0 + a[3] * xi;
        o[i] = static_cast<scalar_t>(mean + a[4] * static_cast<float>(n[i]));
      }
    }
  });
}

// -----------------------------------------------------------------------------
// the ops, one definition for both devices: check, make contiguous, then run the CPU loop above or the
// CUDA kernel of cuda/noise_steps.cu on the images' device

#ifdef WITH_CUDA
void q_sample_cuda(at::Tensor& out, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor (&coefs)[2]);
template <bool DDIM>
void sampler_step_cuda(at::Tensor& out, const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                       const at::Tensor (&coefs)[5], bool clip);
#endif

static void check_device_built(const char* name, const at::Tensor& x) {
#ifdef WITH_CUDA
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), name, " must be a CPU or CUDA tensor, got ", x.device());
#else
  TORCH_CHECK(x.is_cpu(), name, " must be a CPU tensor (the extension was built without CUDA), got ", x.device());
#endif
}

at::Tensor q_sample(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& coef_x0,
                    const at::Tensor& coef_noise) {
  check_images({{"x0", &x0}, {"noise", &noise}});
  check_coefs(x0, {{"coef_x0", &coef_x0}, {"coef_noise", &coef_noise}});
  check_device_built("x0", x0);
  auto x = x0.contiguous(), n = noise.contiguous();
  const at::Tensor coefs[2] = {coef_x0.contiguous(), coef_noise.contiguous()};
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    q_sample_cuda(out, x, n, coefs);
    return out;
  }
#endif
  if (x.scalar_type() == at::kFloat)
    q_sample_kernel<float>(out, x, n, coefs);
  else
    q_sample_kernel<at::BFloat16>(out, x, n, coefs);
  return out;
}

// ddpm_step and ddim_step share their signature shape: three images, five coefficients, clip
template <bool DDIM>
static at::Tensor sampler_step(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                               std::initializer_list<Named> coef_args, bool clip) {
  check_images({{"x_t", &x_t}, {"eps", &eps}, {"noise", &noise}});
  check_coefs(x_t, coef_args);
  check_device_built("x_t", x_t);
  auto x = x_t.contiguous(), e = eps.contiguous(), n = noise.contiguous();
  at::Tensor coefs[5];
  int c = 0;
  for (const auto& [name, t] : coef_args) coefs[c++] = t->contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    sampler_step_cuda<DDIM>(out, x, e, n, coefs, clip);
    return out;
  }
#endif
  if (x.scalar_type() == at::kFloat)
    sampler_kernel<float, DDIM>(out, x, e, n, coefs, clip);
  else
    sampler_kernel<at::BFloat16, DDIM>(out, x, e, n, coefs, clip);
  return out;
}

at::Tensor ddpm_step(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                     const at::Tensor& sqrt_recip_alpha_bar, const at::Tensor& sqrt_recipm1_alpha_bar,
                     const at::Tensor& mean_coef_x0, const at::Tensor& mean_coef_xt, const at::Tensor& sigma,
                     bool clip) {
  return sampler_step<false>(x_t, eps, noise,
                            {{"sqrt_recip_alpha_bar", &sqrt_recip_alpha_bar},
                             {"sqrt_recipm1_alpha_bar", &sqrt_recipm1_alpha_bar},
                             {"mean_coef_x0", &mean_coef_x0},
                             {"mean_coef_xt", &mean_coef_xt},
                             {"sigma", &sigma}},
                            clip);
}

at::Tensor ddim_step(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                     const at::Tensor& sqrt_recip_alpha_bar, const at::Tensor& sqrt_recipm1_alpha_bar,
                     const at::Tensor& sqrt_alpha_bar_prev, const at::Tensor& coef_eps, const at::Tensor& sigma,
                     bool clip) {
  return sampler_step<true>(x_t, eps, noise,
                            {{"sqrt_recip_alpha_bar", &sqrt_recip_alpha_bar},
                             {"sqrt_recipm1_alpha_bar", &sqrt_recipm1_alpha_bar},
                             {"sqrt_alpha_bar_prev", &sqrt_alpha_bar_prev},
                             {"coef_eps", &coef_eps},
                             {"sigma", &sigma}},
                            clip);
}

// -----------------------------------------------------------------------------
// registration (attention.cpp holds the library's TORCH_LIBRARY block; this adds to it)

TORCH_LIBRARY_FRAGMENT(dit_kernels, m) {
  m.def("q_sample(Tensor x0, Tensor noise, Tensor coef_x0, Tensor coef_noise) -> Tensor");
  m.def("ddpm_step(Tensor x_t, Tensor eps, Tensor noise, Tensor sqrt_recip_alpha_bar, Tensor sqrt_recipm1_alpha_bar,"
        " Tensor mean_coef_x0, Tensor mean_coef_xt, Tensor sigma, bool clip) -> Tensor");
  m.def("ddim_step(Tensor x_t, Tensor eps, Tensor noise, Tensor sqrt_recip_alpha_bar, Tensor sqrt_recipm1_alpha_bar,"
        " Tensor sqrt_alpha_bar_prev, Tensor coef_eps, Tensor sigma, bool clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("q_sample", &q_sample);
  m.impl("ddpm_step", &ddpm_step);
  m.impl("ddim_step", &ddim_step);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("q_sample", &q_sample);
  m.impl("ddpm_step", &ddpm_step);
  m.impl("ddim_step", &ddim_step);
}
#endif

}  // namespace dit_kernels
