// The attention kernels written once over a SIMD vector type V, instantiated per instruction set
// (kernels_avx2.cpp, kernels_avx512.cpp). Included only by those files, each compiled with its
// own target flags.
//
// V provides: F (a vector of kLanes floats), zero, load, store, add, mul, fmadd, broadcast, hsum,
// hsum_many<N> (N horizontal sums at once, cheaper than N single ones), load_i8 (kLanes int8 as
// floats), kMatmulVectors (the vectors of columns one int8_matmul tile holds), and
// Codes<Bits>, which turns the packed codes of chunk c (coordinates c·kLanes ...) into the table
// values they stand for.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cpu/kernels.hpp"

namespace tqkv::cpu::simd {

// The sums of eight 8-float vectors, as one vector: a transposing tree of horizontal adds.
inline __m256 hsum8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
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
// gives the kLanes values of token t, chunk c.
template <class V, int RB, class Chunk>
void scores_block(int tokens, int dim, const float* q, float* out, size_t out_stride,
                  Chunk&& chunk) {
  const int chunks = dim / V::kLanes;
  int t = 0;
  for (; t + 2 <= tokens; t += 2) {
    typename V::F a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) a0[r] = a1[r] = V::zero();
    for (int c = 0; c < chunks; ++c) {
      const typename V::F v0 = chunk(t, c), v1 = chunk(t + 1, c);
      for (int r = 0; r < RB; ++r) {
        const typename V::F qv = V::load(q + size_t(r) * size_t(dim) + size_t(c) * V::kLanes);
        a0[r] = V::fmadd(qv, v0, a0[r]);
        a1[r] = V::fmadd(qv, v1, a1[r]);
      }
    }
    typename V::F all[2 * RB];
    for (int r = 0; r < RB; ++r) {
      all[r] = a0[r];
      all[RB + r] = a1[r];
    }
    float sums[2 * RB];
    V::template hsum_many<2 * RB>(all, sums);
    for (int r = 0; r < RB; ++r) {
      out[size_t(r) * out_stride + size_t(t)] = sums[r];
      out[size_t(r) * out_stride + size_t(t) + 1] = sums[RB + r];
    }
  }
  if (t < tokens) {
    typename V::F a0[RB];
    for (int r = 0; r < RB; ++r) a0[r] = V::zero();
    for (int c = 0; c < chunks; ++c) {
      const typename V::F v0 = chunk(t, c);
      for (int r = 0; r < RB; ++r)
        a0[r] = V::fmadd(V::load(q + size_t(r) * size_t(dim) + size_t(c) * V::kLanes), v0,
                                a0[r]);
    }
    for (int r = 0; r < RB; ++r) out[size_t(r) * out_stride + size_t(t)] = V::hsum(a0[r]);
  }
}

// acc[r] += Σ_t w[r, t] · values(t) for RB rows, chunk by chunk, two FMA chains per row.
template <class V, int RB, class Chunk>
void accumulate_block(int tokens, int dim, const float* w, size_t w_stride, float* acc,
                      size_t acc_stride, Chunk&& chunk) {
  const int chunks = dim / V::kLanes;
  for (int c = 0; c < chunks; ++c) {
    typename V::F a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) {
      a0[r] = V::load(acc + size_t(r) * acc_stride + size_t(c) * V::kLanes);
      a1[r] = V::zero();
    }
    int t = 0;
    for (; t + 2 <= tokens; t += 2) {
      const typename V::F v0 = chunk(t, c), v1 = chunk(t + 1, c);
      for (int r = 0; r < RB; ++r) {
        const float* wr = w + size_t(r) * w_stride + size_t(t);
        a0[r] = V::fmadd(V::broadcast(wr), v0, a0[r]);
        a1[r] = V::fmadd(V::broadcast(wr + 1), v1, a1[r]);
      }
    }
    if (t < tokens) {
      const typename V::F v0 = chunk(t, c);
      for (int r = 0; r < RB; ++r)
        a0[r] = V::fmadd(V::broadcast(w + size_t(r) * w_stride + size_t(t)), v0,
                                a0[r]);
    }
    for (int r = 0; r < RB; ++r)
      V::store(acc + size_t(r) * acc_stride + size_t(c) * V::kLanes,
                       V::add(a0[r], a1[r]));
  }
}

template <class V, int Bits>
void code_scores(const CodeRun& run, const float* table, const float* q, int rows, float* out,
                 size_t out_stride) {
  const typename V::template Codes<Bits> codes(table);
  auto chunk = [&](int t, int c) {
    return codes(run.codes + size_t(t) * run.stride, run.dim, c);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    scores_block<V, decltype(rb)::value>(run.tokens, run.dim, q + size_t(r) * size_t(run.dim),
                                      out + size_t(r) * out_stride, out_stride, chunk);
  });
}

