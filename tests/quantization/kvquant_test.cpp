// Q3 KVQuant (kvc::quant::kvquant) inside compressed_cache and as a bare head,
// on every instruction set: a hand-worked tiny case; attention against a
// double oracle that applies kernels::rope_rotate to the exact stored
// pre-RoPE keys at their positions (gaps, long runs, large positions, partial
// and split-half RoPE, tails); every ISA against the scalar reference;
// full_cache f32 on post-RoPE keys; error decreasing with bits; dense-and-
// sparse against no outliers on heavy-tailed keys; bytes() against the layout
// formula and a counting resource; construction errors; NaN/Inf isolation;
// keep(); sink tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

using view = kvc::kv_view<const float>;
using kvq_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::kvquant, kvc::project::none>;
namespace cal = kvc::calibration;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;

static_assert(kvc::is_quantization_policy_v<kvc::quant::kvquant>);
static_assert(kvc::quant::kvquant::head_storage::wants_positions);

kvc::cache_config shape(std::size_t layers, std::size_t kv_heads, std::size_t dim, std::size_t group = 1) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads * group;
    c.head_dim = dim;
    c.storage = kvc::dtype::f32;
    return c;
}

// Keys with per-channel scales (a few channels 8x larger) and Student-t
// (3 degrees of freedom) tails: the structure KVQuant targets.
std::vector<float> heavy_keys(std::size_t tokens, std::size_t heads, std::size_t dim, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::student_t_distribution<float> t3(3.0f);
    std::vector<float> channel(heads * dim);
    std::mt19937 channel_rng(1234); // the same channel structure for calibration and test data
    std::uniform_real_distribution<float> u(0.5f, 1.5f);
    for (std::size_t i = 0; i < channel.size(); ++i) channel[i] = u(channel_rng) * (i % 29 == 3 ? 8.0f : 1.0f);
    std::vector<float> x(tokens * heads * dim);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t i = 0; i < heads * dim; ++i) x[t * heads * dim + i] = t3(rng) * channel[i] + 0.3f;
    return x;
}

cal::artifact calibrated(const kvc::cache_config& c, unsigned bits, double fraction, std::uint32_t seed = 5,
                         std::size_t tokens = 256) {
    std::vector<std::vector<float>> k, v;
    std::vector<view> kv, vv;
    for (std::size_t l = 0; l < c.layers; ++l) {
        k.push_back(heavy_keys(tokens, c.kv_heads, c.head_dim, seed + 10 * static_cast<std::uint32_t>(l)));
        v.push_back(kvc_test::random_floats(tokens * c.kv_heads * c.head_dim, seed + 1 + 10 * static_cast<std::uint32_t>(l)));
    }
    for (std::size_t l = 0; l < c.layers; ++l) {
        kv.emplace_back(k[l].data(), tokens, c.kv_heads, c.head_dim);
        vv.emplace_back(v[l].data(), tokens, c.kv_heads, c.head_dim);
    }
    cal::kvquant_options o;
    o.bits = bits;
    o.outlier_fraction = fraction;
    return cal::calibrate_kvquant(c, kv, vv, o);
}

// The double-precision oracle of one head: keys are the stored pre-RoPE keys
// (decode_pre_rope_keys: exact values of codes and outliers) rotated by
// kernels::rope_rotate at their positions; sinks are the stored fp16
// post-RoPE rows. Returns [group][dim] and the logit error scale used by `bound`.
struct oracle_result {
    std::vector<double> out;
    std::vector<double> bound; // per query head: allowed |kernel - oracle| per element
};

