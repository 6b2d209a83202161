// TurboQuant codecs against a float64 reference, plus the empirical acceptance figures.
#include "tqkv/codec.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "tqkv/bitpack.hpp"
#include "tqkv/codebook.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "tqkv/rotation.hpp"
#include "threads.hpp"

namespace tqkv {
namespace {

constexpr double kPi = 3.14159265358979323846;

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

std::string seed_msg(uint64_t seed) { return "seed = " + std::to_string(seed); }

// n random unit vectors (float64 Gaussian, normalized in float64, then rounded to float).
std::vector<float> unit_vectors(std::mt19937_64& rng, int d, size_t n) {
  std::normal_distribution<double> g;
  std::vector<float> out(n * size_t(d));
  std::vector<double> v(static_cast<size_t>(d));
  for (size_t i = 0; i < n; ++i) {
    double s = 0;
    for (auto& e : v) s += (e = g(rng)) * e;
    const double inv = 1 / std::sqrt(s);
    for (int j = 0; j < d; ++j) out[i * size_t(d) + size_t(j)] = float(v[size_t(j)] * inv);
  }
  return out;
}

// Gaussian vectors with per-vector scales spread over e^-4 .. e^4.
std::vector<float> scaled_vectors(std::mt19937_64& rng, int d, size_t n) {
  std::normal_distribution<float> g;
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> out(n * size_t(d));
  for (size_t i = 0; i < n; ++i) {
    const float s = std::exp(u(rng));
    for (int j = 0; j < d; ++j) out[i * size_t(d) + size_t(j)] = s * g(rng);
  }
  return out;
}

double dot(const float* a, const float* b, int d) {
  double s = 0;
  for (int j = 0; j < d; ++j) s += double(a[j]) * b[j];
  return s;
}

float load_norm(NormFormat f, const uint8_t* p) {
  if (f == NormFormat::f32) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// ---------------------------------------------------------------------------------------------
// Float64 reference encoder / decoder, built only from the codec's public tables.

struct RefGroup {
  ChannelGroup g;
  std::vector<double> m;  // rotation Π as an explicit d×d row-major matrix
  std::vector<double> s;  // QJL matrix S
  std::vector<double> centroids, boundaries;
};

std::vector<RefGroup> reference_tables(const Codec& codec) {
  std::vector<RefGroup> out;
  for (size_t gi = 0; gi < codec.groups().size(); ++gi) {
    RefGroup r;
    r.g = codec.groups()[gi];
    const int d = r.g.dim;
    const auto& rot = codec.rotation(gi);
    EXPECT_EQ(rot.dim(), d);
    r.m.resize(size_t(d) * size_t(d));
    if (rot.kind() == RotationKind::hadamard) {  // H diag(s) / √d, H Sylvester
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j)
          r.m[size_t(i * d + j)] = (__builtin_popcount(unsigned(i & j)) % 2 ? -1.0 : 1.0) *
                                   rot.signs()[size_t(j)] / std::sqrt(double(d));
    } else {
      for (size_t k = 0; k < r.m.size(); ++k) r.m[k] = rot.matrix()[k];
    }
    if (r.g.mse_bits > 0) {
      const auto cb = Codebook::get(d, r.g.mse_bits);
      EXPECT_EQ(codec.codebook(gi), cb.get());
      r.centroids.assign(cb->centroids().begin(), cb->centroids().end());
      r.boundaries.assign(cb->boundaries().begin(), cb->boundaries().end());
    } else {
      EXPECT_EQ(codec.codebook(gi), nullptr);
    }
    if (r.g.qjl) {
      const auto& s = codec.qjl_matrix(gi);
      EXPECT_EQ(s.size(), size_t(d) * size_t(d));
      r.s.assign(s.begin(), s.end());
    }
    out.push_back(std::move(r));
  }
  return out;
}

struct RefStats {
  size_t coords = 0, code_mismatch = 0, signs = 0, sign_mismatch = 0, hard = 0;
};

// Encodes x with `codec`, then checks every record and its decoding against float64.
RefStats check_against_reference(const Codec& codec, const std::vector<float>& x, size_t n) {
  const int d = codec.dim();
  const NormFormat fmt = codec.spec().norm_format;
  std::vector<uint8_t> rec(n * codec.record_bytes());
  codec.encode(x.data(), n, rec.data());
  std::vector<float> dec(n * size_t(d));
  codec.decode(rec.data(), n, dec.data());
  const auto groups = reference_tables(codec);
  const double norm_tol = fmt == NormFormat::f16 ? 0x1p-11 + 1e-6 : 1e-6;
  RefStats st;
  auto hard = [&](const std::string& what) {
    if (st.hard++ < 10) ADD_FAILURE() << what;
  };
  std::vector<double> xhat(static_cast<size_t>(d));
  for (size_t i = 0; i < n; ++i) {
    const float* xi = &x[i * size_t(d)];
    const uint8_t* r = &rec[i * codec.record_bytes()];
    std::fill(xhat.begin(), xhat.end(), 0.0);
    for (const auto& G : groups) {
      const int gd = G.g.dim;
      const size_t gn = size_t(gd);
      std::vector<double> xs(gn), y(gn, 0.0);
      for (size_t j = 0; j < gn; ++j) xs[j] = xi[G.g.channels[j]];
      double nn = 0;
      for (double v : xs) nn += v * v;
      nn = std::sqrt(nn);
      const double stored_n = load_norm(fmt, r + G.g.norm_offset);
      if (std::abs(stored_n - nn) > norm_tol * nn)
        hard("vector " + std::to_string(i) + ": norm " + std::to_string(stored_n) + " vs " +
             std::to_string(nn));
      for (size_t a = 0; a < gn; ++a) {
        for (size_t b = 0; b < gn; ++b) y[a] += G.m[a * gn + b] * xs[b];
        y[a] /= nn;
      }
      std::vector<uint8_t> idx(gn, 0);
      bool codes_match = true;
      if (G.g.mse_bits > 0) {
        unpack_codes(G.g.mse_bits, r + G.g.codes_offset, gn, idx.data());
        for (size_t j = 0; j < gn; ++j) {
          int want = 0;
          bool near = false;
          for (double b : G.boundaries) {
            want += b < y[j];
            near |= std::abs(y[j] - b) < 1e-5;  // relative to ‖u‖ = 1
          }
          ++st.coords;
          if (idx[j] != want) {
            codes_match = false;
            ++st.code_mismatch;
            if (!near)
              hard("vector " + std::to_string(i) + " coord " + std::to_string(j) + ": code " +
                   std::to_string(idx[j]) + " but reference " + std::to_string(want) +
                   " (y = " + std::to_string(y[j]) + ")");
          }
        }
      }
      std::vector<double> v(gn, 0.0);
      for (size_t j = 0; j < gn; ++j) v[j] = G.g.mse_bits > 0 ? G.centroids[idx[j]] : 0.0;
      if (G.g.qjl) {
        const double stored_gamma = load_norm(fmt, r + G.g.gamma_offset);
        const uint8_t* signs = r + G.g.signs_offset;
        if (codes_match) {
          std::vector<double> res(gn);
          double gamma = 0;
          for (size_t j = 0; j < gn; ++j) gamma += (res[j] = y[j] - v[j]) * res[j];
          gamma = std::sqrt(gamma);
          if (std::abs(stored_gamma - gamma) > norm_tol * gamma + 1e-5)
            hard("vector " + std::to_string(i) + ": gamma " + std::to_string(stored_gamma) +
                 " vs " + std::to_string(gamma));
          for (size_t a = 0; a < gn; ++a) {
            double p = 0, sn = 0;
            for (size_t b = 0; b < gn; ++b) {
              p += G.s[a * gn + b] * res[b];
              sn += G.s[a * gn + b] * G.s[a * gn + b];
            }
            const bool bit = (signs[a / 8] >> (a % 8)) & 1;
            ++st.signs;
            if (bit != (p >= 0)) {
              ++st.sign_mismatch;
              if (std::abs(p) >= 1e-5 * std::sqrt(sn))
                hard("vector " + std::to_string(i) + " sign " + std::to_string(a) + " wrong");
            }
          }
        }
        // v += sqrt(π/2)/d · γ · Sᵀ z, from the stored bits.
        const double f = std::sqrt(kPi / 2) / gd * stored_gamma;
        for (size_t a = 0; a < gn; ++a) {
          const double z = (signs[a / 8] >> (a % 8)) & 1 ? 1.0 : -1.0;
          for (size_t b = 0; b < gn; ++b) v[b] += f * z * G.s[a * gn + b];
        }
      }
      for (size_t b = 0; b < gn; ++b) {  // x̂_g = n Πᵀ v
        double s = 0;
        for (size_t a = 0; a < gn; ++a) s += G.m[a * gn + b] * v[a];
        xhat[size_t(G.g.channels[b])] = stored_n * s;
      }
    }
    double xn = 0, err = 0;
    for (int j = 0; j < d; ++j) {
      xn += xhat[size_t(j)] * xhat[size_t(j)];
      err = std::max(err, std::abs(dec[i * size_t(d) + size_t(j)] - xhat[size_t(j)]));
    }
    if (err > 1e-5 * std::sqrt(xn)) hard("vector " + std::to_string(i) + ": decode error " +
                                         std::to_string(err / std::sqrt(xn)));
  }
  return st;
}

struct RefCase {
  const char* name;
  CodecSpec spec;
  bool random_outliers = false;
};

class CodecReference : public ::testing::TestWithParam<RefCase> {};

TEST_P(CodecReference, CodesAndDecodeMatchFloat64) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  CodecSpec spec = GetParam().spec;
  spec.seed = rng();
  if (GetParam().random_outliers) {
    const int d = spec.dim;
    const int k = int(std::lround((spec.bits - std::floor(spec.bits)) * d));
    std::vector<int> all(static_cast<size_t>(d));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    spec.outlier_channels.assign(all.begin(), all.begin() + k);
    std::sort(spec.outlier_channels.begin(), spec.outlier_channels.end());
  }
  const Codec codec(spec);
  const size_t n = 1000;  // above the threading threshold
  const auto x = scaled_vectors(rng, spec.dim, n);
  const RefStats st = check_against_reference(codec, x, n);
  if (GetParam().random_outliers) EXPECT_EQ(codec.groups()[0].channels, spec.outlier_channels);
  EXPECT_EQ(st.hard, 0u);
  EXPECT_LE(double(st.code_mismatch), 1e-3 * double(st.coords)) << st.code_mismatch;
  EXPECT_LE(double(st.sign_mismatch), 1e-3 * double(st.signs)) << st.sign_mismatch;
  if (spec.kind == CodecKind::prod) EXPECT_GT(st.signs, 0u);
}

CodecSpec make_spec(int dim, double bits, CodecKind kind,
                    RotationChoice rot = RotationChoice::automatic,
                    NormFormat fmt = NormFormat::f16) {
  CodecSpec s;
  s.dim = dim;
  s.bits = bits;
  s.kind = kind;
  s.rotation = rot;
  s.norm_format = fmt;
  return s;
}

const auto kMse = CodecKind::mse;
const auto kProd = CodecKind::prod;

INSTANTIATE_TEST_SUITE_P(
    All, CodecReference,
    ::testing::Values(
        RefCase{"mse128b1", make_spec(128, 1, kMse)}, RefCase{"mse128b2", make_spec(128, 2, kMse)},
        RefCase{"mse128b3", make_spec(128, 3, kMse)}, RefCase{"mse128b4", make_spec(128, 4, kMse)},
        RefCase{"mse128b8", make_spec(128, 8, kMse)},
        RefCase{"mse128b4dense32",
                make_spec(128, 4, kMse, RotationChoice::dense, NormFormat::f32)},
        RefCase{"mse256b5", make_spec(256, 5, kMse)},
        RefCase{"mse64b7f32", make_spec(64, 7, kMse, RotationChoice::hadamard, NormFormat::f32)},
        RefCase{"mse96b3", make_spec(96, 3, kMse)},
        RefCase{"prod128b1", make_spec(128, 1, kProd)},
        RefCase{"prod128b2", make_spec(128, 2, kProd)},
        RefCase{"prod128b3", make_spec(128, 3, kProd)},
        RefCase{"prod128b4", make_spec(128, 4, kProd)},
        RefCase{"prod96b3f32", make_spec(96, 3, kProd, RotationChoice::automatic,
                                         NormFormat::f32)},
        RefCase{"mse128b3p5outliers", make_spec(128, 3.5, kMse), true},
        RefCase{"mse96b2p5", make_spec(96, 2.5, kMse)},
        RefCase{"prod128b2p5", make_spec(128, 2.5, kProd)}),
    [](const auto& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------------------------
// Empirical acceptance: measured distortion and inner-product error.

// Mean ‖u − û‖² over n random unit vectors for each codec, in batches of 10 000.
std::vector<double> measured_mse(const std::vector<Codec>& codecs, int d, size_t n,
                                 std::mt19937_64& rng) {
  std::vector<double> sum(codecs.size(), 0.0);
  const size_t batch = 10000;
  std::vector<float> dec(batch * size_t(d));
  std::vector<uint8_t> rec;
  for (size_t done = 0; done < n; done += batch) {
    const size_t m = std::min(batch, n - done);
    const auto u = unit_vectors(rng, d, m);
    for (size_t c = 0; c < codecs.size(); ++c) {
      rec.resize(m * codecs[c].record_bytes());
      codecs[c].encode(u.data(), m, rec.data());
      codecs[c].decode(rec.data(), m, dec.data());
      for (size_t k = 0; k < m * size_t(d); ++k) {
        const double e = double(u[k]) - dec[k];
        sum[c] += e * e;
      }
    }
  }
  for (auto& s : sum) s /= double(n);
  return sum;
}

TEST(CodecAcceptance, MseDistortionD128AndFractional) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  const double bits[] = {1, 2, 3, 4, 2.5, 3.5};
  std::vector<Codec> codecs;
  for (double b : bits) {
    auto s = make_spec(128, b, kMse);
    s.seed = rng();
    codecs.emplace_back(s);
  }
  const auto m = measured_mse(codecs, 128, 100000, rng);
  const double paper[] = {0.3609, 0.1160, 0.03397, 0.00931};
  for (int b = 1; b <= 4; ++b) {
    EXPECT_NEAR(m[size_t(b - 1)], paper[b - 1], 0.01 * paper[b - 1]) << "b = " << b;
    const double D = Codebook::get(128, b)->distortion();
    EXPECT_NEAR(m[size_t(b - 1)], D, 0.01 * D) << "b = " << b;
  }
  EXPECT_LT(m[4], m[1]);  // 2.5 between 2 and 3
  EXPECT_GT(m[4], m[2]);
  EXPECT_LT(m[5], m[2]);  // 3.5 between 3 and 4
  EXPECT_GT(m[5], m[3]);
  std::printf("measured D_mse d=128: b1 %.5f b2 %.5f b3 %.5f b4 %.5f b2.5 %.5f b3.5 %.5f\n", m[0],
              m[1], m[2], m[3], m[4], m[5]);
}

class CodecAcceptanceDim : public ::testing::TestWithParam<int> {};

TEST_P(CodecAcceptanceDim, MseDistortionMatchesCodebook) {
  const int d = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  std::vector<Codec> codecs;
  for (int b = 1; b <= 4; ++b) {
    auto s = make_spec(d, b, kMse);
    s.seed = rng();
    codecs.emplace_back(s);
  }
  const auto m = measured_mse(codecs, d, 100000, rng);
  for (int b = 1; b <= 4; ++b) {
    const double D = Codebook::get(d, b)->distortion();
    EXPECT_NEAR(m[size_t(b - 1)], D, 0.01 * D) << "d = " << d << " b = " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Dims, CodecAcceptanceDim, ::testing::Values(64, 256));

TEST(CodecAcceptance, DenseD96Distortion) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  std::vector<Codec> codecs;
  for (int b : {2, 3}) {
    auto s = make_spec(96, b, kMse);  // automatic rotation: dense at d = 96
    s.seed = rng();
    codecs.emplace_back(s);
    EXPECT_EQ(codecs.back().rotation(0).kind(), RotationKind::dense);
  }
  const auto m = measured_mse(codecs, 96, 50000, rng);
  for (int b : {2, 3}) {
    const double D = Codebook::get(96, b)->distortion();
    EXPECT_NEAR(m[size_t(b - 2)], D, 0.02 * D) << "b = " << b;
  }
}

class CodecAcceptanceProd : public ::testing::TestWithParam<int> {};

TEST_P(CodecAcceptanceProd, InnerProductUnbiasedWithPredictedVariance) {
  const int b = GetParam(), d = 128;
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  auto spec = make_spec(d, b, kProd);
  const size_t n = 100000, batch = 10000;
  double s1 = 0, s2 = 0, sep = 0, spp = 0;
  std::vector<uint8_t> rec(batch * Codec(spec).record_bytes());
  std::vector<float> dec(batch * size_t(d)), ip(batch);
  double worst_ip = 0;
  for (size_t done = 0; done < n; done += batch) {
    // A new seed (Π and S) per batch: the predicted variance is an average over S, and one
    // S alone deviates from it by a few percent.
    spec.seed = rng();
    const Codec codec(spec);
    const auto x = unit_vectors(rng, d, batch);
    const auto q = unit_vectors(rng, d, batch);
    codec.encode(x.data(), batch, rec.data());
    codec.decode(rec.data(), batch, dec.data());
    for (size_t i = 0; i < batch; ++i) {
      const float* qi = &q[i * size_t(d)];
      const double p = dot(qi, &x[i * size_t(d)], d);
      const double e = dot(qi, &dec[i * size_t(d)], d) - p;
      s1 += e;
      s2 += e * e;
      sep += e * p;
      spp += p * p;
    }
    // inner_products() from codes == float64 ⟨q, decode⟩, for one query against the batch.
    codec.inner_products(q.data(), rec.data(), batch, ip.data());
    for (size_t i = 0; i < batch; ++i) {
      const float* xt = &dec[i * size_t(d)];
      const double ref = dot(q.data(), xt, d);
      const double scale = std::sqrt(dot(q.data(), q.data(), d) * dot(xt, xt, d));
      worst_ip = std::max(worst_ip, std::abs(ip[i] - ref) / scale);
    }
  }
  const double mean = s1 / double(n), var = s2 / double(n) - mean * mean;
  const double dprev = b == 1 ? 1.0 : Codebook::get(d, b - 1)->distortion();
  const double want = (kPi / 2 - 1.0 / d) * dprev / d;
  // 4 standard errors (not 3): four bit widths per run would otherwise fail ~1% of runs.
  EXPECT_LT(std::abs(mean), 4 * std::sqrt(var / double(n))) << "mean " << mean;
  EXPECT_NEAR(var, want, 0.1 * want) << "b = " << b;
  // Unbiased given x and q: no trend of e in ⟨q, x⟩ (a wrong QJL scale would show up here).
  const double slope = sep / spp;
  EXPECT_LT(std::abs(slope), 4 * std::sqrt(var / spp)) << "slope " << slope;
  EXPECT_LT(worst_ip, 1e-5);
  std::printf("prod d=128 b=%d: mean %.3g var*d %.5f predicted %.5f slope %.3g\n", b, mean,
              var * d, want * d, slope);
}

INSTANTIATE_TEST_SUITE_P(Bits, CodecAcceptanceProd, ::testing::Values(1, 2, 3, 4));

TEST(Codec, InnerProductsPerQuery) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (double bits : {1.0, 3.0, 2.5}) {
    for (auto kind : {kMse, kProd}) {
      auto spec = make_spec(128, bits, kind);
      spec.seed = rng();
      const Codec codec(spec);
      const size_t n = 300;
      const auto x = scaled_vectors(rng, 128, n);
      const auto q = scaled_vectors(rng, 128, n);
      std::vector<uint8_t> rec(n * codec.record_bytes());
      std::vector<float> dec(n * 128);
      codec.encode(x.data(), n, rec.data());
      codec.decode(rec.data(), n, dec.data());
      for (size_t i = 0; i < n; ++i) {
        float ip;
        codec.inner_products(&q[i * 128], &rec[i * codec.record_bytes()], 1, &ip);
        const double ref = dot(&q[i * 128], &dec[i * 128], 128);
        const double scale = std::sqrt(dot(&q[i * 128], &q[i * 128], 128) *
                                       dot(&dec[i * 128], &dec[i * 128], 128));
        ASSERT_NEAR(ip, ref, 1e-5 * scale) << "bits " << bits << " i " << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Edge cases and errors.

TEST(Codec, ZeroVectorRoundTripsToZero) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (auto kind : {kMse, kProd})
    for (auto fmt : {NormFormat::f16, NormFormat::f32})
      for (double bits : {1.0, 4.0, 3.5}) {
        auto spec = make_spec(128, bits, kind, RotationChoice::automatic, fmt);
        spec.seed = rng();
        const Codec codec(spec);
        const size_t n = 600;
        auto x = scaled_vectors(rng, 128, n);
        for (size_t i : {size_t(0), size_t(5), size_t(599)})
          std::fill(&x[i * 128], &x[i * 128] + 128, 0.0f);
        std::vector<uint8_t> rec(n * codec.record_bytes());
        std::vector<float> dec(n * 128, 1.0f);
        codec.encode(x.data(), n, rec.data());
        codec.decode(rec.data(), n, dec.data());
        std::vector<float> ip(n, 1.0f);
        const auto q = scaled_vectors(rng, 128, 1);
        codec.inner_products(q.data(), rec.data(), n, ip.data());
        for (size_t i : {size_t(0), size_t(5), size_t(599)}) {
          for (int j = 0; j < 128; ++j)
            ASSERT_EQ(dec[i * 128 + size_t(j)], 0.0f)
                << to_string(kind) << " " << to_string(fmt) << " bits " << bits;
          EXPECT_EQ(ip[i], 0.0f);
        }
      }
}

// Expects encode to throw tqkv::Error whose message contains `needle`, leaving `rec` untouched.
void expect_encode_error(const Codec& codec, const void* x, ScalarType t, size_t n,
                         const std::string& needle) {
  std::vector<uint8_t> rec(n * codec.record_bytes(), 0xAB);
  try {
    codec.encode(x, t, n, rec.data());
    ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  EXPECT_EQ(size_t(std::count(rec.begin(), rec.end(), uint8_t(0xAB))), rec.size())
      << "output written before the error";
}

TEST(Codec, NonFiniteInputThrowsNamingVector) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (auto kind : {kMse, kProd})
    for (double bits : {3.0, 2.5}) {
      auto spec = make_spec(128, bits, kind);
      spec.seed = rng();
      const Codec codec(spec);
      const size_t n = 700;  // threaded
      auto x = scaled_vectors(rng, 128, n);
      x[417 * 128 + 3] = NAN;
      x[650 * 128 + 0] = INFINITY;
      expect_encode_error(codec, x.data(), ScalarType::f32, n, "vector 417");
      x[417 * 128 + 3] = 1.0f;
      expect_encode_error(codec, x.data(), ScalarType::f32, n, "vector 650");
      x[650 * 128 + 0] = 0.0f;
      x[5 * 128 + 127] = -INFINITY;
      expect_encode_error(codec, x.data(), ScalarType::f32, n, "vector 5");
      // Half and bfloat16 inputs: NaN / Inf bit patterns.
      std::vector<uint16_t> h(n * 128, 0x3c00);
      h[33 * 128 + 64] = 0x7e00;
      expect_encode_error(codec, h.data(), ScalarType::f16, n, "vector 33");
      h[33 * 128 + 64] = 0x3c00;
      h[34 * 128 + 1] = 0xfc00;  // -inf in f16
      expect_encode_error(codec, h.data(), ScalarType::f16, n, "vector 34");
      h[34 * 128 + 1] = 0x3f80;
      h[35 * 128 + 2] = 0x7f80;  // +inf in bf16
      expect_encode_error(codec, h.data(), ScalarType::bf16, n, "vector 35");
      // A failed batch must not fix the outlier channels of a fractional codec.
      EXPECT_EQ(codec.ready(), bits == 3.0);
    }
}

TEST(Codec, NormOverflowForF16) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (auto kind : {kMse, kProd}) {
    auto spec = make_spec(128, 4, kind);
    spec.seed = rng();
    const size_t n = 600;
    auto x = scaled_vectors(rng, 128, n);
    // Vector 77: 2^17 times a random unit direction u, a norm above float16's 65504.
    std::vector<float> u(128);
    double ss = 0;
    for (int j = 0; j < 128; ++j) ss += double(x[77 * 128 + size_t(j)]) * x[77 * 128 + size_t(j)];
    for (int j = 0; j < 128; ++j) {
      u[size_t(j)] = float(x[77 * 128 + size_t(j)] / std::sqrt(ss));
      x[77 * 128 + size_t(j)] = u[size_t(j)] * 131072.0f;
    }
    expect_encode_error(Codec(spec), x.data(), ScalarType::f32, n, "f32");
    expect_encode_error(Codec(spec), x.data(), ScalarType::f32, n, "vector 77");
    // Float32 norms take it. Scaling by a power of two commutes exactly with every step of
    // encode and decode (rotation, norm, codes, residual), so it decodes to exactly 2^17 times
    // what u decodes to.
    spec.norm_format = NormFormat::f32;
    const Codec codec(spec);
    std::vector<uint8_t> rec(n * codec.record_bytes()), rec_u(codec.record_bytes());
    std::vector<float> dec(n * 128), dec_u(128);
    codec.encode(x.data(), n, rec.data());
    codec.decode(rec.data(), n, dec.data());
    codec.encode(u.data(), 1, rec_u.data());
    codec.decode(rec_u.data(), 1, dec_u.data());
    for (int j = 0; j < 128; ++j)
      ASSERT_EQ(dec[77 * 128 + size_t(j)], dec_u[size_t(j)] * 131072.0f) << j;
    const double cos =
        dot(dec_u.data(), u.data(), 128) / std::sqrt(dot(dec_u.data(), dec_u.data(), 128));
    EXPECT_GT(cos, 0.8);  // and that is u's decode, not noise
  }
}

TEST(Codec, HalfAndBf16InputsMatchWidenedFloats) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  const size_t n = 800;
  const auto x = scaled_vectors(rng, 128, n);
  for (auto type : {ScalarType::f16, ScalarType::bf16})
    for (auto kind : {kMse, kProd})
      for (double bits : {4.0, 3.5}) {
        std::vector<uint16_t> h(x.size());
        std::vector<float> w(x.size());
        for (size_t k = 0; k < x.size(); ++k) {
          h[k] = type == ScalarType::f16 ? float_to_half(x[k]) : float_to_bf16(x[k]);
          w[k] = type == ScalarType::f16 ? half_to_float(h[k]) : bf16_to_float(h[k]);
        }
        auto spec = make_spec(128, bits, kind);
        spec.seed = rng();
        const Codec a(spec), b(spec);  // fractional: each picks outliers from its own input
        std::vector<uint8_t> ra(n * a.record_bytes()), rb(n * b.record_bytes());
        a.encode(h.data(), type, n, ra.data());
        b.encode(w.data(), ScalarType::f32, n, rb.data());
        EXPECT_EQ(ra, rb);
        EXPECT_EQ(a.spec().outlier_channels, b.spec().outlier_channels);
      }
}

TEST(Codec, DeterministicAcrossThreadsAndChunking) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  const size_t n = 3000;
  const auto x = scaled_vectors(rng, 128, n);
  const int previous = set_num_threads(0);
  for (auto kind : {kMse, kProd})
    for (double bits : {3.0, 2.5}) {
      auto spec = make_spec(128, bits, kind);
      spec.seed = rng();
      const size_t rb = Codec(spec).record_bytes();
      std::vector<uint8_t> one(n * rb), all(n * rb), chunks(n * rb);
      std::vector<float> d1(n * 128), dall(n * 128);
      set_num_threads(1);
      EXPECT_EQ(num_threads(), 1);
      const Codec c1(spec);
      c1.encode(x.data(), n, one.data());
      c1.decode(one.data(), n, d1.data());
      set_num_threads(0);
      const Codec call(spec);
      call.encode(x.data(), n, all.data());
      call.decode(all.data(), n, dall.data());
      EXPECT_EQ(one, all);
      EXPECT_EQ(d1, dall);
      // Encoding the same vectors token by token or in chunks gives the same bytes (for a
      // fractional codec once its outlier channels are fixed).
      auto cspec = call.spec();
      const Codec cc(cspec);
      size_t done = 0;
      for (size_t step : {size_t(1), size_t(7), size_t(600), size_t(1)})
        cc.encode(&x[done * 128], step, &chunks[done * rb]), done += step;
      cc.encode(&x[done * 128], n - done, &chunks[done * rb]);
      EXPECT_EQ(chunks, all);
      // Another seed: other codes.
      auto other = cspec;
      other.seed = cspec.seed + 1;
      std::vector<uint8_t> o(n * rb);
      Codec(other).encode(x.data(), n, o.data());
      size_t diff = 0;
      for (size_t k = 0; k < o.size(); ++k) diff += o[k] != all[k];
      EXPECT_GT(double(diff), 0.3 * double(o.size()));
    }
  set_num_threads(previous);
  EXPECT_THROW(set_num_threads(-1), Error);
}

// The default thread count stays within a container's CPU quota: cgroup files of both versions,
// written to a fresh folder, read back as whole CPUs; no quota, or unreadable files, read as 0.
TEST(Codec, CgroupQuotaReadsAsWholeCpus) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("tqkv_cgroup_" + std::to_string(fresh_seed()));
  std::filesystem::create_directories(dir);
  auto write = [&](const char* name, const std::string& text) {
    std::ofstream(dir / name) << text;
  };
  const std::string d = dir.string();
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 0);  // no files
  write("cpu.cfs_quota_us", "-1\n");
  write("cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 0);  // v1, unlimited
  write("cpu.cfs_quota_us", "250000\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 3);  // v1, 2.5 CPUs
  write("cpu.max", "max 100000\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 0);  // v2 wins over v1, unlimited
  write("cpu.max", "200000 100000\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 2);
  write("cpu.max", "5000 100000\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 1);  // a twentieth of a CPU is still one thread
  write("cpu.max", "garbage\n");
  EXPECT_EQ(detail::cgroup_quota_cpus(d), 0);
  std::filesystem::remove_all(dir);
  EXPECT_GE(num_threads(), 1);
}

// Rows with a large common component: per-channel means of a few units, noise of one.
std::vector<float> offset_vectors(std::mt19937_64& rng, int d, size_t n) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> mean(static_cast<size_t>(d)), x(n * size_t(d));
  for (auto& m : mean) m = 4.0f * g(rng);
  for (size_t i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) x[i * size_t(d) + size_t(j)] = mean[size_t(j)] + g(rng);
  return x;
}

TEST(Codec, CenteringEncodesTheRowsLessTheFirstBatchMean) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (auto [d, bits, kind] : {std::tuple{128, 4.0, kMse}, {128, 3.5, kMse}, {64, 3.0, kProd},
                               {96, 2.5, kMse}}) {
    SCOPED_TRACE("d " + std::to_string(d) + " bits " + std::to_string(bits));
    const size_t n = 700;  // above the threading threshold
    const auto x = offset_vectors(rng, d, n);
    auto spec = make_spec(d, bits, kind);
    spec.seed = rng();
    spec.center = true;
    const Codec codec(spec);
    EXPECT_FALSE(codec.ready());
    // The offset: the float64 mean of the batch's rows, rounded to float32.
    std::vector<float> mean(static_cast<size_t>(d));
    for (int j = 0; j < d; ++j) {
      double sum = 0;
      for (size_t i = 0; i < n; ++i) sum += x[i * size_t(d) + size_t(j)];
      mean[size_t(j)] = float(sum / double(n));
    }
    const CodecSpec chosen = codec.calibrated_spec(x.data(), n);
    EXPECT_EQ(chosen.offset, mean);
    EXPECT_FALSE(codec.ready());  // calibrated_spec fixes nothing
    std::vector<uint8_t> rec(n * codec.record_bytes());
    codec.encode(x.data(), n, rec.data());
    ASSERT_TRUE(codec.ready());
    EXPECT_EQ(codec.spec().offset, mean);
    EXPECT_EQ(codec.offset(), mean);
    // Bit for bit the codes of x − μ under the same codec without centering.
    std::vector<float> xc(x.size());
    for (size_t i = 0; i < x.size(); ++i) xc[i] = x[i] - mean[i % size_t(d)];
    CodecSpec plain = codec.spec();
    plain.center = false;
    plain.offset.clear();
    const Codec uncentered(plain);
    std::vector<uint8_t> rec_c(rec.size());
    uncentered.encode(xc.data(), n, rec_c.data());
    EXPECT_EQ(rec, rec_c);
    // Decoding adds μ back: exactly the uncentered decode plus μ.
    std::vector<float> dec(x.size()), dec_c(x.size());
    codec.decode(rec.data(), n, dec.data());
    uncentered.decode(rec.data(), n, dec_c.data());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(dec[i], dec_c[i] + mean[i % size_t(d)]) << i;
    // The common component no longer costs: the error is that of the noise alone, far below the
    // uncentered codec's on the same rows (noise ‖1‖² per channel against ‖4‖² + 1 per channel).
    const Codec raw(plain);
    std::vector<uint8_t> rec_raw(rec.size());
    std::vector<float> dec_raw(x.size());
    raw.encode(x.data(), n, rec_raw.data());
    raw.decode(rec_raw.data(), n, dec_raw.data());
    double err = 0, err_raw = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      err += (double(dec[i]) - x[i]) * (double(dec[i]) - x[i]);
      err_raw += (double(dec_raw[i]) - x[i]) * (double(dec_raw[i]) - x[i]);
    }
    EXPECT_LT(err, 0.25 * err_raw) << err << " vs " << err_raw;
    // Inner products straight from the codes include ⟨q, μ⟩.
    const auto q = scaled_vectors(rng, d, 20);
    for (size_t i = 0; i < 20; ++i) {
      float ip;
      codec.inner_products(&q[i * size_t(d)], &rec[i * codec.record_bytes()], 1, &ip);
      const double ref = dot(&q[i * size_t(d)], &dec[i * size_t(d)], d);
      const double scale = std::sqrt(dot(&q[i * size_t(d)], &q[i * size_t(d)], d) *
                                     dot(&dec[i * size_t(d)], &dec[i * size_t(d)], d));
      ASSERT_NEAR(ip, ref, 1e-5 * scale) << i;
    }
    // A given offset is used as given: ready at once, same records.
    CodecSpec given = codec.spec();
    const Codec fixed(given);
    EXPECT_TRUE(fixed.ready());
    std::vector<uint8_t> rec_f(rec.size());
    fixed.encode(x.data(), n, rec_f.data());
    EXPECT_EQ(rec, rec_f);
  }
}

TEST(Codec, CenteringOffsetsAreChecked) {
  auto spec = make_spec(64, 4, kMse);
  spec.offset.assign(64, 0.5f);
  EXPECT_THROW(Codec{spec}, Error);  // an offset, but center is off
  spec.center = true;
  spec.offset.assign(63, 0.5f);
  EXPECT_THROW(Codec{spec}, Error);  // wrong size
  spec.offset.assign(64, 0.5f);
  spec.offset[7] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(Codec{spec}, Error);
  spec.offset.clear();
  const Codec waiting(spec);
  std::vector<float> out(64);
  std::vector<uint8_t> rec(waiting.record_bytes());
  try {
    waiting.decode(rec.data(), 1, out.data());
    FAIL() << "decode before the offset is chosen must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("offset"), std::string::npos) << e.what();
  }
  EXPECT_THROW(waiting.calibrated_spec(out.data(), 0), Error);  // an empty batch
  // A batch with a non-finite element chooses nothing and is refused; so is one whose centered
  // norm does not fit the float16 norm format (the choice is kept only for a batch it encodes).
  std::vector<float> bad(64 * 3, 1.0f);
  bad[70] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> recs(3 * waiting.record_bytes());
  EXPECT_THROW(waiting.encode(bad.data(), 3, recs.data()), Error);
  EXPECT_FALSE(waiting.ready());
  bad[70] = 1e6f;  // row 1 ends up ~6.7e5 from the mean: above 65504
  try {
    waiting.encode(bad.data(), 3, recs.data());
    FAIL() << "a norm above the float16 format must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("norm"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(waiting.ready());
  std::vector<float> good(64 * 3);
  for (size_t i = 0; i < good.size(); ++i) good[i] = float(i % 7);
  waiting.encode(good.data(), 3, recs.data());
  ASSERT_TRUE(waiting.ready());
  EXPECT_EQ(waiting.offset()[0], float((0 + 1 + 2) / 3.0));  // rows 0..2 start at 0, 1, 2
}

TEST(Codec, OutlierChannelsAreHighestEnergy) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  const size_t n = 2000;
  auto x = scaled_vectors(rng, 128, n);
  for (size_t i = 0; i < n; ++i) {
    const float s = std::abs(x[i * 128]) + 1.0f;  // per-vector scale, similar for all channels
    std::normal_distribution<float> g(0.0f, s);
    for (int j = 0; j < 128; ++j) x[i * 128 + size_t(j)] = g(rng) * (j >= 5 && j <= 68 ? 10 : 1);
  }
  std::vector<int> want(64);
  std::iota(want.begin(), want.end(), 5);
  for (auto kind : {kMse, kProd}) {
    auto spec = make_spec(128, 3.5, kind);
    spec.seed = rng();
    const Codec codec(spec);
    EXPECT_FALSE(codec.ready());
    ASSERT_EQ(codec.groups().size(), 2u);  // sizes are known, channels not yet
    EXPECT_TRUE(codec.groups()[0].channels.empty());
    EXPECT_EQ(codec.calibrated_spec(x.data(), n).outlier_channels, want);
    EXPECT_FALSE(codec.ready());  // calibrated_spec does not fix them
    std::vector<uint8_t> rec(n * codec.record_bytes());
    codec.encode(x.data(), n, rec.data());
    ASSERT_TRUE(codec.ready());
    EXPECT_EQ(codec.spec().outlier_channels, want);
    ASSERT_EQ(codec.groups().size(), 2u);
    EXPECT_EQ(codec.groups()[0].channels, want);
    EXPECT_EQ(codec.groups()[0].bits, 4);
    EXPECT_EQ(codec.groups()[1].bits, 3);
    EXPECT_EQ(codec.groups()[1].dim, 64);
    // A second batch with other statistics does not move them.
    const auto y = scaled_vectors(rng, 128, 600);
    std::vector<uint8_t> rec2(600 * codec.record_bytes());
    codec.encode(y.data(), 600, rec2.data());
    EXPECT_EQ(codec.spec().outlier_channels, want);
  }
  // Explicit channels are used as given.
  auto spec = make_spec(128, 2.5, kMse);
  std::vector<int> chosen;
  for (int c = 0; c < 128; c += 2) chosen.push_back(c);
  spec.outlier_channels = chosen;
  const Codec codec(spec);
  EXPECT_TRUE(codec.ready());
  EXPECT_EQ(codec.groups()[0].channels, chosen);
  std::vector<uint8_t> rec(n * codec.record_bytes());
  codec.encode(x.data(), n, rec.data());
  EXPECT_EQ(codec.spec().outlier_channels, chosen);
}

// calibrated_spec from the batch's statistics (as a GPU cache computes them on the device) gives
// what it gives from the rows, and refuses statistics of the wrong size.
TEST(Codec, CalibrationFromStatisticsMatchesTheRows) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_msg(seed));
  std::mt19937_64 rng(seed);
  for (auto [bits, center] : {std::pair{3.5, true}, {2.5, false}, {4.0, true}}) {
    SCOPED_TRACE("bits " + std::to_string(bits) + (center ? " centering" : ""));
    const int d = 128;
    const size_t n = 300;
    const auto x = offset_vectors(rng, d, n);
    auto spec = make_spec(d, bits, kMse);
    spec.seed = rng();
    spec.center = center;
    const Codec codec(spec);
    std::vector<float> offset;
    if (center) {
      offset.resize(size_t(d));
      for (int j = 0; j < d; ++j) {
        double sum = 0;
        for (size_t i = 0; i < n; ++i) sum += x[i * size_t(d) + size_t(j)];
        offset[size_t(j)] = float(sum / double(n));
      }
    }
    std::vector<double> energy;
    if (bits != std::floor(bits)) {
      energy.assign(size_t(d), 0.0);
      for (size_t i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) {
          const float c = x[i * size_t(d) + size_t(j)] - (center ? offset[size_t(j)] : 0.0f);
          energy[size_t(j)] += double(c) * c;
        }
    }
    const CodecSpec want = codec.calibrated_spec(x.data(), n);
    EXPECT_EQ(codec.calibrated_spec(offset, energy), want);
    EXPECT_FALSE(codec.ready());
    if (center) EXPECT_THROW(codec.calibrated_spec(std::span(offset).first(5), energy), Error);
    if (!energy.empty())
      EXPECT_THROW(codec.calibrated_spec(offset, std::span(energy).first(100)), Error);
  }
}

