// The GPU backend against the CPU: codes bit-identical for the same input and seeds, attention
// within a derived tolerance of the float64 reference over the same codes, copies between
// devices, and bad input. Skipped where no GPU is present (these run on a GPU machine).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/backend.hpp"
#include "test_support.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "tqkv/sharded.hpp"

namespace tqkv {
namespace {

bool have_gpu() {
  if (!cuda_backend_built()) return false;
  try {
    return !list_gpus().empty();
  } catch (const Error&) {
    return false;
  }
}

#define REQUIRE_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no GPU"

using testing::error_of;
using testing::fresh_seed;

// Float16 operands (query, codebook, probabilities) each carry a relative rounding of at most
// 2^-11; products are exact in the float32 accumulators.
constexpr double kHalfEpsilon = 1.0 / 2048.0;
// Whole-output relative error allowed for float16 operands (between 1e-3 and 1e-2 is their band).
constexpr double kGpuRelativeTolerance = 1e-2;

struct GpuSetup {
  int layers = 1, kv_heads = 2, head_dim = 128, page_tokens = 32;
  CodecSpec key, value;
  std::string name() const {
    return std::to_string(head_dim) + "d K" + std::to_string(key.bits) + to_string(key.kind) +
           " V" + std::to_string(value.bits) + to_string(value.kind) + " P" +
           std::to_string(page_tokens);
  }
};

CacheConfig config_of(const GpuSetup& s, Device device) {
  CacheConfig c;
  c.layers = s.layers;
  c.kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.page_tokens = s.page_tokens;
  c.key = s.key;
  c.value = s.value;
  c.max_pages = 256;
  c.device = device;
  return c;
}

std::vector<GpuSetup> setups(uint64_t seed) {
  std::vector<GpuSetup> out;
  auto add = [&](int d, double kb, CodecKind kk, double vb, CodecKind vk, int P,
                 NormFormat nf = NormFormat::f16, bool center = false) {
    GpuSetup s;
    s.head_dim = d;
    s.page_tokens = P;
    s.key = {d, kb, kk, RotationChoice::automatic, seed, nf, {}, center};
    s.value = {d, vb, vk, RotationChoice::automatic, seed ^ 0x5bd1e995u, nf, {}, center};
    out.push_back(s);
  };
  for (double b : {4.0, 3.0, 2.0, 1.0}) add(128, b, CodecKind::mse, b, CodecKind::mse, 32);
  // The decode kernels built for fixed shapes, with a tile's two halves on different pages (8)
  // and pages of a size that is not a power of two (40: divisions instead of shifts).
  add(128, 4.0, CodecKind::mse, 4.0, CodecKind::mse, 8);
  add(128, 3.0, CodecKind::mse, 3.0, CodecKind::mse, 40);
  add(128, 3.5, CodecKind::mse, 3.5, CodecKind::mse, 8);   // the fractional ones too
  add(128, 2.5, CodecKind::mse, 3.5, CodecKind::mse, 24);
  add(128, 3.5, CodecKind::mse, 2.5, CodecKind::mse, 32);
  add(128, 4.0, CodecKind::prod, 3.0, CodecKind::prod, 16);
  add(128, 2.0, CodecKind::prod, 4.0, CodecKind::mse, 24, NormFormat::f32);
  add(128, 1.0, CodecKind::prod, 1.0, CodecKind::prod, 32);  // QJL signs only, no codes
  add(64, 3.0, CodecKind::mse, 4.0, CodecKind::mse, 8);
  add(96, 4.0, CodecKind::mse, 3.0, CodecKind::mse, 32);  // dense rotations
  add(256, 4.0, CodecKind::mse, 2.0, CodecKind::mse, 64);
  // Centering codecs (offsets subtracted by the append kernel, value offsets added by the merge):
  // the fixed-shape, fractional and generic kernels.
  add(128, 4.0, CodecKind::mse, 4.0, CodecKind::mse, 32, NormFormat::f16, true);
  add(128, 3.5, CodecKind::mse, 2.5, CodecKind::mse, 16, NormFormat::f16, true);
  add(64, 3.0, CodecKind::prod, 2.0, CodecKind::mse, 8, NormFormat::f32, true);
  add(96, 4.0, CodecKind::mse, 3.0, CodecKind::prod, 32, NormFormat::f16, true);  // dense, QJL
  // Float32 norms from the append kernel that encodes a vector a lane pair.
  add(128, 4.0, CodecKind::mse, 3.0, CodecKind::mse, 32, NormFormat::f32);
  // Groups of 32 channels (the append kernels' narrowest register path): one, or the two of
  // fractional bits at d = 64 (4 + 3 and 3 + 2 bits).
  add(32, 4.0, CodecKind::mse, 2.0, CodecKind::mse, 16);
  add(64, 3.5, CodecKind::mse, 2.5, CodecKind::mse, 16);
  return out;
}

// The spread of the component common to every token in a setup's test data: large where the
// codecs center (so that their offsets matter), none elsewhere.
float common_of(const CacheConfig& c) { return c.key.center ? 3.0f : 0.0f; }

// Keys with a few heavy channels, values Gaussian, as float32 / float16 / bfloat16 bits; plus
// `common` · sin(i mod 64), the same for every token where rows are multiples of 64 long.
std::vector<uint8_t> random_rows(std::mt19937_64& rng, size_t n, ScalarType type, bool keys,
                                 float common = 0.0f) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<uint8_t> out(n * (type == ScalarType::f32 ? 4 : 2));
  for (size_t i = 0; i < n; ++i) {
    float x = g(rng) * (keys && i % 17 == 3 ? 4.0f : 1.0f) + common * std::sin(float(i % 64));
    if (type == ScalarType::f32) {
      std::memcpy(&out[i * 4], &x, 4);
    } else {
      const uint16_t h = type == ScalarType::f16 ? float_to_half(x) : float_to_bf16(x);
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

DeviceBuffer on_gpu_at(const std::vector<uint8_t>& host, int gpu) {
  DeviceBuffer b(Device::cuda(gpu), host.size());
  b.upload(host.data(), host.size());
  return b;
}
DeviceBuffer on_gpu(const std::vector<uint8_t>& host) { return on_gpu_at(host, 0); }

// Appends the same tokens, in the same chunks, to a CPU and a GPU cache.
void append_both(KVCache& cpu, KVCache& gpu, SequenceId sc, SequenceId sg, int layer,
                 size_t tokens, ScalarType type, std::mt19937_64& rng) {
  const size_t n = tokens * size_t(cpu.config().kv_heads) * size_t(cpu.config().head_dim);
  const auto k = random_rows(rng, n, type, true, common_of(cpu.config()));
  const auto v = random_rows(rng, n, type, false, common_of(cpu.config()));
  cpu.append(sc, layer, k.data(), v.data(), tokens, type);
  const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
  gpu.append(sg, layer, dk.data(), dv.data(), tokens, type);
}

// A CPU and a GPU cache of setup s (pools of max_pages, max_sequences sequences) holding n
// sequences, sequence i prefilled in layer 0 with the same tokens(i) rows of `type` in both.
struct CachePair {
  KVCache cpu, gpu;
  std::vector<SequenceId> sc, sg;
};
CachePair paired_caches(const GpuSetup& s, size_t max_pages, size_t max_sequences, int n,
                        const std::function<size_t(int)>& tokens, ScalarType type,
                        std::mt19937_64& rng) {
  CacheConfig cc = config_of(s, Device::cpu()), gc = config_of(s, Device::cuda(0));
  cc.max_pages = gc.max_pages = max_pages;
  cc.max_sequences = gc.max_sequences = max_sequences;
  CachePair c{KVCache(cc), KVCache(gc), {}, {}};
  for (int i = 0; i < n; ++i) {
    c.sc.push_back(c.cpu.add_sequence());
    c.sg.push_back(c.gpu.add_sequence());
    append_both(c.cpu, c.gpu, c.sc.back(), c.sg.back(), 0, tokens(i), type, rng);
  }
  return c;
}

void expect_same_codes(const KVCache& cpu, const KVCache& gpu, SequenceId sc, SequenceId sg,
                       const std::string& what) {
  for (int l = 0; l < cpu.config().layers; ++l)
    for (int h = 0; h < cpu.config().kv_heads; ++h)
      for (bool values : {false, true}) {
        const size_t T = cpu.length(sc, l);
        ASSERT_EQ(T, gpu.length(sg, l));
        const size_t rb = (values ? cpu.value_layout() : cpu.key_layout()).record_bytes;
        std::vector<uint8_t> a(T * rb), b(T * rb, 0xAB);
        cpu.read_records(sc, l, h, values, 0, T, a.data());
        gpu.read_records(sg, l, h, values, 0, T, b.data());
        for (size_t t = 0; t < T; ++t)
          ASSERT_EQ(0, std::memcmp(&a[t * rb], &b[t * rb], rb))
              << what << ": layer " << l << " head " << h << (values ? " values" : " keys")
              << " token " << t << " differs";
        EXPECT_EQ((values ? cpu.value_codec(l, h) : cpu.key_codec(l, h)).spec(),
                  (values ? gpu.value_codec(l, h) : gpu.key_codec(l, h)).spec());
      }
}

TEST(Gpu, CodesAreBitIdenticalToTheCpu) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (GpuSetup s : setups(seed)) {
    s.layers = 2;
    for (ScalarType type : {ScalarType::f32, ScalarType::f16, ScalarType::bf16}) {
      SCOPED_TRACE(s.name() + " input type " + std::to_string(int(type)) + " seed " +
                   std::to_string(seed));
      KVCache cpu(config_of(s, Device::cpu())), gpu(config_of(s, Device::cuda(0)));
      const SequenceId a = cpu.add_sequence(), b = gpu.add_sequence();
      // Prefill chunk, then single decode tokens, then other chunks, on both layers.
      // (Chunks of 16 tokens and more take the append kernel that encodes a vector a lane pair.)
      for (size_t chunk : {size_t(37), size_t(1), size_t(1), size_t(20), size_t(300)})
        for (int l = 0; l < 2; ++l) append_both(cpu, gpu, a, b, l, chunk, type, rng);
      expect_same_codes(cpu, gpu, a, b, s.name());
    }
  }
}

TEST(Gpu, WideCodesAreBitIdenticalToo) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (auto [bits, kind] : {std::pair{8.0, CodecKind::mse}, {5.0, CodecKind::mse},
                            {7.0, CodecKind::prod}, {1.0, CodecKind::prod}}) {
    GpuSetup s;
    s.key = {128, bits, kind, RotationChoice::automatic, seed, NormFormat::f16, {}};
    s.value = s.key;
    SCOPED_TRACE(s.name());
    KVCache cpu(config_of(s, Device::cpu())), gpu(config_of(s, Device::cuda(0)));
    const SequenceId a = cpu.add_sequence(), b = gpu.add_sequence();
    append_both(cpu, gpu, a, b, 0, 45, ScalarType::f32, rng);
    expect_same_codes(cpu, gpu, a, b, s.name());
  }
}

// GPU attention's output against the float64 reference's on the same (GPU-made) codes.
void expect_close(const std::vector<float>& out, const std::vector<float>& ref,
                  const std::string& what) {
  const size_t n = ref.size();
  ASSERT_EQ(out.size(), n);
  double num = 0, den = 0, worst = 0;
  double vmax = 0;
  for (float x : ref) vmax = std::max(vmax, std::abs(double(x)));
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(out[i])) << what << ": element " << i << " not written or NaN";
    const double e = double(out[i]) - ref[i];
    num += e * e;
    den += double(ref[i]) * ref[i];
    worst = std::max(worst, std::abs(e));
  }
  const double rel = std::sqrt(num / den);
  EXPECT_LE(rel, kGpuRelativeTolerance) << what;
  // Per element: the output is a convex combination of value vectors; float16 rounding moves
  // each score by a few ε times its size (|score| ≲ 20 here) and each value by ε.
  EXPECT_LE(worst, 64 * kHalfEpsilon * (1.0 + vmax) * 4) << what;
}

