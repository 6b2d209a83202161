// IEEE binary16 (float16) and bfloat16 <-> float32 conversion, round to nearest even.
// Written with integer operations only, so the result is the same on every compiler and on the
// GPU (where the hardware conversion instructions round the same way).
#pragma once

#include <bit>
#include <cstdint>

namespace tqkv {

/// float16 bits -> float32. Exact for every input (NaN payloads keep their quiet bit set).
constexpr float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return std::bit_cast<float>(sign);  // signed zero
  // Subnormal half: normalise into a float32 normal.
  uint32_t e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return std::bit_cast<float>(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

/// float32 -> float16 bits, round to nearest even; overflow gives inf, NaN stays NaN.
constexpr uint16_t float_to_half(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t exp = (x >> 23) & 0xffu;
  const uint32_t mant = x & 0x7fffffu;
  if (exp == 0xff) return uint16_t(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
  const int e = int(exp) - 127 + 15;  // rebiased exponent
  if (e >= 31) return uint16_t(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return sign;  // below half the smallest subnormal: rounds to zero
    const uint32_t full = mant | 0x800000u;
    const int shift = 14 - e;  // 24-bit significand down to a 10-bit subnormal field
    uint32_t h = full >> shift;
    const uint32_t rest = full & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = (uint32_t(e) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into inf: correct
  return uint16_t(sign | h);
}

/// bfloat16 bits -> float32 (exact).
constexpr float bf16_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

/// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.
constexpr uint16_t float_to_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/// Largest finite float16 value.
inline constexpr float kHalfMax = 65504.0f;

}  // namespace tqkv
