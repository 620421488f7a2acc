// examples/engine/calibration.hpp and the calibrated codecs on a real model
// (kvref): keys appended before RoPE reach attention as the model's own
// rotation gives them, KVQuant through the engine stays close to full_cache,
// and every calibrated or mixed-precision spelling runs on kvref.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/attention_error.hpp"
#include "engine/calibration.hpp"
#include "engine/fidelity.hpp"
#include "engine/tokenizer.hpp"
#include "engine_test_util.hpp"

namespace {

// A kv_cache that hides `inner`'s wish for keys before RoPE: the model then
// appends rotated keys to it. The negative control of the KVQuant test.
class rotated_keys_anyway final : public engine::kv_cache {
public:
    explicit rotated_keys_anyway(std::unique_ptr<engine::kv_cache> inner) : inner_(std::move(inner)) {}
    void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) override {
        inner_->append(layer, keys, values, first_position);
    }
    void attend(std::size_t layer, const float* queries, float* out) override { inner_->attend(layer, queries, out); }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        inner_->attend_chunk(layer, queries, chunk, out);
    }
    std::size_t bytes() const override { return inner_->bytes(); }
    std::size_t rows() const override { return inner_->rows(); }
    void shrink_to_fit() override { inner_->shrink_to_fit(); }

private:
    std::unique_ptr<engine::kv_cache> inner_;
};

struct kvref_setup {
    engine::transformer model = engine::transformer::load(engine_test::kvref().model.string());
    std::vector<int> text = engine::tokenizer::bytes().encode(engine_test::read_bytes(engine_test::kvref().eval_text));
    engine::fidelity_setup setup;
    std::vector<std::vector<int>> windows;
    engine::calibration calibrated;

    kvref_setup() {
        setup.prompt = engine_test::scaled(256, 48);
        setup.scored = engine_test::scaled(64, 8);
        setup.chunk = 64;
        const std::size_t window = setup.prompt + setup.scored + 1;
        for (std::size_t w = 0; w < 2; ++w)
            windows.emplace_back(text.begin() + static_cast<std::ptrdiff_t>(w * window),
                                 text.begin() + static_cast<std::ptrdiff_t>((w + 1) * window));
        // As kvc-fidelity: calibration on the end of the text, far from the windows.
        const std::size_t length = engine_test::scaled(512, 128); // per sequence
        calibrated = engine::calibration_from(
            model,
            [this, length] {
                std::vector<std::vector<int>> sequences;
                for (std::size_t i = engine::calibration_sequences; i > 0; --i)
                    sequences.emplace_back(text.end() - static_cast<std::ptrdiff_t>(i * length),
                                           text.end() - static_cast<std::ptrdiff_t>((i - 1) * length));
                return sequences;
            },
            "the end of eval.txt");
    }
    engine::fidelity_report measure(const std::string& cache) {
        setup.tested = {cache, "none"};
        return engine::measure_fidelity(model, windows, setup, calibrated);
    }
};

double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
    double largest = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i)
        largest = std::max(largest, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    return largest;
}
double max_abs(const std::vector<float>& a) {
    double largest = 0.0;
    for (float x : a) largest = std::max(largest, std::abs(static_cast<double>(x)));
    return largest;
}

} // namespace

