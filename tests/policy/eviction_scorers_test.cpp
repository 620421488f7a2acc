// Eviction scorers E4, E9, E11, E12, E14, E15, E16: cases where the right answer is known,
// exact budgets, determinism, parameter checks, and attention-output fidelity against random (E17).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;
namespace score = kvc::evict::score;

template <class Policy>
using evicting_cache = kvc::compressed_cache<Policy, kvc::merge::none, kvc::quant::none<float>, kvc::project::none>;
using full_cache = kvc::compressed_cache<evict::none, kvc::merge::none, kvc::quant::none<float>, kvc::project::none>;

kvc::cache_config shape(std::size_t kv_heads, std::size_t query_heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.storage = kvc::dtype::f32;
    return c;
}

template <class Cache>
std::vector<std::int32_t> kept_positions(const Cache& cache, std::size_t h = 0) {
    return std::vector<std::int32_t>(cache.positions(0, h), cache.positions(0, h) + cache.tokens(0, h));
}
bool has(const std::vector<std::int32_t>& kept, std::int32_t p) {
    return std::find(kept.begin(), kept.end(), p) != kept.end();
}

// Appends the prompt, runs chunked prefill attention over it (statistics and
// the query ring fill as in an engine), then compresses. Attention is skipped
// for policies that collect nothing from it (it cannot change their choice),
// which keeps the sanitizer run short.
template <class Cache>
void prefill_and_compress(Cache& cache, const kvc::cache_config& c, const std::vector<float>& keys,
                          const std::vector<float>& values, const std::vector<float>& queries, std::size_t tokens) {
    cache.append(0, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                 token_major(values.data(), tokens, c.kv_heads, c.head_dim), 0);
    if (!queries.empty() && (Cache::collects_attention_stats || Cache::collects_queries)) {
        std::vector<float> out(tokens * c.query_heads * c.head_dim);
        cache.attend_chunk(0, queries.data(), tokens, out.data());
    }
    cache.compress();
}

void set_row(std::vector<float>& rows, std::size_t row, std::size_t dim, const std::vector<float>& value) {
    std::copy(value.begin(), value.end(), rows.begin() + static_cast<std::ptrdiff_t>(row * dim));
}
std::vector<float> axis(std::size_t dim, std::size_t i, float length) {
    std::vector<float> v(dim, 0.0f);
    v[i] = length;
    return v;
}

// One KV head's inputs built by hand, for calling a scorer directly.
struct head_data {
    std::vector<float> keys, values, queries;
    std::vector<std::int32_t> positions;
    evict::head_inputs inputs(std::size_t dim, std::size_t group, float scale) const {
        evict::head_inputs in;
        in.tokens = positions.size();
        in.dim = dim;
        in.target = in.tokens / 2;
        in.keys = keys.data();
        in.values = values.data();
        in.positions = positions.data();
        in.last_position = positions.back();
        in.queries = queries.data();
        in.query_count = queries.size() / (group * dim);
        in.group = group;
        in.scale = scale;
        in.kernels = &kvc::kernels::active();
        return in;
    }
};

