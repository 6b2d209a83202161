// The mergeable state of a partial softmax-weighted sum (split-KV attention).
//
// For one query row and a set of tokens T with scores s_t and value vectors v_t:
//     m = max_t s_t,   l = Σ_t e^(s_t − m),   acc = Σ_t e^(s_t − m) v_t
// and the attention output is acc / l. Two states over disjoint token sets merge exactly:
//     m = max(m_a, m_b),  l = e^(m_a − m) l_a + e^(m_b − m) l_b,  acc likewise.
// A state over no visible token has m = −inf, l = 0, acc = 0 and merges as the identity. acc may
// live in any linear space (the attention kernels keep it in the value codec's rotated space).
#pragma once

#include <cmath>
#include <limits>

namespace tqkv {

/// A view of one row's state: m, l and `dim` accumulator values.
struct SoftmaxState {
  float* m;
  float* l;
  float* acc;
  int dim;

  void reset() const {
    *m = -std::numeric_limits<float>::infinity();
    *l = 0.0f;
    for (int j = 0; j < dim; ++j) acc[j] = 0.0f;
  }
};

/// into ← into ⊕ from (both over the same accumulator dimension).
inline void merge(const SoftmaxState& into, const SoftmaxState& from) {
  if (*from.m == -std::numeric_limits<float>::infinity()) return;
  if (*into.m == -std::numeric_limits<float>::infinity()) {
    *into.m = *from.m;
    *into.l = *from.l;
    for (int j = 0; j < into.dim; ++j) into.acc[j] = from.acc[j];
    return;
  }
  const float m = std::fmax(*into.m, *from.m);
  const float a = std::exp(*into.m - m), b = std::exp(*from.m - m);
  *into.m = m;
  *into.l = a * *into.l + b * *from.l;
  for (int j = 0; j < into.dim; ++j) into.acc[j] = a * into.acc[j] + b * from.acc[j];
}

}  // namespace tqkv
