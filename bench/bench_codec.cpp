// Codec throughput: encode and decode of random vectors, single-threaded and on all threads.
// Reported: vectors/s (items_per_second) and bytes/s over the float32 input (encode) or output
// (decode), next to a memcpy of the same float32 bytes for scale.
//   ./tqkv_bench_codec --benchmark_filter=Encode
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "tqkv/codec.hpp"

namespace {

constexpr size_t kBatch = 16384;

struct Fixture {
  Fixture(int dim, double bits, tqkv::CodecKind kind, tqkv::RotationChoice rot)
      : codec([&] {
          tqkv::CodecSpec s;
          s.dim = dim;
          s.bits = bits;
          s.kind = kind;
          s.rotation = rot;
          s.seed = 1;
          return s;
        }()),
        x(kBatch * size_t(dim)),
        out(kBatch * size_t(dim)),
        records(kBatch * codec.record_bytes()) {
    std::mt19937 rng(12345);
    std::normal_distribution<float> normal;
    for (auto& v : x) v = normal(rng);
    codec.encode(x.data(), kBatch, records.data());
  }
  tqkv::Codec codec;
  std::vector<float> x, out;
  std::vector<uint8_t> records;
};

void run(benchmark::State& state, bool encode) {
  const int dim = int(state.range(0));
  const double bits = double(state.range(1)) / 10.0;
  const auto kind = state.range(2) ? tqkv::CodecKind::prod : tqkv::CodecKind::mse;
  const auto rot = state.range(3) ? tqkv::RotationChoice::dense : tqkv::RotationChoice::automatic;
  const int threads = int(state.range(4));
  const int previous = tqkv::set_num_threads(threads);
  Fixture f(dim, bits, kind, rot);
  for (auto _ : state) {
    if (encode)
      f.codec.encode(f.x.data(), kBatch, f.records.data());
    else
      f.codec.decode(f.records.data(), kBatch, f.out.data());
    benchmark::DoNotOptimize(f.records.data());
    benchmark::DoNotOptimize(f.out.data());
  }
  tqkv::set_num_threads(previous);
  state.SetItemsProcessed(int64_t(state.iterations()) * int64_t(kBatch));
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(kBatch * size_t(dim) * 4));
  state.counters["threads"] = threads == 0 ? tqkv::num_threads() : threads;
  state.counters["record_bytes"] = double(f.codec.record_bytes());
}

void BM_Encode(benchmark::State& s) { run(s, true); }
void BM_Decode(benchmark::State& s) { run(s, false); }

void BM_MemcpyFloat32(benchmark::State& state) {
  std::vector<float> a(kBatch * 128, 1.0f), b(a.size());
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), a.size() * 4);
    benchmark::DoNotOptimize(b.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * int64_t(kBatch));
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(a.size() * 4));
}

// Args: dim, bits × 10, prod?, dense?, threads (0 = all).
void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dim", "bits10", "prod", "dense", "threads"});
  for (int threads : {1, 0}) {
    for (int bits10 : {20, 30, 40, 35, 80}) b->Args({128, bits10, 0, 0, threads});
    b->Args({128, 40, 0, 1, threads});  // dense rotation
    b->Args({128, 40, 1, 0, threads});  // prod
    b->Args({96, 40, 0, 0, threads});   // non-power-of-two head dim
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Encode)->Apply(Shapes);
BENCHMARK(BM_Decode)->Apply(Shapes);
BENCHMARK(BM_MemcpyFloat32)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
