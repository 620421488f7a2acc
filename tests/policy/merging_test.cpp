// Merging through the host's merge stage, proven on M5 (the compensation
// slot): what it promises is checked against double-precision oracles built
// from the engine's rows, never from what the cache stored.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <set>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/external.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/streaming.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;

template <class Eviction, class Merging = kvc::merge::compensation, class Codec = kvc::quant::none<float>>
using cache_of = kvc::compressed_cache<Eviction, Merging, Codec, kvc::project::none>;

constexpr std::size_t sinks = 4, window = 8, budget_tokens = 12;

kvc::cache_config shape(kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 32;
    c.storage = kvc::dtype::f32;
    c.resource = resource;
    return c;
}

evict::streaming streaming(std::size_t every = 0) {
    return evict::streaming(evict::budget::absolute(budget_tokens, sinks, window), evict::schedule{true, every});
}

std::size_t row_floats() { return shape().kv_heads * shape().head_dim; }

template <class Cache>
void append_rows(Cache& cache, const std::vector<float>& keys, const std::vector<float>& values, std::size_t first,
                 std::size_t count) {
    const kvc::cache_config c = cache.config();
    const std::size_t row = c.kv_heads * c.head_dim;
    cache.append(0, token_major(keys.data() + first * row, count, c.kv_heads, c.head_dim),
                 token_major(values.data() + first * row, count, c.kv_heads, c.head_dim),
                 static_cast<std::int64_t>(first));
}

// What one head of a merged cache stands for, read from the engine's rows:
// the tokens it holds as they are, plus (when it has dropped any) one slot
// with the mean key and value of every dropped token and logit bias log(count).
struct expected_head {
    std::vector<std::vector<double>> keys, values;
    std::vector<double> bias;
};
template <class Cache>
expected_head expected_of(const Cache& cache, std::size_t h, const std::vector<float>& keys,
                          const std::vector<float>& values, std::size_t seen, std::int32_t slot_position) {
    const kvc::cache_config c = cache.config();
    const std::size_t dim = c.head_dim;
    const std::int32_t* positions = cache.positions(0, h);
    std::set<std::int32_t> plain(positions, positions + cache.tokens(0, h));
    const bool merged = cache.tokens_seen(0) > plain.size();
    if (merged) plain.erase(slot_position); // the slot took a dropped token's index and position
    expected_head out;
    auto row = [&](const std::vector<float>& rows, std::size_t t) {
        return std::vector<double>(rows.begin() + (t * c.kv_heads + h) * dim, rows.begin() + (t * c.kv_heads + h + 1) * dim);
    };
    std::vector<double> key_sum(dim, 0.0), value_sum(dim, 0.0);
    double dropped = 0.0;
    for (std::size_t t = 0; t < seen; ++t) {
        if (plain.count(static_cast<std::int32_t>(t))) {
            out.keys.push_back(row(keys, t));
            out.values.push_back(row(values, t));
            out.bias.push_back(0.0);
            continue;
        }
        for (std::size_t d = 0; d < dim; ++d) {
            key_sum[d] += keys[(t * c.kv_heads + h) * dim + d];
            value_sum[d] += values[(t * c.kv_heads + h) * dim + d];
        }
        dropped += 1.0;
    }
    if (dropped > 0.0) {
        for (std::size_t d = 0; d < dim; ++d) key_sum[d] /= dropped, value_sum[d] /= dropped;
        out.keys.push_back(key_sum);
        out.values.push_back(value_sum);
        out.bias.push_back(std::log(dropped));
    }
    return out;
}

// Decode attention in double over each head's expected tokens.
std::vector<double> oracle(const kvc::cache_config& c, const std::vector<expected_head>& heads, const float* queries) {
    const std::size_t dim = c.head_dim;
    std::vector<double> out(c.query_heads * dim, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        const expected_head& head = heads[j / c.group()];
        std::vector<double> logits(head.keys.size());
        double max = -INFINITY, sum = 0.0;
        for (std::size_t t = 0; t < logits.size(); ++t) {
            double dot = 0.0;
            for (std::size_t d = 0; d < dim; ++d) dot += double(queries[j * dim + d]) * head.keys[t][d];
            logits[t] = dot * c.logit_scale() + head.bias[t];
            max = std::max(max, logits[t]);
        }
        for (double& l : logits) sum += (l = std::exp(l - max));
        for (std::size_t t = 0; t < logits.size(); ++t)
            for (std::size_t d = 0; d < dim; ++d) out[j * dim + d] += logits[t] / sum * head.values[t][d];
    }
    return out;
}

