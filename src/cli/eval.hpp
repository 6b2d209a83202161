// Measured distortion of a codec on random unit vectors, next to what theory predicts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tqkv/codec.hpp"

namespace tqkv::cli {

struct DistortionRow {
  CodecSpec spec;
  size_t record_bytes = 0;
  double compression_vs_fp16 = 0;  ///< 2·d bytes over record_bytes
  double mse = 0;                  ///< measured mean ‖u − û‖² over unit vectors
  double mse_theory = 0;           ///< from the codebooks (prod: with the QJL term's error)
  double mse_paper = 0;            ///< the TurboQuant paper's figure (d-independent), 0 if none
  double lower_bound = 0;          ///< 4^−b, for any quantizer
  double ip_bias = 0;              ///< mean of ⟨q, x̂⟩ − ⟨q, x⟩ over independent unit pairs
  double ip_bias_stderr = 0;
  double ip_var_d = 0;             ///< d · variance of that error
  double ip_var_d_theory = 0;      ///< prod: (π/2 − 1/d) · D_mse(b − 1); mse: 0 (biased)
};

/// Encodes `samples` random unit vectors (deterministic from `data_seed`) with `spec` and
/// measures the rows' figures. Fractional codecs take outlier channels from the sample.
DistortionRow measure_distortion(const CodecSpec& spec, size_t samples, uint64_t data_seed);

/// Theory for a spec: codebook-integrated MSE (weighted over channel groups).
double theoretical_mse(const Codec& codec);

}  // namespace tqkv::cli
