"""
The Python face of the csrc kernels: one function per op over torch.ops.dit_kernels, fake (shape-only)
versions for torch.compile, and the autograd formula of attention. Importing this module raises
ImportError when the compiled library is missing, which csrc/__init__.py takes as "use PyTorch".
The references these ops must match are model.attention_reference and diffusion.*_reference.
"""
import glob
import os

import torch

if os.environ.get("DIT_KERNELS_JIT") == "1":
    # for copies of csrc/ without setup.py: compile on first import (slow) into torch's extension cache
    import platform

    from torch.utils import cpp_extension

    from csrc import flags

    _here = os.path.dirname(os.path.abspath(__file__))
    _cuda, _ = flags.cuda_build(os.environ.get("DIT_CUDA"), torch.version.cuda,
                                flags.nvcc_version(cpp_extension.CUDA_HOME))
    cpp_extension.load(
        name="dit_kernels_jit", is_python_module=False, verbose=False,
        sources=sorted(glob.glob(f"{_here}/*.cpp")) + (sorted(glob.glob(f"{_here}/cuda/*.cu")) if _cuda else []),
        extra_cflags=flags.cxx_flags(platform.machine(), platform.system()) + (["-DWITH_CUDA"] if _cuda else []),
        extra_ldflags=flags.openmp_flags(platform.system()), extra_cuda_cflags=["-O3"])
else:
    from csrc import _C  # noqa: F401  (loading the library registers torch.ops.dit_kernels)

_ops = torch.ops.dit_kernels

# -----------------------------------------------------------------------------
# attention


def attention(q, k, v):
    """Grouped-query attention. q (B, H, N, D); k, v (B, KV, N, D); H a multiple of KV; returns (B, H, N, D)."""
    out, _ = _ops.attention_forward(q, k, v)
    return out


@torch.library.register_fake("dit_kernels::attention_forward")
def _(q, k, v):
    B, H, N, D = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.register_fake("dit_kernels::attention_backward")
def _(grad_out, q, k, v, out, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)  # q, k, v, out, lse: the backward recomputes P from lse


def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; gradients through it are not supported
    q, k, v, out, lse = ctx.saved_tensors
    return _ops.attention_backward(grad_out, q, k, v, out, lse)


torch.library.register_autograd("dit_kernels::attention_forward", _backward, setup_context=_setup_context)

# -----------------------------------------------------------------------------
# noise steps (no autograd: they run on data and under torch.no_grad in the samplers)


def q_sample(x0, noise, coef_x0, coef_noise):
    """coef_x0 * x0 + coef_noise * noise, coefficients (B,) float32 per sample."""
    return _ops.q_sample(x0, noise, coef_x0, coef_noise)


def ddpm_step(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, mean_coef_x0, mean_coef_xt, sigma, clip):
    return _ops.ddpm_step(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, mean_coef_x0, mean_coef_xt,
                          sigma, bool(clip))


def ddim_step(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, sqrt_alpha_bar_prev, coef_eps, sigma,
              clip):
    return _ops.ddim_step(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, sqrt_alpha_bar_prev, coef_eps,
                          sigma, bool(clip))


for _name in ("q_sample", "ddpm_step", "ddim_step"):
    torch.library.register_fake(f"dit_kernels::{_name}")(
        lambda x, *args: torch.empty_like(x, memory_format=torch.contiguous_format))