// The pre-RoPE path of the model: a cache that asks for keys before RoPE and
// rotates them itself (recording_cache with kvc's rope_rotate) feeds full:f32
// the same keys as the model's own rotation, up to float rounding. Both
// rotate in float from cos/sin computed in double (the model rounds cos/sin
// to float first), so layer 0's keys agree to a few float ulps of the key
// magnitude (|k| up to ~10 on kvref: bound 1e-5 relative), and the logits,
// after 4 layers of the same rounding, to 1e-4 relative to their range.
TEST(EngineCalibration, KeysBeforeRopeRotatedByKvcMatchTheModel) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const std::size_t tokens = engine_test::scaled(200, 40);
    const std::vector<int> text(run.text.begin(), run.text.begin() + static_cast<std::ptrdiff_t>(tokens));
    const engine::recorded_rows usual = engine::record_rows(run.model, text, tokens, 64, false);
    const engine::recorded_rows rotated = engine::record_rows(run.model, text, tokens, 64, true);
    EXPECT_TRUE(usual.keys_before_rope.empty());
    ASSERT_EQ(rotated.keys_before_rope.size(), run.model.shape().layers);
    ASSERT_EQ(rotated.keys[0].size(), usual.keys[0].size());
    EXPECT_LE(max_abs_difference(rotated.keys[0], usual.keys[0]), 1e-5 * max_abs(usual.keys[0]));
    EXPECT_EQ(rotated.values[0], usual.values[0]); // computed before any rotation
    // Keys before RoPE really are unrotated: position 0 is the identity, later positions are not.
    const std::size_t row = run.model.shape().kv_dim();
    EXPECT_TRUE(std::equal(usual.keys[0].begin(), usual.keys[0].begin() + static_cast<std::ptrdiff_t>(row),
                           rotated.keys_before_rope[0].begin()));
    EXPECT_GT(max_abs_difference(rotated.keys_before_rope[0], usual.keys[0]), 0.1 * max_abs(usual.keys[0]));

    // Logits of the whole sequence, usual path against pre-RoPE path.
    const engine::model_shape& shape = run.model.shape();
    std::vector<float> expected(tokens * shape.vocab), got(tokens * shape.vocab);
    const kvc::cache_config config = engine::kv_cache_config(shape);
    const auto full = engine::make_cache(config, {"full:f32", "none"});
    run.model.prefill(text.data(), tokens, 0, *full, 64, expected.data());
    engine::recording_cache recorder(engine::make_cache(config, {"full:f32", "none"}), config, engine::model_rope());
    run.model.prefill(text.data(), tokens, 0, recorder, 64, got.data());
    const auto [low, high] = std::minmax_element(expected.begin(), expected.end());
    EXPECT_LE(max_abs_difference(got, expected), 1e-4 * (*high - *low));
}

// KVQuant through the engine: keys go in before RoPE and the codec rotates
// them at their positions. Its 4-bit version must be as close to full_cache
// as q4_0 (same order of KL; on kvref it is closer: measured 2.8e-3 vs 4.5e-3
// over 769-token windows), and far closer than the same codec fed rotated
// keys (rotated twice inside attention), which shows the test can fail.
TEST(EngineCalibration, KVQuantThroughTheEngineIsCloseToFullCache) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const engine::fidelity_report q4_0 = run.measure("q4_0");
    const engine::fidelity_report kvquant4 = run.measure("kvquant:4");
    const engine::fidelity_report kvquant3 = run.measure("kvquant:3");
    EXPECT_GT(kvquant4.kl_mean, 0.0);
    EXPECT_LT(kvquant4.kl_mean, 3.0 * q4_0.kl_mean);
    EXPECT_GT(kvquant4.top1_agreement, 0.9);
    EXPECT_LT(kvquant4.kl_mean, kvquant3.kl_mean); // more bits, less error
    EXPECT_LT(kvquant3.kl_mean, 0.1);

    // Negative control: the same codec given keys after RoPE.
    const kvc::cache_config config = engine::kv_cache_config(run.model.shape());
    std::vector<float> reference, wrong;
    engine::agreement compared(run.model.shape().vocab);
    const auto full = engine::make_cache(config, {"full:f32", "none"});
    rotated_keys_anyway twice(engine::make_cache(config, {"kvquant:4", "none"}, run.calibrated));
    reference = engine::decode_logits(run.model, *full, run.windows[0], run.setup.prompt, run.setup.scored, 64);
    wrong = engine::decode_logits(run.model, twice, run.windows[0], run.setup.prompt, run.setup.scored, 64);
    for (std::size_t i = 0; i < run.setup.scored; ++i)
        compared.add(&reference[i * run.model.shape().vocab], &wrong[i * run.model.shape().vocab], -1);
    EXPECT_GT(compared.mean_kl(), 10.0 * kvquant4.kl_mean);
}

