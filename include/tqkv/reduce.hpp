// The one summation order tqkv uses for every float dot product and norm that decides a code.
//
// Codes must be bit-identical on every backend, so a sum whose result picks a code (a norm, a row
// of the dense rotation, a QJL projection) has one fixed order, chosen to map onto both a SIMD
// register file and a GPU warp:
//   - 32 lanes; lane l accumulates a[j] * b[j] for j = l, l + 32, l + 64, ... in increasing j,
//     each product rounded to float, then added (no fused multiply-add);
//   - the lanes are then summed by halving: lane[l] += lane[l + w] for w = 16, 8, 4, 2, 1.
// The halving tree gives the same value as a warp's xor-shuffle butterfly (float addition is
// commutative), so a CUDA kernel reproduces it with __fmul_rn / __fadd_rn and __shfl_xor_sync.
#pragma once

#include <cstddef>

namespace tqkv {

inline constexpr int kReduceLanes = 32;

/// sum_j a[j] * b[j] in the canonical order above.
inline float canonical_dot(const float* a, const float* b, size_t n) {
  float lane[kReduceLanes] = {};
  size_t j = 0;
  for (; j + kReduceLanes <= n; j += kReduceLanes)
    for (int l = 0; l < kReduceLanes; ++l) lane[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) lane[l] += a[j + l] * b[j + l];
  for (int w = kReduceLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

}  // namespace tqkv
