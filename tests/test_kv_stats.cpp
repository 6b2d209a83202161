// The codecs on real keys and values: the ones the pretrained model produces (when
// tools/fetch-model.sh has fetched it) against random data and against the codebook's theory.
#include "kv_stats.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "tqkv/codebook.hpp"
#include "tqkv/error.hpp"
#include "tqkv/llama.hpp"
#include "tqkv/onnx.hpp"

namespace tqkv::cli {
namespace {

uint32_t fresh_seed() { return std::random_device{}(); }

// Means over 64 rotation seeds. The distortion of a fixed vector under a random rotation is
// skewed to the right (rare rotations put a coordinate past the outermost centroid), and a
// head's keys are strongly correlated, so few seeds understate the mean and its standard error
// together (8 seeds: 9 standard errors low, now and then). With 64 the mean is close to normal;
// 6 standard errors then happen by chance with probability ~1e-8 per row.
constexpr int kSeeds = 64;
constexpr double kTolerance = 6.0;
// float32 arithmetic of rotation and decode: far below this share of the distortion.
constexpr double kRounding = 1e-3;

bool matches(const Distortion& d, double expected) {
  return std::abs(d.mean - expected) <= kTolerance * d.std_error + kRounding * expected;
}

TEST(KvStats, ChannelAndNormStatistics) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  const int dim = 8;
  const size_t n = 500;
  std::vector<float> x(n * dim);
  for (size_t i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) x[i * dim + size_t(j)] = g(rng) * (j == 3 ? 20.0f : 1.0f);
  const ChannelStats c = channel_stats(x, dim);
  ASSERT_EQ(c.mean_abs.size(), size_t(dim));
  std::vector<double> want(dim, 0.0);
  for (size_t i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) want[size_t(j)] += std::abs(double(x[i * dim + size_t(j)])) / n;
  for (int j = 0; j < dim; ++j) EXPECT_NEAR(c.mean_abs[size_t(j)], want[size_t(j)], 1e-12);
  EXPECT_EQ(c.outliers, std::vector<int>{3});
  // E|N(0, 1)| = sqrt(2/π): the median channel's, and 20 times that for channel 3.
  EXPECT_NEAR(c.median, std::sqrt(2 / M_PI), 0.1);
  EXPECT_NEAR(c.max_ratio, 20.0, 3.0);
  const NormStats s = norm_stats(std::vector<float>{3, 4, 0, 0, 0, 1, 0, 0}, 4);
  EXPECT_DOUBLE_EQ(s.mean, 3.0);
  EXPECT_DOUBLE_EQ(s.min, 1.0);
  EXPECT_DOUBLE_EQ(s.max, 5.0);
  EXPECT_THROW(norm_stats(std::vector<float>(5), 4), Error);
}

// On isotropic random vectors every quantizer meets the codebook's distortion, rotated or not:
// the check that the measurements themselves are right.
TEST(KvStats, RandomDataMeetsTheory) {
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  for (int bits : {2, 4}) {
    const int dim = 64;
    std::vector<float> x(2000 * dim);
    for (auto& v : x) v = g(rng) * 3.0f;
    const double theory = Codebook::get(dim, bits)->distortion();
    CodecSpec spec;
    spec.dim = dim;
    spec.bits = bits;
    spec.seed = rng();
    spec.norm_format = NormFormat::f32;
    for (RotationChoice r : {RotationChoice::hadamard, RotationChoice::dense}) {
      spec.rotation = r;
      const Distortion d = codec_distortion(spec, x, kSeeds);
      EXPECT_TRUE(matches(d, theory))
          << to_string(r) << " " << bits << " bits: " << d.mean << " +- " << d.std_error
          << ", theory " << theory;
    }
    const Distortion u = unrotated_distortion(x, dim, bits);
    EXPECT_TRUE(matches(u, theory)) << bits << " bits: " << u.mean << " +- " << u.std_error;
  }
}

// The real model's keys and values on a sequence it sampled: norms the f16 norm format holds,
// keys with outlier channels, and TurboQuant's distortion on them the same as on random data
// (dense Haar rotation: exactly data-independent), where a quantizer without the rotation is far
// off. The randomized Hadamard transform is not Haar: on these keys its distortion is lower than
// on random data, never higher.
TEST(KvStats, RealKeysAndValuesMeetRandomDataDistortion) {
  const std::filesystem::path path = std::filesystem::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!std::filesystem::exists(path))
    GTEST_SKIP() << path << " is absent: run tools/fetch-model.sh to fetch it";
  const uint32_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  const onnx::Model file = onnx::read(path);
  const Llama model(file, LlamaOptions{.quantize_activations = false});
  const LlamaConfig& c = model.config();
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> seq = model.sample(256, rng);
  DenseKvStore store(c.layers, c.kv_heads, c.head_dim);
  model.forward(seq, store);
  std::vector<std::vector<float>> keys, values;
  for (int l = 0; l < c.layers; ++l) {
    keys.emplace_back(store.keys(l).begin(), store.keys(l).end());
    values.emplace_back(store.values(l).begin(), store.values(l).end());
  }
  const int bits = 4;
  const auto rows = kv_stats(keys, values, c.kv_heads, c.head_dim, bits, kSeeds);
  ASSERT_EQ(rows.size(), size_t(2 * c.layers * c.kv_heads));
  std::vector<int> layers_with_key_outliers(size_t(c.layers), 0);
  for (const KvStatsRow& r : rows) {
    SCOPED_TRACE(std::string(r.keys ? "keys" : "values") + " of layer " + std::to_string(r.layer) +
                 ", KV head " + std::to_string(r.head));
    EXPECT_EQ(r.vectors, seq.size());
    EXPECT_GT(r.norms.min, 6.1e-5);  // float16 normal range: the stored norm keeps its precision
    EXPECT_LT(r.norms.max, 65504.0);
    EXPECT_TRUE(matches(r.dense, r.theory))
        << "dense: " << r.dense.mean << " +- " << r.dense.std_error << ", theory " << r.theory;
    EXPECT_LE(r.hadamard.mean, r.theory + kTolerance * r.hadamard.std_error + kRounding * r.theory)
        << "Hadamard: " << r.hadamard.mean << " +- " << r.hadamard.std_error;
    if (r.keys && !r.channels.outliers.empty()) {
      layers_with_key_outliers[size_t(r.layer)] = 1;
      EXPECT_GT(r.unrotated.mean, r.theory + kTolerance * r.unrotated.std_error)
          << "no rotation: " << r.unrotated.mean << " +- " << r.unrotated.std_error;
    }
  }
  for (int l = 0; l < c.layers; ++l)
    EXPECT_TRUE(layers_with_key_outliers[size_t(l)]) << "no key outlier channel in layer " << l;
}

}  // namespace
}  // namespace tqkv::cli