template <class Make>
void expect_error(Make make, const std::string& needle) {
    try {
        make();
        ADD_FAILURE() << "expected kvc::error mentioning " << needle;
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

// ---------------------------------------------------------------- E4 scissorhands

// Token A draws a little more than uniform from every query; token B draws
// almost everything from a single query. Persistence favours A; with a
// history of one query (the spike) B wins.
struct persistence_case {
    static constexpr std::size_t tokens = 200, dim = 16;
    kvc::cache_config c = shape(1, 1, dim);
    std::vector<float> keys = std::vector<float>(tokens * dim, 0.0f), values = random_floats(tokens * dim, 1);
    std::vector<float> queries = std::vector<float>(tokens * dim, 0.0f);
    std::int32_t a = 100, b = 150, spike = 180;
    explicit persistence_case(std::int32_t spike_at = 180) : spike(spike_at) {
        set_row(keys, a, dim, axis(dim, 0, 1.0f));
        set_row(keys, b, dim, axis(dim, 1, 8.0f));
        for (std::size_t i = 0; i < tokens; ++i) queries[i * dim] = 1.0f;
        queries[spike * dim + 1] = 20.0f;
    }
};

// A2SF (E3) by hand, forgetting 0.5: token 0 drew all of one early query,
// token 1 steady attention later. The running sums decay by 0.5 per query
// (0.25 for a chunk of two): [1, 0] -> [0.5, 0.6] -> [0.125, 0.35]; token 1
// ranks first. H2O (forgetting 1) sums [1, 0.8] and ranks token 0 first.
TEST(A2SF, AnOldSpikeFadesBelowRecentSteadyAttention) {
    score::a2sf a2sf;
    a2sf.forgetting = 0.5f;
    score::a2sf plain; // forgetting 1: H2O's sum
    plain.forgetting = 1.0f;
    const float step1[] = {1.0f, 0.0f}, step2[] = {0.0f, 0.6f}, chunk[] = {0.0f, 0.2f};
    float forgetful[2] = {0.0f, 0.0f}, summed[2] = {0.0f, 0.0f};
    for (auto [mass, queries] : {std::pair<const float*, std::size_t>{step1, 1}, {step2, 1}, {chunk, 2}}) {
        a2sf.observe(forgetful, mass, 2, queries);
        plain.observe(summed, mass, 2, queries);
    }
    EXPECT_FLOAT_EQ(forgetful[0], static_cast<float>(1.0 * 0.5 * 0.25));
    EXPECT_FLOAT_EQ(forgetful[1], static_cast<float>(0.6 * 0.25 + 0.2));
    EXPECT_FLOAT_EQ(summed[0], 1.0f);
    EXPECT_FLOAT_EQ(summed[1], 0.8f);
    const std::int32_t positions[] = {0, 1};
    evict::head_inputs in;
    in.tokens = 2;
    in.positions = positions;
    in.last_position = 3;
    float scores[2];
    in.attention = forgetful;
    a2sf.score(in, scores);
    EXPECT_GT(scores[1], scores[0]);
    in.attention = summed;
    plain.score(in, scores);
    EXPECT_GT(scores[0], scores[1]);
    a2sf.forgetting = 0.0f;
    EXPECT_THROW(a2sf.validate(), kvc::error);
}

TEST(Scissorhands, KeepsTheTokenAboveUniformEveryTimeOverAOneOffSpike) {
    persistence_case data;
    evicting_cache<evict::scissorhands> cache(data.c, evict::scissorhands(evict::budget::absolute(13, 4, 8)));
    prefill_and_compress(cache, data.c, data.keys, data.values, data.queries, data.tokens);
    const auto kept = kept_positions(cache);
    ASSERT_EQ(kept.size(), 13u);
    EXPECT_TRUE(has(kept, data.a));
    EXPECT_FALSE(has(kept, data.b));
}

TEST(Scissorhands, AHistoryOfOneQueryCountsOnlyThatQuery) {
    persistence_case data(199); // the spike is the newest query
    evict::scissorhands policy(evict::budget::absolute(13, 4, 8));
    policy.scorer.history = 1;
    evicting_cache<evict::scissorhands> cache(data.c, policy);
    prefill_and_compress(cache, data.c, data.keys, data.values, data.queries, data.tokens);
    const auto kept = kept_positions(cache);
    EXPECT_TRUE(has(kept, data.b)); // in the spike query B takes nearly all, A falls below uniform
    EXPECT_FALSE(has(kept, data.a));
}

TEST(Scissorhands, CountsEqualAReferenceWithCausalVisibility) {
    // Direct call: 40 held tokens with gaps (an earlier compression), 6 recorded
    // queries of a group of 2 at the newest positions; each query sees only the
    // tokens at or before its own position.
    const std::size_t dim = 8, group = 2;
    head_data d;
    for (std::int32_t p = 0; p < 60; p += (p % 3 == 0 ? 2 : 1)) d.positions.push_back(p);
    const std::size_t n = d.positions.size();
    d.keys = random_floats(n * dim, 3);
    d.values = random_floats(n * dim, 4);
    d.queries = random_floats(6 * group * dim, 5, 2.0f);
    const float scale = 0.35f;
    auto in = d.inputs(dim, group, scale);
    std::vector<float> scores(n);
    score::scissorhands{}.score(in, scores.data());
    std::vector<int> count(n, 0);
    for (std::size_t q = 0; q < 6; ++q) {
        const std::int64_t position = d.positions.back() - static_cast<std::int64_t>(5 - q);
        std::size_t visible = 0;
        while (visible < n && d.positions[visible] <= position) ++visible;
        for (std::size_t g = 0; g < group; ++g) {
            std::vector<double> p(visible);
            double max = -1e300, sum = 0;
            for (std::size_t t = 0; t < visible; ++t) {
                double dot = 0;
                for (std::size_t i = 0; i < dim; ++i) dot += double(d.queries[(q * group + g) * dim + i]) * d.keys[t * dim + i];
                max = std::max(max, p[t] = dot * scale);
            }
            for (double& x : p) sum += (x = std::exp(x - max));
            for (std::size_t t = 0; t < visible; ++t) count[t] += p[t] / sum > 1.0 / double(visible) ? 1 : 0;
        }
    }
    for (std::size_t t = 0; t < n; ++t) EXPECT_EQ(static_cast<int>(std::floor(scores[t])), count[t]) << t;
    EXPECT_EQ(count[n - 1] <= 2, true); // the newest token is seen by the newest query only
}

// ---------------------------------------------------------------- E11 lagkv

TEST(LagKV, EachChunkKeepsItsShareAndTheDeviatingTokenAndTheLagTailSurvive) {
    const std::size_t dim = 8, lag = 16, tokens = 4 + 5 * lag + 5; // sinks, 5 full chunks, tail of 5
    const auto c = shape(1, 1, dim);
    auto keys = random_floats(tokens * dim, 6), values = random_floats(tokens * dim, 7);
    const std::int32_t outlier = 4 + lag + 7; // inside chunk 1
    for (std::size_t i = 0; i < dim; ++i)
        keys[outlier * dim + i] = values[outlier * dim + i] = (i % 2 ? 10.0f : -10.0f);
    evict::lagkv policy(evict::budget::absolute(41, 4, 4));
    policy.scorer.lag = lag;
    evicting_cache<evict::lagkv> cache(c, policy);
    prefill_and_compress(cache, c, keys, values, {}, tokens);
    const auto kept = kept_positions(cache);
    ASSERT_EQ(kept.size(), 41u);
    EXPECT_TRUE(has(kept, outlier));
    for (std::int32_t p = 0; p < 4; ++p) EXPECT_TRUE(has(kept, p)) << p;
    // Chunks 0..3 are scored (4 each kept); chunk 4 (no successor) and the tail stay whole.
    for (std::size_t chunk = 0; chunk < 4; ++chunk) {
        const auto from = static_cast<std::int32_t>(4 + chunk * lag), to = from + static_cast<std::int32_t>(lag);
        EXPECT_EQ(std::count_if(kept.begin(), kept.end(), [&](std::int32_t p) { return p >= from && p < to; }), 4)
            << "chunk " << chunk;
    }
    for (std::int32_t p = 4 + 4 * lag; p < std::int32_t(tokens); ++p) EXPECT_TRUE(has(kept, p)) << p;
}

TEST(LagKV, WithoutTwoFullChunksItKeepsTheNewestTokensAsStreamingDoes) {
    const std::size_t dim = 8, tokens = 30; // 4 + 2 * 16 > 30
    const auto c = shape(1, 1, dim);
    const auto keys = random_floats(tokens * dim, 8);
    evict::lagkv lag(evict::budget::absolute(12, 4, 2));
    lag.scorer.lag = 16;
    evicting_cache<evict::lagkv> a(c, lag);
    evicting_cache<evict::streaming> b(c, evict::streaming(evict::budget::absolute(12, 4, 2)));
    prefill_and_compress(a, c, keys, keys, {}, tokens);
    prefill_and_compress(b, c, keys, keys, {}, tokens);
    EXPECT_EQ(kept_positions(a), kept_positions(b));
}

// LagKV's scores against its formula computed in double, on the scorer
// alone (scored at append): per scored chunk, keys and values normalised per channel by the next
// chunk's min and range, standard deviation over channels (n - 1), softmax
// over the chunk, the two averaged; a token's score is its rank in the chunk
// divided by lag. Sinks, the last full chunk and the tail score 1.
TEST(LagKV, ScoresAreTheRanksOfTheFormulaComputedInDouble) {
    const std::size_t dim = 8, lag = 16, sinks = 4, tokens = sinks + 4 * lag + 3;
    const auto keys = random_floats(tokens * dim, 21), values = random_floats(tokens * dim, 22, 3.0f);
    const auto& k = kvc::kernels::active();
    kvc::dense_rows rows(kvc::dtype::f32, dim, kvc::default_resource());
    rows.reserve(tokens);
    for (std::size_t t = 0; t < tokens; ++t) rows.push_back(k, kvc::dtype::f32, &keys[t * dim], &values[t * dim]);
    const evict::row_source source = evict::row_source::of(rows);
    std::vector<std::int32_t> positions(tokens);
    std::iota(positions.begin(), positions.end(), 100); // the sequence starts at position 100
    score::lagkv lagkv;
    lagkv.lag = lag;
    lagkv.sinks = sinks;
    std::vector<float> scratch(lagkv.append_scratch(dim));
    evict::append_inputs in;
    in.dim = dim;
    in.positions = positions.data();
    in.first_position = 100;
    in.rows = &source;
    in.kernels = &k;
    in.scratch = scratch.data();
    // All tokens in one append, and one token per append (as decoding does): the same scores.
    std::vector<float> scores(tokens), one_by_one(tokens);
    in.held_before = 0;
    in.held = tokens;
    lagkv.on_append_rows(in, scores.data());
    for (std::size_t t = 0; t < tokens; ++t) {
        in.held_before = t;
        in.held = t + 1;
        lagkv.on_append_rows(in, one_by_one.data());
    }
    EXPECT_EQ(scores, one_by_one);

    auto spread = [&](const std::vector<float>& x, std::size_t start) {
        std::vector<double> low(dim, 1e300), high(dim, -1e300), out(lag);
        for (std::size_t i = 0; i < lag; ++i)
            for (std::size_t d = 0; d < dim; ++d) {
                low[d] = std::min(low[d], double(x[(start + lag + i) * dim + d]));
                high[d] = std::max(high[d], double(x[(start + lag + i) * dim + d]));
            }
        double total = 0;
        for (std::size_t i = 0; i < lag; ++i) {
            std::vector<double> n(dim);
            double mean = 0;
            for (std::size_t d = 0; d < dim; ++d) mean += n[d] = (x[(start + i) * dim + d] - low[d]) / (high[d] - low[d]);
            mean /= dim;
            double squares = 0;
            for (double v : n) squares += (v - mean) * (v - mean);
            total += out[i] = std::exp(std::sqrt(squares / (dim - 1)));
        }
        for (double& v : out) v /= total;
        return out;
    };
    const std::size_t scored_chunks = (tokens - sinks) / lag - 1; // 3
    for (std::size_t c = 0; c < scored_chunks; ++c) {
        const std::size_t start = sinks + c * lag;
        const auto ks = spread(keys, start), vs = spread(values, start);
        std::vector<double> combined(lag);
        for (std::size_t i = 0; i < lag; ++i) combined[i] = 0.5 * (ks[i] + vs[i]);
        std::vector<std::size_t> order(lag);
        std::iota(order.begin(), order.end(), std::size_t{0});
        std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return combined[a] < combined[b]; });
        for (std::size_t r = 1; r < lag; ++r) // the data has no near-ties, so the order is unambiguous in float
            ASSERT_GT(combined[order[r]] - combined[order[r - 1]], 1e-6 * combined[order[r]]) << "chunk " << c;
        for (std::size_t r = 0; r < lag; ++r)
            EXPECT_EQ(scores[start + order[r]], float(r) / float(lag)) << "chunk " << c << ", rank " << r;
    }
    for (std::size_t t = 0; t < sinks; ++t) EXPECT_EQ(scores[t], 1.0f);
    for (std::size_t t = sinks + scored_chunks * lag; t < tokens; ++t) EXPECT_EQ(scores[t], 1.0f);
}

