// examples/engine/tokenizer.hpp: byte level (kvref) and stories260K's piece
// vocabulary; text survives encode -> decode, and bad files are errors.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/tokenizer.hpp"
#include "engine_test_util.hpp"

namespace {

const std::vector<std::string> samples = {
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces, two trailing  ",
    "One day, Tom said: \"Let's go!\"\nThe end.",
    "unicode: caf\xc3\xa9 \xe2\x98\x83 \xe2\x80\x94 fine",             // characters that may not be pieces: byte fallback
    std::string("control \x01\x7f and tab\t", 20) + std::string(1, '\0'), // bytes, including NUL
    "x",
    "",
};

engine::tokenizer stories_tokenizer() {
    return engine::tokenizer::load(engine_test::stories260k().tokenizer.string(), 512);
}

} // namespace

TEST(EngineTokenizer, ByteLevelIsTheIdentity) {
    const engine::tokenizer bytes = engine::tokenizer::bytes();
    EXPECT_TRUE(bytes.byte_level());
    EXPECT_EQ(bytes.bos(), -1);
    const std::string text = "def f(x):\n    return x\xff";
    const std::vector<int> tokens = bytes.encode(text);
    ASSERT_EQ(tokens.size(), text.size());
    for (std::size_t i = 0; i < text.size(); ++i) EXPECT_EQ(tokens[i], static_cast<unsigned char>(text[i]));
    for (const std::string& sample : samples) EXPECT_EQ(bytes.decode(bytes.encode(sample)), sample);
}

TEST(EngineTokenizer, Stories260kRoundTrips) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const engine::tokenizer words = stories_tokenizer();
    for (const std::string& sample : samples) {
        const std::vector<int> tokens = words.encode(sample);
        ASSERT_FALSE(tokens.empty());
        EXPECT_EQ(tokens[0], engine::tokenizer::bos_token);
        for (int token : tokens) {
            EXPECT_GE(token, 0);
            EXPECT_LT(token, 512);
        }
        EXPECT_EQ(words.decode(tokens), sample);
        EXPECT_EQ(words.decode(words.encode(sample, false)), sample) << "without BOS";
    }
}

TEST(EngineTokenizer, Stories260kMergesIntoWords) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const engine::tokenizer words = stories_tokenizer();
    const std::string text = "Once upon a time, the little girl and the dog went to the park.";
    const std::vector<int> tokens = words.encode(text);
    // Merging makes far fewer tokens than characters, and common words are
    // single pieces with the space in front, as the vocabulary spells them.
    EXPECT_LT(tokens.size(), text.size() / 2);
    int the_pieces = 0;
    for (int token : tokens) the_pieces += words.piece(token, 0) == " the";
    EXPECT_EQ(the_pieces, 3);
    // Streaming decode (piece by piece, as the engine prints) equals decode().
    std::string streamed;
    for (std::size_t i = 1; i < tokens.size(); ++i) streamed += words.piece(tokens[i], tokens[i - 1]);
    EXPECT_EQ(streamed, text);
    // Special tokens have no text.
    EXPECT_EQ(words.piece(engine::tokenizer::bos_token), "");
    EXPECT_EQ(words.piece(engine::tokenizer::eos_token), "");
}

TEST(EngineTokenizer, BadFilesAreErrors) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const std::string good = engine_test::read_bytes(engine_test::stories260k().tokenizer);
    const auto path = engine_test::scratch_file("tokenizer.bin");
    auto error_for = [&](const std::string& bytes, std::size_t vocab) -> std::string {
        std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        try {
            engine::tokenizer::load(path.string(), vocab);
        } catch (const std::runtime_error& e) {
            return e.what();
        }
        return "(no error)";
    };
    EXPECT_NE(error_for(good.substr(0, good.size() - 3), 512).find("truncated"), std::string::npos);
    EXPECT_NE(error_for(good, 300).find("more than"), std::string::npos);   // the model's vocabulary is smaller
    EXPECT_NE(error_for(good, 600).find("truncated"), std::string::npos);   // ... or larger
    EXPECT_NE(error_for(good, 100).find("at least 259"), std::string::npos);
    std::filesystem::remove(path);
    EXPECT_NE(error_for("", 512).find("truncated"), std::string::npos);
    std::filesystem::remove(path);
    EXPECT_THROW(engine::tokenizer::load("/nonexistent/tokenizer.bin", 512), std::runtime_error);
}
