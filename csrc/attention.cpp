// Fused grouped-query attention on the CPU: the checks, the choice of instruction set and the op
// registration. The kernels themselves, and how they work, are in attention_kernels.h.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention_kernels.h"  // the AVX2 build (setup.py's flags): dit_kernels::AVX2

namespace dit_kernels {

// -----------------------------------------------------------------------------
// checks shared by forward and backward, on both devices (cuda/attention.cu declares them)

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, N, D), got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "k must be (B, KV, N, D), got ", k.dim(), " dims");
  TORCH_CHECK(v.dim() == 4, "v must be (B, KV, N, D), got ", v.dim(), " dims");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have q's dtype ", q.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(v.device() == q.device(), "v must be on q's device ", q.device(), ", got ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "k must be (B, KV, N, D) with q's B, N, D ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "q's heads H=", q.size(1), " must be a multiple of k's heads KV=", k.size(1));
}

void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type(), "grad_out must have q's dtype ", q.scalar_type(), ", got ",
              grad_out.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype ", q.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3), "lse must be (B, H, N) ",
              q.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  for (const at::Tensor* t : {&grad_out, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "grad_out, out and lse must be on q's device ", q.device(), ", got ",
                t->device());
}

#ifdef DIT_AVX512_BUILD
namespace AVX512 {  // kernels_avx512.cpp
void attention_forward_kernel(const AttentionArgs& a);
void attention_backward_kernel(const AttentionArgs& a);
}  // namespace AVX512
#endif

// the AVX-512 build where PyTorch uses AVX-512 itself (cpu_capability.h)
static void run_forward(const AttentionArgs& a) {
#ifdef DIT_AVX512_BUILD
  if (use_avx512()) return AVX512::attention_forward_kernel(a);
#endif
  CPU_CAPABILITY::attention_forward_kernel(a);
}

static void run_backward(const AttentionArgs& a) {
#ifdef DIT_AVX512_BUILD
  if (use_avx512()) return AVX512::attention_backward_kernel(a);
#endif
  CPU_CAPABILITY::attention_backward_kernel(a);
}

// the kernels' view of q, k, v (sizes, pointers, strides); the caller fills in the outputs
static AttentionArgs args_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  AttentionArgs a{};
  a.B = q.size(0), a.H = q.size(1), a.N = q.size(2), a.D = q.size(3), a.KV = k.size(1);
  a.bf16 = q.scalar_type() == at::kBFloat16;
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) a.q_stride[d] = q.stride(d), a.k_stride[d] = k.stride(d), a.v_stride[d] = v.stride(d);
  return a;
}

// -----------------------------------------------------------------------------
// the ops

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v) {
  check_qkv(q, k, v);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor here, got ", q.device());
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AttentionArgs a = args_of(q, k, v);
  a.out = out.data_ptr(), a.lse = lse.data_ptr<float>();
  run_forward(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse) {
  check_backward(grad_out, q, k, v, out, lse);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor here, got ", q.device());
  auto lse_c = lse.contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  AttentionArgs a = args_of(q, k, v);
  a.grad_out = grad_out.data_ptr();
  for (int d = 0; d < 4; ++d) a.grad_out_stride[d] = grad_out.stride(d);
  a.lse = lse_c.data_ptr<float>(), a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  run_backward(a);
  return {dq, dk, dv};
}

// -----------------------------------------------------------------------------
// registration: the schemas of every op live here, noise_steps.cpp adds its own with a fragment

TORCH_LIBRARY(dit_kernels, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace dit_kernels

// `from csrc import _C` loads this library, which runs the registrations above; the module itself is empty
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
