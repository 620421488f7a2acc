// examples/engine/tokenizer.hpp -- text to tokens and back, for the two kinds
// of models the engine runs.
//
// - Byte level (kvref): token = byte value, vocabulary 256, no special tokens.
// - Piece vocabulary (stories260K's tokenizer.bin, sentencepiece-like):
//   int32 max_token_length, then per token a float32 merge score, an int32
//   byte length and the bytes. Token 0 is <unk>, 1 BOS, 2 EOS, 3..258 the raw
//   bytes 0x00..0xFF (pieces spelled "<0xAB>"). Encoding starts from one piece
//   per UTF-8 character (or its bytes when the character is not a piece), then
//   repeatedly merges the adjacent pair whose concatenation is the
//   best-scoring piece. Like sentencepiece, a space is prepended to the text
//   (the "dummy prefix" the model was trained with) and dropped again by
//   decode, so decode(encode(text)) == text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <kvc/calibration/file_io.hpp>

namespace engine {

class tokenizer {
public:
    static constexpr int unknown_token = 0;
    static constexpr int bos_token = 1;
    static constexpr int eos_token = 2;
    static constexpr int first_byte_token = 3;

    // token = byte; a model with a 256-entry vocabulary and no tokenizer file.
    static tokenizer bytes() {
        tokenizer t;
        t.byte_level_ = true;
        return t;
    }

    // Reads a tokenizer.bin for a model of `vocab` tokens; throws on a file
    // that does not match (truncated, wrong vocabulary size, bad lengths).
    // The file is read whole, at most the size `vocab` tokens can take, so a
    // device or a huge file fails instead of filling memory.
    static tokenizer load(const std::string& path, std::size_t vocab) {
        const std::uint64_t most = 4 + static_cast<std::uint64_t>(vocab) * (4 + 4 + 1024);
        const std::vector<unsigned char> bytes = kvc::detail::read_file(path, most + 1, "tokenizer");
        return parse(bytes.data(), bytes.size(), vocab, path);
    }

    // The same from bytes in memory; `name` prefixes the error messages.
    static tokenizer parse(const unsigned char* data, std::size_t size, std::size_t vocab, const std::string& name) {
        auto fail = [&](const std::string& what) { throw std::runtime_error(name + ": " + what); };
        std::size_t offset = 0;
        auto read = [&](void* out, std::size_t bytes) {
            if (bytes > size - offset) return false;
            if (bytes) std::memcpy(out, data + offset, bytes);
            offset += bytes;
            return true;
        };
        auto read_int = [&](const char* what) {
            std::int32_t value = 0;
            if (!read(&value, sizeof value)) fail(std::string("truncated while reading ") + what);
            return value;
        };
        if (vocab < first_byte_token + 256)
            fail("a piece vocabulary needs at least 259 tokens (special + bytes), the model has " +
                 std::to_string(vocab));
        // Each token takes at least 8 bytes: a vocabulary larger than the
        // data allows is truncated before any allocation of its size.
        if (vocab > size / 8) fail("truncated: " + std::to_string(size) + " bytes cannot hold " + std::to_string(vocab) +
                                   " tokens (is it the model's tokenizer?)");
        tokenizer t;
        const std::int32_t max_length = read_int("max_token_length");
        if (max_length <= 0 || max_length > 1024) fail("max_token_length " + std::to_string(max_length) + " is not in 1..1024");
        t.pieces_.resize(vocab);
        t.scores_.resize(vocab);
        for (std::size_t i = 0; i < vocab; ++i) {
            if (!read(&t.scores_[i], sizeof(float)))
                fail("truncated at token " + std::to_string(i) + " of " + std::to_string(vocab) +
                     " (is it the model's tokenizer?)");
            const std::int32_t length = read_int("a piece length");
            if (length < 0 || length > max_length)
                fail("token " + std::to_string(i) + " has length " + std::to_string(length) + ", expected 0.." +
                     std::to_string(max_length));
            t.pieces_[i].resize(static_cast<std::size_t>(length));
            if (!read(&t.pieces_[i][0], static_cast<std::size_t>(length))) fail("truncated inside token " + std::to_string(i));
        }
        if (offset != size)
            fail("has more than the model's " + std::to_string(vocab) + " tokens (is it the model's tokenizer?)");
        // Only ordinary pieces take part in merges: the byte tokens' "<0xAB>"
        // spellings and the special tokens are not text.
        for (std::size_t i = first_byte_token + 256; i < vocab; ++i)
            t.lookup_.emplace(t.pieces_[i], static_cast<int>(i));
        return t;
    }

