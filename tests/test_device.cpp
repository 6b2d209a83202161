// The backend report: a build without CUDA says so clearly; a build with CUDA lists the GPUs it
// sees (none on a machine without one) and never crashes.
#include <gtest/gtest.h>

#include "tqkv/device.hpp"
#include "tqkv/error.hpp"

TEST(Device, ReportsTheBackendThatWasBuilt) {
  if (!tqkv::cuda_backend_built()) {
    try {
      tqkv::list_gpus();
      FAIL() << "list_gpus() must throw without a CUDA backend";
    } catch (const tqkv::Error& e) {
      EXPECT_NE(std::string(e.what()).find("no GPU backend built"), std::string::npos) << e.what();
    }
    return;
  }
  try {
    for (const auto& gpu : tqkv::list_gpus()) {
      EXPECT_FALSE(gpu.name.empty());
      EXPECT_GT(gpu.memory_bytes, 0u);
    }
  } catch (const tqkv::Error& e) {
    // A driver that cannot be reached is reported as an error message, never a crash.
    EXPECT_NE(std::string(e.what()).find("cuda"), std::string::npos) << e.what();
  }
}
