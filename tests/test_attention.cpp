// Fused attention on the compressed cache against the float64 reference over the same codes, and
// against exact attention on the original keys and values.
#include "tqkv/attention.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.hpp"
#include "tqkv/bitpack.hpp"
#include "test_support.hpp"
#include "tqkv/error.hpp"

namespace tqkv {
namespace {

using namespace testing;  // NOLINT: the shared test helpers

// The fused path computes in float32; the reference in float64 from the same codes.
constexpr double kFusedTolerance = 1e-5;

// Keys with a few heavy channels (like real models), values plain Gaussian.
std::vector<float> keys_like(std::mt19937_64& rng, size_t tokens, int heads, int d) {
  auto k = gaussian(rng, tokens * size_t(heads) * size_t(d));
  for (size_t i = 0; i < k.size(); ++i)
    if ((i % size_t(d)) % 17 == 3) k[i] *= 4.0f;
  return k;
}

struct Case {
  int dim;
  double key_bits, value_bits;
  CodecKind key_kind, value_kind;
  RotationChoice rotation;
  int group;  // R
  std::vector<size_t> lengths;
  size_t queries = 1;  // L per sequence
  size_t window = 0;
  int splits = 0;
  int page_tokens = 32;
  bool center = false;  // centering codecs
  float common = 0;     // spread of a component common to every token (keys; values: 2/3 of it)
};

std::string describe(const Case& c) {
  std::string s = "d=" + std::to_string(c.dim) + " K" + to_string(c.key_kind) +
                  std::to_string(c.key_bits) + " V" + to_string(c.value_kind) +
                  std::to_string(c.value_bits) + " rot=" + to_string(c.rotation) +
                  " R=" + std::to_string(c.group) + " L=" + std::to_string(c.queries) +
                  " W=" + std::to_string(c.window) + " splits=" + std::to_string(c.splits) +
                  (c.center ? " centered" : "") + " T=";
  for (size_t t : c.lengths) s += std::to_string(t) + ",";
  return s;
}

struct Built {
  KVCache cache;
  std::vector<SequenceId> seqs;
  std::vector<std::vector<float>> k, v;  // per sequence [T, H, d]
};

Built build(const Case& c, std::mt19937_64& rng, int kv_heads) {
  CacheConfig cfg;
  cfg.layers = 2;
  cfg.kv_heads = kv_heads;
  cfg.head_dim = c.dim;
  cfg.key = {.dim = c.dim, .bits = c.key_bits, .kind = c.key_kind, .rotation = c.rotation,
             .seed = rng()};
  cfg.value = {.dim = c.dim, .bits = c.value_bits, .kind = c.value_kind, .rotation = c.rotation,
               .seed = rng()};
  cfg.key.center = cfg.value.center = c.center;
  cfg.page_tokens = c.page_tokens;
  cfg.max_pages = cfg.pages_for(c.lengths) + 4;
  Built b{KVCache(cfg), {}, {}, {}};
  // A component common to every token, per (head, channel), as real keys and values have.
  const size_t row = size_t(kv_heads) * size_t(c.dim);
  const bool common = c.common > 0;
  const auto key_mean = common ? gaussian(rng, row, c.common) : std::vector<float>(row, 0.0f);
  const auto value_mean =
      common ? gaussian(rng, row, c.common * 2 / 3) : std::vector<float>(row, 0.0f);
  for (size_t T : c.lengths) {
    const SequenceId id = b.cache.add_sequence();
    b.seqs.push_back(id);
    b.k.push_back(keys_like(rng, T, kv_heads, c.dim));
    b.v.push_back(gaussian(rng, T * size_t(kv_heads) * size_t(c.dim)));
    for (size_t i = 0; i < b.k.back().size(); ++i) {
      b.k.back()[i] += key_mean[i % row];
      b.v.back()[i] += value_mean[i % row];
    }
    // Layer 1 is the one attended; append in uneven chunks.
    std::uniform_int_distribution<size_t> chunk(1, 300);
    for (size_t t = 0; t < T;) {
      const size_t n = std::min(T - t, chunk(rng));
      b.cache.append(id, 1, &b.k.back()[t * row], &b.v.back()[t * row], n);
      t += n;
    }
  }
  return b;
}

void check_fused_vs_reference(const Case& c) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed) + " " + describe(c));
  std::mt19937_64 rng(seed);
  const int kv_heads = 2, q_heads = kv_heads * c.group;
  Built b = build(c, rng, kv_heads);
  const std::vector<size_t> queries(c.lengths.size(), c.queries);
  const size_t rows = c.lengths.size() * c.queries;
  // Queries scaled so that scores spread over a few units (softmax neither flat nor one-hot).
  const auto q = gaussian(rng, rows * size_t(q_heads) * size_t(c.dim), 0.5f);
  AttentionOptions opt;
  opt.window = c.window;
  opt.splits = c.splits;
  auto fused = poisoned(q.size()), ref = poisoned(q.size());
  attend(b.cache, 1, b.seqs, queries, q.data(), q_heads, fused.data(), opt);
  attend_reference(b.cache, 1, b.seqs, queries, q.data(), q_heads, ref.data(), opt);
  for (float x : fused) ASSERT_TRUE(std::isfinite(x));
  const double err = relative_error(fused, ref);
  if (std::getenv("TQKV_TEST_VERBOSE")) std::printf("%.3g  %s\n", err, describe(c).c_str());
  EXPECT_LE(err, kFusedTolerance);
}

