// examples/engine/cache_choice.hpp: every configuration of the sweep builds
// and runs; bad spellings are the library's errors, naming the close ones;
// calibrated policies learn once; LagKV at its default lag keeps what
// streaming keeps on the fidelity tools' prompts, and at lag 16 does not.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/registry.hpp>

#include "engine/cache_choice.hpp"
#include "engine/synthetic_calibration.hpp"

namespace {

kvc::cache_config small_shape() {
    kvc::cache_config config;
    config.layers = 2;
    config.kv_heads = 2;
    config.query_heads = 4;
    config.head_dim = 64; // the block codecs need a multiple of their group size (up to 64 here)
    return config;
}

// Calibration rows for small_shape(): 300 tokens, as two sequences of 150.
engine::calibration small_calibration() { return engine_test::synthetic_calibration(small_shape()); }

// The codecs learnt from calibration rows.
const char* const calibrated_spellings[] = {"cq:c4b8", "cq:c8b8", "kvquant:3", "kvquant:4"};
// The codecs every eviction policy runs on.
const char* const eviction_carriers[] = {"none:f32", "none:f16", "q8_0", "q4_0", "kivi:2"};

std::string error_of(const engine::cache_spec& spec) {
    try {
        engine::make_cache(small_shape(), spec);
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "(no error)";
}

// The rows exercise() appends: keys and values [tokens][kv_heads][head_dim],
// repeating with a short period or, with `varied`, differing smoothly
// throughout; queries [tokens][query_heads][head_dim].
struct exercise_rows {
    std::vector<float> keys, values, queries;
};
exercise_rows rows_of(std::size_t tokens, bool varied) {
    const kvc::cache_config shape = small_shape();
    exercise_rows r;
    r.keys.resize(tokens * shape.kv_heads * shape.head_dim);
    r.values.resize(r.keys.size());
    for (std::size_t i = 0; i < r.keys.size(); ++i) {
        if (varied) {
            const double x = static_cast<double>(i);
            r.keys[i] = static_cast<float>(std::sin(0.011 * x) * std::cos(0.37 * x) + 0.2 * std::sin(1.7 * x));
            r.values[i] = static_cast<float>(std::cos(0.013 * x + 0.3 * std::sin(0.05 * x)));
        } else {
            r.keys[i] = static_cast<float>((i * 7) % 13) / 13.0f - 0.5f;
            r.values[i] = static_cast<float>((i * 5) % 11) / 11.0f - 0.5f;
        }
    }
    r.queries.assign(tokens * shape.query_heads * shape.head_dim, 0.25f);
    return r;
}

// The prompt, `tokens` rows to every layer in one chunk (append + attend_chunk).
void prefill(engine::kv_cache& cache, const exercise_rows& r, std::size_t tokens) {
    const kvc::cache_config shape = small_shape();
    std::vector<float> out(r.queries.size());
    for (std::size_t layer = 0; layer < shape.layers; ++layer) {
        cache.append(layer, engine::kv_cache::view(r.keys.data(), tokens, shape.kv_heads, shape.head_dim),
                     engine::kv_cache::view(r.values.data(), tokens, shape.kv_heads, shape.head_dim), 0);
        cache.attend_chunk(layer, r.queries.data(), tokens, out.data());
    }
}

// One decode step after that prompt (append + attend on every layer), which
// is when eviction runs unless the engine called compress. Returns the
// attention outputs, [layers][query_heads][head_dim].
std::vector<float> first_decode_step(engine::kv_cache& cache, const exercise_rows& r, std::size_t tokens) {
    const kvc::cache_config shape = small_shape();
    const std::size_t q_row = shape.query_heads * shape.head_dim;
    std::vector<float> out(shape.layers * q_row);
    for (std::size_t layer = 0; layer < shape.layers; ++layer) {
        cache.append(layer, engine::kv_cache::view(r.keys.data(), 1, shape.kv_heads, shape.head_dim),
                     engine::kv_cache::view(r.values.data(), 1, shape.kv_heads, shape.head_dim),
                     static_cast<std::int64_t>(tokens));
        cache.attend(layer, r.queries.data(), out.data() + layer * q_row);
    }
    return out;
}

// A prompt of `tokens` rows, then one decode step.
void exercise(engine::kv_cache& cache, std::size_t tokens, bool varied = false) {
    const exercise_rows r = rows_of(tokens, varied);
    prefill(cache, r, tokens);
    first_decode_step(cache, r, tokens);
}

} // namespace

TEST(EngineCacheChoice, EverySweepPointBuildsAndRuns) {
    const std::vector<engine::sweep_point> points = engine::sweep_points();
    const engine::calibration calibrated = small_calibration();
    std::set<std::string> labels;
    for (const engine::sweep_point& point : points) {
        SCOPED_TRACE(point.spec.label());
        EXPECT_TRUE(labels.insert(point.spec.label()).second) << "listed twice";
        const auto cache = engine::make_cache(small_shape(), point.spec, calibrated);
        ASSERT_NE(cache, nullptr);
        exercise(*cache, 40);
        EXPECT_GT(cache->bytes(), 0u);
        const std::size_t appended = 2u * 2u * 41u; // layers x KV heads x tokens
        if (point.spec.evict == "none") {
            EXPECT_EQ(cache->rows(), appended);
        } else {
            // Every swept budget keeps fewer than the 40 prompt tokens (and at
            // least kvc's 4 sinks + 16 recent ones) after the prompt; head
            // roles keep them all in a share of the 4 heads, below 1.
            EXPECT_LT(cache->rows(), appended);
            EXPECT_GE(cache->rows(), 2u * 2u * 21u);
        }
    }
    // The baseline, today's codecs and an eviction budget are all there.
    for (const char* expected : {"full:f32", "full:f16", "full:bf16", "none:f32", "none:f16", "none:bf16", "q8_0",
                                 "q4_0", "q4_1", "k4v2", "none:f16 + snapkv:0.25", "none:f16 + h2o:0.25 every 16",
                                 "q4_0 + snapkv:0.25", "q8_0 + knorm:0.25", "cq:c4b8", "cq:c8b8", "kvquant:3",
                                 "kvquant:4", "mixed:int8/int2:0.2", "mixed:int4/int2:0.2", "none:f16 + qfilter:0.25",
                                 "none:f16 + head_roles:0.25", "none:f16 + lagkv16:0.25", "none:f16 + lagkv:0.25",
                                 "none:f16 + think:0.4", "none:f16 + pca:32", "none:f16 + pca:16", "none:f16 + pca:8",
                                 "none:f16 + loki:16:0.125", "none:f16 + loki:16:0.25", "none:f16 + loki:8:0.25"})
        EXPECT_EQ(labels.count(expected), 1u) << expected;
}

// attend on a layer that holds no token yet is defined (README, engine
// contract): every output is 0, the limit of attention over an empty set, as
// the kernels' finalize gives it; attend_chunk there is an error (no token to
// attend). Every codec of the registry, with and without eviction.
TEST(EngineCacheChoice, EveryCacheAttendsToZerosOnAnEmptyLayer) {
    const kvc::cache_config shape = small_shape();
    const engine::calibration calibrated = small_calibration();
    std::vector<engine::cache_spec> specs;
    for (const engine::sweep_point& point : engine::sweep_points())
        if (point.spec.evict == "none") specs.push_back(point.spec);
    specs.push_back({"none:f16", "h2o:0.25"});
    specs.push_back({"kivi:2", "snapkv:0.25"});
    for (const engine::cache_spec& spec : specs) {
        SCOPED_TRACE(spec.label());
        const auto cache = engine::make_cache(shape, spec, calibrated);
        std::vector<float> queries(shape.query_heads * shape.head_dim, 0.5f), out(queries.size(), 42.0f);
        // Layer 1 stays empty while layer 0 holds tokens.
        std::vector<float> rows(3 * shape.kv_heads * shape.head_dim, 0.25f);
        cache->append(0, engine::kv_cache::view(rows.data(), 3, shape.kv_heads, shape.head_dim),
                      engine::kv_cache::view(rows.data(), 3, shape.kv_heads, shape.head_dim), 0);
        cache->attend(1, queries.data(), out.data());
        for (float x : out) ASSERT_EQ(x, 0.0f);
        EXPECT_THROW(cache->attend_chunk(1, queries.data(), 1, out.data()), kvc::error);
    }
}

// Calibrated codecs need calibration rows: without them, a clear error; with
// them, each artifact is learnt once and reused by every cache built from it.
TEST(EngineCacheChoice, CalibratedCodecsLearnOnceFromTheCalibration) {
    for (const char* spelling : calibrated_spellings) {
        const std::string missing = error_of({spelling, "none"});
        EXPECT_NE(missing.find("needs calibration text"), std::string::npos) << spelling << ": " << missing;
    }
    engine::calibration calibrated = small_calibration();
    int calls = 0;
    const auto rows = calibrated.rows;
    calibrated.rows = [&calls, rows]() -> const engine::recorded_rows& { return ++calls, rows(); };
    for (int round = 0; round < 2; ++round)
        for (const char* spelling : calibrated_spellings) engine::make_cache(small_shape(), {spelling, "none"}, calibrated);
    EXPECT_EQ(calls, 4); // once per spelling
    EXPECT_EQ(calibrated.artifacts->size(), 4u);
    EXPECT_EQ(calibrated.artifacts->at("kvquant:3").kind, "kvquant");
    EXPECT_EQ(calibrated.artifacts->at("cq:c8b8").kind, "cq");
}

// kvquant:BITS is the library's kvquant with an artifact learnt at BITS bits
// (the library reads the bits from the artifact); plain kvquant learns at 3.
TEST(EngineCacheChoice, KVQuantSpellingsChooseTheLearntBits) {
    engine::calibration calibrated = small_calibration();
    for (const char* spelling : {"kvquant", "kvquant:2", "kvquant:3", "kvquant:4"}) {
        const auto cache = engine::make_cache(small_shape(), {spelling, "none"}, calibrated);
        EXPECT_TRUE(cache->wants_keys_before_rope()) << spelling;
    }
    const std::pair<const char*, float> expected[] = {{"kvquant", 3.0f}, {"kvquant:2", 2.0f}, {"kvquant:3", 3.0f},
                                                      {"kvquant:4", 4.0f}};
    for (const auto& [spelling, bits] : expected)
        EXPECT_EQ(calibrated.artifacts->at(spelling).get("bits", {1}).values.at(0), bits) << spelling;
    const std::string five = error_of({"kvquant:5", "none"});
    EXPECT_NE(five.find("unknown method 'kvquant:5'"), std::string::npos) << five;
    EXPECT_NE(five.find("close: kvquant"), std::string::npos) << five;
}

// The calibrated eviction policies: without calibration rows, an error that
// names the spelling and what it needs; with them, one artifact per policy
// (whatever its value), learnt once and reused by every cache, on every
// codec that runs with eviction.
TEST(EngineCacheChoice, CalibratedEvictionLearnsOncePerPolicy) {
    for (const char* spelling : {"qfilter:0.25", "head_roles:0.25"}) {
        const std::string missing = error_of({"none:f16", spelling});
        EXPECT_NE(missing.find(std::string("--evict ") + spelling), std::string::npos) << missing;
        EXPECT_NE(missing.find("needs calibration text"), std::string::npos) << missing;
    }
    EXPECT_NE(error_of({"none:f16", "qfilter:0.25"}).find("queries"), std::string::npos);
    EXPECT_NE(error_of({"none:f16", "head_roles:0.25"}).find("keys and queries"), std::string::npos);

    engine::calibration calibrated = small_calibration();
    int calls = 0;
    const auto rows = calibrated.rows;
    calibrated.rows = [&calls, rows]() -> const engine::recorded_rows& { return ++calls, rows(); };
    for (const char* carrier : eviction_carriers)
        for (const char* spelling : {"qfilter:0.5", "qfilter:0.25", "head_roles:0.5", "head_roles:0.25"}) {
            SCOPED_TRACE(std::string(carrier) + " + " + spelling);
            const auto cache = engine::make_cache(small_shape(), {carrier, spelling}, calibrated);
            exercise(*cache, 60);
            EXPECT_LT(cache->rows(), 2u * 2u * 61u);
            EXPECT_TRUE(engine::learnt_from(calibrated, {carrier, spelling}));
        }
    EXPECT_EQ(calls, 2); // once per policy
    ASSERT_EQ(calibrated.artifacts->size(), 2u);
    EXPECT_EQ(calibrated.artifacts->at("--evict qfilter").kind, "qfilter");
    EXPECT_EQ(calibrated.artifacts->at("--evict head_roles").kind, "head_roles");
    EXPECT_FALSE(engine::learnt_from(calibrated, {"none:f16", "snapkv:0.25"}));
}

// head_roles' value is a share of the heads in (0, 1]; its calibration
// needs rows whose sequences add up to them, each longer than 4 + 16 tokens.
TEST(EngineCacheChoice, HeadRolesRejectsBadSharesAndCalibration) {
    const engine::calibration calibrated = small_calibration();
    for (const char* spelling : {"head_roles:0", "head_roles:1.5", "head_roles:-0.25"}) {
        try {
            engine::make_cache(small_shape(), {"none:f16", spelling}, calibrated);
            ADD_FAILURE() << spelling << " built";
        } catch (const std::invalid_argument& e) {
            // The library's check of the value, after the engine's spelling.
            EXPECT_NE(std::string(e.what()).find("expected head_roles:retrieval_share with a number in (0, 1]"),
                      std::string::npos)
                << e.what();
            EXPECT_NE(std::string(e.what()).find(std::string("none:f16 + ") + spelling), std::string::npos) << e.what();
        }
    }
    auto expect_rejected = [](std::vector<std::size_t> sequences, const std::string& expected) {
        engine::calibration bad = small_calibration();
        auto rows = std::make_shared<engine::recorded_rows>(bad.rows());
        rows->sequences = std::move(sequences);
        bad.rows = [rows]() -> const engine::recorded_rows& { return *rows; };
        try {
            engine::make_cache(small_shape(), {"none:f16", "head_roles:0.5"}, bad);
            ADD_FAILURE() << expected << ": built";
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
        }
    };
    expect_rejected({150, 100}, "sequences add up to 250 tokens, the rows hold 300");
    expect_rejected({}, "sequences add up to 0 tokens");
    expect_rejected(std::vector<std::size_t>(15, 20), "too short; expected more than 20 tokens");
}

// LagKV keeps the sinks, its last full chunk of `lag` tokens and the tail
// after it outright. With the default lag 128 on a 512-token prompt that is
// tokens 0-3 and 260-511, half the prompt: at keep ratios 0.5, 0.25 and
// 0.125 it keeps exactly the tokens streaming keeps (the first 4 and the
// newest), whatever the rows; at 0.75 it must choose and differs. With lag
// 16 (4 + 28 tokens outright) it chooses at every ratio.
TEST(EngineCacheChoice, LagKVAtItsDefaultLagKeepsWhatStreamingKeeps) {
    const engine::calibration none;
    const std::size_t prompt = 512;
    auto kept = [&](const std::string& spelling) {
        const auto cache = engine::make_cache(small_shape(), {"none:f32", spelling}, none);
        exercise(*cache, prompt, true);
        std::vector<std::vector<std::int32_t>> positions;
        for (std::size_t layer = 0; layer < 2; ++layer)
            for (std::size_t h = 0; h < 2; ++h) {
                const std::int32_t* first = nullptr;
                std::size_t count = 0;
                if (auto* c = engine::evicting_cache_inside(*cache)) {
                    EXPECT_TRUE(c->eviction().scorer.target<kvc::evict::score::streaming>() ||
                                c->eviction().scorer.target<kvc::evict::score::lagkv>());
                    first = c->positions(layer, h), count = c->tokens(layer, h);
                }
                EXPECT_NE(first, nullptr) << spelling;
                if (first) positions.emplace_back(first, first + count);
            }
        return positions;
    };
    for (const char* ratio : {"0.5", "0.25", "0.125"}) {
        SCOPED_TRACE(ratio);
        const auto streaming = kept(std::string("streaming:") + ratio);
        // Streaming: positions 0-3 and the newest, then the decoded token 512.
        const std::size_t target = static_cast<std::size_t>(std::ceil(std::stod(ratio) * prompt));
        std::vector<std::int32_t> expected = {0, 1, 2, 3};
        for (std::size_t p = prompt - (target - 4); p <= prompt; ++p) expected.push_back(static_cast<std::int32_t>(p));
        for (const auto& head : streaming) EXPECT_EQ(head, expected);
        EXPECT_EQ(kept(std::string("lagkv:") + ratio), streaming);
        EXPECT_NE(kept(std::string("lagkv16:") + ratio), streaming);
    }
    EXPECT_NE(kept("lagkv:0.75"), kept("streaming:0.75"));
}

// Only KVQuant rotates keys itself, so only it asks the model for keys before RoPE.
TEST(EngineCacheChoice, OnlyKVQuantTakesKeysBeforeRope) {
    const engine::calibration calibrated = small_calibration();
    for (const engine::sweep_point& point : engine::sweep_points()) {
        const auto cache = engine::make_cache(small_shape(), point.spec, calibrated);
        const bool kvquant = point.spec.cache.rfind("kvquant:", 0) == 0;
        EXPECT_EQ(cache->wants_keys_before_rope(), kvquant) << point.spec.label();
        EXPECT_EQ(engine::timed_cache(engine::make_cache(small_shape(), point.spec, calibrated))
                      .wants_keys_before_rope(),
                  kvquant)
            << point.spec.label();
    }
}

// Mixed precision: after the prompt, when the first decode token arrives, the
// engine assigns each head's precision from the prompt's attention mass, so
// 80% of the prompt's rows move to int2 and the cache shrinks to the layout's
// size: per head ceil(0.2 n) high rows + the rest low (+ the new token, high).
TEST(EngineCacheChoice, MixedPrecisionIsAssignedAfterThePrompt) {
    const kvc::cache_config shape = small_shape();
    for (const char* spelling : {"mixed:int8/int2:0.2", "mixed:int4/int2:0.2"}) {
        SCOPED_TRACE(spelling);
        const auto tested = engine::make_cache(shape, {spelling, "none"});
        const auto all_high = engine::make_cache(shape, {spelling, "none"});
        const std::size_t prompt = 40;
        exercise(*tested, prompt); // prompt, then one decode step: assigned
        // The same rows appended without attend_chunk: no prompt mass, nothing assigned.
        std::vector<float> rows((prompt + 1) * shape.kv_heads * shape.head_dim, 0.1f);
        for (std::size_t layer = 0; layer < shape.layers; ++layer)
            for (std::size_t t = 0; t <= prompt; ++t)
                all_high->append(layer, engine::kv_cache::view(rows.data(), 1, shape.kv_heads, shape.head_dim),
                                 engine::kv_cache::view(rows.data(), 1, shape.kv_heads, shape.head_dim),
                                 static_cast<std::int64_t>(t));
        tested->shrink_to_fit();
        all_high->shrink_to_fit();
        const bool int8 = std::string(spelling).find("int8") != std::string::npos;
        const std::size_t high_row = 2 * (int8 ? 34 : 18) * shape.head_dim / 32; // keys + values, group 32
        const std::size_t low_row = 2 * 12 * shape.head_dim / 32;              // int2_asym: 8 bytes + 2 fp16
        const std::size_t heads = shape.layers * shape.kv_heads;
        // Rows the two caches differ by: 32 demoted prompt rows per head (40 - ceil(0.2 * 40)).
        EXPECT_EQ(all_high->bytes() - tested->bytes(), heads * 32 * (high_row - low_row));
        EXPECT_EQ(tested->rows(), all_high->rows());
    }
}

// kv_cache::compress, what kvc_engine calls for every layer after prefill,
// is the compression the first decode step would otherwise run, run before
// it: the prompt shrinks at once (eviction keeps a quarter, at least 4 sinks +
// 16 recent of the 40 tokens; mixed precision demotes 80% of the rows to int2),
// and the decode step after it finds the cache it would have made itself:
// the same attention outputs bit for bit, rows and bytes. Through timed_cache,
// as kvc_engine calls it. full_cache has nothing to compress.
TEST(EngineCacheChoice, CompressAfterThePromptIsTheFirstDecodeStepsCompressionEarlier) {
    const kvc::cache_config shape = small_shape();
    const std::size_t prompt = 40, heads = shape.layers * shape.kv_heads;
    const exercise_rows rows = rows_of(prompt, true);
    const engine::cache_spec specs[] = {{"none:f16", "snapkv:0.25"}, {"q4_0", "snapkv:0.25"}, {"kivi:2", "h2o:0.25"},
                                        {"mixed:int8/int2:0.2", "none"}, {"full:f16", "none"}};
    for (const engine::cache_spec& spec : specs) {
        SCOPED_TRACE(spec.label());
        const auto late = engine::make_cache(shape, spec);
        engine::timed_cache early(engine::make_cache(shape, spec));
        prefill(*late, rows, prompt);
        prefill(early, rows, prompt);
        for (std::size_t layer = 0; layer < shape.layers; ++layer) early.compress(layer);
        late->shrink_to_fit();
        early.shrink_to_fit();
        EXPECT_EQ(late->rows(), heads * prompt);
        if (spec.evict != "none") {
            EXPECT_EQ(early.rows(), heads * 20); // max(40 / 4, 4 + 16) per head
        } else {
            EXPECT_EQ(early.rows(), late->rows());
            if (spec.is_full()) {
                EXPECT_EQ(early.bytes(), late->bytes());
            } else {
                EXPECT_LT(early.bytes(), late->bytes()); // precisions assigned
            }
        }
        if (!spec.is_full()) {
            EXPECT_GT(early.compress_seconds(), 0.0);
        }

        const std::vector<float> out_late = first_decode_step(*late, rows, prompt);
        const std::vector<float> out_early = first_decode_step(early, rows, prompt);
        EXPECT_EQ(out_early, out_late);
        EXPECT_EQ(early.rows(), late->rows());
        late->shrink_to_fit();
        early.shrink_to_fit();
        EXPECT_EQ(early.bytes(), late->bytes());
    }
}

TEST(EngineCacheChoice, MethodNamesTheCurve) {
    EXPECT_EQ((engine::cache_spec{"full:bf16", "none"}).method(), "full_cache");
    EXPECT_EQ((engine::cache_spec{"none:f16", "none"}).method(), "none");
    EXPECT_EQ((engine::cache_spec{"kivi:2", "none"}).method(), "kivi");
    EXPECT_EQ((engine::cache_spec{"none:f16", "snapkv:0.25"}).method(), "snapkv");
    EXPECT_EQ((engine::cache_spec{"kivi:2", "snapkv:0.25"}).method(), "snapkv+kivi");
    EXPECT_EQ((engine::cache_spec{"none:f16", "snapkv:0.25"}).label(), "none:f16 + snapkv:0.25");
    EXPECT_EQ((engine::cache_spec{"none:f16", "h2o:0.25", 16}).method(), "h2o (decode)");
    EXPECT_EQ((engine::cache_spec{"q4_0", "h2o:0.25", 16}).label(), "q4_0 + h2o:0.25 every 16");
}

// --evict-every: the cache compresses during decode and stays near its
// budget (B9): after every step each head holds at most its target
// (a quarter of the tokens seen, at least kvc's 4 sinks + 16 recent) plus the interval.
TEST(EngineCacheChoice, DecodeTimeEvictionHoldsTheBudget) {
    const kvc::cache_config shape = small_shape();
    const std::size_t every = 8, prompt = 40, steps = 300;
    const auto cache = engine::make_cache(shape, {"q4_0", "h2o:0.25", every});
    exercise(*cache, prompt); // the prompt and one decode step
    std::vector<float> row(shape.kv_heads * shape.head_dim, 0.1f);
    std::vector<float> queries(shape.query_heads * shape.head_dim, 0.25f), out(queries.size());
    const std::size_t heads = shape.layers * shape.kv_heads;
    for (std::size_t step = 0; step < steps; ++step) {
        const std::size_t position = prompt + 1 + step;
        for (std::size_t d = 0; d < row.size(); ++d) row[d] = static_cast<float>((position * 31 + d * 7) % 17) / 17.0f;
        for (std::size_t layer = 0; layer < shape.layers; ++layer) {
            const engine::kv_cache::view view(row.data(), 1, shape.kv_heads, shape.head_dim);
            cache->append(layer, view, view, static_cast<std::int64_t>(position));
            cache->attend(layer, queries.data(), out.data());
        }
        const std::size_t seen = position + 1;
        const std::size_t target = std::max<std::size_t>((seen + 3) / 4, 20);
        ASSERT_LE(cache->rows(), heads * (target + every)) << "after decode step " << step;
        ASSERT_GE(cache->rows(), heads * std::min(target, seen)) << "after decode step " << step;
    }
}

// Any codec pairs with any eviction (kvc::make_cache builds every pair): a
// codec outside the sweep's pairs evicts like the others. What kvc does not
// offer, and flags without the policy they need, are errors naming them.
TEST(EngineCacheChoice, EveryCodecEvictsAndUnofferedCompositionsAreErrors) {
    for (const char* codec : {"q4_1", "int2:g32", "hadamard:k4v2", "sparse:0.5", "mixed:int4/int2:0.2"}) {
        SCOPED_TRACE(codec);
        const auto cache = engine::make_cache(small_shape(), {codec, "snapkv:0.25"});
        exercise(*cache, 40);
        EXPECT_EQ(cache->rows(), 2u * 2u * 21u); // max(ceil(0.25 x 40), 4 + 16) per head, + the decoded token
    }
    const std::string every_without_eviction = error_of({"none:f16", "none", 8});
    EXPECT_NE(every_without_eviction.find("--evict-every"), std::string::npos) << every_without_eviction;
    const std::string every_on_full = error_of({"full:f16", "none", 8});
    EXPECT_NE(every_on_full.find("--evict-every"), std::string::npos) << every_on_full;

    // The library's refusals, after the spelling.
    const std::string merge_alone = error_of({"none:f16", "none", 0, "compensation"});
    EXPECT_NE(merge_alone.find("none:f16 + compensation: "), std::string::npos) << merge_alone;
    EXPECT_NE(merge_alone.find("expected an eviction policy"), std::string::npos) << merge_alone;
    // A projection composes with eviction (ThinK after SnapKV: the budget holds)...
    engine::cache_spec projected_evicting{"none:f16", "snapkv:0.25"};
    projected_evicting.project = "think:0.4";
    exercise(*engine::make_cache(small_shape(), projected_evicting), 40);
    // ...not yet with merging.
    engine::cache_spec projected_merging{"none:f16", "snapkv:0.25", 0, "compensation"};
    projected_merging.project = "think:0.4";
    const std::string projection_with_merging = error_of(projected_merging);
    EXPECT_NE(projection_with_merging.find("composes with eviction but not with merging"), std::string::npos)
        << projection_with_merging;
    engine::cache_spec projected_quantized{"q4_0", "none"};
    projected_quantized.project = "think:0.4";
    const std::string projection_on_q4_0 = error_of(projected_quantized);
    EXPECT_NE(projection_on_q4_0.find("expected the codec none:f32, none:f16 or none:bf16"), std::string::npos)
        << projection_on_q4_0;
}

// The engine learns every calibrated method of the registry: none is left
// out of the sweep (which skips what it cannot learn) or marked so in --list.
TEST(EngineCacheChoice, EveryCalibratedMethodIsLearnt) {
    const std::string text = engine::describe_options();
    EXPECT_EQ(text.find("not learnt by this engine"), std::string::npos) << text;
    std::set<std::string> swept;
    for (const engine::sweep_point& point : engine::sweep_points())
        for (const std::string* spelled : {&point.spec.cache, &point.spec.evict, &point.spec.project})
            swept.insert(spelled->substr(0, spelled->find(':')));
    for (const kvc::method_info& method : kvc::methods())
        if (method.calibrated) {
            EXPECT_EQ(swept.count(method.name.substr(0, method.name.find(':'))), 1u) << method.name;
        }
}

// P1 PCA and P4 Loki learn one artifact, the full-rank principal bases of
// the calibration keys after RoPE (what the cache is given) and values: each
// component's energy is the mean of <u_j, x>^2 over those rows, in
// descending order (computed here in double from the rows). At full rank
// the projection loses nothing: pca:64 (and loki:64:1, every token, every
// coordinate) attend as full_cache does; pca:8 does not.
TEST(EngineCacheChoice, ProjectionsLearnThePrincipalBasesOnce) {
    const kvc::cache_config shape = small_shape();
    for (const char* spelling : {"pca:16", "loki:16:0.125"}) {
        engine::cache_spec spec{"none:f16", "none"};
        spec.project = spelling;
        const std::string missing = error_of(spec);
        EXPECT_NE(missing.find(std::string("--project ") + spelling + " is learnt from the model's keys and values"),
                  std::string::npos)
            << missing;
        EXPECT_NE(missing.find("needs calibration text"), std::string::npos) << missing;
    }
    engine::calibration calibrated = small_calibration();
    int calls = 0;
    const auto rows = calibrated.rows;
    calibrated.rows = [&calls, rows]() -> const engine::recorded_rows& { return ++calls, rows(); };
    for (const char* spelling : {"pca:32", "loki:16:0.125", "pca:8", "loki:8:0.25"}) {
        engine::cache_spec spec{"none:f16", "none"};
        spec.project = spelling;
        EXPECT_FALSE(engine::learnt_from(engine::calibration{}, spec));
        engine::make_cache(shape, spec, calibrated);
        EXPECT_TRUE(engine::learnt_from(calibrated, spec)) << spelling;
    }
    EXPECT_EQ(calls, 1);
    ASSERT_EQ(calibrated.artifacts->size(), 2u);
    const kvc::calibration::artifact& bases = calibrated.artifacts->at("--project pca");
    const kvc::calibration::artifact& loki = calibrated.artifacts->at("--project loki");
    EXPECT_EQ(bases.kind, "pca");
    EXPECT_EQ(loki.kind, "pca");
    const std::size_t d = shape.head_dim, heads = shape.kv_heads;
    for (const char* which : {"key", "value"}) {
        const bool keys = std::string(which) == "key";
        const auto& basis = bases.get(std::string(which) + "_basis", {shape.layers, heads, d, d}).values;
        const auto& energy = bases.get(std::string(which) + "_energy", {shape.layers, heads, d}).values;
        EXPECT_EQ(loki.get(std::string(which) + "_basis", {shape.layers, heads, d, d}).values, basis);
        for (std::size_t l = 0; l < shape.layers; ++l) {
            const std::vector<float>& x = keys ? rows().keys[l] : rows().values[l];
            const std::size_t tokens = x.size() / (heads * d);
            for (std::size_t h = 0; h < heads; ++h)
                for (std::size_t j = 0; j < d; ++j) {
                    const float* u = basis.data() + (l * heads + h) * d * d;
                    double sum = 0.0;
                    for (std::size_t t = 0; t < tokens; ++t) {
                        double dot = 0.0;
                        for (std::size_t c = 0; c < d; ++c)
                            dot += double(u[c * d + j]) * double(x[(t * heads + h) * d + c]);
                        sum += dot * dot;
                    }
                    const double expected = sum / double(tokens), got = energy[(l * heads + h) * d + j];
                    ASSERT_NEAR(got, expected, 1e-4 * std::max(1.0, expected))
                        << which << " layer " << l << " head " << h << " component " << j;
                    if (j > 0) {
                        ASSERT_LE(got, energy[(l * heads + h) * d + j - 1]);
                    }
                }
        }
    }

    const std::size_t prompt = 40;
    const exercise_rows r = rows_of(prompt, true);
    auto outputs = [&](const engine::cache_spec& spec) {
        const auto cache = engine::make_cache(shape, spec, calibrated);
        prefill(*cache, r, prompt);
        return first_decode_step(*cache, r, prompt);
    };
    const std::vector<float> full = outputs({"full:f32", "none"});
    auto largest_difference = [&](const char* project) {
        engine::cache_spec spec{"none:f32", "none"};
        spec.project = project;
        const std::vector<float> out = outputs(spec);
        float largest = 0.0f;
        for (std::size_t i = 0; i < full.size(); ++i) largest = std::max(largest, std::fabs(out[i] - full[i]));
        return largest;
    };
    EXPECT_LT(largest_difference("pca:64"), 1e-5f);
    EXPECT_LT(largest_difference("loki:64:1"), 1e-5f);
    EXPECT_GT(largest_difference("pca:8"), 1e-3f);
}

TEST(EngineCacheChoice, FullAndIdentityCachesCountTheSameRows) {
    const auto full = engine::make_cache(small_shape(), {"full:f16", "none"});
    const auto none = engine::make_cache(small_shape(), {"none:f16", "none"});
    exercise(*full, 5);
    exercise(*none, 5);
    EXPECT_EQ(full->rows(), 2u * 2u * 6u);
    EXPECT_EQ(none->rows(), full->rows());
}

TEST(EngineCacheChoice, TimedCacheMeasuresAttention) {
    engine::timed_cache timed(engine::make_cache(small_shape(), {"full:f32", "none"}));
    EXPECT_EQ(timed.attention_seconds(), 0.0);
    exercise(timed, 16);
    EXPECT_GT(timed.attention_seconds(), 0.0);
    EXPECT_GT(timed.append_seconds(), 0.0);
    EXPECT_EQ(timed.rows(), 2u * 2u * 17u);
}

// Unknown names: kvc::full_cache's spellings are the engine's, so it names
// them; every other name is the library's, whose message names the flag's
// spelling and the close matches. A name of another family is refused too.
TEST(EngineCacheChoice, BadSpellingsNameTheCloseOnes) {
    const std::string unknown_full = error_of({"full:f8", "none"});
    EXPECT_NE(unknown_full.find("unknown cache 'full:f8'"), std::string::npos) << unknown_full;
    EXPECT_NE(unknown_full.find("full:f16"), std::string::npos) << unknown_full;

    const std::string unknown_cache = error_of({"q4_O", "none"});
    EXPECT_NE(unknown_cache.find("--cache q4_O: kvc::make_cache: unknown method 'q4_O'"), std::string::npos)
        << unknown_cache;
    EXPECT_NE(unknown_cache.find("close: q4_0"), std::string::npos) << unknown_cache;

    const std::string unknown_eviction = error_of({"none:f16", "snapvk:0.5"});
    EXPECT_NE(unknown_eviction.find("--evict snapvk:0.5: kvc::make_cache: unknown method 'snapvk:0.5'"),
              std::string::npos)
        << unknown_eviction;
    EXPECT_NE(unknown_eviction.find("snapkv"), std::string::npos) << unknown_eviction;

    const std::string unknown_merge = error_of({"none:f16", "h2o:0.25", 0, "compensaton"});
    EXPECT_NE(unknown_merge.find("--merge compensaton: kvc::make_cache: unknown method 'compensaton'"),
              std::string::npos)
        << unknown_merge;
    EXPECT_NE(unknown_merge.find("compensation"), std::string::npos) << unknown_merge;

    const std::string wrong_family = error_of({"none:f16", "q4_0"});
    EXPECT_NE(wrong_family.find("--evict q4_0: expected one eviction method of kvc::methods(), got q4_0 "
                                "(quantization)"),
              std::string::npos)
        << wrong_family;

    const std::string full_evicts = error_of({"full:f16", "bogus:0.5"});
    EXPECT_NE(full_evicts.find("keeps every token"), std::string::npos) << full_evicts;

    const std::string none_with_value = error_of({"none:f16", "none:0.5"});
    EXPECT_NE(none_with_value.find("unknown method 'none:0.5'"), std::string::npos) << none_with_value;
    const std::string bad_value = error_of({"none:f16", "snapkv:abc"});
    EXPECT_NE(bad_value.find("expected snapkv:keep_ratio with a number in (0, 1], got 'abc'"), std::string::npos)
        << bad_value;
}

TEST(EngineCacheChoice, DescribeListsEveryOption) {
    const std::string text = engine::describe_options();
    for (const engine::sweep_point& point : engine::sweep_points())
        EXPECT_NE(text.find(point.spec.cache), std::string::npos) << point.spec.cache;
    EXPECT_NE(text.find("--evict"), std::string::npos);
}