std::vector<float> random_queries(std::span<const size_t> queries, int q_heads, int d,
                                  std::mt19937_64& rng) {
  size_t rows = 0;
  for (size_t L : queries) rows += L;
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> q(rows * size_t(q_heads) * size_t(d));
  for (auto& x : q) x = g(rng);
  return q;
}

// Attention on the GPU against the float64 reference on the same (GPU-made) codes.
void check_attention(const KVCache& gpu, std::span<const SequenceId> seqs,
                     std::span<const size_t> queries, int q_heads, const AttentionOptions& opt,
                     std::mt19937_64& rng, const std::string& what) {
  const std::vector<float> q = random_queries(queries, q_heads, gpu.config().head_dim, rng);
  const size_t n = q.size();
  std::vector<float> ref(n), out(n);
  attend_reference(gpu, 0, seqs, queries, q.data(), q_heads, ref.data(), opt);
  DeviceBuffer dq(Device::cuda(0), n * 4), dout(Device::cuda(0), n * 4);
  dq.upload(q.data(), n * 4);
  dout.fill(0xff);  // NaN: an element the kernels never write fails
  GpuWorkspace ws(gpu);
  attend(gpu, 0, seqs, queries, dq.as<float>(), q_heads, dout.as<float>(), ws, nullptr, opt);
  synchronize(Device::cuda(0));
  dout.download(out.data(), n * 4);
  expect_close(out, ref, what);
}

