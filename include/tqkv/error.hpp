// Errors. Two kinds, kept apart as in faiss:
//  - TQKV_CHECK: a caller's mistake (bad shape, bad file, bad option). Throws tqkv::Error with a
//    message that names the offending argument or file; nothing has been modified when it throws.
//  - TQKV_ASSERT: a broken internal invariant (a bug in tqkv). Throws tqkv::InternalError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tqkv {

/// A caller's error: invalid argument, malformed input file, unsupported configuration.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bug inside tqkv: an invariant that should hold whatever the caller passed.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace tqkv

/// Throws tqkv::Error built from the streamed parts when `cond` is false.
#define TQKV_CHECK(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) throw ::tqkv::Error(::tqkv::detail::concat(__VA_ARGS__)); \
  } while (0)

/// Throws tqkv::InternalError naming the failed condition and its location.
#define TQKV_ASSERT(cond)                                                                   \
  do {                                                                                      \
    if (!(cond))                                                                            \
      throw ::tqkv::InternalError(::tqkv::detail::concat(__FILE__, ":", __LINE__,           \
                                                         ": internal error: ", #cond));     \
  } while (0)
