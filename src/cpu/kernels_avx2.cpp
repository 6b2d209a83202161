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

template <int Bits, size_t K>
constexpr int field_shift() {
  int s = 0;
  for (size_t i = 0; i < K; ++i) s += field_widths(Bits).width[i];
  return s;
}

template <int Bits, size_t... K>
inline __m256i unpack8(const uint8_t* codes, int dim, int c, std::index_sequence<K...>) {
  constexpr auto f = field_widths(Bits);
  __m256i idx = _mm256_setzero_si256();
  // Field K starts after dim * (widths before K) / 8 bytes = (dim / 8) * shift.
  ((idx = _mm256_or_si256(
        idx, _mm256_slli_epi32(field8<f.width[K]>(codes + size_t(dim / 8) * field_shift<Bits, K>(),
                                                  c),
                               field_shift<Bits, K>()))),
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Row blocks of up to 4 query rows share each unpacked chunk.

template <class Fn>
void for_row_blocks(int rows, Fn&& fn) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) fn(std::integral_constant<int, 4>{}, r);
  switch (rows - r) {
    case 3: fn(std::integral_constant<int, 3>{}, r); break;
    case 2: fn(std::integral_constant<int, 2>{}, r); break;
    case 1: fn(std::integral_constant<int, 1>{}, r); break;
  }
}

// Scores of RB rows against tokens, two tokens at a time (independent FMA chains). `chunk(t, c)`
// gives the 8 values of token t, chunk c.
template <int RB, class Chunk>
void scores_block(int tokens, int dim, const float* q, float* out, size_t out_stride,
                  Chunk&& chunk) {
  const int chunks = dim / 8;
  int t = 0;
  for (; t + 2 <= tokens; t += 2) {
    __m256 a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const __m256 v0 = chunk(t, c), v1 = chunk(t + 1, c);
      for (int r = 0; r < RB; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + size_t(r) * size_t(dim) + size_t(c) * 8);
        a0[r] = _mm256_fmadd_ps(qv, v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(qv, v1, a1[r]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      out[size_t(r) * out_stride + size_t(t)] = hsum(a0[r]);
      out[size_t(r) * out_stride + size_t(t) + 1] = hsum(a1[r]);
    }
  }
  if (t < tokens) {
    __m256 a0[RB];
    for (int r = 0; r < RB; ++r) a0[r] = _mm256_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const __m256 v0 = chunk(t, c);
      for (int r = 0; r < RB; ++r)
        a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + size_t(r) * size_t(dim) + size_t(c) * 8), v0,
                                a0[r]);
    }
    for (int r = 0; r < RB; ++r) out[size_t(r) * out_stride + size_t(t)] = hsum(a0[r]);
  }
}

// acc[r] += Σ_t w[r, t] · values(t) for RB rows, chunk by chunk, two FMA chains per row.
template <int RB, class Chunk>
void accumulate_block(int tokens, int dim, const float* w, size_t w_stride, float* acc,
                      size_t acc_stride, Chunk&& chunk) {
  const int chunks = dim / 8;
  for (int c = 0; c < chunks; ++c) {
    __m256 a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) {
      a0[r] = _mm256_loadu_ps(acc + size_t(r) * acc_stride + size_t(c) * 8);
      a1[r] = _mm256_setzero_ps();
    }
    int t = 0;
    for (; t + 2 <= tokens; t += 2) {
      const __m256 v0 = chunk(t, c), v1 = chunk(t + 1, c);
      for (int r = 0; r < RB; ++r) {
        const float* wr = w + size_t(r) * w_stride + size_t(t);
        a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(wr), v0, a0[r]);
        a1[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(wr + 1), v1, a1[r]);
      }
    }
    if (t < tokens) {
      const __m256 v0 = chunk(t, c);
      for (int r = 0; r < RB; ++r)
        a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + size_t(r) * w_stride + size_t(t)), v0,
                                a0[r]);
    }
    for (int r = 0; r < RB; ++r)
      _mm256_storeu_ps(acc + size_t(r) * acc_stride + size_t(c) * 8,
                       _mm256_add_ps(a0[r], a1[r]));
  }
}

template <int Bits>
void code_scores(const CodeRun& run, const float* table, const float* q, int rows, float* out,
                 size_t out_stride) {
  const Lookup<Bits> lookup(table);
  auto chunk = [&](int t, int c) {
    return lookup(unpack8<Bits>(run.codes + size_t(t) * run.stride, run.dim, c));
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    scores_block<decltype(rb)::value>(run.tokens, run.dim, q + size_t(r) * size_t(run.dim),
                                      out + size_t(r) * out_stride, out_stride, chunk);
  });
}

template <int Bits>
void code_accumulate(const CodeRun& run, const float* table, const float* w, size_t w_stride,
                     int rows, float* acc, size_t acc_stride) {
  const Lookup<Bits> lookup(table);
  auto chunk = [&](int t, int c) {
    return lookup(unpack8<Bits>(run.codes + size_t(t) * run.stride, run.dim, c));
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    accumulate_block<decltype(rb)::value>(run.tokens, run.dim, w + size_t(r) * w_stride,
                                          w_stride, acc + size_t(r) * acc_stride, acc_stride, chunk);
  });
}

template <int Bits>
void code_expand(const CodeRun& run, const float* table, float* out) {
  const Lookup<Bits> lookup(table);
  for (int t = 0; t < run.tokens; ++t)
    for (int c = 0; c < run.dim / 8; ++c)
      _mm256_storeu_ps(out + size_t(t) * size_t(run.dim) + size_t(c) * 8,
                       lookup(unpack8<Bits>(run.codes + size_t(t) * run.stride, run.dim, c)));
}

void float_scores(const FloatRun& run, const float* q, int rows, float* out, size_t out_stride) {
  auto chunk = [&](int t, int c) {
    return _mm256_loadu_ps(run.rows + size_t(t) * run.stride + size_t(c) * 8);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    scores_block<decltype(rb)::value>(run.tokens, run.dim, q + size_t(r) * size_t(run.dim),
                                      out + size_t(r) * out_stride, out_stride, chunk);
  });
}

void float_accumulate(const FloatRun& run, const float* w, size_t w_stride, int rows,
                      float* acc, size_t acc_stride) {
  auto chunk = [&](int t, int c) {
    return _mm256_loadu_ps(run.rows + size_t(t) * run.stride + size_t(c) * 8);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    accumulate_block<decltype(rb)::value>(run.tokens, run.dim, w + size_t(r) * w_stride,
                                          w_stride, acc + size_t(r) * acc_stride, acc_stride, chunk);
  });
}

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

template <int Bits>
constexpr CodeKernels make() {
  return {code_scores<Bits>, code_accumulate<Bits>, code_expand<Bits>};
}
constexpr CodeKernels kCode[8] = {make<1>(), make<2>(), make<3>(), make<4>(),
                                  make<5>(), make<6>(), make<7>(), make<8>()};
constexpr FloatKernels kFloat = {float_scores, float_accumulate, exp_inplace};

}  // namespace

const CodeKernels& code_kernels_avx2(int bits) {
  TQKV_CHECK(bits >= 1 && bits <= 8, "code kernels: bit width must be in 1..8, got ", bits);
  return kCode[bits - 1];
}
const FloatKernels& float_kernels_avx2() { return kFloat; }

}  // namespace tqkv::cpu