TEST(Gpu, AttentionMatchesTheReference) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (const GpuSetup& s : setups(seed)) {
    KVCache gpu(config_of(s, Device::cuda(0)));
    std::vector<SequenceId> seqs;
    const size_t lengths[] = {1, 77, 300, 16};
    for (size_t T : lengths) {
      const SequenceId id = gpu.add_sequence();
      seqs.push_back(id);
      const size_t n = T * size_t(s.kv_heads) * size_t(s.head_dim);
      const float common = common_of(gpu.config());
      const DeviceBuffer k = on_gpu(random_rows(rng, n, ScalarType::f32, true, common));
      const DeviceBuffer v = on_gpu(random_rows(rng, n, ScalarType::f32, false, common));
      gpu.append(id, 0, k.data(), v.data(), T, ScalarType::f32);
    }
    for (int R : {1, 4, 8}) {
      const int q_heads = s.kv_heads * R;
      const std::string what = s.name() + " R=" + std::to_string(R) + " seed " +
                               std::to_string(seed);
      const std::vector<size_t> decode(seqs.size(), 1);
      check_attention(gpu, seqs, decode, q_heads, {}, rng, what + " decode");
      // An odd number of splits; one block's warps a unit (12: the block merges its warps'
      // states first, as with 24); more splits than most sequences have tiles (empty splits,
      // whose states the merges must select away).
      for (int splits : {3, 12, 24}) {
        AttentionOptions split;
        split.splits = splits;
        check_attention(gpu, seqs, decode, q_heads, split, rng,
                        what + " decode, " + std::to_string(splits) + " splits");
      }
      AttentionOptions recent;
      recent.window = 40;
      check_attention(gpu, seqs, decode, q_heads, recent, rng, what + " decode, window 40");
      const std::vector<size_t> prefill = {1, 77, 45, 16};
      check_attention(gpu, seqs, prefill, q_heads, {}, rng, what + " prefill");
      AttentionOptions five;
      five.splits = 5;
      check_attention(gpu, seqs, prefill, q_heads, five, rng, what + " prefill, 5 splits");
      AttentionOptions window;
      window.window = 50;
      check_attention(gpu, seqs, prefill, q_heads, window, rng, what + " prefill, window 50");
    }
  }
}

// A decode step captured once in a CUDA graph and replayed: each replay first poisons the output,
// so a replay that leaves any element unwritten fails (a check of graph safety, too: capture
// fails if the call synchronizes or allocates).
TEST(Gpu, DecodeReplaysInACudaGraph) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const std::vector<GpuSetup> all = setups(seed);
  for (const GpuSetup& s : {all[0], all[6], all[9], all[13], all[15]}) {
    KVCache gpu(config_of(s, Device::cuda(0)));
    std::vector<SequenceId> seqs;
    for (size_t T : {size_t(1000), size_t(77)}) {
      seqs.push_back(gpu.add_sequence());
      const size_t n = T * size_t(s.kv_heads) * size_t(s.head_dim);
      const float common = common_of(gpu.config());
      const DeviceBuffer k = on_gpu(random_rows(rng, n, ScalarType::f32, true, common));
      const DeviceBuffer v = on_gpu(random_rows(rng, n, ScalarType::f32, false, common));
      gpu.append(seqs.back(), 0, k.data(), v.data(), T, ScalarType::f32);
    }
    const int q_heads = 4 * s.kv_heads;
    const std::vector<size_t> decode(seqs.size(), 1);
    for (int splits : {0, 3}) {
      AttentionOptions opt;
      opt.splits = splits;
      const std::vector<float> q = random_queries(decode, q_heads, s.head_dim, rng);
      const size_t n = q.size();
      std::vector<float> ref(n), out(n);
      attend_reference(gpu, 0, seqs, decode, q.data(), q_heads, ref.data(), opt);
      DeviceBuffer dq(Device::cuda(0), n * 4), dout(Device::cuda(0), n * 4);
      dq.upload(q.data(), n * 4);
      GpuWorkspace ws(gpu);
      gpu::time_graph_us(
          Device::cuda(0),
          [&](CudaStream stream) {
            gpu::fill(Device::cuda(0), dout.data(), 0xff, n * 4, stream);
            attend_decode(gpu, 0, seqs, dq.as<float>(), q_heads, dout.as<float>(), ws, stream,
                          opt);
          },
          2, 3);
      dout.download(out.data(), n * 4);
      expect_close(out, ref, s.name() + " splits " + std::to_string(splits) + " seed " +
                                 std::to_string(seed) + ", after 9 replays");
    }
  }
}

