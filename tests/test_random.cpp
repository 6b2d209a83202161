// Philox4x32-10, signs, normals and the deterministic log / sincos of tqkv::random.
#include "tqkv/random.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace tqkv::random {
namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

std::string seed_msg(uint64_t seed) { return "seed = " + std::to_string(seed); }

double from_bits(uint64_t b) {
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}

TEST(Random, PhiloxKnownAnswers) {
  // Random123 kat_vectors, philox4x32 10 rounds.
  struct Kat {
    std::array<uint32_t, 4> ctr;
    std::array<uint32_t, 2> key;
    std::array<uint32_t, 4> out;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) EXPECT_EQ(philox4x32_10(k.ctr, k.key), k.out);
}

TEST(Random, WordIsDocumentedCounterLayout) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (int t = 0; t < 200; ++t) {
    const StreamId id{rng(), Stream(1 + rng() % 3), uint32_t(rng())};
    // Include block indices above 2^32 so the high counter word is exercised.
    const uint64_t i = t % 2 ? rng() % 4096 : rng() >> 2;
    const uint64_t b = i / 4;
    const auto blk = philox4x32_10(
        {uint32_t(b), uint32_t(b >> 32), id.substream, uint32_t(id.stream)},
        {uint32_t(id.seed), uint32_t(id.seed >> 32)});
    EXPECT_EQ(word(id, i), blk[i % 4]) << "i = " << i;
  }
}

TEST(Random, FillSignsMatchesWordBits) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  const StreamId id{seed, Stream::hadamard_signs, uint32_t(seed >> 7) & 15u};
  const size_t n = 1000;  // not a multiple of 32
  std::vector<float> s(n, 0.0f);
  fill_signs(id, n, s.data());
  for (size_t j = 0; j < n; ++j) {
    const bool set = (word(id, j / 32) >> (j % 32)) & 1u;
    ASSERT_EQ(s[j], set ? -1.0f : 1.0f) << "j = " << j;
  }
}

TEST(Random, GoldenSignsSeed42) {
  // Regression goldens, computed once with this code: the generator must never drift silently.
  const int golden[64] = {
      +1, +1, -1, +1, +1, +1, +1, +1, -1, -1, +1, -1, -1, +1, +1, -1, -1, -1, +1, +1, +1, +1,
      -1, +1, +1, +1, +1, +1, +1, -1, +1, +1, +1, -1, +1, +1, +1, -1, +1, +1, +1, +1, +1, +1,
      +1, -1, -1, -1, -1, -1, -1, +1, +1, +1, +1, +1, +1, +1, +1, -1, -1, +1, +1, -1};
  float s[64];
  fill_signs({42, Stream::hadamard_signs, 0}, 64, s);
  for (int j = 0; j < 64; ++j) EXPECT_EQ(s[j], float(golden[j])) << "j = " << j;
}

TEST(Random, GoldenNormalsSeed42) {
  // Regression goldens (hex floats), computed once with this code: any change in Philox, the
  // uniform mapping, det_log or det_sincos_2pi changes these bits.
  const double golden[8] = {-0x1.58b6d9be4aa66p-2, 0x1.bfc8c3e9864bap-1, 0x1.13ee886920928p-3,
                            -0x1.4703ac2ef924fp+0, 0x1.0bc89693108afp+0, -0x1.1e181ed547887p+0,
                            -0x1.7d85d3d1ba7c3p-2, 0x1.414441467eba7p-3};
  double n[8];
  fill_normals({42, Stream::qjl_projection, 0}, 8, n);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(n[j], golden[j]) << "j = " << j;
}

TEST(Random, NormalsPrefixAndStreamsIndependent) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  const StreamId id{seed, Stream::qjl_projection, 3};
  std::vector<double> all(101), part(37);
  fill_normals(id, all.size(), all.data());
  fill_normals(id, part.size(), part.data());  // odd count: last pair half used
  for (size_t j = 0; j < part.size(); ++j) EXPECT_EQ(part[j], all[j]) << "j = " << j;
  // Different stream / substream / seed give different numbers.
  for (StreamId other : {StreamId{seed, Stream::dense_rotation, 3},
                         StreamId{seed, Stream::qjl_projection, 4},
                         StreamId{seed ^ 1, Stream::qjl_projection, 3}}) {
    std::vector<double> o(all.size());
    fill_normals(other, o.size(), o.data());
    int same = 0;
    for (size_t j = 0; j < o.size(); ++j) same += o[j] == all[j];
    EXPECT_EQ(same, 0);
  }
}

