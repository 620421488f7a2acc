// Q6 mixed precision by importance (kvc::quant::mixed) inside compressed_cache:
// the split follows any scores (plain arrays and an eviction scorer's output),
// high tokens hold exactly the high format's values and low tokens the low
// format's (of the high values they had), bytes() follows the formula after an
// assignment and matches a counting resource, attention (with per-token
// statistics, so logits go through the token map) matches a double oracle over
// the stored values on every instruction set, the error lies between all-low
// and all-high, and bad scores throw with the head unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

namespace q = kvc::quant;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kvc::kernels::quant_format;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;
using kvc_test::shape;
using kvc_test::stored;
using kvc_test::stored_rows;
using codec = q::mixed<q::int8_sym, q::int2_asym, 32>;
using mixed_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, codec, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<codec>);

// A row through a format, as the scalar reference quantizes and dequantizes it.
std::vector<float> through(quant_format f, const float* x, std::size_t dim) {
    const auto& k = kvc::kernels::reference_table().quant;
    std::vector<unsigned char> packed(dim / 32 * kvc::kernels::info_of(f).group_bytes(32));
    k.quantize_row[kvc::kernels::index_of(f)][kvc::kernels::index_of(kvc::dtype::f32)](x, packed.data(), dim, 32);
    std::vector<float> out(dim);
    k.dequantize_row[kvc::kernels::index_of(f)](packed.data(), out.data(), dim, 32);
    return out;
}

// Tokens [0, n) ranked as the codec documents: score descending, ties to the later token.
std::vector<bool> top_by_score(const std::vector<float>& scores, std::size_t count) {
    std::vector<std::size_t> order(scores.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return scores[a] != scores[b] ? scores[a] > scores[b] : a > b;
    });
    std::vector<bool> high(scores.size(), false);
    for (std::size_t i = 0; i < count; ++i) high[order[i]] = true;
    return high;
}

// ---------------------------------------------------------------------------

TEST(MixedCodec, PlainScoresSplitTokensAndRowsDecodeAsTheirFormats) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 2, 64);
    c.resource = &counter;
    const std::size_t tokens = 50, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 91), values = random_floats(tokens * row, 92);
    mixed_cache cache(c, {}, {}, codec(0.3));
    cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    // Key + value rows of 64 elements: int8_sym 2 groups x 34 B each, int2_asym 2 x 12 B.
    const std::size_t high_row = 2 * 68, low_row = 2 * 24;
    EXPECT_EQ(cache.head(0, 0).high_token_bytes(), high_row);
    EXPECT_EQ(cache.head(0, 0).low_token_bytes(), low_row);

    // Head 0: scores that put the high tokens anywhere, with ties; head 1: reversed.
    std::vector<std::vector<float>> scores(2, std::vector<float>(tokens));
    for (std::size_t t = 0; t < tokens; ++t) {
        scores[0][t] = static_cast<float>((t * 37) % 17); // many ties
        scores[1][t] = -static_cast<float>(t);
    }
    const std::size_t before_bytes = cache.bytes();
    for (std::size_t h = 0; h < 2; ++h) cache.assign_precision(0, h, scores[h].data());
    const std::size_t high_count = 15; // ceil(0.3 * 50)
    for (std::size_t h = 0; h < 2; ++h) {
        SCOPED_TRACE("head " + std::to_string(h));
        const auto& head = cache.head(0, h);
        const std::vector<bool> want_high = top_by_score(scores[h], high_count);
        ASSERT_EQ(head.high_tokens(), high_count);
        ASSERT_EQ(head.low_tokens(), tokens - high_count);
        const stored_rows s = stored(cache, 0, h);
        for (std::size_t t = 0; t < tokens; ++t) {
            EXPECT_EQ(head.is_high(t), want_high[t]) << t;
            const float* k = keys.data() + t * row + h * 64;
            const float* v = values.data() + t * row + h * 64;
            std::vector<float> want_k = through(quant_format::int8_sym, k, 64);
            std::vector<float> want_v = through(quant_format::int8_sym, v, 64);
            if (!want_high[t]) { // demoted: the low format of the high values
                want_k = through(quant_format::int2_asym, want_k.data(), 64);
                want_v = through(quant_format::int2_asym, want_v.data(), 64);
            }
            EXPECT_EQ(std::vector<float>(s.keys.begin() + t * 64, s.keys.begin() + (t + 1) * 64), want_k) << t;
            EXPECT_EQ(std::vector<float>(s.values.begin() + t * 64, s.values.begin() + (t + 1) * 64), want_v) << t;
        }
        // bytes(): exactly the formula, memory really dropped.
        EXPECT_EQ(head.bytes(), high_count * high_row + (tokens - high_count) * low_row + 4 * tokens);
    }
    EXPECT_LT(cache.bytes(), before_bytes);
    EXPECT_EQ(cache.bytes(), counter.in_use);

    // A new token arrives high; promoting a demoted token does not restore its precision.
    cache.append(0, token_major(keys.data(), 1, 2, 64), token_major(values.data(), 1, 2, 64), tokens);
    EXPECT_TRUE(cache.head(0, 1).is_high(tokens));
    std::vector<float> reversed(tokens + 1);
    for (std::size_t t = 0; t <= tokens; ++t) reversed[t] = static_cast<float>(t); // head 1: old low tokens now high
    cache.assign_precision(0, 1, reversed.data());
    const stored_rows s = stored(cache, 0, 1);
    const std::size_t t = tokens - 1; // low before (score -49), high now
    ASSERT_TRUE(cache.head(0, 1).is_high(t));
    const auto twice = through(quant_format::int8_sym,
                               through(quant_format::int2_asym, through(quant_format::int8_sym, keys.data() + t * row + 64, 64).data(), 64).data(), 64);
    EXPECT_EQ(std::vector<float>(s.keys.begin() + t * 64, s.keys.begin() + (t + 1) * 64), twice);
}