template <class Cache>
std::vector<float> attend(Cache& cache, const float* queries) {
    std::vector<float> out(cache.config().query_heads * cache.config().head_dim);
    cache.attend(0, queries, out.data());
    return out;
}

// Dropping tokens that are all alike loses nothing: n copies of one key and
// value attend exactly as one slot with logit + log(n). Without the slot the
// same eviction changes the output (so the comparison can fail).
TEST(Compensation, DroppingIdenticalTokensLosesNothing) {
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, row = row_floats();
    auto keys = random_floats(prompt * row, 1), values = random_floats(prompt * row, 2);
    for (std::size_t t = sinks + 1; t < prompt - window; ++t) // tokens sinks .. prompt-window-1 alike
        for (std::size_t i = 0; i < row; ++i) {
            keys[t * row + i] = keys[sinks * row + i];
            values[t * row + i] = values[sinks * row + i];
        }
    kvc::full_cache full(c);
    full.append(0, token_major(keys.data(), prompt, c.kv_heads, c.head_dim),
                token_major(values.data(), prompt, c.kv_heads, c.head_dim), 0);
    cache_of<evict::streaming> merged(c, streaming());
    cache_of<evict::streaming, kvc::merge::none> dropped(c, streaming());
    append_rows(merged, keys, values, 0, prompt);
    append_rows(dropped, keys, values, 0, prompt);
    merged.compress();
    dropped.compress();
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        EXPECT_EQ(merged.tokens(0, h), budget_tokens + 1) << "the budget plus one slot";
        EXPECT_EQ(merged.positions(0, h)[sinks], static_cast<std::int32_t>(sinks)) << "the slot follows the sinks";
        EXPECT_NEAR(std::exp(merged.column<kvc::attention_bias_column>(0, h)[sinks]), prompt - sinks - window, 1e-3);
    }
    const auto queries = random_floats(c.query_heads * c.head_dim, 3);
    std::vector<float> expected(queries.size());
    full.attend(0, queries.data(), expected.data());
    EXPECT_LT(kvc_test::relative_error(attend(merged, queries.data()), expected), 1e-6);
    EXPECT_GT(kvc_test::relative_error(attend(dropped, queries.data()), expected), 1e-2);
}

// On random rows, through a prompt compression and decode-time compressions
// every 3 tokens: after every step each head's slot holds the mean of every
// token ever dropped, counted in its bias, and attention matches the oracle.
struct no_preparation {
    template <class Cache>
    void operator()(Cache&) const {}
};
template <class Eviction, class Prepare = no_preparation>
void check_slot_through_decode(Eviction eviction, Prepare before_append = {}) {
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, steps = 24, total = prompt + steps, row = row_floats();
    const auto keys = random_floats(total * row, 4), values = random_floats(total * row, 5);
    const auto queries = random_floats(total * c.query_heads * c.head_dim, 6);
    cache_of<Eviction> cache(c, eviction);
    append_rows(cache, keys, values, 0, prompt);
    std::vector<float> chunk_out(prompt * c.query_heads * c.head_dim);
    cache.attend_chunk(0, queries.data(), prompt, chunk_out.data());
    for (std::size_t t = prompt; t < total; ++t) {
        SCOPED_TRACE(t);
        before_append(cache);
        append_rows(cache, keys, values, t, 1);
        std::vector<expected_head> heads;
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const float* bias = cache.template column<kvc::attention_bias_column>(0, h);
            std::size_t slots = 0, slot = 0;
            for (std::size_t i = 0; i < cache.tokens(0, h); ++i)
                if (bias[i] != 0.0f) ++slots, slot = i;
            ASSERT_EQ(slots, 1u) << "one slot per head";
            heads.push_back(expected_of(cache, h, keys, values, t + 1, cache.positions(0, h)[slot]));
            const expected_head& e = heads.back();
            EXPECT_NEAR(bias[slot], e.bias.back(), 1e-5);
            std::vector<float> slot_key(c.head_dim), slot_value(c.head_dim);
            cache.head(0, h).decode_keys(kvc::kernels::active(), slot, 1, slot_key.data());
            cache.head(0, h).decode_values(kvc::kernels::active(), slot, 1, slot_value.data());
            EXPECT_LT(kvc_test::relative_error(slot_key, e.keys.back()), 1e-5);
            EXPECT_LT(kvc_test::relative_error(slot_value, e.values.back()), 1e-5);
        }
        const float* q = queries.data() + t * c.query_heads * c.head_dim;
        EXPECT_LT(kvc_test::relative_error(attend(cache, q), oracle(c, heads, q)), 1e-5);
    }
}

