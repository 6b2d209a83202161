// Random rotations: orthogonality, the explicit Hadamard form, inverses, determinism.
#include "tqkv/rotation.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tqkv/error.hpp"

namespace tqkv {
namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

const int kDims[] = {2, 4, 64, 96, 128, 256, 80, 160};

std::vector<float> random_vector(std::mt19937_64& rng, int d, float scale = 1.0f) {
  std::normal_distribution<float> n(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(d));
  for (auto& v : x) v = n(rng);
  return x;
}

double norm(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += double(v) * v;
  return std::sqrt(s);
}

// Sylvester Hadamard entry: (-1)^popcount(i & j).
double hadamard_entry(int i, int j) { return __builtin_popcount(unsigned(i & j)) % 2 ? -1 : 1; }

TEST(Rotation, DenseIsOrthogonal) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  for (int d : kDims) {
    SCOPED_TRACE("d = " + std::to_string(d));
    const Rotation r(RotationKind::dense, d, seed);
    const auto& q = r.matrix();
    ASSERT_EQ(q.size(), size_t(d) * size_t(d));
    double worst = 0;
    for (int i = 0; i < d; ++i)
      for (int j = i; j < d; ++j) {
        double s = 0;
        for (int k = 0; k < d; ++k) s += double(q[size_t(k * d + i)]) * q[size_t(k * d + j)];
        worst = std::max(worst, std::abs(s - (i == j ? 1.0 : 0.0)));
      }
    EXPECT_LT(worst, 1e-5);
  }
}

TEST(Rotation, ForwardMatchesExplicitMatrices) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int d : kDims)
    for (auto kind : {RotationKind::hadamard, RotationKind::dense}) {
      if (kind == RotationKind::hadamard && !is_power_of_two(d)) continue;
      SCOPED_TRACE(std::string(to_string(kind)) + " d = " + std::to_string(d));
      const Rotation r(kind, d, seed, uint32_t(rng() % 4));
      EXPECT_EQ(r.kind(), kind);
      EXPECT_EQ(r.dim(), d);
      // The rotation as an explicit double matrix.
      std::vector<double> m(size_t(d) * size_t(d));
      if (kind == RotationKind::hadamard) {
        ASSERT_EQ(r.signs().size(), size_t(d));
        for (float s : r.signs()) ASSERT_TRUE(s == 1.0f || s == -1.0f);
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j)
            m[size_t(i * d + j)] = hadamard_entry(i, j) * r.signs()[size_t(j)] / std::sqrt(d);
        EXPECT_FLOAT_EQ(r.gain(), float(1 / std::sqrt(double(d))));
      } else {
        for (size_t i = 0; i < m.size(); ++i) m[i] = r.matrix()[i];
        EXPECT_EQ(r.gain(), 1.0f);
      }
      for (int t = 0; t < 5; ++t) {
        const auto x = random_vector(rng, d, t == 0 ? 1e3f : 1.0f);
        const size_t n = static_cast<size_t>(d);
        std::vector<float> y(n), yu(n), back(n);
        r.forward(x.data(), y.data());
        r.forward_unscaled(x.data(), yu.data());
        r.inverse(y.data(), back.data());
        const double nx = norm(x);
        double err_f = 0, err_i = 0, err_t = 0, err_u = 0;
        for (int i = 0; i < d; ++i) {
          double ref = 0, reft = 0;  // (M x)_i and (Mᵀ y)_i in double
          for (int j = 0; j < d; ++j) {
            ref += m[size_t(i * d + j)] * x[size_t(j)];
            reft += m[size_t(j * d + i)] * y[size_t(j)];
          }
          err_f = std::max(err_f, std::abs(y[size_t(i)] - ref));
          err_t = std::max(err_t, std::abs(back[size_t(i)] - reft));
          err_i = std::max(err_i, std::abs(double(back[size_t(i)]) - x[size_t(i)]));
          err_u = std::max(err_u, std::abs(double(yu[size_t(i)]) * r.gain() - y[size_t(i)]));
        }
        EXPECT_LT(err_f, 1e-6 * nx) << "forward vs explicit matrix";
        EXPECT_LT(err_t, 1e-6 * nx) << "inverse vs explicit transpose";
        EXPECT_LT(err_i, 1e-5 * nx) << "inverse(forward(x)) != x";
        EXPECT_LT(err_u, 1e-6 * nx) << "forward_unscaled * gain != forward";
        // In place (x and y the same array) gives the same bits.
        auto z = x;
        r.forward(z.data(), z.data());
        EXPECT_EQ(z, y);
        r.inverse(z.data(), z.data());
        EXPECT_EQ(z, back);
      }
    }
}

