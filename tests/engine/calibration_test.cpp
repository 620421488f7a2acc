// examples/engine/calibration.hpp and the calibrated policies on a real model
// (kvref): keys appended before RoPE reach attention as the model's own
// rotation gives them, KVQuant through the engine stays close to full_cache,
// every calibrated or mixed-precision spelling runs on kvref, Q-Filters (E10)
// learn each head's query direction and keep the keys along it, and head
// roles (B6) keep everything exactly in the heads attending farthest back.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
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

// The first `prompt` + 1 tokens of eval.txt: rows recorded with full_cache,
// then replayed through `cache` as the engine drives it (the prompt in
// chunks of 64 with attend_chunk, then one decode step, when eviction runs).
engine::recorded_rows replay_prompt(kvref_setup& run, engine::kv_cache& cache, std::size_t prompt) {
    const std::vector<int> text(run.text.begin(), run.text.begin() + static_cast<std::ptrdiff_t>(prompt + 1));
    engine::recorded_rows rows = engine::record_rows(run.model, text, prompt, 64);
    const kvc::cache_config shape = engine::kv_cache_config(run.model.shape());
    const std::size_t kv_row = shape.kv_heads * shape.head_dim, q_row = shape.query_heads * shape.head_dim;
    std::vector<float> out(64 * q_row);
    auto view_of = [&](const std::vector<float>& data, std::size_t first, std::size_t count) {
        return engine::kv_cache::view(data.data() + first * kv_row, count, shape.kv_heads, shape.head_dim);
    };
    for (std::size_t done = 0; done < prompt; done += 64) {
        const std::size_t n = std::min<std::size_t>(64, prompt - done);
        for (std::size_t layer = 0; layer < shape.layers; ++layer) {
            cache.append(layer, view_of(rows.keys[layer], done, n), view_of(rows.values[layer], done, n),
                         static_cast<std::int64_t>(done));
            cache.attend_chunk(layer, rows.queries[layer].data() + done * q_row, n, out.data());
        }
    }
    for (std::size_t layer = 0; layer < shape.layers; ++layer) {
        cache.append(layer, view_of(rows.keys[layer], prompt, 1), view_of(rows.values[layer], prompt, 1),
                     static_cast<std::int64_t>(prompt));
        cache.attend(layer, rows.queries[layer].data() + prompt * q_row, out.data());
    }
    return rows;
}

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

// Q-Filters (E10) through the engine. The filter of each KV head is the
// dominant direction of its group's queries over the calibration text: no
// unit vector has a larger mean squared projection of those queries (checked
// against power iteration in double, a lower bound of the largest
// eigenvalue), and the mean query projects onto it positively. On a prompt
// of kvref's own rows every head keeps exactly its budget: the sinks, the
// newest 16 tokens, the keys with the largest <filter, key> among the rest
// (scored here in double), and the decoded token.
TEST(EngineCalibration, QFiltersLearnTheQueryDirectionAndKeepTheKeysAlongIt) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const kvc::cache_config shape = engine::kv_cache_config(run.model.shape());
    const std::size_t dim = shape.head_dim, group = shape.group();
    const auto cache = engine::make_cache(shape, {"none:f32", "qfilter:0.5"}, run.calibrated);
    const std::vector<float>& filters =
        run.calibrated.artifacts->at("--evict qfilter").get("filters", {shape.layers, shape.kv_heads, dim}).values;

    const engine::recorded_rows& calibration = run.calibrated.rows();
    for (std::size_t layer = 0; layer < shape.layers; ++layer)
        for (std::size_t h = 0; h < shape.kv_heads; ++h) {
            SCOPED_TRACE("layer " + std::to_string(layer) + ", KV head " + std::to_string(h));
            std::vector<double> moment(dim * dim, 0.0), mean(dim, 0.0);
            const std::vector<float>& queries = calibration.queries[layer];
            const std::size_t samples = queries.size() / (shape.query_heads * dim);
            for (std::size_t t = 0; t < samples; ++t)
                for (std::size_t g = 0; g < group; ++g) {
                    const float* q = &queries[(t * shape.query_heads + h * group + g) * dim];
                    for (std::size_t i = 0; i < dim; ++i) {
                        mean[i] += q[i];
                        for (std::size_t j = 0; j < dim; ++j) moment[i * dim + j] += double(q[i]) * double(q[j]);
                    }
                }
            auto rayleigh = [&](const std::vector<double>& v) {
                double num = 0.0, norm = 0.0;
                for (std::size_t i = 0; i < dim; ++i) {
                    norm += v[i] * v[i];
                    for (std::size_t j = 0; j < dim; ++j) num += v[i] * moment[i * dim + j] * v[j];
                }
                return num / norm;
            };
            std::vector<double> v(dim, 1.0), next(dim);
            for (int iteration = 0; iteration < 2000; ++iteration) {
                double norm = 0.0;
                for (std::size_t i = 0; i < dim; ++i) {
                    next[i] = 0.0;
                    for (std::size_t j = 0; j < dim; ++j) next[i] += moment[i * dim + j] * v[j];
                    norm += next[i] * next[i];
                }
                for (std::size_t i = 0; i < dim; ++i) v[i] = next[i] / std::sqrt(norm);
            }
            const std::vector<double> filter(filters.begin() + static_cast<std::ptrdiff_t>((layer * shape.kv_heads + h) * dim),
                                             filters.begin() + static_cast<std::ptrdiff_t>((layer * shape.kv_heads + h + 1) * dim));
            EXPECT_GE(rayleigh(filter), rayleigh(v) * (1.0 - 1e-5));
            EXPECT_GE(std::inner_product(filter.begin(), filter.end(), mean.begin(), 0.0), 0.0);
        }

    const std::size_t prompt = engine_test::scaled(256, 96);
    const engine::recorded_rows rows = replay_prompt(run, *cache, prompt);
    auto* kept = engine::evicting_cache_inside(*cache);
    ASSERT_NE(kept, nullptr);
    ASSERT_NE(kept->eviction().scorer.target<kvc::evict::score::qfilter>(), nullptr);
    const std::size_t target = (prompt + 1) / 2; // ceil(0.5 x prompt), above the 20 protected
    for (std::size_t layer = 0; layer < shape.layers; ++layer)
        for (std::size_t h = 0; h < shape.kv_heads; ++h) {
            SCOPED_TRACE("layer " + std::to_string(layer) + ", KV head " + std::to_string(h));
            ASSERT_EQ(kept->tokens(layer, h), target + 1);
            std::vector<char> held(prompt + 1, 0);
            for (std::size_t i = 0; i < target + 1; ++i) held[static_cast<std::size_t>(kept->positions(layer, h)[i])] = 1;
            const float* f = &filters[(layer * shape.kv_heads + h) * dim];
            double lowest_kept = INFINITY, highest_dropped = -INFINITY;
            for (std::size_t t = 0; t <= prompt; ++t) {
                const bool protected_token = t < 4 || t + 16 >= prompt; // sinks, newest 16, the decoded token
                if (protected_token) {
                    EXPECT_TRUE(held[t]) << "position " << t;
                    continue;
                }
                double score = 0.0;
                for (std::size_t d = 0; d < dim; ++d)
                    score += double(f[d]) * double(rows.keys[layer][(t * shape.kv_heads + h) * dim + d]);
                if (held[t]) lowest_kept = std::min(lowest_kept, score);
                else highest_dropped = std::max(highest_dropped, score);
            }
            EXPECT_GE(lowest_kept, highest_dropped - 1e-4);
        }
}

