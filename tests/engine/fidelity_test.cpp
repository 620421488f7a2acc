// examples/engine/fidelity.hpp: the measurement kvc-fidelity reports. A cache
// compared with an identical one must show exactly zero KL and full top-1
// agreement; a lossy one a small positive KL; the KL itself is checked on
// distributions worked out by hand.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/fidelity.hpp"
#include "engine/tokenizer.hpp"
#include "engine_test_util.hpp"

namespace {

// One short window of kvref's eval text (prompt + scored + 1 bytes).
struct kvref_run {
    engine::transformer model = engine::transformer::load(engine_test::kvref().model.string());
    engine::fidelity_setup setup;
    std::vector<std::vector<int>> windows;

    kvref_run() {
        setup.prompt = engine_test::scaled(96, 24);
        setup.scored = engine_test::scaled(32, 8);
        setup.chunk = 32; // several chunks, the last one partial
        const std::string text = engine_test::read_bytes(engine_test::kvref().eval_text);
        windows.push_back(engine::tokenizer::bytes().encode(text.substr(0, setup.prompt + setup.scored + 1)));
    }
    engine::fidelity_report compare(const std::string& reference, const std::string& tested) {
        setup.reference = {reference, "none"};
        setup.tested = {tested, "none"};
        return engine::measure_fidelity(model, windows, setup);
    }
};

void expect_identical(const engine::fidelity_report& r) {
    EXPECT_EQ(r.kl_mean, 0.0);
    EXPECT_EQ(r.kl_p99, 0.0);
    EXPECT_EQ(r.kl_max, 0.0);
    EXPECT_EQ(r.top1_agreement, 1.0);
    EXPECT_EQ(r.tested.perplexity, r.reference.perplexity);
    EXPECT_EQ(r.perplexity_change_percent, 0.0);
    // The same rows; compressed_cache also keeps positions per KV head (heads
    // become ragged under eviction): a little more, most with stories260K's
    // 8-dim heads.
    EXPECT_EQ(r.tested.rows_kept, 1.0);
    EXPECT_EQ(r.reference.rows_kept, 1.0);
    EXPECT_GE(r.bytes_ratio, 1.0);
    EXPECT_LT(r.bytes_ratio, 1.25);
}

} // namespace

TEST(EngineFidelity, FullCacheAgainstItselfIsExactlyZero) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_run run;
    const engine::fidelity_report r = run.compare("full:f32", "full:f32");
    expect_identical(r);
    EXPECT_EQ(r.positions, run.setup.scored);
    EXPECT_GT(r.reference.perplexity, 1.0);
}

TEST(EngineFidelity, IdentityCompositionMatchesFullCacheExactly) {
    // compressed_cache<none, none, none<T>, none> is bit-identical to full_cache<T>.
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_run run;
    expect_identical(run.compare("full:f32", "none:f32"));
    expect_identical(run.compare("full:f16", "none:f16"));
    expect_identical(run.compare("full:bf16", "none:bf16"));
}

TEST(EngineFidelity, HalfPrecisionStorageCostsLittle) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_run run;
    const engine::fidelity_report f16 = run.compare("full:f32", "none:f16");
    EXPECT_GT(f16.kl_max, 0.0); // rounding keys and values to fp16 changes something...
    EXPECT_LT(f16.kl_mean, 1e-4); // ... but very little
    EXPECT_GE(f16.top1_agreement, 0.95);
    EXPECT_NEAR(f16.bytes_ratio, 0.5, 0.05); // fp16 rows are half of fp32, plus positions and bookkeeping
    EXPECT_LT(std::abs(f16.perplexity_change_percent), 1.0);
    const engine::fidelity_report bf16 = run.compare("full:f32", "full:bf16");
    EXPECT_GT(bf16.kl_mean, f16.kl_mean); // 8 mantissa bits lose more than 11
    EXPECT_LT(bf16.kl_mean, 1e-2);
}

