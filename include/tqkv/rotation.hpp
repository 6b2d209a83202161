// Random rotations Π of R^d: the randomized Hadamard transform (RHT) and a dense Haar-random
// orthogonal matrix. forward() applies Π, inverse() applies Πᵀ of the *same* rotation.
//
// RHT (d a power of two):  Π x = H (s ⊙ x) / sqrt(d),  Πᵀ y = s ⊙ (H y) / sqrt(d), with H the
// Sylvester Hadamard matrix and s random signs. H is applied in place by butterflies in a fixed
// order: stages h = 1, 2, 4, ..., d/2; in stage h each pair (i, i + h) with (i & h) == 0 becomes
// (x_i + x_{i+h}, x_i − x_{i+h}). Every element of a stage is one rounding, so any backend that
// runs the stages in this order reproduces the result bit for bit.
//
// Dense (any d >= 2): Q from the Householder QR of a d×d matrix of i.i.d. N(0, 1) numbers, with
// the signs of diag(R) folded into Q's columns, which makes Q exactly Haar-distributed (Mezzadri
// 2007). Computed in double with plain loops (no BLAS, no SIMD-dependent summation order) and
// rounded to float, so the matrix is identical everywhere; rows are applied with canonical_dot.
#pragma once

#include <cstdint>
#include <vector>

namespace tqkv {

enum class RotationKind : uint8_t { hadamard = 0, dense = 1 };

const char* to_string(RotationKind kind);

class Rotation {
 public:
  /// Random rotation of R^dim, a pure function of (kind, dim, seed, substream). Hadamard needs dim
  /// a power of two (>= 2); dense takes any dim >= 2 (and costs dim² floats twice: Q and Qᵀ).
  Rotation(RotationKind kind, int dim, uint64_t seed, uint32_t substream = 0);

  RotationKind kind() const { return kind_; }
  int dim() const { return dim_; }

  /// y = Π x. `x` and `y` may be the same array.
  void forward(const float* x, float* y) const;
  /// x = Πᵀ y, the exact inverse of forward. `x` and `y` may be the same array.
  void inverse(const float* y, float* x) const;

  /// forward() without its final scale: forward(x) = forward_unscaled(x) * gain(). Lets the codec
  /// fold 1/sqrt(d) into its own per-vector scale (one multiply per coordinate instead of two).
  void forward_unscaled(const float* x, float* y) const;
  float gain() const { return gain_; }

  /// The signs s (Hadamard) or the row-major matrix Q (dense), for backends that apply Π
  /// themselves.
  const std::vector<float>& signs() const { return signs_; }
  const std::vector<float>& matrix() const { return matrix_; }

 private:
  RotationKind kind_;
  int dim_;
  float gain_ = 1.0f;
  std::vector<float> signs_;      // Hadamard
  std::vector<float> matrix_;     // dense Q, row-major
  std::vector<float> transpose_;  // dense Qᵀ, row-major
};

/// In-place unnormalized fast Walsh–Hadamard transform in the fixed stage order described above.
void hadamard_transform(float* x, int n);

bool is_power_of_two(int n);

}  // namespace tqkv
