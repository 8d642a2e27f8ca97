// Fused grouped-query attention on CUDA, the twin of attention.cpp: same ops, same checks, fp32 and bf16
// (fp32 accumulation), D up to 128, on the current stream.
//
// Written to be simple enough to trust rather than fast: 16 x 16 tiles in shared memory, 128 threads a
// block, every product a plain loop. The forward is flash-style (online softmax over key tiles, one
// block per 16 query rows of one head). The backward gives each block 16 keys of one kv head: it
// owns their dK and dV rows in registers across all the query heads of the group, and adds its share
// of dQ with atomicAdd into an fp32 buffer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace dit_kernels {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);  // attention.cpp
void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse);

constexpr int kTile = 16;      // query rows and key rows per tile
constexpr int kMaxD = 128;     // head dim bound of the shared tiles
constexpr int kThreads = 128;  // kTile rows x kGroups column groups
constexpr int kGroups = kThreads / kTile;
constexpr int kPerThread = kMaxD / kGroups;  // head-dim columns a thread accumulates: d = group + kGroups * t

// rows [row0, row0 + kTile) of a (N, D) matrix into a shared tile, times scale, zeros past N
template <typename scalar_t>
__device__ void load_tile(float (*tile)[kMaxD + 1], const scalar_t* src, int row0, int N, int D, float scale) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    tile[r][d] = row0 + r < N ? static_cast<float>(src[static_cast<long>(row0 + r) * D + d]) * scale : 0.0f;
  }
}

__device__ float dot(const float* a, const float* b, int D) {
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// -----------------------------------------------------------------------------
// forward: grid (ceil(N / kTile), H, B)

template <typename scalar_t>
__global__ void attention_forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                                         float* lse, int H, int KV, int N, int D, float scale) {
  __shared__ float q_s[kTile][kMaxD + 1];  // +1: rows read across threads fall in different banks
  __shared__ float k_s[kTile][kMaxD + 1];
  __shared__ float v_s[kTile][kMaxD + 1];
  __shared__ float p_s[kTile][kTile + 1];
  __shared__ float row_max[kTile], row_sum[kTile], row_rescale[kTile];
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kTile, kv = h / (H / KV);
  const long q_head = (static_cast<long>(b) * H + h) * N, kv_head = (static_cast<long>(b) * KV + kv) * N;
  const int row = threadIdx.x / kGroups, group = threadIdx.x % kGroups;

  load_tile(q_s, q + q_head * D, i0, N, D, scale);  // scale q first, as attention_reference does
  if (threadIdx.x < kTile) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.0f;
  }
  float acc[kPerThread] = {};
  for (int j0 = 0; j0 < N; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    load_tile(k_s, k + kv_head * D, j0, N, D, 1.0f);
    load_tile(v_s, v + kv_head * D, j0, N, D, 1.0f);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int i = idx / kTile, j = idx % kTile;
      p_s[i][j] = j0 + j < N ? dot(q_s[i], k_s[j], D) : -INFINITY;
    }
    __syncthreads();
    if (threadIdx.x < kTile) {  // online softmax: one thread per row; key j0 is always valid, so m is finite
      const int i = threadIdx.x;
      float m = row_max[i];
      for (int j = 0; j < kTile; ++j) m = fmaxf(m, p_s[i][j]);
      float sum = 0.0f;
      for (int j = 0; j < kTile; ++j) {
        p_s[i][j] = expf(p_s[i][j] - m);
        sum += p_s[i][j];
      }
      row_rescale[i] = expf(row_max[i] - m);  // 0 on the first tile
      row_sum[i] = row_sum[i] * row_rescale[i] + sum;
      row_max[i] = m;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int d = group + kGroups * t;
      if (d < D) {
        float o = acc[t] * row_rescale[row];
        for (int j = 0; j < kTile; ++j) o += p_s[row][j] * v_s[j][d];
        acc[t] = o;
      }
    }
  }
  if (i0 + row < N) {
    const float inv = 1.0f / row_sum[row];
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int d = group + kGroups * t;
      if (d < D) out[(q_head + i0 + row) * D + d] = static_cast<scalar_t>(acc[t] * inv);
    }
    if (group == 0) lse[q_head + i0 + row] = row_max[row] + logf(row_sum[row]);
  }
}

// -----------------------------------------------------------------------------
// backward: grid (ceil(N / kTile), KV, B). With P = exp(S - lse) and delta = rowsum(dO * O):
// dV = P^T dO, dS = P * (dO V^T - delta), dK = dS^T (Q * scale), dQ = dS K * scale