oracle_result oracle(const kvc::kvquant_head& head, const kvc::rope_config& rope, const float* queries,
                     std::size_t group, float scale) {
    const std::size_t dim = head.dim(), tokens = head.tokens();
    const auto& k = kvc::kernels::reference_table();
    std::vector<float> keys(tokens * dim), values(tokens * dim);
    head.decode_values(k, 0, tokens, values.data());
    for (std::size_t t = 0; t < tokens; ++t) {
        if (t < head.sink_tokens()) {
            head.decode_keys(k, t, 1, keys.data() + t * dim);
        } else {
            head.decode_pre_rope_keys(k, t, 1, keys.data() + t * dim);
            kvc::kernels::rope_rotate(rope, keys.data() + t * dim, dim, head.positions()[t]);
        }
    }
    double vmax = 0.0;
    for (float v : values) vmax = std::max(vmax, std::fabs(static_cast<double>(v)));
    oracle_result r;
    r.out.assign(group * dim, 0.0);
    for (std::size_t g = 0; g < group; ++g) {
        const float* q = queries + g * dim;
        std::vector<double> logits(tokens);
        double max = -INFINITY, magnitude = 0.0;
        for (std::size_t t = 0; t < tokens; ++t) {
            double dot = 0.0, abs_dot = 0.0;
            for (std::size_t d = 0; d < dim; ++d) {
                dot += static_cast<double>(q[d]) * keys[t * dim + d];
                abs_dot += std::fabs(static_cast<double>(q[d]) * keys[t * dim + d]);
            }
            logits[t] = dot * scale;
            magnitude = std::max(magnitude, abs_dot * scale);
            max = std::max(max, logits[t]);
        }
        double sum = 0.0;
        for (std::size_t t = 0; t < tokens; ++t) sum += std::exp(logits[t] - max);
        for (std::size_t t = 0; t < tokens; ++t) {
            const double p = std::exp(logits[t] - max) / sum;
            for (std::size_t d = 0; d < dim; ++d) r.out[g * dim + d] += p * values[t * dim + d];
        }
        // Error model: each key element the kernel uses differs from the
        // oracle's by a few ulp (decode fma, float rotation with cos/sin
        // within ~1e-13 of the double ones), so a logit is off by at most
        // (dim + 16) u times sum |q k| scale; the softmax weights then by a
        // relative 2 * that, plus 4 ulp of exp and summation; the output
        // element by that times max |v| plus the value decode's few ulp.
        const double u = 0x1p-24;
        const double logit_error = magnitude * (static_cast<double>(dim) + 16.0) * u;
        r.bound.push_back((4.0 * logit_error + 64.0 * u + static_cast<double>(tokens) * 4.0 * u) * vmax + 1e-30);
    }
    return r;
}

kvc::kvquant_head_params tiny_params(const std::vector<float>& lower, const std::vector<float>& upper,
                                     const std::vector<float>& book) {
    kvc::kvquant_head_params p;
    p.bits = 2;
    p.dim = 8;
    p.key_lower = lower.data();
    p.key_upper = upper.data();
    p.key_codebook = book.data();
    p.value_codebook = book.data();
    p.sink_tokens = 0;
    p.max_outliers = 2;
    return p;
}

// ---------------------------------------------------------------------------