void expect_spec_error(const CodecSpec& spec, const std::string& needle) {
  try {
    Codec c(spec);
    ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Codec, InvalidSpecsThrowHelpfully) {
  expect_spec_error(make_spec(1, 4, kMse), "dimension");
  expect_spec_error(make_spec(0, 4, kMse), "dimension");
  expect_spec_error(make_spec(128, 0, kMse), "bits");
  expect_spec_error(make_spec(128, 0.5, kMse), "bits");
  expect_spec_error(make_spec(128, 9, kMse), "1..8");
  expect_spec_error(make_spec(128, 10, kProd), "1..9");
  expect_spec_error(make_spec(128, NAN, kMse), "bits");
  expect_spec_error(make_spec(128, 2.3, kMse), "whole number");
  expect_spec_error(make_spec(96, 4, kMse, RotationChoice::hadamard), "power-of-two");
  expect_spec_error(make_spec(96, 2.5, kMse, RotationChoice::hadamard), "power-of-two");
  auto s = make_spec(128, 3.5, kMse);
  s.outlier_channels.resize(64);
  std::iota(s.outlier_channels.begin(), s.outlier_channels.end(), 65);  // 65..128
  expect_spec_error(s, "outside");
  s.outlier_channels.back() = -1;
  expect_spec_error(s, "outside");
  std::iota(s.outlier_channels.begin(), s.outlier_channels.end(), 0);
  s.outlier_channels[10] = 9;
  expect_spec_error(s, "twice");
  s.outlier_channels.resize(10);
  expect_spec_error(s, "needs 64");
  auto t = make_spec(128, 4, kMse);
  t.outlier_channels = {1, 2, 3};
  expect_spec_error(t, "integer");
  // Valid edge: prod at 9 bits, mse at 8, the smallest dimension.
  EXPECT_NO_THROW(Codec(make_spec(128, 9, kProd)));
  EXPECT_NO_THROW(Codec(make_spec(2, 1, kMse)));
  EXPECT_THROW(parse_codec_kind("msee"), Error);
  EXPECT_EQ(parse_rotation_choice("auto"), RotationChoice::automatic);
  EXPECT_EQ(parse_norm_format("f32"), NormFormat::f32);
}

TEST(Codec, RecordLayout) {
  // codes + [signs] + norm + [γ] per group, from codec.hpp.
  auto bytes = [](int d, double bits, CodecKind k, NormFormat f = NormFormat::f16) {
    return Codec(make_spec(d, bits, k, RotationChoice::automatic, f)).record_bytes();
  };
  EXPECT_EQ(bytes(128, 4, kMse), 64u + 2);
  EXPECT_EQ(bytes(128, 4, kMse, NormFormat::f32), 64u + 4);
  EXPECT_EQ(bytes(128, 3, kMse), 48u + 2);
  EXPECT_EQ(bytes(128, 2, kMse), 32u + 2);
  EXPECT_EQ(bytes(128, 4, kProd), 48u + 16 + 2 + 2);  // 3-bit codes + 128 sign bits
  EXPECT_EQ(bytes(128, 1, kProd), 0u + 16 + 2 + 2);   // no codes at all
  EXPECT_EQ(bytes(128, 4, kProd, NormFormat::f32), 48u + 16 + 4 + 4);
  EXPECT_EQ(bytes(96, 3, kMse), 36u + 2);
  // 3.5 bits: 64 ch at 4 (32 B + norm) then 64 at 3 (24 B + norm).
  EXPECT_EQ(bytes(128, 3.5, kMse), 34u + 26);
  // 2.5 prod: 64 ch at 3 (2-bit codes 16 + signs 8 + 4) then 64 at 2 (8 + 8 + 4).
  EXPECT_EQ(bytes(128, 2.5, kProd), 28u + 20);
  auto spec = make_spec(128, 2.5, kProd);
  spec.outlier_channels.resize(64);
  std::iota(spec.outlier_channels.begin(), spec.outlier_channels.end(), 64);
  const Codec c(spec);
  const auto& g = c.groups();
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[0].offset, 0u);
  EXPECT_EQ(g[0].codes_offset, 0u);
  EXPECT_EQ(g[0].signs_offset, 16u);
  EXPECT_EQ(g[0].norm_offset, 24u);
  EXPECT_EQ(g[0].gamma_offset, 26u);
  EXPECT_EQ(g[0].bytes, 28u);
  EXPECT_EQ(g[1].offset, 28u);
  EXPECT_EQ(g[1].signs_offset, 36u);
  EXPECT_EQ(g[1].norm_offset, 44u);
  EXPECT_EQ(g[0].mse_bits, 2);
  EXPECT_EQ(g[1].mse_bits, 1);
  EXPECT_TRUE(g[0].qjl);
  EXPECT_EQ(c.rotation(0).kind(), RotationKind::hadamard);
  EXPECT_EQ(Codec(make_spec(96, 3, kMse)).rotation(0).kind(), RotationKind::dense);
}

}  // namespace
}  // namespace tqkv