    bool byte_level() const noexcept { return byte_level_; }
    // The token that starts a sequence, or -1 when the vocabulary has none (byte level).
    int bos() const noexcept { return byte_level_ ? -1 : bos_token; }
    int eos() const noexcept { return byte_level_ ? -1 : eos_token; }

    // Text -> tokens, with BOS first when the vocabulary has one and `add_bos`.
    std::vector<int> encode(const std::string& text, bool add_bos = true) const {
        std::vector<int> tokens;
        if (byte_level_) {
            for (unsigned char c : text) tokens.push_back(c);
            return tokens;
        }
        if (add_bos) tokens.push_back(bos_token);
        if (text.empty()) return tokens;

        // One piece per UTF-8 character, or its bytes when it is not a piece.
        std::vector<int> pieces;
        const std::string prefixed = " " + text;
        for (std::size_t i = 0; i < prefixed.size();) {
            std::size_t length = 1;
            while (i + length < prefixed.size() && length < 4 &&
                   (static_cast<unsigned char>(prefixed[i + length]) & 0xC0) == 0x80)
                ++length; // continuation bytes of the same character
            const auto found = lookup_.find(prefixed.substr(i, length));
            if (found != lookup_.end())
                pieces.push_back(found->second);
            else
                for (std::size_t b = 0; b < length; ++b)
                    pieces.push_back(first_byte_token + static_cast<unsigned char>(prefixed[i + b]));
            i += length;
        }

        // Merge the best-scoring adjacent pair until no pair forms a piece.
        // Quadratic, and fine: prompts are short and this runs once.
        for (;;) {
            float best_score = 0.0f;
            int best_token = -1;
            std::size_t best_at = 0;
            for (std::size_t i = 0; i + 1 < pieces.size(); ++i) {
                const auto found = lookup_.find(text_of(pieces[i]) + text_of(pieces[i + 1]));
                if (found == lookup_.end()) continue;
                const float score = scores_[static_cast<std::size_t>(found->second)];
                if (best_token < 0 || score > best_score) {
                    best_score = score;
                    best_token = found->second;
                    best_at = i;
                }
            }
            if (best_token < 0) break;
            pieces[best_at] = best_token;
            pieces.erase(pieces.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
        }
        tokens.insert(tokens.end(), pieces.begin(), pieces.end());
        return tokens;
    }

    // The text of `token` when it follows `previous` (-1 at the start): the
    // dummy-prefix space after BOS or at the start is dropped; special tokens have no text.
    std::string piece(int token, int previous = -1) const {
        if (byte_level_) return std::string(1, static_cast<char>(static_cast<unsigned char>(token)));
        if (token < first_byte_token) return {};
        std::string text = text_of(token);
        if ((previous == -1 || previous == bos_token) && !text.empty() && text[0] == ' ') text.erase(0, 1);
        return text;
    }

    std::string decode(const std::vector<int>& tokens) const {
        std::string text;
        int previous = -1;
        for (int token : tokens) {
            text += piece(token, previous);
            previous = token;
        }
        return text;
    }

private:
    // The bytes a token stands for (byte tokens are one raw byte).
    std::string text_of(int token) const {
        if (token >= first_byte_token && token < first_byte_token + 256)
            return std::string(1, static_cast<char>(token - first_byte_token));
        return pieces_[static_cast<std::size_t>(token)];
    }

    bool byte_level_ = false;
    std::vector<std::string> pieces_;
    std::vector<float> scores_;
    std::unordered_map<std::string, int> lookup_;
};

} // namespace engine
