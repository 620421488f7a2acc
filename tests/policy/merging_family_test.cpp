// The merging family beyond M5 (M4 zero_merge, M2 similarity, M1 CaM), each through
// the host's merge stage and checked against what it promises with double-
// precision oracles built from the engine's rows, never from what the cache
// stored: a simulation of the method in double follows every compression the
// cache makes (it reads only which positions the eviction kept).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/streaming.hpp"
#include "kvc/policy/merging/cam.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/merging/similarity.hpp"
#include "kvc/policy/merging/zero_merge.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;
namespace merge = kvc::merge;

template <class Eviction, class Merging>
using cache_of = kvc::compressed_cache<Eviction, Merging, kvc::quant::none<float>, kvc::project::none>;

constexpr std::size_t sinks = 4, window = 8, budget_tokens = 12, every = 3;

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
std::size_t row_floats() { return shape().kv_heads * shape().head_dim; }

evict::streaming streaming(std::size_t interval = 0) {
    return evict::streaming(evict::budget::absolute(budget_tokens, sinks, window), evict::schedule{true, interval});
}
evict::h2o h2o(std::size_t interval = 0) {
    return evict::h2o(evict::budget::absolute(budget_tokens, sinks, window), evict::schedule{true, interval});
}

template <class Cache>
void append_rows(Cache& cache, const std::vector<float>& keys, const std::vector<float>& values, std::size_t first,
                 std::size_t count) {
    const kvc::cache_config c = cache.config();
    cache.append(0, token_major(keys.data() + first * row_floats(), count, c.kv_heads, c.head_dim),
                 token_major(values.data() + first * row_floats(), count, c.kv_heads, c.head_dim),
                 static_cast<std::int64_t>(first));
}

template <class Cache>
std::vector<float> attend(Cache& cache, const float* queries) {
    std::vector<float> out(cache.config().query_heads * cache.config().head_dim);
    cache.attend(0, queries, out.data());
    return out;
}

// ---------------------------------------------------------------------------
// The methods in double: one head's held tokens, each with its key, value and
// count, merged as the method says whenever the cache drops tokens.
// ---------------------------------------------------------------------------

using row = std::vector<double>;
struct sim_token {
    std::int32_t position;
    row key, value;
    double count;
    double attention = 0.0; // the attention mass it has drawn (CaM's A)
};
double dot(const row& a, const row& b) {
    double s = 0.0;
    for (std::size_t d = 0; d < a.size(); ++d) s += a[d] * b[d];
    return s;
}
double norm(const row& a) { return std::sqrt(dot(a, a)); }

enum class method { zero_merge, similarity, cam };
struct simulated {
    method m;
    double threshold = 0.0;  // similarity
    std::size_t window = 32; // cam
};
// What the run exercised, so a test can insist its cases happened.
struct events {
    std::size_t merged = 0;              // dropped tokens that joined a kept one
    std::size_t below_threshold = 0;     // dropped tokens too dissimilar to join (similarity)
    std::size_t counted_slot_dropped = 0; // a slot with count > 1 dropped into another
    std::size_t counted_slot_joined = 0;  // a slot with count > 1 kept and joined again
    std::size_t partial = 0;              // cam: a dropped value handed on with p < 1
    std::size_t short_window = 0;         // cam: fewer than m kept tokens followed it
};

// CaM in double: each dropped value, times p = min(1, A_e / mean A of the next
// `window` kept tokens), split over them.
void simulate_cam(std::size_t window, std::vector<sim_token>& kept, const std::vector<sim_token>& dropped,
                  events& seen) {
    std::vector<row> additions(kept.size(), row(kept.front().value.size(), 0.0));
    for (const sim_token& e : dropped) {
        std::size_t first = 0;
        while (first < kept.size() && kept[first].position < e.position) ++first;
        const std::size_t n = std::min(window, kept.size() - first);
        if (n == 0) continue;
        if (n < window) ++seen.short_window;
        double mean = 0.0;
        for (std::size_t j = first; j < first + n; ++j) mean += kept[j].attention / double(n);
        const double p = mean > 0.0 ? std::min(1.0, e.attention / mean) : 1.0;
        ++seen.merged;
        if (p < 1.0) ++seen.partial;
        for (std::size_t j = first; j < first + n; ++j)
            for (std::size_t d = 0; d < e.value.size(); ++d) additions[j][d] += p / double(n) * e.value[d];
    }
    for (std::size_t j = 0; j < kept.size(); ++j)
        for (std::size_t d = 0; d < additions[j].size(); ++d) kept[j].value[d] += additions[j][d];
}