TEST(KVQuant, HandWorkedTinyHead) {
    // dim 8, 2 bits, every channel range [-1, 1] except channel 1: [1, 3]
    // (offset 2, scale 1); book {-0.75, -0.25, 0.25, 0.75}; no sinks.
    std::vector<float> lower(8, -1.0f), upper(8, 1.0f), book{-0.75f, -0.25f, 0.25f, 0.75f};
    lower[1] = 1.0f;
    upper[1] = 3.0f;
    kvc::rope_config rope; // interleaved, all channels, theta 1e4
    kvc::kvquant_head_params p = tiny_params(lower, upper, book);
    p.rope = rope;
    kvc::kvquant_head head(p, kvc::default_resource());
    const auto& k = kvc::kernels::reference_table();
    // Channel 3 (5.0) and channel 6 (-2.0) are out of range: outliers, exact.
    // Channel 1: (2.9 - 2) / 1 = 0.9 -> 0.75 -> 2.75. Channel 0: 0.1 > 0 -> 0.25.
    // Channel 2: -0.5 is the tie between -0.75 and -0.25 -> lower (-0.75).
    const float key[8] = {0.1f, 2.9f, -0.5f, 5.0f, -1.0f, 0.6f, -2.0f, 0.0f};
    const float want_key[8] = {0.25f, 2.75f, -0.75f, 5.0f, -0.75f, 0.75f, -2.0f, -0.25f};
    // Values: min -3, max 1 -> offset -1, half-range 2; normalised
    // {0, 1, -1, 0.25, 0.5, -0.5, 0.2, -0.2} -> codes {-0.25 (0 ties low), 0.75, -0.75, 0.25, 0.75 (0.5 ties low? no:
    // 0.5 is the midpoint of 0.25 and 0.75 -> 0.25), -0.75 (-0.5 ties low), 0.25, -0.25}.
    const float value[8] = {-1.0f, 1.0f, -3.0f, -0.5f, 0.0f, -2.0f, -0.6f, -1.4f};
    const float normalised_code[8] = {-0.25f, 0.75f, -0.75f, 0.25f, 0.25f, -0.75f, 0.25f, -0.25f};
    head.reserve_for_append(1);
    head.push_back(k, kvc::dtype::f32, key, value, 7);
    ASSERT_EQ(head.tokens(), 1u);
    EXPECT_EQ(head.outliers(), 2u);
    float got[8];
    head.decode_pre_rope_keys(k, 0, 1, got);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(got[i], want_key[i]) << "channel " << i;
    head.decode_values(k, 0, 1, got);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(got[i], -1.0f + 2.0f * normalised_code[i]) << "channel " << i;
    // Post-RoPE: pair (0, 1) rotated by 7 rad, pair (6, 7) by 7 * 1e4^(-6/8).
    head.decode_keys(k, 0, 1, got);
    const double c0 = std::cos(7.0), s0 = std::sin(7.0);
    EXPECT_FLOAT_EQ(got[0], static_cast<float>(0.25 * c0 - 2.75 * s0));
    EXPECT_FLOAT_EQ(got[1], static_cast<float>(0.25 * s0 + 2.75 * c0));
    const double a3 = 7.0 * std::pow(1e4, -6.0 / 8.0);
    EXPECT_FLOAT_EQ(got[6], static_cast<float>(-2.0 * std::cos(a3) + 0.25 * std::sin(a3)));
    // Codes: 2 rows of 2 bytes + 4 slack each, 2 value params, 1 position, 1 CSR end, 2 outliers.
    const std::size_t body = 2 * (2 + 4) + 2 * 4 + 4 + 4 + 2 * 6;
    const std::size_t per_head = (2 * 8 + 32) * 4 + 3 * 4 * 8 + 8 * 2;
    head.shrink_to_fit();
    EXPECT_EQ(head.bytes(), body + per_head);
    // Attention over one token is its value row, on every instruction set.
    for (kvc::arch_id arch : archs()) {
        const auto& table = *kvc::kernels::table_for(arch);
        const float q[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        float max = -INFINITY, sum = 0.0f, acc[8] = {};
        kvc::kernels::decode_state state{&max, &sum, acc};
        kvc::kernels::decode_problem dp;
        dp.group = 1;
        dp.queries = q;
        dp.query_stride = 8;
        dp.scale = 0.5f;
        head.attend(table, dp, state);
        for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(acc[i] / sum, -1.0f + 2.0f * normalised_code[i]) << kvc::name_of(arch);
    }
}

TEST(KVQuant, OutlierCapKeepsTheLargestExcesses) {
    std::vector<float> lower(8, -1.0f), upper(8, 1.0f), book{-0.75f, -0.25f, 0.25f, 0.75f};
    kvc::kvquant_head_params p = tiny_params(lower, upper, book);
    p.max_outliers = 2;
    kvc::kvquant_head head(p, kvc::default_resource());
    const auto& k = kvc::kernels::reference_table();
    const float key[8] = {3.0f, -9.0f, 1.5f, 0.0f, 0.0f, 4.0f, 0.0f, 0.0f}; // excesses 3, 9, 1.5, 4
    const float value[8] = {};
    head.reserve_for_append(1);
    head.push_back(k, kvc::dtype::f32, key, value, 0);
    EXPECT_EQ(head.outliers(), 2u);
    float got[8];
    head.decode_pre_rope_keys(k, 0, 1, got);
    EXPECT_EQ(got[1], -9.0f);
    EXPECT_EQ(got[5], 4.0f);
    EXPECT_EQ(got[0], 0.75f); // clamped to the range edge's code
    EXPECT_EQ(got[2], 0.75f);
}

// Every ISA against the double oracle and the scalar reference, over shapes
// that exercise tails, partial and split-half RoPE, position gaps (re-anchoring),
// runs longer than the re-anchor interval and large positions.
TEST(KVQuant, AttentionMatchesOracleOnEveryArch) {
    struct shape_case {
        std::size_t dim, group, tokens, sinks;
        kvc::rope_config rope;
        std::int32_t first;
        std::int32_t gap_every; // 0: consecutive positions
        unsigned bits;
    };
    kvc::rope_config split;
    split.interleaved = false;
    kvc::rope_config partial;
    partial.rotary_dims = 32;
    kvc::rope_config theta;
    theta.theta = 500000.0;
    const shape_case cases[] = {
        {128, 4, 300, 1, {}, 0, 0, 3},         {72, 3, 130, 0, split, 5, 7, 2},
        {64, 1, 65, 2, partial, 100000, 0, 4}, {128, 8, 2100, 4, theta, 0, 0, 3},
        {8, 2, 40, 0, {}, 1000000, 3, 4},      {136, 5, 97, 0, split, 17, 50, 3},
    };
    for (const shape_case& sc : cases) {
        kvc::cache_config c = shape(1, 1, sc.dim, sc.group);
        const cal::artifact a = calibrated(c, sc.bits, 0.02, 3, 128);
        const kvc::quant::kvquant codec(a, sc.rope, sc.sinks);
        kvc::kvquant_head head = codec.make_head(c, 0, 0);
        const auto keys = heavy_keys(sc.tokens, 1, sc.dim, 77);
        const auto values = kvc_test::random_floats(sc.tokens * sc.dim, 78);
        head.reserve_for_append(sc.tokens);
        std::int32_t position = sc.first;
        for (std::size_t t = 0; t < sc.tokens; ++t) {
            head.push_back(kvc::kernels::reference_table(), kvc::dtype::f32, keys.data() + t * sc.dim,
                           values.data() + t * sc.dim, position);
            position += (sc.gap_every && t % sc.gap_every == 0) ? 3 : 1;
        }
        const auto queries = kvc_test::random_floats(sc.group * sc.dim, 79, 0.5f);
        const float scale = 1.0f / std::sqrt(static_cast<float>(sc.dim));
        const oracle_result want = oracle(head, sc.rope, queries.data(), sc.group, scale);
        std::vector<float> reference_out;
        for (kvc::arch_id arch : archs()) {
            const auto& table = *kvc::kernels::table_for(arch);
            std::vector<float> max(sc.group), sum(sc.group), acc(sc.group * sc.dim), out(sc.group * sc.dim);
            std::vector<float> logits(sc.group * sc.tokens);
            kvc::kernels::decode_state state{max.data(), sum.data(), acc.data()};
            kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(state, sc.group, sc.dim);
            kvc::kernels::decode_problem dp;
            dp.group = sc.group;
            dp.queries = queries.data();
            dp.query_stride = sc.dim;
            dp.scale = scale;
            dp.logits = logits.data();
            dp.logits_stride = sc.tokens;
            head.attend(table, dp, state);
            kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(state, sc.group, sc.dim, out.data(),
                                                                               sc.dim);
            const std::string where = std::string(kvc::name_of(arch)) + " dim " + std::to_string(sc.dim) +
                                      " tokens " + std::to_string(sc.tokens) + " bits " + std::to_string(sc.bits);
            for (std::size_t g = 0; g < sc.group; ++g)
                for (std::size_t d = 0; d < sc.dim; ++d)
                    ASSERT_NEAR(out[g * sc.dim + d], want.out[g * sc.dim + d], want.bound[g])
                        << where << " head " << g << " element " << d;
            if (reference_out.empty()) {
                reference_out = out; // the scalar reference runs first
            } else {
                for (std::size_t i = 0; i < out.size(); ++i)
                    ASSERT_NEAR(out[i], reference_out[i], 2.0 * want.bound[i / sc.dim]) << where << " vs reference";
            }
        }
    }
}

// Inside compressed_cache: with 4 bits and no outliers clipped away, attention
// is close to full_cache f32 holding the post-RoPE keys, and the error falls
// with bits (the data: what the cache was calibrated on, heavy-tailed keys).
TEST(KVQuant, CloseToFullCacheOnPostRopeKeysAndErrorFallsWithBits) {
    const std::size_t tokens = 400, heads = 2, group = 2, dim = 64;
    const kvc::cache_config c = shape(1, heads, dim, group);
    const auto keys = heavy_keys(tokens, heads, dim, 91);
    const auto values = kvc_test::random_floats(tokens * heads * dim, 92);
    kvc::rope_config rope;
    std::vector<float> rotated = keys;
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            kvc::kernels::rope_rotate(rope, rotated.data() + (t * heads + h) * dim, dim, static_cast<std::int64_t>(t));
    kvc::full_cache full(c);
    full.append(0, view(rotated.data(), tokens, heads, dim), view(values.data(), tokens, heads, dim), 0);
    const auto queries = kvc_test::random_floats(8 * heads * group * dim, 93, 1.0f / 3.0f);
    // Spread of the exact logits (queries of std 1/3 give logits of std ~1).
    double logit_sq = 0.0;
    std::size_t logit_count = 0;
    for (std::size_t i = 0; i < 8; ++i)
        for (std::size_t qh = 0; qh < heads * group; ++qh)
            for (std::size_t t = 0; t < tokens; ++t) {
                double dot = 0.0;
                for (std::size_t d = 0; d < dim; ++d)
                    dot += static_cast<double>(queries[(i * heads * group + qh) * dim + d]) *
                           rotated[(t * heads + qh / group) * dim + d];
                logit_sq += dot * dot / dim;
                ++logit_count;
            }
    const double logit_std = std::sqrt(logit_sq / static_cast<double>(logit_count));
    double previous = INFINITY;
    for (unsigned bits : {2u, 3u, 4u}) {
        kvq_cache cache(c, {}, {}, kvc::quant::kvquant(calibrated(c, bits, 0.01), rope, 1));
        cache.append(0, view(keys.data(), tokens, heads, dim), view(values.data(), tokens, heads, dim), 0);
        const double error = kvc_test::mean_error_against(full, cache, queries, 8);
        // Relative reconstruction errors of the stored keys (before RoPE) and values.
        double key_diff = 0.0, key_norm = 0.0, value_diff = 0.0, value_norm = 0.0;
        std::vector<float> row(dim);
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t t = 0; t < tokens; ++t) {
                cache.head(0, h).decode_pre_rope_keys(kvc::kernels::active(), t, 1, row.data());
                for (std::size_t d = 0; d < dim; ++d) {
                    const double x = keys[(t * heads + h) * dim + d];
                    key_diff += (row[d] - x) * (row[d] - x);
                    key_norm += x * x;
                }
                cache.head(0, h).decode_values(kvc::kernels::active(), t, 1, row.data());
                for (std::size_t d = 0; d < dim; ++d) {
                    const double x = values[(t * heads + h) * dim + d];
                    value_diff += (row[d] - x) * (row[d] - x);
                    value_norm += x * x;
                }
            }
        const double key_error = std::sqrt(key_diff / key_norm), value_error = std::sqrt(value_diff / value_norm);
        std::cout << "[ kvquant  ] bits " << bits << ": attention error vs full_cache f32 " << error << ", key error "
                  << key_error << ", value error " << value_error << ", logit std " << logit_std << "\n";
        EXPECT_LT(error, previous) << bits << " bits";
        previous = error;
        // First order: a relative key error e_k moves logits by about
        // e_k * logit_std, which moves the output by about that relative to
        // its spread, and value errors pass through the convex combination:
        // error ~ e_k * logit_std + e_v. Twice that is the bound; a rotation
        // at the wrong position or a misplaced channel gives errors of order 1
        // even with exact codes (e_k, e_v are measured before RoPE).
        EXPECT_LT(error, 2.0 * (key_error * logit_std + value_error)) << bits << " bits";
    }
}

