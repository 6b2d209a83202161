#include "tqkv/file.hpp"

#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"
#include "tqkv/codec.hpp"
#include "tqkv/error.hpp"

namespace tqkv::file {
namespace {

namespace fs = std::filesystem;
using testing::error_of;

void put_u32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + size_t(i)] = uint8_t(v >> (8 * i));
}
void put_u64(std::vector<uint8_t>& b, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) b[at + size_t(i)] = uint8_t(v >> (8 * i));
}
uint64_t get_u64(const std::vector<uint8_t>& b, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(b[at + size_t(i)]) << (8 * i);
  return v;
}

// Recomputes the preamble hash after a test has patched a preamble field, so that the parser
// gets past the checksum and reports the field itself.
void reseal(std::vector<uint8_t>& b) { put_u64(b, 48, XXH3_64bits(b.data(), 48)); }

std::string parse_error(const std::vector<uint8_t>& bytes) {
  return error_of([&] { parse_encoded(bytes, "X.tqkv"); });
}

#define EXPECT_PARSE_ERROR(bytes, text)                                    \
  do {                                                                     \
    const std::string msg_ = parse_error(bytes);                           \
    EXPECT_NE(msg_.find(text), std::string::npos) << "message: " << msg_;  \
    EXPECT_EQ(msg_.rfind("X.tqkv: ", 0), 0u) << "message: " << msg_;       \
  } while (0)

// Replaces the one occurrence of `from` in `s`.
std::string replaced(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << "'" << from << "' not in " << s;
  if (at == std::string::npos) return s;
  EXPECT_EQ(s.find(from, at + 1), std::string::npos) << "'" << from << "' twice in " << s;
  return s.replace(at, from.size(), to);
}

std::vector<uint8_t> with_metadata(std::string metadata, std::vector<uint8_t> payload) {
  Container c;
  c.metadata = std::move(metadata);
  c.payload = std::move(payload);
  return serialize(c);
}

class FileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }

  std::vector<float> random_vectors(size_t n, int dim) {
    std::normal_distribution<float> dist(0.0f, 2.0f);
    std::vector<float> v(n * size_t(dim));
    for (float& x : v) x = dist(rng_);
    // Some channels with more energy, so the outlier choice is not a coin toss.
    for (size_t i = 0; i < n; ++i)
      for (int j = 0; j < dim; j += 3) v[i * size_t(dim) + size_t(j)] *= 4.0f;
    return v;
  }

  // Encodes n random vectors with a fresh codec for `spec`; the spec in the result is the
  // codec's own (outlier channels included).
  EncodedVectors encode(const CodecSpec& spec, size_t n, std::vector<float>* decoded = nullptr) {
    const Codec codec(spec);
    const std::vector<float> x = random_vectors(n, spec.dim);
    EncodedVectors ev;
    ev.count = n;
    ev.record_bytes = codec.record_bytes();
    ev.records.resize(n * ev.record_bytes);
    codec.encode(x.data(), n, ev.records.data());
    ev.spec = codec.spec();
    if (decoded) {
      decoded->resize(n * size_t(spec.dim));
      codec.decode(ev.records.data(), n, decoded->data());
    }
    return ev;
  }

  // A small valid encoded-vectors file.
  std::vector<uint8_t> small_file() {
    CodecSpec spec;
    spec.dim = 8;
    spec.bits = 2;
    spec.seed = rng_();
    return serialize_encoded(encode(spec, 3));
  }

  std::string metadata_of(const std::vector<uint8_t>& file) { return parse(file, "m").metadata; }

  uint32_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_F(FileTest, ContainerRoundTripAndLayout) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (const size_t payload_size : {size_t(0), size_t(1), size_t(rng_() % 5000)}) {
    Container c;
    c.metadata = "{\"n\": " + std::to_string(rng_()) + ", \"s\": \"caf\xc3\xa9 \xf0\x9f\x98\x80\"}";
    c.payload.resize(payload_size);
    for (uint8_t& b : c.payload) b = uint8_t(rng_());
    const std::vector<uint8_t> file = serialize(c);
    ASSERT_EQ(file.size(), kPreambleBytes + c.metadata.size() + payload_size);
    EXPECT_EQ(std::memcmp(file.data(), "TQKVFILE", 8), 0);
    EXPECT_EQ(file[8], 1);   // version, little-endian
    EXPECT_EQ(file[12], 1);  // kind
    EXPECT_EQ(get_u64(file, 16), c.metadata.size());
    EXPECT_EQ(get_u64(file, 24), payload_size);
    EXPECT_EQ(get_u64(file, 32), XXH3_64bits(c.metadata.data(), c.metadata.size()));
    EXPECT_EQ(get_u64(file, 40), XXH3_64bits(c.payload.data(), payload_size));
    EXPECT_EQ(get_u64(file, 48), XXH3_64bits(file.data(), 48));
    EXPECT_EQ(std::string(file.begin() + 56, file.begin() + 56 + long(c.metadata.size())),
              c.metadata);

    const Container back = parse(file, "c.tqkv");
    EXPECT_EQ(back.kind, Kind::encoded_vectors);
    EXPECT_EQ(back.metadata, c.metadata);
    EXPECT_EQ(back.payload, c.payload);
  }
}