// An eviction scorer's output (E7 knorm: -||k||, no attention statistics
// needed) drives the split: every high token scores at least every low one.
TEST(MixedCodec, EvictionScorerOutputFits) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 80, row = c.kv_heads * c.head_dim;
    auto keys = random_floats(tokens * row, 93);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < row; ++i) keys[t * row + i] *= 0.5f + static_cast<float>((t * 13) % 7) * 0.25f;
    const auto values = random_floats(tokens * row, 94);
    mixed_cache cache(c, {}, {}, codec(0.25));
    cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    const auto& k = kvc::kernels::active();
    for (std::size_t h = 0; h < 2; ++h) {
        std::vector<float> decoded(tokens * 64), scores(tokens);
        cache.head(0, h).decode_keys(k, 0, tokens, decoded.data());
        for (std::size_t t = 0; t < tokens; ++t)
            scores[t] = kvc::evict::score::knorm{}.on_append(k, decoded.data() + t * 64, nullptr, 64);
        cache.assign_precision(0, h, scores.data());
        const auto& head = cache.head(0, h);
        EXPECT_EQ(head.high_tokens(), 20u);
        float lowest_high = INFINITY, highest_low = -INFINITY;
        for (std::size_t t = 0; t < tokens; ++t) {
            if (head.is_high(t)) lowest_high = std::min(lowest_high, scores[t]);
            else highest_low = std::max(highest_low, scores[t]);
        }
        EXPECT_GE(lowest_high, highest_low);
    }
}

