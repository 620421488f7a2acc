// Projection through the host's projection stage, proven on P3 (ThinK): key
// channels whose query energy is zero can be dropped without changing
// attention, and dropping them frees exactly their bytes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <random>
#include <set>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/projection/think.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/storage/pruned_rows.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;

template <class Eviction = evict::none, class Projection = kvc::project::think>
using cache_of = kvc::compressed_cache<Eviction, kvc::merge::none, kvc::quant::none<float>, Projection>;

constexpr std::size_t dim = 32, pruned = 12, window = 128, prompt = 200, chunk = 50;

kvc::cache_config shape(kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = dim;
    c.storage = kvc::dtype::f32;
    c.resource = resource;
    return c;
}

kvc::project::think think() { return kvc::project::think(static_cast<double>(pruned) / dim, window); }

// Engine data in which each KV head's group of queries never uses `pruned`
// channels of its own (a different random set per head), with keys and values
// random everywhere.
struct engine_data {
    std::vector<float> keys, values, queries;
    std::vector<std::set<std::size_t>> silent; // per KV head: the channels its queries leave at 0
    explicit engine_data(std::size_t tokens, std::uint32_t seed) {
        const kvc::cache_config c = shape();
        keys = random_floats(tokens * c.kv_heads * dim, seed);
        values = random_floats(tokens * c.kv_heads * dim, seed + 1);
        queries = random_floats(tokens * c.query_heads * dim, seed + 2);
        std::mt19937 rng(seed + 3);
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            std::vector<std::size_t> channels(dim);
            for (std::size_t d = 0; d < dim; ++d) channels[d] = d;
            std::shuffle(channels.begin(), channels.end(), rng);
            silent.emplace_back(channels.begin(), channels.begin() + pruned);
        }
        for (std::size_t t = 0; t < tokens; ++t)
            for (std::size_t j = 0; j < c.query_heads; ++j)
                for (std::size_t d : silent[j / c.group()]) queries[(t * c.query_heads + j) * dim + d] = 0.0f;
    }
    const float* query(std::size_t t) const { return queries.data() + t * shape().query_heads * dim; }
};

// Prefills `prompt` tokens in chunks through attend_chunk (which records the queries ThinK scores with).
template <class Cache>
void prefill(Cache& cache, const engine_data& data) {
    const kvc::cache_config c = cache.config();
    std::vector<float> out(chunk * c.query_heads * dim);
    for (std::size_t first = 0; first < prompt; first += chunk) {
        cache.append(0, token_major(data.keys.data() + first * c.kv_heads * dim, chunk, c.kv_heads, dim),
                     token_major(data.values.data() + first * c.kv_heads * dim, chunk, c.kv_heads, dim),
                     static_cast<std::int64_t>(first));
        cache.attend_chunk(0, data.query(first), chunk, out.data());
    }
}

template <class Cache>
std::vector<float> decode(Cache& cache, const engine_data& data, std::size_t t) {
    const kvc::cache_config c = cache.config();
    cache.append(0, token_major(data.keys.data() + t * c.kv_heads * dim, 1, c.kv_heads, dim),
                 token_major(data.values.data() + t * c.kv_heads * dim, 1, c.kv_heads, dim), static_cast<std::int64_t>(t));
    std::vector<float> out(c.query_heads * dim);
    cache.attend(0, data.query(t), out.data());
    return out;
}

// The promise: channels no query uses are the ones pruned, and attention
// (decode and prefill over the pruned head) is what the full cache gives.
void check_zero_energy_channels_on_active_arch() {
    const engine_data data(prompt + 40, 1);
    cache_of<> cache(shape(), {}, {}, {}, think());
    kvc::full_cache full(shape());
    prefill(cache, data);
    prefill(full, data);
    for (std::size_t t = prompt; t < prompt + 40; ++t) {
        SCOPED_TRACE(t);
        const std::vector<float> got = decode(cache, data, t);
        const std::vector<float> expected = decode(full, data, t);
        ASSERT_LT(kvc_test::relative_error(got, expected), 1e-6);
    }
    for (std::size_t h = 0; h < shape().kv_heads; ++h) {
        const kvc::pruned_rows& rows = cache.head(0, h);
        ASSERT_EQ(rows.kept_channels(), dim - pruned);
        EXPECT_EQ(rows.body_tokens(), prompt - window) << "pruned after the prompt, the newest 128 kept whole";
        for (std::size_t i = 0; i < rows.kept_channels(); ++i)
            EXPECT_EQ(data.silent[h].count(rows.channels()[i]), 0u) << "kept a channel no query uses";
    }
    // A prefill chunk over the pruned heads matches too (chunk queries are the newest).
    const kvc::cache_config c = shape();
    const std::size_t t = prompt + 40;
    const engine_data more(t + 8, 1); // same seed: the same rows up to t, then 8 more
    std::vector<float> got(8 * c.query_heads * dim), expected(got.size());
    cache.append(0, token_major(more.keys.data() + t * c.kv_heads * dim, 8, c.kv_heads, dim),
                 token_major(more.values.data() + t * c.kv_heads * dim, 8, c.kv_heads, dim), static_cast<std::int64_t>(t));
    full.append(0, token_major(more.keys.data() + t * c.kv_heads * dim, 8, c.kv_heads, dim),
                token_major(more.values.data() + t * c.kv_heads * dim, 8, c.kv_heads, dim), static_cast<std::int64_t>(t));
    cache.attend_chunk(0, more.query(t), 8, got.data());
    full.attend_chunk(0, more.query(t), 8, expected.data());
    EXPECT_LT(kvc_test::relative_error(got, expected), 1e-6);
}