TEST_F(FileTest, EncodedRoundTripThroughCodec) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::vector<CodecSpec> specs(8);
  specs[0] = {64, 4.0, CodecKind::mse, RotationChoice::automatic, rng_(), NormFormat::f16, {}};
  specs[1] = {96, 3.0, CodecKind::prod, RotationChoice::automatic, rng_(), NormFormat::f16, {}};
  specs[2] = {128, 2.5, CodecKind::mse, RotationChoice::automatic, rng_(), NormFormat::f16, {}};
  specs[3] = {48, 2.0, CodecKind::mse, RotationChoice::dense, (uint64_t(1) << 63) + 5,
              NormFormat::f32, {}};
  specs[4] = {64, 3.5, CodecKind::prod, RotationChoice::hadamard, rng_(), NormFormat::f32, {}};
  specs[5] = {40, 1.0, CodecKind::prod, RotationChoice::dense,
              std::numeric_limits<uint64_t>::max(), NormFormat::f16, {}};
  // Centering codecs: the offset each chose travels in the file.
  specs[6] = {64, 3.0, CodecKind::mse, RotationChoice::automatic, rng_(), NormFormat::f16, {},
              true};
  specs[7] = {128, 3.5, CodecKind::prod, RotationChoice::automatic, rng_(), NormFormat::f16, {},
              true};
  for (const CodecSpec& spec : specs) {
    SCOPED_TRACE(spec_to_json(spec));
    const size_t n = 1 + rng_() % 20;
    std::vector<float> decoded;
    const EncodedVectors ev = encode(spec, n, &decoded);
    if (spec.bits != std::floor(spec.bits)) {
      EXPECT_FALSE(ev.spec.outlier_channels.empty());
    }
    EXPECT_EQ(ev.spec.offset.size(), spec.center ? size_t(spec.dim) : 0u);

    const EncodedVectors back = parse_encoded(serialize_encoded(ev), "rt.tqkv");
    EXPECT_EQ(back.spec, ev.spec);
    EXPECT_EQ(back.count, n);
    EXPECT_EQ(back.record_bytes, ev.record_bytes);
    EXPECT_EQ(back.records, ev.records);

    // A codec rebuilt from the file alone decodes bit for bit as the one that encoded.
    const Codec codec(back.spec);
    std::vector<float> again(n * size_t(spec.dim));
    codec.decode(back.records.data(), n, again.data());
    ASSERT_EQ(std::memcmp(again.data(), decoded.data(), again.size() * sizeof(float)), 0);
  }
}

TEST_F(FileTest, MetadataIsTheDocumentedJson) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  CodecSpec spec{128, 2.5, CodecKind::prod, RotationChoice::dense, (uint64_t(1) << 63) + 5,
                 NormFormat::f32, {}};
  const EncodedVectors ev = encode(spec, 4);
  std::string channels;
  for (const int c : ev.spec.outlier_channels) channels += (channels.empty() ? "" : ",") +
                                                          std::to_string(c);
  EXPECT_EQ(metadata_of(serialize_encoded(ev)),
            "{\"codec\":{\"dim\":128,\"bits\":2.5,\"kind\":\"prod\",\"rotation\":\"dense\","
            "\"seed\":9223372036854775813,\"norm_format\":\"f32\",\"outlier_channels\":[" +
                channels + "]},\"count\":4,\"record_bytes\":" +
                std::to_string(ev.record_bytes) + ",\"tqkv_version\":\"0.1.0\"}");
}

