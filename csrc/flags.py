"""
How the extension is compiled, in one place for setup.py (make kernels) and the JIT build in ops.py: the
compiler flags of each platform, and whether the CUDA kernels are built. Plain functions of their inputs,
so the tests can ask about macOS or a mismatched toolkit on any machine. Imports nothing from torch.
"""
import os
import re
import subprocess


def cxx_flags(machine, system, debug=False):
    """Flags of the C++ files. No -march=native: the library must run on any x86 machine with AVX2, not just
    the one that built it. at::vec picks its implementation by CPU_CAPABILITY, as in ATen's own AVX2 kernels;
    elsewhere it falls back to portable loops (kernels_avx512.cpp adds an AVX-512 build by a pragma of its
    own). -ffp-contract=off keeps the noise steps bitwise equal to the PyTorch reference (attention's fused
    multiply-adds are explicit at::vec::fmadd calls)."""
    flags = ["-O0", "-g"] if debug else ["-O3"]
    flags += openmp_flags(system) + ["-ffp-contract=off"]
    if machine in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def openmp_flags(system):
    """-fopenmp (compile and link) except on macOS, whose clang rejects it. The kernels use OpenMP only through
    at::parallel_for, whose bodies take tasks from an atomic counter, so without it they are still correct:
    at::parallel_for then runs the body once, on one thread."""
    return [] if system == "Darwin" else ["-fopenmp"]


def nvcc_version(cuda_home):
    """The release of cuda_home/bin/nvcc ("13.0"), or None when there is none or it does not run."""
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    if not cuda_home or not os.path.isfile(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build(dit_cuda, torch_cuda, nvcc):
    """(build the CUDA kernels?, why) from DIT_CUDA (None, "0" or "1"), torch.version.cuda (None for a CPU
    build of torch) and nvcc_version(). Without DIT_CUDA, only where the build can succeed: torch built with
    CUDA and an nvcc of the same major version (torch refuses another major; a GPU need not be visible, so
    a login node builds for the compute nodes). DIT_CUDA=1 builds anyway (a failure is then an error),
    DIT_CUDA=0 never."""
    if dit_cuda not in (None, "", "0", "1"):
        raise ValueError(f"DIT_CUDA={dit_cuda!r} is not one of 0, 1 (or unset: build CUDA where the toolkit fits)")
    if dit_cuda == "0":
        return False, "DIT_CUDA=0"
    if dit_cuda == "1":
        return True, "DIT_CUDA=1"
    if not torch_cuda:
        return False, "this torch is built without CUDA"
    if not nvcc:
        return False, "no nvcc under CUDA_HOME"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return False, f"nvcc {nvcc} does not match torch's CUDA {torch_cuda}"
    return True, f"nvcc {nvcc} matches torch's CUDA {torch_cuda}"


def cuda_arch_list(requested, found):
    """TORCH_CUDA_ARCH_LIST for the CUDA build: as requested when set; else the compute capabilities of the GPUs
    found ("9.0"), so a build on the machine that runs it compiles one architecture; else 8.0 and 9.0 (A100,
    H100). The newest also as PTX ("+PTX"), which the driver compiles for any newer GPU: SASS alone loads only on
    the architecture it was built for."""
    if requested:
        return requested
    archs = sorted(set(found), key=lambda arch: tuple(int(part) for part in arch.split("."))) or ["8.0", "9.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])
