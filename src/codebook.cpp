#include "tqkv/codebook.hpp"

#include <algorithm>
#include <boost/math/special_functions/beta.hpp>
#include <boost/math/special_functions/gamma.hpp>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>

#include "tqkv/error.hpp"

namespace tqkv {
namespace {

// Integrals of f_d over [a, b] for one dimension d.
struct Density {
  explicit Density(int d)
      : d(d),
        alpha(0.5 * (d - 1)),
        norm_const(boost::math::tgamma_ratio(0.5 * d, 0.5 * (d - 1)) / std::sqrt(M_PI)) {}

  double pdf(double t) const {
    if (t <= -1.0 || t >= 1.0) return 0.0;
    return norm_const * std::exp(0.5 * (d - 3) * log_one_minus_square(t));
  }
  // log(1 − t²) to a few ulps for every |t| < 1. Near ±1, log1p(−t·t) would inherit t·t's
  // rounding as a relative error of ε / (1 − t²) (2 % of random checks at d = 64 failed 1e-11);
  // (1 − t)(1 + t) is exact up to two roundings there.
  static double log_one_minus_square(double t) {
    return std::abs(t) < 0.5 ? std::log1p(-t * t) : std::log((1.0 - t) * (1.0 + t));
  }
  // Mass of [a, b]. Since t² ~ Beta(1/2, (d-1)/2), P(0 <= t <= x) = I_{x²}(1/2, α) / 2 and
  // P(t >= x) = I^c_{x²}(1/2, α) / 2 for x >= 0; each side is taken in the form whose value is
  // small, so the difference of two nearly equal numbers never decides a narrow cell's mass.
  double mass(double a, double b) const {
    if (a < 0 && b > 0) return mass(a, 0.0) + mass(0.0, b);
    if (b <= 0) return mass(-b, -a);
    const double a2 = a * a, b2 = std::min(b * b, 1.0);
    const double central_b = boost::math::ibeta(0.5, alpha, b2);
    if (central_b <= 0.5) return 0.5 * (central_b - boost::math::ibeta(0.5, alpha, a2));
    return 0.5 * (boost::math::ibetac(0.5, alpha, a2) - boost::math::ibetac(0.5, alpha, b2));
  }
  // ∫_a^b t f_d(t) dt = C_d [g(a) − g(b)] / (d − 1), g(t) = (1 − t²)^((d−1)/2). In central
  // cells g(a) ≈ g(b), so the difference is formed as g(a) · (−expm1(α log(g(b)/g(a)) / α)) with
  // log((1 − b²)/(1 − a²)) = log1p((a − b)(a + b) / ((1 − a)(1 + a))): no cancellation.
  double first_moment(double a, double b) const {
    auto g = [&](double t) {
      return (t <= -1.0 || t >= 1.0) ? 0.0 : std::exp(alpha * log_one_minus_square(t));
    };
    if (a <= -1.0 || a >= 1.0) return -norm_const * g(b) / (d - 1);
    const double log_ratio = std::log1p((a - b) * (a + b) / ((1.0 - a) * (1.0 + a)));
    return norm_const * g(a) * -std::expm1(alpha * log_ratio) / (d - 1);
  }
  int d;
  double alpha, norm_const;
};

// 32-point Gauss–Legendre rule on [-1, 1]: nodes by Newton's method on P_32, computed once.
struct GaussLegendre {
  static constexpr int kPoints = 32;
  double node[kPoints], weight[kPoints];
  GaussLegendre() {
    for (int i = 0; i < kPoints; ++i) {
      double x = std::cos(M_PI * (i + 0.75) / (kPoints + 0.5)), dp = 0;
      for (int it = 0; it < 100; ++it) {
        double p0 = 1, p1 = x;  // Legendre recurrence up to P_32 and its derivative
        for (int k = 2; k <= kPoints; ++k) {
          const double p2 = ((2 * k - 1) * x * p1 - (k - 1) * p0) / k;
          p0 = p1;
          p1 = p2;
        }
        dp = kPoints * (x * p1 - p0) / (x * x - 1);
        const double step = p1 / dp;
        x -= step;
        if (std::abs(step) < 1e-16) break;
      }
      node[i] = x;
      weight[i] = 2 / ((1 - x * x) * dp * dp);
    }
  }
};

// ∫_a^b (t − c)² f_d(t) dt. Interior cells, where f_d is analytic, by Gauss–Legendre: no
// cancellation however narrow the cell. The two end cells (which may hold the singularity of
// f_2 at ±1) by the closed forms; they are wide, so their cancellation is harmless.
double cell_squared_error(const Density& f, const Density& f2, double a, double b, double c) {
  if (a <= -1.0 || b >= 1.0) {
    const double second = f.mass(a, b) - f.norm_const / f2.norm_const * f2.mass(a, b);
    return second - 2 * c * f.first_moment(a, b) + c * c * f.mass(a, b);
  }
  static const GaussLegendre rule;
  const double half = 0.5 * (b - a), mid = 0.5 * (a + b);
  double sum = 0;
  for (int i = 0; i < GaussLegendre::kPoints; ++i) {
    const double t = mid + half * rule.node[i];
    sum += rule.weight[i] * (t - c) * (t - c) * f.pdf(t);
  }
  return sum * half;
}

struct CellStats {
  std::vector<double> mass, moment, mean;
};

CellStats cell_stats(const Density& f, const std::vector<double>& edges) {
  const size_t n = edges.size() - 1;
  CellStats s{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
  for (size_t i = 0; i < n; ++i) {
    s.mass[i] = f.mass(edges[i], edges[i + 1]);
    s.moment[i] = f.first_moment(edges[i], edges[i + 1]);
    s.mean[i] = s.mass[i] > 0 ? s.moment[i] / s.mass[i] : 0.5 * (edges[i] + edges[i + 1]);
  }
  return s;
}

std::vector<double> edges_of(const std::vector<double>& c) {
  std::vector<double> e(c.size() + 1);
  e.front() = -1.0;
  e.back() = 1.0;
  for (size_t i = 1; i < c.size(); ++i) e[i] = 0.5 * (c[i - 1] + c[i]);
  return e;
}

bool strictly_inside(const std::vector<double>& c) {
  if (c.front() <= -1.0 || c.back() >= 1.0) return false;
  for (size_t i = 1; i < c.size(); ++i)
    if (!(c[i] > c[i - 1])) return false;
  return true;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// Newton step for F(c) = mean(c) − c = 0. mean_i depends on c_{i−1}, c_i, c_{i+1} through the
// cell edges e_i = (c_{i−1} + c_i) / 2 and e_{i+1}: d mean_i / d e = ± f(e) (e − mean_i) / mass_i.
std::vector<double> newton_step(const Density& f, const std::vector<double>& c,
                                const std::vector<double>& edges, const CellStats& s) {
  const size_t n = c.size();
  std::vector<double> lo(n, 0), diag(n, -1.0), up(n, 0), rhs(n);
  for (size_t i = 0; i < n; ++i) {
    rhs[i] = -(s.mean[i] - c[i]);
    const double d_lower = i > 0 ? f.pdf(edges[i]) * (s.mean[i] - edges[i]) / s.mass[i] : 0.0;
    const double d_upper =
        i + 1 < n ? f.pdf(edges[i + 1]) * (edges[i + 1] - s.mean[i]) / s.mass[i] : 0.0;
    if (i > 0) lo[i] = 0.5 * d_lower;
    if (i + 1 < n) up[i] = 0.5 * d_upper;
    diag[i] += 0.5 * (d_lower + d_upper);
  }
  // Thomas algorithm for the tridiagonal system.
  for (size_t i = 1; i < n; ++i) {
    const double w = lo[i] / diag[i - 1];
    diag[i] -= w * up[i - 1];
    rhs[i] -= w * rhs[i - 1];
  }
  std::vector<double> delta(n);
  delta[n - 1] = rhs[n - 1] / diag[n - 1];
  for (size_t i = n - 1; i-- > 0;) delta[i] = (rhs[i] - up[i] * delta[i + 1]) / diag[i];
  return delta;
}

}  // namespace

double coordinate_density(int dim, double t) {
  TQKV_CHECK(dim >= 2, "coordinate_density: dim must be >= 2, got ", dim);
  return Density(dim).pdf(t);
}

Codebook::Codebook(int dim, int bits) : dim_(dim), bits_(bits) {
  TQKV_CHECK(dim >= 2, "codebook: dimension must be >= 2, got ", dim);
  TQKV_CHECK(bits >= 1 && bits <= 8, "codebook: bits must be in 1..8, got ", bits);
  const Density f(dim);
  const int n = 1 << bits;

  // Start from the high-resolution optimum: point density ∝ f^(1/3), which for f_d is again a
  // symmetric Beta law, with parameter (d + 3) / 6.
  const double a3 = (dim + 3) / 6.0;
  std::vector<double> c(n);
  for (int i = 0; i < n; ++i)
    c[i] = 2.0 * boost::math::ibeta_inv(a3, a3, (i + 0.5) / n) - 1.0;

  constexpr int kMaxIterations = 10000;
  constexpr double kTolerance = 1e-12;
  double move = 1.0;
  int it = 0;
  for (; it < kMaxIterations && move >= kTolerance; ++it) {
    const auto edges = edges_of(c);
    const auto s = cell_stats(f, edges);
    std::vector<double> next = s.mean;  // Lloyd step
    if (it >= 8) {                      // then Newton, kept only when it stays ordered and helps
      const auto delta = newton_step(f, c, edges, s);
      std::vector<double> trial(n);
      for (int i = 0; i < n; ++i) trial[i] = c[i] + delta[i];
      if (strictly_inside(trial) && max_abs(delta) < 0.5 * max_abs(c)) next = trial;
    }
    double m = 0;
    for (int i = 0; i < n; ++i) m = std::max(m, std::abs(next[i] - c[i]));
    move = m / max_abs(next);
    c = std::move(next);
  }
  TQKV_ASSERT(move < kTolerance);
  for (int i = 0; i < n / 2; ++i) {  // the density is symmetric, so is the optimum: enforce it
    const double v = 0.5 * (c[n - 1 - i] - c[i]);
    c[i] = -v;
    c[n - 1 - i] = v;
  }
  iterations_ = it;
  final_move_ = move;
  centroids_ = c;
  boundaries_.resize(n - 1);
  for (int i = 0; i + 1 < n; ++i) boundaries_[i] = 0.5 * (c[i] + c[i + 1]);
  centroids_f32_.assign(c.begin(), c.end());
  boundaries_f32_.assign(boundaries_.begin(), boundaries_.end());
  // The encoder's half-count relies on exact antisymmetry with a boundary at 0.
  for (int i = 0; i + 1 < n; ++i) TQKV_ASSERT(boundaries_f32_[i] == -boundaries_f32_[n - 2 - i]);

  const Density f2(dim + 2);
  const auto edges = edges_of(c);
  double mse = 0;
  for (int i = 0; i < n; ++i) mse += cell_squared_error(f, f2, edges[i], edges[i + 1], c[i]);
  coordinate_mse_ = mse;
}

std::shared_ptr<const Codebook> Codebook::get(int dim, int bits) {
  TQKV_CHECK(dim >= 2, "codebook: dimension must be >= 2, got ", dim);
  TQKV_CHECK(bits >= 1 && bits <= 8, "codebook: bits must be in 1..8, got ", bits);
  static std::mutex mutex;
  static std::map<std::pair<int, int>, std::shared_ptr<const Codebook>> cache;
  std::lock_guard lock(mutex);
  auto& slot = cache[{dim, bits}];
  if (!slot) slot = std::make_shared<const Codebook>(dim, bits);
  return slot;
}

}  // namespace tqkv