// GPU shards (every GPU of the machine: 1..n, NCCL communicators even for one) against the
// float64 reference of one GPU cache holding the same codes, both placements, with sequences that
// leave shards without tokens; states, all-gather and merge all run on the GPUs.
TEST(Gpu, ShardedDecodeMatchesOneCache) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int gpus = int(list_gpus().size());
  const std::vector<GpuSetup> all = setups(seed);
  // Codecs that do not calibrate (the same on every shard): fixed-shape, prod, dense.
  for (const GpuSetup& s : {all[0], all[4], all[9], all[13]})
    for (Placement placement : {Placement::sequence, Placement::heads})
      for (int world = 1; world <= gpus; ++world) {
        const CacheConfig c = config_of(s, Device::cuda(0));
        if (placement == Placement::heads && world > c.kv_heads) continue;
        ShardedConfig sc;
        sc.cache = c;
        sc.placement = placement;
        for (int g = 0; g < world; ++g) sc.devices.push_back(Device::cuda(g));
        if (placement == Placement::sequence) sc.share_tokens = 4 * size_t(c.page_tokens);
        ShardedCache sharded(sc);
        KVCache single(c);
        std::vector<SequenceId> sseqs, seqs;
        const size_t H = size_t(c.kv_heads), d = size_t(c.head_dim);
        for (size_t T : {size_t(1000), size_t(5), size_t(300)}) {
          sseqs.push_back(sharded.add_sequence());
          seqs.push_back(single.add_sequence());
          const std::vector<uint8_t> k = random_rows(rng, T * H * d, ScalarType::f32, true, 0.0f);
          const std::vector<uint8_t> v = random_rows(rng, T * H * d, ScalarType::f32, false, 0.0f);
          std::vector<DeviceBuffer> dk, dv;
          std::vector<const void*> ks, vs;
          for (int g = 0; g < world; ++g) {
            dk.emplace_back(Device::cuda(g), k.size());
            dv.emplace_back(Device::cuda(g), v.size());
            dk.back().upload(k.data(), k.size());
            dv.back().upload(v.data(), v.size());
            ks.push_back(dk.back().data());
            vs.push_back(dv.back().data());
          }
          sharded.append(sseqs.back(), 0, ks, vs, T, ScalarType::f32);
          single.append(seqs.back(), 0, dk[0].data(), dv[0].data(), T, ScalarType::f32);
        }
        for (int step = 0; step < 3; ++step) {  // decode steps of two of the sequences
          const size_t order[] = {2, 0};
          const std::vector<uint8_t> k = random_rows(rng, 2 * H * d, ScalarType::f32, true, 0.0f);
          const std::vector<uint8_t> v = random_rows(rng, 2 * H * d, ScalarType::f32, false, 0.0f);
          std::vector<DeviceBuffer> dk, dv;
          std::vector<const void*> ks, vs;
          for (int g = 0; g < world; ++g) {
            dk.push_back(on_gpu_at(k, g));
            dv.push_back(on_gpu_at(v, g));
            ks.push_back(dk.back().data());
            vs.push_back(dv.back().data());
          }
          const SequenceId ids[] = {sseqs[order[0]], sseqs[order[1]]};
          sharded.append_step(0, ids, ks, vs, ScalarType::f32);
          for (size_t i = 0; i < 2; ++i)
            single.append(seqs[order[i]], 0, dk[0].as<uint8_t>() + i * H * d * 4,
                          dv[0].as<uint8_t>() + i * H * d * 4, 1, ScalarType::f32);
        }
        const int R = 4, q_heads = R * c.kv_heads;
        const size_t B = seqs.size();
        const std::vector<size_t> decode(B, 1);
        const std::vector<float> q = random_queries(decode, q_heads, c.head_dim, rng);
        std::vector<float> ref(q.size());
        attend_reference(single, 0, seqs, decode, q.data(), q_heads, ref.data());
        std::vector<DeviceBuffer> dq, dout;
        std::vector<const float*> qp;
        std::vector<float*> op;
        std::vector<std::vector<float>> mine(static_cast<size_t>(world));
        for (int g = 0; g < world; ++g) {  // head placement: the shard's query heads' rows
          const auto heads = sharded.heads_of(g);
          const size_t first = size_t(R) * heads.first, count = size_t(R) * heads.count;
          const std::vector<float> qg = testing::head_rows(q, B, size_t(q_heads), first, count, d);
          mine[size_t(g)] = testing::head_rows(ref, B, size_t(q_heads), first, count, d);
          dq.emplace_back(Device::cuda(g), qg.size() * 4);
          dq.back().upload(qg.data(), qg.size() * 4);
          dout.emplace_back(Device::cuda(g), qg.size() * 4);
          dout.back().fill(0xff);  // NaN: an element never written fails
          qp.push_back(dq.back().as<float>());
          op.push_back(dout.back().as<float>());
        }
        sharded.attend_decode(0, sseqs, qp, q_heads, op);
        for (int g = 0; g < world; ++g) {
          synchronize(Device::cuda(g));
          std::vector<float> out(mine[size_t(g)].size());
          dout[size_t(g)].download(out.data(), out.size() * 4);
          expect_close(out, mine[size_t(g)],
                       s.name() + (placement == Placement::heads ? ", heads" : ", sequence") +
                           ", world " + std::to_string(world) + ", shard " + std::to_string(g) +
                           ", seed " + std::to_string(seed));
        }
      }
}

