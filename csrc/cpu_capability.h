// Which CPU build of the kernels runs. attention_kernels.h and noise_kernels.h are compiled twice: with
// setup.py's AVX2 flags (by attention.cpp and noise_steps.cpp) and for AVX-512 (by kernels_avx512.cpp,
// under a GCC target pragma, on x86-64 only). The ops run the AVX-512 build where PyTorch itself uses
// AVX-512 (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY=avx2 overrides), since
// 16-float vectors do twice the work of each AVX2 instruction.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DIT_AVX512_BUILD
#endif

namespace dit_kernels {
bool use_avx512();  // defined in kernels_avx512.cpp, before its target pragma
}  // namespace dit_kernels