// ---------------------------------------------------------------- E12 leverage

// Keys in a 4-dimensional subspace plus faint noise; one key points along a
// direction no other key uses: its leverage is about 1, the highest.
std::vector<float> subspace_keys(std::size_t tokens, std::size_t dim, std::int32_t outlier, std::uint32_t seed) {
    const auto coefficients = random_floats(tokens * 4, seed);
    const auto noise = random_floats(tokens * dim, seed + 1, 1e-3f);
    std::vector<float> keys(tokens * dim);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < dim; ++i) keys[t * dim + i] = (i < 4 ? coefficients[t * 4 + i] : 0.0f) + noise[t * dim + i];
    set_row(keys, outlier, dim, axis(dim, dim - 3, 1.0f));
    return keys;
}

TEST(Leverage, TheKeyOutsideTheOthersSubspaceSurvivesWithAndWithoutASketch) {
    for (std::size_t dim : {64u, 16u}) { // 64 > sketch 48: sketched; 16: exact
        const std::size_t tokens = 300;
        const auto c = shape(1, 1, dim);
        const auto keys = subspace_keys(tokens, dim, 150, 9);
        evicting_cache<evict::leverage> cache(c, evict::leverage(evict::budget::absolute(13, 0, 0)));
        prefill_and_compress(cache, c, keys, keys, {}, tokens);
        const auto kept = kept_positions(cache);
        ASSERT_EQ(kept.size(), 13u);
        EXPECT_TRUE(has(kept, 150)) << dim;
        // The scorer itself protects Compactor's first 8 and last 4 tokens.
        for (std::int32_t p = 0; p < 8; ++p) EXPECT_TRUE(has(kept, p)) << p;
        for (std::int32_t p = tokens - 4; p < std::int32_t(tokens); ++p) EXPECT_TRUE(has(kept, p)) << p;
    }
}