// attend_partial and merge_partial_states on the GPU against their CPU versions: a batch that
// mixes sequences the cache holds tokens of with sequences it holds none of (empty states), and
// merges of several state arrays with empty states among them (as several shards' would be).
TEST(Gpu, PartialStatesMatchTheCpu) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const std::vector<GpuSetup> all = setups(seed);
  for (const GpuSetup& s : {all[0], all[6], all[9], all[13], all[14]}) {
    KVCache cpu(config_of(s, Device::cpu())), gpu(config_of(s, Device::cuda(0)));
    std::vector<SequenceId> sc, sg;
    for (size_t T : {size_t(0), size_t(300), size_t(0), size_t(0), size_t(77), size_t(0)}) {
      sc.push_back(cpu.add_sequence());
      sg.push_back(gpu.add_sequence());
      if (T > 0) append_both(cpu, gpu, sc.back(), sg.back(), 0, T, ScalarType::f32, rng);
    }
    const int q_heads = 2 * s.kv_heads;
    const size_t d = size_t(s.head_dim), rows = sc.size() * size_t(q_heads);
    const std::vector<float> q = random_queries(std::vector<size_t>(sc.size(), 1), q_heads,
                                                s.head_dim, rng);
    std::vector<float> ref(rows * (4 + d)), got(rows * (4 + d));
    attend_partial(cpu, 0, sc, q.data(), q_heads, ref.data());
    DeviceBuffer dq(Device::cuda(0), q.size() * 4), dst(Device::cuda(0), got.size() * 4);
    dq.upload(q.data(), q.size() * 4);
    dst.fill(0xff);  // NaN: a row never written fails
    GpuWorkspace ws(gpu);
    attend_partial(gpu, 0, sg, dq.as<float>(), q_heads, dst.as<float>(), ws, nullptr);
    synchronize(Device::cuda(0));
    dst.download(got.data(), got.size() * 4);
    std::vector<float> out_ref, out_got;
    for (size_t r = 0; r < rows; ++r) {
      const float* a = &ref[r * (4 + d)];
      const float* b = &got[r * (4 + d)];
      if (a[1] == 0.0f) {  // empty: all zeros
        for (size_t j = 0; j < 4 + d; ++j) EXPECT_EQ(b[j], 0.0f) << s.name() << " row " << r;
        continue;
      }
      ASSERT_GT(b[1], 0.0f) << s.name() << " row " << r;
      EXPECT_NEAR(b[0], a[0], 1e-2 * (1.0 + std::abs(a[0]))) << s.name() << " m, row " << r;
      for (size_t j = 0; j < d; ++j) {  // the outputs o = acc / l
        out_ref.push_back(a[4 + j] / a[1]);
        out_got.push_back(b[4 + j] / b[1]);
      }
    }
    expect_close(out_got, out_ref, s.name() + " partial states, seed " + std::to_string(seed));
  }
  // The merge of 5 state arrays (random states, empty ones among them).
  const int d = 96;
  const size_t rows = 37, count = 5, stride = 4 + d;
  const std::vector<float> states = testing::random_partial_states(rng, count, rows, size_t(d));
  std::vector<const float*> arrays;
  for (size_t s = 0; s < count; ++s) arrays.push_back(&states[s * rows * stride]);
  std::vector<float> ref(rows * size_t(d)), got(rows * size_t(d));
  merge_partial_states(arrays, rows, d, ref.data());
  DeviceBuffer dstates(Device::cuda(0), states.size() * 4), dout(Device::cuda(0), got.size() * 4);
  dstates.upload(states.data(), states.size() * 4);
  dout.fill(0xff);
  merge_partial_states(Device::cuda(0), dstates.as<float>(), int(count), rows, d,
                       dout.as<float>(), nullptr);
  synchronize(Device::cuda(0));
  dout.download(got.data(), got.size() * 4);
  for (size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], ref[i], 1e-5 * (1.0 + std::abs(ref[i]))) << "merge, element " << i
                                                                 << ", seed " << seed;
}

TEST(Gpu, CachesCopyBetweenDevicesExactly) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const std::vector<GpuSetup> all = setups(seed);
  // Fractional bits (per-head outlier channels travel too), centering codecs (per-head offsets),
  // and centering codecs with the offset given in the configuration.
  GpuSetup given = all[15];
  given.key.offset.resize(size_t(given.head_dim));
  for (size_t j = 0; j < given.key.offset.size(); ++j) given.key.offset[j] = 0.25f * float(j % 5);
  for (GpuSetup s : {all[4], all[15], given}) {
    SCOPED_TRACE(s.name() + " seed " + std::to_string(seed));
    s.layers = 2;
    KVCache cpu(config_of(s, Device::cpu()));
    const SequenceId a = cpu.add_sequence();
    for (int l = 0; l < 2; ++l) {
      const size_t n = 50 * size_t(s.kv_heads) * size_t(s.head_dim);
      const auto k = random_rows(rng, n, ScalarType::f32, true, common_of(cpu.config()));
      const auto v = random_rows(rng, n, ScalarType::f32, false, common_of(cpu.config()));
      cpu.append(a, l, k.data(), v.data(), 50, ScalarType::f32);
    }
    KVCache gpu = cpu.to(Device::cuda(0));
    EXPECT_EQ(gpu.device(), Device::cuda(0));
    expect_same_codes(cpu, gpu, a, a, "copy to GPU");
    EXPECT_EQ(gpu.to(Device::cpu()).serialize(), cpu.serialize());
    // The copy keeps working: more tokens on both give the same codes again.
    KVCache cpu2 = gpu.to(Device::cpu());
    append_both(cpu2, gpu, a, a, 0, 9, ScalarType::f16, rng);
    expect_same_codes(cpu2, gpu, a, a, "after the copy");
    // A GPU cache made directly (offsets given or chosen on its first append) matches too.
    KVCache direct(config_of(s, Device::cuda(0)));
    KVCache host(config_of(s, Device::cpu()));
    const SequenceId b = direct.add_sequence(), c = host.add_sequence();
    append_both(host, direct, c, b, 1, 33, ScalarType::bf16, rng);
    expect_same_codes(host, direct, c, b, "made on the GPU");
  }
}

// A centering codec's first append on the GPU that holds a vector it cannot encode: refused with
// the reason, nothing chosen from it, and the next (good) append gives the CPU's codes.
TEST(Gpu, RefusedFirstAppendChoosesNoOffset) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const GpuSetup s = setups(seed)[15];  // 4-bit, centering, float16 norms
  KVCache gpu(config_of(s, Device::cuda(0))), cpu(config_of(s, Device::cpu()));
  const SequenceId a = gpu.add_sequence(), b = cpu.add_sequence();
  const size_t n = 40 * size_t(s.kv_heads) * size_t(s.head_dim);
  auto k = random_rows(rng, n, ScalarType::f32, true, common_of(gpu.config()));
  const auto v = random_rows(rng, n, ScalarType::f32, false, common_of(gpu.config()));
  const float huge = 1e6f;  // token 12 of head 1: its centered norm is far above 65504
  std::memcpy(&k[((12 * size_t(s.kv_heads) + 1) * size_t(s.head_dim) + 3) * 4], &huge, 4);
  const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
  {  // a vector whose norm does not fit float16 is refused
    const std::string m =
        error_of([&] { gpu.append(a, 0, dk.data(), dv.data(), 40, ScalarType::f32); });
    EXPECT_NE(m.find("norm"), std::string::npos) << m;
    EXPECT_NE(m.find("KV head"), std::string::npos) << m;
  }
  EXPECT_EQ(gpu.length(a, 0), 0u);
  for (int h = 0; h < s.kv_heads; ++h) {
    EXPECT_FALSE(gpu.key_codec(0, h).ready()) << h;
    EXPECT_FALSE(gpu.value_codec(0, h).ready()) << h;
  }
  append_both(cpu, gpu, b, a, 0, 40, ScalarType::f32, rng);
  expect_same_codes(cpu, gpu, b, a, "after the refused append");
}

