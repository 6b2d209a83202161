// GPU attention's front end: validates on the host (lengths are known there too), cuts the batch
// into launches that fit the workspace, chooses the token splits and launches the kernels of
// src/cuda/attention.cu. Nothing here waits for the GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_problem.hpp"
#include "cache_impl.hpp"
#include "cuda/backend.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/error.hpp"

namespace tqkv {

namespace {

constexpr size_t kWorkspaceItems = 4096;

// Workspace regions: partial states per item, then prepared queries and their scales per unit.
struct Regions {
  size_t partial_floats, prepared_words, scale_floats;
  explicit Regions(const GpuMirror& gpu)
      : partial_floats(kWorkspaceItems * gpu::kTileRows * (4 + size_t(gpu.value.term_dim))),
        prepared_words(gpu::kTileRows * size_t(gpu.key.term_dim) / 2),
        scale_floats(4 * gpu::kTileRows) {}
  size_t bytes() const {
    return (partial_floats + kWorkspaceItems * (prepared_words + scale_floats)) * 4;
  }
};

}  // namespace

GpuWorkspace::GpuWorkspace(const KVCache& cache)
    : buffer_(cache.device(), cache.internals().on_gpu() ? Regions(*cache.internals().gpu).bytes() : 0),
      items_(kWorkspaceItems) {
  TQKV_CHECK(cache.device().is_cuda(), "GpuWorkspace: the cache lives on the CPU");
}

namespace {

// What attend checks before it launches anything (the problem it returns).
detail::AttentionProblem check(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                               std::span<const size_t> query_tokens, int q_heads,
                               const GpuWorkspace& workspace, const AttentionOptions& options) {
  const auto& im = cache.internals();
  const CacheConfig& c = cache.config();
  TQKV_CHECK(im.on_gpu(), "attend: this cache lives on the CPU; call attend without a workspace");
  TQKV_CHECK(workspace.device() == c.device, "attend: the workspace is on ",
             to_string(workspace.device()), " but the cache on ", to_string(c.device));
  const detail::AttentionProblem problem =
      detail::make_problem(cache, layer, seqs, query_tokens, q_heads, options);
  detail::check_shape(problem);
  TQKV_CHECK(options.splits >= 0, "attend: splits must be >= 0, got ", options.splits);
  for (const Codec* codec : {&cache.key_codec(layer, 0), &cache.value_codec(layer, 0)})
    for (const ChannelGroup& g : codec->groups())
      TQKV_CHECK(g.mse_bits <= 4, "attend: GPU attention reads codes of up to 4 bits; this ",
                 "cache stores ", g.mse_bits, "-bit codes (use the CPU)");
  return problem;
}

// The launches of a checked problem: outputs to `out`, or partial states to `states`.
void launch(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
            const detail::AttentionProblem& problem, const float* q, int q_heads, float* out,
            float* states, GpuWorkspace& workspace, CudaStream stream,
            const AttentionOptions& options) {
  const auto& im = cache.internals();
  const CacheConfig& c = cache.config();
  if (stream == nullptr) stream = cache.stream();
  gpu::AttentionParams p{};
  p.cache = im.view(layer);
  p.q = q;
  p.out = out;
  p.states = states;
  p.q_heads = q_heads;
  p.group = problem.group;
  p.scale_log2 = problem.scale * 1.4426950408889634f;
  p.window = options.window;
  const Regions regions(*im.gpu);
  p.partial = workspace.data();
  p.prepared = reinterpret_cast<uint32_t*>(workspace.data() + regions.partial_floats);
  p.prepared_words = uint32_t(regions.prepared_words);
  p.row_scales = reinterpret_cast<float*>(p.prepared + kWorkspaceItems * regions.prepared_words);
  const size_t capacity = workspace.items();
  size_t longest = 0;
  auto flush = [&] {
    if (p.batch == 0) return;
    p.first_unit[p.batch] = p.units;
    p.splits = options.splits;  // 0: the launch fills one wave of the GPU
    p.max_items = uint32_t(capacity);
    p.max_tokens = uint32_t(std::min<size_t>(longest, UINT32_MAX));
    gpu::launch_attention(c.device, p, stream);
    p.batch = 0;
    p.units = 0;
    longest = 0;
  };
  // Entries: (sequence, a run of its query tokens) with at most `capacity` units each.
  const size_t max_tokens_per_entry = std::max<size_t>(
      1, capacity / size_t(c.kv_heads) * gpu::kTileRows / size_t(problem.group));
  for (size_t b = 0; b < seqs.size(); ++b) {
    const size_t L = problem.seqs[b].queries;
    for (size_t i0 = 0; i0 < L; i0 += max_tokens_per_entry) {
      const size_t n = std::min(max_tokens_per_entry, L - i0);
      const size_t tiles = (n * size_t(problem.group) + gpu::kTileRows - 1) / gpu::kTileRows;
      const size_t units = tiles * size_t(c.kv_heads);
      if (p.batch == gpu::kMaxLaunchBatch || p.units + units > capacity) flush();
      p.slot[p.batch] = im.find(seqs[b], "attend").slot;
      p.queries[p.batch] = uint32_t(n);
      p.tail[p.batch] = uint32_t(L - i0 - n);
      p.first_row[p.batch] = uint32_t(problem.seqs[b].first_query_row + i0);
      p.first_unit[p.batch] = p.units;
      p.units += uint32_t(units);
      longest = std::max(longest, problem.seqs[b].tokens);
      ++p.batch;
    }
  }
  flush();
}

}  // namespace

void attend(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
            std::span<const size_t> query_tokens, const float* q, int q_heads, float* out,
            GpuWorkspace& workspace, CudaStream stream, const AttentionOptions& options) {
  const detail::AttentionProblem problem =
      check(cache, layer, seqs, query_tokens, q_heads, workspace, options);
  if (detail::total_rows(problem) == 0) return;
  TQKV_CHECK(q != nullptr && out != nullptr, "attend: null query or output pointer");
  launch(cache, layer, seqs, problem, q, q_heads, out, nullptr, workspace, stream, options);
}

void attend_decode(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                   const float* q, int q_heads, float* out, GpuWorkspace& workspace,
                   CudaStream stream, const AttentionOptions& options) {
  const std::vector<size_t> ones(seqs.size(), 1);
  attend(cache, layer, seqs, ones, q, q_heads, out, workspace, stream, options);
}

void attend_partial(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                    const float* q, int q_heads, float* states, GpuWorkspace& workspace,
                    CudaStream stream, const AttentionOptions& options) {
  TQKV_CHECK(cache.internals().on_gpu(), "attend_partial: this cache lives on the CPU; call "
             "attend_partial without a workspace");
  const std::vector<detail::SequenceRun> runs =
      detail::sequence_runs(cache, layer, seqs, q_heads, options);
  // Every run checked before anything is queued.
  std::vector<detail::AttentionProblem> problems;
  for (const detail::SequenceRun& r : runs) {
    if (!r.held) continue;
    const std::vector<size_t> ones(r.count, 1);
    problems.push_back(check(cache, layer, seqs.subspan(r.first, r.count), ones, q_heads,
                             workspace, options));
  }
  if (seqs.empty()) return;
  TQKV_CHECK(q != nullptr && states != nullptr, "attend_partial: null query or states pointer");
  TQKV_CHECK(reinterpret_cast<uintptr_t>(states) % 16 == 0, "attend_partial: GPU states must be "
             "16-byte aligned (each row is written as float4s)");
  if (stream == nullptr) stream = cache.stream();
  const size_t d = size_t(cache.config().head_dim), heads = size_t(q_heads);
  size_t next = 0;
  for (const detail::SequenceRun& r : runs)
    if (r.held)
      launch(cache, layer, seqs.subspan(r.first, r.count), problems[next++],
             q + r.first * heads * d, q_heads, nullptr, states + r.first * heads * (4 + d),
             workspace, stream, options);
  // The empty state, all zeros (l = 0), once every launch was accepted.
  for (const detail::SequenceRun& r : runs)
    if (!r.held)
      gpu::fill(cache.device(), states + r.first * heads * (4 + d), 0,
                r.count * heads * (4 + d) * 4, stream);
}

void merge_partial_states(Device device, const float* states, int count, size_t rows,
                          int head_dim, float* out, CudaStream stream) {
  TQKV_CHECK(device.is_cuda(), "merge_partial_states: ", to_string(device), " is not a GPU");
  TQKV_CHECK(count >= 1, "merge_partial_states: no states to merge");
  TQKV_CHECK(head_dim >= 1 && head_dim <= 1024, "merge_partial_states: head_dim must be in "
             "1..1024, got ", head_dim);
  if (rows == 0) return;
  TQKV_CHECK(states != nullptr && out != nullptr, "merge_partial_states: null pointer");
  gpu::launch_merge_states(device, states, count, rows, head_dim, out, stream);
}

}  // namespace tqkv