TEST_F(FileTest, SpecJsonRoundTrip) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (int trial = 0; trial < 50; ++trial) {
    CodecSpec spec;
    spec.dim = 2 + int(rng_() % 65535);
    spec.bits = 1 + double(rng_() % 800) / 100;
    spec.kind = rng_() % 2 ? CodecKind::prod : CodecKind::mse;
    spec.rotation = RotationChoice(rng_() % 3);
    spec.seed = rng_();
    spec.norm_format = rng_() % 2 ? NormFormat::f32 : NormFormat::f16;
    for (int c = 0; c < spec.dim && c < 100; ++c)
      if (rng_() % 3 == 0) spec.outlier_channels.push_back(c);
    if (trial % 2 == 0 && spec.dim <= 4096) {  // centering, with an offset or not chosen yet
      spec.center = true;
      std::normal_distribution<float> g(0.0f, 100.0f);
      if (trial % 4 == 0)
        for (int j = 0; j < spec.dim; ++j) spec.offset.push_back(g(rng_));
    }
    const std::string text = spec_to_json(spec);
    EXPECT_EQ(spec_from_json(text, "s.json"), spec) << text;
  }
}

TEST(File, SpecFromJsonIsStrict) {
  const std::string good =
      R"({"dim":8,"bits":2,"kind":"mse","rotation":"auto","seed":1,"norm_format":"f16",)"
      R"("outlier_channels":[]})";
  EXPECT_EQ(spec_from_json(good, "s.json").dim, 8);
  const auto err = [&](const std::string& from, const std::string& to) {
    return error_of([&] { spec_from_json(replaced(good, from, to), "s.json"); });
  };
  const auto expect_err = [&](const std::string& from, const std::string& to,
                              const std::string& text) {
    const std::string msg = err(from, to);
    EXPECT_NE(msg.find(text), std::string::npos) << msg;
    EXPECT_EQ(msg.rfind("s.json: ", 0), 0u) << msg;
  };
  expect_err("\"seed\":1,", "", "missing key 'seed'");
  expect_err("\"seed\":1", "\"seed\":1,\"extra\":0", "unknown key 'extra'");
  expect_err("\"seed\":1", "\"seed\":1,\"seed\":2", "duplicate key 'seed'");
  expect_err("\"seed\":1", "\"seed\":-1", "'seed' must be a non-negative integer");
  expect_err("\"seed\":1", "\"seed\":1.0", "'seed' must be a non-negative integer");
  expect_err("\"seed\":1", "\"seed\":18446744073709551616", "'seed' must be");
  expect_err("\"dim\":8", "\"dim\":\"8\"", "'dim' must be a non-negative integer, got string");
  expect_err("\"dim\":8", "\"dim\":1", "'dim' is 1");
  expect_err("\"dim\":8", "\"dim\":65537", "'dim' is 65537");
  expect_err("\"bits\":2", "\"bits\":0.5", "'bits' is 0.5");
  expect_err("\"bits\":2", "\"bits\":\"2\"", "'bits' must be a number");
  expect_err("\"bits\":2", "\"bits\":1e999", "number overflow");
  expect_err("\"mse\"", "\"msx\"", "unknown codec 'msx'");
  expect_err("\"auto\"", "\"spiral\"", "unknown rotation 'spiral'");
  expect_err("\"f16\"", "\"f64\"", "unknown norm format 'f64'");
  expect_err("[]", "[3,1]", "strictly ascending");
  expect_err("[]", "[2,2]", "strictly ascending");
  expect_err("[]", "[8]", "outlier_channels[0] must be a channel index in 0..7");
  expect_err("[]", "[-1]", "outlier_channels[0]");
  expect_err("[]", "{}", "'outlier_channels' must be an array");
  // Centering keys are optional; when present they are checked.
  EXPECT_TRUE(spec_from_json(replaced(good, "[]}", "[],\"center\":true}"), "s.json").center);
  EXPECT_EQ(spec_from_json(replaced(good, "[]}", "[],\"center\":true,\"offset\":[1,2,3,4,5,6,7,8.5]}"),
                           "s.json").offset.back(), 8.5f);
  expect_err("[]}", "[],\"center\":1}", "'center' must be true or false");
  expect_err("[]}", "[],\"center\":false,\"offset\":[1,2,3,4,5,6,7,8]}",
             "'offset' given but 'center' is false");
  expect_err("[]}", "[],\"center\":true,\"offset\":[1,2]}", "'offset' must be an array of 8");
  expect_err("[]}", "[],\"center\":true,\"offset\":[1,2,3,4,5,6,7,\"x\"]}",
             "offset[7] must be a finite number");
  expect_err("[]}", "[],\"center\":true,\"offset\":[1,2,3,4,5,6,7,1e300]}",
             "offset[7] must be a finite number in float32's range");
  expect_err("[]}", "[],\"centre\":true}", "unknown key 'centre'");
  expect_err("{\"dim\"", "[{\"dim\"", "not valid JSON");
  EXPECT_NE(error_of([] { spec_from_json("[1]", "s.json"); }).find("must be a JSON object"),
            std::string::npos);
  EXPECT_NE(error_of([] { spec_from_json("{\"a\":\"\xc0\xaf\"}", "s.json"); }).find("UTF-8"),
            std::string::npos);
}