// Decode with per-token mass (logits through the token map, several slices),
// then a prefill chunk over mixed storage: against a double oracle over the
// stored values, on every instruction set.
TEST(MixedCodec, AttentionAndMassMatchOracleOnEveryInstructionSet) {
    arch_guard guard;
    const auto c = shape(2, 3, 64);
    const std::size_t tokens = 600, chunk = 16, row = c.kv_heads * c.head_dim, qrow = c.query_heads * 64;
    const auto keys = random_floats((tokens + chunk) * row, 95), values = random_floats((tokens + chunk) * row, 96);
    const auto queries = random_floats((chunk + 1) * qrow, 97, 2.0f);
    std::vector<float> scores(tokens);
    for (std::size_t t = 0; t < tokens; ++t) scores[t] = static_cast<float>((t * 7919) % 1000);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        mixed_cache cache(c, {}, {}, codec(0.4));
        cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
        for (std::size_t h = 0; h < 2; ++h) cache.assign_precision(0, h, scores.data());
        const auto check = [&](const float* q, const float* out, const float* mass, std::size_t visible) {
            for (std::size_t h = 0; h < 2; ++h) {
                const stored_rows s = stored(cache, 0, h);
                std::vector<double> want_mass(visible, 0.0);
                for (std::size_t g = 0; g < 3; ++g) {
                    const std::size_t j = h * 3 + g;
                    // Both bodies (int8_sym, int2_asym) score against the int8
                    // query (kernels/quant/common.hpp, quantize_query).
                    const std::vector<float> scored = kvc_test::dequantized_query(q + j * 64, 64);
                    std::vector<double> logits(visible);
                    double max = -INFINITY, sum = 0.0;
                    for (std::size_t t = 0; t < visible; ++t) {
                        double dot = 0.0;
                        for (std::size_t d = 0; d < 64; ++d) dot += static_cast<double>(scored[d]) * s.keys[t * 64 + d];
                        logits[t] = dot * c.logit_scale();
                        max = std::max(max, logits[t]);
                    }
                    for (double& l : logits) sum += (l = std::exp(l - max));
                    double diff = 0.0, norm = 0.0;
                    for (std::size_t d = 0; d < 64; ++d) {
                        double o = 0.0;
                        for (std::size_t t = 0; t < visible; ++t) o += logits[t] / sum * s.values[t * 64 + d];
                        diff += (out[j * 64 + d] - o) * (out[j * 64 + d] - o);
                        norm += o * o;
                    }
                    EXPECT_LE(std::sqrt(diff / norm), 2e-5) << "query head " << j;
                    for (std::size_t t = 0; t < visible; ++t) want_mass[t] += logits[t] / sum;
                }
                if (mass) {
                    for (std::size_t t = 0; t < visible; ++t) {
                        EXPECT_NEAR(mass[h * visible + t], want_mass[t], 1e-5 * (1.0 + want_mass[t])) << "token " << t;
                    }
                }
            }
        };
        std::vector<float> out(qrow), mass(2 * tokens);
        cache.attend(0, queries.data(), out.data(), mass.data());
        check(queries.data(), out.data(), mass.data(), tokens);
        // A prefill chunk after the assignment: new tokens high, prefixes cross both bodies.
        cache.append(0, token_major(keys.data() + tokens * row, chunk, 2, 64),
                     token_major(values.data() + tokens * row, chunk, 2, 64), tokens);
        std::vector<float> chunk_out(chunk * qrow);
        cache.attend_chunk(0, queries.data() + qrow, chunk, chunk_out.data());
        for (std::size_t i = 0; i < chunk; i += 5)
            check(queries.data() + (1 + i) * qrow, chunk_out.data() + i * qrow, nullptr, tokens + i + 1);
    }
}

double error_against_full(double fraction, const std::vector<float>& keys, const std::vector<float>& values,
                          const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    // Importance from the full-precision attention the steps will use: mass per token.
    const auto assign_from_queries = [&](mixed_cache& cache) {
        for (std::size_t h = 0; h < 4; ++h) {
            std::vector<float> scores(tokens, 0.0f);
            for (std::size_t s = 0; s < steps; ++s)
                for (std::size_t g = 0; g < 4; ++g) {
                    const float* qv = queries.data() + s * 16 * 128 + (h * 4 + g) * 128;
                    for (std::size_t t = 0; t < tokens; ++t) {
                        float dot = 0.0f;
                        for (std::size_t d = 0; d < 128; ++d) dot += qv[d] * keys[t * 4 * 128 + h * 128 + d];
                        scores[t] = std::max(scores[t], dot);
                    }
                }
            cache.assign_precision(0, h, scores.data());
        }
    };
    return kvc_test::mean_error_against_full(mixed_cache(shape(4, 4, 128), {}, {}, codec(fraction)), keys, values,
                                             queries, tokens, steps, assign_from_queries);
}

TEST(MixedCodec, ErrorLiesBetweenAllLowAndAllHigh) {
    const std::size_t tokens = 512, steps = 8;
    const auto keys = random_floats(tokens * 4 * 128, 98), values = random_floats(tokens * 4 * 128, 99);
    const auto queries = random_floats(steps * 16 * 128, 100, 2.0f);
    const double low = error_against_full(0.0, keys, values, queries, tokens, steps);
    const double mixed = error_against_full(0.2, keys, values, queries, tokens, steps);
    const double high = error_against_full(1.0, keys, values, queries, tokens, steps);
    std::cout << "[ kvc      ] relative error vs full_cache f16: all int2 " << low << ", 20% int8 " << mixed
              << ", all int8 " << high << std::endl;
    EXPECT_LT(high, mixed);
    EXPECT_LT(mixed, low);
}

