// tqkv bench decode, and the demo's attention section: decode attention timed on the codes
// (fused), through dequantize-then-attend (fallback) and on dense float32 K/V; tqkv bench
// sharded: the decode step of a cache spread over several devices.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>

#include "commands.hpp"
#include "cuda/backend.hpp"
#include "tqkv/half.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/device.hpp"
#include "tqkv/error.hpp"
#include "tqkv/sharded.hpp"

namespace tqkv::cli {
namespace {

// Fast Gaussian numbers for synthetic K/V (statistics only matter here, not bit reproducibility
// across platforms): SplitMix64 words, Box-Muller pairs.
class Normals {
 public:
  explicit Normals(uint64_t seed) : state_(seed) {}
  void fill(float* out, size_t n) {
    constexpr double kTwoPi = 6.283185307179586;
    for (size_t i = 0; i < n; i += 2) {
      const double u1 = (double(next() >> 11) + 0.5) * 0x1p-53;  // (0, 1)
      const double u2 = double(next() >> 11) * 0x1p-53;
      const double r = std::sqrt(-2.0 * std::log(u1));
      out[i] = float(r * std::cos(kTwoPi * u2));
      if (i + 1 < n) out[i + 1] = float(r * std::sin(kTwoPi * u2));
    }
  }
  std::vector<float> make(size_t n) {
    std::vector<float> x(n);
    fill(x.data(), n);
    return x;
  }