TEST_F(FileTest, TruncationAtEveryOffsetThrows) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const std::vector<uint8_t> file = small_file();
  ASSERT_NO_THROW(parse_encoded(file, "ok.tqkv"));
  for (size_t len = 0; len < file.size(); ++len) {
    const std::vector<uint8_t> cut(file.begin(), file.begin() + long(len));
    EXPECT_THROW(parse(cut, "X.tqkv"), Error) << len;
    const std::string msg = parse_error(cut);
    EXPECT_NE(msg.find("truncated"), std::string::npos) << len << ": " << msg;
  }
  // One extra byte is as wrong as one missing.
  std::vector<uint8_t> longer = file;
  longer.push_back(0);
  EXPECT_PARSE_ERROR(longer, "1 unexpected bytes after the payload");
}

TEST_F(FileTest, EveryBitFlipThrows) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const std::vector<uint8_t> file = small_file();
  for (size_t at = 0; at < file.size(); ++at) {
    for (int bit = 0; bit < 8; ++bit) {
      std::vector<uint8_t> bad = file;
      bad[at] ^= uint8_t(1u << bit);
      EXPECT_THROW(parse(bad, "X.tqkv"), Error) << at << " bit " << bit;
      EXPECT_THROW(parse_encoded(bad, "X.tqkv"), Error) << at << " bit " << bit;
    }
  }
}

TEST_F(FileTest, PreambleErrorsSayWhatIsWrong) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const std::vector<uint8_t> file = small_file();

  std::vector<uint8_t> bad = file;
  bad[0] = 'X';
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "not a tqkv file (bad magic)");
  EXPECT_PARSE_ERROR(std::vector<uint8_t>({'P', 'K'}), "bad magic");

  bad = file;
  put_u32(bad, 8, 2);
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "unsupported format version 2 (this build reads version 1)");

  bad = file;
  put_u32(bad, 12, 7);
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "unsupported file kind 7");

  bad = file;
  put_u32(bad, 12, 7);  // not resealed
  EXPECT_PARSE_ERROR(bad, "checksum mismatch in preamble (file corrupted)");

  bad = file;
  bad[60] ^= 1;
  EXPECT_PARSE_ERROR(bad, "checksum mismatch in metadata (file corrupted)");
  bad = file;
  bad.back() ^= 0x80;
  EXPECT_PARSE_ERROR(bad, "checksum mismatch in payload (file corrupted)");

  const uint64_t m = get_u64(file, 16), p = get_u64(file, 24);
  bad = file;
  put_u64(bad, 24, 1234);
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "truncated: header promises 1234 bytes of payload, file has " +
                              std::to_string(p));
  bad = file;
  put_u64(bad, 16, ~uint64_t(0));  // sums must not overflow
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "truncated: header promises 18446744073709551615 bytes of metadata");
  bad = file;
  put_u64(bad, 24, ~uint64_t(0) - m - 40);
  reseal(bad);
  EXPECT_PARSE_ERROR(bad, "truncated");
  EXPECT_PARSE_ERROR(std::vector<uint8_t>(file.begin(), file.begin() + 30),
                     "truncated: the file is 30 bytes and ends inside the 56-byte preamble");
}

