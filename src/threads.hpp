// How many CPU threads tqkv may use by default (the rest of the thread API is in tqkv/codec.hpp).
#pragma once

#include <string>

namespace tqkv::detail {

/// The CPU quota of the cgroup whose files are in `dir` (v2: `cpu.max`, "max" or
/// "<quota> <period>"; v1: `cpu.cfs_quota_us` and `cpu.cfs_period_us`), rounded up to whole
/// CPUs; 0 where there is no quota or the files cannot be read.
int cgroup_quota_cpus(const std::string& dir);

}  // namespace tqkv::detail
