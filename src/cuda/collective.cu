// The NCCL collective of one process driving several GPUs (backend.hpp): one communicator per
// device, all made from one unique id inside a group. A build that found no NCCL says so.
#include <cstdlib>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "tqkv/error.hpp"

#if TQKV_WITH_NCCL
#include <nccl.h>
#endif

namespace tqkv::gpu {

#if TQKV_WITH_NCCL
namespace {

void check(ncclResult_t r, const char* what) {
  TQKV_CHECK(r == ncclSuccess, "NCCL: ", what, " failed: ", ncclGetErrorString(r));
}

// An NCCL group that is always closed, also when a call inside it throws (an open group would
// leave every later NCCL call of the thread queued and never launched).
class Group {
 public:
  Group() { check(ncclGroupStart(), "ncclGroupStart"); }
  ~Group() {
    if (!ended_) ncclGroupEnd();  // unwinding: the first error is the one reported
  }
  void end(const char* what) {
    ended_ = true;
    check(ncclGroupEnd(), what);
  }

 private:
  bool ended_ = false;
};

class NcclCollective final : public Collective {
 public:
  NcclCollective(const Device* devices, int world) {
    // No NVLink SHARP / multicast: its buffers are not needed for a small all-gather, and not
    // every system that has NVLink supports them.
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    ncclUniqueId id;
    check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    comms_.assign(size_t(world), nullptr);
    try {
      Group group;
      for (int r = 0; r < world; ++r) {
        DeviceGuard guard(devices[r]);
        check(ncclCommInitRank(&comms_[size_t(r)], world, id, r), "ncclCommInitRank");
      }
      group.end("creating the communicators (ncclGroupEnd)");
    } catch (...) {
      for (ncclComm_t c : comms_)
        if (c) ncclCommAbort(c);
      throw;
    }
  }
  ~NcclCollective() override {
    for (ncclComm_t c : comms_)
      if (c) ncclCommDestroy(c);
  }
  void all_gather(const float* const* send, float* const* recv, size_t count,
                  const CudaStream* streams) override {
    Group group;
    for (size_t r = 0; r < comms_.size(); ++r)
      check(ncclAllGather(send[r], recv[r], count, ncclFloat, comms_[r],
                          reinterpret_cast<cudaStream_t>(streams[r])),
            "ncclAllGather");
    group.end("all_gather (ncclGroupEnd)");
  }

 private:
  std::vector<ncclComm_t> comms_;
};

}  // namespace

std::unique_ptr<Collective> make_nccl_collective(const Device* devices, int world) {
  return std::make_unique<NcclCollective>(devices, world);
}
#else
std::unique_ptr<Collective> make_nccl_collective(const Device*, int) {
  throw Error("GPU shards need NCCL, which this tqkv was built without (it looks for libnccl "
              "beside the CUDA toolkit)");
}
#endif

}  // namespace tqkv::gpu