template <typename scalar_t>
__global__ void attention_backward_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                                          const scalar_t* v, const float* lse, const float* delta, float* dq,
                                          scalar_t* dk, scalar_t* dv, int H, int KV, int N, int D, float scale) {
  __shared__ float k_s[kTile][kMaxD + 1];
  __shared__ float v_s[kTile][kMaxD + 1];
  __shared__ float q_s[kTile][kMaxD + 1];
  __shared__ float do_s[kTile][kMaxD + 1];
  __shared__ float p_s[kTile][kTile + 1];
  __shared__ float ds_s[kTile][kTile + 1];
  __shared__ float lse_s[kTile], delta_s[kTile];
  const int b = blockIdx.z, kv = blockIdx.y, j0 = blockIdx.x * kTile, G = H / KV;
  const long kv_head = (static_cast<long>(b) * KV + kv) * N;
  const int row = threadIdx.x / kGroups, group = threadIdx.x % kGroups;  // row: this thread's key j0 + row

  load_tile(k_s, k + kv_head * D, j0, N, D, 1.0f);
  load_tile(v_s, v + kv_head * D, j0, N, D, 1.0f);
  float dk_acc[kPerThread] = {}, dv_acc[kPerThread] = {};
  for (int h = kv * G; h < (kv + 1) * G; ++h) {
    const long q_head = (static_cast<long>(b) * H + h) * N;
    for (int i0 = 0; i0 < N; i0 += kTile) {
      __syncthreads();  // the previous query tile is no longer read
      load_tile(q_s, q + q_head * D, i0, N, D, scale);
      load_tile(do_s, grad_out + q_head * D, i0, N, D, 1.0f);
      if (threadIdx.x < kTile) {
        const bool valid = i0 + threadIdx.x < N;
        lse_s[threadIdx.x] = valid ? lse[q_head + i0 + threadIdx.x] : 0.0f;
        delta_s[threadIdx.x] = valid ? delta[q_head + i0 + threadIdx.x] : 0.0f;
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
        const int i = idx / kTile, j = idx % kTile;
        const bool valid = i0 + i < N && j0 + j < N;
        const float p = valid ? expf(dot(q_s[i], k_s[j], D) - lse_s[i]) : 0.0f;
        p_s[i][j] = p;
        ds_s[i][j] = p * (dot(do_s[i], v_s[j], D) - delta_s[i]);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        const int d = group + kGroups * t;
        if (d < D) {
          for (int i = 0; i < kTile; ++i) {
            dv_acc[t] += p_s[i][row] * do_s[i][d];
            dk_acc[t] += ds_s[i][row] * q_s[i][d];
          }
        }
      }
      for (int idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
        const int i = idx / D, d = idx % D;
        if (i0 + i < N) {
          float s = 0.0f;
          for (int j = 0; j < kTile; ++j) s += ds_s[i][j] * k_s[j][d];
          atomicAdd(dq + (q_head + i0 + i) * D + d, s * scale);
        }
      }
    }
  }
  if (j0 + row < N) {
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int d = group + kGroups * t;
      if (d < D) {
        dk[(kv_head + j0 + row) * D + d] = static_cast<scalar_t>(dk_acc[t]);
        dv[(kv_head + j0 + row) * D + d] = static_cast<scalar_t>(dv_acc[t]);
      }
    }
  }
}

// -----------------------------------------------------------------------------
// the ops

static void check_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor here, got ", q.device());
  TORCH_CHECK(q.size(3) <= kMaxD, "the CUDA attention supports head dim D <= ", kMaxD, ", got D=", q.size(3));
  // heads and batch are the grid's y and z, which CUDA caps at 65535
  TORCH_CHECK(q.size(0) <= 65535, "the CUDA attention takes batches of at most 65535, got B=", q.size(0));
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in) {
  check_qkv(q_in, k_in, v_in);
  check_cuda(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), KV = k.size(1);
  auto out = at::empty(q.sizes(), q.options());  // contiguous strides, as the CPU op and the fake declare
  auto lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const dim3 grid((N + kTile - 1) / kTile, H, B);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kFloat)
    attention_forward_kernel<float><<<grid, kThreads, 0, stream>>>(
        q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(),
        H, KV, N, D, scale);
  else
    attention_forward_kernel<at::BFloat16><<<grid, kThreads, 0, stream>>>(
        q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
        out.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), H, KV, N, D, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad_out_in,
                                                                       const at::Tensor& q_in, const at::Tensor& k_in,
                                                                       const at::Tensor& v_in, const at::Tensor& out,
                                                                       const at::Tensor& lse_in) {
  check_backward(grad_out_in, q_in, k_in, v_in, out, lse_in);
  check_cuda(q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto grad_out = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto lse = lse_in.contiguous();
  const int B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), KV = k.size(1);
  auto delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();  // (B, H, N)
  auto dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));  // summed into by every key block
  auto dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0) return {dq.to(q.scalar_type()), dk, dv};
  const dim3 grid((N + kTile - 1) / kTile, KV, B);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kFloat)
    attention_backward_kernel<float><<<grid, kThreads, 0, stream>>>(
        grad_out.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
        dv.data_ptr<float>(), H, KV, N, D, scale);
  else
    attention_backward_kernel<at::BFloat16><<<grid, kThreads, 0, stream>>>(
        grad_out.data_ptr<at::BFloat16>(), q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
        v.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
        dk.data_ptr<at::BFloat16>(), dv.data_ptr<at::BFloat16>(), H, KV, N, D, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq.to(q.scalar_type()), dk, dv};
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace dit_kernels