// Merges what the cache dropped (every simulated token whose position it no
// longer holds) into what it kept, as `m` does.
void simulate_merge(const simulated& how, std::vector<sim_token>& held, const std::set<std::int32_t>& kept_positions,
                    events& seen) {
    const method m = how.m;
    const double threshold = how.threshold;
    std::vector<sim_token> kept, dropped;
    for (sim_token& t : held) (kept_positions.count(t.position) ? kept : dropped).push_back(t);
    if (m == method::cam) {
        simulate_cam(how.window, kept, dropped, seen);
        held = kept;
        return;
    }
    const std::size_t dim = held.front().key.size();
    std::vector<row> key_sums(kept.size(), row(dim, 0.0)), value_sums(kept.size(), row(dim, 0.0));
    std::vector<double> weights(kept.size(), 0.0);
    for (const sim_token& e : dropped) {
        std::size_t best = kept.size();
        double best_similarity = -INFINITY;
        for (std::size_t i = 0; i < kept.size(); ++i) {
            const double s = dot(e.key, kept[i].key) / (norm(e.key) * norm(kept[i].key));
            if (s > best_similarity) best = i, best_similarity = s;
        }
        if (best == kept.size()) continue;
        double weight = e.count;
        if (m == method::similarity) {
            if (best_similarity <= 0.0 || best_similarity < threshold) {
                ++seen.below_threshold;
                continue;
            }
            weight = best_similarity * norm(e.value) / (norm(e.value) + norm(kept[best].value));
        }
        ++seen.merged;
        if (e.count > 1.5) ++seen.counted_slot_dropped;
        if (kept[best].count > 1.5 && weights[best] == 0.0) ++seen.counted_slot_joined;
        for (std::size_t d = 0; d < dim; ++d) {
            key_sums[best][d] += weight * e.key[d];
            value_sums[best][d] += weight * e.value[d];
        }
        weights[best] += weight;
    }
    for (std::size_t i = 0; i < kept.size(); ++i) {
        if (weights[i] == 0.0) continue;
        sim_token& t = kept[i];
        if (m == method::zero_merge) {
            const double count = t.count + weights[i];
            for (std::size_t d = 0; d < dim; ++d) {
                t.key[d] = (t.count * t.key[d] + key_sums[i][d]) / count;
                t.value[d] = (t.count * t.value[d] + value_sums[i][d]) / count;
            }
            t.count = count;
        } else {
            for (std::size_t d = 0; d < dim; ++d) t.value[d] = (t.value[d] + value_sums[i][d]) / (1.0 + weights[i]);
        }
    }
    held = kept;
}

// One query's attention weights in double over the first `tokens` of a
// simulated head, each token's logit raised by log(count).
std::vector<double> weights(const kvc::cache_config& c, const std::vector<sim_token>& head, const float* query,
                            std::size_t tokens) {
    const row q(query, query + c.head_dim);
    std::vector<double> logits(tokens);
    double max = -INFINITY, sum = 0.0;
    for (std::size_t t = 0; t < tokens; ++t) {
        logits[t] = dot(q, head[t].key) * c.logit_scale() + std::log(head[t].count);
        max = std::max(max, logits[t]);
    }
    for (double& l : logits) sum += (l = std::exp(l - max));
    for (double& l : logits) l /= sum;
    return logits;
}