// det_log's contract (random.hpp): under 4 ulp. The input 0x1.07f74cd4408dbp+0 (2.91 ulp, where
// the roundings of s = (m - 1) / (m + 1) and 2 s p add up) is checked explicitly.
TEST(Random, DetLogMatchesLongDouble) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  EXPECT_EQ(det_log(1.0), 0.0);
  std::vector<double> xs = {1.0, 2.0, 0.5, std::nextafter(1.0, 2.0), std::nextafter(1.0, 0.0),
                            from_bits(1), from_bits(0x000fffffffffffffull),
                            from_bits(0x0010000000000000ull), from_bits(0x7fefffffffffffffull),
                            1.4142135623730951, 0.7071067811865476, 0x1p-53, 1.0 - 0x1p-53,
                            0x1.07f74cd4408dbp+0, 0x1.001036789af1fp+0};
  for (int i = 0; i < 300000; ++i) {
    const uint64_t r = rng();
    switch (i % 4) {
      case 0: xs.push_back(from_bits(r % 0x7ff0000000000000ull)); break;  // any positive finite
      case 1: xs.push_back(from_bits(r & 0x000fffffffffffffull)); break;  // subnormal
      case 2: xs.push_back(1.0 + std::ldexp(double(r >> 11), -53 - int(r % 40)) *
                                     (r & 1 ? 1 : -0.5)); break;          // near 1
      default: xs.push_back((double(r >> 11) + 0.5) * 0x1p-53); break;  // Box–Muller's u1
    }
  }
  double worst_rel = 0, worst_ulp = 0, worst_rel_x = 0, worst_ulp_x = 0;
  for (double x : xs) {
    if (!(x > 0)) continue;
    const long double ref = logl((long double)x);  // 64-bit significand: far below 1 ulp
    const double got = det_log(x);
    if (ref == 0) {
      ASSERT_EQ(got, 0.0);
      continue;
    }
    const long double err = fabsl((long double)got - ref);
    int e;
    std::frexp(double(ref), &e);
    const double ulps = double(err / ldexpl(1.0L, e - 53));
    const double rel = double(err / fabsl(ref));
    if (rel > worst_rel) worst_rel = rel, worst_rel_x = x;
    if (ulps > worst_ulp) worst_ulp = ulps, worst_ulp_x = x;
  }
  char buf[2][64];
  std::snprintf(buf[0], sizeof buf[0], "%a", worst_rel_x);
  std::snprintf(buf[1], sizeof buf[1], "%a", worst_ulp_x);
  EXPECT_LT(worst_rel, 9e-16) << "worst x = " << buf[0];
  EXPECT_LT(worst_ulp, 4.0) << "worst x = " << buf[1];  // the header's contract
}

TEST(Random, DetSincosMatchesLongDouble) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  std::vector<double> us = {0.0, 0.25, 0.5, 0.75, 0.125, std::nextafter(1.0, 0.0),
                            std::nextafter(0.25, 0.0), std::nextafter(0.5, 1.0), 0x1p-60};
  for (int i = 0; i < 300000; ++i) us.push_back(double(rng() >> 11) * 0x1p-53);
  const long double two_pi = 2.0L * 3.141592653589793238462643383279502884L;
  double worst_s = 0, worst_c = 0;
  for (double u : us) {
    double s, c;
    det_sincos_2pi(u, &s, &c);
    const long double a = two_pi * (long double)u;
    worst_s = std::max(worst_s, double(fabsl((long double)s - sinl(a))));
    worst_c = std::max(worst_c, double(fabsl((long double)c - cosl(a))));
  }
  EXPECT_LT(worst_s, 4e-16);
  EXPECT_LT(worst_c, 4e-16);
  double s, c;
  det_sincos_2pi(0.0, &s, &c);
  EXPECT_EQ(s, 0.0);
  EXPECT_EQ(c, 1.0);
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

TEST(Random, NormalsAreStandardNormal) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  const size_t n = 200000;
  std::vector<double> z(n);
  fill_normals({seed, Stream::qjl_projection, uint32_t(seed >> 40)}, n, z.data());
  double sum = 0, sum2 = 0, pair = 0;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(z[i]));
    sum += z[i];
    sum2 += z[i] * z[i];
    if (i % 2 == 0) pair += z[i] * z[i + 1];
  }
  const double mean = sum / double(n);
  const double var = sum2 / double(n) - mean * mean;
  // ~4.5 standard errors each: p ≈ 1e-5, so a failure is a real defect.
  EXPECT_LT(std::abs(mean), 4.5 / std::sqrt(double(n)));
  EXPECT_LT(std::abs(var - 1.0), 4.5 * std::sqrt(2.0 / double(n)));
  EXPECT_LT(std::abs(pair / double(n / 2)), 4.5 / std::sqrt(double(n / 2)));  // Box–Muller pair
  // Kolmogorov–Smirnov: P(√n D > 2.226) ≈ 1e-4.
  std::sort(z.begin(), z.end());
  double d = 0;
  for (size_t i = 0; i < n; ++i) {
    const double f = normal_cdf(z[i]);
    d = std::max({d, f - double(i) / double(n), double(i + 1) / double(n) - f});
  }
  EXPECT_LT(std::sqrt(double(n)) * d, 2.226) << "KS D = " << d;
}

TEST(Random, SignsBalanced) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  const size_t n = 1 << 20;
  std::vector<float> s(n);
  fill_signs({seed, Stream::hadamard_signs, uint32_t(seed)}, n, s.data());
  double sum = 0;
  size_t runs_equal = 0;
  for (size_t j = 0; j < n; ++j) {
    ASSERT_TRUE(s[j] == 1.0f || s[j] == -1.0f);
    sum += s[j];
    if (j > 0) runs_equal += s[j] == s[j - 1];
  }
  EXPECT_LT(std::abs(sum), 4.5 * std::sqrt(double(n)));
  // Neighbours agree half the time (no serial correlation).
  EXPECT_LT(std::abs(double(runs_equal) - 0.5 * double(n - 1)), 4.5 * 0.5 * std::sqrt(double(n)));
}

}  // namespace
}  // namespace tqkv::random
