// The example tools' file and command-line input (issue 19 items 10 and 17):
// every bad path or count is an error naming the argument, never a crash,
// an unbounded read or a silent success.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstddef>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>

#include "engine/cli.hpp"
#include "engine/model.hpp"
#include "engine/tokenizer.hpp"

namespace {

std::string error_of(void (*action)()) {
    try {
        action();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "(no error)";
}

bool contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

// --prompt-file / --text: a directory said "prompt is empty"; /dev/zero
// ended in std::bad_alloc after filling memory.
TEST(EngineFileInput, DirectoryAndEndlessFilesNameTheFlag) {
    const std::string directory = ::testing::TempDir();
    static std::string path;
    path = directory;
    std::string message = error_of([] { engine::read_file(path, "--prompt-file"); });
    EXPECT_TRUE(contains(message, "--prompt-file: '" + directory + "' is a directory")) << message;
    if (::access("/dev/zero", R_OK) == 0) {
        message = error_of([] { engine::read_file("/dev/zero", "--prompt-file"); });
        EXPECT_TRUE(contains(message, "--prompt-file: '/dev/zero' holds more than the 67108864 bytes")) << message;
    }
}

// --model DIR reported "dim = 0" (the unchecked header read left zeros).
TEST(EngineFileInput, ModelThatIsNotAFileIsNamed) {
    static std::string path;
    path = ::testing::TempDir();
    std::string message = error_of([] { engine::transformer::load(path); });
    EXPECT_TRUE(contains(message, "is a directory")) << message;
    if (::access("/dev/zero", R_OK) == 0) {
        message = error_of([] { engine::transformer::load("/dev/zero"); });
        EXPECT_TRUE(contains(message, "not a regular file")) << message;
    }
}

// --tokenizer DIR said "truncated while reading max_token_length".
TEST(EngineFileInput, TokenizerThatIsNotAFileIsNamed) {
    static std::string path;
    path = ::testing::TempDir();
    std::string message = error_of([] { engine::tokenizer::load(path, 512); });
    EXPECT_TRUE(contains(message, "is a directory")) << message;
    if (::access("/dev/zero", R_OK) == 0) {
        // 512 tokens take at most 4 + 512 x 1032 bytes: more is not this model's tokenizer.
        message = error_of([] { engine::tokenizer::load("/dev/zero", 512); });
        EXPECT_TRUE(contains(message, "holds more than the 528389 bytes")) << message;
    }
}

// --json /dev/full exited 0: the stream was checked before its flush.
TEST(EngineFileOutput, FullDeviceIsAnError) {
    if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no writable /dev/full";
    const std::string message = error_of([] { engine::write_file("/dev/full", "{\"report\": 1}\n", "--json"); });
    EXPECT_TRUE(contains(message, "--json: writing 14 bytes to '/dev/full' failed")) << message;
}

// --prompt 2^64-1 --tokens 1 wrapped "prompt + tokens > context" to 0 and
// read past a buffer; the checks compare without forming the sum.
TEST(EngineArguments, CountsThatWrapAroundAreOutsideTheContext) {
    constexpr std::size_t huge = std::numeric_limits<std::size_t>::max();
    EXPECT_TRUE(engine::sum_within(100, 28, 128));
    EXPECT_FALSE(engine::sum_within(100, 29, 128));
    EXPECT_FALSE(engine::sum_within(huge, 1, 128));
    EXPECT_FALSE(engine::sum_within(1, huge, 128));
    EXPECT_FALSE(engine::sum_within(huge, huge, huge - 1));
    EXPECT_TRUE(engine::sum_within(huge, 0, huge));
}

} // namespace