TEST(Think, PruningChannelsWithZeroQueryEnergyLeavesAttentionUnchanged) {
    kvc_test::on_every_arch([] {
        check_zero_energy_channels_on_active_arch();
    });
}

// The pruned channels are really gone for queries that do use them: the
// same cache then differs from the full one (the comparison above can fail).
TEST(Think, QueriesInPrunedChannelsSeeTheDifference) {
    engine_data data(prompt + 1, 2);
    cache_of<> cache(shape(), {}, {}, {}, think());
    kvc::full_cache full(shape());
    prefill(cache, data);
    prefill(full, data);
    std::vector<float> loud = random_floats(shape().query_heads * dim, 9);
    std::copy(loud.begin(), loud.end(), data.queries.begin() + prompt * shape().query_heads * dim);
    EXPECT_GT(kvc_test::relative_error(decode(cache, data, prompt), decode(full, data, prompt)), 1e-3);
}

// Bytes: what the resource handed out, and per head exactly the layout: the
// pruned rows' kept key channels and whole values, the channel list, and the
// newest 128 rows whole.
TEST(Think, BytesAreTheLayoutsAndTheResources) {
    kvc_test::counting_resource memory;
    const engine_data data(prompt, 3);
    cache_of<> cache(shape(&memory), {}, {}, {}, think());
    prefill(cache, data);
    const std::size_t before = cache.bytes();
    cache.compress();
    EXPECT_EQ(cache.bytes(), memory.in_use);
    const std::size_t kept = dim - pruned, body = prompt - window, f = sizeof(float);
    const std::size_t head = kept * sizeof(std::uint16_t) + body * kept * f + body * dim * f + window * 2 * dim * f;
    for (std::size_t h = 0; h < shape().kv_heads; ++h) EXPECT_EQ(cache.head(0, h).bytes(), head);
    // The prompt's rows were whole (capacity grown by appends: at least 200 rows).
    EXPECT_GE(before - cache.bytes(), shape().kv_heads * body * pruned * f);
}

// Pruned rows keep their kept channels exactly and read 0 elsewhere; the
// newest 128 rows are whole; a later compression prunes the tokens that aged
// out of the window with the same channels.
TEST(Think, RecentWindowStaysWholeAndLaterPruningsReuseTheChannels) {
    const kvc::cache_config c = shape();
    const engine_data data(prompt + 30, 4);
    cache_of<> cache(c, {}, {}, {}, think());
    prefill(cache, data);
    for (std::size_t t = prompt; t < prompt + 30; ++t) decode(cache, data, t);
    std::vector<std::vector<std::uint16_t>> first_channels;
    for (std::size_t h = 0; h < c.kv_heads; ++h)
        first_channels.emplace_back(cache.head(0, h).channels(), cache.head(0, h).channels() + dim - pruned);
    cache.compress();
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const kvc::pruned_rows& rows = cache.head(0, h);
        ASSERT_EQ(rows.tokens(), prompt + 30);
        EXPECT_EQ(rows.body_tokens(), prompt + 30 - window);
        EXPECT_TRUE(std::equal(first_channels[h].begin(), first_channels[h].end(), rows.channels()));
        std::vector<float> keys(rows.tokens() * dim);
        rows.decode_keys(k, 0, rows.tokens(), keys.data());
        const std::set<std::size_t> kept(rows.channels(), rows.channels() + rows.kept_channels());
        for (std::size_t t = 0; t < rows.tokens(); ++t)
            for (std::size_t d = 0; d < dim; ++d) {
                const float original = data.keys[(t * c.kv_heads + h) * dim + d];
                const bool whole = t >= rows.body_tokens() || kept.count(d);
                ASSERT_EQ(keys[t * dim + d], whole ? original : 0.0f) << "token " << t << " channel " << d;
            }
    }
}

