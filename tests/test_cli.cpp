// The command-line tool, run in-process: round trips through files, JSON output, and errors that
// name the argument or file at fault.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "cli.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/cache.hpp"
#include "tqkv/codebook.hpp"
#include "tqkv/codec.hpp"
#include "tqkv/device.hpp"
#include "tqkv/file.hpp"
#include "tqkv/npy.hpp"

namespace fs = std::filesystem;

namespace {

struct Result {
  int status;
  std::string out, err;
};

Result run(std::vector<std::string> args) {
  std::ostringstream out, err;
  const int status = tqkv::cli::run(args, out, err);
  return {status, out.str(), err.str()};
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    dir_ = fs::temp_directory_path() /
           ("tqkv_cli_" + std::to_string(seed_) + "_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<float> write_random(const std::string& name, size_t n, size_t d,
                                  tqkv::npy::DType type = tqkv::npy::DType::f32) {
    std::mt19937 rng(seed_);
    std::normal_distribution<float> normal;
    std::vector<float> x(n * d);
    for (auto& v : x) v = normal(rng);
    const size_t shape[2] = {n, d};
    tqkv::npy::write(path(name), x, shape, type);
    return tqkv::npy::read(path(name)).data;  // as stored (f16 rounds)
  }
  // A random array of any shape (1..3 dims), written to `name`; returns the stored values.
  std::vector<float> write_array(const std::string& name, std::vector<size_t> shape,
                                 uint32_t salt) {
    std::mt19937 rng(seed_ + salt);
    std::normal_distribution<float> normal;
    size_t n = 1;
    for (size_t s : shape) n *= s;
    std::vector<float> x(n);
    for (auto& v : x) v = normal(rng);
    tqkv::npy::write(path(name), x, shape);
    return x;
  }
  uint32_t seed_ = 0;
  fs::path dir_;
};

double relative_difference(const std::vector<float>& x, const std::vector<float>& ref) {
  EXPECT_EQ(x.size(), ref.size());
  double err = 0, norm = 0;
  for (size_t i = 0; i < x.size() && i < ref.size(); ++i) {
    err += (double(x[i]) - ref[i]) * (double(x[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  return std::sqrt(err / norm);
}

TEST_F(CliTest, QuantizeInfoDequantizeRoundTrip) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const char* bits : {"4", "3.5", "2"}) {
    for (const char* codec : {"mse", "prod"}) {
      SCOPED_TRACE(std::string(bits) + " " + codec);
      const auto x = write_random("x.npy", 300, 128, tqkv::npy::DType::f16);
      auto r = run({"quantize", "--in", path("x.npy"), "--out", path("x.tqkv"), "--bits", bits,
                    "--codec", codec, "--seed", "99"});
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_NE(r.out.find("300 vectors"), std::string::npos) << r.out;

      r = run({"info", path("x.tqkv"), "--json"});
      ASSERT_EQ(r.status, 0) << r.err;
      const auto info = nlohmann::json::parse(r.out);
      EXPECT_EQ(info["count"], 300);
      EXPECT_EQ(info["codec"]["seed"], 99);
      EXPECT_EQ(info["codec"]["kind"], codec);
      const auto ev = tqkv::file::read_encoded(path("x.tqkv"));
      EXPECT_EQ(info["record_bytes"], ev.record_bytes);
      EXPECT_NEAR(info["compression_vs_fp16"].get<double>(), 256.0 / ev.record_bytes, 1e-12);

      r = run({"dequantize", "--in", path("x.tqkv"), "--out", path("y.npy")});
      ASSERT_EQ(r.status, 0) << r.err;
      const auto y = tqkv::npy::read(path("y.npy"));
      ASSERT_EQ(y.shape, (std::vector<size_t>{300, 128}));
      // The file decodes to exactly what the codec decodes from the same records.
      std::vector<float> expect(x.size());
      tqkv::Codec(ev.spec).decode(ev.records.data(), ev.count, expect.data());
      EXPECT_EQ(y.data, expect);
      double err = 0, norm = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        err += (x[i] - y.data[i]) * double(x[i] - y.data[i]);
        norm += double(x[i]) * x[i];
      }
      EXPECT_LT(err / norm, std::string(codec) == "mse" ? 0.12 : 0.6);
    }
  }
  auto r = run({"info", path("x.tqkv")});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("bytes per vector"), std::string::npos);
}

// quantize --center: the file carries the batch's mean, info says so, and vectors that share a
// large component come back with far less error than without it.
TEST_F(CliTest, QuantizeCenterStoresTheOffset) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::mt19937 rng(seed_);
  std::normal_distribution<float> normal;
  const size_t n = 400, d = 64;
  std::vector<float> common(d), x(n * d);
  for (auto& c : common) c = 5.0f * normal(rng);
  for (size_t i = 0; i < x.size(); ++i) x[i] = common[i % d] + normal(rng);
  const size_t shape[2] = {n, d};
  tqkv::npy::write(path("c.npy"), x, shape, tqkv::npy::DType::f32);
  double errs[2];
  for (bool center : {false, true}) {
    std::vector<std::string> args = {"quantize", "--in", path("c.npy"), "--out", path("c.tqkv"),
                                     "--bits", "3"};
    if (center) args.push_back("--center");
    auto r = run(args);
    ASSERT_EQ(r.status, 0) << r.err;
    r = run({"info", path("c.tqkv")});
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out.find("centered") != std::string::npos, center) << r.out;
    const auto ev = tqkv::file::read_encoded(path("c.tqkv"));
    EXPECT_EQ(ev.spec.offset.size(), center ? d : 0u);
    r = run({"dequantize", "--in", path("c.tqkv"), "--out", path("c_hat.npy")});
    ASSERT_EQ(r.status, 0) << r.err;
    errs[center] = relative_difference(tqkv::npy::read(path("c_hat.npy")).data, x);
  }
  EXPECT_LT(errs[1], 0.4 * errs[0]) << errs[1] << " vs " << errs[0];
}

