// The three elementwise noise steps of diffusion.py, fused into one pass over the images: the checks, the
// choice of CPU build and the op registration. The CPU loops are in noise_kernels.h, the CUDA kernels in
// cuda/noise_steps.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "noise_kernels.h"  // the AVX2 build (setup.py's flags): dit_kernels::AVX2

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

#ifdef DIT_AVX512_BUILD
namespace AVX512 {  // kernels_avx512.cpp
void noise_step_kernel(const NoiseArgs& a);
}  // namespace AVX512
#endif

// the CPU loop of one step, on contiguous images and coefficients
static void run_cpu(NoiseStep step, const at::Tensor& out, std::initializer_list<at::Tensor> images,
                    const at::Tensor* coefs, int num_coefs, bool clip) {
  NoiseArgs a{};
  a.step = step, a.clip = clip;
  a.B = out.size(0), a.M = out.numel() / out.size(0);
  a.bf16 = out.scalar_type() == at::kBFloat16;
  int i = 0;
  for (const at::Tensor& image : images) a.images[i++] = image.data_ptr();
  for (int c = 0; c < num_coefs; ++c) a.coefs[c] = coefs[c].data_ptr<float>();
  a.out = out.data_ptr();
#ifdef DIT_AVX512_BUILD
  if (use_avx512()) return AVX512::noise_step_kernel(a);
#endif
  CPU_CAPABILITY::noise_step_kernel(a);
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
  run_cpu(NoiseStep::q_sample, out, {x, n}, coefs, 2, false);
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
  run_cpu(DDIM ? NoiseStep::ddim : NoiseStep::ddpm, out, {x, e, n}, coefs, 5, clip);
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
