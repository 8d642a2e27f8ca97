"""
Builds the optional kernels as csrc/_C (make kernels):

    .venv/bin/python setup.py build_ext --inplace

The CUDA sources join the CPU ones where that build can succeed: torch built with CUDA and an nvcc of the
same major version under CUDA_HOME (csrc/flags.py decides, and one line says what is built). DIT_CUDA=1
builds them anyway, DIT_CUDA=0 never; DEBUG=1 builds -O0 -g.
"""
import glob
import os
import platform
import shutil
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

# csrc/flags.py alone: importing the csrc package would load the very library this rebuilds
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import flags  # noqa: E402


class BuildExt(BuildExtension):
    def copy_file(self, src, dst, *args, **kwargs):
        """--inplace: replace csrc/_C*.so by a rename, never by writing into it, so a process that has the
        old library loaded (a training run during make test) keeps its copy intact instead of crashing."""
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        return dst, True


debug = os.environ.get("DEBUG") == "1"
try:
    use_cuda, why = flags.cuda_build(os.environ.get("DIT_CUDA"), torch.version.cuda,
                                     flags.nvcc_version(cpp_extension.CUDA_HOME))
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
cxx = flags.cxx_flags(platform.machine(), platform.system(), debug)
sources = sorted(glob.glob("csrc/*.cpp"))
extension = CppExtension
extra_compile_args = {"cxx": cxx}
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension
    extra_compile_args["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3"]
    cxx.append("-DWITH_CUDA")  # noise_steps.cpp then sends CUDA tensors to cuda/noise_steps.cu
    found = [".".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())]
    os.environ["TORCH_CUDA_ARCH_LIST"] = flags.cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), found)
openmp = "" if flags.openmp_flags(platform.system()) else ", without OpenMP (one thread)"
print(f"csrc: building the CPU kernels{openmp} and " +
      (f"the CUDA kernels for sm {os.environ['TORCH_CUDA_ARCH_LIST']} ({why})" if use_cuda
       else f"no CUDA kernels ({why})"), file=sys.stderr, flush=True)

setup(
    name="dit_kernels",
    ext_modules=[extension("csrc._C", sources, extra_compile_args=extra_compile_args,
                           extra_link_args=flags.openmp_flags(platform.system()))],
    cmdclass={"build_ext": BuildExt},
)