// The matrix of the issue, covered so that every (dim, bits, K codec, V codec, rotation) meets
// every R and T over the run, without the full product.
TEST(AttentionMatrix, FusedMatchesReferenceDecode) {
  const int dims[] = {64, 96, 128, 256};
  const double bits[] = {1, 2, 3, 4, 8, 2.5, 3.5};
  const size_t lengths[] = {1, 17, 1000, 5000};
  int k = 0;
  for (int d : dims)
    for (double b : bits)
      for (int kinds = 0; kinds < 4; ++kinds)
        for (RotationChoice rot : {RotationChoice::hadamard, RotationChoice::dense}) {
          const CodecKind kk = kinds & 1 ? CodecKind::prod : CodecKind::mse;
          const CodecKind vk = kinds & 2 ? CodecKind::prod : CodecKind::mse;
          if (rot == RotationChoice::hadamard && d == 96) continue;  // not a power of two
          // Prod at b bits uses b − 1 MSE bits; 8-bit prod keeps the 8-bit budget.
          Case c{d, b, b, kk, vk, rot, k % 2 ? 4 : 1, {lengths[size_t(k) % 4]}};
          if (k % 3 == 0) c.lengths.push_back(lengths[size_t(k + 1) % 4]);  // a batch
          ++k;
          check_fused_vs_reference(c);
          if (HasFatalFailure()) return;
        }
}

TEST(AttentionMatrix, KeyAndValueBitsIndependent) {
  for (double kb : {2.5, 3.0, 4.0})
    for (double vb : {2.0, 3.5, 4.0})
      check_fused_vs_reference({128, kb, vb, CodecKind::mse, CodecKind::mse,
                                RotationChoice::automatic, 4, {300, 77}});
}

TEST(AttentionMatrix, PrefillTiles) {
  for (size_t L : {1, 7, 64})
    for (CodecKind kind : {CodecKind::mse, CodecKind::prod}) {
      check_fused_vs_reference({128, 3.5, 4, kind, CodecKind::mse, RotationChoice::automatic, 4,
                                {L + 200, L}, L});
      check_fused_vs_reference(
          {96, 3, 2.5, CodecKind::mse, kind, RotationChoice::dense, 1, {L + 1000}, L});
    }
}

TEST(AttentionMatrix, SplitsAndWindows) {
  for (int splits : {1, 2, 3, 7})
    for (size_t window : {size_t(0), size_t(1), size_t(50), size_t(999)})
      check_fused_vs_reference({128, 4, 4, CodecKind::mse, CodecKind::prod,
                                RotationChoice::automatic, 4, {1000, 33}, 5, window, splits});
}

