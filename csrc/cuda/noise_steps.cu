// The three noise steps on CUDA, the twin of the CPU loops in noise_kernels.h. noise_steps.cpp holds the ops
// themselves (checks, contiguous copies) and calls the launchers at the end of this file for CUDA tensors.
// One thread per element, the same formulas in the same order. __fmul_rn / __fadd_rn are never contracted
// into fused multiply-adds, so fp32 results equal PyTorch's eager reference bitwise, as on the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace dit_kernels {

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
// DDIM: sqrt_alpha_bar_prev, coef_eps, sigma. See noise_kernels.h for the formulas.
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

// the launchers: out and the images are contiguous, on one CUDA device, non-empty

void q_sample_cuda(at::Tensor& out, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor (&coefs)[2]) {
  const c10::cuda::CUDAGuard guard(x0.device());
  const long numel = x0.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x0.scalar_type() == at::kFloat)
    q_sample_kernel<float><<<blocks(numel), kThreads, 0, stream>>>(
        x0.data_ptr<float>(), noise.data_ptr<float>(), coefs[0].data_ptr<float>(), coefs[1].data_ptr<float>(),
        out.data_ptr<float>(), numel, numel / x0.size(0));
  else
    q_sample_kernel<at::BFloat16><<<blocks(numel), kThreads, 0, stream>>>(
        x0.data_ptr<at::BFloat16>(), noise.data_ptr<at::BFloat16>(), coefs[0].data_ptr<float>(),
        coefs[1].data_ptr<float>(), out.data_ptr<at::BFloat16>(), numel, numel / x0.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool DDIM>
void sampler_step_cuda(at::Tensor& out, const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& noise,
                       const at::Tensor (&coefs_in)[5], bool clip) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  Coefs coefs;
  for (int c = 0; c < 5; ++c) coefs.c[c] = coefs_in[c].data_ptr<float>();
  const long numel = x_t.numel();
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
}

template void sampler_step_cuda<false>(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor (&)[5], bool);
template void sampler_step_cuda<true>(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor (&)[5], bool);

}  // namespace dit_kernels