// A decode step of several sequences on the GPU (one launch, lengths written on the device)
// gives the codes the CPU gives each sequence's token appended alone, for every setup; with
// more sequences than one launch takes; attention then sees the new tokens; a bad vector is
// refused with the CPU's message and changes nothing.
TEST(Gpu, AppendStepMatchesTheCpu) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (GpuSetup s : setups(seed)) {
    SCOPED_TRACE(s.name() + " seed " + std::to_string(seed));
    // Prefills of 37..62 tokens: the steps cross page ends.
    auto [cpu, gpu, sc, sg] = paired_caches(
        s, 512, 64, 6, [](int i) { return 37 + 5 * size_t(i); }, ScalarType::f16, rng);
    const size_t R = size_t(s.kv_heads) * size_t(s.head_dim);
    for (int step = 0; step < 9; ++step) {
      std::vector<size_t> order = {4, 1, 5, 0};
      if (step % 3 == 2) order = {0, 1, 2, 3, 4, 5};
      const auto k = random_rows(rng, order.size() * R, ScalarType::f16, true);
      const auto v = random_rows(rng, order.size() * R, ScalarType::f16, false);
      std::vector<SequenceId> ids;
      for (size_t i = 0; i < order.size(); ++i) {
        ids.push_back(sg[order[i]]);
        cpu.append(sc[order[i]], 0, &k[i * R * 2], &v[i * R * 2], 1, ScalarType::f16);
      }
      const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
      gpu.append_step(0, ids, dk.data(), dv.data(), ScalarType::f16);
    }
    for (size_t i = 0; i < sc.size(); ++i)
      expect_same_codes(cpu, gpu, sc[i], sg[i], s.name() + " sequence " + std::to_string(i));
    EXPECT_EQ(cpu.pages_free(), gpu.pages_free());
    const size_t decode[] = {1, 1, 1, 1, 1, 1};
    check_attention(gpu, sg, decode, 4 * s.kv_heads, {}, rng, s.name() + " after the steps");
  }
  // More sequences than a launch takes (128), and a refused step.
  const GpuSetup s = setups(seed)[0];
  auto [cpu, gpu, sc, sg] = paired_caches(
      s, 300, 140, 140, [](int i) { return 30 + size_t(i % 4); }, ScalarType::f32, rng);
  const size_t R = size_t(s.kv_heads) * size_t(s.head_dim), B = sg.size();
  auto k = random_rows(rng, B * R, ScalarType::f32, true);
  auto v = random_rows(rng, B * R, ScalarType::f32, false);
  {
    const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
    gpu.append_step(0, sg, dk.data(), dv.data(), ScalarType::f32);
    cpu.append_step(0, sc, k.data(), v.data(), ScalarType::f32);
  }
  for (size_t i = 0; i < B; ++i) expect_same_codes(cpu, gpu, sc[i], sg[i], std::to_string(i));
  const size_t free_before = gpu.pages_free();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&v[(133 * R + 1 * size_t(s.head_dim) + 7) * 4], &nan, 4);  // values, head 1
  std::memcpy(&v[(70 * R + 1 * size_t(s.head_dim) + 2) * 4], &nan, 4);   // the first of two
  const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
  const std::string m =
      error_of([&] { gpu.append_step(0, sg, dk.data(), dv.data(), ScalarType::f32); });
  EXPECT_EQ(m, error_of([&] { cpu.append_step(0, sc, k.data(), v.data(), ScalarType::f32); }));
  EXPECT_NE(m.find("sequence " + std::to_string(sg[70])), std::string::npos) << m;
  EXPECT_NE(m.find("values of KV head 1"), std::string::npos) << m;
  EXPECT_EQ(gpu.pages_free(), free_before);
  // The same step deferred (two launches on one flag word) names the same vector.
  gpu.append_step(0, sg, dk.data(), dv.data(), ScalarType::f32, StepCheck::deferred);
  const std::string md = error_of([&] { gpu.check(); });
  const std::string named = "sequence " + std::to_string(sg[70]) +
                            ", layer 0, values of KV head 1: token " +
                            std::to_string(gpu.length(sg[70], 0)) + " of a deferred";
  EXPECT_NE(md.find(named), std::string::npos) << md;
  EXPECT_EQ(gpu.pages_free(), free_before);
  for (size_t i = 0; i < B; ++i) ASSERT_EQ(gpu.length(sg[i], 0), cpu.length(sc[i], 0)) << i;
  std::vector<size_t> decode(B, 1);
  check_attention(gpu, sg, decode, 4 * s.kv_heads, {}, rng, "after a refused step");
}