TEST(Leverage, UnsketchedScoresAreTheZScoresOfExactLeverage) {
    const std::size_t dim = 12, tokens = 80;
    head_data d;
    d.keys = random_floats(tokens * dim, 10);
    for (std::size_t t = 0; t < tokens; ++t) d.positions.push_back(static_cast<std::int32_t>(t));
    score::leverage scorer;
    scorer.protect_first = scorer.protect_last = 0;
    std::vector<float> scores(tokens);
    scorer.score(d.inputs(dim, 1, 1.0f), scores.data());
    // Reference in double: centre, Gram, solve by Gauss-Jordan, leverage, z-score.
    std::vector<double> mean(dim, 0.0), x(tokens * dim), gram(dim * dim, 0.0), lev(tokens, 0.0);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < dim; ++i) mean[i] += d.keys[t * dim + i] / double(tokens);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < dim; ++i) x[t * dim + i] = d.keys[t * dim + i] - mean[i];
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < dim; ++i)
            for (std::size_t j = 0; j < dim; ++j) gram[i * dim + j] += x[t * dim + i] * x[t * dim + j];
    std::vector<double> inverse(dim * dim, 0.0);
    for (std::size_t i = 0; i < dim; ++i) inverse[i * dim + i] = 1.0;
    for (std::size_t col = 0; col < dim; ++col) {
        const double pivot = gram[col * dim + col];
        for (std::size_t j = 0; j < dim; ++j) gram[col * dim + j] /= pivot, inverse[col * dim + j] /= pivot;
        for (std::size_t row = 0; row < dim; ++row) {
            if (row == col) continue;
            const double f = gram[row * dim + col];
            for (std::size_t j = 0; j < dim; ++j) gram[row * dim + j] -= f * gram[col * dim + j], inverse[row * dim + j] -= f * inverse[col * dim + j];
        }
    }
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < dim; ++i)
            for (std::size_t j = 0; j < dim; ++j) lev[t] += x[t * dim + i] * inverse[i * dim + j] * x[t * dim + j];
    const double average = std::accumulate(lev.begin(), lev.end(), 0.0) / tokens;
    EXPECT_NEAR(average * tokens, double(dim), 1e-6); // leverage sums to the rank
    double var = 0;
    for (double l : lev) var += (l - average) * (l - average) / (tokens - 1);
    for (std::size_t t = 0; t < tokens; ++t) EXPECT_NEAR(scores[t], (lev[t] - average) / std::sqrt(var), 2e-3) << t;
}

// ---------------------------------------------------------------- E14 value_weighted

// A base scorer with known scores: the first channel of each key (only
// wrapped, so it declares what value_weighted reads of a base).
struct first_channel {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true;
    void score(const evict::head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.keys[t * in.dim];
    }
};

