#include "tqkv/npy.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tqkv/error.hpp"
#include "tqkv/half.hpp"

namespace tqkv::npy {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> bytes_of(std::string_view s) { return {s.begin(), s.end()}; }

void append_f32(std::vector<uint8_t>& out, std::initializer_list<float> values) {
  for (const float v : values) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    out.insert(out.end(), b, b + 4);
  }
}

// A version 1.0 file with `dict` as its header text, padded the way numpy pads, then `data`.
std::vector<uint8_t> v1_file(std::string dict, std::initializer_list<float> data = {}) {
  while ((10 + dict.size() + 1) % 64 != 0) dict += ' ';
  dict += '\n';
  std::vector<uint8_t> out = bytes_of(std::string("\x93NUMPY\x01\x00", 8));
  out.push_back(uint8_t(dict.size()));
  out.push_back(uint8_t(dict.size() >> 8));
  out.insert(out.end(), dict.begin(), dict.end());
  append_f32(out, data);
  return out;
}

// The message of the tqkv::Error that parsing `bytes` throws; fails the test if none is thrown.
std::string parse_error(const std::vector<uint8_t>& bytes) {
  try {
    parse(bytes, "X.npy");
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "parse did not throw";
  return "";
}

#define EXPECT_PARSE_ERROR(bytes, text)                                  \
  do {                                                                   \
    const std::string msg_ = parse_error(bytes);                         \
    EXPECT_NE(msg_.find(text), std::string::npos) << "message: " << msg_; \
    EXPECT_EQ(msg_.rfind("X.npy: ", 0), 0u) << "message: " << msg_;      \
  } while (0)

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

class NpyRoundTrip : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }

  std::vector<size_t> random_shape(size_t ndim) {
    std::uniform_int_distribution<size_t> dim(1, 9);
    std::vector<size_t> shape(ndim);
    for (size_t& d : shape) d = dim(rng_);
    return shape;
  }

  std::vector<float> random_data(size_t n) {
    std::normal_distribution<float> dist(0.0f, 3.0f);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng_);
    return v;
  }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
};

TEST_F(NpyRoundTrip, Float32AllRanks) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (size_t ndim = 1; ndim <= 3; ++ndim) {
    const std::vector<size_t> shape = random_shape(ndim);
    const std::vector<float> data = random_data(shape[0] * (ndim > 1 ? shape[1] : 1) *
                                                (ndim > 2 ? shape[2] : 1));
    const std::vector<uint8_t> file = serialize(data, shape);
    EXPECT_EQ((file.size() - data.size() * 4) % 64, 0u);  // data starts 64-byte aligned
    const Array a = parse(file, "rt.npy");
    EXPECT_EQ(a.stored, DType::f32);
    EXPECT_EQ(a.shape, shape);
    ASSERT_EQ(a.data.size(), data.size());
    for (size_t i = 0; i < data.size(); ++i) EXPECT_EQ(bits(a.data[i]), bits(data[i])) << i;
  }
}

TEST_F(NpyRoundTrip, Float16AllRanksRoundsLikeFloatToHalf) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (size_t ndim = 1; ndim <= 3; ++ndim) {
    const std::vector<size_t> shape = random_shape(ndim);
    size_t n = 1;
    for (const size_t d : shape) n *= d;
    std::vector<float> data = random_data(n);
    data[0] = 1e6f;     // overflows to inf in float16
    data[n - 1] = 1e-7f;  // a float16 subnormal
    const std::vector<uint8_t> file = serialize(data, shape, DType::f16);
    EXPECT_EQ((file.size() - n * 2) % 64, 0u);
    const Array a = parse(file, "rt.npy");
    EXPECT_EQ(a.stored, DType::f16);
    EXPECT_EQ(a.shape, shape);
    ASSERT_EQ(a.data.size(), n);
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(bits(a.data[i]), bits(half_to_float(float_to_half(data[i])))) << i;
    }
  }
}

TEST_F(NpyRoundTrip, WriteThenReadLeavesNoTempFile) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const fs::path dir = fs::temp_directory_path() /
                       ("tqkv_npy_" + std::to_string(getpid()) + "_" + std::to_string(seed_));
  fs::create_directories(dir);
  const fs::path path = dir / "kv.npy";
  const std::vector<size_t> shape = random_shape(2);
  const std::vector<float> data = random_data(shape[0] * shape[1]);
  write(path, data, shape);
  write(path, data, shape);  // overwriting an existing file works too
  const Array a = read(path);
  EXPECT_EQ(a.shape, shape);
  EXPECT_EQ(a.data, data);
  EXPECT_FALSE(fs::exists(dir / "kv.npy.tmp"));
  fs::remove_all(dir);
}

