// The command-line tool, run in-process: round trips through files, JSON output, and errors that
// name the argument or file at fault.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "cli.hpp"
#include "tqkv/codec.hpp"
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
  uint32_t seed_ = 0;
  fs::path dir_;
};

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
                    {"eval", "distortion", "--help"}, {"demo", "--help"}}) {
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

}  // namespace
