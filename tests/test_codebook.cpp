// Lloyd–Max codebooks: checked against an independent long-double quadrature of f_d.
#include "tqkv/codebook.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/params.hpp"
#include "test_support.hpp"
#include "tqkv/error.hpp"

namespace tqkv {
namespace {

using LD = long double;

const int kDims[] = {2, 3, 5, 64, 96, 128, 256, 1024};

// 20-point Gauss–Legendre nodes and weights on [-1, 1], by Newton iteration in long double.
struct GaussLegendre {
  static constexpr int kN = 20;
  std::array<LD, kN> x{}, w{};
  GaussLegendre() {
    const LD pi = 3.141592653589793238462643383279502884L;
    for (int i = 0; i < kN; ++i) {
      LD z = cosl(pi * (i + 0.75L) / (kN + 0.5L)), dp = 0;
      for (int it = 0; it < 100; ++it) {
        LD p0 = 1, p1 = z;
        for (int k = 2; k <= kN; ++k) {
          const LD p2 = ((2 * k - 1) * z * p1 - (k - 1) * p0) / k;
          p0 = p1;
          p1 = p2;
        }
        dp = kN * (z * p1 - p0) / (z * z - 1);
        const LD dz = p1 / dp;
        z -= dz;
        if (fabsl(dz) < 1e-21L) break;
      }
      x[size_t(i)] = z;
      w[size_t(i)] = 2 / ((1 - z * z) * dp * dp);
    }
  }
  LD rule(const std::function<LD(LD)>& g, LD a, LD b) const {
    const LD h = (b - a) / 2, m = (a + b) / 2;
    LD s = 0;
    for (int i = 0; i < kN; ++i) s += w[size_t(i)] * g(m + h * x[size_t(i)]);
    return s * h;
  }
  // Adaptive: split until both halves agree with the whole to 1e-15 relative, or to `abs_tol`
  // (near ±π/2 the integrand's own rounding, not the rule, limits the agreement).
  LD integrate(const std::function<LD(LD)>& g, LD a, LD b, LD whole, LD abs_tol,
               int depth = 0) const {
    const LD m = (a + b) / 2;
    const LD l = rule(g, a, m), r = rule(g, m, b);
    if (fabsl(l + r - whole) <= std::max(1e-15L * fabsl(l + r), abs_tol)) return l + r;
    if (depth >= 24) {
      ADD_FAILURE() << "quadrature did not converge on [" << double(a) << ", " << double(b) << "]";
      return l + r;
    }
    return integrate(g, a, m, l, abs_tol, depth + 1) + integrate(g, m, b, r, abs_tol, depth + 1);
  }
  LD integrate(const std::function<LD(LD)>& g, LD a, LD b) const {
    const LD whole = rule(g, a, b);
    return integrate(g, a, b, whole, 1e-18L * fabsl(whole));
  }
};

const GaussLegendre& gl() {
  static const GaussLegendre g;
  return g;
}

// f_d written independently in long double.
LD density_const(int d) { return expl(lgammal(d / 2.0L) - lgammal((d - 1) / 2.0L)) / sqrtl(
                                      3.141592653589793238462643383279502884L); }

// ∫_a^b h(t) f_d(t) dt with t = sin θ, which makes the integrand C_d cos^(d-2)(θ) h(sin θ):
// smooth even for d = 2, where f_d has integrable singularities at ±1.
LD integrate_density(int d, LD a, LD b, const std::function<LD(LD)>& h) {
  const LD c = density_const(d);
  auto g = [&](LD th) { return c * powl(cosl(th), d - 2) * h(sinl(th)); };
  return gl().integrate(g, asinl(a), asinl(b));
}

TEST(Codebook, DistortionAtD128MatchesPublishedFigures) {
  const double want[4] = {0.3609, 0.1160, 0.03397, 0.00931};
  for (int b = 1; b <= 4; ++b) {
    const double got = Codebook::get(128, b)->distortion();
    EXPECT_NEAR(got, want[b - 1], 1e-3 * want[b - 1]) << "b = " << b;
  }
}

TEST(Codebook, StructureForAllDimsAndBits) {
  for (int d : kDims)
    for (int b = 1; b <= 8; ++b) {
      SCOPED_TRACE("d = " + std::to_string(d) + " b = " + std::to_string(b));
      const auto cb = Codebook::get(d, b);
      ASSERT_NE(cb, nullptr);
      EXPECT_EQ(cb->dim(), d);
      EXPECT_EQ(cb->bits(), b);
      const auto c = cb->centroids();
      const auto e = cb->boundaries();
      ASSERT_EQ(int(c.size()), 1 << b);
      ASSERT_EQ(int(e.size()), (1 << b) - 1);
      ASSERT_EQ(cb->centroids_f32().size(), c.size());
      ASSERT_EQ(cb->boundaries_f32().size(), e.size());
      const size_t n = c.size();
      EXPECT_GT(c[0], -1.0);
      EXPECT_LT(c[n - 1], 1.0);
      for (size_t i = 0; i < n; ++i) {
        EXPECT_EQ(c[i], -c[n - 1 - i]) << "symmetry, i = " << i;
        if (i > 0) EXPECT_LT(c[i - 1], c[i]);
        EXPECT_EQ(cb->centroids_f32()[i], float(c[i]));
      }
      for (size_t i = 0; i + 1 < n; ++i) {
        EXPECT_EQ(e[i], 0.5 * (c[i] + c[i + 1])) << "midpoint, i = " << i;
        EXPECT_EQ(cb->boundaries_f32()[i], float(e[i]));
        EXPECT_LT(c[i], e[i]);
        EXPECT_LT(e[i], c[i + 1]);
      }
      EXPECT_EQ(e[n / 2 - 1], 0.0);
      EXPECT_LT(cb->final_move(), 1e-12);
      EXPECT_GT(cb->iterations(), 0);
      EXPECT_NEAR(cb->distortion(), d * cb->coordinate_mse(), 1e-15 * cb->distortion());
    }
}

TEST(Codebook, MonotoneAndLowerBound) {
  for (int d : kDims)
    for (int b = 1; b <= 8; ++b) {
      SCOPED_TRACE("d = " + std::to_string(d) + " b = " + std::to_string(b));
      const double D = Codebook::get(d, b)->distortion();
      EXPECT_GT(D, 0.0);
      if (b > 1) {
        const double prev = Codebook::get(d, b - 1)->distortion();
        EXPECT_LT(D, prev);
        EXPECT_GT(D / prev, 0.2);  // roughly 4x per bit, never better than ~5x
        EXPECT_LT(D / prev, 0.35);
      }
      // The 4^-b bound is the high-dimensional (Shannon) one. It does not hold at d = 2: a unit
      // vector in R^2 is one angle, and 2b bits on one angle beat 4^-b (d = 2, b = 1: 0.189).
      // At d = 3 the coordinate is uniform and the bound is met with equality (up to the 1e-10
      // relative error of distortion(), see DimThreeIsUniform).
      if (d >= 3) EXPECT_GE(D, std::pow(4.0, -b) * (1 - 1e-9));
    }
}

TEST(Codebook, DimThreeIsUniform) {
  // f_3 is uniform on [-1, 1] (Archimedes): the optimum is the uniform grid, D = 4^-b exactly.
  for (int b = 1; b <= 8; ++b) {
    const auto cb = Codebook::get(3, b);
    const int n = 1 << b;
    for (int i = 0; i < n; ++i)
      EXPECT_NEAR(cb->centroids()[size_t(i)], -1.0 + (2.0 * i + 1) / n, 1e-12) << b << " " << i;
    // distortion() sums E t² − 2c E t + c² P per cell, which cancels: ~5e-11 relative at b = 8.
    EXPECT_NEAR(cb->distortion(), std::pow(4.0, -b), 1e-9 * std::pow(4.0, -b));
  }
}

TEST(Codebook, DensityMatchesIndependentFormula) {
  std::random_device rd;
  const uint32_t seed = rd();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int d : kDims) {
    const LD c = density_const(d);
    for (int i = 0; i < 200; ++i) {
      const double t = u(rng) * (d > 100 ? 0.3 : 1.0);
      const LD ref = c * powl(1 - (LD)t * t, (d - 3) / 2.0L);
      EXPECT_NEAR(coordinate_density(d, t), double(ref), 1e-11 * double(ref))
          << "d = " << d << " t = " << t;
    }
    EXPECT_EQ(coordinate_density(d, 1.5), 0.0);
    const LD mass = integrate_density(d, -1, 1, [](LD) { return 1.0L; });
    EXPECT_NEAR(double(mass), 1.0, 1e-14) << "d = " << d;
  }
}

// The codebook integrates each interior cell by Gauss–Legendre (no cancellation in narrow
// cells); checked here against an independent adaptive quadrature in long double.
TEST(Codebook, CentroidConditionAndDistortionByQuadrature) {
  for (int d : kDims)
    for (int b = 1; b <= 8; ++b) {
      SCOPED_TRACE("d = " + std::to_string(d) + " b = " + std::to_string(b));
      const auto cb = Codebook::get(d, b);
      const auto c = cb->centroids();
      const auto e = cb->boundaries();
      const size_t n = c.size();
      LD mse = 0, total_mass = 0;
      int bad = 0;
      for (size_t i = 0; i < n; ++i) {
        const LD lo = i == 0 ? -1.0L : e[i - 1], hi = i + 1 == n ? 1.0L : e[i];
        const LD ci = c[i];
        const LD m0 = integrate_density(d, lo, hi, [](LD) { return 1.0L; });
        const LD m1 = integrate_density(d, lo, hi, [](LD t) { return t; });
        const LD m2 = integrate_density(d, lo, hi, [&](LD t) { return (t - ci) * (t - ci); });
        total_mass += m0;
        mse += m2;
        const LD mean = m1 / m0;
        if (fabsl(mean - ci) > 1e-9L * fabsl(ci) && bad++ < 5)
          ADD_FAILURE() << "cell " << i << ": centroid " << c[i] << " but conditional mean "
                        << double(mean) << " (mass " << double(m0) << ")";
      }
      EXPECT_NEAR(double(total_mass), 1.0, 1e-13);
      EXPECT_NEAR(cb->coordinate_mse(), double(mse), 1e-9 * double(mse));
      EXPECT_NEAR(cb->distortion(), double(d * mse), 1e-9 * double(d * mse));
    }
}

TEST(Codebook, InvalidArgumentsThrow) {
  EXPECT_THROW(Codebook::get(1, 4), Error);
  EXPECT_THROW(Codebook::get(0, 4), Error);
  EXPECT_THROW(Codebook::get(-3, 4), Error);
  EXPECT_THROW(Codebook::get(128, 0), Error);
  EXPECT_THROW(Codebook::get(128, 9), Error);
  EXPECT_THROW(Codebook::get(128, -1), Error);
  EXPECT_THROW(Codebook(1, 2), Error);
  EXPECT_THROW(Codebook(64, 9), Error);
  EXPECT_THROW(coordinate_density(1, 0.0), Error);
}

TEST(Codebook, GetCachesAndIsThreadSafe) {
  const auto a = Codebook::get(128, 4);
  const auto b = Codebook::get(128, 4);
  EXPECT_EQ(a.get(), b.get());
  EXPECT_NE(a.get(), Codebook::get(128, 3).get());
  EXPECT_NE(a.get(), Codebook::get(64, 4).get());
  // A not yet cached pair requested concurrently yields one object.
  std::vector<const Codebook*> got(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i)
    threads.emplace_back([&got, i] { got[i] = Codebook::get(77, 6).get(); });
  for (auto& t : threads) t.join();
  for (const auto* p : got) EXPECT_EQ(p, got[0]);
}

// The GPU append's search shortcut (cuda/params.hpp, code_buckets): wherever it is built, a
// value's bucket, computed as the kernel does (one fused multiply-add, rounded down, clamped),
// and one comparison give exactly the count of boundaries below the value, for values spread
// like rotated coordinates, every boundary and its float neighbours, every bucket edge and its
// neighbours, and values far outside.
TEST(Codebook, AppendBucketsCountTheBoundariesBelow) {
  const uint64_t seed = testing::fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  int built = 0;
  for (const int dim : {32, 64, 128, 256}) {
    for (int bits = 1; bits <= 8; ++bits) {
      const auto cb = Codebook::get(dim, bits);
      const auto bd = cb->boundaries_f32();
      const auto b = gpu::code_buckets(bd.data(), bd.size());
      if (bits >= 2 && bits <= 4) EXPECT_TRUE(b.has_value()) << dim << " " << bits;
      if (!b) continue;
      ++built;
      auto bucket = [&](float y) {
        const double at = std::floor(double(std::fmaf(y, b->scale, b->offset)));
        return int(std::clamp(at, 0.0, double(gpu::kBuckets - 1)));
      };
      auto by_buckets = [&](float y) {
        const uint32_t below = b->counts[size_t(bucket(y))];
        return below + (bd[below] < y ? 1u : 0u);
      };
      auto exact = [&](float y) {
        return uint32_t(std::count_if(bd.begin(), bd.end(), [&](float x) { return x < y; }));
      };
      auto with_neighbours = [](float v) {
        return std::array<float, 3>{v, std::nextafter(v, -INFINITY), std::nextafter(v, INFINITY)};
      };
      std::vector<float> ys;
      std::normal_distribution<float> coord(0.0f, 1.0f / std::sqrt(float(dim)));
      for (int i = 0; i < 20000; ++i) ys.push_back(coord(rng) * (i % 4 == 0 ? 4.0f : 1.0f));
      for (const float x : bd)
        for (const float y : with_neighbours(x)) ys.push_back(y);
      // The exact floats where the kernel's bucket steps up (the bucket does not decrease with
      // y, so a bisection over the floats in order finds them), and their neighbours.
      auto order = [](float f) {  // floats in order as integers
        int32_t i;
        std::memcpy(&i, &f, 4);
        return i < 0 ? int64_t(INT32_MIN) - int64_t(i) : int64_t(i);
      };
      auto from_order = [](int64_t o) {
        const int32_t i = o < 0 ? int32_t(int64_t(INT32_MIN) - o) : int32_t(o);
        float f;
        std::memcpy(&f, &i, 4);
        return f;
      };
      const float span = bd.back() - bd.front();
      for (int k = 1; k < gpu::kBuckets; ++k) {
        int64_t lo = order(bd.front() - span), hi = order(bd.back() + span);  // bucket 0, last
        while (hi - lo > 1) {
          const int64_t mid = lo + (hi - lo) / 2;
          (bucket(from_order(mid)) >= k ? hi : lo) = mid;
        }
        ASSERT_EQ(bucket(from_order(hi)), k);
        for (const float y : with_neighbours(from_order(hi))) ys.push_back(y);
      }
      for (const float y : {0.0f, -0.0f, 1.0f, -1.0f, 1e30f, -1e30f}) ys.push_back(y);
      for (const float y : ys) ASSERT_EQ(by_buckets(y), exact(y)) << dim << " " << bits << " " << y;
    }
  }
  EXPECT_GE(built, 12);
}

}  // namespace
}  // namespace tqkv
