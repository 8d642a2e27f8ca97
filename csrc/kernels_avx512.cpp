// The CPU kernels of attention_kernels.h and noise_kernels.h compiled a second time, for AVX-512:
// attention.cpp and noise_steps.cpp call them on CPUs where PyTorch uses AVX-512 itself (use_avx512()
// below), and the AVX2 build elsewhere.
//
// Only the code after the target pragma below may use AVX-512, or the library would stop loading on AVX2
// machines. The kernels and at::vec are in namespaces named after the instruction set (dit_kernels::AVX512,
// at::vec::AVX512), so the linker cannot swap their code for the AVX2 build's. Any other function compiled
// here under a name the AVX2 files also use (an inline function from a header) could be swapped, so the
// headers that are not vector code are included before the pragma, and tests/test_kernels.py reads the
// disassembly for AVX-512 instructions outside functions named AVX512.
#include <ATen/Version.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu_capability.h"

#ifdef DIT_AVX512_BUILD
namespace dit_kernels {
// before the pragma: this runs on every CPU, to decide
bool use_avx512() {
  static const bool avx512 = at::get_cpu_capability() == "AVX512";
  return avx512;
}
}  // namespace dit_kernels

#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
// the pragma enables the instructions but, unlike -mavx512f, not the macros that headers test (sleef.h
// declares its 16-float functions only under __AVX512F__)
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "attention_kernels.h"
#include "noise_kernels.h"
#endif
