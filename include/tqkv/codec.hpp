// TurboQuant codecs: TurboQuant_mse and TurboQuant_prod (SPEC §1), with integer or fractional
// bit widths, encoding batches of vectors into fixed-size records.
//
// Encoding one vector x ∈ R^d with one quantizer (a "channel group", see below):
//   n = ‖x‖ (float32, canonical_dot order);       w = Π_unscaled x;     y = w · (gain / n)
//   mse:  idx_j = #{k : boundary_k < y_j}          (boundaries of the Lloyd–Max codebook)
//   prod: the same at b − 1 bits (no code at b = 1), then in the rotated frame
//         r = y − c[idx],  γ = ‖r‖,  z_i = [⟨S_i, r⟩ >= 0]  (S: d×d i.i.d. N(0,1), seeded)
// Decoding: x̂ = n · Πᵀ (c[idx] + sqrt(π/2)/d · γ · Sᵀ z)   (the QJL term for prod only).
// The QJL matrix acts on the residual in the rotated frame. For a fixed rotation Π, S' = S Π is
// again a matrix of i.i.d. N(0,1) entries, so this is exactly the estimator of SPEC §1 with
// matrix S' applied to the residual in the original space — and it needs no inverse rotation
// while encoding, while attention gets S q' from the query it already rotated.
// A zero vector stores n = 0 and decodes to exactly zero. NaN or Inf input is rejected.
//
// Fractional bits: bits = B + f with f·d an integer in (0, d) splits the channels into an
// "outlier" group of f·d channels quantized at B + 1 bits and the rest at B bits, each group an
// independent quantizer with its own rotation (substream 0 and 1 of the seed) and codebook. So
// 2.5 bits at d = 128 is 64 channels at 3 bits + 64 at 2; 3.5 is 64 at 4 + 64 at 3; the split
// 32 × 3 + 96 × 2 is 2.25 bits. Outlier channels are given in the spec or, if not, chosen from
// the first batch the codec encodes: the f·d channels of largest mean square (ties: lower index).
//
// Centering (CodecSpec::center): the codec encodes x − μ and decodes to x̂ + μ, for a fixed
// per-channel offset μ: given in the spec or, if not, the mean of the first batch encoded (summed
// in float64 in row order, rounded to float32; outlier channels are then chosen from the centered
// batch). Real keys and values share a large common component (LLM keys: channels whose mean is
// many times their spread), which the rotation would otherwise spread over every coordinate and
// every token's error. Attention needs no change for it: centered keys shift every score of a
// query by the same ⟨q, μ_K⟩, which softmax ignores, and centered values add μ_V to the output
// (the weights sum to 1). A first batch of very few tokens gives a poor μ; prefer a prefill-sized
// batch or give μ.
//
// Record layout (one encoded vector): the groups' parts, outlier group first; each part is
//   [MSE code fields: packed_bytes(mse_bits, d_g)] [QJL signs: ceil(d_g/8), prod only]
//   [norm n: 2 bytes f16 or 4 bytes f32] [γ: same format, prod only]
// little-endian, no padding. The stored norm is n rounded to the norm format; a norm that does
// not fit it (above 65504 for f16) is an error, never an infinity. With f16, norms below
// 6.1e-5 lose relative precision (float16 subnormals) and norms below 3e-8 store as zero.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tqkv/codebook.hpp"
#include "tqkv/rotation.hpp"

namespace tqkv {

enum class CodecKind : uint8_t { mse = 0, prod = 1 };
enum class RotationChoice : uint8_t { automatic = 0, hadamard = 1, dense = 2 };
enum class NormFormat : uint8_t { f16 = 0, f32 = 1 };
enum class ScalarType : uint8_t { f32 = 0, f16 = 1, bf16 = 2 };

const char* to_string(CodecKind kind);
const char* to_string(RotationChoice choice);
const char* to_string(NormFormat format);
/// Parse the names above ("mse", "auto"/"automatic", "f16", ...); throws tqkv::Error naming `what`.
CodecKind parse_codec_kind(const std::string& name);
RotationChoice parse_rotation_choice(const std::string& name);
NormFormat parse_norm_format(const std::string& name);

/// Everything that determines a codec. Saved with the data it encoded.
struct CodecSpec {
  /// 2..65536; dense rotations and prod codecs (d × d matrices): 2..4096.
  int dim = 0;
  /// mse: 1..8, prod: 1..9, integer or fractional (see above).
  double bits = 4.0;
  CodecKind kind = CodecKind::mse;
  RotationChoice rotation = RotationChoice::automatic;
  uint64_t seed = 0;
  NormFormat norm_format = NormFormat::f16;
  /// Fractional bits only: the channels quantized at the higher width, ascending. Empty: chosen
  /// from the first batch encoded.
  std::vector<int> outlier_channels;
  /// Encode x − offset (see Centering above).
  bool center = false;
  /// center only: the per-channel offset μ (dim finite floats). Empty: the first batch's mean.
  std::vector<float> offset;