// Centered keys (ignored by the fused path: softmax does not see a common shift of the scores)
// and centered values (their offset added to the output) against the reference, which decodes
// both with their offsets.
TEST(AttentionMatrix, CenteredKeysAndValues) {
  for (auto [d, bits] : {std::pair{128, 4.0}, {128, 3.5}, {64, 2.0}, {96, 3.0}})
    for (CodecKind kind : {CodecKind::mse, CodecKind::prod}) {
      Case c{d, bits, bits, kind, CodecKind::mse, RotationChoice::automatic, 4, {1000, 33}};
      c.center = true;
      c.common = 3.0f;
      check_fused_vs_reference(c);
      c.queries = 5;
      c.window = 50;
      c.splits = 3;
      check_fused_vs_reference(c);
    }
}

TEST(AttentionMatrix, PageSizes) {
  for (int page : {8, 16, 64, 256})
    check_fused_vs_reference({64, 2, 3, CodecKind::prod, CodecKind::mse,
                              RotationChoice::automatic, 2, {700, 5}, 3, 0, 0, page});
}

TEST(Attention, DenseAndDequantizedMatchReference) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Case c{128, 4, 4, CodecKind::mse, CodecKind::mse, RotationChoice::automatic, 4, {900, 2000}};
  Built b = build(c, rng, 2);
  const int q_heads = 8;
  const auto q = gaussian(rng, 2 * q_heads * 128, 0.5f);
  auto fallback = poisoned(q.size()), ref = poisoned(q.size());
  attend_dequantized(b.cache, 1, b.seqs, q.data(), q_heads, fallback.data());
  const std::vector<size_t> ones(2, 1);
  attend_reference(b.cache, 1, b.seqs, ones, q.data(), q_heads, ref.data());
  EXPECT_LE(relative_error(fallback, ref), kFusedTolerance);

  // Dense attention over the original K/V ([T, H, d] → [H, T, d]) against a float64 loop.
  std::vector<std::vector<float>> kt(2), vt(2);
  std::vector<DenseKV> dense;
  for (size_t s = 0; s < 2; ++s) {
    const size_t T = c.lengths[s];
    kt[s].resize(T * 2 * 128);
    vt[s].resize(T * 2 * 128);
    for (size_t t = 0; t < T; ++t)
      for (size_t h = 0; h < 2; ++h)
        for (size_t j = 0; j < 128; ++j) {
          kt[s][(h * T + t) * 128 + j] = b.k[s][(t * 2 + h) * 128 + j];
          vt[s][(h * T + t) * 128 + j] = b.v[s][(t * 2 + h) * 128 + j];
        }
    dense.push_back({kt[s].data(), vt[s].data(), T});
  }
  auto out = poisoned(q.size());
  attend_dense(dense, 2, 128, q.data(), q_heads, out.data());
  std::vector<float> exact(q.size());
  for (size_t s = 0; s < 2; ++s)
    for (size_t hq = 0; hq < size_t(q_heads); ++hq) {
      const size_t h = hq / 4, T = c.lengths[s];
      const float* qr = &q[(s * q_heads + hq) * 128];
      std::vector<double> sc(T);
      double mx = -1e300, l = 0;
      for (size_t t = 0; t < T; ++t) {
        double dot = 0;
        for (size_t j = 0; j < 128; ++j) dot += double(qr[j]) * kt[s][(h * T + t) * 128 + j];
        sc[t] = dot / std::sqrt(128.0);
        mx = std::max(mx, sc[t]);
      }
      std::vector<double> o(128, 0.0);
      for (size_t t = 0; t < T; ++t) {
        const double e = std::exp(sc[t] - mx);
        l += e;
        for (size_t j = 0; j < 128; ++j) o[j] += e * vt[s][(h * T + t) * 128 + j];
      }
      for (size_t j = 0; j < 128; ++j) exact[(s * q_heads + hq) * 128 + j] = float(o[j] / l);
    }
  EXPECT_LE(relative_error(out, exact), kFusedTolerance);
}