// Deferred steps (StepCheck::deferred) store what checked ones store, across page ends and past
// the queue's 64 steps, and attention sees them before they are checked; a refused one is
// reported by check() or the next call that changes or copies the sequences, which undoes it and
// the steps queued after it: lengths, pages and codes are then those of the steps before it.
TEST(Gpu, DeferredStepsStoreTheSameAndUndoARefusal) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (const GpuSetup& s : {setups(seed)[0], setups(seed).back()}) {
    SCOPED_TRACE(s.name() + " seed " + std::to_string(seed));
    auto [cpu, gpu, sc, sg] = paired_caches(
        s, 400, 64, 5, [](int i) { return 20 + 7 * size_t(i); }, ScalarType::f16, rng);
    const size_t R = size_t(s.kv_heads) * size_t(s.head_dim), B = sg.size();
    std::vector<DeviceBuffer> inputs;  // a deferred step reads them after the call returns
    // One step to every sequence: the CPU's at once, the GPU's deferred (or checked).
    auto step = [&](std::vector<uint8_t> k, std::vector<uint8_t> v, StepCheck check) {
      inputs.push_back(on_gpu(k));
      inputs.push_back(on_gpu(v));
      gpu.append_step(0, sg, inputs[inputs.size() - 2].data(), inputs.back().data(),
                      ScalarType::f16, check);
    };
    auto rows = [&](bool keys) { return random_rows(rng, B * R, ScalarType::f16, keys); };
    for (int n = 0; n < 70; ++n) {  // more than the queue holds: the 65th waits for the first
      auto k = rows(true), v = rows(false);
      cpu.append_step(0, sc, k.data(), v.data(), ScalarType::f16);
      step(k, v, StepCheck::deferred);
    }
    const std::vector<size_t> decode(B, 1);
    check_attention(gpu, sg, decode, 4 * s.kv_heads, {}, rng, s.name() + " steps queued");
    gpu.check();
    for (size_t i = 0; i < B; ++i) expect_same_codes(cpu, gpu, sc[i], sg[i], std::to_string(i));
    EXPECT_EQ(gpu.pages_free(), cpu.pages_free());

    // A good step, a refused one (a NaN in sequence 3's values, KV head 1), two more.
    auto k = rows(true), v = rows(false);
    cpu.append_step(0, sc, k.data(), v.data(), ScalarType::f16);
    step(k, v, StepCheck::deferred);
    auto bad = rows(false);
    const uint16_t nan16 = 0x7e00;
    std::memcpy(&bad[(3 * R + size_t(s.head_dim) + 5) * 2], &nan16, 2);
    step(rows(true), bad, StepCheck::deferred);
    for (int n = 0; n < 2; ++n) step(rows(true), rows(false), StepCheck::deferred);
    const std::string m = error_of([&] { gpu.check(); });
    EXPECT_NE(m.find("sequence " + std::to_string(sg[3]) + ", layer 0, values of KV head 1"),
              std::string::npos) << m;
    EXPECT_NE(m.find("token " + std::to_string(cpu.length(sc[3], 0)) + " of a deferred"),
              std::string::npos) << m;
    EXPECT_NE(m.find("the 2 queued after it were undone"), std::string::npos) << m;
    EXPECT_NO_THROW(gpu.check());  // reported once
    for (size_t i = 0; i < B; ++i) {
      ASSERT_EQ(gpu.length(sg[i], 0), cpu.length(sc[i], 0)) << i;
      expect_same_codes(cpu, gpu, sc[i], sg[i], "after the refusal " + std::to_string(i));
    }
    EXPECT_EQ(gpu.pages_free(), cpu.pages_free());

    // A later deferred step leaves a refused one queued, done or not, and the cache reads as if
    // both were taken; a call that changes the sequences (here a checked step, itself not taken
    // then) reports it and undoes both.
    const size_t before = gpu.length(sg[0], 0);
    step(rows(true), bad, StepCheck::deferred);
    synchronize(Device::cuda(0), gpu.stream());
    step(rows(true), rows(false), StepCheck::deferred);
    EXPECT_EQ(gpu.length(sg[0], 0), before + 2);
    const std::string again = error_of([&] { step(rows(true), rows(false), StepCheck::now); });
    EXPECT_NE(again.find("that step and the 1 queued after it were undone"), std::string::npos)
        << again;
    EXPECT_EQ(gpu.length(sg[0], 0), before);
    // Or one that copies them.
    step(rows(true), bad, StepCheck::deferred);
    EXPECT_NE(error_of([&] { (void)gpu.serialize(); }).find("deferred"), std::string::npos);
    // Steps after a reported refusal are taken again, checked or deferred.
    for (StepCheck check : {StepCheck::deferred, StepCheck::now}) {
      k = rows(true), v = rows(false);
      cpu.append_step(0, sc, k.data(), v.data(), ScalarType::f16);
      step(k, v, check);
    }
    for (size_t i = 0; i < B; ++i) expect_same_codes(cpu, gpu, sc[i], sg[i], "at the end");
    EXPECT_EQ(gpu.pages_free(), cpu.pages_free());
    check_attention(gpu, sg, decode, 4 * s.kv_heads, {}, rng, s.name() + " after the steps");
  }
}

// A first append that calibrates (outlier channels, offsets) chooses on the device what the CPU
// chooses from the same batch: long enough for many of the statistics kernel's stages and an
// unfinished last one, at every input type, from 16-byte aligned and unaligned inputs, with
// channel blocks of 128 and fewer (d = 64, 192). A non-finite element is refused with the CPU's
// message, and nothing is chosen from that batch.
TEST(Gpu, FirstAppendCalibratesAsTheCpuDoes) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  auto setup = [&](int d, double kb, double vb, bool center, bool given_offset) {
    GpuSetup s;
    s.head_dim = d;
    s.kv_heads = 3;
    s.key = {d, kb, CodecKind::mse, RotationChoice::automatic, seed, NormFormat::f16, {}, center};
    s.value = s.key;
    s.value.bits = vb;
    s.value.seed = seed ^ 0x5bd1e995u;
    if (given_offset) {
      std::normal_distribution<float> g(0.0f, 2.0f);
      s.key.offset.resize(size_t(d));
      for (float& x : s.key.offset) x = g(rng);
    }
    return s;
  };
  const GpuSetup cases[] = {
      setup(128, 3.5, 2.5, false, false), setup(128, 3.5, 3.5, true, false),
      setup(128, 4.0, 3.0, true, false),  setup(64, 2.5, 3.5, true, false),
      setup(192, 3.5, 2.5, true, false),  setup(128, 3.5, 2.5, true, true)};
  for (const GpuSetup& s : cases)
    for (ScalarType type : {ScalarType::f32, ScalarType::f16, ScalarType::bf16})
      for (bool aligned : {true, false}) {
        SCOPED_TRACE(s.name() + " input type " + std::to_string(int(type)) +
                     (aligned ? " aligned" : " unaligned") + " seed " + std::to_string(seed));
        KVCache cpu(config_of(s, Device::cpu())), gpu(config_of(s, Device::cuda(0)));
        const SequenceId a = cpu.add_sequence(), b = gpu.add_sequence();
        const size_t tokens = 1000, n = tokens * size_t(s.kv_heads) * size_t(s.head_dim);
        const size_t elem = type == ScalarType::f32 ? 4 : 2, at = aligned ? 0 : elem;
        const auto k = random_rows(rng, n, type, true, 3.0f);
        const auto v = random_rows(rng, n, type, false, 3.0f);
        cpu.append(a, 0, k.data(), v.data(), tokens, type);
        DeviceBuffer dk(Device::cuda(0), k.size() + at), dv(Device::cuda(0), v.size() + at);
        dk.upload(k.data(), k.size(), at);
        dv.upload(v.data(), v.size(), at);
        gpu.append(b, 0, dk.as<uint8_t>() + at, dv.as<uint8_t>() + at, tokens, type);
        expect_same_codes(cpu, gpu, a, b, s.name());
      }
  // Non-finite elements in a calibrating first append: an infinity in token 900's keys of KV
  // head 2 and a NaN in token 700's values of KV head 0. Keys come first in the CPU's order.
  const GpuSetup s = cases[1];
  const size_t tokens = 1000, n = tokens * size_t(s.kv_heads) * size_t(s.head_dim);
  auto k = random_rows(rng, n, ScalarType::f16, true);
  auto v = random_rows(rng, n, ScalarType::f16, false);
  const uint16_t inf = 0x7c00, nan = 0x7e00;
  std::memcpy(&k[((900 * size_t(s.kv_heads) + 2) * size_t(s.head_dim) + 77) * 2], &inf, 2);
  std::memcpy(&v[((700 * size_t(s.kv_heads) + 0) * size_t(s.head_dim) + 5) * 2], &nan, 2);
  KVCache cpu(config_of(s, Device::cpu())), gpu(config_of(s, Device::cuda(0)));
  const SequenceId a = cpu.add_sequence(), b = gpu.add_sequence();
  const std::string expected =
      error_of([&] { cpu.append(a, 0, k.data(), v.data(), tokens, ScalarType::f16); });
  EXPECT_NE(expected.find("keys of KV head 2"), std::string::npos) << expected;
  EXPECT_NE(expected.find("token 900"), std::string::npos) << expected;
  EXPECT_NE(expected.find("inf at index 77"), std::string::npos) << expected;
  const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
  const size_t free_before = gpu.pages_free();
  EXPECT_EQ(error_of([&] { gpu.append(b, 0, dk.data(), dv.data(), tokens, ScalarType::f16); }),
            expected);
  EXPECT_EQ(gpu.length(b, 0), 0u);
  EXPECT_EQ(gpu.pages_free(), free_before);
  for (int h = 0; h < s.kv_heads; ++h) {
    EXPECT_FALSE(gpu.key_codec(0, h).ready()) << h;
    EXPECT_FALSE(gpu.value_codec(0, h).ready()) << h;
  }
  // Without the keys' infinity, the values' NaN is the first.
  const uint16_t one = 0x3c00;
  std::memcpy(&k[((900 * size_t(s.kv_heads) + 2) * size_t(s.head_dim) + 77) * 2], &one, 2);
  const DeviceBuffer dk2 = on_gpu(k);
  const std::string m =
      error_of([&] { gpu.append(b, 0, dk2.data(), dv.data(), tokens, ScalarType::f16); });
  EXPECT_NE(m.find("values of KV head 0"), std::string::npos) << m;
  EXPECT_NE(m.find("token 700"), std::string::npos) << m;
  EXPECT_NE(m.find("nan at index 5"), std::string::npos) << m;
  EXPECT_EQ(m, error_of([&] { cpu.append(a, 0, k.data(), v.data(), tokens, ScalarType::f16); }));
}