TEST(KVQuant, DenseAndSparseBeatsNoOutliersOnHeavyTails) {
    const std::size_t tokens = 512, heads = 2, dim = 64;
    const kvc::cache_config c = shape(1, heads, dim);
    const auto keys = heavy_keys(tokens, heads, dim, 31);
    const auto values = kvc_test::random_floats(tokens * heads * dim, 32);
    double errors[2];
    for (int with = 0; with < 2; ++with) {
        kvq_cache cache(c, {}, {}, kvc::quant::kvquant(calibrated(c, 3, with ? 0.01 : 0.0), {}, 0));
        cache.append(0, view(keys.data(), tokens, heads, dim), view(values.data(), tokens, heads, dim), 0);
        double diff = 0.0, norm = 0.0;
        std::vector<float> row(dim);
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t t = 0; t < tokens; ++t) {
                cache.head(0, h).decode_pre_rope_keys(kvc::kernels::active(), t, 1, row.data());
                for (std::size_t d = 0; d < dim; ++d) {
                    const double x = keys[(t * heads + h) * dim + d];
                    diff += (row[d] - x) * (row[d] - x);
                    norm += x * x;
                }
            }
        errors[with] = std::sqrt(diff / norm);
    }
    std::cout << "[ kvquant  ] 3-bit key error: no outliers " << errors[0] << ", 1% dense-and-sparse " << errors[1]
              << "\n";
    EXPECT_LT(errors[1], 0.5 * errors[0]);
}