// Head roles (B6) through the engine. The profile it learns is, per
// (layer, KV head), the attention mass its group's queries put on tokens a
// streaming head would drop (positions 4 .. i - 17 for the query at i),
// averaged over every query past the first 20 of each calibration sequence
// taken alone: computed here in double from the recorded rows. With share
// 0.25, floor(0.25 x 8) = 2 heads, those of largest mass, keep every token
// of the prompt; every other head keeps exactly the sinks, the newest 16
// and the decoded token. Measuring over the concatenated sequences instead
// (one sequence's first tokens then count as far for the next) gives a
// different profile: the engine must keep them apart.
TEST(EngineCalibration, HeadRolesKeepEverythingInTheHeadsAttendingFarthestBack) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const kvc::cache_config shape = engine::kv_cache_config(run.model.shape());
    const std::size_t dim = shape.head_dim, group = shape.group(), heads = shape.layers * shape.kv_heads;
    const engine::recorded_rows& calibration = run.calibrated.rows();
    const std::size_t length = engine_test::scaled(512, 128);
    ASSERT_EQ(calibration.sequences, std::vector<std::size_t>(engine::calibration_sequences, length));

    std::vector<double> far(heads, 0.0);
    std::size_t queries_measured = 0;
    for (std::size_t s = 0; s < engine::calibration_sequences; ++s)
        for (std::size_t layer = 0; layer < shape.layers; ++layer)
            for (std::size_t q_head = 0; q_head < shape.query_heads; ++q_head) {
                const std::size_t h = q_head / group;
                for (std::size_t i = 20; i < length; ++i) {
                    const float* q = &calibration.queries[layer][((s * length + i) * shape.query_heads + q_head) * dim];
                    std::vector<double> logit(i + 1);
                    for (std::size_t t = 0; t <= i; ++t) {
                        const float* k = &calibration.keys[layer][((s * length + t) * shape.kv_heads + h) * dim];
                        logit[t] = 0.0;
                        for (std::size_t d = 0; d < dim; ++d) logit[t] += double(q[d]) * double(k[d]);
                        logit[t] /= std::sqrt(double(dim));
                    }
                    const double largest = *std::max_element(logit.begin(), logit.end());
                    double total = 0.0, dropped = 0.0;
                    for (std::size_t t = 0; t <= i; ++t) {
                        const double p = std::exp(logit[t] - largest);
                        total += p;
                        if (t >= 4 && t + 16 < i) dropped += p;
                    }
                    far[layer * shape.kv_heads + h] += dropped / total;
                    if (layer == 0 && q_head == 0) ++queries_measured;
                }
            }
    for (double& mass : far) mass /= static_cast<double>(queries_measured * group);

    const auto cache = engine::make_cache(shape, {"none:f32", "head_roles:0.25"}, run.calibrated);
    const std::vector<float>& learnt =
        run.calibrated.artifacts->at("--evict head_roles").get("far_mass", {shape.layers, shape.kv_heads}).values;
    for (std::size_t i = 0; i < heads; ++i) EXPECT_NEAR(learnt[i], far[i], 1e-5) << "head " << i;

    std::vector<std::size_t> order(heads);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return far[a] > far[b]; });
    ASSERT_GT(far[order[1]] - far[order[2]], 1e-3) << "the two retrieval heads must be well defined";

    const std::size_t prompt = engine_test::scaled(256, 96);
    replay_prompt(run, *cache, prompt);
    auto* kept = engine::evicting_cache_inside(*cache);
    ASSERT_NE(kept, nullptr);
    ASSERT_NE(kept->eviction().selector.target<kvc::evict::by_head_role>(), nullptr);
    std::vector<std::int32_t> everything(prompt + 1), streaming = {0, 1, 2, 3};
    std::iota(everything.begin(), everything.end(), 0);
    for (std::size_t t = prompt - 16; t <= prompt; ++t) streaming.push_back(static_cast<std::int32_t>(t));
    for (std::size_t layer = 0; layer < shape.layers; ++layer)
        for (std::size_t h = 0; h < shape.kv_heads; ++h) {
            const std::size_t head = layer * shape.kv_heads + h;
            const bool retrieval = head == order[0] || head == order[1];
            const std::vector<std::int32_t> held(kept->positions(layer, h),
                                                 kept->positions(layer, h) + kept->tokens(layer, h));
            EXPECT_EQ(held, retrieval ? everything : streaming) << "layer " << layer << ", KV head " << h;
        }

    // Negative control: the rows as one long sequence.
    engine::calibration joined;
    auto rows = std::make_shared<engine::recorded_rows>(calibration);
    rows->sequences = {engine::calibration_sequences * length};
    joined.rows = [rows]() -> const engine::recorded_rows& { return *rows; };
    engine::make_cache(shape, {"none:f32", "head_roles:0.25"}, joined);
    const std::vector<float>& across =
        joined.artifacts->at("--evict head_roles").get("far_mass", {shape.layers, shape.kv_heads}).values;
    double largest_change = 0.0;
    for (std::size_t i = 0; i < heads; ++i) largest_change = std::max(largest_change, std::abs(across[i] - far[i]));
    EXPECT_GT(largest_change, 0.01);
}