TEST(Npy, RowsAndCols) {
  Array a;
  EXPECT_EQ(a.rows(), 0u);
  EXPECT_EQ(a.cols(), 0u);
  a.shape = {7};
  EXPECT_EQ(a.rows(), 1u);
  EXPECT_EQ(a.cols(), 7u);
  a.shape = {5, 8};
  EXPECT_EQ(a.rows(), 5u);
  EXPECT_EQ(a.cols(), 8u);
  a.shape = {2, 3, 4};
  EXPECT_EQ(a.rows(), 6u);
  EXPECT_EQ(a.cols(), 4u);
}

TEST(Npy, ParsesExactNumpyBytes) {
  // What numpy 1.x np.save writes for np.arange(6, dtype=np.float32).reshape(2, 3).
  std::string header =
      std::string("\x93NUMPY\x01\x00\x76\x00", 10) +
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  header += std::string(128 - 1 - header.size(), ' ') + "\n";
  ASSERT_EQ(header.size(), 128u);
  std::vector<uint8_t> file = bytes_of(header);
  append_f32(file, {0, 1, 2, 3, 4, 5});

  const Array a = parse(file, "numpy.npy");
  EXPECT_EQ(a.stored, DType::f32);
  EXPECT_EQ(a.shape, (std::vector<size_t>{2, 3}));
  EXPECT_EQ(a.data, (std::vector<float>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(a.rows(), 2u);
  EXPECT_EQ(a.cols(), 3u);
  // And we write the very same bytes.
  const size_t shape[] = {2, 3};
  EXPECT_EQ(serialize(a.data, shape), file);
}

TEST(Npy, SerializesOneDimAsTupleWithComma) {
  const float data[] = {1, 2, 3};
  const size_t shape[] = {3};
  const std::vector<uint8_t> file = serialize(data, shape);
  const std::string text(file.begin(), file.end());
  EXPECT_NE(text.find("'shape': (3,), }"), std::string::npos);
  ASSERT_EQ(file.size(), 128u + 12u);
  EXPECT_EQ(text[127], '\n');
}

TEST(Npy, ParsesVersion2And3Headers) {
  for (const uint8_t major : {2, 3}) {
    const std::string dict = "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }\n";
    std::vector<uint8_t> file = bytes_of(std::string("\x93NUMPY", 6));
    file.push_back(major);
    file.push_back(0);
    for (int i = 0; i < 4; ++i) file.push_back(uint8_t(dict.size() >> (8 * i)));
    file.insert(file.end(), dict.begin(), dict.end());
    for (const uint16_t h : {float_to_half(1.5f), float_to_half(-2.0f)}) {
      file.push_back(uint8_t(h));
      file.push_back(uint8_t(h >> 8));
    }
    const Array a = parse(file, "v2.npy");
    EXPECT_EQ(a.stored, DType::f16);
    EXPECT_EQ(a.shape, (std::vector<size_t>{2}));
    EXPECT_EQ(a.data, (std::vector<float>{1.5f, -2.0f}));
  }
}

TEST(Npy, ToleratesDictVariants) {
  const char* dicts[] = {
      R"({"shape": (2, 1), "descr": "<f4", "fortran_order": False})",
      "{ 'fortran_order' : False ,\n 'shape':( 2 ,1 , ) ,'descr':'=f4' , }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 1L), }",
      "\t{'descr':'<f4','fortran_order':False,'shape':(2,1)}\r\n",
  };
  for (const char* dict : dicts) {
    SCOPED_TRACE(dict);
    const Array a = parse(v1_file(dict, {4, 5}), "variant.npy");
    EXPECT_EQ(a.shape, (std::vector<size_t>{2, 1}));
    EXPECT_EQ(a.data, (std::vector<float>{4, 5}));
  }
}

TEST(Npy, EmptyArrayAndNonFiniteValuesPass) {
  const Array empty = parse(v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }"),
                            "empty.npy");
  EXPECT_EQ(empty.shape, (std::vector<size_t>{0, 4}));
  EXPECT_TRUE(empty.data.empty());
  EXPECT_EQ(empty.rows(), 0u);
  const size_t shape[] = {0, 4};
  EXPECT_EQ(parse(serialize({}, shape), "e.npy").shape, empty.shape);

  const float inf = std::numeric_limits<float>::infinity();
  const Array a = parse(v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                                {std::nanf(""), inf, -inf}),
                        "nan.npy");
  EXPECT_TRUE(std::isnan(a.data[0]));
  EXPECT_EQ(a.data[1], inf);
  EXPECT_EQ(a.data[2], -inf);
}

TEST(NpyErrors, BadMagicAndVersion) {
  EXPECT_PARSE_ERROR(std::vector<uint8_t>{}, "not a .npy file (bad magic)");
  EXPECT_PARSE_ERROR(bytes_of("PK\x03\x04 this is a zip"), "not a .npy file (bad magic)");
  std::vector<uint8_t> file = v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                                      {1});
  file[6] = 4;
  EXPECT_PARSE_ERROR(file, "unsupported .npy format version 4.0");
}