 private:
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
};

// Sets tqkv's thread count for a scope.
class ThreadScope {
 public:
  explicit ThreadScope(int n) : previous_(set_num_threads(n)) {}
  ~ThreadScope() { set_num_threads(previous_); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

// Best wall time of `repeats` runs (after one warm-up run if `warm_up`), in microseconds.
template <class Fn>
double best_us(int repeats, Fn&& fn, bool warm_up = true) {
  if (warm_up) fn();
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  return best;
}

std::vector<size_t> parse_positive_list(const std::string& text, std::string_view option) {
  std::vector<size_t> values;
  for (const auto& item : split_list(text, option)) {
    size_t used = 0;
    unsigned long long v = 0;
    try {
      v = std::stoull(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TQKV_CHECK(used == item.size() && item.find('-') == std::string::npos && v > 0, option,
               ": '", item, "' is not a positive integer");
    values.push_back(size_t(v));
  }
  return values;
}

CacheConfig cache_config(int kv_heads, int dim, double bits, CodecKind kind) {
  CacheConfig c;
  c.layers = 1;
  c.kv_heads = kv_heads;
  c.head_dim = dim;
  c.key.dim = c.value.dim = dim;
  c.key.bits = c.value.bits = bits;
  c.key.kind = c.value.kind = kind;
  c.key.seed = 0;
  c.value.seed = 1;
  return c;
}

// Sequence `b`'s dense copy [H_kv, T, d] of a block [block_tokens, H_kv, d] repeated to T tokens.
std::vector<float> dense_from_block(const std::vector<float>& block, size_t block_tokens,
                                    size_t H, size_t T, size_t d) {
  std::vector<float> x(H * T * d);
  for (size_t h = 0; h < H; ++h)
    for (size_t t = 0; t < T; ++t)
      std::copy_n(&block[((t % block_tokens) * H + h) * d], d, &x[(h * T + t) * d]);
  return x;
}

double relative_error(const std::vector<float>& x, const std::vector<float>& ref) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += (double(x[i]) - ref[i]) * (double(x[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  return std::sqrt(err / norm);
}

nlohmann::json to_json(const BenchRow& r) {
  const bool gpu = r.device != "cpu";
  auto cpu_only = [&](double x) { return gpu ? nlohmann::json(nullptr) : nlohmann::json(x); };
  auto gpu_only = [&](double x) { return gpu ? nlohmann::json(x) : nlohmann::json(nullptr); };
  return {{"device", r.device},
          {"batch", r.batch},
          {"context", r.context},
          {"q_heads", r.q_heads},
          {"kv_heads", r.kv_heads},
          {"dim", r.dim},
          {"key_bits", r.key_bits},
          {"value_bits", r.value_bits},
          {"codec", r.codec},
          {"threads", r.threads},
          {"fused_us", r.fused_us},
          {"fallback_us", cpu_only(r.fallback_us)},
          {"dense_us", cpu_only(r.dense_us)},
          {"compressed_bytes", r.compressed_bytes},
          {"fused_gbps", r.fused_gbps},
          {"dense_bytes", r.dense_bytes},
          {"dense_gbps", cpu_only(r.dense_gbps)},
          {"speedup_vs_fallback", cpu_only(r.speedup_vs_fallback)},
          {"speedup_vs_dense", cpu_only(r.speedup_vs_dense)},
          {"memcpy_us", gpu_only(r.memcpy_us)},
          {"memcpy_gbps", gpu_only(r.memcpy_gbps)},
          {"fused_vs_memcpy", gpu_only(r.fused_gbps / r.memcpy_gbps)},
          {"append_gbps", gpu_only(r.append_gbps)},
          {"first_append_ms", gpu_only(r.first_append_ms)},
          {"step_append_us", gpu_only(r.step_append_us)},
          {"deferred_step_us", gpu_only(r.deferred_step_us)},
          {"seq_appends_us", gpu_only(r.seq_appends_us)}};
}

void print_json(const std::vector<BenchRow>& rows, std::ostream& out) {
  nlohmann::json arr = nlohmann::json::array();
  for (const auto& r : rows) arr.push_back(to_json(r));
  out << arr.dump(2) << "\n";
}

// Decode on a GPU cache: fused attention, captured once as a CUDA graph and timed over replays
// (median), and a device-to-device copy of the same compressed bytes (the faster of graph replays
// and stream launches). The peers (bf16 SDPA, dequantize-then-SDPA) are measured by
// bench/gpu_peers.py.
std::vector<BenchRow> bench_decode_cuda(const BenchDecodeArgs& a, Device device,
                                        const std::vector<size_t>& batches,
                                        const std::vector<size_t>& contexts,
                                        const std::vector<double>& bits, CodecKind kind,
                                        std::ostream& out) {
  const size_t H = size_t(a.kv_heads), d = size_t(a.dim), Hq = size_t(a.q_heads);
  const size_t max_context = *std::max_element(contexts.begin(), contexts.end());
  const size_t max_batch = *std::max_element(batches.begin(), batches.end());
  // (A decode step's append reads one row a sequence of the block.)
  const size_t block_tokens = std::max(std::min<size_t>(65536, max_context), max_batch);
  constexpr int kSteps = 10;  // decode steps a timed repeat
  Normals normals(12345);
  std::vector<uint16_t> host(block_tokens * H * d);
  auto random_block = [&] {
    std::vector<float> x = normals.make(host.size());
    for (size_t i = 0; i < x.size(); ++i) host[i] = float_to_half(x[i]);
    DeviceBuffer buf(device, host.size() * 2);
    buf.upload(host.data(), host.size() * 2);
    return buf;
  };
  const DeviceBuffer block_k = random_block(), block_v = random_block();
  std::vector<BenchRow> rows;
  if (!a.json)
    out << "tqkv bench decode: " << to_string(device) << " (" << list_gpus()[size_t(device.index)].name
        << "), H_q " << Hq << ", H_kv " << H << ", d " << d << ", " << to_string(kind)
        << " keys and values, CUDA graph replays, median of " << a.repeats << "\n"
        << "batch  context  bits  fused us  memcpy us  compressed MB  fused GB/s  memcpy GB/s"
           "  fused/memcpy  append GB/s  first append ms  step append us  deferred step us"
           "  seq appends us\n";
  for (const size_t B : batches)
    for (const size_t T : contexts)
      for (const double b : bits) {
        CacheConfig config = cache_config(a.kv_heads, a.dim, b, kind);
        // (Room for the timed decode steps after the context.)
        const std::vector<size_t> lengths(B, T + 3 * kSteps * size_t(a.repeats));
        // A cache's first append also does what is done once (fractional bits choose their
        // outlier channels from it; the process's first append loads the kernels): it is timed
        // on a sequence of its own, freed before the appends whose rate the row reports.
        const size_t first_tokens = std::min(block_tokens, T);
        std::vector<size_t> sizing = lengths;
        sizing.push_back(first_tokens);
        config.max_pages = config.pages_for(sizing);
        config.device = device;
        config.max_sequences = std::max<size_t>(64, B + 1);
        KVCache cache(config);
        auto timed_append = [&](SequenceId seq, size_t n) {
          const auto t0 = std::chrono::steady_clock::now();
          cache.append(seq, 0, block_k.data(), block_v.data(), n, ScalarType::f16);
          return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        };
        const SequenceId first = cache.add_sequence();
        const double first_seconds = timed_append(first, first_tokens);
        cache.free_sequence(first);
        std::vector<SequenceId> seqs;
        double append_seconds = 0;
        size_t appended = 0;
        for (size_t s = 0; s < B; ++s) {
          seqs.push_back(cache.add_sequence());
          for (size_t t = 0; t < T; t += block_tokens) {
            const size_t n = std::min(block_tokens, T - t);
            append_seconds += timed_append(seqs.back(), n);
            appended += n;
          }
        }
        DeviceBuffer q(device, B * Hq * d * 4), o(device, B * Hq * d * 4);
        const std::vector<float> hq = normals.make(B * Hq * d);
        q.upload(hq.data(), hq.size() * 4);
        GpuWorkspace ws(cache);
        BenchRow r;
        r.device = to_string(device);
        r.batch = B;
        r.context = T;
        r.q_heads = a.q_heads;
        r.kv_heads = a.kv_heads;
        r.dim = a.dim;
        r.key_bits = r.value_bits = b;
        r.codec = to_string(kind);
        r.compressed_bytes = B * T * cache.bytes_per_token_per_layer();
        r.dense_bytes = B * T * H * d * 2 * 2;  // bfloat16 K and V
        r.fused_us = gpu::time_graph_us(device, [&](CudaStream stream) {
          attend_decode(cache, 0, seqs, q.as<float>(), a.q_heads, o.as<float>(), ws, stream);
        }, a.repeats, 20);
        DeviceBuffer from(device, r.compressed_bytes), to(device, r.compressed_bytes);
        from.fill(0x5a);
        // The copy's time is the faster of a graph replay and a stream launch: captured in a graph
        // a large copy can run well below the device's copy rate (2.7 against 4.2 TB/s on an
        // H200 for some sizes), which would flatter the ratio, and from a stream a small one
        // waits for its launch.
        auto copy = [&](CudaStream stream) {
          gpu::copy(device, to.data(), from.data(), r.compressed_bytes, stream);
        };
        r.memcpy_us = std::min(gpu::time_graph_us(device, copy, a.repeats, 20),
                               gpu::time_stream_us(device, copy, a.repeats, 20));
        r.fused_gbps = double(r.compressed_bytes) / (r.fused_us * 1e3);
        r.memcpy_gbps = 2.0 * double(r.compressed_bytes) / (r.memcpy_us * 1e3);
        // A decode step's append: the mean of kSteps steps (and what `finish` waits for after
        // them), the median over the repeats.
        auto time_steps = [&](const std::function<void()>& step,
                              const std::function<void()>& finish = [] {}) {
          std::vector<double> times;
          for (int rep = 0; rep < a.repeats; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < kSteps; ++i) step();
            finish();
            times.push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                kSteps);
          }
          std::sort(times.begin(), times.end());
          return times[times.size() / 2] * 1e6;
        };
        r.step_append_us = time_steps([&] {
          cache.append_step(0, seqs, block_k.data(), block_v.data(), ScalarType::f16);
        });
        r.deferred_step_us = time_steps(
            [&] {
              cache.append_step(0, seqs, block_k.data(), block_v.data(), ScalarType::f16,
                                StepCheck::deferred);
            },
            [&] { cache.check(); });
        r.seq_appends_us = time_steps([&] {
          for (size_t s = 0; s < B; ++s)
            cache.append(seqs[s], 0, block_k.as<uint8_t>() + s * H * d * 2,
                         block_v.as<uint8_t>() + s * H * d * 2, 1, ScalarType::f16);
        });
        const double append_bytes =
            double(appended) * double(H * d * 2 * 2 + cache.bytes_per_token_per_layer());
        r.append_gbps = append_bytes / append_seconds / 1e9;
        r.first_append_ms = first_seconds * 1e3;
        if (!a.json) {
          char line[256];
          std::snprintf(line, sizeof line,
                        "%5zu  %7zu  %4.3g  %8.1f  %9.1f  %13.2f  %10.0f  %11.0f  %11.2f  %11.0f"
                        "  %15.2f  %14.1f  %16.1f  %14.1f\n",
                        B, T, b, r.fused_us, r.memcpy_us, double(r.compressed_bytes) / 1e6,
                        r.fused_gbps, r.memcpy_gbps, r.fused_gbps / r.memcpy_gbps, r.append_gbps,
                        r.first_append_ms, r.step_append_us, r.deferred_step_us,
                        r.seq_appends_us);
          out << line << std::flush;
        }
        rows.push_back(r);
      }
  if (!a.json)
    out << "fused: attend_decode on the codes (graph replays); memcpy: device-to-device copy of "
           "the same bytes\n(the faster of graph replays and stream launches; GB/s counts bytes "
           "read and written);\nappend: quantize + append of float16 K/V in "
        << block_tokens << "-token chunks, bytes read and written, host call to return;\n"
        << "first append: a cache's first append call (" << block_tokens
        << " tokens or the context), with what is done once\n(outlier channels, kernel "
           "loading), not in the append rate;\nstep append: a decode step's append of one "
           "token to each sequence of the batch (one layer,\nhost call to return) by "
           "append_step; deferred step: the same with StepCheck::deferred, steps queued\n"
           "back to back and the time to check them included; seq appends: the same by one "
           "append call a\nsequence.\n";
  return rows;
}

// The bench commands' shared options, checked before anything is built: the bit widths (parsed),
// the head shape and the repeat count.
std::vector<double> check_shape_options(const BenchShapeArgs& a, CodecKind kind) {
  const int q_heads = a.q_heads, kv_heads = a.kv_heads, dim = a.dim, repeats = a.repeats;
  const auto bits_text = split_list(a.bits, "--bits");
  std::vector<double> bits;
  for (const auto& b : bits_text) bits.push_back(parse_bits(b, "--bits"));
  TQKV_CHECK(repeats >= 1, "--repeats: must be at least 1, got ", repeats);
  TQKV_CHECK(kv_heads >= 1 && kv_heads <= 4096, "--kv-heads: must be in 1..4096, got ",
             kv_heads);
  TQKV_CHECK(q_heads >= 1 && q_heads % kv_heads == 0, "--q-heads: ", q_heads,
             " is not a positive multiple of --kv-heads ", kv_heads);
  TQKV_CHECK(dim >= 8 && dim <= 4096 && dim % 8 == 0,
             "--dim: must be a multiple of 8 in 8..4096, got ", dim);
  for (size_t i = 0; i < bits.size(); ++i)
    check_cache_codec(cache_config(1, dim, bits[i], kind).key, false, dim,
                      "--bits " + bits_text[i]);
  return bits;
}

}  // namespace

int bench_decode(const BenchDecodeArgs& a, std::ostream& out) {
  Device device;
  try {
    device = parse_device(a.device);
    check_device(device);
  } catch (const Error& e) {
    throw Error(std::string("--device: ") + e.what());
  }
  const auto batches = parse_positive_list(a.batch, "--batch");
  const auto contexts = parse_positive_list(a.context, "--context");
  const CodecKind kind = parse_codec_kind(a.codec);
  TQKV_CHECK(a.threads >= 0, "--threads: must be >= 0 (0: all), got ", a.threads);
  const std::vector<double> bits = check_shape_options(a, kind);

  if (device.is_cuda()) {
    const auto rows = bench_decode_cuda(a, device, batches, contexts, bits, kind, out);
    if (a.json) print_json(rows, out);
    return 0;
  }
  const ThreadScope threads(a.threads);
  const size_t H = size_t(a.kv_heads), d = size_t(a.dim), Hq = size_t(a.q_heads);
  // One block of random K/V, appended repeatedly: filling must not dominate the run.
  const size_t max_context = *std::max_element(contexts.begin(), contexts.end());
  const size_t block_tokens = std::min<size_t>(1024, max_context);
  Normals normals(12345);
  const std::vector<float> block_k = normals.make(block_tokens * H * d);
  const std::vector<float> block_v = normals.make(block_tokens * H * d);

  std::vector<BenchRow> rows;
  if (!a.json)
    out << "tqkv bench decode: cpu, " << num_threads() << " threads, H_q " << Hq << ", H_kv "
        << H << ", d " << d << ", " << to_string(kind) << " keys and values, best of "
        << a.repeats << "\n"
        << "batch  context  bits  fused us  fallback us   dense us  compressed MB  fused GB/s"
           "  vs fallback  vs dense\n";
  for (const size_t B : batches)
    for (const size_t T : contexts)
      for (const double b : bits) {
        // Everything of a row lives in this scope: freed before the next row.
        CacheConfig config = cache_config(a.kv_heads, a.dim, b, kind);
        const std::vector<size_t> lengths(B, T);
        config.max_pages = config.pages_for(lengths);
        KVCache cache(config);
        std::vector<SequenceId> seqs;
        for (size_t s = 0; s < B; ++s) {
          seqs.push_back(cache.add_sequence());
          for (size_t t = 0; t < T; t += block_tokens)
            cache.append(seqs.back(), 0, block_k.data(), block_v.data(),
                         std::min(block_tokens, T - t));
        }
        std::vector<std::vector<float>> dense_k, dense_v;
        std::vector<DenseKV> dense;
        for (size_t s = 0; s < B; ++s) {
          dense_k.push_back(dense_from_block(block_k, block_tokens, H, T, d));
          dense_v.push_back(dense_from_block(block_v, block_tokens, H, T, d));
          dense.push_back({dense_k.back().data(), dense_v.back().data(), T});
        }
        const std::vector<float> q = normals.make(B * Hq * d);
        std::vector<float> o(q.size());

        BenchRow r;
        r.device = "cpu";
        r.batch = B;
        r.context = T;
        r.q_heads = a.q_heads;
        r.kv_heads = a.kv_heads;
        r.dim = a.dim;
        r.key_bits = r.value_bits = b;
        r.codec = to_string(kind);
        r.threads = num_threads();
        r.fused_us = best_us(a.repeats, [&] {
          attend_decode(cache, 0, seqs, q.data(), a.q_heads, o.data());
        });
        std::vector<float> workspace;  // kept between calls, as an engine would
        r.fallback_us = best_us(a.repeats, [&] {
          attend_dequantized(cache, 0, seqs, q.data(), a.q_heads, o.data(), workspace);
        });
        r.dense_us = best_us(a.repeats, [&] {
          attend_dense(dense, a.kv_heads, a.dim, q.data(), a.q_heads, o.data());
        });
        r.compressed_bytes = B * T * cache.bytes_per_token_per_layer();
        r.dense_bytes = B * T * H * d * 2 * sizeof(float);
        r.fused_gbps = double(r.compressed_bytes) / (r.fused_us * 1e3);
        r.dense_gbps = double(r.dense_bytes) / (r.dense_us * 1e3);
        r.speedup_vs_fallback = r.fallback_us / r.fused_us;
        r.speedup_vs_dense = r.dense_us / r.fused_us;
        if (!a.json) {
          char line[256];
          std::snprintf(line, sizeof line,
                        "%5zu  %7zu  %4.3g  %8.1f  %11.1f  %9.1f  %13.2f  %10.2f  %10.1fx"
                        "  %7.2fx\n",
                        B, T, b, r.fused_us, r.fallback_us, r.dense_us,
                        double(r.compressed_bytes) / 1e6, r.fused_gbps, r.speedup_vs_fallback,
                        r.speedup_vs_dense);
          out << line << std::flush;
        }
        rows.push_back(r);
      }
  if (a.json) {
    print_json(rows, out);
  } else {
    out << "fused: attention on the codes (attend_decode); fallback: dequantize to float32, then "
           "attend;\ndense: float32 K/V (" << H * d * 2 * sizeof(float)
        << " bytes per token). GB/s: compressed bytes read per second by the fused path.\n";
  }
  return 0;
}

int bench_sharded(const BenchShardedArgs& a, std::ostream& out) {
  std::vector<Device> devices;
  for (const std::string& name : split_list(a.devices, "--devices")) {
    try {
      devices.push_back(parse_device(name));
      check_device(devices.back());
    } catch (const Error& e) {
      throw Error(std::string("--devices: ") + e.what());
    }
  }
  std::vector<size_t> worlds = a.worlds.empty() ? std::vector<size_t>{1, devices.size()}
                                                : parse_positive_list(a.worlds, "--worlds");
  worlds.erase(std::unique(worlds.begin(), worlds.end()), worlds.end());
  for (size_t w : worlds)
    TQKV_CHECK(w <= devices.size(), "--worlds: ", w, " shards, but --devices lists ",
               devices.size());
  TQKV_CHECK(a.placement == "sequence" || a.placement == "heads",
             "--placement: sequence or heads, got '", a.placement, "'");
  const Placement placement = a.placement == "heads" ? Placement::heads : Placement::sequence;
  const auto batches = parse_positive_list(a.batch, "--batch");
  const auto contexts = parse_positive_list(a.context, "--context");
  const std::vector<double> bits = check_shape_options(a, CodecKind::mse);
  const size_t H = size_t(a.kv_heads), d = size_t(a.dim), Hq = size_t(a.q_heads);
  const bool gpu = devices[0].is_cuda();
  Normals normals(12345);
  const size_t max_context = *std::max_element(contexts.begin(), contexts.end());
  const size_t block_tokens = std::min<size_t>(gpu ? 65536 : 1024, max_context);
  // The same float16 K/V block on every device (each shard reads its own device's copy).
  std::vector<uint16_t> host_k(block_tokens * H * d), host_v(host_k.size());
  for (auto* h : {&host_k, &host_v}) {
    const std::vector<float> x = normals.make(h->size());
    for (size_t i = 0; i < x.size(); ++i) (*h)[i] = float_to_half(x[i]);
  }
  std::vector<DeviceBuffer> dev_k, dev_v;
  std::vector<const void*> ks, vs;
  for (const Device& device : devices) {
    if (gpu) {
      dev_k.emplace_back(device, host_k.size() * 2);
      dev_v.emplace_back(device, host_v.size() * 2);
      dev_k.back().upload(host_k.data(), host_k.size() * 2);
      dev_v.back().upload(host_v.data(), host_v.size() * 2);
    }
    ks.push_back(gpu ? dev_k.back().data() : host_k.data());
    vs.push_back(gpu ? dev_v.back().data() : host_v.data());
  }
  nlohmann::json rows = nlohmann::json::array();
  if (!a.json)
    out << "tqkv bench sharded: " << a.placement << " placement over " << a.devices << ", H_q "
        << Hq << ", H_kv " << H << ", d " << d << ", mse; wall time of a decode step (all "
        << "shards, collective and merge included), median of " << a.repeats << "\n"
        << "shards  batch  context  bits  step us  speedup  efficiency\n";
  for (const size_t B : batches)
    for (const size_t T : contexts)
      for (const double b : bits) {
        double one = 0;  // the step time on one shard
        for (const size_t w : worlds) {
          ShardedConfig sc;
          sc.cache = cache_config(a.kv_heads, a.dim, b, CodecKind::mse);
          sc.cache.page_tokens = 64;
          sc.devices.assign(devices.begin(), devices.begin() + long(w));
          sc.placement = placement;
          const size_t P = size_t(sc.cache.page_tokens);
          // Sequence placement: every shard T / w tokens of each sequence (the last the rest).
          const size_t share = ((T + w - 1) / w + P - 1) / P * P;
          if (placement == Placement::sequence) sc.share_tokens = share;
          const size_t per_shard = placement == Placement::sequence ? std::min(share, T) + P : T;
          sc.cache.max_pages = B * ((per_shard + P - 1) / P + 1);
          sc.cache.max_sequences = std::max<size_t>(64, B);
          ShardedCache cache(sc);
          std::vector<SequenceId> seqs;
          const std::vector<const void*> kw(ks.begin(), ks.begin() + long(w));
          const std::vector<const void*> vw(vs.begin(), vs.begin() + long(w));
          for (size_t s = 0; s < B; ++s) {
            seqs.push_back(cache.add_sequence());
            for (size_t t = 0; t < T; t += block_tokens)
              cache.append(seqs.back(), 0, kw, vw, std::min(block_tokens, T - t), ScalarType::f16);
          }
          std::vector<std::vector<float>> host_q(w), host_out(w);
          std::vector<DeviceBuffer> dq, dout;
          std::vector<const float*> qp;
          std::vector<float*> op;
          const std::vector<float> q = normals.make(B * Hq * d);
          for (size_t r = 0; r < w; ++r) {
            // Head placement: the shard's query heads only.
            const auto heads = cache.heads_of(int(r));
            const size_t rows_r = B * (Hq / H) * heads.count;
            host_q[r].resize(rows_r * d);
            for (size_t bi = 0; bi < B; ++bi)
              std::copy_n(q.begin() + long((bi * Hq + heads.first * (Hq / H)) * d),
                          (Hq / H) * heads.count * d,
                          host_q[r].begin() + long(bi * (Hq / H) * heads.count * d));
            host_out[r].resize(rows_r * d);
            if (gpu) {
              dq.emplace_back(devices[r], rows_r * d * 4);
              dout.emplace_back(devices[r], rows_r * d * 4);
              dq.back().upload(host_q[r].data(), rows_r * d * 4);
            }
            qp.push_back(gpu ? dq.back().as<float>() : host_q[r].data());
            op.push_back(gpu ? dout.back().as<float>() : host_out[r].data());
          }
          auto step = [&] {
            cache.attend_decode(0, seqs, qp, a.q_heads, op);
            if (gpu)
              for (size_t r = 0; r < w; ++r) synchronize(devices[r], cache.shard(int(r)).stream());
          };
          step();  // warm-up (sizes the states' buffers)
          std::vector<double> times;
          for (int i = 0; i < a.repeats; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            step();
            times.push_back(
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                    .count());
          }
          std::sort(times.begin(), times.end());
          const double us = times[times.size() / 2];
          if (w == worlds[0]) one = us * double(worlds[0]);
          const double speedup = one / us, efficiency = speedup / double(w);
          rows.push_back({{"shards", w}, {"placement", a.placement}, {"batch", B},
                          {"context", T}, {"bits", b}, {"q_heads", a.q_heads},
                          {"kv_heads", a.kv_heads}, {"dim", a.dim}, {"step_us", us},
                          {"speedup", speedup}, {"efficiency", efficiency}});
          if (!a.json) {
            char line[160];
            std::snprintf(line, sizeof line, "%6zu  %5zu  %7zu  %4.3g  %7.1f  %6.2fx  %10.2f\n", w,
                          B, T, b, us, speedup, efficiency);
            out << line << std::flush;
          }
        }
      }
  if (a.json) out << rows.dump(2) << "\n";
  else
    out << "speedup: against the first shard count's step time scaled to one shard; "
           "efficiency: speedup / shards."
        << (gpu ? "\n"
                : "\nCPU shards are simulated ranks: they run one after another in this process "
                  "(a check of the sharded path, not of its scaling).\n");
  return 0;
}

void demo_attention(size_t context, std::ostream& out) {
  constexpr int kKvHeads = 8, kQHeads = 32, kDim = 128, kRepeats = 3;
  const size_t H = kKvHeads, Hq = kQHeads, d = kDim, T = context, R = Hq / H;
  // Keys and values i.i.d. N(0, 1), [H_kv, T, d]. Each query head looks for one stored token of
  // its KV head, as retrieval heads do: q = k_t + N(0, I) noise, so the softmax is peaked
  // (about 3/4 of the weight on token t at 8192 tokens) but not one-hot.
  Normals normals(2024);
  const std::vector<float> k = normals.make(H * T * d), v = normals.make(H * T * d);
  std::vector<float> q = normals.make(Hq * d);
  for (size_t hq = 0; hq < Hq; ++hq) {
    const size_t h = hq / R, target = (hq * 7919 + 13) % T;
    for (size_t j = 0; j < d; ++j) q[hq * d + j] += k[(h * T + target) * d + j];
  }
  const DenseKV dense[1] = {{k.data(), v.data(), T}};
  std::vector<float> exact(Hq * d), o(Hq * d);
  attend_dense(dense, kKvHeads, kDim, q.data(), kQHeads, exact.data());
  const double dense_us = best_us(kRepeats, [&] {
    attend_dense(dense, kKvHeads, kDim, q.data(), kQHeads, o.data());
  });

  out << "attention on a compressed cache: " << T << " tokens, " << Hq
      << " query heads on " << H << " KV heads, dim " << d << ", " << num_threads()
      << " threads\n"
         "(synthetic: K, V i.i.d. N(0, 1); each query head looks for one stored token, "
         "q = k_t + N(0, I))\n"
         "bits  bytes/token  vs fp16  rel err vs exact  fused us  fallback us  dense us"
         "  vs fallback  vs dense\n";
  for (const double bits : {4.0, 3.5, 3.0, 2.0}) {
    CacheConfig config = cache_config(kKvHeads, kDim, bits, CodecKind::mse);
    const size_t lengths[1] = {T};
    config.max_pages = config.pages_for(lengths);
    KVCache cache(config);
    const SequenceId seq = cache.add_sequence();
    append_head_major(cache, seq, k.data(), v.data(), T, 1024);
    const SequenceId seqs[1] = {seq};
    attend_decode(cache, 0, seqs, q.data(), kQHeads, o.data());
    const double err = relative_error(o, exact);
    const double fused_us = best_us(kRepeats, [&] {
      attend_decode(cache, 0, seqs, q.data(), kQHeads, o.data());
    });
    std::vector<float> workspace;  // kept between calls, as an engine would
    const double fallback_us = best_us(kRepeats, [&] {
      attend_dequantized(cache, 0, seqs, q.data(), kQHeads, o.data(), workspace);
    });
    char line[256];
    std::snprintf(line, sizeof line,
                  "%4.3g  %11zu  %6.2fx  %16.4f  %8.1f  %11.1f  %8.1f  %10.1fx  %7.2fx\n", bits,
                  cache.bytes_per_token_per_layer(),
                  double(cache.fp16_bytes_per_token()) / double(cache.bytes_per_token()), err,
                  fused_us, fallback_us, dense_us, fallback_us / fused_us, dense_us / fused_us);
    out << line << std::flush;
  }
  out << "rel err = |O - O_exact| / |O_exact| over all heads; O_exact: float32 attention on the\n"
         "original K/V. fused: attention on the codes (attend_decode); fallback: dequantize to\n"
         "float32, then attend; dense: float32 K/V (" << H * d * 2 * sizeof(float)
      << " bytes per token).\nBest of " << kRepeats << " runs after a warm-up.\n";
}

}  // namespace tqkv::cli