TEST(Gpu, BadInputIsRefusedAndChangesNothing) {
  REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  GpuSetup s = setups(seed)[0];
  KVCache gpu(config_of(s, Device::cuda(0)));
  const SequenceId a = gpu.add_sequence();
  const size_t n = 40 * size_t(s.kv_heads) * size_t(s.head_dim);
  auto k = random_rows(rng, n, ScalarType::f32, true);
  const auto v = random_rows(rng, n, ScalarType::f32, false);
  const size_t bad = (33 * size_t(s.kv_heads) + 1) * size_t(s.head_dim) + 5;  // token 33, head 1
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&k[bad * 4], &nan, 4);
  const DeviceBuffer dk = on_gpu(k), dv = on_gpu(v);
  const size_t free_before = gpu.pages_free();
  {  // a NaN key is refused
    const std::string m =
        error_of([&] { gpu.append(a, 0, dk.data(), dv.data(), 40, ScalarType::f32); });
    EXPECT_NE(m.find("keys of KV head 1"), std::string::npos) << m;
    EXPECT_NE(m.find("token 33"), std::string::npos) << m;
    EXPECT_NE(m.find("non-finite"), std::string::npos) << m;
  }
  EXPECT_EQ(gpu.length(a, 0), 0u);
  EXPECT_EQ(gpu.pages_free(), free_before);
  // A refused vector's slot stays past the end of the sequence but inside the tile that
  // attention reads whole (masked): after 3 good tokens, a NaN value at token 5 must not reach
  // the output through its norm. Tokens 5 and 9 are encoded by one warp in both append kernels
  // (a decode-size append's warps take every 4th token, a long append's lanes one token each):
  // the error names the first.
  for (const size_t tokens : {40, 16}) {
    SCOPED_TRACE(std::to_string(tokens) + " tokens");
    KVCache c2(config_of(s, Device::cuda(0)));
    const SequenceId b = c2.add_sequence();
    auto v2 = v;
    for (const size_t t : {9, 5})
      std::memcpy(&v2[((t * size_t(s.kv_heads) + 1) * size_t(s.head_dim) + 7) * 4], &nan, 4);
    const DeviceBuffer dv2 = on_gpu(v2), dk2 = on_gpu(random_rows(rng, n, ScalarType::f32, true));
    const std::string m =
        error_of([&] { c2.append(b, 0, dk2.data(), dv2.data(), tokens, ScalarType::f32); });
    EXPECT_NE(m.find("values of KV head 1"), std::string::npos) << m;
    EXPECT_NE(m.find("token 5"), std::string::npos) << m;
    c2.append(b, 0, dk2.data(), dv.data(), 3, ScalarType::f32);
    const SequenceId ids[] = {b};
    const size_t decode[] = {1};
    check_attention(c2, ids, decode, 4 * s.kv_heads, {}, rng, "after a refused append");
  }
  // The CPU attention refuses a GPU cache and the GPU attention a CPU cache.
  std::vector<float> q(size_t(s.kv_heads) * s.head_dim), out(q.size());
  const SequenceId ids[] = {a};
  EXPECT_THROW(attend_decode(gpu, 0, ids, q.data(), s.kv_heads, out.data()), Error);
  KVCache cpu(config_of(s, Device::cpu()));
  EXPECT_THROW(GpuWorkspace{cpu}, Error);
  // Too many sequences for the device page tables.
  CacheConfig small = config_of(s, Device::cuda(0));
  small.max_sequences = 2;
  KVCache two(small);
  two.add_sequence();
  two.add_sequence();
  EXPECT_THROW(two.add_sequence(), Error);
}

}  // namespace
}  // namespace tqkv
