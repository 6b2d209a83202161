// Reading and writing NumPy .npy files: float32 and float16, C order, 1 to 3 dimensions.
// Enough of the format to exchange KV tensors with Python without a NumPy dependency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tqkv::npy {

enum class DType { f32, f16 };

/// A C-order array of 1 to 3 dimensions read from a .npy file, widened to float32.
struct Array {
  DType stored = DType::f32;  // the element type in the file
  std::vector<size_t> shape;  // 1..3 dims
  std::vector<float> data;    // product(shape) elements, C order

  /// Number of rows of `cols()` elements: 1 for 1-D, N for [N, d], A*B for [A, B, d].
  /// 0 if there is no shape.
  size_t rows() const;
  /// The last dimension (0 if no shape).
  size_t cols() const;
};

/// Parses the bytes of a .npy file. `name` is used in error messages. Throws tqkv::Error.
Array parse(std::span<const uint8_t> bytes, std::string_view name);

/// Reads a .npy file. Throws tqkv::Error naming the path (missing file, unreadable, malformed).
Array read(const std::filesystem::path& path);

/// Serializes a C-order array (1..3 dims) as .npy format version 1.0 (2.0 if the header needs it).
std::vector<uint8_t> serialize(std::span<const float> data, std::span<const size_t> shape,
                               DType stored = DType::f32);

/// Writes a .npy file atomically (write to "<path>.tmp" then rename), so a failed write never
/// leaves a half file at `path`. Throws tqkv::Error naming the path.
void write(const std::filesystem::path& path, std::span<const float> data,
           std::span<const size_t> shape, DType stored = DType::f32);

}  // namespace tqkv::npy
