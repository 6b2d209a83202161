// Run-time choice of the CPU kernels' instruction set.
#include <cstdlib>
#include <string>

#include "cpu/kernels.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cpu {

const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
#if defined(TQKV_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Isa::avx512:
#if defined(TQKV_HAVE_AVX512)
      return isa_available(Isa::avx2) && __builtin_cpu_supports("avx512f");
#else
      return false;
#endif
  }
  return false;
}

Isa active_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("TQKV_SIMD");
    if (env && *env) {
      const std::string want = env;
      for (Isa i : {Isa::scalar, Isa::avx2, Isa::avx512})
        if (want == to_string(i)) {
          TQKV_CHECK(isa_available(i), "TQKV_SIMD=", want, ": this CPU or build lacks it");
          return i;
        }
      throw Error("TQKV_SIMD='" + want + "' is not an instruction set tqkv knows (scalar, avx2, "
                  "avx512)");
    }
    for (Isa i : {Isa::avx512, Isa::avx2})
      if (isa_available(i)) return i;
    return Isa::scalar;
  }();
  return isa;
}

const CodeKernels& code_kernels(int bits, Isa isa) {
  TQKV_CHECK(isa_available(isa), "code kernels: ", to_string(isa),
             " is not available on this CPU or build");
  switch (isa) {
#if defined(TQKV_HAVE_AVX2)
    case Isa::avx2: return code_kernels_avx2(bits);
#endif
#if defined(TQKV_HAVE_AVX512)
    case Isa::avx512: return code_kernels_avx512(bits);
#endif
    default: return code_kernels_scalar(bits);
  }
}

const FloatKernels& float_kernels(Isa isa) {
  TQKV_CHECK(isa_available(isa), "float kernels: ", to_string(isa),
             " is not available on this CPU or build");
  switch (isa) {
#if defined(TQKV_HAVE_AVX2)
    case Isa::avx2: return float_kernels_avx2();
#endif
#if defined(TQKV_HAVE_AVX512)
    case Isa::avx512: return float_kernels_avx512();
#endif
    default: return float_kernels_scalar();
  }
}

}  // namespace tqkv::cpu
