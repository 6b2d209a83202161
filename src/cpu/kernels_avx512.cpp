// AVX-512F kernels (compiled with -mavx512f; used only when the CPU has it).
//
// 16 coordinates per chunk. Each field of the packed layout holds a chunk's 16 codes in 2w
// bytes: one or two 32-bit words, broadcast, shifted per lane and masked. A codebook of up to 16
// entries is a single vpermps away (one instruction per 16 codes at 4 bits); 32 entries take
// vpermi2ps; larger ones a gather. Dimensions that are not a multiple of 16 go to the AVX2 kernels.
#include <immintrin.h>

#include <cstring>
#include <utility>

#include "cpu/kernels.hpp"
#include "cpu/simd_kernels.hpp"
#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cpu {

namespace {

// The 16 codes of one W-bit field for chunk c.
template <int W>
inline __m512i field16(const uint8_t* field, int c) {
  const uint8_t* p = field + size_t(c) * 2 * W;
  if constexpr (W == 8) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (W == 4) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    const __m512i words = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set1_epi32(int(lo))), _mm256_set1_epi32(int(hi)), 1);
    const __m512i shifts =
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15));
  } else {
    uint32_t word = 0;
    std::memcpy(&word, p, 2 * W);
    const __m512i shifts =
        _mm512_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W, 8 * W, 9 * W, 10 * W,
                          11 * W, 12 * W, 13 * W, 14 * W, 15 * W);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts),
                            _mm512_set1_epi32((1 << W) - 1));
  }
}

template <int Bits, size_t... K>
inline __m512i unpack16(const uint8_t* codes, int dim, int c, std::index_sequence<K...>) {
  constexpr auto f = field_widths(Bits);
  __m512i idx = _mm512_setzero_si512();
  ((idx = _mm512_or_si512(
        idx, _mm512_slli_epi32(
                 field16<f.width[K]>(codes + size_t(dim / 8) * field_shift(Bits, int(K)), c),
                 field_shift(Bits, int(K))))),
   ...);
  return idx;
}

struct Avx512 {
  using F = __m512;
  static constexpr int kLanes = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static constexpr int kMatmulVectors = 4;  // 4 rows x 4: 16 accumulators of 32 registers
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  // Eight sums: fold each vector to 8 lanes, then the AVX2 transposing tree.
  template <int N>
  static void hsum_many(const F* v, float* out) {
    if constexpr (N == 8) {
      __m256 half[8];
      for (int i = 0; i < 8; ++i)
        half[i] = _mm256_add_ps(
            _mm512_castps512_ps256(v[i]),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
      _mm256_storeu_ps(out, simd::hsum8(half));
    } else {
      for (int i = 0; i < N; ++i) out[i] = hsum(v[i]);
    }
  }

  template <int Bits>
  struct Codes {
    __m512 lo, hi;
    const float* table;
    explicit Codes(const float* t) : table(t) {
      alignas(64) float pad[32] = {};
      for (int i = 0; i < (1 << Bits) && i < 32; ++i) pad[i] = t[i];
      lo = _mm512_load_ps(pad);
      hi = _mm512_load_ps(pad + 16);
    }
    F operator()(const uint8_t* codes, int dim, int c) const {
      const __m512i idx =
          unpack16<Bits>(codes, dim, c, std::make_index_sequence<size_t(field_widths(Bits).count)>{});
      if constexpr (Bits <= 4) return _mm512_permutexvar_ps(idx, lo);
      else if constexpr (Bits == 5) return _mm512_permutex2var_ps(lo, idx, hi);
      else return _mm512_i32gather_ps(idx, table, 4);
    }
  };
};

// Entry points: AVX-512 where the dimension allows, AVX2 otherwise.
template <int Bits>
void scores(const CodeRun& run, const float* table, const float* q, int rows, float* out,
            size_t out_stride) {
  if (run.dim % 16) return code_kernels_avx2(Bits).scores(run, table, q, rows, out, out_stride);
  simd::code_scores<Avx512, Bits>(run, table, q, rows, out, out_stride);
}
template <int Bits>
void accumulate(const CodeRun& run, const float* table, const float* w, size_t w_stride,
                int rows, float* acc, size_t acc_stride) {
  if (run.dim % 16)
    return code_kernels_avx2(Bits).accumulate(run, table, w, w_stride, rows, acc, acc_stride);
  simd::code_accumulate<Avx512, Bits>(run, table, w, w_stride, rows, acc, acc_stride);
}
template <int Bits>
void expand(const CodeRun& run, const float* table, float* out) {
  if (run.dim % 16) return code_kernels_avx2(Bits).expand(run, table, out);
  simd::code_expand<Avx512, Bits>(run, table, out);
}
void float_scores(const FloatRun& run, const float* q, int rows, float* out, size_t out_stride) {
  if (run.dim % 16) return float_kernels_avx2().scores(run, q, rows, out, out_stride);
  simd::float_scores<Avx512>(run, q, rows, out, out_stride);
}
void float_accumulate(const FloatRun& run, const float* w, size_t w_stride, int rows,
                      float* acc, size_t acc_stride) {
  if (run.dim % 16)
    return float_kernels_avx2().accumulate(run, w, w_stride, rows, acc, acc_stride);
  simd::float_accumulate<Avx512>(run, w, w_stride, rows, acc, acc_stride);
}

template <int Bits>
constexpr CodeKernels make() {
  return {scores<Bits>, accumulate<Bits>, expand<Bits>};
}
constexpr CodeKernels kCode[8] = {make<1>(), make<2>(), make<3>(), make<4>(),
                                  make<5>(), make<6>(), make<7>(), make<8>()};

}  // namespace

const CodeKernels& code_kernels_avx512(int bits) {
  TQKV_CHECK(bits >= 1 && bits <= 8, "code kernels: bit width must be in 1..8, got ", bits);
  return kCode[bits - 1];
}
const FloatKernels& float_kernels_avx512() {
  // exp stays on AVX2: it is a few percent of attention time.
  static const FloatKernels k = {float_scores, float_accumulate, float_kernels_avx2().exp,
                                 simd::int8_matmul<Avx512>};
  return k;
}

}  // namespace tqkv::cpu
