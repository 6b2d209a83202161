// Packed code layout (bitpack.hpp): round trips and the exact byte layout.
#include "tqkv/bitpack.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tqkv/error.hpp"

namespace tqkv {
namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

// Independent reference: code j's bits, widest field first holding the low bits.
std::vector<uint8_t> reference_pack(int bits, const std::vector<uint8_t>& codes) {
  const size_t n = codes.size();
  std::vector<uint8_t> out;
  int shift = 0;
  for (int w : {8, 4, 2, 1}) {
    if (!(bits & w)) continue;
    std::vector<uint8_t> field((n * size_t(w) + 7) / 8, 0);
    for (size_t j = 0; j < n; ++j)
      for (int k = 0; k < w; ++k) {
        const size_t bit = j * size_t(w) + size_t(k);
        if ((codes[j] >> (shift + k)) & 1) field[bit / 8] |= uint8_t(1u << (bit % 8));
      }
    out.insert(out.end(), field.begin(), field.end());
    shift += w;
  }
  return out;
}

TEST(Bitpack, PackedBytesFormula) {
  for (int b = 0; b <= 8; ++b)
    for (size_t n : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 127, 128, 129, 1000}) {
      size_t want = 0;
      for (int w : {8, 4, 2, 1})
        if (b & w) want += (n * size_t(w) + 7) / 8;
      EXPECT_EQ(packed_bytes(b, n), want) << "b = " << b << " n = " << n;
      if (n % 8 == 0) EXPECT_EQ(packed_bytes(b, n), n * size_t(b) / 8);
    }
  EXPECT_EQ(packed_bytes(3, 1), 2u);  // 2-bit field + 1-bit field, one byte each
  EXPECT_EQ(packed_bytes(7, 3), 4u);  // 2 + 1 + 1
}

TEST(Bitpack, RoundTripAllWidthsAndLengths) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<size_t> lengths;
  for (size_t n = 1; n <= 70; ++n) lengths.push_back(n);
  for (size_t n : {127, 128, 129, 1000}) lengths.push_back(n);
  for (int b = 1; b <= 8; ++b)
    for (size_t n : lengths) {
      SCOPED_TRACE("b = " + std::to_string(b) + " n = " + std::to_string(n));
      std::vector<uint8_t> codes(n);
      for (auto& c : codes) c = uint8_t(rng() & ((1u << b) - 1));
      if (n > 1) codes[0] = uint8_t((1u << b) - 1), codes[n - 1] = codes[0];  // all ones at ends
      const size_t bytes = packed_bytes(b, n);
      std::vector<uint8_t> packed(bytes + 8, 0xCD);  // guard bytes after the end
      pack_codes(b, codes.data(), n, packed.data());
      for (size_t i = bytes; i < bytes + 8; ++i) ASSERT_EQ(packed[i], 0xCD) << "overrun";
      packed.resize(bytes);
      ASSERT_EQ(packed, reference_pack(b, codes));  // includes zero trailing bits
      std::vector<uint8_t> back(n + 8, 0xEE);
      unpack_codes(b, packed.data(), n, back.data());
      for (size_t i = n; i < n + 8; ++i) ASSERT_EQ(back[i], 0xEE) << "overrun";
      back.resize(n);
      ASSERT_EQ(back, codes);
    }
}

TEST(Bitpack, TrailingBitsAreZero) {
  // Codes of all ones: every used bit is 1, so any other set bit is garbage.
  for (int b = 1; b <= 8; ++b)
    for (size_t n = 1; n <= 20; ++n) {
      std::vector<uint8_t> codes(n, uint8_t((1u << b) - 1));
      std::vector<uint8_t> packed(packed_bytes(b, n), 0xFF);  // dirty output buffer
      pack_codes(b, codes.data(), n, packed.data());
      size_t off = 0;
      for (int w : {8, 4, 2, 1}) {
        if (!(b & w)) continue;
        const size_t used = n * size_t(w), bytes = (used + 7) / 8;
        const uint8_t last = packed[off + bytes - 1];
        const int valid = int(used - (bytes - 1) * 8);
        EXPECT_EQ(last, uint8_t((1u << valid) - 1)) << "b = " << b << " n = " << n << " w = " << w;
        off += bytes;
      }
    }
}

TEST(Bitpack, LayoutSpotChecks) {
  // 4-bit: code j in byte j / 2, low nibble first.
  {
    const uint8_t codes[4] = {0x1, 0x2, 0xA, 0xF};
    uint8_t out[2];
    pack_codes(4, codes, 4, out);
    EXPECT_EQ(out[0], 0x21);
    EXPECT_EQ(out[1], 0xFA);
  }
  // 3-bit: a 2-bit field (low bits) then a 1-bit field (bit 2).
  {
    const uint8_t codes[5] = {0b101, 0b010, 0b111, 0b000, 0b110};
    uint8_t out[3];
    ASSERT_EQ(packed_bytes(3, 5), 3u);
    pack_codes(3, codes, 5, out);
    EXPECT_EQ(out[0], uint8_t(0b00'11'10'01));  // low bits 01, 10, 11, 00 from bit 0 up
    EXPECT_EQ(out[1], uint8_t(0b10));           // low bits of code 4
    EXPECT_EQ(out[2], uint8_t(0b10101));        // high bits 1, 0, 1, 0, 1
  }
  // 1-bit: bit j of byte j / 8, LSB first.
  {
    uint8_t codes[9] = {1, 0, 0, 0, 0, 0, 0, 1, 1};
    uint8_t out[2];
    pack_codes(1, codes, 9, out);
    EXPECT_EQ(out[0], 0x81);
    EXPECT_EQ(out[1], 0x01);
  }
  // 7-bit: 4 + 2 + 1 fields; code 0x5B = 101 1011 -> nibble 1011, 2-bit 01, 1-bit 1.
  {
    const uint8_t codes[2] = {0x5B, 0x00};
    uint8_t out[3];
    ASSERT_EQ(packed_bytes(7, 2), 3u);
    pack_codes(7, codes, 2, out);
    EXPECT_EQ(out[0], 0x0B);
    EXPECT_EQ(out[1], 0x01);
    EXPECT_EQ(out[2], 0x01);
  }
  // 8-bit is the identity.
  {
    const uint8_t codes[3] = {0, 200, 255};
    uint8_t out[3];
    pack_codes(8, codes, 3, out);
    EXPECT_EQ(out[1], 200);
    EXPECT_EQ(out[2], 255);
  }
}

TEST(Bitpack, FieldWidthsAndDispatch) {
  const int expect[9][3] = {{0, 0, 0}, {1, 0, 0}, {2, 0, 0}, {2, 1, 0}, {4, 0, 0},
                            {4, 1, 0}, {4, 2, 0}, {4, 2, 1}, {8, 0, 0}};
  for (int b = 1; b <= 8; ++b) {
    const auto f = field_widths(b);
    int sum = 0;
    for (int k = 0; k < 3; ++k) EXPECT_EQ(k < f.count ? f.width[k] : 0, expect[b][k]) << b;
    for (int k = 0; k < f.count; ++k) sum += f.width[k];
    EXPECT_EQ(sum, b);
  }
  uint8_t c = 0, o = 0;
  EXPECT_THROW(pack_codes(0, &c, 1, &o), Error);
  EXPECT_THROW(unpack_codes(9, &o, 1, &c), Error);
}

}  // namespace
}  // namespace tqkv
