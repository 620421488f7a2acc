// The engine's forward pass (examples/engine/model.hpp) against an independent
// double-precision oracle, on both paths an engine uses (chunked prefill
// through attend_chunk, decode through attend), and checkpoint validation.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/model.hpp"
#include "engine/tokenizer.hpp"
#include "engine_test_util.hpp"

namespace {

constexpr double tolerance = 1e-4; // max |logit difference|, fp32 engine vs double oracle

// Runs `tokens` through the engine with a full:f32 cache on the decode path
// (one token at a time) or as chunked prefill, and through the oracle; returns
// the largest absolute logit difference over every position.
// (The cache is built directly rather than through make_cache, which would
// compile every registered configuration into this test for nothing.)
std::unique_ptr<engine::kv_cache> full_f32_cache(const engine::model_shape& shape) {
    return std::make_unique<engine::kvc_cache<kvc::full_cache>>(engine::kv_cache_config(shape, kvc::dtype::f32));
}

double max_logit_error(const std::filesystem::path& model_path, const std::vector<int>& tokens, std::size_t chunk) {
    engine::transformer model = engine::transformer::load(model_path.string());
    const std::size_t vocab = model.shape().vocab;
    const auto cache = full_f32_cache(model.shape());
    std::vector<float> logits(tokens.size() * vocab);
    if (chunk == 0) {
        for (std::size_t t = 0; t < tokens.size(); ++t) {
            const float* row = model.decode(tokens[t], static_cast<std::int64_t>(t), *cache);
            std::copy(row, row + vocab, logits.begin() + static_cast<std::ptrdiff_t>(t * vocab));
        }
    } else {
        model.prefill(tokens.data(), tokens.size(), 0, *cache, chunk, logits.data());
    }
    engine_test::reference_model oracle(model_path);
    double worst = 0.0;
    for (std::size_t t = 0; t < tokens.size(); ++t) {
        const std::vector<double> expected = oracle.step(tokens[t]);
        for (std::size_t i = 0; i < vocab; ++i)
            worst = std::max(worst, std::abs(static_cast<double>(logits[t * vocab + i]) - expected[i]));
    }
    return worst;
}

std::vector<int> kvref_tokens(std::size_t count) {
    const std::string text = engine_test::read_bytes(engine_test::kvref().eval_text).substr(0, count);
    return engine::tokenizer::bytes().encode(text);
}

std::vector<int> stories_tokens(std::size_t count) {
    const auto files = engine_test::stories260k();
    const auto words = engine::tokenizer::load(files.tokenizer.string(), 512);
    std::vector<int> tokens =
        words.encode("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
                     "with her big red ball and her dog.");
    tokens.resize(std::min(tokens.size(), count));
    return tokens;
}

} // namespace

TEST(EngineForward, KvrefDecodeMatchesOracle) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    const double error = max_logit_error(engine_test::kvref().model, kvref_tokens(engine_test::scaled(40, 12)), 0);
    RecordProperty("max_abs_logit_error", std::to_string(error));
    EXPECT_LT(error, tolerance);
}

TEST(EngineForward, KvrefChunkedPrefillMatchesOracle) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    // Chunks of 16 over 40 tokens: two full chunks and a partial one.
    const double error = max_logit_error(engine_test::kvref().model, kvref_tokens(engine_test::scaled(40, 12)), 16);
    RecordProperty("max_abs_logit_error", std::to_string(error));
    EXPECT_LT(error, tolerance);
}

TEST(EngineForward, Stories260kDecodeMatchesOracle) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const std::vector<int> tokens = stories_tokens(20);
    ASSERT_EQ(tokens.size(), 20u);
    const double error = max_logit_error(engine_test::stories260k().model, tokens, 0);
    RecordProperty("max_abs_logit_error", std::to_string(error));
    EXPECT_LT(error, tolerance);
}

TEST(EngineForward, Stories260kChunkedPrefillMatchesOracle) {
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    const double error = max_logit_error(engine_test::stories260k().model, stories_tokens(20), 7);
    EXPECT_LT(error, tolerance);
}

TEST(EngineForward, SyntheticModelMatchesOracleOnBothPaths) {
    // Head dim 4 and a GQA group of 2, from random weights: needs no model files.
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {});
    std::vector<int> tokens;
    for (int t = 0; t < 30; ++t) tokens.push_back((t * 17 + 3) % 48);
    EXPECT_LT(max_logit_error(path, tokens, 0), tolerance);
    EXPECT_LT(max_logit_error(path, tokens, 8), tolerance);
    std::filesystem::remove(path);
}

TEST(EngineForward, RejectsTokensAndPositionsOutsideTheModel) {
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {});
    engine::transformer model = engine::transformer::load(path.string());
    const auto cache = full_f32_cache(model.shape());
    EXPECT_THROW(model.decode(48, 0, *cache), std::runtime_error);  // vocab is 48
    EXPECT_THROW(model.decode(-1, 0, *cache), std::runtime_error);
    EXPECT_THROW(model.decode(1, 64, *cache), std::runtime_error);  // context is 64
    std::filesystem::remove(path);
}

// ---------------------------------------------------------------------------
// Checkpoint validation: a file that does not match its header is an error
// that names the problem.
// ---------------------------------------------------------------------------

namespace {
std::string load_error(const std::filesystem::path& path) {
    try {
        engine::transformer::load(path.string());
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "(no error)";
}
} // namespace

TEST(EngineCheckpoint, LoadsAValidFileWithItsShape) {
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {});
    const engine::transformer model = engine::transformer::load(path.string());
    EXPECT_EQ(model.shape().dim, 16u);
    EXPECT_EQ(model.shape().head_dim(), 4u);
    EXPECT_EQ(model.shape().kv_dim(), 8u);
    EXPECT_EQ(model.shape().vocab, 48u);
    std::filesystem::remove(path);
}

TEST(EngineCheckpoint, TruncatedFileIsAnError) {
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {}, 7, 4);
    EXPECT_NE(load_error(path).find("truncated"), std::string::npos) << load_error(path);
    const long all_but_ten = static_cast<long>(28 + 4 * engine_test::checkpoint_floats({})) - 10;
    engine_test::write_checkpoint(path, {}, 7, all_but_ten); // shorter than the header
    EXPECT_NE(load_error(path).find("too short"), std::string::npos) << load_error(path);
    std::filesystem::remove(path);
}

TEST(EngineCheckpoint, TrailingDataIsAnError) {
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::write_checkpoint(path, {}, 7, -8);
    EXPECT_NE(load_error(path).find("trailing"), std::string::npos) << load_error(path);
    std::filesystem::remove(path);
}

TEST(EngineCheckpoint, InconsistentHeadersAreErrors) {
    const auto path = engine_test::scratch_file("model.bin");
    engine_test::synthetic_shape shape;
    shape.heads = 3; // 16 is not a multiple of 3
    engine_test::write_checkpoint(path, shape);
    EXPECT_NE(load_error(path).find("not a multiple of n_heads"), std::string::npos) << load_error(path);
    shape = {};
    shape.kv_heads = 3; // 4 query heads cannot share 3 KV heads
    engine_test::write_checkpoint(path, shape);
    EXPECT_NE(load_error(path).find("n_kv_heads"), std::string::npos) << load_error(path);
    shape = {};
    shape.layers = 0;
    engine_test::write_checkpoint(path, shape);
    EXPECT_NE(load_error(path).find("n_layers"), std::string::npos) << load_error(path);
    std::filesystem::remove(path);
    EXPECT_NE(load_error(path).find("cannot open"), std::string::npos) << load_error(path);
}
