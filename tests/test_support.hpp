// Helpers the correctness tests share: fresh seeds, errors against a reference, poisoned outputs.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tqkv/error.hpp"

namespace tqkv::testing {

/// The message of the tqkv::Error that `f` throws; fails the test if it throws nothing.
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no tqkv::Error thrown";
  return "";
}

/// A seed never used before (tests print it, so a failure can be replayed).
inline uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

/// n draws of N(mean, sigma²).
inline std::vector<float> gaussian(std::mt19937_64& rng, size_t n, float sigma = 1.0f,
                                   float mean = 0.0f) {
  std::normal_distribution<float> g(mean, sigma);
  std::vector<float> out(n);
  for (auto& x : out) x = g(rng);
  return out;
}

/// ‖a − ref‖ / ‖ref‖, in float64.
inline double relative_error(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

/// The rows of query heads [first, first + count) of each token of x ([tokens][heads][d]), as
/// [tokens][count][d]: what a shard holding those heads takes and gives.
inline std::vector<float> head_rows(const std::vector<float>& x, size_t tokens, size_t heads,
                                    size_t first, size_t count, size_t d) {
  std::vector<float> out;
  for (size_t t = 0; t < tokens; ++t) {
    const auto at = x.begin() + long((t * heads + first) * d);
    out.insert(out.end(), at, at + long(count * d));
  }
  return out;
}

/// `count` arrays of random partial states (attend_partial's layout), one after another:
/// [count][rows][4 + d], m in (−30, 30), l in (0.5, 200), l · o with o ~ N(0, 1); state s of row
/// r is empty (all zeros) where (s + r) % 3 == 0, except that no row is empty in every array.
inline std::vector<float> random_partial_states(std::mt19937_64& rng, size_t count, size_t rows,
                                                size_t d) {
  std::uniform_real_distribution<float> m(-30.0f, 30.0f), l(0.5f, 200.0f);
  std::vector<float> states(count * rows * (4 + d), 0.0f);
  for (size_t s = 0; s < count; ++s)
    for (size_t r = 0; r < rows; ++r) {
      if ((s + r) % 3 == 0 && s != r % count) continue;
      float* st = &states[(s * rows + r) * (4 + d)];
      st[0] = m(rng);
      st[1] = l(rng);
      const std::vector<float> o = gaussian(rng, d);
      for (size_t j = 0; j < d; ++j) st[4 + j] = st[1] * o[j];
    }
  return states;
}

/// NaN everywhere, so an element a kernel never writes fails every comparison.
inline std::vector<float> poisoned(size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace tqkv::testing