template <class V, int Bits>
void code_accumulate(const CodeRun& run, const float* table, const float* w, size_t w_stride,
                     int rows, float* acc, size_t acc_stride) {
  const typename V::template Codes<Bits> codes(table);
  auto chunk = [&](int t, int c) {
    return codes(run.codes + size_t(t) * run.stride, run.dim, c);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    accumulate_block<V, decltype(rb)::value>(run.tokens, run.dim, w + size_t(r) * w_stride,
                                          w_stride, acc + size_t(r) * acc_stride, acc_stride, chunk);
  });
}

template <class V, int Bits>
void code_expand(const CodeRun& run, const float* table, float* out) {
  const typename V::template Codes<Bits> codes(table);
  for (int t = 0; t < run.tokens; ++t)
    for (int c = 0; c < run.dim / V::kLanes; ++c)
      V::store(out + size_t(t) * size_t(run.dim) + size_t(c) * V::kLanes,
                       codes(run.codes + size_t(t) * run.stride, run.dim, c));
}

template <class V>
void float_scores(const FloatRun& run, const float* q, int rows, float* out, size_t out_stride) {
  auto chunk = [&](int t, int c) {
    return V::load(run.rows + size_t(t) * run.stride + size_t(c) * V::kLanes);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    scores_block<V, decltype(rb)::value>(run.tokens, run.dim, q + size_t(r) * size_t(run.dim),
                                      out + size_t(r) * out_stride, out_stride, chunk);
  });
}

template <class V>
void float_accumulate(const FloatRun& run, const float* w, size_t w_stride, int rows,
                      float* acc, size_t acc_stride) {
  auto chunk = [&](int t, int c) {
    return V::load(run.rows + size_t(t) * run.stride + size_t(c) * V::kLanes);
  };
  for_row_blocks(rows, [&](auto rb, int r) {
    accumulate_block<V, decltype(rb)::value>(run.tokens, run.dim, w + size_t(r) * w_stride,
                                          w_stride, acc + size_t(r) * acc_stride, acc_stride, chunk);
  });
}

// y = x · w for RB rows and NV vectors of columns, accumulators in registers. Every product is
// rounded, then added (mul, add: no fmadd), in order of i: the scalar loop's bits.
template <class V, int RB, int NV>
void int8_matmul_tile(const float* x, int in, const int8_t* w, size_t w_stride, float* y,
                      size_t y_stride) {
  typename V::F acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = V::zero();
  for (int i = 0; i < in; ++i) {
    typename V::F wv[NV];
    for (int c = 0; c < NV; ++c) wv[c] = V::load_i8(w + size_t(i) * w_stride + size_t(c) * V::kLanes);
    for (int r = 0; r < RB; ++r) {
      const typename V::F xr = V::broadcast(x + size_t(r) * size_t(in) + size_t(i));
      for (int c = 0; c < NV; ++c) acc[r][c] = V::add(acc[r][c], V::mul(xr, wv[c]));
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c)
      V::store(y + size_t(r) * y_stride + size_t(c) * V::kLanes, acc[r][c]);
}

// Column tiles of kMatmulVectors vectors, then single vectors, then the scalar loop for the
// last cols % kLanes columns.
template <class V>
void int8_matmul(const float* x, int rows, int in, const int8_t* w, size_t w_stride, int cols,
                 float* y, size_t y_stride) {
  auto columns = [&](auto nv, int j) {
    for_row_blocks(rows, [&](auto rb, int r) {
      int8_matmul_tile<V, decltype(rb)::value, decltype(nv)::value>(
          x + size_t(r) * size_t(in), in, w + size_t(j), w_stride,
          y + size_t(r) * y_stride + size_t(j), y_stride);
    });
  };
  constexpr int kTile = V::kMatmulVectors * V::kLanes;
  int j = 0;
  for (; j + kTile <= cols; j += kTile) columns(std::integral_constant<int, V::kMatmulVectors>{}, j);
  for (; j + V::kLanes <= cols; j += V::kLanes) columns(std::integral_constant<int, 1>{}, j);
  if (j < cols)
    float_kernels_scalar().int8_matmul(x, rows, in, w + size_t(j), w_stride, cols - j,
                                       y + size_t(j), y_stride);
}

template <class V, int Bits>
constexpr CodeKernels code_kernels() {
  return {code_scores<V, Bits>, code_accumulate<V, Bits>, code_expand<V, Bits>};
}

}  // namespace tqkv::cpu::simd