// The calibrated eviction policies and LagKV with lag 16 run on kvref on
// every codec that takes eviction and hold exactly their rows: after the
// prompt of P tokens, qfilter and lagkv16 keep max(ceil(P / 4), 20) per head,
// head_roles P in 2 of the 8 heads and 20 in the others; each then gains the
// S decoded tokens. The fidelity report names the calibration text for the
// calibrated policies only.
TEST(EngineCalibration, CalibratedEvictionRunsOnKvrefOnEveryCarrier) {
    KVC_SKIP_WITHOUT(engine_test::kvref());
    kvref_setup run;
    const double prompt = static_cast<double>(run.setup.prompt), scored = static_cast<double>(run.setup.scored);
    const double per_head_budget = std::max(std::ceil(prompt / 4.0), 20.0);
    const std::map<std::string, double> rows_kept = {
        {"qfilter:0.25", (per_head_budget + scored) / (prompt + scored)},
        {"lagkv16:0.25", (per_head_budget + scored) / (prompt + scored)},
        {"head_roles:0.25", (2.0 * (prompt + scored) + 6.0 * (20.0 + scored)) / (8.0 * (prompt + scored))}};
    for (const char* carrier : {"none:f32", "none:f16", "q8_0", "q4_0", "kivi:2"})
        for (const char* evict : {"qfilter:0.25", "head_roles:0.25", "lagkv16:0.25"}) {
            SCOPED_TRACE(std::string(carrier) + " + " + evict);
            run.setup.tested = {carrier, evict};
            const engine::fidelity_report r = engine::measure_fidelity(run.model, run.windows, run.setup, run.calibrated);
            EXPECT_TRUE(std::isfinite(r.kl_mean));
            EXPECT_GT(r.kl_mean, 0.0);
            EXPECT_LT(r.kl_mean, 1.0);
            EXPECT_GT(r.top1_agreement, 0.5);
            EXPECT_NEAR(r.tested.rows_kept, rows_kept.at(evict), 1e-12);
            const bool calibrated = std::string(evict).rfind("lagkv", 0) != 0;
            EXPECT_EQ(r.setup.calibration, calibrated ? "the end of eval.txt" : "");
        }
}
