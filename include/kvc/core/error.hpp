// kvc/core/error.hpp -- the one exception type kvc throws at its API boundaries.
//
// Every check that can fail on user input throws kvc::error with a message of
// the form "<where>: expected <what>, got <what>", so an engine author can
// read what went wrong without a debugger. Kernels never throw; they assume
// inputs were checked here.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvc {

class error : public std::runtime_error {
public:
    explicit error(const std::string& what) : std::runtime_error(what) {}
    explicit error(const char* what) : std::runtime_error(what) {}
};

namespace detail {

// Builds the message from any streamable pieces: fail("kv_view: dim ", d, " ...").
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
    std::ostringstream message;
    (message << ... << std::forward<Parts>(parts));
    throw error(message.str());
}

// require(cond, parts...) throws kvc::error built from parts when cond is false.
template <class... Parts>
void require(bool condition, Parts&&... parts) {
    if (!condition) fail(std::forward<Parts>(parts)...);
}

} // namespace detail
} // namespace kvc