TEST(EngineFidelity, Stories260kOnGeneratedText) {
    // The model's own text from a fixed seed, then scored: what kvc-fidelity does for stories260K.
    KVC_SKIP_WITHOUT(engine_test::stories260k());
    engine::transformer model = engine::transformer::load(engine_test::stories260k().model.string());
    engine::fidelity_setup setup;
    setup.prompt = engine_test::scaled(48, 16);
    setup.scored = engine_test::scaled(24, 8);
    setup.chunk = 16;
    const std::vector<int> text = engine::generate_text(model, engine::tokenizer::bos_token,
                                                        setup.prompt + setup.scored + 1, 1.0, 42);
    EXPECT_EQ(text, engine::generate_text(model, engine::tokenizer::bos_token, text.size(), 1.0, 42))
        << "same seed, same text";
    setup.tested = {"none:f32", "none"};
    expect_identical(engine::measure_fidelity(model, {text}, setup));
    setup.tested = {"none:bf16", "none"};
    const engine::fidelity_report bf16 = engine::measure_fidelity(model, {text}, setup);
    EXPECT_GT(bf16.kl_max, 0.0);
    EXPECT_LT(bf16.kl_mean, 1e-2);
}

TEST(EngineFidelity, AgreementByHand) {
    // Reference P = softmax(0, ln 3) = (1/4, 3/4); tested Q = (1/2, 1/2).
    // KL(P || Q) = 1/4 ln(1/2) + 3/4 ln(3/2).
    engine::agreement a(2);
    const float reference[2] = {0.0f, std::log(3.0f)};
    const float tested[2] = {5.0f, 5.0f}; // logits shift-invariant
    a.add(reference, tested, 1);
    const double expected = 0.25 * std::log(0.5) + 0.75 * std::log(1.5);
    EXPECT_NEAR(a.mean_kl(), expected, 1e-7);
    EXPECT_EQ(a.top1(), 0.0); // argmax 1 vs 0 (first on ties)
    EXPECT_NEAR(a.reference_perplexity(), 4.0 / 3.0, 1e-6);
    EXPECT_NEAR(a.tested_perplexity(), 2.0, 1e-6);
    // Identical logits: exactly zero, agreement.
    a.add(reference, reference, -1);
    EXPECT_NEAR(a.mean_kl(), expected / 2, 1e-7);
    EXPECT_EQ(a.top1(), 0.5);
    EXPECT_EQ(a.positions(), 2u);
    EXPECT_NEAR(a.reference_perplexity(), 4.0 / 3.0, 1e-6) << "a position without a target is not in the perplexity";
}

TEST(EngineFidelity, PercentileIsNearestRank) {
    engine::agreement a(2);
    const float same[2] = {0.0f, 0.0f};
    for (int i = 1; i <= 100; ++i) {
        const float shifted[2] = {0.0f, 0.01f * static_cast<float>(i)};
        a.add(same, shifted, -1);
    }
    // KL grows with the shift, so the 99th of 100 values is the one of shift 0.99.
    engine::agreement b(2);
    const float at99[2] = {0.0f, 0.01f * static_cast<float>(99)};
    b.add(same, at99, -1);
    EXPECT_DOUBLE_EQ(a.percentile_kl(99.0), b.mean_kl());
    EXPECT_DOUBLE_EQ(a.percentile_kl(100.0), a.max_kl());
}

TEST(EngineFidelity, ReportsAsJsonAndMarkdown) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_run run;
    run.setup.model = "models/kvref/model.bin";
    run.setup.text = "a \"quoted\" name";
    const engine::fidelity_report r = run.compare("full:f32", "none:f16");
    const std::string json = engine::to_json(r);
    for (const char* key : {"\"perplexity\":", "\"perplexity_change_percent\":", "\"kl_mean\":", "\"kl_p99\":",
                            "\"top1_agreement\":", "\"bytes_ratio\":", "\"attention_time_ratio\":", "\"method\": \"none\"",
                            "\"cache\": \"none:f16\"", "\"reference\": \"full:f32\"", "\"text\": \"a \\\"quoted\\\" name\""})
        EXPECT_NE(json.find(key), std::string::npos) << key << " in\n" << json;
    EXPECT_EQ(json.front(), '{');
    const std::string row = engine::markdown_row(r);
    const std::string header = engine::markdown_header();
    auto columns = [](const std::string& line) { return std::count(line.begin(), line.end(), '|'); };
    EXPECT_EQ(columns(row), columns(header.substr(0, header.find('\n'))));
    EXPECT_NE(row.find("`none:f16`"), std::string::npos);
}
