// The three noise steps on CUDA, the twin of noise_steps.cpp: one thread per element, same formulas in
// the same order. __fmul_rn / __fadd_rn are never contracted into fused multiply-adds, so fp32 results
// equal PyTorch's eager reference bitwise, as on the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

namespace dit_kernels {

using Named = std::pair<const char*, const at::Tensor*>;
void check_images(std::initializer_list<Named> images);  // noise_steps.cpp
void check_coefs(const at::Tensor& x, std::initializer_list<Named> coefs);

constexpr int kThreads = 256;

// coefficient c of sample b, rounded to the image dtype first as the reference's coef.to(x.dtype) does
template <typename scalar_t>
__device__ float coef(const float* c, long b) {
  return static_cast<float>(static_cast<scalar_t>(c[b]));
}

// x_t = coef_x0 * x0 + coef_noise * noise
template <typename scalar_t>
__global__ void q_sample_kernel(const scalar_t* x0, const scalar_t* noise, const float* coef_x0,
                                const float* coef_noise, scalar_t* out, long numel, long per_sample) {
  const long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x;
  if (i >= numel) return;
  const long b = i / per_sample;
  out[i] = static_cast<scalar_t>(__fadd_rn(__fmul_rn(coef<scalar_t>(coef_x0, b), static_cast<float>(x0[i])),
                                           __fmul_rn(coef<scalar_t>(coef_noise, b), static_cast<float>(noise[i]))));
}

// c: sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, then DDPM: mean_coef_x0, mean_coef_xt, sigma;
// DDIM: sqrt_alpha_bar_prev, coef_eps, sigma. See noise_steps.cpp for the formulas.
struct Coefs {
  const float* c[5];
};

template <typename scalar_t, bool DDIM>
__global__ void sampler_kernel(const scalar_t* x_t, const scalar_t* eps, const scalar_t* noise, Coefs coefs,
                               bool clip, scalar_t* out, long numel, long per_sample) {
  const long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x;
  if (i >= numel) return;
  const long b = i / per_sample;
  float a[5];
  for (int c = 0; c < 5; ++c) a[c] = coef<scalar_t>(coefs.c[c], b);
  const float x = static_cast<float>(x_t[i]), n = static_cast<float>(noise[i]);
  float x0 = __fsub_rn(__fmul_rn(a[0], x), __fmul_rn(a[1], static_cast<float>(eps[i])));
  if (clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);  // NaN passes through, as in torch.clamp
  float result;
  if constexpr (DDIM) {
    const float eps_x0 = __fdiv_rn(__fsub_rn(__fmul_rn(a[0], x), x0), a[1]);
    result = __fadd_rn(__fadd_rn(__fmul_rn(a[2], x0), __fmul_rn(a[3], eps_x0)), __fmul_rn(a[4], n));
  } else {
    const float mean = __fadd_rn(__fmul_rn(a[2], x0), __fmul_rn(a[3], x));
    result = __fadd_rn(mean, __fmul_rn(a[4], n));
  }
  out[i] = static_cast<scalar_t>(result);
}

static unsigned blocks(long numel) { return static_cast<unsigned>((numel + kThreads - 1) / kThreads); }

at::Tensor q_sample_cuda(const at::Tensor& x0_in, const at::Tensor& noise_in, const at::Tensor& coef_x0,
                         const at::Tensor& coef_noise) {
  check_images({{"x0", &x0_in}, {"noise", &noise_in}});
  check_coefs(x0_in, {{"coef_x0", &coef_x0}, {"coef_noise", &coef_noise}});
  TORCH_CHECK(x0_in.is_cuda(), "x0 must be a CUDA tensor here, got ", x0_in.device());
  const c10::cuda::CUDAGuard guard(x0_in.device());
  auto x0 = x0_in.contiguous(), noise = noise_in.contiguous();
  auto c0 = coef_x0.contiguous(), c1 = coef_noise.contiguous();
  auto out = at::empty_like(x0);
  const long numel = x0.numel();
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x0.scalar_type() == at::kFloat)
    q_sample_kernel<float><<<blocks(numel), kThreads, 0, stream>>>(
        x0.data_ptr<float>(), noise.data_ptr<float>(), c0.data_ptr<float>(), c1.data_ptr<float>(),
        out.data_ptr<float>(), numel, numel / x0.size(0));
  else
    q_sample_kernel<at::BFloat16><<<blocks(numel), kThreads, 0, stream>>>(
        x0.data_ptr<at::BFloat16>(), noise.data_ptr<at::BFloat16>(), c0.data_ptr<float>(), c1.data_ptr<float>(),
        out.data_ptr<at::BFloat16>(), numel, numel / x0.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <bool DDIM>
static at::Tensor sampler_step(const at::Tensor& x_t_in, const at::Tensor& eps_in, const at::Tensor& noise_in,
                               std::initializer_list<Named> coef_args, bool clip) {
  check_images({{"x_t", &x_t_in}, {"eps", &eps_in}, {"noise", &noise_in}});
  check_coefs(x_t_in, coef_args);
  TORCH_CHECK(x_t_in.is_cuda(), "x_t must be a CUDA tensor here, got ", x_t_in.device());
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  auto x_t = x_t_in.contiguous(), eps = eps_in.contiguous(), noise = noise_in.contiguous();
  at::Tensor kept[5];  // contiguous copies stay alive until the kernel is queued
  Coefs coefs;
  int c = 0;
  for (const auto& [name, t] : coef_args) {
    kept[c] = t->contiguous();
    coefs.c[c] = kept[c].data_ptr<float>();
    ++c;
  }
  auto out = at::empty_like(x_t);
  const long numel = x_t.numel();
  if (numel == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x_t.scalar_type() == at::kFloat)
    sampler_kernel<float, DDIM><<<blocks(numel), kThreads, 0, stream>>>(
        x_t.data_ptr<float>(), eps.data_ptr<float>(), noise.data_ptr<float>(), coefs, clip, out.data_ptr<float>(),
        numel, numel / x_t.size(0));
  else
    sampler_kernel<at::BFloat16, DDIM><<<blocks(numel), kThreads, 0, stream>>>(
        x_t.data_ptr<at::BFloat16>(), eps.data_ptr<at::BFloat16>(), noise.data_ptr<at::BFloat16>(), coefs, clip,
        out.data_ptr<at::BFloat16>(), numel, numel / x_t.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ddpm_step_cuda(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
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

at::Tensor ddim_step_cuda(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
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

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace dit_kernels
