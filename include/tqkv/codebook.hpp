// Lloyd–Max codebooks for the coordinates of a randomly rotated unit vector.
//
// A coordinate t of a uniformly random unit vector in R^d has the density
//   f_d(t) = C_d (1 - t^2)^((d-3)/2) on [-1, 1],  C_d = Γ(d/2) / (sqrt(π) Γ((d-1)/2)),
// i.e. (1 + t) / 2 ~ Beta((d-1)/2, (d-1)/2). The codebook of 2^b levels minimises the expected
// squared error E (t - c(t))^2 for that exact density (not its Gaussian limit). Cell masses come
// from the regularized incomplete beta function, first moments in closed form, so every integral
// is accurate to about 1e-15; the fixed point (centroid = conditional mean of its cell) is found
// by Lloyd steps followed by Newton steps on the tridiagonal centroid map, in double precision,
// until no centroid moves by more than 1e-12 times the largest centroid.
#pragma once

#include <memory>
#include <span>
#include <vector>

namespace tqkv {

class Codebook {
 public:
  /// The codebook for dimension `dim` >= 2 and `bits` in 1..8, computed once per process and
  /// shared (thread-safe). Throws tqkv::Error for other arguments.
  static std::shared_ptr<const Codebook> get(int dim, int bits);

  int dim() const { return dim_; }
  int bits() const { return bits_; }
  int levels() const { return 1 << bits_; }

  /// 2^b centroids, ascending, symmetric about 0.
  std::span<const double> centroids() const { return centroids_; }
  /// 2^b - 1 decision boundaries: midpoints of adjacent centroids, ascending.
  std::span<const double> boundaries() const { return boundaries_; }
  /// The same values rounded to float: what encoding and decoding use.
  std::span<const float> centroids_f32() const { return centroids_f32_; }
  std::span<const float> boundaries_f32() const { return boundaries_f32_; }

  /// Expected squared error of one coordinate, E (t - c(t))^2 (Gauss–Legendre per interior
  /// cell, closed form for the end cells; relative accuracy ~1e-13).
  double coordinate_mse() const { return coordinate_mse_; }
  /// Expected ‖u - û‖² for a unit vector u in R^dim: dim * coordinate_mse().
  double distortion() const { return dim_ * coordinate_mse_; }
  /// Lloyd plus Newton iterations the solver took, and its last relative centroid move.
  int iterations() const { return iterations_; }
  double final_move() const { return final_move_; }

  Codebook(int dim, int bits);  // solves; prefer get(), which caches

 private:
  int dim_, bits_;
  std::vector<double> centroids_, boundaries_;
  std::vector<float> centroids_f32_, boundaries_f32_;
  double coordinate_mse_ = 0, final_move_ = 0;
  int iterations_ = 0;
};

/// The coordinate density f_d(t) itself (for tests and plots).
double coordinate_density(int dim, double t);

}  // namespace tqkv
