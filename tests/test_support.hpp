// Helpers the correctness tests share: fresh seeds, errors against a reference, poisoned outputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace tqkv::testing {

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

/// NaN everywhere, so an element a kernel never writes fails every comparison.
inline std::vector<float> poisoned(size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

}  // namespace tqkv::testing