TEST(ValueWeighted, FirstStageByBaseScoreThenValueNormsDecideTheRest) {
    const std::size_t dim = 8, tokens = 100;
    const auto c = shape(1, 1, dim);
    auto keys = random_floats(tokens * dim, 11); // base scores of both signs: the shift is exercised
    auto values = random_floats(tokens * dim, 12);
    auto base = [&](std::size_t t) { return keys[t * dim]; };
    std::vector<std::size_t> by_base(tokens);
    std::iota(by_base.begin(), by_base.end(), 0);
    std::sort(by_base.begin(), by_base.end(), [&](std::size_t a, std::size_t b) { return base(a) > base(b); });
    const std::size_t best = by_base[0], a = by_base[10], b = by_base[80];
    for (std::size_t i = 0; i < dim; ++i) {
        values[best * dim + i] *= 1e-4f; // stage 1 ignores values: still kept
        values[a * dim + i] *= 1e-4f;    // high base score, but just outside stage 1 and a tiny value
        values[b * dim + i] *= 100.0f;   // low base score, huge value
    }
    using policy = evict::policy<score::value_weighted<first_channel>>;
    evicting_cache<policy> cache(c, policy(evict::budget::absolute(20, 0, 0)));
    prefill_and_compress(cache, c, keys, values, {}, tokens);
    const auto kept = kept_positions(cache);
    ASSERT_EQ(kept.size(), 20u);
    EXPECT_TRUE(has(kept, static_cast<std::int32_t>(best)));
    EXPECT_TRUE(has(kept, static_cast<std::int32_t>(b)));
    EXPECT_FALSE(has(kept, static_cast<std::int32_t>(a)));
    // The exact two-stage set: top 10 by base, then top 10 of the rest by (s - shift + eps) * ||v||_1.
    std::set<std::int32_t> expected;
    for (std::size_t i = 0; i < 10; ++i) expected.insert(static_cast<std::int32_t>(by_base[i]));
    double lowest = 1e300;
    for (std::size_t i = 10; i < tokens; ++i) lowest = std::min(lowest, double(base(by_base[i])));
    std::vector<std::pair<double, std::size_t>> second;
    for (std::size_t i = 10; i < tokens; ++i) {
        const std::size_t t = by_base[i];
        double l1 = 0;
        for (std::size_t j = 0; j < dim; ++j) l1 += std::fabs(values[t * dim + j]);
        second.push_back({(base(t) - std::min(lowest, 0.0) + 1e-4) * l1, t});
    }
    std::sort(second.rbegin(), second.rend());
    for (std::size_t i = 0; i < 10; ++i) expected.insert(static_cast<std::int32_t>(second[i].second));
    EXPECT_EQ(std::set<std::int32_t>(kept.begin(), kept.end()), expected);
}

TEST(ValueWeighted, ForwardsTheBaseScorersNeedsAndObservations) {
    using over_h2o = evict::value_weighted<score::h2o>;
    using over_snapkv = evict::value_weighted<>;
    static_assert(evicting_cache<over_h2o>::collects_attention_stats && !evicting_cache<over_h2o>::collects_queries);
    static_assert(evicting_cache<over_snapkv>::collects_queries && !evicting_cache<over_snapkv>::collects_attention_stats);
    static_assert(score::value_weighted<score::h2o>::needs_values && !score::value_weighted<score::h2o>::needs_keys);
    const auto c = shape(2, 4, 16);
    const std::size_t tokens = 160;
    const auto keys = random_floats(tokens * 2 * 16, 13), values = random_floats(tokens * 2 * 16, 14);
    const auto queries = random_floats(tokens * 4 * 16, 15);
    evicting_cache<over_h2o> cache(c, over_h2o(evict::budget::ratio(0.25)));
    prefill_and_compress(cache, c, keys, values, queries, tokens);
    for (std::size_t h = 0; h < 2; ++h) EXPECT_EQ(cache.tokens(0, h), 40u);
}

// ---------------------------------------------------------------- E15 hash_evict

TEST(HashEvict, TheKeyAlongTheQuerySurvivesAndItsNegationGoesFirst) {
    const std::size_t dim = 32, tokens = 200;
    const auto c = shape(1, 2, dim);
    auto keys = random_floats(tokens * dim, 16);
    const auto values = random_floats(tokens * dim, 17);
    auto queries = random_floats(tokens * 2 * dim, 18);
    const auto direction = random_floats(dim, 19);
    std::vector<float> along(dim), against(dim);
    for (std::size_t i = 0; i < dim; ++i) along[i] = 3.0f * direction[i], against[i] = -3.0f * direction[i];
    set_row(keys, 60, dim, along);
    set_row(keys, 90, dim, against);
    for (std::size_t g = 0; g < 2; ++g) set_row(queries, (tokens - 1) * 2 + g, dim, direction); // the newest query, both heads
    for (std::size_t budget : {13u, 100u}) {
        evicting_cache<evict::hash_evict> cache(c, evict::hash_evict(evict::budget::absolute(budget, 4, 8)));
        prefill_and_compress(cache, c, keys, values, queries, tokens);
        const auto kept = kept_positions(cache);
        ASSERT_EQ(kept.size(), budget);
        EXPECT_TRUE(has(kept, 60)) << budget;
        EXPECT_FALSE(has(kept, 90)) << budget;
    }
    // Scores directly: distance 0 for the aligned key, all 32 bits for its negation.
    head_data d;
    d.keys = keys;
    d.queries.assign(queries.end() - 2 * dim, queries.end());
    for (std::size_t t = 0; t < tokens; ++t) d.positions.push_back(static_cast<std::int32_t>(t));
    std::vector<float> scores(tokens);
    score::hash_evict{}.score(d.inputs(dim, 2, 1.0f), scores.data());
    EXPECT_EQ(scores[60], 0.0f);
    EXPECT_EQ(scores[90], -32.0f);
    EXPECT_EQ(*std::min_element(scores.begin(), scores.end()), -32.0f);
}

// ---------------------------------------------------------------- E16 global_local

// Token G draws the early queries' attention, token L the last 32 queries'.
TEST(GlobalLocal, LambdaMovesTheChoiceBetweenTheGlobalAndTheLocalFavourite) {
    const std::size_t dim = 16, tokens = 200;
    const auto c = shape(1, 1, dim);
    std::vector<float> keys(tokens * dim, 0.0f), queries(tokens * dim, 0.0f);
    const auto values = random_floats(tokens * dim, 20);
    const std::int32_t g = 30, l = 100;
    set_row(keys, g, dim, axis(dim, 0, 5.0f));
    set_row(keys, l, dim, axis(dim, 1, 5.0f));
    for (std::size_t i = 0; i < tokens; ++i) queries[i * dim + (i < tokens - 32 ? 0 : 1)] = 4.0f;
    for (float lambda : {1.0f, 0.0f, 0.5f}) {
        evict::global_local policy(evict::budget::absolute(13, 4, 8));
        policy.scorer.lambda = lambda;
        evicting_cache<evict::global_local> cache(c, policy);
        prefill_and_compress(cache, c, keys, values, queries, tokens);
        const auto kept = kept_positions(cache);
        ASSERT_EQ(kept.size(), 13u);
        if (lambda == 1.0f) {
            EXPECT_TRUE(has(kept, g) && !has(kept, l));
        } else if (lambda == 0.0f) {
            EXPECT_TRUE(has(kept, l) && !has(kept, g));
        } else {
            EXPECT_TRUE(has(kept, l) || has(kept, g));
        }
    }
}