// With eviction first (H2O), then pruning: the pipeline composes, and with
// zero-energy channels the output equals H2O's alone (same attention, so the
// same tokens kept).
TEST(Think, ComposesAfterEviction) {
    const engine_data data(prompt + 20, 5);
    const auto policy = evict::h2o(evict::budget::absolute(150));
    cache_of<evict::h2o> pruned_cache(shape(), policy, {}, {}, think());
    cache_of<evict::h2o, kvc::project::none> evicting(shape(), policy);
    prefill(pruned_cache, data);
    prefill(evicting, data);
    for (std::size_t t = prompt; t < prompt + 20; ++t)
        ASSERT_LT(kvc_test::relative_error(decode(pruned_cache, data, t), decode(evicting, data, t)), 1e-6) << t;
    for (std::size_t h = 0; h < shape().kv_heads; ++h) {
        EXPECT_EQ(pruned_cache.tokens(0, h), evicting.tokens(0, h));
        EXPECT_EQ(pruned_cache.head(0, h).body_tokens(), 150 - window) << "eviction to 150, then 128 kept whole";
    }
}

// The strong guarantee: an allocation failure anywhere in the projection
// stage leaves every head and its attention as they were.
TEST(Think, FailedCompressLeavesTheCacheAsItWas) {
    kvc_test::counting_resource memory;
    const engine_data data(prompt, 6);
    cache_of<> cache(shape(&memory), {}, {}, {}, think());
    prefill(cache, data);
    std::vector<float> before(shape().query_heads * dim), after(before.size());
    cache.attend(0, data.query(prompt - 1), before.data());
    bool compressed = false;
    const std::size_t failures = kvc_test::compress_through_failures(cache, memory, [&](std::size_t allowed) {
        ASSERT_EQ(cache.head(0, 0).body_tokens(), 0u);
        ASSERT_EQ(cache.bytes(), memory.in_use);
        cache.attend(0, data.query(prompt - 1), after.data());
        ASSERT_EQ(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0) << allowed;
    }, compressed);
    EXPECT_TRUE(compressed);
    EXPECT_GE(failures, 3u);
    EXPECT_EQ(cache.head(0, 0).body_tokens(), prompt - window);
}

// The store alone: pruned with every channel kept, it attends exactly as the
// dense rows it came from, bias and logits indexed over body then recent.
TEST(PrunedRows, KeepingEveryChannelAttendsLikeTheDenseRows) {
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    const std::size_t tokens = 40, group = 3;
    const auto keys = random_floats(tokens * dim, 11), values = random_floats(tokens * dim, 12);
    const auto queries = random_floats(group * dim, 13), bias = random_floats(tokens, 14);
    kvc::dense_rows dense(kvc::dtype::f32, dim, nullptr);
    dense.reserve_for_append(tokens);
    for (std::size_t t = 0; t < tokens; ++t)
        dense.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    std::vector<std::uint16_t> every(dim);
    for (std::size_t d = 0; d < dim; ++d) every[d] = static_cast<std::uint16_t>(d);
    const kvc::pruned_rows pruned = kvc::pruned_rows(dense).pruned(every.data(), dim, 25);
    ASSERT_EQ(pruned.body_tokens(), 25u);
    auto run = [&](const auto& store, std::vector<float>& logits) {
        std::vector<float> max(group, -INFINITY), sum(group, 0.0f), acc(group * dim, 0.0f), out(group * dim);
        kvc::kernels::decode_problem p;
        p.group = group;
        p.queries = queries.data();
        p.query_stride = dim;
        p.scale = 0.2f;
        p.bias = bias.data();
        p.logits = logits.data();
        p.logits_stride = tokens;
        store.attend(k, p, kvc::kernels::decode_state{max.data(), sum.data(), acc.data()});
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = acc[i] / sum[i / dim];
        return out;
    };
    std::vector<float> dense_logits(group * tokens), pruned_logits(group * tokens);
    const std::vector<float> expected = run(dense, dense_logits), got = run(pruned, pruned_logits);
    EXPECT_LT(kvc_test::relative_error(got, expected), 1e-6);
    for (std::size_t i = 0; i < dense_logits.size(); ++i) EXPECT_NEAR(pruned_logits[i], dense_logits[i], 1e-5) << i;
}

TEST(Think, BadParametersAreRefusedAtConstruction) {
    EXPECT_THROW((cache_of<>(shape(), {}, {}, {}, kvc::project::think(1.0))), kvc::error);
    EXPECT_THROW((cache_of<>(shape(), {}, {}, {}, kvc::project::think(-0.1))), kvc::error);
    EXPECT_NO_THROW((cache_of<>(shape(), {}, {}, {}, kvc::project::think(0.96))));
}

} // namespace