// Decode attention in double over the simulated heads; each token's drawn
// attention grows by its weight for every query of its group.
std::vector<double> oracle(const kvc::cache_config& c, std::vector<std::vector<sim_token>>& heads, const float* queries) {
    const std::size_t dim = c.head_dim;
    std::vector<double> out(c.query_heads * dim, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        std::vector<sim_token>& head = heads[j / c.group()];
        const std::vector<double> p = weights(c, head, queries + j * dim, head.size());
        for (std::size_t t = 0; t < head.size(); ++t) {
            head[t].attention += p[t];
            for (std::size_t d = 0; d < dim; ++d) out[j * dim + d] += p[t] * head[t].value[d];
        }
    }
    return out;
}

// One head's stored rows, decoded.
template <class Cache>
void decoded(const Cache& cache, std::size_t h, std::vector<float>& keys, std::vector<float>& values) {
    const std::size_t n = cache.tokens(0, h), dim = cache.config().head_dim;
    keys.resize(n * dim);
    values.resize(n * dim);
    cache.head(0, h).decode_keys(kvc::kernels::active(), 0, n, keys.data());
    cache.head(0, h).decode_values(kvc::kernels::active(), 0, n, values.data());
}

// Prompt, compression after it, then decode with a compression every `every`
// tokens; after every step each head matches the simulation: positions,
// rows, counts (zero_merge) and attention output.
template <class Merging, class Eviction>
void check_through_decode(Eviction eviction, Merging merging, const simulated& how, std::uint32_t seed, events& seen) {
    const method m = how.m;
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, steps = 30, total = prompt + steps, row_size = row_floats(), dim = c.head_dim;
    const auto keys = random_floats(total * row_size, seed), values = random_floats(total * row_size, seed + 1);
    const auto queries = random_floats(total * c.query_heads * dim, seed + 2);
    cache_of<Eviction, Merging> cache(c, eviction, merging);
    append_rows(cache, keys, values, 0, prompt);
    std::vector<float> chunk_out(prompt * c.query_heads * dim);
    cache.attend_chunk(0, queries.data(), prompt, chunk_out.data());
    std::vector<std::vector<sim_token>> heads(c.kv_heads);
    auto engine_row = [&](const std::vector<float>& rows, std::size_t t, std::size_t h) {
        return row(rows.begin() + (t * c.kv_heads + h) * dim, rows.begin() + (t * c.kv_heads + h + 1) * dim);
    };
    for (std::size_t h = 0; h < c.kv_heads; ++h)
        for (std::size_t t = 0; t < prompt; ++t)
            heads[h].push_back({static_cast<std::int32_t>(t), engine_row(keys, t, h), engine_row(values, t, h), 1.0});
    // The prompt's causal attention: query i sees tokens 0..i.
    for (std::size_t i = 0; i < prompt; ++i)
        for (std::size_t j = 0; j < c.query_heads; ++j) {
            std::vector<sim_token>& head = heads[j / c.group()];
            const std::vector<double> p = weights(c, head, queries.data() + (i * c.query_heads + j) * dim, i + 1);
            for (std::size_t t = 0; t <= i; ++t) head[t].attention += p[t];
        }
    std::size_t compressions = 0;
    for (std::size_t t = prompt; t < total; ++t) {
        SCOPED_TRACE(t);
        append_rows(cache, keys, values, t, 1);
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const std::int32_t* positions = cache.positions(0, h);
            const std::set<std::int32_t> held(positions, positions + cache.tokens(0, h));
            if (held.size() < heads[h].size() + 1) { // the append compressed first
                ++compressions;
                // The budget exactly (merged slots are kept tokens): after the
                // prompt all of it, at decode all of it but the arriving token.
                ASSERT_EQ(held.size() - 1, t == prompt ? budget_tokens : budget_tokens - 1);
                simulate_merge(how, heads[h], held, seen);
            }
            heads[h].push_back({static_cast<std::int32_t>(t), engine_row(keys, t, h), engine_row(values, t, h), 1.0});
            ASSERT_EQ(cache.tokens(0, h), heads[h].size());
            std::vector<float> stored_keys, stored_values;
            decoded(cache, h, stored_keys, stored_values);
            row want_keys, want_values;
            double counted = 0.0;
            for (std::size_t i = 0; i < heads[h].size(); ++i) {
                const sim_token& token = heads[h][i];
                ASSERT_EQ(positions[i], token.position);
                want_keys.insert(want_keys.end(), token.key.begin(), token.key.end());
                want_values.insert(want_values.end(), token.value.begin(), token.value.end());
                if constexpr (cache_of<Eviction, Merging>::columns_type::template has<kvc::attention_bias_column>) {
                    const float count = std::exp(cache.template column<kvc::attention_bias_column>(0, h)[i]);
                    EXPECT_NEAR(count, token.count, 1e-5 * token.count) << "token " << i;
                    counted += count;
                }
            }
            if (m == method::zero_merge) {
                EXPECT_NEAR(counted, double(t + 1), 1e-3) << "counts add up to the tokens seen";
            }
            EXPECT_LT(kvc_test::relative_error(stored_keys, want_keys), 1e-6);
            if (m != method::zero_merge) { // keys untouched: bit for bit the engine's rows
                for (std::size_t i = 0; i < stored_keys.size(); ++i)
                    ASSERT_EQ(stored_keys[i], static_cast<float>(want_keys[i])) << "element " << i;
            }
            EXPECT_LT(kvc_test::relative_error(stored_values, want_values), 1e-6);
        }
        const float* q = queries.data() + t * c.query_heads * dim;
        EXPECT_LT(kvc_test::relative_error(attend(cache, q), oracle(c, heads, q)), 1e-5);
    }
    // Per head: after the prompt, then whenever a head is more than `every` over its budget.
    EXPECT_GE(compressions, c.kv_heads * (1 + (steps - 1) / (every + 1))) << "decode-time compressions ran";
}