// Exact decode attention (dense, float32 accumulation checked elsewhere) on the original keys
// and values of b's first sequence ([T, H, d] → [H, T, d]).
std::vector<float> exact_decode(const Built& b, const std::vector<float>& q, int q_heads) {
  const int H = b.cache.config().kv_heads, d = b.cache.config().head_dim;
  const size_t T = b.k[0].size() / size_t(H * d), row = size_t(H) * size_t(d);
  std::vector<float> kt(b.k[0].size()), vt(kt.size());
  for (size_t t = 0; t < T; ++t)
    for (size_t h = 0; h < size_t(H); ++h)
      for (size_t j = 0; j < size_t(d); ++j) {
        kt[(h * T + t) * size_t(d) + j] = b.k[0][t * row + h * size_t(d) + j];
        vt[(h * T + t) * size_t(d) + j] = b.v[0][t * row + h * size_t(d) + j];
      }
  const DenseKV dense{kt.data(), vt.data(), T};
  std::vector<float> exact(q.size());
  attend_dense({&dense, 1}, H, d, q.data(), q_heads, exact.data());
  return exact;
}

// Against exact attention on the original K/V: the error falls with bits, by roughly the
// distortion ratio (each extra bit divides the MSE by ~4, the error norm by ~2).
TEST(Attention, ErrorShrinksWithBits) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::vector<double> errors;
  for (double bits : {1.0, 2.0, 3.0, 4.0, 8.0}) {
    std::mt19937_64 rng(seed);  // same data at every width
    Case c{128, bits, bits, CodecKind::mse, CodecKind::mse, RotationChoice::automatic, 4, {2000}};
    Built b = build(c, rng, 2);
    const auto q = gaussian(rng, 8 * 128, 0.5f);
    std::vector<float> fused(q.size());
    attend_decode(b.cache, 1, b.seqs, q.data(), 8, fused.data());
    errors.push_back(relative_error(fused, exact_decode(b, q, 8)));
  }
  for (size_t i = 0; i + 1 < errors.size(); ++i) {
    SCOPED_TRACE("bits step " + std::to_string(i));
    EXPECT_LT(errors[i + 1], errors[i] * (i + 2 < errors.size() ? 0.75 : 0.1));
  }
  EXPECT_LT(errors[3], 0.15);  // 4 bits: near-lossless on these scores
}

// On keys and values with a common component, centering codecs bring the error against exact
// attention down to what the same codecs make of the rest.
TEST(Attention, CenteringLowersTheErrorOnACommonComponent) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  // Summed over four draws: one decode's error varies from draw to draw, their sum less.
  double errors[2] = {0.0, 0.0};
  for (bool center : {false, true})
    for (uint64_t draw = 0; draw < 4; ++draw) {
      std::mt19937_64 rng(seed + draw);  // the same data for both
      Case c{128, 3.0, 3.0, CodecKind::mse, CodecKind::mse, RotationChoice::automatic, 4, {2000}};
      c.center = center;
      c.common = 3.0f;
      Built b = build(c, rng, 2);
      const auto q = gaussian(rng, 8 * 128, 0.5f);
      auto fused = poisoned(q.size());
      attend_decode(b.cache, 1, b.seqs, q.data(), 8, fused.data());
      errors[center] += relative_error(fused, exact_decode(b, q, 8));
    }
  // Keys of spread 3 + noise 1 per channel: centering removes ~9/10 of their energy.
  EXPECT_LT(errors[1], 0.5 * errors[0]) << errors[1] << " vs " << errors[0];
}

