// Packed code layout, shared by every backend.
//
// A b-bit code (b = 1..8) is split into fields whose widths are the binary digits of b, widest
// first, each a width in {8, 4, 2, 1} that divides a byte, so no code ever straddles a byte:
//     b:      1    2    3      4    5      6      7        8
//     fields: 1    2    2+1    4    4+1    4+2    4+2+1    8
// The first (widest) field holds the code's least significant bits. For n codes, field k is a
// contiguous run of ceil(n * w_k / 8) bytes; code j sits in byte (j * w_k) / 8 at bit
// (j * w_k) % 8, least significant bit first. Fields follow one another in that order. Unused
// trailing bits of a field's last byte are zero.
//
// Why: a GPU lane (or a SIMD lane) fetches the codes of 8 consecutive coordinates from each field
// with one aligned load per field (4 bytes of a 4-bit field, 2 of a 2-bit, 1 of a 1-bit field) and
// extracts each with one shift and one mask — no straddling, no per-width special cases in the
// kernel body. At d = 128 every field is 16, 32, 64 or 128 bytes: all 16-byte aligned.
// QJL sign bits use the 1-bit layout (bit set = +1).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "tqkv/error.hpp"

namespace tqkv {

/// The field widths of a b-bit code, widest first; `count` entries are used.
struct FieldWidths {
  std::array<int, 4> width{};
  int count = 0;
};

constexpr FieldWidths field_widths(int bits) {
  FieldWidths f;
  for (int w : {8, 4, 2, 1})
    if (bits & w) f.width[f.count++] = w;
  return f;
}

/// The code bit where field k of a b-bit code starts (the sum of the widths before it). Field k of
/// n codes starts at byte n · field_shift(b, k) / 8 of the packed codes (n a multiple of 8).
constexpr int field_shift(int bits, int k) {
  int s = 0;
  for (int i = 0; i < k; ++i) s += field_widths(bits).width[i];
  return s;
}

static_assert(field_widths(7).count == 3 && field_widths(7).width[0] == 4 &&
              field_widths(7).width[2] == 1);
static_assert(field_widths(8).count == 1 && field_widths(3).width[1] == 1);

/// Bytes of n packed b-bit codes (b = 0 gives 0).
constexpr size_t packed_bytes(int bits, size_t n) {
  size_t total = 0;
  const auto f = field_widths(bits);
  for (int k = 0; k < f.count; ++k) total += (n * size_t(f.width[k]) + 7) / 8;
  return total;
}

static_assert(packed_bytes(4, 128) == 64 && packed_bytes(3, 128) == 48 &&
              packed_bytes(1, 128) == 16 && packed_bytes(3, 5) == 3);

namespace detail {
// One field of width W (a compile-time constant, so the loops vectorize), holding code bits
// [shift, shift + W).
template <int W>
void pack_field(const uint8_t* codes, size_t n, int shift, uint8_t* out) {
  constexpr size_t kPerByte = 8 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  const size_t full = n / kPerByte;
  for (size_t i = 0; i < full; ++i) {
    uint32_t byte = 0;
    for (size_t c = 0; c < kPerByte; ++c)
      byte |= ((uint32_t(codes[i * kPerByte + c]) >> shift) & kMask) << (c * W);
    out[i] = uint8_t(byte);
  }
  if (full * kPerByte < n) {  // partial last byte; its unused bits stay zero
    uint32_t byte = 0;
    for (size_t j = full * kPerByte; j < n; ++j)
      byte |= ((uint32_t(codes[j]) >> shift) & kMask) << ((j - full * kPerByte) * W);
    out[full] = uint8_t(byte);
  }
}

template <int W>
void unpack_field(const uint8_t* in, size_t n, int shift, uint8_t* codes) {
  constexpr size_t kPerByte = 8 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  for (size_t j = 0; j < n; ++j) {
    const uint32_t part = (uint32_t(in[j / kPerByte]) >> ((j % kPerByte) * W)) & kMask;
    codes[j] = uint8_t((shift == 0 ? 0u : codes[j]) | (part << shift));
  }
}

// Calls fn(integral_constant<int, width>, shift, byte offset) for each field of a Bits-bit code.
template <int Bits, class Fn, size_t... K>
void for_each_field(size_t n, Fn&& fn, std::index_sequence<K...>) {
  constexpr auto f = field_widths(Bits);
  int shift = 0;
  size_t offset = 0;
  (
      [&] {
        constexpr int w = f.width[K];
        fn(std::integral_constant<int, w>{}, shift, offset);
        shift += w;
        offset += (n * size_t(w) + 7) / 8;
      }(),
      ...);
}
}  // namespace detail

/// Packs n codes (each < 2^Bits) into packed_bytes(Bits, n) bytes at `out`.
template <int Bits>
void pack_codes(const uint8_t* codes, size_t n, uint8_t* out) {
  static_assert(Bits >= 1 && Bits <= 8);
  detail::for_each_field<Bits>(
      n,
      [&](auto w, int shift, size_t offset) {
        detail::pack_field<decltype(w)::value>(codes, n, shift, out + offset);
      },
      std::make_index_sequence<size_t(field_widths(Bits).count)>{});
}

/// Inverse of pack_codes.
template <int Bits>
void unpack_codes(const uint8_t* in, size_t n, uint8_t* codes) {
  static_assert(Bits >= 1 && Bits <= 8);
  detail::for_each_field<Bits>(
      n,
      [&](auto w, int shift, size_t offset) {
        detail::unpack_field<decltype(w)::value>(in + offset, n, shift, codes);
      },
      std::make_index_sequence<size_t(field_widths(Bits).count)>{});
}

/// Calls fn(std::integral_constant<int, bits>) for bits in 1..8: the one place where a run-time
/// bit width becomes a template parameter. Throws tqkv::Error outside 1..8.
template <class Fn>
decltype(auto) dispatch_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 8: return fn(std::integral_constant<int, 8>{});
  }
  throw Error(detail::concat("bit width must be in 1..8, got ", bits));
}

inline void pack_codes(int bits, const uint8_t* codes, size_t n, uint8_t* out) {
  dispatch_bits(bits, [&](auto b) { pack_codes<decltype(b)::value>(codes, n, out); });
}
inline void unpack_codes(int bits, const uint8_t* in, size_t n, uint8_t* codes) {
  dispatch_bits(bits, [&](auto b) { unpack_codes<decltype(b)::value>(in, n, codes); });
}

}  // namespace tqkv
