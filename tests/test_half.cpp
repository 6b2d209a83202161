// float16 / bfloat16 conversions against long-double references.
#include "tqkv/half.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace tqkv {
namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

std::string seed_msg(uint64_t seed) { return "seed = " + std::to_string(seed); }

// Value of float16 bits, computed from the definition (not through float).
long double half_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  long double v = exp == 0 ? ldexpl(mant, -24) : ldexpl(1024 + mant, exp - 25);
  if (exp == 31) v = mant ? NAN : INFINITY;
  return sign ? -v : v;
}

// Round-to-nearest-even float16 of x from a sorted table of all non-negative halves;
// 0x7c00 stands for 2^16 there, so rounding past 65504 gives inf exactly as IEEE says.
uint16_t half_ref(float f) {
  static const std::vector<long double> table = [] {
    std::vector<long double> t;
    for (uint16_t h = 0; h < 0x7c00; ++h) t.push_back(half_value(h));
    t.push_back(65536.0L);
    return t;
  }();
  const long double x = fabsl((long double)f);
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (x >= 65536.0L) return sign | 0x7c00;
  const size_t hi = size_t(std::lower_bound(table.begin(), table.end(), x) - table.begin());
  if (table[hi] == x) return uint16_t(sign | hi);
  const size_t lo = hi - 1;
  const long double dl = x - table[lo], dh = table[hi] - x;
  const size_t pick = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
  return uint16_t(sign | pick);
}

// Round-to-nearest-even bfloat16 of f; 0x7f80 stands for 2^128.
uint16_t bf16_ref(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint16_t lo = uint16_t((x >> 16) & 0x7fffu), hi = uint16_t(lo + 1);
  auto value = [](uint16_t b) {
    return b == 0x7f80 ? ldexpl(1.0L, 128) : (long double)std::bit_cast<float>(uint32_t(b) << 16);
  };
  const long double a = fabsl((long double)f);
  const long double dl = a - value(lo), dh = value(hi) - a;
  if (dl == 0) return sign | lo;
  return sign | (dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi));
}

TEST(Half, AllHalvesRoundTrip) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = uint16_t(i);
    const float f = half_to_float(h);
    const long double ref = half_value(h);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << i;
      ASSERT_TRUE(std::isnan(half_to_float(float_to_half(f)))) << std::hex << i;
      ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << i;
      continue;
    }
    ASSERT_EQ((long double)f, ref) << std::hex << i;
    ASSERT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << i;
    ASSERT_EQ(float_to_half(f), h) << std::hex << i;
  }
}

TEST(Half, FloatToHalfRoundsToNearestEven) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  std::vector<float> xs = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e30f,
                           std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(1.0f, -26),
                           std::ldexp(1.5f, -25), std::ldexp(1.0f, -14), 6.1e-5f,
                           std::numeric_limits<float>::denorm_min(), INFINITY, -INFINITY};
  // Exact midpoints between neighbouring halves (ties), both signs.
  for (int i = 0; i < 20000; ++i) {
    const uint16_t h = uint16_t(rng() % 0x7bff);
    const long double mid = 0.5L * (half_value(h) + half_value(uint16_t(h + 1)));
    xs.push_back(float(rng() & 1 ? mid : -mid));  // exact: halves need 11 bits, midpoints 12
  }
  // Random floats from far below the half subnormals to far above the half range.
  for (int i = 0; i < 1000000; ++i) {
    const uint64_t r = rng();
    const uint32_t exp = uint32_t(127 - 30 + int(r % 50));  // 2^-30 .. 2^19
    const uint32_t bits = (uint32_t(r >> 8) & 0x807fffffu) | (exp << 23);
    xs.push_back(std::bit_cast<float>(i % 16 ? bits : uint32_t(r >> 32)));  // some fully random
  }
  size_t bad = 0;
  for (float f : xs) {
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    const uint16_t got = float_to_half(f), ref = half_ref(f);
    if (got != ref && bad++ < 10)
      ADD_FAILURE() << std::hexfloat << f << ": got " << std::hex << got << " want " << ref;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);  // tie between 65504 and 2^16 rounds to even: inf
  EXPECT_EQ(float_to_half(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);  // tie to even: zero
  EXPECT_EQ(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
}

TEST(Half, AllBf16RoundTrip) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t b = uint16_t(i);
    const float f = bf16_to_float(b);
    EXPECT_EQ(std::bit_cast<uint32_t>(f), uint32_t(b) << 16);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f)))) << std::hex << i;
      continue;
    }
    ASSERT_EQ(float_to_bf16(f), b) << std::hex << i;
  }
}

TEST(Half, FloatToBf16RoundsToNearestEven) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  std::vector<float> xs = {0.0f, -0.0f, std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::denorm_min(), INFINITY, -INFINITY,
                           std::bit_cast<float>(0x7f7f8000u), std::bit_cast<float>(0x7f7f7fffu)};
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t r = uint32_t(rng());
    // Every fourth an exact tie (low half 0x8000).
    xs.push_back(std::bit_cast<float>(i % 4 ? r : (r & 0xffff0000u) | 0x8000u));
  }
  size_t bad = 0;
  for (float f : xs) {
    const uint16_t got = float_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(got)));
      EXPECT_EQ(got & 0x8000, (std::bit_cast<uint32_t>(f) >> 16) & 0x8000);
      continue;
    }
    const uint16_t ref = bf16_ref(f);
    if (got != ref && bad++ < 10)
      ADD_FAILURE() << std::hexfloat << f << ": got " << std::hex << got << " want " << ref;
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x7f7f8000u)), 0x7f80);  // tie to even: inf
  // A NaN whose payload lives only in the low 16 bits must not become inf.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::bit_cast<float>(0x7f800001u)))));
}

}  // namespace
}  // namespace tqkv