// ---------------------------------------------------------------- E9 expected_attention

TEST(ExpectedAttention, ScoresMatchTheGaussianFormulaInDouble) {
    const std::size_t dim = 16, tokens = 90, group = 2, count = 20;
    head_data d;
    d.keys = random_floats(tokens * dim, 21);
    d.values = random_floats(tokens * dim, 22);
    d.queries = random_floats(count * group * dim, 23, 0.7f);
    for (std::size_t t = 0; t < tokens; ++t) d.positions.push_back(static_cast<std::int32_t>(t));
    const float scale = 0.25f;
    std::vector<float> scores(tokens);
    score::expected_attention{}.score(d.inputs(dim, group, scale), scores.data());
    std::vector<double> expected(tokens, 0.0);
    for (std::size_t g = 0; g < group; ++g) {
        std::vector<double> mu(dim, 0.0), cov(dim * dim, 0.0), logit(tokens);
        for (std::size_t q = 0; q < count; ++q)
            for (std::size_t i = 0; i < dim; ++i) mu[i] += d.queries[(q * group + g) * dim + i] / double(count);
        for (std::size_t q = 0; q < count; ++q)
            for (std::size_t i = 0; i < dim; ++i)
                for (std::size_t j = 0; j < dim; ++j)
                    cov[i * dim + j] += (d.queries[(q * group + g) * dim + i] - mu[i]) *
                                        (d.queries[(q * group + g) * dim + j] - mu[j]) / double(count);
        double max = -1e300, sum = 0;
        for (std::size_t t = 0; t < tokens; ++t) {
            const float* k = &d.keys[t * dim];
            double linear = 0, quadratic = 0;
            for (std::size_t i = 0; i < dim; ++i) {
                linear += mu[i] * k[i];
                for (std::size_t j = 0; j < dim; ++j) quadratic += k[i] * cov[i * dim + j] * k[j];
            }
            max = std::max(max, logit[t] = scale * linear + 0.5 * scale * scale * quadratic);
        }
        for (double& x : logit) sum += (x = std::exp(x - max));
        for (std::size_t t = 0; t < tokens; ++t) expected[t] += logit[t] / sum / double(group);
    }
    for (std::size_t t = 0; t < tokens; ++t) {
        double norm = 0;
        for (std::size_t i = 0; i < dim; ++i) norm += double(d.values[t * dim + i]) * d.values[t * dim + i];
        expected[t] *= std::sqrt(norm);
        EXPECT_NEAR(scores[t], expected[t], 1e-4 * expected[t] + 1e-9) << t;
    }
}

TEST(ExpectedAttention, KeepsTheKeyAlongTheMeanQueryAndTheOneAlongItsVariance) {
    // Queries: mean along axis 0; along axis 1 zero mean but large spread.
    // Key M (axis 0) wins by the mean term, key V (axis 1) by the covariance
    // term; key W (axis 2, where queries never vary) gets neither.
    const std::size_t dim = 16, tokens = 200;
    const auto c = shape(1, 1, dim);
    auto keys = random_floats(tokens * dim, 24, 0.05f);
    std::vector<float> values(tokens * dim, 0.0f);
    for (std::size_t t = 0; t < tokens; ++t) values[t * dim + t % dim] = 1.0f; // equal value norms
    auto queries = random_floats(tokens * dim, 25, 0.05f);
    for (std::size_t i = 0; i < tokens; ++i) {
        queries[i * dim + 0] += 1.0f;
        queries[i * dim + 1] += (i % 2 ? 6.0f : -6.0f);
    }
    set_row(keys, 50, dim, axis(dim, 0, 4.0f));
    set_row(keys, 70, dim, axis(dim, 1, 4.0f));
    set_row(keys, 90, dim, axis(dim, 2, 4.0f));
    evicting_cache<evict::expected_attention> cache(c, evict::expected_attention(evict::budget::absolute(14, 4, 8)));
    prefill_and_compress(cache, c, keys, values, queries, tokens);
    const auto kept = kept_positions(cache);
    EXPECT_TRUE(has(kept, 50));
    EXPECT_TRUE(has(kept, 70));
    EXPECT_FALSE(has(kept, 90));
}

// ---------------------------------------------------------------- every scorer: budgets, determinism, decode