// ---------------------------------------------------------------------------
// M4 zero_merge
// ---------------------------------------------------------------------------

// Tokens identical to the kept token they join lose nothing: n copies of a
// key and value attend exactly as one slot with logit + log(n). The same
// eviction without the counts (merge::none, or M2 which blends values only)
// changes the output, so the comparison can fail.
TEST(ZeroMerge, TokensIdenticalToTheirSlotLoseNothing) {
    const kvc::cache_config c = shape();
    const std::size_t prompt = 40, row_size = row_floats();
    auto keys = random_floats(prompt * row_size, 1), values = random_floats(prompt * row_size, 2);
    // Every token streaming drops (sinks .. prompt - window - 1) copies one of the window's.
    for (std::size_t t = sinks; t < prompt - window; ++t) {
        const std::size_t original = prompt - window + (t * 5) % window;
        std::copy_n(keys.begin() + original * row_size, row_size, keys.begin() + t * row_size);
        std::copy_n(values.begin() + original * row_size, row_size, values.begin() + t * row_size);
    }
    kvc::full_cache full(c);
    full.append(0, token_major(keys.data(), prompt, c.kv_heads, c.head_dim),
                token_major(values.data(), prompt, c.kv_heads, c.head_dim), 0);
    cache_of<evict::streaming, merge::zero_merge> merged(c, streaming());
    cache_of<evict::streaming, merge::none> dropped(c, streaming());
    cache_of<evict::streaming, merge::similarity> blended(c, streaming());
    append_rows(merged, keys, values, 0, prompt);
    append_rows(dropped, keys, values, 0, prompt);
    append_rows(blended, keys, values, 0, prompt);
    merged.compress();
    dropped.compress();
    blended.compress();
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        EXPECT_EQ(merged.tokens(0, h), budget_tokens) << "no slot beyond the budget";
        const float* bias = merged.column<kvc::attention_bias_column>(0, h);
        double counted = 0.0;
        for (std::size_t i = 0; i < budget_tokens; ++i) counted += std::exp(bias[i]);
        EXPECT_NEAR(counted, double(prompt), 1e-3);
    }
    const auto queries = random_floats(c.query_heads * c.head_dim, 3);
    std::vector<float> expected(queries.size());
    full.attend(0, queries.data(), expected.data());
    EXPECT_LT(kvc_test::relative_error(attend(merged, queries.data()), expected), 1e-6);
    EXPECT_GT(kvc_test::relative_error(attend(dropped, queries.data()), expected), 1e-2);
    EXPECT_GT(kvc_test::relative_error(attend(blended, queries.data()), expected), 1e-2);
}