TEST(Compensation, SlotIsTheMeanOfEverythingDroppedStreaming) {
    kvc_test::on_every_arch([] {
        check_slot_through_decode(streaming(3));
    });
}

// H2O may keep the slot (it draws attention for many tokens): later drops
// then fold into it rather than making a second one.
TEST(Compensation, SlotIsTheMeanOfEverythingDroppedH2O) {
    check_slot_through_decode(evict::h2o(evict::budget::absolute(budget_tokens + 4, sinks, window), evict::schedule{true, 3}));
}

// An eviction that keeps the slot (here the engine's own scores rank it
// first): later drops fold into it, weighted by its count, and no second slot appears.
TEST(Compensation, DropsFoldIntoAKeptSlot) {
    std::size_t calls = 0;
    auto rank_slot_first = [&calls](auto& cache) {
        ++calls;
        for (std::size_t h = 0; h < cache.config().kv_heads; ++h) {
            float* scores = cache.external_scores(0, h);
            const float* bias = cache.template column<kvc::attention_bias_column>(0, h);
            for (std::size_t i = 0; i < cache.tokens(0, h); ++i) // otherwise an order unlike recency
                scores[i] = bias[i] > 0.0f ? 1e9f : static_cast<float>((cache.positions(0, h)[i] * 7919 + calls) % 97);
        }
    };
    // A budget beyond sinks + window, so the scores choose what else stays.
    check_slot_through_decode(evict::external(evict::budget::absolute(budget_tokens + 4, sinks, window),
                                              evict::schedule{true, 3}),
                              rank_slot_first);
}

// The memory a slot costs, exactly: one more token of rows and position per
// head, and the bias column (4 bytes) for every held token; bytes() is what
// the resource handed out.
TEST(Compensation, BytesAreTheLayoutsAndTheResources) {
    kvc_test::counting_resource merged_memory, dropped_memory;
    const std::size_t prompt = 40, row = row_floats();
    const auto keys = random_floats(prompt * row, 7), values = random_floats(prompt * row, 8);
    cache_of<evict::streaming> merged(shape(&merged_memory), streaming());
    cache_of<evict::streaming, kvc::merge::none> dropped(shape(&dropped_memory), streaming());
    // What each cache holds before any token (its per-head and per-layer bookkeeping).
    const std::size_t merged_empty = merged.bytes(), dropped_empty = dropped.bytes();
    append_rows(merged, keys, values, 0, prompt);
    append_rows(dropped, keys, values, 0, prompt);
    merged.compress();
    dropped.compress();
    EXPECT_EQ(merged.bytes(), merged_memory.in_use);
    EXPECT_EQ(dropped.bytes(), dropped_memory.in_use);
    const kvc::cache_config c = shape();
    const std::size_t slot_row = 2 * c.head_dim * sizeof(float) + sizeof(std::int32_t);
    const std::size_t bias = (budget_tokens + 1) * sizeof(float);
    EXPECT_EQ((merged.bytes() - merged_empty) - (dropped.bytes() - dropped_empty), c.kv_heads * (slot_row + bias));
}

// The strong guarantee with a merger: an allocation failure at any point of
// compress leaves every head, its columns and its attention as they were.
TEST(Compensation, FailedCompressLeavesTheCacheAsItWas) {
    kvc_test::counting_resource memory;
    const kvc::cache_config c = shape(&memory);
    const std::size_t prompt = 40, row = row_floats();
    const auto keys = random_floats(prompt * row, 9), values = random_floats(prompt * row, 10);
    const auto queries = random_floats(c.query_heads * c.head_dim, 11);
    cache_of<evict::streaming> cache(c, streaming());
    append_rows(cache, keys, values, 0, 30);
    cache.compress(); // a slot exists: the next compression folds into it
    append_rows(cache, keys, values, 30, 10);
    const std::vector<float> before = attend(cache, queries.data());
    const std::size_t held = cache.tokens(0, 0);
    bool compressed = false;
    const std::size_t failures = kvc_test::compress_through_failures(cache, memory, [&](std::size_t allowed) {
        ASSERT_EQ(cache.tokens(0, 0), held);
        ASSERT_EQ(cache.bytes(), memory.in_use);
        const std::vector<float> after = attend(cache, queries.data());
        ASSERT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0) << allowed;
    }, compressed);
    EXPECT_TRUE(compressed);
    EXPECT_GE(failures, 3u) << "the fold, the compaction and the columns each allocate";
    EXPECT_EQ(cache.tokens(0, 0), budget_tokens + 1);
}