TEST(KVQuant, BytesMatchLayoutAndCountingResource) {
    kvc_test::counting_resource counter;
    kvc::cache_config c = shape(2, 2, 64, 2);
    c.resource = &counter;
    const cal::artifact a = calibrated(shape(2, 2, 64, 2), 3, 0.02);
    const std::size_t before = counter.in_use;
    {
        kvq_cache cache(c, {}, {}, kvc::quant::kvquant(a, {}, 3));
        // With no tokens, the cache holds its bookkeeping and each head's parameters.
        const std::size_t per_head = (2 * 64 + 32) * 4 + 3 * 32 * 8 + 64 * 2;
        EXPECT_EQ(cache.head(0, 0).bytes(), per_head);
        const std::size_t bookkeeping = cache.bytes() - 4 * per_head;
        EXPECT_EQ(cache.bytes(), counter.in_use - before);
        const std::size_t tokens = 100;
        const auto keys = heavy_keys(tokens, 2, 64, 8);
        const auto values = kvc_test::random_floats(tokens * 2 * 64, 9);
        for (std::size_t l = 0; l < 2; ++l)
            cache.append(l, view(keys.data(), tokens, 2, 64), view(values.data(), tokens, 2, 64), 0);
        EXPECT_EQ(cache.bytes(), counter.in_use - before);
        cache.shrink_to_fit();
        EXPECT_EQ(cache.bytes(), counter.in_use - before);
        std::size_t formula = bookkeeping;
        for (std::size_t l = 0; l < 2; ++l)
            for (std::size_t h = 0; h < 2; ++h) {
                const auto& head = cache.head(l, h);
                EXPECT_EQ(head.sink_tokens(), 3u);
                EXPECT_GT(head.outliers(), 0u);
                const std::size_t packed = tokens - 3;
                // codes + slack, value offset and half-range, CSR end, positions, outliers, fp16 sinks
                const std::size_t body = 2 * (packed * 64 * 3 / 8 + 4) + packed * (8 + 4) + tokens * 4 +
                                         head.outliers() * 6 + 3 * 2 * 64 * 2;
                EXPECT_EQ(head.bytes(), per_head + body);
                formula += per_head + body + tokens * 4; // + the cache's own positions
            }
        EXPECT_EQ(cache.bytes(), formula);
        // reserve(n) is exact for the rows: n more tokens cost exactly their body bytes.
        cache.reserve(200);
        EXPECT_EQ(cache.bytes(), counter.in_use - before);
    }
    EXPECT_EQ(counter.in_use, before);
}