TEST_F(CliTest, ErrorsNameTheCulprit) {
  write_random("x.npy", 10, 64);
  auto r = run({"quantize", "--in", path("missing.npy"), "--out", path("o.tqkv"), "--bits", "4"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("missing.npy"), std::string::npos) << r.err;

  r = run({"quantize", "--in", path("x.npy"), "--out", path("o.tqkv"), "--bits", "four"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--bits"), std::string::npos) << r.err;

  r = run({"quantize", "--in", path("x.npy"), "--out", path("o.tqkv"), "--bits", "4",
           "--codec", "zip"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("zip"), std::string::npos) << r.err;

  r = run({"quantize", "--in", path("x.npy"), "--out", path("o.tqkv"), "--bits", "12"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("bits"), std::string::npos) << r.err;

  r = run({"quantize", "--in", path("x.npy"), "--bits", "4"});  // --out missing
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("--out"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(path("o.tqkv")));

  // NaN input: the error names the file and the vector, and no output file appears.
  std::vector<float> bad(4 * 64, 1.0f);
  bad[2 * 64 + 5] = std::nanf("");
  const size_t shape[2] = {4, 64};
  tqkv::npy::write(path("nan.npy"), bad, shape);
  r = run({"quantize", "--in", path("nan.npy"), "--out", path("nan.tqkv"), "--bits", "3"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("nan.npy"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("vector 2"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(path("nan.tqkv")));

  // A corrupted .tqkv file is refused by every reader.
  r = run({"quantize", "--in", path("x.npy"), "--out", path("o.tqkv"), "--bits", "4"});
  ASSERT_EQ(r.status, 0) << r.err;
  auto bytes = tqkv::file::read_bytes(path("o.tqkv"));
  bytes[bytes.size() / 2] ^= 0x10;
  tqkv::file::write_bytes(path("o.tqkv"), bytes);
  for (auto args : {std::vector<std::string>{"info", path("o.tqkv")},
                    std::vector<std::string>{"dequantize", "--in", path("o.tqkv"), "--out",
                                             path("z.npy")}}) {
    r = run(args);
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("o.tqkv"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(path("z.npy")));

  r = run({"frobnicate"});
  EXPECT_EQ(r.status, 2);
}

TEST_F(CliTest, HelpEverywhere) {
  for (auto args : {std::vector<std::string>{"--help"}, {"quantize", "--help"},
                    {"dequantize", "--help"}, {"info", "--help"}, {"eval", "--help"},
                    {"eval", "distortion", "--help"}, {"demo", "--help"},
                    {"attend", "--help"}, {"bench", "--help"}, {"bench", "decode", "--help"}}) {
    const auto r = run(args);
    EXPECT_EQ(r.status, 0) << args.back();
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << r.out;
  }
}

TEST_F(CliTest, EvalDistortionJsonMatchesTheory) {
  const auto r = run({"eval", "distortion", "--dim", "64", "--bits", "2,3.5", "--samples",
                      "20000", "--data-seed", std::to_string(seed_), "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto rows = nlohmann::json::parse(r.out);
  ASSERT_EQ(rows.size(), 2u);
  for (const auto& row : rows) {
    const double mse = row["mse"], theory = row["mse_theory"];
    EXPECT_NEAR(mse, theory, 0.03 * theory) << row.dump();
    EXPECT_GT(mse, row["lower_bound"].get<double>());
  }
  EXPECT_EQ(rows[1]["bits"], 3.5);
}

// attend: the fused decode and the float64 reference agree on the same compressed cache, and the
// command builds exactly the cache its documentation describes (value seed = key seed + 1).
TEST_F(CliTest, AttendMatchesReferenceAndLibrary) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const size_t Hq = 8, Hkv = 2, T = 300, d = 64;  // T > 256: appended in two chunks
  const auto q = write_array("q.npy", {Hq, d}, 1);
  const auto k = write_array("k.npy", {Hkv, T, d}, 2);
  const auto v = write_array("v.npy", {Hkv, T, d}, 3);
  struct Case {
    const char *key_bits, *value_bits, *codec, *window;
  };
  for (const Case c : {Case{"4", "4", "mse", "0"}, Case{"3.5", "2", "prod", "0"},
                       Case{"3", "4", "mse", "100"}}) {
    SCOPED_TRACE(std::string(c.key_bits) + "/" + c.value_bits + " " + c.codec + " window " +
                 c.window);
    const std::vector<std::string> common = {
        "attend", "--q", path("q.npy"), "--k", path("k.npy"), "--v", path("v.npy"),
        "--key-bits", c.key_bits, "--value-bits", c.value_bits, "--codec", c.codec,
        "--seed", "7", "--window", c.window};
    auto args = common;
    args.insert(args.end(), {"--out", path("o.npy")});
    auto r = run(args);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("300 tokens"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("bytes per token"), std::string::npos) << r.out;
    args = common;
    args.insert(args.end(), {"--out", path("r.npy"), "--reference"});
    r = run(args);
    ASSERT_EQ(r.status, 0) << r.err;
    const auto o = tqkv::npy::read(path("o.npy"));
    const auto ref = tqkv::npy::read(path("r.npy"));
    ASSERT_EQ(o.shape, (std::vector<size_t>{Hq, d}));
    ASSERT_EQ(ref.shape, o.shape);
    EXPECT_LT(relative_difference(o.data, ref.data), 1e-4);

    // The same cache built directly, appended in the documented chunks of 256 tokens (the
    // chunking matters for fractional bits only: each head's outlier channels come from its
    // first append).
    tqkv::CacheConfig config;
    config.kv_heads = int(Hkv);
    config.head_dim = int(d);
    config.key.bits = std::stod(c.key_bits);
    config.value.bits = std::stod(c.value_bits);
    config.key.kind = config.value.kind = tqkv::parse_codec_kind(c.codec);
    config.key.seed = 7;
    config.value.seed = 8;
    config.max_pages = 64;
    tqkv::KVCache cache(config);
    const auto seq = cache.add_sequence();
    std::vector<float> kt(T * Hkv * d), vt(kt.size());
    for (size_t t = 0; t < T; ++t)
      for (size_t h = 0; h < Hkv; ++h)
        for (size_t j = 0; j < d; ++j) {
          kt[(t * Hkv + h) * d + j] = k[(h * T + t) * d + j];
          vt[(t * Hkv + h) * d + j] = v[(h * T + t) * d + j];
        }
    cache.append(seq, 0, kt.data(), vt.data(), 256);
    cache.append(seq, 0, kt.data() + 256 * Hkv * d, vt.data() + 256 * Hkv * d, T - 256);
    tqkv::AttentionOptions options;
    options.window = std::stoul(c.window);
    std::vector<float> direct(Hq * d);
    const tqkv::SequenceId seqs[1] = {seq};
    tqkv::attend_decode(cache, 0, seqs, q.data(), int(Hq), direct.data(), options);
    EXPECT_LT(relative_difference(o.data, direct), 1e-6);
  }
}

TEST_F(CliTest, AttendErrorsNameTheCulprit) {
  write_array("q.npy", {4, 64}, 1);
  write_array("q32.npy", {4, 32}, 2);
  write_array("q3.npy", {3, 64}, 3);
  write_array("k.npy", {2, 20, 64}, 4);
  write_array("v.npy", {2, 20, 64}, 5);
  write_array("v2.npy", {2, 21, 64}, 6);
  auto attend = [&](const std::string& q, const std::string& k, const std::string& v,
                    std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"attend", "--q", path(q), "--k", path(k), "--v", path(v),
                                     "--out", path("o.npy")};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  };
  struct Expect {
    Result r;
    const char* needle;
  };
  for (const auto& [r, needle] :
       {Expect{attend("q32.npy", "k.npy", "v.npy"), "q32.npy"},        // head dims differ
        Expect{attend("q3.npy", "k.npy", "v.npy"), "multiple"},        // 3 query heads, 2 KV
        Expect{attend("q.npy", "k.npy", "v2.npy"), "v2.npy"},          // K and V shapes differ
        Expect{attend("q.npy", "missing.npy", "v.npy"), "missing.npy"},
        Expect{attend("q.npy", "k.npy", "v.npy", {"--key-bits", "12"}), "--key-bits"},
        Expect{attend("q.npy", "k.npy", "v.npy", {"--key-bits", "four"}), "--key-bits"},
        Expect{attend("q.npy", "k.npy", "v.npy", {"--value-bits", "0.5"}), "--value-bits"},
        Expect{attend("q.npy", "k.npy", "v.npy", {"--codec", "zip"}), "zip"},
        Expect{attend("q.npy", "k.npy", "v.npy", {"--scale", "-1"}), "--scale"}}) {
    EXPECT_EQ(r.status, 1) << needle;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(path("o.npy")));
  // A 2-D key array is refused, naming the file.
  write_array("k2d.npy", {20, 64}, 7);
  const auto r = attend("q.npy", "k2d.npy", "v.npy");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("k2d.npy"), std::string::npos) << r.err;
}

TEST_F(CliTest, BenchDecodeJson) {
  const auto r = run({"bench", "decode", "--device", "cpu", "--context", "64", "--batch", "1,2",
                      "--bits", "4,2", "--q-heads", "4", "--kv-heads", "2", "--dim", "64",
                      "--repeats", "1", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto rows = nlohmann::json::parse(r.out);
  ASSERT_TRUE(rows.is_array());
  ASSERT_EQ(rows.size(), 4u);
  for (const auto& row : rows) {
    for (const char* field :
         {"device", "batch", "context", "q_heads", "kv_heads", "dim", "key_bits", "value_bits",
          "codec", "threads", "fused_us", "fallback_us", "dense_us", "compressed_bytes",
          "fused_gbps", "dense_bytes", "speedup_vs_fallback", "speedup_vs_dense"})
      EXPECT_TRUE(row.contains(field)) << field << " in " << row.dump();
    EXPECT_EQ(row["device"], "cpu");
    EXPECT_EQ(row["context"], 64);
    EXPECT_EQ(row["q_heads"], 4);
    EXPECT_EQ(row["kv_heads"], 2);
    EXPECT_EQ(row["dim"], 64);
    EXPECT_EQ(row["codec"], "mse");
    EXPECT_GE(row["threads"].get<int>(), 1);
    for (const char* t : {"fused_us", "fallback_us", "dense_us", "fused_gbps",
                          "speedup_vs_fallback", "speedup_vs_dense"})
      EXPECT_GT(row[t].get<double>(), 0) << t;
    const size_t batch = row["batch"];
    EXPECT_EQ(row["dense_bytes"].get<size_t>(), batch * 64 * 2 * 64 * 2 * 4);
    // 64 tokens of 2 KV heads: keys and values, 64 coordinates each, plus f16 norms.
    const double bits = row["key_bits"];
    EXPECT_EQ(row["compressed_bytes"].get<size_t>(),
              batch * 64 * 2 * 2 * (size_t(bits) * 64 / 8 + 2));
  }
  EXPECT_EQ(rows[0]["batch"], 1);
  EXPECT_EQ(rows[0]["key_bits"], 4.0);
  EXPECT_EQ(rows[1]["key_bits"], 2.0);
  EXPECT_EQ(rows[3]["batch"], 2);

  // The table form.
  const auto t = run({"bench", "decode", "--context", "32", "--bits", "3", "--q-heads", "2",
                      "--kv-heads", "1", "--dim", "32", "--repeats", "1", "--threads", "1"});
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_NE(t.out.find("fused us"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("1 threads"), std::string::npos) << t.out;
}

TEST_F(CliTest, BenchDecodeErrors) {
  auto r = run({"bench", "decode", "--device", "cuda:99"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find(tqkv::cuda_backend_built() ? "does not exist" : "no GPU backend built"),
            std::string::npos)
      << r.err;
  r = run({"bench", "decode", "--device", "tpu"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("unknown device 'tpu'"), std::string::npos) << r.err;
  // Every case fails validation, before anything is built or timed.
  const std::vector<std::string> tiny = {"--dim", "32", "--repeats", "1"};
  struct Expect {
    std::vector<std::string> args;
    const char* needle;
  };
  for (const auto& [extra, needle] :
       {Expect{{"--device", "tpu"}, "--device"}, Expect{{"--context", "0"}, "--context"},
        Expect{{"--context", "12,x"}, "--context"}, Expect{{"--batch", "-1"}, "--batch"},
        Expect{{"--bits", "4,abc"}, "--bits"}, Expect{{"--bits", "11"}, "--bits 11"},
        Expect{{"--context", ","}, "--context"}, Expect{{"--q-heads", "3", "--kv-heads", "2"},
                                                        "--q-heads"}}) {
    std::vector<std::string> args = {"bench", "decode"};
    args.insert(args.end(), tiny.begin(), tiny.end());
    args.insert(args.end(), extra.begin(), extra.end());
    r = run(args);
    EXPECT_EQ(r.status, 1) << needle;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  }
  EXPECT_EQ(run({"bench"}).status, 2);  // a subcommand is required
}

// bench sharded on simulated ranks (CPU shards): a row per world size, both placements; errors.
TEST_F(CliTest, BenchShardedOnSimulatedRanks) {
  for (const char* placement : {"sequence", "heads"}) {
    const auto r = run({"bench", "sharded", "--devices", "cpu,cpu,cpu", "--worlds", "1,3",
                        "--placement", placement, "--context", "300", "--batch", "2", "--bits",
                        "4", "--q-heads", "6", "--kv-heads", "3", "--dim", "64", "--repeats",
                        "1", "--json"});
    ASSERT_EQ(r.status, 0) << r.err;
    const auto rows = nlohmann::json::parse(r.out);
    ASSERT_EQ(rows.size(), 2u);
    for (const auto& row : rows) {
      for (const char* field : {"shards", "placement", "batch", "context", "bits", "step_us",
                                "speedup", "efficiency"})
        EXPECT_TRUE(row.contains(field)) << field << " in " << row.dump();
      EXPECT_EQ(row["placement"], placement);
      EXPECT_EQ(row["context"], 300);
      EXPECT_GT(row["step_us"].get<double>(), 0);
    }
    EXPECT_EQ(rows[0]["shards"], 1);
    EXPECT_EQ(rows[1]["shards"], 3);
    EXPECT_EQ(rows[0]["speedup"].get<double>(), 1.0);
  }
  const auto t = run({"bench", "sharded", "--devices", "cpu,cpu", "--context", "100",
                      "--q-heads", "2", "--kv-heads", "2", "--dim", "32", "--repeats", "1"});
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_NE(t.out.find("simulated ranks"), std::string::npos) << t.out;
  struct Expect {
    std::vector<std::string> args;
    const char* needle;
  };
  for (const auto& [extra, needle] :
       {Expect{{"--devices", "cpu", "--worlds", "2"}, "--worlds: 2 shards"},
        Expect{{"--devices", "cpu,tpu"}, "--devices"},
        Expect{{"--placement", "rows"}, "--placement"},
        Expect{{"--devices", "cpu,cpu,cpu", "--placement", "heads", "--kv-heads", "2",
                "--q-heads", "2"}, "at least as many KV heads"}}) {
    std::vector<std::string> args = {"bench", "sharded", "--context", "64", "--dim", "32",
                                     "--repeats", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto r = run(args);
    EXPECT_EQ(r.status, 1) << needle;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  }
}

TEST_F(CliTest, InfoOnKVCacheFile) {
  tqkv::CacheConfig config;
  config.layers = 2;
  config.kv_heads = 2;
  config.head_dim = 64;
  config.key.bits = 4;
  config.value.bits = 3.5;
  config.value.seed = 5;
  config.page_tokens = 16;
  config.max_pages = 20;
  tqkv::KVCache cache(config);
  std::mt19937 rng(seed_);
  std::normal_distribution<float> normal;
  std::vector<float> k(40 * 2 * 64), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  const auto a = cache.add_sequence(), b = cache.add_sequence();
  for (int layer = 0; layer < 2; ++layer) {
    cache.append(a, layer, k.data(), v.data(), 40);
    cache.append(b, layer, k.data(), v.data(), layer == 0 ? 10 : 7);
  }
  cache.save(path("cache.tqkv"));

  auto r = run({"info", path("cache.tqkv"), "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["kind"], "kv_cache");
  EXPECT_EQ(j["layers"], 2);
  EXPECT_EQ(j["kv_heads"], 2);
  EXPECT_EQ(j["head_dim"], 64);
  EXPECT_EQ(j["key"]["bits"], 4.0);
  EXPECT_EQ(j["value"]["bits"], 3.5);
  EXPECT_EQ(j["value"]["seed"], 5);
  EXPECT_EQ(j["page_tokens"], 16);
  EXPECT_EQ(j["pages_total"], 20);
  EXPECT_EQ(j["pages_used"], 3 + 1);  // 40 tokens: 3 pages; 10 tokens: 1
  ASSERT_EQ(j["sequences"].size(), 2u);
  EXPECT_EQ(j["sequences"][0]["id"], a);
  EXPECT_EQ(j["sequences"][0]["lengths"], (std::vector<size_t>{40, 40}));
  EXPECT_EQ(j["sequences"][1]["lengths"], (std::vector<size_t>{10, 7}));
  EXPECT_EQ(j["bytes_per_token_per_layer"], cache.bytes_per_token_per_layer());
  EXPECT_EQ(j["bytes_per_token"], cache.bytes_per_token());
  EXPECT_EQ(j["fp16_bytes_per_token"], cache.fp16_bytes_per_token());
  EXPECT_EQ(j["stored_bytes"], cache.stored_bytes());
  EXPECT_NEAR(j["compression_vs_fp16"].get<double>(),
              double(cache.fp16_bytes_per_token()) / double(cache.bytes_per_token()), 1e-12);
  EXPECT_EQ(j["file_bytes"], fs::file_size(path("cache.tqkv")));

  r = run({"info", path("cache.tqkv")});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* needle : {"KV cache", "layers", "3.5-bit mse", "4 used of 20", "40 tokens",
                             "tokens per layer 10 7", "compression", "stored bytes"})
    EXPECT_NE(r.out.find(needle), std::string::npos) << needle << " in\n" << r.out;

  // A corrupted cache file is refused, naming it.
  auto bytes = tqkv::file::read_bytes(path("cache.tqkv"));
  bytes[bytes.size() - 3] ^= 0x01;
  tqkv::file::write_bytes(path("bad.tqkv"), bytes);
  r = run({"info", path("bad.tqkv")});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("bad.tqkv"), std::string::npos) << r.err;
}

TEST_F(CliTest, DemoShowsAttention) {
  const auto r = run({"demo", "--samples", "200", "--context", "256"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("attention on a compressed cache"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("256 tokens"), std::string::npos) << r.out;
  EXPECT_EQ(run({"demo", "--context", "0"}).status, 1);
}

// demo --model: every row of the real-model demo, the full cache's against itself, and errors.
TEST_F(CliTest, DemoRunsOnTheRealModel) {
  const auto missing = run({"demo", "--model", path("absent.onnx")});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("absent.onnx"), std::string::npos) << missing.err;
  const fs::path model = fs::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!fs::exists(model)) GTEST_SKIP() << model << " is absent: run tools/fetch-model.sh";
  const auto short_run = run({"demo", "--model", model.string(), "--tokens", "16"});
  EXPECT_EQ(short_run.status, 1);
  EXPECT_NE(short_run.err.find("--tokens"), std::string::npos) << short_run.err;
  const auto r = run({"demo", "--model", model.string(), "--tokens", "40", "--seed",
                      std::to_string(seed_)});
  ASSERT_EQ(r.status, 0) << r.err;
  std::map<std::string, std::vector<double>> rows;  // name -> the numbers after it
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string name;
    words >> name;
    if (name == "full") words >> name;  // "full (f32)"
    std::vector<double> numbers;
    for (std::string w; words >> w;) {
      if (w.back() == 'x') w.pop_back();
      try {
        size_t used = 0;
        numbers.push_back(std::stod(w, &used));
        if (used != w.size()) break;
      } catch (const std::exception&) {
        break;
      }
    }
    if (numbers.size() == 7) rows[name == "(f32)" ? "full" : name] = numbers;
  }
  for (const char* name : {"full", "k4v4", "k3.5v3.5", "k3v3", "k2v2", "k4v4-center",
                           "k3.5v3.5-center", "q4_0", "q8_0"})
    ASSERT_TRUE(rows.count(name)) << name << " missing in:\n" << r.out;
  EXPECT_EQ(rows["k4v4-center"][0], rows["k4v4"][0]);  // the offset is per codec, not per token
  // bytes/token, vs fp16, KL, top-1, ppl, prefill tok/s, decode ms/token
  EXPECT_EQ(rows["full"][0], 4 * 2 * 3 * 64 * 4);
  EXPECT_EQ(rows["full"][2], 0.0);
  EXPECT_EQ(rows["full"][3], 1.0);
  EXPECT_EQ(rows["k4v4"][0], 4 * 2 * 3 * (32 + 2));  // 4-bit codes and an f16 norm
  EXPECT_NEAR(rows["k4v4"][1], 3072.0 / 816.0, 0.005);
  EXPECT_GT(rows["k2v2"][2], rows["k4v4"][2]);  // fewer bits, further from the full cache
  for (const auto& [name, v] : rows) {
    EXPECT_GE(v[3], 0.0) << name;
    EXPECT_LE(v[3], 1.0) << name;
    EXPECT_GT(v[4], 1.0) << name;
    EXPECT_GT(v[5], 0.0) << name;
    EXPECT_GT(v[6], 0.0) << name;
  }
}

// eval model: the table's fields on a short sequence of the real model (when fetched), and errors.
TEST_F(CliTest, EvalModelReportsEveryConfig) {
  const auto missing = run({"eval", "model", "--model", path("absent.onnx")});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("absent.onnx"), std::string::npos) << missing.err;
  const fs::path model = fs::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!fs::exists(model)) GTEST_SKIP() << model << " is absent: run tools/fetch-model.sh";
  const auto bad = run({"eval", "model", "--model", model.string(), "--configs", "k4x4"});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("'k4x4'"), std::string::npos) << bad.err;
  for (const char* name : {"bound", "bound0", "bound17", "boundx", "bound3-dense"}) {
    const auto b = run({"eval", "model", "--model", model.string(), "--configs", name});
    EXPECT_EQ(b.status, 1) << name;
    EXPECT_NE(b.err.find(std::string("'") + name + "'"), std::string::npos) << b.err;
  }
  const auto r = run({"eval", "model", "--model", model.string(), "--tokens", "24",
                      "--sequences", "2", "--seed", std::to_string(seed_), "--configs",
                      "full,k8v8,q8_0,k2v2,k3v3-dense-center,bound3.5-center,bound12", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto rows = nlohmann::json::parse(r.out);
  ASSERT_EQ(rows.size(), 7u);
  // The bound: 3.5 bits a coordinate and an f16 norm a vector; at 12 bits next to lossless.
  EXPECT_EQ(rows[5]["bytes_per_token"], 4 * 2 * 3 * (28 + 2));
  EXPECT_EQ(rows[5]["key_bits"], 3.5);
  EXPECT_EQ(rows[5]["value_bits"], 3.5);
  EXPECT_GT(rows[5]["kl_mean"].get<double>(), rows[6]["kl_mean"].get<double>());
  EXPECT_LT(rows[6]["kl_mean"].get<double>(), 1e-5);
  EXPECT_EQ(rows[4]["config"], "k3v3-dense-center");
  EXPECT_EQ(rows[4]["bytes_per_token"], 4 * 2 * 3 * (24 + 2));  // 3-bit codes and an f16 norm
  const double coords = 4 * 2 * 3 * 64;  // layers × (K, V) × KV heads × head_dim
  for (const auto& row : rows) {
    EXPECT_EQ(row["tokens"], 2 * 23) << row.dump();
    EXPECT_NEAR(row["ppl_full"].get<double>(), rows[0]["ppl"].get<double>(), 1e-9);
    EXPECT_NEAR(row["bits_per_coordinate"].get<double>() * coords / 8,
                row["bytes_per_token"].get<double>(), 1e-9);
  }
  EXPECT_EQ(rows[0]["kl_mean"], 0.0);
  EXPECT_EQ(rows[0]["top1_agree"], 1.0);
  EXPECT_EQ(rows[0]["bytes_per_token"], coords * 4);
  EXPECT_EQ(rows[2]["bytes_per_token"], coords / 32 * 34);  // q8_0: 34 bytes per 32
  EXPECT_EQ(rows[1]["bytes_per_token"], 4 * 2 * 3 * (64 + 2));  // 8-bit codes and an f16 norm
  EXPECT_LT(rows[1]["kl_mean"].get<double>(), 1e-3);
  EXPECT_GT(rows[3]["kl_mean"].get<double>(), rows[1]["kl_mean"].get<double>());
}

// eval model --kv-stats: a row per layer, KV head and kind, with the fields the table prints; and
// bad widths refused.
TEST_F(CliTest, EvalModelKvStats) {
  const fs::path model = fs::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!fs::exists(model)) GTEST_SKIP() << model << " is absent: run tools/fetch-model.sh";
  const auto bad = run({"eval", "model", "--model", model.string(), "--kv-stats", "--kv-bits",
                        "9"});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--kv-bits"), std::string::npos) << bad.err;
  const auto both = run({"eval", "model", "--model", model.string(), "--kv-stats", "--plot",
                         path("kv.png")});
  EXPECT_EQ(both.status, 1);
  EXPECT_NE(both.err.find("--kv-stats"), std::string::npos) << both.err;
  const auto r = run({"eval", "model", "--model", model.string(), "--tokens", "40",
                      "--sequences", "2", "--seed", std::to_string(seed_), "--kv-stats",
                      "--kv-bits", "3", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const auto rows = nlohmann::json::parse(r.out);
  ASSERT_EQ(rows.size(), 2u * 4 * 3);  // keys and values × layers × KV heads
  for (const auto& row : rows) {
    EXPECT_EQ(row["vectors"], 80) << row.dump();
    EXPECT_EQ(row["bits"], 3);
    EXPECT_EQ(row["channel_mean_abs"].size(), 64u);
    EXPECT_LE(row["norm_min"].get<double>(), row["norm_mean"].get<double>());
    EXPECT_LE(row["norm_mean"].get<double>(), row["norm_max"].get<double>());
    EXPECT_DOUBLE_EQ(row["mse_theory"].get<double>(), tqkv::Codebook::get(64, 3)->distortion());
    for (const char* k : {"mse_hadamard", "mse_dense", "mse_unrotated"})
      EXPECT_GT(row[k].get<double>(), 0.0) << k;
  }
  EXPECT_EQ(rows[0]["kind"], "key");
  EXPECT_EQ(rows.back()["kind"], "value");
}

// eval model --plot: a PNG of plausible size and shape, and paths it cannot write refused before
// anything runs.
TEST_F(CliTest, EvalModelPlots) {
  const std::string unwritable = path("no_such_dir") + "/kl.png";
  const auto bad = run({"eval", "model", "--model", path("absent.onnx"), "--plot", unwritable});
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--plot"), std::string::npos) << bad.err;
  EXPECT_NE(bad.err.find(unwritable), std::string::npos) << bad.err;
#if !defined(TQKV_HAVE_CAIRO)
  EXPECT_NE(bad.err.find("cairo"), std::string::npos) << bad.err;
  GTEST_SKIP() << "built without cairo: --plot only explains that";
#endif
  EXPECT_NE(bad.err.find("No such file"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(unwritable));
  const fs::path model = fs::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!fs::exists(model)) GTEST_SKIP() << model << " is absent: run tools/fetch-model.sh";
  const auto only_full = run({"eval", "model", "--model", model.string(), "--configs", "full",
                              "--plot", path("full.png")});
  EXPECT_EQ(only_full.status, 1);
  EXPECT_NE(only_full.err.find("nothing to draw"), std::string::npos) << only_full.err;
  EXPECT_FALSE(fs::exists(path("full.png")));
  const auto r = run({"eval", "model", "--model", model.string(), "--tokens", "16",
                      "--sequences", "1", "--seed", std::to_string(seed_), "--configs",
                      "full,k4v4,k2v2,q4_0", "--plot", path("kl.png")});
  ASSERT_EQ(r.status, 0) << r.err;
  const std::vector<uint8_t> png = tqkv::file::read_bytes(path("kl.png"));
  ASSERT_GT(png.size(), 24u);
  const uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  EXPECT_EQ(std::memcmp(png.data(), signature, 8), 0);
  EXPECT_EQ(std::string(png.begin() + 12, png.begin() + 16), "IHDR");
  auto be32 = [&](size_t at) {
    return uint32_t(png[at]) << 24 | uint32_t(png[at + 1]) << 16 | uint32_t(png[at + 2]) << 8 |
           uint32_t(png[at + 3]);
  };
  EXPECT_GT(be32(16), be32(20));  // two panels side by side: wider than high
  EXPECT_GE(be32(20), 300u);
  // Axes, labels and points: tens of kilobytes (a blank image of this size is about 4 kB).
  EXPECT_GT(png.size(), 8000u);
  EXPECT_LT(png.size(), 4000000u);
}

}  // namespace
