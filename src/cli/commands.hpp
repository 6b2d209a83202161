// The CLI's commands that work on a KV cache (attend, bench decode, the demo's attention section),
// and the small helpers the command files share. Each command returns the exit status and throws
// tqkv::Error (naming the option or file at fault) on bad input; cli.cpp prints it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "tqkv/cache.hpp"
#include "tqkv/codec.hpp"

namespace tqkv::cli {

// ---- shared helpers (cli.cpp) ------------------------------------------------------------------

/// printf-style formatting of one number.
std::string fmt(const char* f, double v);
/// A bit width such as "4" or "3.5"; throws naming `option` when it is not a finite number
/// (whether the codec supports it is checked when the codec is built).
double parse_bits(const std::string& text, std::string_view option = "--bits");
/// "a,b,c" -> {"a", "b", "c"} (empty items dropped); throws naming `option` when nothing is left.
std::vector<std::string> split_list(const std::string& text, std::string_view option = "--bits");
/// "4-bit mse, rotation auto, seed 0, norm f16".
std::string describe(const CodecSpec& spec);
/// Throws, prefixed with `option`, when `spec` cannot be a KV cache's key (or value) codec at
/// `head_dim` (bits out of range, a fractional split the attention kernels cannot read, ...).
void check_cache_codec(const CodecSpec& spec, bool value, int head_dim, std::string_view option);

/// Appends head-major keys and values ([H_kv, T, d], as the CLI reads them) to layer 0 of `seq`
/// in chunks of `chunk` tokens (each transposed to the cache's [tokens, H_kv, d]).
void append_head_major(KVCache& cache, SequenceId seq, const float* k, const float* v,
                       size_t tokens, size_t chunk);

// ---- tqkv attend (attend.cpp) ------------------------------------------------------------------

struct AttendArgs {
  std::string q, k, v, out;  ///< Q [H_q, d]; K, V [H_kv, T, d]; O [H_q, d] (.npy)
  std::string key_bits = "4", value_bits = "4", codec = "mse", rotation = "auto";
  uint64_t seed = 0;  ///< key codec seed; the value codec uses seed + 1
  float scale = 0.0f;  ///< 0: 1/sqrt(d)
  size_t window = 0;   ///< 0: all tokens
  bool reference = false;
};

/// Quantizes K and V into a one-layer KVCache (one sequence of T tokens), attends with the
/// single query token Q (fused decode, or the float64 reference on the same codes), writes O.
int attend(const AttendArgs& args, std::ostream& out);

// ---- tqkv bench decode (bench.cpp) -------------------------------------------------------------

/// The options the bench commands share: the shapes measured, the repeats, the output.
struct BenchShapeArgs {
  std::string batch = "1", context, bits;  ///< comma-separated lists
  int q_heads = 32, kv_heads = 8, dim = 128;
  int repeats = 5;
  bool json = false;
};

struct BenchDecodeArgs : BenchShapeArgs {
  BenchDecodeArgs() {
    context = "4096,32768";
    bits = "4,3,2";
  }
  std::string device = "cpu";
  std::string codec = "mse";
  int threads = 0;  ///< 0: all (OpenMP default)
};

/// One row of the decode benchmark.
struct BenchRow {
  std::string device;
  size_t batch = 0, context = 0;
  int q_heads = 0, kv_heads = 0, dim = 0;
  double key_bits = 0, value_bits = 0;
  std::string codec;
  int threads = 0;
  double fused_us = 0, fallback_us = 0, dense_us = 0;
  size_t compressed_bytes = 0, dense_bytes = 0;
  double fused_gbps = 0, dense_gbps = 0;
  double speedup_vs_fallback = 0, speedup_vs_dense = 0;
  // GPU rows: a device-to-device copy of compressed_bytes in the same run (bandwidth counts bytes
  // read and written), quantize + append (bytes read and written per second) and a cache's
  // first append call, timed apart; a decode step's append of one token to each sequence of the
  // batch (one layer) by append_step, and by one append call a sequence.
  double memcpy_us = 0, memcpy_gbps = 0, append_gbps = 0, first_append_ms = 0;
  double step_append_us = 0, deferred_step_us = 0, seq_appends_us = 0;
};

/// Decode attention timed three ways (fused on the codes, dequantize-then-attend, dense float32)
/// for every (batch, context, bits) row.
int bench_decode(const BenchDecodeArgs& args, std::ostream& out);

struct BenchShardedArgs : BenchShapeArgs {
  BenchShardedArgs() {
    context = "131072";
    bits = "4";
  }
  std::string devices = "cpu,cpu";  ///< the shards' devices; world w uses the first w
  std::string worlds = "";          ///< comma-separated world sizes; empty: 1 and all devices
  std::string placement = "sequence";
};
/// tqkv bench sharded: decode step time on a ShardedCache per world size (sharded.hpp).
int bench_sharded(const BenchShardedArgs& args, std::ostream& out);

// ---- tqkv eval model (eval_model.cpp) ----------------------------------------------------------

struct EvalModelArgs {
  std::string model;  ///< ONNX file (tools/fetch-model.sh)
  size_t tokens = 2048, sequences = 4;
  std::string configs = "k4v4,k3v4,k3.5v3.5,k3v3,k2.5v2.5,k2v2,k3pv4,k4pv4,k4v4-dense,q4_0,q8_0";
  uint64_t seed = 1;
  bool json = false;
  bool quantized_activations = false;  ///< the exported graph's uint8 activations
  std::string plot;  ///< PNG file: mean KL and top-1 agreement against bits per coordinate
  /// Instead of the configurations: statistics of the sampled sequences' real keys and values
  /// (norms, outlier channels, TurboQuant's distortion at kv_bits against random data's).
  bool kv_stats = false;
  int kv_bits = 4;
};

/// Samples `sequences` sequences of `tokens` tokens from the model (full float32 cache,
/// temperature 1, from token 1), then runs each through every cache configuration and reports
/// against the full cache: mean KL(full ‖ config) of the next-token distributions, top-1
/// agreement, perplexity of the sequence, and bytes of KV per token. Progress goes to `err`.
/// With `plot`, also draws mean KL and top-1 agreement against bits per coordinate, TurboQuant
/// configurations against the block baselines.
int eval_model(const EvalModelArgs& args, std::ostream& out, std::ostream& err);

/// The demo on a real model (tqkv demo --model): one sequence of `tokens` tokens sampled from
/// it, through the full cache, TurboQuant configurations and the block baselines: bytes of KV
/// per token, mean KL, top-1 agreement and perplexity against the full cache, prefill and decode
/// speed.
int demo_model(const std::string& path, size_t tokens, uint64_t seed, std::ostream& out,
               std::ostream& err);

/// The demo's section "attention on a compressed cache": accuracy of fused decode against exact
/// dense attention on synthetic data of `context` tokens, and decode timings.
void demo_attention(size_t context, std::ostream& out);

}  // namespace tqkv::cli