TEST(KVQuant, BadInputFailsAtConstruction) {
    const kvc::cache_config c = shape(1, 2, 64);
    const cal::artifact a = calibrated(c, 3, 0.01);
    EXPECT_NE(error_of([&] { kvq_cache cache(shape(2, 2, 64), {}, {}, kvc::quant::kvquant(a)); }).find("the cache has 2 x 2 x 64"),
              std::string::npos);
    EXPECT_NE(error_of([&] { kvq_cache cache(shape(1, 2, 64), {}, {}, kvc::quant::kvquant(a, {}, 1, 65)); })
                  .find("max_outliers_per_token"),
              std::string::npos);
    kvc::rope_config odd;
    odd.rotary_dims = 33;
    EXPECT_NE(error_of([&] { kvq_cache cache(c, {}, {}, kvc::quant::kvquant(a, odd)); }).find("rotary_dims"),
              std::string::npos);
    cal::artifact wrong = a;
    wrong.kind = "qfilter";
    EXPECT_NE(error_of([&] { kvc::quant::kvquant q(wrong); }).find("kind"), std::string::npos);
    cal::artifact bits = a;
    for (auto& t : bits.tensors)
        if (t.name == "bits") t.values[0] = 5.0f;
    EXPECT_NE(error_of([&] { kvc::quant::kvquant q(bits); }).find("bits"), std::string::npos);
    cal::artifact unsorted = a;
    for (auto& t : unsorted.tensors)
        if (t.name == "key_codebook") std::swap(t.values[0], t.values[7]);
    EXPECT_NE(error_of([&] { kvc::quant::kvquant q(unsorted); }).find("ascending"), std::string::npos);
    cal::artifact missing = a;
    missing.tensors.pop_back();
    EXPECT_NE(error_of([&] { kvc::quant::kvquant q(missing); }).find("value_codebook"), std::string::npos);
    // head_dim not a multiple of 8 (artifact of dim 12).
    const kvc::cache_config c12 = shape(1, 1, 12);
    EXPECT_NE(error_of([&] { kvq_cache cache(c12, {}, {}, kvc::quant::kvquant(calibrated(c12, 2, 0.01))); })
                  .find("multiple of 8"),
              std::string::npos);
}