TEST_F(FileTest, MetadataErrorsSayWhatIsWrong) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const std::vector<uint8_t> file = small_file();
  const std::string meta = metadata_of(file);
  const std::vector<uint8_t> payload = parse(file, "m").payload;
  const auto edited = [&](const std::string& from, const std::string& to) {
    return with_metadata(replaced(meta, from, to), payload);
  };
  // The hand-made container itself is fine.
  EXPECT_NO_THROW(parse_encoded(with_metadata(meta, payload), "X.tqkv"));

  EXPECT_PARSE_ERROR(edited("\"count\":3", "\"count\":3,\"extra\":1"),
                     "metadata: unknown key 'extra'");
  EXPECT_PARSE_ERROR(edited("\"count\":3,", ""), "metadata: missing key 'count'");
  EXPECT_PARSE_ERROR(edited("\"count\":3", "\"count\":3,\"count\":3"), "duplicate key 'count'");
  EXPECT_PARSE_ERROR(edited("\"count\":3", "\"count\":\"3\""), "'count' must be a non-negative");
  EXPECT_PARSE_ERROR(edited("\"count\":3", "\"count\":4"),
                     "payload is " + std::to_string(payload.size()) + " bytes, but count 4");
  EXPECT_PARSE_ERROR(edited("\"count\":3", "\"count\":18446744073709551615"),
                     "needs more than 2^64");
  EXPECT_PARSE_ERROR(edited("\"tqkv_version\":\"0.1.0\"", "\"tqkv_version\":1"),
                     "'tqkv_version' must be a string");
  EXPECT_PARSE_ERROR(edited("\"seed\":", "\"extra\":0,\"seed\":"),
                     "codec spec: unknown key 'extra'");
  EXPECT_PARSE_ERROR(edited("\"norm_format\":\"f16\",", ""), "codec spec: missing key");
  EXPECT_PARSE_ERROR(edited("\"kind\":\"mse\"", "\"kind\":\"nope\""), "unknown codec 'nope'");

  // Record size that does not match the codec (hashes are valid: this is not corruption).
  const size_t r = payload.size() / 3;
  const std::vector<uint8_t> wrong_r =
      with_metadata(replaced(meta, "\"record_bytes\":" + std::to_string(r),
                             "\"record_bytes\":" + std::to_string(r + 1)),
                    std::vector<uint8_t>(3 * (r + 1)));
  EXPECT_PARSE_ERROR(wrong_r, "record_bytes is " + std::to_string(r + 1));
  EXPECT_PARSE_ERROR(wrong_r, "has " + std::to_string(r) + "-byte records");

  // Codec validation errors keep the file name.
  const std::string hadamard_12 = replaced(replaced(meta, "\"dim\":8", "\"dim\":12"),
                                           "\"rotation\":\"auto\"", "\"rotation\":\"hadamard\"");
  EXPECT_PARSE_ERROR(with_metadata(hadamard_12, payload), "power-of-two dimension");

  EXPECT_PARSE_ERROR(with_metadata("[1,2]", payload), "metadata must be a JSON object");
  EXPECT_PARSE_ERROR(with_metadata("{\"a\":", payload), "metadata is not valid JSON");
  EXPECT_PARSE_ERROR(with_metadata("{\"a\":\"\xed\xa0\x80\"}", payload),
                     "metadata is not valid UTF-8 (at byte 6)");
  EXPECT_PARSE_ERROR(with_metadata(std::string(100, '[') + std::string(100, ']'), payload),
                     "nested more than");
  EXPECT_PARSE_ERROR(with_metadata("", payload), "not valid JSON");
}

