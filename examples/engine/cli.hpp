// examples/engine/cli.hpp -- command-line plumbing shared by kvc_engine and
// kvc-fidelity: strict number parsing with messages that name the flag, file
// reading, and finding the tokenizer that goes with a model.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include <kvc/calibration/file_io.hpp>

#include "tokenizer.hpp"

namespace engine {

// Bad command-line input: the tools print it with a pointer to --help.
struct usage_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Walks argv: flag() returns the next flag, value() the argument after it.
class arguments {
public:
    arguments(int argc, char** argv) : argc_(argc), argv_(argv) {}

    bool done() const noexcept { return next_ >= argc_; }
    std::string flag() {
        std::string text = argv_[next_++];
        if (text.rfind("--", 0) != 0) throw usage_error("unexpected argument '" + text + "' (options start with --)");
        return text;
    }
    // The argument after `flag`. One that looks like an option means the
    // value was forgotten ("--model --quiet"), unless it may be free text.
    std::string value(const std::string& flag, bool free_text = false) {
        if (done()) throw usage_error(flag + " needs a value");
        const std::string text = argv_[next_];
        if (!free_text && text.rfind("--", 0) == 0)
            throw usage_error(flag + " needs a value, got the option " + text);
        ++next_;
        return text;
    }
    // An integer in [low, high].
    std::size_t count(const std::string& flag, std::size_t low, std::size_t high = std::numeric_limits<std::size_t>::max()) {
        const std::string text = value(flag);
        char* end = nullptr;
        errno = 0;
        const unsigned long long parsed = std::strtoull(text.c_str(), &end, 10);
        if (text.empty() || text[0] == '-' || *end != '\0' || errno == ERANGE || parsed < low || parsed > high)
            throw usage_error(flag + " expects " +
                              (high == std::numeric_limits<std::size_t>::max()
                                   ? "an integer >= " + std::to_string(low)
                                   : "an integer in " + std::to_string(low) + ".." + std::to_string(high)) +
                              ", got '" + text + "'");
        return static_cast<std::size_t>(parsed);
    }
    // A finite number in [low, high].
    double real(const std::string& flag, double low, double high) {
        const std::string text = value(flag);
        char* end = nullptr;
        errno = 0;
        const double parsed = std::strtod(text.c_str(), &end);
        if (text.empty() || *end != '\0' || errno == ERANGE || !(parsed >= low && parsed <= high)) {
            std::ostringstream message;
            message << flag << " expects a number in " << low << ".." << high << ", got '" << text << "'";
            throw usage_error(message.str());
        }
        return parsed;
    }

private:
    int argc_;
    char** argv_;
    int next_ = 1;
};

// The most a text or prompt file may hold: they are kilobytes to megabytes,
// and the tokens they become take four times as much memory again.
inline constexpr std::uint64_t max_text_bytes = std::uint64_t{64} << 20;

// The content of the file given to `flag` (e.g. "--prompt-file"); a
// directory, an unreadable path, or more than max_text_bytes (/dev/zero) is
// an error naming the flag.
inline std::string read_file(const std::string& path, const char* flag) {
    return kvc::detail::read_text_file(path, max_text_bytes, flag);
}

// Writes the file given to `flag`; a write that did not reach the disk
// (full, /dev/full) is an error naming the flag.
inline void write_file(const std::string& path, const std::string& text, const char* flag) {
    kvc::detail::write_text_file(path, text, flag);
}

// a + b <= limit, without computing a + b (two counts from the command line
// can wrap around past a check written as a sum).
constexpr bool sum_within(std::size_t a, std::size_t b, std::size_t limit) noexcept {
    return a <= limit && b <= limit - a;
}

// The tokenizer of a model: `explicit_path` when given; else tokenizer.bin
// next to the model; else byte level, which only a 256-token vocabulary allows.
inline tokenizer tokenizer_for(const std::string& model_path, const std::string& explicit_path, std::size_t vocab) {
    if (!explicit_path.empty()) return tokenizer::load(explicit_path, vocab);
    const std::filesystem::path beside = std::filesystem::path(model_path).parent_path() / "tokenizer.bin";
    if (std::filesystem::exists(beside)) return tokenizer::load(beside.string(), vocab);
    if (vocab == 256) return tokenizer::bytes();
    throw std::runtime_error(model_path + ": the model has a vocabulary of " + std::to_string(vocab) +
                             " tokens but there is no tokenizer.bin next to it; pass --tokenizer FILE");
}

} // namespace engine