// Every SIMD kernel against the scalar reference kernel, for every width.
TEST(AttentionKernels, SimdMatchesScalar) {
  if (!cpu::isa_available(cpu::Isa::avx2)) GTEST_SKIP() << "no AVX2 on this CPU";
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (cpu::Isa isa : {cpu::Isa::avx2, cpu::Isa::avx512}) {
  if (!cpu::isa_available(isa)) continue;
  SCOPED_TRACE(cpu::to_string(isa));
  for (int bits = 1; bits <= 8; ++bits)
    for (int dim : {8, 16, 64, 96, 256})
      for (int rows : {1, 3, 4, 9}) {
        SCOPED_TRACE("bits " + std::to_string(bits) + " dim " + std::to_string(dim) + " rows " +
                     std::to_string(rows));
        const int tokens = 13;
        const size_t stride = packed_bytes(bits, size_t(dim)) + 5;
        std::vector<uint8_t> codes(size_t(tokens) * stride);
        for (auto& c : codes) c = uint8_t(rng());
        const cpu::CodeRun run{codes.data(), stride, tokens, dim};
        const auto table = gaussian(rng, size_t(1) << bits);
        const auto q = gaussian(rng, size_t(rows) * size_t(dim));
        const auto w = gaussian(rng, size_t(rows) * 16);
        std::vector<float> s1(size_t(rows) * 16, -7.0f), s2 = s1;
        cpu::code_kernels(bits, cpu::Isa::scalar).scores(run, table.data(), q.data(), rows,
                                                         s1.data(), 16);
        cpu::code_kernels(bits, isa).scores(run, table.data(), q.data(), rows,
                                                       s2.data(), 16);
        for (size_t i = 0; i < s1.size(); ++i)
          ASSERT_NEAR(s1[i], s2[i], 1e-4 * (1 + std::abs(s1[i]))) << i;
        const auto acc0 = gaussian(rng, size_t(rows) * size_t(dim + 3));
        std::vector<float> a1 = acc0, a2 = acc0;
        cpu::code_kernels(bits, cpu::Isa::scalar).accumulate(run, table.data(), w.data(), 16,
                                                             rows, a1.data(), size_t(dim + 3));
        cpu::code_kernels(bits, isa).accumulate(run, table.data(), w.data(), 16,
                                                           rows, a2.data(), size_t(dim + 3));
        for (size_t i = 0; i < a1.size(); ++i)
          ASSERT_NEAR(a1[i], a2[i], 1e-4 * (1 + std::abs(a1[i]))) << i;
        std::vector<float> e1(size_t(tokens) * size_t(dim), -7.0f), e2 = e1;
        cpu::code_kernels(bits, cpu::Isa::scalar).expand(run, table.data(), e1.data());
        cpu::code_kernels(bits, isa).expand(run, table.data(), e2.data());
        ASSERT_EQ(e1, e2);  // a lookup is exact
      }
  }
  // exp: relative error within a few float ulps, and exp(−inf) = 0 exactly.
  std::vector<float> x(1003);
  std::uniform_real_distribution<float> u(-100.0f, 0.0f);
  for (auto& e : x) e = u(rng);
  x[5] = -std::numeric_limits<float>::infinity();
  x[6] = 0.0f;
  std::vector<float> y = x;
  cpu::float_kernels(cpu::Isa::avx2).exp(y.data(), int(y.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(double(x[i]));
    if (want < 1e-37) {
      EXPECT_LE(y[i], 1e-37f);
    } else {
      EXPECT_NEAR(y[i], want, 4e-7 * want) << x[i];
    }
  }
  EXPECT_EQ(y[5], 0.0f);
  EXPECT_EQ(y[6], 1.0f);
}

TEST(AttentionErrors, BadInputIsRejectedAndOutputUntouched) {
  std::mt19937_64 rng(fresh_seed());
  Case c{64, 4, 4, CodecKind::mse, CodecKind::mse, RotationChoice::automatic, 2, {40}};
  Built b = build(c, rng, 2);
  auto q = gaussian(rng, 4 * 64);
  std::vector<float> out(q.size(), 123.0f);
  auto fails = [&](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    for (float x : out) ASSERT_EQ(x, 123.0f);
  };
  const std::vector<SequenceId> missing = {b.seqs[0] + 100};
  fails([&] { attend_decode(b.cache, 1, missing, q.data(), 4, out.data()); }, "does not exist");
  fails([&] { attend_decode(b.cache, 1, b.seqs, q.data(), 3, out.data()); }, "multiple");
  fails([&] { attend_decode(b.cache, 7, b.seqs, q.data(), 4, out.data()); }, "layer 7");
  fails([&] { attend_decode(b.cache, 0, b.seqs, q.data(), 4, out.data()); }, "fewer than");
  const std::vector<size_t> too_many = {41};
  fails([&] { attend(b.cache, 1, b.seqs, too_many, q.data(), 4, out.data()); }, "fewer than");
  AttentionOptions bad_scale;
  bad_scale.scale = -1;
  fails([&] { attend_decode(b.cache, 1, b.seqs, q.data(), 4, out.data(), bad_scale); },
        "scale");
  q[70] = std::numeric_limits<float>::quiet_NaN();
  fails([&] { attend_decode(b.cache, 1, b.seqs, q.data(), 4, out.data()); }, "non-finite");
}

}  // namespace
}  // namespace tqkv