TEST(NpyErrors, TruncatedAtEveryOffset) {
  const std::vector<uint8_t> file =
      v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", {0, 1, 2, 3, 4, 5});
  ASSERT_NO_THROW(parse(file, "X.npy"));
  for (size_t len = 0; len < file.size(); ++len) {
    SCOPED_TRACE("length " + std::to_string(len));
    // A copy of exactly `len` bytes, so ASan catches any read past the end.
    const std::vector<uint8_t> cut(file.begin(), file.begin() + std::ptrdiff_t(len));
    EXPECT_THROW(parse(cut, "X.npy"), Error);
  }
  const std::vector<uint8_t> cut(file.begin(), file.end() - 4);
  EXPECT_PARSE_ERROR(cut, "truncated: header says 6 elements (24 bytes) but 20 bytes follow");
}

TEST(NpyErrors, HeaderLengthBeyondFile) {
  std::vector<uint8_t> file = v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                                      {1});
  file[8] = 0xff;
  file[9] = 0xff;
  EXPECT_PARSE_ERROR(file, "header length is 65535 bytes");
}

TEST(NpyErrors, Dtypes) {
  EXPECT_PARSE_ERROR(v1_file("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", {1}),
                     "big-endian dtype '>f4' is not supported");
  EXPECT_PARSE_ERROR(v1_file("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", {1}),
                     "unsupported dtype '<i4' (expected '<f4' or '<f2')");
  EXPECT_PARSE_ERROR(v1_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", {1, 2}),
                     "unsupported dtype '<f8'");
}

TEST(NpyErrors, FortranOrderAndRank) {
  EXPECT_PARSE_ERROR(v1_file("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1), }", {1}),
                     "Fortran-order arrays are not supported");
  EXPECT_PARSE_ERROR(v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", {1}),
                     "has 0 dimensions");
  EXPECT_PARSE_ERROR(
      v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1), }", {1}),
      "has 4 dimensions");
}

TEST(NpyErrors, TrailingBytes) {
  EXPECT_PARSE_ERROR(
      v1_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", {1, 2, 3}),
                     "has 4 unexpected bytes after the data");
}

TEST(NpyErrors, MalformedDicts) {
  const std::pair<const char*, const char*> cases[] = {
      {"{'descr': '<f4', 'shape': (1,), }", "missing key 'fortran_order'"},
      {"{'descr': '<f4', 'fortran_order': False, }", "missing key 'shape'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
       "duplicate key 'descr'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", "unknown key 'x'"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (1,), }", "expected ',' or '}'"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (1,), }", "expected ':'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'abc", "unterminated string"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", "negative dimension"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1), }", "is not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,,), }", "expected a dimension"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (1,), }", "expected True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,) 'x'}", "expected ',' or '}'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }}", "unexpected text after"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ", "expected a quoted string"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
       "does not fit in 64 bits"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 0), }",
       "the count overflows"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }",
       "(more than 2^64 bytes)"},
      {"garbage", "expected '{'"},
  };
  for (const auto& [dict, text] : cases) {
    SCOPED_TRACE(dict);
    EXPECT_PARSE_ERROR(v1_file(dict, {1}), text);
  }
}

TEST(NpyErrors, SerializeValidatesShape) {
  const float data[] = {1, 2, 3, 4};
  const size_t ok[] = {2, 2}, wrong[] = {3, 2}, four[] = {1, 1, 2, 2};
  EXPECT_NO_THROW(serialize(data, ok));
  EXPECT_THROW(serialize(data, wrong), Error);
  EXPECT_THROW(serialize(data, four), Error);
  EXPECT_THROW(serialize(data, std::span<const size_t>{}), Error);
  const size_t huge[] = {size_t(1) << 40, size_t(1) << 40};
  EXPECT_THROW(serialize(data, huge), Error);
}

TEST(NpyErrors, ReadMissingFileOrDirectoryNamesThePath) {
  const fs::path missing = fs::temp_directory_path() / "tqkv_no_such_dir" / "missing.npy";
  try {
    read(missing);
    FAIL() << "read did not throw";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(missing.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
  EXPECT_THROW(read(fs::temp_directory_path()), Error);
}

TEST(NpyErrors, ReadMalformedFileNamesThePath) {
  const fs::path path = fs::temp_directory_path() /
                        ("tqkv_bad_" + std::to_string(getpid()) + ".npy");
  std::ofstream(path, std::ios::binary) << "not numpy";
  try {
    read(path);
    FAIL() << "read did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), path.string() + ": not a .npy file (bad magic)");
  }
  fs::remove(path);
}

TEST(NpyErrors, WriteIntoMissingDirectoryLeavesNothing) {
  const fs::path dir = fs::temp_directory_path() /
                       ("tqkv_missing_" + std::to_string(getpid()));
  const fs::path path = dir / "out.npy";
  const float data[] = {1, 2};
  const size_t shape[] = {2};
  try {
    write(path, data, shape);
    FAIL() << "write did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace tqkv::npy
