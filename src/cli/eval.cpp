#include "eval.hpp"

#include <cmath>

#include "tqkv/codebook.hpp"
#include "tqkv/random.hpp"

namespace tqkv::cli {
namespace {

// The TurboQuant paper's rounded MSE figures for a unit vector (Theorem 1), b = 1..4.
double paper_mse(double bits) {
  static const double kFigures[] = {0.36, 0.117, 0.03, 0.009};
  const int b = int(bits);
  return (double(b) == bits && b >= 1 && b <= 4) ? kFigures[b - 1] : 0.0;
}

void random_unit_vectors(uint64_t seed, uint32_t substream, size_t n, int d,
                         std::vector<float>& out) {
  std::vector<double> g(n * size_t(d));
  random::fill_normals({seed, random::Stream::synthetic_data, substream}, g.size(), g.data());
  out.resize(g.size());
  for (size_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < d; ++j) s += g[i * d + j] * g[i * d + j];
    const double inv = 1.0 / std::sqrt(s);
    for (int j = 0; j < d; ++j) out[i * d + j] = float(g[i * d + j] * inv);
  }
}

}  // namespace

double theoretical_mse(const Codec& codec) {
  // For isotropic data a group holds a share dim_g / d of a unit vector's energy. Prod adds the
  // QJL error of the residual r: u − x̃ = r − r̃ and E‖r̃ − r‖² = γ² (π/2 − 1/d_g), so
  // D_prod = D_mse(b − 1) (π/2 − 1/d_g).
  double total = 0;
  for (size_t g = 0; g < codec.groups().size(); ++g) {
    const auto& grp = codec.groups()[g];
    const Codebook* cb = codec.codebook(g);
    const double d_mse = cb ? cb->distortion() : 1.0;  // no MSE bits: û = 0, residual = u
    const double qjl = grp.qjl ? M_PI / 2 - 1.0 / grp.dim : 1.0;
    total += double(grp.dim) / codec.dim() * d_mse * qjl;
  }
  return total;
}

DistortionRow measure_distortion(const CodecSpec& spec, size_t samples, uint64_t data_seed) {
  Codec codec(spec);
  const int d = spec.dim;
  std::vector<float> x, q;
  random_unit_vectors(data_seed, 0, samples, d, x);
  random_unit_vectors(data_seed, 1, samples, d, q);
  std::vector<uint8_t> rec(samples * codec.record_bytes());
  // Encode and decode in one batch each: the codec threads over vectors.
  codec.encode(x.data(), samples, rec.data());
  std::vector<float> xh(x.size());
  codec.decode(rec.data(), samples, xh.data());

  DistortionRow row;
  row.spec = codec.spec();
  row.record_bytes = codec.record_bytes();
  row.compression_vs_fp16 = 2.0 * d / double(row.record_bytes);
  double mse = 0, e_sum = 0, e_sq = 0;
  for (size_t i = 0; i < samples; ++i) {
    double err = 0, ip = 0, ip_hat = 0;
    for (int j = 0; j < d; ++j) {
      const double diff = double(x[i * d + j]) - xh[i * d + j];
      err += diff * diff;
      ip += double(q[i * d + j]) * x[i * d + j];
      ip_hat += double(q[i * d + j]) * xh[i * d + j];
    }
    mse += err;
    e_sum += ip_hat - ip;
    e_sq += (ip_hat - ip) * (ip_hat - ip);
  }
  const double n = double(samples);
  row.mse = mse / n;
  row.ip_bias = e_sum / n;
  const double var = e_sq / n - row.ip_bias * row.ip_bias;
  row.ip_bias_stderr = std::sqrt(var / n);
  row.ip_var_d = var * d;
  row.lower_bound = std::pow(4.0, -spec.bits);
  row.mse_theory = theoretical_mse(codec);
  if (spec.kind == CodecKind::mse) {
    row.mse_paper = paper_mse(spec.bits);
  } else {
    // Var⟨q, x̃ − u⟩ = E γ_g² E‖q_g‖² (π/2 − 1/d_g) / d_g per group; with shares dim_g / d of
    // both energies, d · Var = Σ_g (dim_g / d) D_mse,g(b − 1) (π/2 − 1/d_g).
    for (size_t g = 0; g < codec.groups().size(); ++g) {
      const auto& grp = codec.groups()[g];
      const Codebook* cb = codec.codebook(g);
      row.ip_var_d_theory += double(grp.dim) / d * (cb ? cb->distortion() : 1.0) *
                             (M_PI / 2 - 1.0 / grp.dim);
    }
  }
  return row;
}

}  // namespace tqkv::cli
