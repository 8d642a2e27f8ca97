"""
Builds the optional kernels as csrc/_C (make kernels):

    CUDA_HOME=/usr/local/cuda .venv/bin/python setup.py build_ext --inplace

The CUDA sources join the CPU ones when DIT_CUDA=1 or a GPU is visible; DEBUG=1 builds -O0 -g.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

debug = os.environ.get("DEBUG") == "1"
use_cuda = os.environ.get("DIT_CUDA") == "1" or torch.cuda.is_available()

# no -march=native: the .so must run on any x86 machine with AVX2, not just the one that built it.
# at::vec picks its implementation by CPU_CAPABILITY, as in ATen's own AVX2 kernels; elsewhere it falls
# back to portable loops. csrc/kernels_avx512.cpp adds an AVX-512 build of the CPU kernels by a pragma of its own,
# used at run time only on CPUs that have it. -ffp-contract=off keeps the noise steps bitwise equal to the PyTorch reference
# (attention's fused multiply-adds are explicit at::vec::fmadd calls).
cxx = ["-O0", "-g"] if debug else ["-O3"]
cxx += ["-fopenmp", "-ffp-contract=off"]
if platform.machine() in ("x86_64", "AMD64"):
    cxx += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
else:
    cxx += ["-DCPU_CAPABILITY=DEFAULT"]
nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]

sources = sorted(glob.glob("csrc/*.cpp"))
extension = CppExtension
extra_compile_args = {"cxx": cxx}
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension
    extra_compile_args["nvcc"] = nvcc
    cxx.append("-DWITH_CUDA")  # noise_steps.cpp then sends CUDA tensors to cuda/noise_steps.cu
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

setup(
    name="dit_kernels",
    ext_modules=[extension("csrc._C", sources, extra_compile_args=extra_compile_args, extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