// On random rows through a prompt compression and decode-time compressions:
// every slot is the count-weighted mean of what joined it, its count carried
// through later merges whether the slot is kept (and joined again) or dropped
// (and joins another with its count); attention matches the double oracle.
TEST(ZeroMerge, CountsSurviveLaterMergesStreaming) {
    events seen;
    check_through_decode(streaming(every), merge::zero_merge{}, {method::zero_merge}, 10, seen);
    EXPECT_GT(seen.counted_slot_dropped, 0u);
    EXPECT_GT(seen.counted_slot_joined, 0u);
}
TEST(ZeroMerge, CountsSurviveLaterMergesH2O) {
    events seen;
    check_through_decode(h2o(every), merge::zero_merge{}, {method::zero_merge}, 20, seen);
    EXPECT_GT(seen.counted_slot_dropped, 0u);
    EXPECT_GT(seen.counted_slot_joined, 0u);
}

// ---------------------------------------------------------------------------
// M2 similarity
// ---------------------------------------------------------------------------

// Values follow the D2O / KVMerger blend in double, tokens below the
// threshold are dropped, and no stored key ever changes: after every step each
// held key is bit for bit the engine's row at its position.
template <class Eviction>
void check_similarity(Eviction eviction, std::uint32_t seed) {
    events seen;
    check_through_decode(eviction, merge::similarity(0.2f), {method::similarity, 0.2}, seed, seen);
    EXPECT_GT(seen.merged, 0u);
    EXPECT_GT(seen.below_threshold, 0u);
}
TEST(Similarity, BlendsValuesAsTheOracleStreaming) { check_similarity(streaming(every), 30); }
TEST(Similarity, BlendsValuesAsTheOracleH2O) { check_similarity(h2o(every), 40); }

// Under h2o with a decode-time schedule and every positively similar token
// merged: after every step each held key is the engine's row at its position
// as the codec stores it (fp32, and fp16 as the engine's none:f16 cache),
// compared exactly, while values did change.
template <class Element>
void check_keys_never_change() {
    kvc::cache_config c = shape();
    c.storage = kvc::dtype_of_v<Element>;
    const std::size_t prompt = 40, total = 70, row_size = row_floats();
    const auto keys = random_floats(total * row_size, 50), values = random_floats(total * row_size, 51);
    kvc::compressed_cache<evict::h2o, merge::similarity, kvc::quant::none<Element>, kvc::project::none> cache(
        c, h2o(every), merge::similarity(-1.0f));
    append_rows(cache, keys, values, 0, prompt);
    std::vector<float> chunk_out(prompt * c.query_heads * c.head_dim);
    const auto queries = random_floats(total * c.query_heads * c.head_dim, 52);
    cache.attend_chunk(0, queries.data(), prompt, chunk_out.data());
    std::size_t values_changed = 0;
    for (std::size_t t = prompt; t < total; ++t) {
        append_rows(cache, keys, values, t, 1);
        attend(cache, queries.data() + t * c.query_heads * c.head_dim);
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            std::vector<float> stored_keys, stored_values;
            decoded(cache, h, stored_keys, stored_values);
            for (std::size_t i = 0; i < cache.tokens(0, h); ++i) {
                const std::size_t at = (static_cast<std::size_t>(cache.positions(0, h)[i]) * c.kv_heads + h) * c.head_dim;
                for (std::size_t d = 0; d < c.head_dim; ++d) {
                    ASSERT_EQ(stored_keys[i * c.head_dim + d],
                              static_cast<float>(kvc_test::stored_value(keys[at + d], c.storage)))
                        << "step " << t << " head " << h << " token " << i;
                    values_changed += stored_values[i * c.head_dim + d] !=
                                      static_cast<float>(kvc_test::stored_value(values[at + d], c.storage));
                }
            }
        }
    }
    EXPECT_GT(values_changed, 0u) << "the merges did rewrite rows";
}
TEST(Similarity, NeverChangesAStoredKey) {
    check_keys_never_change<float>();
    check_keys_never_change<kvc::half>();
}