template <class Policy>
void check_budget_and_determinism(Policy policy, const char* name) {
    SCOPED_TRACE(name);
    const auto c = shape(2, 4, 32);
    const std::size_t tokens = 400;
    const auto keys = random_floats(tokens * 2 * 32, 26), values = random_floats(tokens * 2 * 32, 27);
    const auto queries = random_floats(tokens * 4 * 32, 28);
    evicting_cache<Policy> a(c, policy), b(c, policy);
    prefill_and_compress(a, c, keys, values, queries, tokens);
    prefill_and_compress(b, c, keys, values, queries, tokens);
    for (std::size_t h = 0; h < 2; ++h) {
        const auto kept = kept_positions(a, h);
        EXPECT_EQ(kept.size(), 100u); // ceil(0.25 * 400), exactly
        EXPECT_TRUE(std::is_sorted(kept.begin(), kept.end()));
        for (std::int32_t p = 0; p < 4; ++p) EXPECT_TRUE(has(kept, p));
        for (std::int32_t p = tokens - 16; p < std::int32_t(tokens); ++p) EXPECT_TRUE(has(kept, p));
        EXPECT_EQ(kept, kept_positions(b, h)); // same input, same kept set
    }
    // Decode with a schedule: the cache returns to its target (here 64) every 16 tokens over it.
    Policy decoding = policy;
    decoding.keep = evict::budget::absolute(64, 4, 16);
    decoding.when = evict::schedule{true, 16};
    evicting_cache<Policy> d(c, decoding);
    std::vector<float> out(4 * 32);
    for (std::size_t t = 0; t < tokens; ++t) {
        d.append(0, token_major(keys.data() + t * 64, 1, 2, 32), token_major(values.data() + t * 64, 1, 2, 32),
                 static_cast<std::int64_t>(t));
        d.attend(0, queries.data() + t * 128, out.data());
        ASSERT_LE(d.tokens(0, 0), 64u + 16u) << t;
    }
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
}

TEST(EveryNewScorer, MeetsTheBudgetExactlyRepeatsItselfAndRunsInDecode) {
    check_budget_and_determinism(evict::scissorhands(evict::budget::ratio(0.25)), "scissorhands");
    evict::lagkv lag(evict::budget::ratio(0.25));
    lag.scorer.lag = 32;
    check_budget_and_determinism(lag, "lagkv");
    check_budget_and_determinism(evict::lagkv(evict::budget::ratio(0.25)), "lagkv (default lag 128)");
    check_budget_and_determinism(evict::leverage(evict::budget::ratio(0.25)), "leverage");
    check_budget_and_determinism(evict::value_weighted<>(evict::budget::ratio(0.25)), "value_weighted<snapkv>");
    check_budget_and_determinism(evict::value_weighted<score::knorm>(evict::budget::ratio(0.25)), "value_weighted<knorm>");
    check_budget_and_determinism(evict::hash_evict(evict::budget::ratio(0.25)), "hash_evict");
    check_budget_and_determinism(evict::global_local(evict::budget::ratio(0.25)), "global_local");
    check_budget_and_determinism(evict::expected_attention(evict::budget::ratio(0.25)), "expected_attention");
}

TEST(EveryNewScorer, CollectsOnlyWhatItNeeds) {
    static_assert(evicting_cache<evict::scissorhands>::collects_queries &&
                  !evicting_cache<evict::scissorhands>::collects_attention_stats);
    static_assert(evicting_cache<evict::global_local>::collects_queries &&
                  evicting_cache<evict::global_local>::collects_attention_stats);
    static_assert(evicting_cache<evict::hash_evict>::collects_queries && score::hash_evict::query_window == 1);
    static_assert(evicting_cache<evict::expected_attention>::collects_queries &&
                  !evicting_cache<evict::expected_attention>::collects_attention_stats);
    static_assert(!evicting_cache<evict::lagkv>::collects_queries && !evicting_cache<evict::lagkv>::collects_attention_stats);
    static_assert(!evicting_cache<evict::leverage>::collects_queries &&
                  !evicting_cache<evict::leverage>::collects_attention_stats);
    SUCCEED();
}

TEST(EveryNewScorer, BadParametersAreRejectedNamingTheParameter) {
    const auto c = shape(1, 1, 8);
    const auto budget = evict::budget::ratio(0.5);
    auto make = [&](auto policy) { return [c, policy] { evicting_cache<decltype(policy)> cache(c, policy); }; };
    evict::scissorhands s(budget);
    s.scorer.history = 0;
    expect_error(make(s), "history");
    s.scorer.history = 65;
    expect_error(make(s), "history");
    evict::lagkv l(budget);
    l.scorer.lag = 1;
    expect_error(make(l), "lag");
    evict::leverage v(budget);
    v.scorer.sketch = 0;
    expect_error(make(v), "sketch");
    v = evict::leverage(budget);
    v.scorer.jitter = 0.0;
    expect_error(make(v), "jitter");
    evict::value_weighted<> w(budget);
    w.scorer.first_stage = 1.5;
    expect_error(make(w), "first_stage");
    w = evict::value_weighted<>(budget);
    w.scorer.epsilon = -1.0f;
    expect_error(make(w), "epsilon");
    w = evict::value_weighted<>(budget);
    w.scorer.base.pool = 4; // the base scorer's own check runs too
    expect_error(make(w), "pooling");
    evict::hash_evict h(budget);
    h.scorer.bits = 0;
    expect_error(make(h), "bits");
    h.scorer.bits = 65;
    expect_error(make(h), "bits");
    evict::global_local g(budget);
    g.scorer.lambda = 1.5f;
    expect_error(make(g), "lambda");
    g = evict::global_local(budget);
    g.scorer.window = 33;
    expect_error(make(g), "window");
    evict::expected_attention e(budget);
    e.scorer.window = 0;
    expect_error(make(e), "window");
    e = evict::expected_attention(budget);
    e.scorer.epsilon = NAN;
    expect_error(make(e), "epsilon");
}

// ---------------------------------------------------------------- fidelity against random (E17)

