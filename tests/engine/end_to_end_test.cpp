// A short run of the engine as kvc_engine drives it -- prompt prefilled in
// chunks, then token-by-token decode -- on both real models, with a
// compressed cache and the baseline.
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/cache_choice.hpp"
#include "engine/fidelity.hpp"
#include "engine/model.hpp"
#include "engine/sampling.hpp"
#include "engine/tokenizer.hpp"
#include "engine_test_util.hpp"

namespace {

struct generation {
    std::vector<int> tokens; // prompt and continuation
    std::size_t cache_rows = 0, cache_bytes = 0;
};

// Prefill `prompt` in chunks of `chunk`, then generate `steps` tokens greedily.
generation generate(engine::transformer& model, const engine::cache_spec& spec, std::vector<int> prompt,
                    std::size_t chunk, std::size_t steps) {
    const auto cache = engine::make_cache(engine::kv_cache_config(model.shape()), spec);
    engine::sampler greedy(0.0, 0);
    const float* logits = model.prefill(prompt.data(), prompt.size(), 0, *cache, chunk);
    generation out{std::move(prompt), 0, 0};
    for (std::size_t step = 0; step < steps; ++step) {
        const int next = greedy.next(logits, model.shape().vocab);
        out.tokens.push_back(next);
        logits = model.decode(next, static_cast<std::int64_t>(out.tokens.size() - 1), *cache);
    }
    cache->shrink_to_fit();
    out.cache_rows = cache->rows();
    out.cache_bytes = cache->bytes();
    return out;
}

} // namespace

TEST(EngineEndToEnd, Stories260kWritesAStory) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const auto files = engine_test::stories260k();
    engine::transformer model = engine::transformer::load(files.model.string());
    const engine::tokenizer words = engine::tokenizer::load(files.tokenizer.string(), model.shape().vocab);
    const std::vector<int> prompt = words.encode("Once upon a time, there was a little");
    const std::size_t steps = engine_test::scaled(40, 12);

    const generation compressed = generate(model, {"none:f16", "none"}, prompt, 3, steps);
    const generation baseline = generate(model, {"full:f16", "none"}, prompt, 3, steps);
    // The identity composition is the baseline, token for token.
    EXPECT_EQ(compressed.tokens, baseline.tokens);

    const std::string text = words.decode(compressed.tokens);
    EXPECT_EQ(text.rfind("Once upon a time, there was a little", 0), 0u) << text;
    std::size_t letters = 0;
    for (char c : text.substr(36)) letters += (c >= 'a' && c <= 'z');
    EXPECT_GT(letters, steps) << "a continuation of words: " << text;

    // Without eviction every (layer, KV head) holds every token.
    const std::size_t positions = prompt.size() + steps;
    EXPECT_EQ(compressed.cache_rows, model.shape().layers * model.shape().kv_heads * positions);
    EXPECT_EQ(baseline.cache_rows, compressed.cache_rows);
    EXPECT_GT(compressed.cache_bytes, compressed.cache_rows * 2 * 2 * model.shape().head_dim() - 1)
        << "at least a key and a value of head_dim fp16 numbers per row";
}

TEST(EngineEndToEnd, KvrefPredictsPythonSource) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    engine::transformer model = engine::transformer::load(engine_test::kvref().model.string());
    const std::string source = engine_test::read_bytes(engine_test::kvref().eval_text);
    const engine::tokenizer bytes = engine::tokenizer::bytes();

    // Teacher-forced: a prompt prefilled in chunks, then decode steps scored.
    const std::size_t prompt = engine_test::scaled(256, 48), scored = engine_test::scaled(64, 16);
    const std::vector<int> window = bytes.encode(source.substr(0, prompt + scored + 1));
    auto cache = engine::make_cache(engine::kv_cache_config(model.shape()), {"none:f16", "none"});
    const std::vector<float> logits =
        engine::decode_logits(model, *cache, window, prompt, scored, engine_test::scaled(64, 16));
    engine::agreement self(model.shape().vocab);
    for (std::size_t i = 0; i < scored; ++i)
        self.add(&logits[i * 256], &logits[i * 256], window[prompt + i + 1]);
    const double bits_per_byte = std::log2(self.reference_perplexity());
    RecordProperty("bits_per_byte", std::to_string(bits_per_byte));
    EXPECT_LT(bits_per_byte, 3.5) << "a working model needs far fewer than the 8 bits of a uniform guess";
    EXPECT_GT(bits_per_byte, 0.05);

    // Free generation after a prompt: printable text, same on the baseline.
    const std::vector<int> start = bytes.encode("import os\n\n\ndef main():\n    ");
    const std::size_t steps = engine_test::scaled(48, 12);
    const generation compressed = generate(model, {"none:f32", "none"}, start, 8, steps);
    const generation baseline = generate(model, {"full:f32", "none"}, start, 8, steps);
    EXPECT_EQ(compressed.tokens, baseline.tokens);
    for (std::size_t i = start.size(); i < compressed.tokens.size(); ++i) {
        const int c = compressed.tokens[i];
        EXPECT_TRUE(c == '\n' || (c >= 32 && c < 127)) << "byte " << c << " in " << bytes.decode(compressed.tokens);
    }
}

TEST(EngineEndToEnd, ChunkSizeDoesNotChangeTheResult) {
    // Chunked prefill is exact causal attention: chunk 1, 5 and all-at-once
    // give the same logits up to float summation order.
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {});
    engine::transformer model = engine::transformer::load(path.string());
    std::vector<int> tokens;
    for (int t = 0; t < 23; ++t) tokens.push_back((t * 5 + 1) % 48);
    std::vector<std::vector<float>> results;
    for (std::size_t chunk : {1u, 5u, 23u}) {
        const auto cache = engine::make_cache(engine::kv_cache_config(model.shape()), {"full:f32", "none"});
        std::vector<float> all(tokens.size() * 48);
        model.prefill(tokens.data(), tokens.size(), 0, *cache, chunk, all.data());
        results.push_back(all);
    }
    for (std::size_t i = 0; i < results[0].size(); ++i) {
        EXPECT_NEAR(results[1][i], results[0][i], 1e-4);
        EXPECT_NEAR(results[2][i], results[0][i], 1e-4);
    }
    std::filesystem::remove(path);
}
