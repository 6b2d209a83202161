#include "tqkv/random.hpp"

#include <bit>
#include <cmath>

#include "tqkv/error.hpp"

namespace tqkv::random {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments

// 1 / (2k + 1) and 1 / n! as compile-time doubles: every compiler rounds these the same way.
template <int N>
constexpr std::array<double, N> odd_reciprocals() {
  std::array<double, N> r{};
  for (int k = 0; k < N; ++k) r[k] = 1.0 / double(2 * k + 1);
  return r;
}
template <int N>
constexpr std::array<double, N> inverse_factorials() {
  std::array<double, N> r{};
  double f = 1.0;
  for (int k = 0; k < N; ++k) {
    if (k > 0) f *= double(k);
    r[k] = 1.0 / f;
  }
  return r;
}
constexpr auto kOdd = odd_reciprocals<13>();
constexpr auto kInvFact = inverse_factorials<26>();
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 split so that e * kLn2Hi is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kHalfPi = 1.57079632679489661923;

// 53-bit uniform in (0, 1) from two words: never 0, so its log is finite.
double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (uint64_t(hi) << 21) ^ (uint64_t(lo) >> 11);  // 53 bits
  return (double(bits) + 0.5) * 0x1p-53;
}

}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kWeyl0;
      k[1] += kWeyl1;
    }
    const uint64_t p0 = uint64_t(kMul0) * c[0];
    const uint64_t p1 = uint64_t(kMul1) * c[2];
    c = {uint32_t(p1 >> 32) ^ c[1] ^ k[0], uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k[1],
         uint32_t(p0)};
  }
  return c;
}

static std::array<uint32_t, 4> block(const StreamId& id, uint64_t b) {
  return philox4x32_10({uint32_t(b), uint32_t(b >> 32), id.substream, uint32_t(id.stream)},
                       {uint32_t(id.seed), uint32_t(id.seed >> 32)});
}

uint32_t word(const StreamId& id, uint64_t i) { return block(id, i / 4)[i % 4]; }

void fill_signs(const StreamId& id, size_t n, float* out) {
  for (size_t j = 0; j < n; j += 32) {
    const uint32_t w = word(id, j / 32);
    for (size_t b = 0; b < 32 && j + b < n; ++b) out[j + b] = ((w >> b) & 1u) ? -1.0f : 1.0f;
  }
}

double det_log(double x) {
  TQKV_ASSERT(x > 0 && std::isfinite(x));
  int e = 0;
  uint64_t bits = std::bit_cast<uint64_t>(x);
  if ((bits >> 52) == 0) {  // subnormal: scale into the normal range first (exact)
    bits = std::bit_cast<uint64_t>(x * 0x1p54);
    e = -54;
  }
  e += int(bits >> 52) - 1023;
  double m = std::bit_cast<double>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  if (m > 1.4142135623730951) {  // keep m in [sqrt(1/2), sqrt(2)) so the series converges fast
    m *= 0.5;
    ++e;
  }
  // log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1), |s| < 0.172.
  const double s = (m - 1.0) / (m + 1.0);
  const double z = s * s;
  double p = kOdd[kOdd.size() - 1];
  for (int k = int(kOdd.size()) - 2; k >= 0; --k) p = std::fma(p, z, kOdd[k]);
  const double log_m = 2.0 * s * p;
  return std::fma(double(e), kLn2Hi, std::fma(double(e), kLn2Lo, log_m));
}

void det_sincos_2pi(double u, double* sin_out, double* cos_out) {
  TQKV_ASSERT(u >= 0.0 && u < 1.0);
  // 2πu = quadrant * π/2 + a, a in [0, π/2). 4u and its fraction are exact in double.
  const double v = 4.0 * u;
  const int quadrant = int(v);
  const double a = (v - double(quadrant)) * kHalfPi;
  const double a2 = a * a;
  double sin_p = kInvFact[25], cos_p = kInvFact[24];  // Taylor series in a^2, highest term first
  for (int k = 23; k >= 1; k -= 2) sin_p = std::fma(sin_p, -a2, kInvFact[k]);
  for (int k = 22; k >= 0; k -= 2) cos_p = std::fma(cos_p, -a2, kInvFact[k]);
  const double s = sin_p * a, c = cos_p;
  switch (quadrant) {
    case 0: *sin_out = s, *cos_out = c; break;
    case 1: *sin_out = c, *cos_out = -s; break;
    case 2: *sin_out = -s, *cos_out = -c; break;
    default: *sin_out = -c, *cos_out = s; break;
  }
}

void fill_normals(const StreamId& id, size_t n, double* out) {
  for (size_t j = 0; j < n; j += 2) {
    const auto w = block(id, j / 2);
    const double u1 = uniform53(w[0], w[1]);
    const double u2 = uniform53(w[2], w[3]);
    const double r = std::sqrt(-2.0 * det_log(u1));
    double s, c;
    det_sincos_2pi(u2 >= 1.0 ? 0.0 : u2, &s, &c);
    out[j] = r * c;
    if (j + 1 < n) out[j + 1] = r * s;
  }
}

}  // namespace tqkv::random