TEST(KVQuant, NonFiniteInputStaysInItsToken) {
    const std::size_t tokens = 40, dim = 64;
    const kvc::cache_config c = shape(1, 1, dim, 2);
    const cal::artifact a = calibrated(c, 3, 0.01);
    auto keys = heavy_keys(tokens, 1, dim, 4);
    auto values = kvc_test::random_floats(tokens * dim, 5);
    const auto queries = kvc_test::random_floats(2 * dim, 6);
    for (kvc::arch_id arch : archs()) {
        arch_guard guard;
        kvc::set_active_arch(arch);
        for (int which = 0; which < 3; ++which) { // NaN key, Inf key, NaN value at token 17
            auto k = keys;
            auto v = values;
            if (which == 0) k[17 * dim + 5] = std::numeric_limits<float>::quiet_NaN();
            if (which == 1) k[17 * dim + 5] = std::numeric_limits<float>::infinity();
            if (which == 2) v[17 * dim + 9] = std::numeric_limits<float>::quiet_NaN();
            kvq_cache cache(c, {}, {}, kvc::quant::kvquant(a, {}, 1));
            cache.append(0, view(k.data(), tokens, 1, dim), view(v.data(), tokens, 1, dim), 0);
            std::vector<float> out(2 * dim);
            cache.attend(0, queries.data(), out.data());
            bool any_nan = false;
            for (float x : out) any_nan = any_nan || std::isnan(x);
            // A NaN key or value makes the output NaN (as full_cache); an Inf key
            // element gives a +-Inf or NaN logit depending on signs, so only
            // its isolation is checked.
            if (which != 1) {
                EXPECT_TRUE(any_nan) << kvc::name_of(arch) << " case " << which;
            }
            // Other tokens decode exactly as in a cache that never saw the bad element.
            kvq_cache clean(c, {}, {}, kvc::quant::kvquant(a, {}, 1));
            clean.append(0, view(keys.data(), tokens, 1, dim), view(values.data(), tokens, 1, dim), 0);
            std::vector<float> got(tokens * dim), want(tokens * dim);
            cache.head(0, 0).decode_pre_rope_keys(kvc::kernels::active(), 0, tokens, got.data());
            clean.head(0, 0).decode_pre_rope_keys(kvc::kernels::active(), 0, tokens, want.data());
            for (std::size_t i = 0; i < tokens * dim; ++i) {
                if (i / dim != 17) {
                    ASSERT_EQ(got[i], want[i]) << i;
                }
            }
            if (which == 0) {
                EXPECT_TRUE(std::isnan(got[17 * dim + 5])); // kept exactly as an outlier
            }
            if (which == 1) {
                EXPECT_EQ(got[17 * dim + 5], std::numeric_limits<float>::infinity());
            }
            if (which == 2) {
                cache.head(0, 0).decode_values(kvc::kernels::active(), 17, 1, got.data());
                for (std::size_t d = 0; d < dim; ++d) EXPECT_TRUE(std::isnan(got[d]));
            }
            // Evicting the token restores finite output equal to the clean cache without it.
            std::vector<std::uint32_t> kept;
            for (std::uint32_t t = 0; t < tokens; ++t)
                if (t != 17) kept.push_back(t);
            kvc::kvquant_head bad = cache.head(0, 0), good = clean.head(0, 0);
            bad.keep(kept.data(), kept.size());
            good.keep(kept.data(), kept.size());
            std::vector<float> m(2), s(2), acc1(2 * dim), acc2(2 * dim);
            kvc::kernels::decode_problem dp;
            dp.group = 2;
            dp.queries = queries.data();
            dp.query_stride = dim;
            dp.scale = 0.125f;
            kvc::kernels::decode_state s1{m.data(), s.data(), acc1.data()};
            kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(s1, 2, dim);
            bad.attend(kvc::kernels::active(), dp, s1);
            std::vector<float> m2(2), sum2(2);
            kvc::kernels::decode_state s2{m2.data(), sum2.data(), acc2.data()};
            kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(s2, 2, dim);
            good.attend(kvc::kernels::active(), dp, s2);
            for (std::size_t i = 0; i < 2 * dim; ++i) {
                ASSERT_TRUE(std::isfinite(acc1[i]));
                ASSERT_EQ(acc1[i], acc2[i]);
            }
        }
    }
}

// keep() after eviction: the compacted head equals a head built from the kept
// tokens only (same codes, outliers, positions), and attention over it with
// the position gaps matches the oracle on every ISA.
TEST(KVQuant, KeepCompactsCodesOutliersAndPositions) {
    const std::size_t tokens = 150, dim = 64;
    const kvc::cache_config c = shape(1, 1, dim, 2);
    const kvc::quant::kvquant codec(calibrated(c, 3, 0.05), {}, 2);
    kvc::kvquant_head all = codec.make_head(c, 0, 0), some = codec.make_head(c, 0, 0);
    const auto keys = heavy_keys(tokens, 1, dim, 21);
    const auto values = kvc_test::random_floats(tokens * dim, 22);
    std::vector<std::uint32_t> kept;
    for (std::uint32_t t = 0; t < tokens; ++t)
        if (t < 1 || t % 3 != 0) kept.push_back(t);
    all.reserve_for_append(tokens);
    some.reserve_for_append(tokens);
    const auto& ref = kvc::kernels::reference_table();
    for (std::size_t t = 0; t < tokens; ++t)
        all.push_back(ref, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim, static_cast<std::int32_t>(t));
    // `some` holds token 0 as its only sink... build it as the kept tokens with their positions, sinks first.
    for (std::uint32_t t : kept)
        some.push_back(ref, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim, static_cast<std::int32_t>(t));
    all.keep(kept.data(), kept.size());
    ASSERT_EQ(all.tokens(), kept.size());
    // all kept sink 0 and 1 (token 1 is kept); some took tokens 0 and 1 as sinks too.
    ASSERT_EQ(all.sink_tokens(), some.sink_tokens());
    EXPECT_EQ(all.outliers(), some.outliers());
    std::vector<float> a(kept.size() * dim), b(kept.size() * dim);
    all.decode_keys(ref, 0, kept.size(), a.data());
    some.decode_keys(ref, 0, kept.size(), b.data());
    EXPECT_EQ(a, b);
    all.decode_values(ref, 0, kept.size(), a.data());
    some.decode_values(ref, 0, kept.size(), b.data());
    EXPECT_EQ(a, b);
    for (std::size_t i = 0; i < kept.size(); ++i) EXPECT_EQ(all.positions()[i], static_cast<std::int32_t>(kept[i]));
    const auto queries = kvc_test::random_floats(2 * dim, 23);
    const oracle_result want = oracle(all, {}, queries.data(), 2, 0.125f);
    for (kvc::arch_id arch : archs()) {
        std::vector<float> m(2), s(2), acc(2 * dim), out(2 * dim);
        kvc::kernels::decode_state st{m.data(), s.data(), acc.data()};
        kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(st, 2, dim);
        kvc::kernels::decode_problem dp;
        dp.group = 2;
        dp.queries = queries.data();
        dp.query_stride = dim;
        dp.scale = 0.125f;
        all.attend(*kvc::kernels::table_for(arch), dp, st);
        kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(st, 2, dim, out.data(), dim);
        for (std::size_t i = 0; i < out.size(); ++i)
            ASSERT_NEAR(out[i], want.out[i], want.bound[i / dim]) << kvc::name_of(arch) << " " << i;
    }
}

