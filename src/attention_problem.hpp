// The shape of one attention call on a cache, validated once for every backend (CPU engine in
// src/attention.cpp, GPU front end in src/attention_gpu.cpp).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "tqkv/attention.hpp"

namespace tqkv::detail {

struct AttentionProblem {
  int q_heads = 0, kv_heads = 0, group = 0, dim = 0;  // group = R = H_q / H_kv
  float scale = 0;
  size_t window = 0;
  struct Seq {
    size_t tokens = 0;   // T
    size_t queries = 0;  // L
    size_t first_query_row = 0;  // index of its first query token in q / out
  };
  std::vector<Seq> seqs;
};

/// Checks layer, sequences, their lengths against the query counts and that the layer holds
/// tokens; fills in the shape. Throws tqkv::Error.
AttentionProblem make_problem(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                              std::span<const size_t> query_tokens, int q_heads,
                              const AttentionOptions& options);
/// q_heads a positive multiple of kv_heads, a positive finite scale.
void check_shape(const AttentionProblem& p);
size_t total_rows(const AttentionProblem& p);

/// attend_partial's batch as runs of consecutive sequences that the cache holds tokens of (held)
/// or not; checks the layer, the sequences, the query heads and that no window is asked for.
struct SequenceRun {
  size_t first = 0, count = 0;
  bool held = false;
};
std::vector<SequenceRun> sequence_runs(const KVCache& cache, int layer,
                                       std::span<const SequenceId> seqs, int q_heads,
                                       const AttentionOptions& options);

}  // namespace tqkv::detail