// A threshold outside [-1, 1] (or NaN) is refused before the cache holds anything.
TEST(Similarity, ThresholdOutsideACosineThrows) {
    const kvc::cache_config c = shape();
    for (float bad : {1.01f, -1.5f, NAN}) {
        const std::string message = kvc_test::error_of(
            [&] { cache_of<evict::streaming, merge::similarity> cache(c, streaming(), merge::similarity(bad)); });
        EXPECT_NE(message.find("expected a similarity threshold in [-1, 1]"), std::string::npos) << message;
    }
    for (float good : {-1.0f, 0.0f, 1.0f})
        EXPECT_NO_THROW((cache_of<evict::streaming, merge::similarity>(c, streaming(), merge::similarity(good))));
}

// ---------------------------------------------------------------------------
// M1 CaM
// ---------------------------------------------------------------------------

// Values follow CaM in double (its attention statistic replayed from the
// queries), with a window shorter than the kept tokens (m = 4) and one longer
// (the default 32: every dropped value reaches all kept tokens after it);
// keys never change.
template <class Eviction>
void check_cam(Eviction eviction, std::size_t window, std::uint32_t seed) {
    events seen;
    check_through_decode(eviction, merge::cam(window), {method::cam, 0.0, window}, seed, seen);
    EXPECT_GT(seen.merged, 0u);
    EXPECT_GT(seen.partial, 0u) << "some dropped token drew less attention than its successors";
    EXPECT_LT(seen.partial, seen.merged) << "some drew more (p clamped to 1)";
    if (window >= budget_tokens) {
        EXPECT_EQ(seen.short_window, seen.merged) << "fewer than m kept tokens follow any dropped one";
    } else {
        EXPECT_EQ(seen.short_window, 0u) << "the recent window alone holds m kept successors";
    }
}
TEST(Cam, SpreadsValuesAsTheOracleStreaming) { check_cam(streaming(every), 4, 70); }
TEST(Cam, SpreadsValuesAsTheOracleH2O) { check_cam(h2o(every), 4, 80); }
TEST(Cam, SpreadsValuesAsTheOracleWholeWindow) { check_cam(h2o(every), 32, 90); }

TEST(Cam, WindowZeroThrows) {
    const std::string message = kvc_test::error_of(
        [&] { cache_of<evict::streaming, merge::cam> cache(shape(), streaming(), merge::cam(0)); });
    EXPECT_NE(message.find("expected a merge window m >= 1"), std::string::npos) << message;
    EXPECT_NO_THROW((cache_of<evict::streaming, merge::cam>(shape(), streaming(), merge::cam(1))));
}

// ---------------------------------------------------------------------------
// All
// ---------------------------------------------------------------------------