  bool operator==(const CodecSpec&) const = default;
};

/// One independent quantizer over a subset of the channels, and where its part of a record is.
struct ChannelGroup {
  std::vector<int> channels;  ///< ascending channel indices
  int dim = 0;                ///< channels.size()
  int bits = 0;               ///< bits per coordinate of this group's codes (prod: with QJL bit)
  int mse_bits = 0;           ///< Lloyd–Max code width (prod: bits − 1, possibly 0)
  bool qjl = false;           ///< prod: QJL sign bits and γ stored
  uint32_t substream = 0;     ///< random substream of its rotation and QJL matrix
  size_t offset = 0;          ///< start of this group's part in a record
  size_t codes_offset = 0, signs_offset = 0, norm_offset = 0, gamma_offset = 0;  ///< absolute
  size_t bytes = 0;           ///< size of this group's part
};

/// A TurboQuant codec. A cheap handle: copies share the same (immutable, thread-safe) tables.
class Codec {
 public:
  /// Validates `spec` and builds codebooks, rotations and QJL matrices. Throws tqkv::Error.
  explicit Codec(const CodecSpec& spec);

  /// The spec, with the outlier channels and the offset once chosen.
  CodecSpec spec() const;
  int dim() const;
  double bits() const;
  CodecKind kind() const;
  /// Bytes of one encoded vector (codes, signs, norms, γ).
  size_t record_bytes() const;
  /// False only while what the first batch chooses (fractional bits' outlier channels, a
  /// centering codec's offset) is not chosen yet.
  bool ready() const;
  /// Channel groups (one for integer bits, two for fractional). Sizes and record offsets are
  /// fixed at construction; the channel lists are empty until ready().
  const std::vector<ChannelGroup>& groups() const;
  /// The rotation, codebook (null when mse_bits = 0) and QJL matrix (row-major d_g × d_g, empty
  /// for mse) of group g, for backends that compute on codes themselves.
  const Rotation& rotation(size_t g) const;
  const Codebook* codebook(size_t g) const;
  const std::vector<float>& qjl_matrix(size_t g) const;
  /// The centering offset μ (dim() floats; empty unless the spec centers). Once ready().
  const std::vector<float>& offset() const;

  /// Encodes n vectors of dim() elements (row-major) into n records of record_bytes(). Input
  /// float32, float16 or bfloat16 bits. Throws tqkv::Error, before writing anything, if any
  /// element is NaN/Inf or a norm does not fit the norm format, naming the first such vector.
  /// A codec that is not ready() takes what it lacks from this batch (first call only).
  /// Multi-threaded over vectors (OpenMP) for large batches.
  void encode(const void* x, ScalarType type, size_t n, uint8_t* records) const;
  void encode(const float* x, size_t n, uint8_t* records) const {
    encode(x, ScalarType::f32, n, records);
  }
  /// Decodes n records into n float32 vectors.
  void decode(const uint8_t* records, size_t n, float* out) const;
  /// Estimated inner products ⟨q, x̃_i⟩ for one query q (dim() floats) against n records,
  /// computed from the codes: the query is rotated (and projected by S) once, no vector is decoded.
  void inner_products(const float* q, const uint8_t* records, size_t n, float* out) const;

  /// The spec this codec would take from the batch x (n rows, float32, finite) if it were the
  /// first: the offset (if centering and not given) and the outlier channels (if fractional and
  /// not given) chosen from it. Fixes nothing. Throws tqkv::Error for an empty batch.
  CodecSpec calibrated_spec(const float* x, size_t n) const;
  /// The same from statistics of the batch computed where it lives (a GPU cache's device):
  /// `offset`, the batch's offset float(Σ_i x_ij / n) (sums in double, rows in order), read if
  /// the spec centers and gives no offset; `energy`, Σ_i (x_ij − μ_j)² with μ the spec's offset
  /// or else `offset` (none where neither is; differences in float32, squares summed in double,
  /// rows in order), read if fractional without outlier channels. What is not read may be
  /// empty. Throws tqkv::Error if what is read does not have dim() entries.
  CodecSpec calibrated_spec(std::span<const float> offset, std::span<const double> energy) const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

/// Row i (`dim` elements of `type`, row-major) of x as float32; the conversion is exact.
void row_to_float(const void* x, ScalarType type, size_t i, int dim, float* out);

/// Sets the number of threads tqkv's CPU loops use. 0: OpenMP's default (OMP_NUM_THREADS, else
/// the CPUs of the affinity mask), capped by a cgroup CPU quota when OMP_NUM_THREADS is unset.
/// Returns the previous setting.
int set_num_threads(int n);
/// The number of threads tqkv's CPU loops use.
int num_threads();

}  // namespace tqkv