TEST(MixedCodec, BadScoresThrowAndLeaveTheHeadUnchanged) {
    const auto c = shape(1, 1, 64);
    const std::size_t tokens = 20;
    const auto keys = random_floats(tokens * 64, 101);
    mixed_cache cache(c, {}, {}, codec(0.5));
    cache.append(0, token_major(keys.data(), tokens, 1, 64), token_major(keys.data(), tokens, 1, 64), 0);
    std::vector<float> scores(tokens);
    for (std::size_t t = 0; t < tokens; ++t) scores[t] = static_cast<float>(t % 3);
    cache.assign_precision(0, 0, scores.data());
    const stored_rows before = stored(cache, 0, 0);
    const std::size_t bytes = cache.bytes(), high = cache.head(0, 0).high_tokens();
    std::vector<float> bad(tokens, 1.0f);
    bad[7] = std::numeric_limits<float>::quiet_NaN();
    const std::string nan = error_of([&] { cache.assign_precision(0, 0, bad.data()); });
    EXPECT_NE(nan.find("kvc::quant::mixed: expected scores that are not NaN, got NaN for token 7"), std::string::npos)
        << nan;
    const std::string null = error_of([&] { cache.assign_precision(0, 0, nullptr); });
    EXPECT_NE(null.find("expected non-null scores"), std::string::npos) << null;
    const std::string direct =
        error_of([&] { kvc::mixed_rows(cache.head(0, 0)).assign_precision(kvc::kernels::active(), nullptr); });
    EXPECT_NE(direct.find("expected 20 scores, got a null pointer"), std::string::npos) << direct;
    EXPECT_EQ(cache.bytes(), bytes);
    EXPECT_EQ(cache.head(0, 0).high_tokens(), high);
    const stored_rows after = stored(cache, 0, 0);
    EXPECT_EQ(before.keys, after.keys);
    EXPECT_EQ(before.values, after.values);
    // Infinite scores are ordinary extremes.
    bad[7] = INFINITY;
    cache.assign_precision(0, 0, bad.data());
    EXPECT_TRUE(cache.head(0, 0).is_high(7));
}

TEST(MixedCodec, RejectsBadFractionAndHeadDim) {
    const std::string fraction = error_of([] { mixed_cache cache(shape(1, 1, 64), {}, {}, codec(1.5)); });
    EXPECT_NE(fraction.find("kvc::quant::mixed: expected a high-precision fraction in [0, 1], got 1.5"), std::string::npos)
        << fraction;
    const std::string nan =
        error_of([] { mixed_cache cache(shape(1, 1, 64), {}, {}, codec(std::numeric_limits<double>::quiet_NaN())); });
    EXPECT_NE(nan.find("got nan"), std::string::npos) << nan;
    const std::string dim = error_of([] { mixed_cache cache(shape(1, 1, 48), {}, {}, codec(0.5)); });
    EXPECT_NE(dim.find("expected head_dim a multiple of the group size 32, got head_dim 48"), std::string::npos) << dim;
}

// Eviction composes: keep() moves rows of both bodies and keeps the map in order.
TEST(MixedCodec, KeepCompactsBothBodies) {
    const std::size_t dim = 64, tokens = 30;
    const auto& k = kvc::kernels::active();
    kvc::mixed_rows rows(quant_format::int8_sym, quant_format::int4_sym, 32, dim, 0.5, kvc::default_resource());
    rows.reserve(tokens);
    const auto keys = random_floats(tokens * dim, 102), values = random_floats(tokens * dim, 103);
    for (std::size_t t = 0; t < tokens; ++t) rows.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    std::vector<float> scores(tokens);
    for (std::size_t t = 0; t < tokens; ++t) scores[t] = static_cast<float>(t % 2); // odd tokens high
    rows.assign_precision(k, scores.data());
    std::vector<float> before(tokens * dim), after;
    rows.decode_values(k, 0, tokens, before.data());
    const std::vector<std::uint32_t> kept = {0, 3, 4, 9, 10, 29};
    rows.keep(kept.data(), kept.size());
    ASSERT_EQ(rows.tokens(), kept.size());
    EXPECT_EQ(rows.high_tokens(), 3u); // 3, 9, 29
    after.resize(kept.size() * dim);
    rows.decode_values(k, 0, kept.size(), after.data());
    for (std::size_t i = 0; i < kept.size(); ++i) {
        EXPECT_EQ(rows.is_high(i), kept[i] % 2 == 1);
        for (std::size_t d = 0; d < dim; ++d) EXPECT_EQ(after[i * dim + d], before[kept[i] * dim + d]);
    }
}

} // namespace