TEST(Rotation, HadamardTransformIsSylvester) {
  std::mt19937_64 rng(fresh_seed());
  for (int d : {1, 2, 8, 32, 128}) {
    auto x = random_vector(rng, d);
    const auto x0 = x;
    hadamard_transform(x.data(), d);
    for (int i = 0; i < d; ++i) {
      double ref = 0;
      for (int j = 0; j < d; ++j) ref += hadamard_entry(i, j) * x0[size_t(j)];
      EXPECT_NEAR(x[size_t(i)], ref, 1e-5 * std::sqrt(d) * norm(x0)) << d << " " << i;
    }
  }
  EXPECT_TRUE(is_power_of_two(1));
  EXPECT_TRUE(is_power_of_two(1024));
  EXPECT_FALSE(is_power_of_two(0));
  EXPECT_FALSE(is_power_of_two(96));
  EXPECT_FALSE(is_power_of_two(-4));
}

TEST(Rotation, DeterministicPerSeedAndSubstream) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  for (int d : {4, 96, 128}) {
    const Rotation a(RotationKind::dense, d, seed, 2), b(RotationKind::dense, d, seed, 2);
    const Rotation c(RotationKind::dense, d, seed, 3), e(RotationKind::dense, d, seed + 1, 2);
    EXPECT_EQ(a.matrix(), b.matrix());
    EXPECT_NE(a.matrix(), c.matrix());
    EXPECT_NE(a.matrix(), e.matrix());
    if (!is_power_of_two(d)) continue;
    const Rotation h1(RotationKind::hadamard, d, seed, 2), h2(RotationKind::hadamard, d, seed, 2);
    const Rotation h3(RotationKind::hadamard, d, seed, 3);
    EXPECT_EQ(h1.signs(), h2.signs());
    // Two substreams draw the same d signs with probability 2^-d: compared where that is nil.
    if (d >= 64) EXPECT_NE(h1.signs(), h3.signs());
  }
}

TEST(Rotation, DenseIsHaarOnAverage) {
  // Haar Q has E Q_ij = 0 (var 1/d). Householder QR without the sign fix of diag(R) gives a
  // biased diagonal; 3000 seeds at d = 3, 5 standard errors per entry.
  const uint64_t base = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(base));
  const int d = 3, n = 3000;
  std::vector<double> mean(9, 0.0);
  for (int s = 0; s < n; ++s) {
    const Rotation r(RotationKind::dense, d, base + uint64_t(s));
    for (int i = 0; i < 9; ++i) mean[size_t(i)] += r.matrix()[size_t(i)] / n;
  }
  const double se = std::sqrt(1.0 / d / n);
  for (int i = 0; i < 9; ++i) EXPECT_LT(std::abs(mean[size_t(i)]), 5 * se) << "entry " << i;
}

TEST(Rotation, GoldenDenseDim4Seed1) {
  // Regression goldens (hex floats), computed once with this code: the dense rotation (QR order,
  // sign convention, normals) must never drift silently.
  const Rotation r(RotationKind::dense, 4, 1);
  const float golden[4] = {-0x1.a88df6p-3f, 0x1.b9ef4ap-1f, 0x1.46979cp-2f, 0x1.540a0ep-2f};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r.matrix()[size_t(i)], golden[i]) << "i = " << i;
}

TEST(Rotation, InvalidArgumentsThrow) {
  EXPECT_THROW(Rotation(RotationKind::hadamard, 96, 1), Error);
  EXPECT_THROW(Rotation(RotationKind::hadamard, 80, 1), Error);
  EXPECT_THROW(Rotation(RotationKind::hadamard, 1, 1), Error);
  EXPECT_THROW(Rotation(RotationKind::dense, 1, 1), Error);
  EXPECT_THROW(Rotation(RotationKind::dense, 0, 1), Error);
  try {
    Rotation(RotationKind::hadamard, 96, 1);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("96"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace tqkv
