// The real-model forward pass against onnxruntime: samples token sequences from the model
// itself (temperature 1, fixed seed, starting at token 1 <|im_start|>), or reads them, and
// prints the probability of token 2 (<|im_end|>) after each prefix, which is the exported
// graph's output `prob`. bench/onnx_check.py computes the same with onnxruntime.
//   tqkv_model_prob MODEL.onnx sample SEQUENCES TOKENS SEED > tokens.json
//   tqkv_model_prob MODEL.onnx prob tokens.json > ours.json
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tqkv/error.hpp"
#include "tqkv/llama.hpp"
#include "tqkv/onnx.hpp"


int main(int argc, char** argv) try {
  const std::string usage =
      "usage: tqkv_model_prob MODEL.onnx sample SEQUENCES TOKENS SEED | MODEL.onnx prob FILE.json";
  if (argc < 4) throw tqkv::Error(usage);
  const tqkv::onnx::Model m = tqkv::onnx::read(argv[1]);
  const tqkv::Llama model(m);
  const auto& c = model.config();
  const std::string mode = argv[2];
  nlohmann::json out = nlohmann::json::array();
  if (mode == "sample" && argc == 6) {
    const int sequences = std::stoi(argv[3]), tokens = std::stoi(argv[4]);
    std::mt19937_64 rng(std::stoull(argv[5]));
    for (int s = 0; s < sequences; ++s) out.push_back(model.sample(size_t(tokens), rng));
  } else if (mode == "prob" && argc == 4) {
    std::ifstream in(argv[3]);
    TQKV_CHECK(in, "cannot read ", argv[3]);
    const nlohmann::json seqs = nlohmann::json::parse(in);
    for (const auto& s : seqs) {
      const std::vector<int32_t> seq = s.get<std::vector<int32_t>>();
      tqkv::DenseKvStore kv(c.layers, c.kv_heads, c.head_dim);
      out.push_back(tqkv::probabilities(model.forward(seq, kv, true))[2]);  // the whole sequence, one call
    }
  } else {
    throw tqkv::Error(usage);
  }
  std::cout << out.dump() << "\n";
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "tqkv_model_prob: %s\n", e.what());
  return 1;
}
