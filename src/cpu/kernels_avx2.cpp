// AVX2 + FMA kernels (compiled with -mavx2 -mfma; used only when the CPU has both).
//
// Codes are handled 8 coordinates at a time. Each field of the packed layout (bitpack.hpp) holds
// the 8 codes of a chunk in exactly w bytes, so one small load, a broadcast, a variable shift and
// a mask put them in 8 lanes; fields are OR-ed together. The table lookup is one permute for
// codebooks of up to 8 entries, two permutes and a blend for 16 entries (the 4th code bit, moved
// to the sign bit, selects), and a gather above that. So unpack + lookup cost about 5 to 8
// instructions per 8 codes, shared by all the query rows that use them.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <utility>

#include "cpu/kernels.hpp"
#include "cpu/simd_kernels.hpp"
#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cpu {

namespace {

// The 8 codes of one W-bit field for chunk c (coordinates 8c .. 8c + 7).
template <int W>
inline __m256i field8(const uint8_t* field, int c) {
  const uint8_t* p = field + size_t(c) * W;
  if constexpr (W == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    uint32_t word = 0;
    std::memcpy(&word, p, W);
    const __m256i shifts = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts),
                            _mm256_set1_epi32((1 << W) - 1));
  }
}

template <int Bits, size_t... K>
inline __m256i unpack8(const uint8_t* codes, int dim, int c, std::index_sequence<K...>) {
  constexpr auto f = field_widths(Bits);
  __m256i idx = _mm256_setzero_si256();
  // Field K starts after dim * (widths before K) / 8 bytes = (dim / 8) * shift.
  ((idx = _mm256_or_si256(
        idx, _mm256_slli_epi32(field8<f.width[K]>(codes + size_t(dim / 8) * field_shift(Bits, int(K)),
                                                  c),
                               field_shift(Bits, int(K))))),
   ...);
  return idx;
}

template <int Bits>
inline __m256i unpack8(const uint8_t* codes, int dim, int c) {
  return unpack8<Bits>(codes, dim, c, std::make_index_sequence<size_t(field_widths(Bits).count)>{});
}

template <int Bits>
struct Lookup {
  __m256 lo, hi;
  const float* table;
  explicit Lookup(const float* t) : table(t) {
    if constexpr (Bits <= 3) {
      alignas(32) float pad[8] = {};
      for (int i = 0; i < (1 << Bits); ++i) pad[i] = t[i];
      lo = _mm256_load_ps(pad);
      hi = lo;
    } else {
      lo = _mm256_loadu_ps(t);
      hi = _mm256_loadu_ps(t + 8);
    }
  }
  inline __m256 operator()(__m256i idx) const {
    if constexpr (Bits <= 3) {
      return _mm256_permutevar8x32_ps(lo, idx);
    } else if constexpr (Bits == 4) {
      const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
      const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else {
      return _mm256_i32gather_ps(table, idx, 4);
    }
  }
};

struct Avx2 {
  using F = __m256;
  static constexpr int kLanes = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static constexpr int kMatmulVectors = 2;  // 4 rows x 2: 8 accumulators of 16 registers
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Eight sums by a transposing hadd tree, else one at a time.
  template <int N>
  static void hsum_many(const F* v, float* out) {
    if constexpr (N == 8) {
      _mm256_storeu_ps(out, simd::hsum8(v));
    } else {
      for (int i = 0; i < N; ++i) out[i] = hsum(v[i]);
    }
  }
  template <int Bits>
  struct Codes {
    Lookup<Bits> lookup;
    explicit Codes(const float* table) : lookup(table) {}
    F operator()(const uint8_t* codes, int dim, int c) const {
      return lookup(unpack8<Bits>(codes, dim, c));
    }
  };
};

// exp(x) for x <= 0: x = n·ln2 + f with |f| <= ln2/2, e^f by a degree-6 polynomial (relative
// error ~1e-7), 2^n through the exponent bits. Below −87.3 (and −inf) the result is exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, f2, f), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_mask, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

void exp_inplace(float* x, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

using simd::code_kernels;
constexpr CodeKernels kCode[8] = {
    code_kernels<Avx2, 1>(), code_kernels<Avx2, 2>(), code_kernels<Avx2, 3>(),
    code_kernels<Avx2, 4>(), code_kernels<Avx2, 5>(), code_kernels<Avx2, 6>(),
    code_kernels<Avx2, 7>(), code_kernels<Avx2, 8>()};
constexpr FloatKernels kFloat = {simd::float_scores<Avx2>, simd::float_accumulate<Avx2>,
                                 exp_inplace, simd::int8_matmul<Avx2>};

}  // namespace

const CodeKernels& code_kernels_avx2(int bits) {
  TQKV_CHECK(bits >= 1 && bits <= 8, "code kernels: bit width must be in 1..8, got ", bits);
  return kCode[bits - 1];
}
const FloatKernels& float_kernels_avx2() { return kFloat; }
void exp_avx2(float* x, int n) { exp_inplace(x, n); }

}  // namespace tqkv::cpu