// Every spelling added for calibration or importance scores runs on kvref,
// and each beats the uniform int2 codec (int2:g32, 3 bits/value) it is meant
// to improve on: CQ at 2 bits/channel (the coupled codes' claim), mixed
// precision with 20% of the tokens raised to int8 or int4. CQ at 1
// bit/channel is not that good on kvref (measured KL 0.35 over 769-token
// windows, top-1 79%): it must only be worse than at 2 bits/channel.
TEST(EngineCalibration, EveryCalibratedAndMixedSpellingRunsOnKvref) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const double int2 = run.measure("int2:g32").kl_mean;
    std::map<std::string, double> kl;
    for (const char* cache : {"cq:c4b8", "cq:c8b8", "kvquant:3", "kvquant:4", "mixed:int8/int2:0.2",
                              "mixed:int4/int2:0.2"}) {
        SCOPED_TRACE(cache);
        const engine::fidelity_report r = run.measure(cache);
        EXPECT_TRUE(std::isfinite(r.kl_mean));
        EXPECT_GT(r.kl_mean, 0.0);
        EXPECT_LT(r.kl_mean, 1.0);
        EXPECT_GT(r.top1_agreement, 0.5);
        EXPECT_EQ(r.tested.rows_kept, 1.0);
        const bool calibrated = std::string(cache).rfind("mixed", 0) != 0;
        EXPECT_EQ(r.setup.calibration, calibrated ? "the end of eval.txt" : "");
        kl[cache] = r.kl_mean;
    }
    EXPECT_LT(kl["cq:c4b8"], int2);
    EXPECT_LT(kl["cq:c4b8"], kl["cq:c8b8"]);
    EXPECT_LT(kl["mixed:int8/int2:0.2"], int2);
    EXPECT_LT(kl["mixed:int4/int2:0.2"], int2);
    // int8 against int4 differs only in the 20% high rows: a small difference
    // (kvref over 4 windows: 1.7e-3 vs 6.6e-3) that the sanitized build's 16
    // scored positions cannot resolve, so it is compared at full size only.
    if (!engine_test::slow_build) {
        EXPECT_LT(kl["mixed:int8/int2:0.2"], kl["mixed:int4/int2:0.2"]);
    }
}

// Calibration on generated text is deterministic: the same seed gives the same rows.
TEST(EngineCalibration, GeneratedCalibrationIsDeterministic) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    engine::transformer model = engine::transformer::load(engine_test::kvref().model.string());
    const std::size_t length = engine_test::scaled(128, 16);
    const engine::calibration a = engine::generated_calibration(model, '\n', engine::calibration_seed, length);
    const engine::calibration b = engine::generated_calibration(model, '\n', engine::calibration_seed, length);
    const engine::recorded_rows& first = a.rows();
    EXPECT_EQ(&a.rows(), &first); // recorded once
    EXPECT_EQ(first.keys, b.rows().keys);
    EXPECT_EQ(first.keys_before_rope, b.rows().keys_before_rope);
    EXPECT_EQ(first.values[0].size(), engine::calibration_sequences * length * model.shape().kv_dim());
    // Each sequence starts again at position 0, where RoPE is the identity.
    const std::size_t row = model.shape().kv_dim();
    for (std::size_t i = 0; i < engine::calibration_sequences; ++i) {
        const auto start = static_cast<std::ptrdiff_t>(i * length * row);
        EXPECT_TRUE(std::equal(first.keys[1].begin() + start, first.keys[1].begin() + start + static_cast<std::ptrdiff_t>(row),
                               first.keys_before_rope[1].begin() + start));
    }
    EXPECT_NE(first.keys[0], engine::generated_calibration(model, '\n', engine::calibration_seed + 1, length).rows().keys[0]);
}