// Per KV head: ordinary keys share a large bias b (norm 4) plus noise; 24
// needle keys point along a direction m instead (low norm). Queries look for
// m and away from b, so the needles draw most of the attention. Scorers that
// find the needles keep the attention output close to full attention; random
// keeps about `ratio` of them.
struct needle_data {
    static constexpr std::size_t tokens = 512, dim = 32, kv_heads = 2, query_heads = 4, probes = 16;
    kvc::cache_config c = shape(kv_heads, query_heads, dim);
    std::vector<float> keys, values, queries, probe_queries;
    needle_data() {
        std::vector<std::vector<float>> bias, match;
        for (std::size_t h = 0; h < kv_heads; ++h) {
            bias.push_back(unit(random_floats(dim, 100 + h)));
            match.push_back(unit(random_floats(dim, 200 + h)));
        }
        keys = random_floats(tokens * kv_heads * dim, 30, 0.5f);
        values = random_floats(tokens * kv_heads * dim, 31);
        for (std::size_t t = 0; t < tokens; ++t)
            for (std::size_t h = 0; h < kv_heads; ++h) {
                const bool needle = t >= 13 && (t - 13) % 21 == 0 && t < 13 + 24 * 21;
                for (std::size_t i = 0; i < dim; ++i) {
                    float& k = keys[(t * kv_heads + h) * dim + i];
                    k = needle ? 2.0f * match[h][i] + 0.6f * k : 4.0f * bias[h][i] + k;
                }
            }
        auto make_queries = [&](std::size_t count, std::uint32_t seed) {
            auto q = random_floats(count * query_heads * dim, seed, 0.5f);
            for (std::size_t i = 0; i < count; ++i)
                for (std::size_t j = 0; j < query_heads; ++j)
                    for (std::size_t d = 0; d < dim; ++d)
                        q[(i * query_heads + j) * dim + d] += 6.0f * match[j / 2][d] - 3.0f * bias[j / 2][d];
            return q;
        };
        queries = make_queries(tokens, 32);
        probe_queries = make_queries(probes, 33);
    }
    static std::vector<float> unit(std::vector<float> v) {
        double n = 0;
        for (float x : v) n += double(x) * x;
        for (float& x : v) x = static_cast<float>(x / std::sqrt(n));
        return v;
    }

    // ||out - out_full|| / ||out_full|| over the probe queries, after compressing to `ratio`.
    template <class Policy>
    double error(Policy policy) const {
        evicting_cache<Policy> cache(c, policy);
        full_cache full(c);
        prefill_and_compress(cache, c, keys, values, queries, tokens);
        full.append(0, token_major(keys.data(), tokens, kv_heads, dim), token_major(values.data(), tokens, kv_heads, dim), 0);
        double diff = 0, norm = 0;
        std::vector<float> a(query_heads * dim), b(query_heads * dim);
        for (std::size_t p = 0; p < probes; ++p) {
            cache.attend(0, probe_queries.data() + p * query_heads * dim, a.data());
            full.attend(0, probe_queries.data() + p * query_heads * dim, b.data());
            for (std::size_t i = 0; i < a.size(); ++i) diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), norm += double(b[i]) * b[i];
        }
        return std::sqrt(diff / norm);
    }
};

template <class Policy>
Policy at(double ratio, Policy policy = Policy()) {
    policy.keep = evict::budget::ratio(ratio);
    return policy;
}

TEST(Fidelity, AtKeepRatioQuarterKnormSnapKVH2OAndExpectedAttentionBeatRandom) {
    const needle_data data;
    struct row {
        const char* name;
        double error[3];
    };
    std::vector<row> table;
    const double ratios[3] = {0.5, 0.25, 0.125};
    auto measure = [&](const char* name, auto make) {
        row r{name, {}};
        for (int i = 0; i < 3; ++i) r.error[i] = data.error(make(ratios[i]));
        table.push_back(r);
        return r.error[1];
    };
    const double random = measure("random (E17)", [](double r) { return at<evict::random>(r); });
    const double knorm = measure("knorm (E7)", [](double r) { return at<evict::knorm>(r); });
    const double snapkv = measure("snapkv (E5)", [](double r) { return at<evict::snapkv>(r); });
    const double h2o = measure("h2o (E2)", [](double r) { return at<evict::h2o>(r); });
    const double expected = measure("expected_attention (E9)", [](double r) { return at<evict::expected_attention>(r); });
    measure("streaming (E1)", [](double r) { return at<evict::streaming>(r); });
    measure("keydiff (E8)", [](double r) { return at<evict::keydiff>(r); });
    measure("tova (E6)", [](double r) { return at<evict::tova>(r); });
    measure("scissorhands (E4)", [](double r) { return at<evict::scissorhands>(r); });
    measure("lagkv lag 32 (E11)", [](double r) {
        evict::lagkv p = at<evict::lagkv>(r);
        p.scorer.lag = 32;
        return p;
    });
    measure("leverage (E12)", [](double r) { return at<evict::leverage>(r); });
    measure("value_weighted<snapkv> (E14)", [](double r) { return at<evict::value_weighted<>>(r); });
    measure("hash_evict (E15)", [](double r) { return at<evict::hash_evict>(r); });
    measure("global_local (E16)", [](double r) { return at<evict::global_local>(r); });
    std::printf("attention-output relative error vs full attention (512 tokens, 24 needles, 16 probe queries)\n");
    std::printf("%-30s %10s %10s %10s\n", "scorer", "keep 0.5", "keep 0.25", "keep 0.125");
    for (const row& r : table) std::printf("%-30s %10.4f %10.4f %10.4f\n", r.name, r.error[0], r.error[1], r.error[2]);
    EXPECT_LT(knorm, random);
    EXPECT_LT(snapkv, random);
    EXPECT_LT(h2o, random);
    EXPECT_LT(expected, random);
}

} // namespace
