// The tqkv command-line tool, as a function so that tests can run it in-process.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace tqkv::cli {

/// Runs `tqkv args...` (args excludes the program name). Returns the exit status: 0 on success,
/// 1 on an error (message on `err`, naming the argument or file at fault), 2 on a usage error.
int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace tqkv::cli