// Sinks: the first n tokens are the fp16 rounding of the post-RoPE key and of
// the value, exactly; later tokens are packed.
TEST(KVQuant, SinkTokensAreFp16PostRope) {
    const std::size_t tokens = 10, dim = 32;
    const kvc::cache_config c = shape(1, 1, dim);
    kvc::rope_config rope;
    rope.interleaved = false;
    kvq_cache cache(c, {}, {}, kvc::quant::kvquant(calibrated(c, 2, 0.01), rope, 4));
    const auto keys = heavy_keys(tokens, 1, dim, 41);
    const auto values = kvc_test::random_floats(tokens * dim, 42);
    cache.append(0, view(keys.data(), 3, 1, dim), view(values.data(), 3, 1, dim), 20);
    cache.append(0, view(keys.data() + 3 * dim, tokens - 3, 1, dim), view(values.data() + 3 * dim, tokens - 3, 1, dim),
                 23);
    const auto& head = cache.head(0, 0);
    ASSERT_EQ(head.sink_tokens(), 4u);
    std::vector<float> k(tokens * dim), v(tokens * dim);
    head.decode_keys(kvc::kernels::active(), 0, tokens, k.data());
    head.decode_values(kvc::kernels::active(), 0, tokens, v.data());
    for (std::size_t t = 0; t < 4; ++t) {
        std::vector<float> rotated(keys.begin() + static_cast<std::ptrdiff_t>(t * dim),
                                   keys.begin() + static_cast<std::ptrdiff_t>((t + 1) * dim));
        kvc::kernels::rope_rotate(rope, rotated.data(), dim, 20 + static_cast<std::int64_t>(t));
        for (std::size_t d = 0; d < dim; ++d) {
            EXPECT_EQ(k[t * dim + d], kvc::to_float(kvc::to_half(rotated[d])));
            EXPECT_EQ(v[t * dim + d], kvc::to_float(kvc::to_half(values[t * dim + d])));
        }
    }
    // A 2-bit packed token is not exact.
    bool differs = false;
    for (std::size_t d = 0; d < dim; ++d) differs = differs || v[5 * dim + d] != values[5 * dim + d];
    EXPECT_TRUE(differs);
}

// Prefill (attend_chunk) gives what decode attention gives token by token.
TEST(KVQuant, PrefillMatchesDecodeByDecode) {
    const std::size_t tokens = 70, heads = 2, group = 2, dim = 64, chunk = 70;
    const kvc::cache_config c = shape(1, heads, dim, group);
    const cal::artifact a = calibrated(c, 3, 0.01);
    const auto keys = heavy_keys(tokens, heads, dim, 51);
    const auto values = kvc_test::random_floats(tokens * heads * dim, 52);
    const auto queries = kvc_test::random_floats(chunk * heads * group * dim, 53);
    kvq_cache prefill(c, {}, {}, kvc::quant::kvquant(a, {}, 2));
    prefill.append(0, view(keys.data(), tokens, heads, dim), view(values.data(), tokens, heads, dim), 0);
    std::vector<float> out(chunk * heads * group * dim);
    prefill.attend_chunk(0, queries.data(), chunk, out.data());
    kvq_cache decode(c, {}, {}, kvc::quant::kvquant(a, {}, 2));
    const std::size_t row = heads * group * dim;
    for (std::size_t t = 0; t < tokens; ++t) {
        decode.append(0, view(keys.data() + t * heads * dim, 1, heads, dim),
                      view(values.data() + t * heads * dim, 1, heads, dim), static_cast<std::int64_t>(t));
        std::vector<float> step(row);
        decode.attend(0, queries.data() + t * row, step.data());
        for (std::size_t i = 0; i < row; ++i) ASSERT_EQ(step[i], out[t * row + i]) << t << " " << i;
    }
}

} // namespace