TEST_F(FileTest, FractionalCodecWithoutChannelsIsRejected) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  CodecSpec spec{16, 2.5, CodecKind::mse, RotationChoice::automatic, rng_(), NormFormat::f16, {}};
  EncodedVectors ev = encode(spec, 2);
  const std::vector<uint8_t> good = serialize_encoded(ev);
  EXPECT_NO_THROW(parse_encoded(good, "X.tqkv"));
  ev.spec.outlier_channels.clear();
  EXPECT_PARSE_ERROR(serialize_encoded(ev), "no outlier_channels");
  ev.spec.outlier_channels = {0, 1, 2};  // 8 needed
  EXPECT_PARSE_ERROR(serialize_encoded(ev), "needs 8 outlier channels");
  // A centering codec without its offset says so.
  CodecSpec centered{16, 3.0, CodecKind::mse, RotationChoice::automatic, rng_(), NormFormat::f16,
                     {}, true};
  EncodedVectors evc = encode(centered, 2);
  evc.spec.offset.clear();
  EXPECT_PARSE_ERROR(serialize_encoded(evc), "centers but has no offset");
}

TEST_F(FileTest, EmptyBatchRoundTrips) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  EncodedVectors ev;
  ev.spec.dim = 32;
  ev.spec.seed = rng_();
  ev.record_bytes = Codec(ev.spec).record_bytes();
  const EncodedVectors back = parse_encoded(serialize_encoded(ev), "e.tqkv");
  EXPECT_EQ(back.spec, ev.spec);
  EXPECT_EQ(back.count, 0u);
  EXPECT_TRUE(back.records.empty());
}

TEST(File, SerializeChecksItsInput) {
  EncodedVectors ev;
  ev.spec.dim = 8;
  ev.count = 2;
  ev.record_bytes = Codec(ev.spec).record_bytes();
  ev.records.resize(2 * ev.record_bytes - 1);
  EXPECT_NE(error_of([&] { serialize_encoded(ev); }).find("count 2"), std::string::npos);
  ev.records.resize(2 * ev.record_bytes);
  ev.spec.bits = std::nan("");
  EXPECT_THROW(serialize_encoded(ev), Error);
  Container c;
  c.kind = Kind(9);
  EXPECT_THROW(serialize(c), Error);
}

TEST_F(FileTest, WriteThenReadLeavesNoTempFile) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const fs::path dir = fs::temp_directory_path() /
                       ("tqkv_file_" + std::to_string(getpid()) + "_" + std::to_string(seed_));
  fs::create_directories(dir);
  const fs::path path = dir / "kv.tqkv";
  CodecSpec spec{64, 3.0, CodecKind::prod, RotationChoice::automatic, rng_(), NormFormat::f16, {}};
  const EncodedVectors ev = encode(spec, 5);
  write_encoded(path, ev);
  write_encoded(path, ev);  // overwriting works too
  const EncodedVectors back = read_encoded(path);
  EXPECT_EQ(back.spec, ev.spec);
  EXPECT_EQ(back.records, ev.records);
  EXPECT_EQ(read_bytes(path), serialize_encoded(ev));
  EXPECT_FALSE(fs::exists(dir / "kv.tqkv.tmp"));

  // Errors from a file on disk name its path.
  std::vector<uint8_t> bytes = read_bytes(path);
  bytes.pop_back();
  write_bytes(path, bytes);
  const std::string msg = error_of([&] { read_encoded(path); });
  EXPECT_EQ(msg.rfind(path.string() + ": truncated", 0), 0u) << msg;
  fs::remove_all(dir);
}

TEST_F(FileTest, ReadMissingPathNamesIt) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const fs::path path = fs::temp_directory_path() / ("tqkv_missing_" + std::to_string(seed_)) /
                        "nope.tqkv";
  const std::string msg = error_of([&] { read_bytes(path); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { read_encoded(path); }).find(path.string()), std::string::npos);
  const std::string dir_msg = error_of([&] { read_bytes(fs::temp_directory_path()); });
  EXPECT_NE(dir_msg.find("is a directory"), std::string::npos) << dir_msg;
}

TEST_F(FileTest, WriteIntoMissingDirectoryThrowsAndLeavesNothing) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const fs::path dir = fs::temp_directory_path() / ("tqkv_nodir_" + std::to_string(seed_));
  const fs::path path = dir / "out.tqkv";
  ASSERT_FALSE(fs::exists(dir));
  const std::string msg = error_of([&] { write_encoded(path, parse_encoded(small_file(), "s")); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(dir));
}

}  // namespace
}  // namespace tqkv::file
