#include "tqkv/rotation.hpp"

#include <cmath>

#include "tqkv/error.hpp"
#include "tqkv/random.hpp"
#include "tqkv/reduce.hpp"

namespace tqkv {

const char* to_string(RotationKind kind) {
  return kind == RotationKind::hadamard ? "hadamard" : "dense";
}

bool is_power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

void hadamard_transform(float* x, int n) {
  int h = 1;
  if (n >= 8) {
    // Stages h = 1, 2, 4 touch only 8 consecutive elements: run them on one block of 8 at a time,
    // in registers. Each element still gets the same additions in the same stage order.
    for (int i = 0; i < n; i += 8) {
      float v[8];
      for (int k = 0; k < 8; ++k) v[k] = x[i + k];
      for (int s = 1; s < 8; s *= 2)
        for (int k = 0; k < 8; ++k)
          if ((k & s) == 0) {
            const float a = v[k], b = v[k + s];
            v[k] = a + b;
            v[k + s] = a - b;
          }
      for (int k = 0; k < 8; ++k) x[i + k] = v[k];
    }
    h = 8;
  } else {
    for (; h < n; h *= 2)  // n = 2 or 4
      for (int i = 0; i < n; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float a = x[j], b = x[j + h];
          x[j] = a + b;
          x[j + h] = a - b;
        }
    return;
  }
  for (; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; j += 8)  // h >= 8: fixed 8-wide blocks vectorize
        for (int k = j; k < j + 8; ++k) {
          const float a = x[k], b = x[k + h];
          x[k] = a + b;
          x[k + h] = a - b;
        }
}

namespace {

// Haar-random orthogonal matrix (row-major, double): Householder QR of a Gaussian matrix G = QR,
// then Q ← Q · diag(sign(R_ii)).
std::vector<double> haar_orthogonal(int d, uint64_t seed, uint32_t substream) {
  const size_t n = size_t(d);
  std::vector<double> a(n * n);  // G, row-major; reduced to R in place
  random::fill_normals({seed, random::Stream::dense_rotation, substream}, n * n, a.data());
  std::vector<double> q(n * n, 0.0);  // accumulates Q = H_0 H_1 ... H_{d-2}
  for (size_t i = 0; i < n; ++i) q[i * n + i] = 1.0;
  std::vector<double> v(n);
  std::vector<double> r_diag_sign(n, 1.0);
  for (size_t k = 0; k < n; ++k) {
    double norm2 = 0;
    for (size_t i = k; i < n; ++i) norm2 += a[i * n + k] * a[i * n + k];
    const double norm = std::sqrt(norm2);
    const double alpha = a[k * n + k] > 0 ? -norm : norm;  // R_kk = alpha
    r_diag_sign[k] = alpha < 0 ? -1.0 : 1.0;
    if (k + 1 == n || norm == 0) continue;  // the last column needs no reflection
    // v = x − alpha e_1, reflection H = I − 2 v vᵀ / (vᵀ v).
    double vv = 0;
    for (size_t i = k; i < n; ++i) {
      v[i] = a[i * n + k] - (i == k ? alpha : 0.0);
      vv += v[i] * v[i];
    }
    if (vv == 0) continue;
    for (size_t j = k; j < n; ++j) {  // A ← H A
      double dot = 0;
      for (size_t i = k; i < n; ++i) dot += v[i] * a[i * n + j];
      const double f = 2.0 * dot / vv;
      for (size_t i = k; i < n; ++i) a[i * n + j] -= f * v[i];
    }
    for (size_t r = 0; r < n; ++r) {  // Q ← Q H
      double dot = 0;
      for (size_t i = k; i < n; ++i) dot += q[r * n + i] * v[i];
      const double f = 2.0 * dot / vv;
      for (size_t i = k; i < n; ++i) q[r * n + i] -= f * v[i];
    }
  }
  // The last diagonal element of R is what remains in A.
  r_diag_sign[n - 1] = a[(n - 1) * n + (n - 1)] < 0 ? -1.0 : 1.0;
  for (size_t r = 0; r < n; ++r)
    for (size_t c = 0; c < n; ++c) q[r * n + c] *= r_diag_sign[c];
  return q;
}

}  // namespace

Rotation::Rotation(RotationKind kind, int dim, uint64_t seed, uint32_t substream)
    : kind_(kind), dim_(dim) {
  TQKV_CHECK(dim >= 2, "rotation: dimension must be >= 2, got ", dim);
  const size_t n = size_t(dim);
  if (kind == RotationKind::hadamard) {
    TQKV_CHECK(is_power_of_two(dim), "rotation: the Hadamard rotation needs a power-of-two "
               "dimension, got ", dim, " (use the dense rotation)");
    signs_.resize(n);
    random::fill_signs({seed, random::Stream::hadamard_signs, substream}, n, signs_.data());
    gain_ = float(1.0 / std::sqrt(double(dim)));
    return;
  }
  TQKV_CHECK(kind == RotationKind::dense, "rotation: unknown kind ", int(kind));
  TQKV_CHECK(dim <= 16384, "rotation: dense rotation of dimension ", dim, " is too large");
  const auto q = haar_orthogonal(dim, seed, substream);
  matrix_.resize(n * n);
  transpose_.resize(n * n);
  for (size_t r = 0; r < n; ++r)
    for (size_t c = 0; c < n; ++c) {
      matrix_[r * n + c] = float(q[r * n + c]);
      transpose_[c * n + r] = float(q[r * n + c]);
    }
}

void Rotation::forward_unscaled(const float* x, float* y) const {
  const size_t n = size_t(dim_);
  if (kind_ == RotationKind::hadamard) {
    for (size_t i = 0; i < n; ++i) y[i] = x[i] * signs_[i];
    hadamard_transform(y, dim_);
    return;
  }
  std::vector<float> tmp(x, x + n);  // x and y may alias
  for (size_t r = 0; r < n; ++r) y[r] = canonical_dot(&matrix_[r * n], tmp.data(), n);
}

void Rotation::forward(const float* x, float* y) const {
  forward_unscaled(x, y);
  if (gain_ != 1.0f)
    for (int i = 0; i < dim_; ++i) y[i] *= gain_;
}

void Rotation::inverse(const float* y, float* x) const {
  const size_t n = size_t(dim_);
  if (kind_ == RotationKind::hadamard) {
    if (x != y) std::copy(y, y + n, x);
    hadamard_transform(x, dim_);
    for (size_t i = 0; i < n; ++i) x[i] = x[i] * gain_ * signs_[i];
    return;
  }
  std::vector<float> tmp(y, y + n);
  for (size_t r = 0; r < n; ++r) x[r] = canonical_dot(&transpose_[r * n], tmp.data(), n);
}

}  // namespace tqkv
