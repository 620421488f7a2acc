// libFuzzer target: the example engine's tokenizer.bin parser.
//
// Input: two bytes choosing the model's vocabulary (259..1282), then the
// file. Properties: parse() throws std::runtime_error or returns a tokenizer;
// an accepted tokenizer encodes a fixed text and decodes every token id of its
// vocabulary without a sanitizer report, and encoding yields ids < vocab.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 2) return 0;
    const std::size_t vocab = 259 + ((std::size_t{data[0]} << 8 | data[1]) % 1024);
    engine::tokenizer words = engine::tokenizer::bytes();
    try {
        words = engine::tokenizer::parse(data + 2, size - 2, vocab, "fuzz");
    } catch (const std::runtime_error&) {
        return 0;
    }
    const std::vector<int> tokens = words.encode("Once upon a time, \xc3\xa9t\xc3\xa9 \xf0\x9f\x99\x82 the end.");
    for (int token : tokens)
        if (token < 0 || static_cast<std::size_t>(token) >= vocab) __builtin_trap();
    std::string text;
    for (std::size_t id = 0; id < vocab; ++id) text += words.piece(static_cast<int>(id));
    return text.size() == 0x7fffffff; // keeps the loop from being optimized away
}