// Codecs re-encode the slot (store_row): q8_0 packs it like any row, the
// sinks wrapper and the Hadamard wrapper route or rotate it first. The slot
// decodes to the mean of the dropped rows as the codec stored them, within
// the codec's own rounding (int8: half a step of amax/127 per 32 values).
template <class Codec>
void check_codec_slot() {
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, row = row_floats();
    const auto keys = random_floats(prompt * row, 12), values = random_floats(prompt * row, 13);
    cache_of<evict::streaming, kvc::merge::compensation, Codec> cache(c, streaming());
    append_rows(cache, keys, values, 0, prompt);
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    std::vector<std::vector<float>> stored_keys(c.kv_heads), stored_values(c.kv_heads);
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        stored_keys[h].resize(prompt * c.head_dim);
        stored_values[h].resize(prompt * c.head_dim);
        cache.head(0, h).decode_keys(k, 0, prompt, stored_keys[h].data());
        cache.head(0, h).decode_values(k, 0, prompt, stored_values[h].data());
    }
    cache.compress();
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        std::vector<double> key_mean(c.head_dim, 0.0), value_mean(c.head_dim, 0.0);
        const std::size_t dropped = prompt - sinks - window;
        for (std::size_t t = sinks; t < sinks + dropped; ++t)
            for (std::size_t d = 0; d < c.head_dim; ++d) {
                key_mean[d] += stored_keys[h][t * c.head_dim + d] / double(dropped);
                value_mean[d] += stored_values[h][t * c.head_dim + d] / double(dropped);
            }
        std::vector<float> slot_key(c.head_dim), slot_value(c.head_dim);
        cache.head(0, h).decode_keys(k, sinks, 1, slot_key.data());
        cache.head(0, h).decode_values(k, sinks, 1, slot_value.data());
        EXPECT_LT(kvc_test::relative_error(slot_key, key_mean), 0.02);
        EXPECT_LT(kvc_test::relative_error(slot_value, value_mean), 0.02);
        // The kept rows are untouched: the first window row is the last 8 prompt rows' first.
        std::vector<float> kept(c.head_dim);
        cache.head(0, h).decode_keys(k, sinks + 1, 1, kept.data());
        EXPECT_EQ(std::memcmp(kept.data(), stored_keys[h].data() + (prompt - window) * c.head_dim,
                              c.head_dim * sizeof(float)), 0);
    }
}

TEST(Compensation, CodecsReencodeTheSlot) {
    kvc_test::on_every_arch([] {
        check_codec_slot<kvc::quant::q8_0>();
        check_codec_slot<kvc::quant::block<kvc::quant::int8_sym, 32, 2>>(); // slot in the packed body, sinks in fp16
        check_codec_slot<kvc::quant::rotated<kvc::quant::q8_0>>();          // rotated before it is packed
    });
}

// A dropped row with NaN stays out of the slot; the slot is the mean of the
// others and attention stays finite.
TEST(Compensation, NonFiniteRowsStayOutOfTheSlot) {
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, row = row_floats();
    auto keys = random_floats(prompt * row, 14), values = random_floats(prompt * row, 15);
    keys[10 * row + 3] = NAN;            // token 10, head 0
    values[11 * row + c.head_dim] = INFINITY; // token 11, head 1
    cache_of<evict::streaming> cache(c, streaming());
    append_rows(cache, keys, values, 0, prompt);
    cache.compress();
    EXPECT_NEAR(std::exp(cache.column<kvc::attention_bias_column>(0, 0)[sinks]), prompt - sinks - window - 1, 1e-3);
    EXPECT_NEAR(std::exp(cache.column<kvc::attention_bias_column>(0, 1)[sinks]), prompt - sinks - window - 1, 1e-3);
    const auto queries = random_floats(c.query_heads * c.head_dim, 16);
    for (float x : attend(cache, queries.data())) ASSERT_TRUE(std::isfinite(x));
}

} // namespace