// bytes() is what the resource handed out; zero_merge and cam cost their
// column (4 bytes per held token) over plain eviction, similarity nothing.
TEST(MergingFamily, BytesAreTheLayoutsAndTheResources) {
    kvc_test::counting_resource zero_memory, similarity_memory, cam_memory, none_memory;
    const std::size_t prompt = 40, row_size = row_floats();
    const auto keys = random_floats(prompt * row_size, 60), values = random_floats(prompt * row_size, 61);
    cache_of<evict::streaming, merge::zero_merge> zero(shape(&zero_memory), streaming());
    cache_of<evict::streaming, merge::similarity> similar(shape(&similarity_memory), streaming());
    cache_of<evict::streaming, merge::cam> spread(shape(&cam_memory), streaming());
    cache_of<evict::streaming, merge::none> plain(shape(&none_memory), streaming());
    const std::size_t zero_empty = zero.bytes(), similar_empty = similar.bytes(), spread_empty = spread.bytes(),
                      plain_empty = plain.bytes();
    append_rows(zero, keys, values, 0, prompt);
    append_rows(similar, keys, values, 0, prompt);
    append_rows(spread, keys, values, 0, prompt);
    append_rows(plain, keys, values, 0, prompt);
    zero.compress();
    similar.compress();
    spread.compress();
    plain.compress();
    EXPECT_EQ(zero.bytes(), zero_memory.in_use);
    EXPECT_EQ(similar.bytes(), similarity_memory.in_use);
    EXPECT_EQ(spread.bytes(), cam_memory.in_use);
    EXPECT_EQ(plain.bytes(), none_memory.in_use);
    const kvc::cache_config c = shape();
    EXPECT_EQ((zero.bytes() - zero_empty) - (plain.bytes() - plain_empty), c.kv_heads * budget_tokens * sizeof(float));
    EXPECT_EQ(similar.bytes() - similar_empty, plain.bytes() - plain_empty);
    EXPECT_EQ((spread.bytes() - spread_empty) - (plain.bytes() - plain_empty), c.kv_heads * budget_tokens * sizeof(float));
}

// The strong guarantee with each merger: an allocation failure at any point
// of a compression that merges into earlier merges leaves every head, its
// columns and its attention as they were, and the same compression then succeeds.
template <class Merging>
void check_failed_compress_changes_nothing() {
    kvc_test::counting_resource memory;
    const kvc::cache_config c = shape(&memory);
    const std::size_t prompt = 40, row_size = row_floats();
    const auto keys = random_floats(prompt * row_size, 100), values = random_floats(prompt * row_size, 101);
    const auto queries = random_floats(c.query_heads * c.head_dim, 102);
    cache_of<evict::streaming, Merging> cache(c, streaming());
    append_rows(cache, keys, values, 0, 30);
    attend(cache, queries.data());
    cache.compress(); // merged rows exist: the next compression merges into (and drops) them
    append_rows(cache, keys, values, 30, 10);
    const std::vector<float> before = attend(cache, queries.data());
    std::vector<float> keys_before, values_before;
    decoded(cache, 0, keys_before, values_before);
    const std::size_t held = cache.tokens(0, 0);
    bool compressed = false;
    const std::size_t failures = kvc_test::compress_through_failures(cache, memory, [&](std::size_t allowed) {
        ASSERT_EQ(cache.tokens(0, 0), held);
        ASSERT_EQ(cache.bytes(), memory.in_use);
        std::vector<float> keys_after, values_after;
        decoded(cache, 0, keys_after, values_after);
        ASSERT_EQ(keys_after, keys_before) << allowed;
        ASSERT_EQ(values_after, values_before) << allowed;
        const std::vector<float> now = attend(cache, queries.data()); // rows, bias (counts) and all
        ASSERT_EQ(std::memcmp(before.data(), now.data(), before.size() * sizeof(float)), 0) << allowed;
    }, compressed);
    EXPECT_TRUE(compressed);
    EXPECT_GE(failures, 3u) << "the fold, the compaction and the columns each allocate";
    EXPECT_EQ(cache.tokens(0, 0), budget_tokens);
    const std::vector<float> after = attend(cache, queries.data());
    EXPECT_NE(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)), 0) << "the compression ran";
}
TEST(MergingFamily, FailedCompressLeavesTheCacheAsItWas) {
    check_failed_compress_changes_nothing<merge::zero_merge>();
    check_failed_compress_changes_nothing<merge::similarity>();
    check_failed_compress_changes_nothing<merge::cam>();
}

} // namespace
