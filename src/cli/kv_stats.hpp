// What a real model's keys and values look like, and what TurboQuant does to them next to random
// data (tqkv eval model --kv-stats, and the real-data test of the codecs).
//
// TurboQuant's promise is that its distortion does not depend on the data: for a unit vector u
// and a Haar-random rotation Π, Π u is uniform on the sphere whatever u is, so E‖u − û‖² is the
// codebook's distortion D(d, b) for every input. A quantizer without the rotation meets D only on
// isotropic data; real keys, with a few channels far larger than the rest, break it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tqkv/codec.hpp"

namespace tqkv::cli {

/// Channel magnitudes of n vectors of `dim` floats.
struct ChannelStats {
  std::vector<double> mean_abs;  ///< mean |x_j| over the vectors, per channel
  double median = 0;             ///< median of mean_abs
  std::vector<int> outliers;     ///< channels with mean_abs >= kOutlierRatio × median, ascending
  double max_ratio = 0;          ///< largest mean_abs over the median
};
constexpr double kOutlierRatio = 4.0;
ChannelStats channel_stats(std::span<const float> x, int dim);

/// Vector norms ‖x‖ (float64) of n vectors of `dim` floats: mean, smallest, largest.
struct NormStats {
  double mean = 0, min = 0, max = 0;
};
NormStats norm_stats(std::span<const float> x, int dim);

/// Mean normalized distortion ‖x/‖x‖ − x̂/‖x‖‖² over n vectors (zero vectors skipped) under
/// `spec` at `seeds` rotation seeds (spec.seed, spec.seed + 1, …): the mean over seeds and its
/// standard error (the spread of the per-seed means over √seeds; for seeds ≥ 2).
struct Distortion {
  double mean = 0, std_error = 0;
};
Distortion codec_distortion(CodecSpec spec, std::span<const float> x, int seeds);

/// The same Lloyd–Max codebook (dimension `dim`, `bits` bits) applied to the coordinates of
/// u = x/‖x‖ directly, without rotation: mean ‖u − û‖² over the vectors, and its standard error
/// (the spread of the per-vector distortions over √n, for independent vectors).
Distortion unrotated_distortion(std::span<const float> x, int dim, int bits);

/// One KV head of one layer.
struct KvStatsRow {
  int layer = 0, head = 0;
  bool keys = true;
  size_t vectors = 0;
  NormStats norms;
  ChannelStats channels;
  double theory = 0;  ///< the codebook's distortion D(d, b)
  Distortion hadamard, dense, unrotated;
};

/// Rows for every layer and KV head, keys then values, from `keys` and `values` ([tokens][kv_heads]
/// [dim] per layer, as DenseKvStore holds them), at `bits` (an integer) over `seeds` seeds.
std::vector<KvStatsRow> kv_stats(const std::vector<std::vector<float>>& keys,
                                 const std::vector<std::vector<float>>& values, int kv_heads,
                                 int dim, int bits, int seeds);

}  // namespace tqkv::cli
