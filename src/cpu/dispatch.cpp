// Run-time choice of the CPU kernels' instruction set.
#include <cstdlib>
#include <string>

#include "cpu/kernels.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cpu {

const char* to_string(Isa isa) { return isa == Isa::avx2 ? "avx2" : "scalar"; }

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2:
#if defined(TQKV_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
      TQKV_CHECK(want == "scalar" || want == "avx2", "TQKV_SIMD='", want,
                 "' is not an instruction set tqkv knows (scalar, avx2)");
      const Isa chosen = want == "avx2" ? Isa::avx2 : Isa::scalar;
      TQKV_CHECK(isa_available(chosen), "TQKV_SIMD=", want, ": this CPU or build lacks it");
      return chosen;
    }
    return isa_available(Isa::avx2) ? Isa::avx2 : Isa::scalar;
  }();
  return isa;
}

const CodeKernels& code_kernels(int bits, Isa isa) {
#if defined(TQKV_HAVE_AVX2)
  if (isa == Isa::avx2) {
    TQKV_CHECK(isa_available(isa), "code kernels: AVX2 is not available on this CPU");
    return code_kernels_avx2(bits);
  }
#endif
  TQKV_CHECK(isa == Isa::scalar, "code kernels: ", to_string(isa), " is not built");
  return code_kernels_scalar(bits);
}

const FloatKernels& float_kernels(Isa isa) {
#if defined(TQKV_HAVE_AVX2)
  if (isa == Isa::avx2) {
    TQKV_CHECK(isa_available(isa), "float kernels: AVX2 is not available on this CPU");
    return float_kernels_avx2();
  }
#endif
  TQKV_CHECK(isa == Isa::scalar, "float kernels: ", to_string(isa), " is not built");
  return float_kernels_scalar();
}

}  // namespace tqkv::cpu
