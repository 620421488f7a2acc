// GEAR (Q7, kvc::quant::gear): the sparse split on a hand-worked row, the
// power iteration on an exactly rank-r matrix, attention on every instruction
// set against the scalar reference and a double oracle over the stored parts
// (Q(d) + A B + S), exact keep(), bytes() against the layout formula and a
// counting memory resource, construction errors, NaN/Inf isolation, and the
// fidelity claim: at the same Q1 format GEAR's attention error is below the
// plain quantizer's, and falls with bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

namespace q = kvc::quant;
namespace kk = kvc::kernels;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kk::quant_format;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;
using kvc_test::shape;

template <class Q>
using quant_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Q, kvc::project::none>;
using gear_cache = quant_cache<q::gear>;

static_assert(kvc::is_quantization_policy_v<q::gear>);

q::gear gear_of(unsigned bits, std::size_t chunk = 64, std::size_t rank = 2, double s = 0.02) {
    q::gear g;
    g.bits = bits;
    g.chunk_tokens = chunk;
    g.rank = rank;
    g.outlier_fraction = s;
    return g;
}

double half(std::uint16_t bits) { return static_cast<double>(kk::common::half_bits_to_float<kk::reference_arch>(bits)); }

// The stored values of one head in double, from its parts: Q(d_t) (exact
// floats), + sum_i A_ti B_i (fp16 products summed in double), + S_t; the fp16
// rows of the buffer as they are. Independent of the kernels under test
// except the Q1 dequantizer (tested bit-exact in tests/kernels).
struct head_values {
    std::vector<double> keys, values; // [tokens][dim]
    // Scores: the quantized part Q(k) of a compressed token meets the int8
    // query of the integer formats (kernels/quant/common.hpp, quantize_query:
    // the Q1 kernel scores it), its low-rank and sparse parts the fp32 query.
    std::vector<double> key_rest;     // [compressed][dim]: L + S of each compressed key
    std::size_t compressed = 0;
    bool int8_query = false;

    double logit_dot(const float* q, const std::vector<float>& q_int8, std::size_t t, std::size_t dim) const {
        double dot = 0.0;
        if (t < compressed && int8_query) {
            for (std::size_t d = 0; d < dim; ++d)
                dot += static_cast<double>(q_int8[d]) * (keys[t * dim + d] - key_rest[t * dim + d]) +
                       static_cast<double>(q[d]) * key_rest[t * dim + d];
        } else {
            for (std::size_t d = 0; d < dim; ++d) dot += static_cast<double>(q[d]) * keys[t * dim + d];
        }
        return dot;
    }
};

head_values stored(const kvc::gear_rows& head) {
    const std::size_t dim = head.dim(), tokens = head.tokens(), compressed = head.compressed_tokens();
    const kvc::gear_layout& l = head.layout();
    head_values out{std::vector<double>(tokens * dim), std::vector<double>(tokens * dim),
                    std::vector<double>(compressed * dim, 0.0), compressed, kvc_test::quantizes_query(l.format)};
    const kk::kernel_table& ref = kk::reference_table();
    std::vector<float> row(dim);
    std::size_t chunk = 0, end = head.chunks() ? head.chunk_size(0) : 0;
    for (std::size_t t = 0; t < compressed; ++t) {
        while (t >= end) end += head.chunk_size(++chunk);
        for (bool keys : {true, false}) {
            std::vector<double>& dst = keys ? out.keys : out.values;
            ref.quant.dequantize_row[kk::index_of(l.format)](
                keys ? head.packed().packed_key_row(t) : head.packed().packed_value_row(t), row.data(), dim, l.group_size);
            const std::uint16_t* a = head.coefficients(t, keys);
            const std::uint16_t* b = head.factor(chunk, keys);
            for (std::size_t d = 0; d < dim; ++d) {
                double v = row[d], rest = 0.0;
                for (std::size_t i = 0; i < l.rank; ++i) rest += half(a[i]) * half(b[i * dim + d]);
                dst[t * dim + d] = v + rest;
                if (keys) out.key_rest[t * dim + d] = rest;
            }
            const std::uint16_t* s = head.sparse(t, keys);
            for (std::size_t j = 0; j < l.outliers(); ++j) {
                dst[t * dim + s[2 * j]] += half(s[2 * j + 1]);
                if (keys) out.key_rest[t * dim + s[2 * j]] += half(s[2 * j + 1]);
            }
        }
    }
    std::vector<float> k(dim), v(dim);
    for (std::size_t t = compressed; t < tokens; ++t) {
        head.decode_keys(ref, t, 1, k.data());
        head.decode_values(ref, t, 1, v.data());
        for (std::size_t d = 0; d < dim; ++d) out.keys[t * dim + d] = k[d], out.values[t * dim + d] = v[d];
    }
    return out;
}

// Decode attention in double; query head j reads heads[j / group]; the first `visible` tokens.
std::vector<double> oracle(const kvc::cache_config& c, const std::vector<head_values>& heads, const float* queries,
                           std::size_t visible) {
    const std::size_t dim = c.head_dim, group = c.group();
    std::vector<double> out(c.query_heads * dim, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        const head_values& hv = heads[j / group];
        const std::vector<float> q_int8 = kvc_test::dequantized_query(queries + j * dim, dim);
        std::vector<double> logits(visible);
        for (std::size_t t = 0; t < visible; ++t)
            logits[t] = hv.logit_dot(queries + j * dim, q_int8, t, dim) * c.logit_scale();
        kvc_test::add_softmax_output(std::move(logits), hv.values, dim, out.data() + j * dim);
    }
    return out;
}

using kvc_test::worst_head_error;

// One head built directly, rows appended in fp32.
kvc::gear_rows make_rows(const q::gear& g, std::size_t dim, const std::vector<float>& keys,
                         const std::vector<float>& values, std::size_t tokens) {
    kvc::cache_config c = shape(1, 1, dim);
    kvc::gear_rows rows = g.make_head(c);
    rows.reserve_for_append(tokens);
    for (std::size_t t = 0; t < tokens; ++t)
        rows.push_back(kk::reference_table(), kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    return rows;
}

// ---------------------------------------------------------------------------
// The sparse split, worked by hand.

TEST(Gear, SparseSplitTakesTheExtremesOfEachRowAndQuantizesTheRest) {
    // dim 32, s = 0.125: round(0.125 * 32 / 2) = 2 largest and 2 smallest per row.
    q::gear g = gear_of(4, 4, 0, 0.125);
    EXPECT_EQ(g.outliers_per_side(32), 2u);
    EXPECT_EQ(q::gear{}.outliers_per_side(128), 1u); // 2% of 128 = 2.56: 1 + 1
    EXPECT_EQ(q::gear{}.outliers_per_side(256), 3u); // 2% of 256 = 5.12 -> round(2.56) = 3 per side
    const std::size_t dim = 32;
    std::vector<float> keys(4 * dim), values(4 * dim);
    for (std::size_t t = 0; t < 4; ++t)
        for (std::size_t d = 0; d < dim; ++d) {
            keys[t * dim + d] = 0.125f * static_cast<float>(static_cast<int>(d % 8) - 4); // -0.5 .. 0.375
            values[t * dim + d] = 0.0625f * static_cast<float>(d % 5);                   // 0 .. 0.25
        }
    // Token 1: largest 9 (ch 5) and 7 (ch 20), smallest -8 (ch 11) and -6 (ch 30); 3 at ch 2 stays.
    keys[dim + 5] = 9.0f, keys[dim + 20] = 7.0f, keys[dim + 11] = -8.0f, keys[dim + 30] = -6.0f, keys[dim + 2] = 3.0f;
    // Token 2 values: a tie at the top (ch 7 and ch 3 both 2.5): the lower channel goes first.
    values[2 * dim + 7] = 2.5f, values[2 * dim + 3] = 2.5f, values[2 * dim + 9] = -1.0f;
    const kvc::gear_rows rows = make_rows(g, dim, keys, values, 4);
    ASSERT_EQ(rows.compressed_tokens(), 4u);
    ASSERT_EQ(rows.recent_tokens(), 0u);
    const std::uint16_t* s = rows.sparse(1, true);
    const std::uint16_t want_channels[4] = {5, 20, 11, 30};
    const double want_values[4] = {9.0, 7.0, -8.0, -6.0};
    for (int j = 0; j < 4; ++j) {
        EXPECT_EQ(s[2 * j], want_channels[j]) << j;
        EXPECT_EQ(half(s[2 * j + 1]), want_values[j]) << j;
    }
    const std::uint16_t* v = rows.sparse(2, false);
    // Top: 2.5 at ch 3, then 2.5 at ch 7; bottom: -1 at ch 9, then the first 0 (ch 0).
    const std::uint16_t want_v[4] = {3, 7, 9, 0};
    const double want_vv[4] = {2.5, 2.5, -1.0, 0.0};
    for (int j = 0; j < 4; ++j) {
        EXPECT_EQ(v[2 * j], want_v[j]) << j;
        EXPECT_EQ(half(v[2 * j + 1]), want_vv[j]) << j;
    }
    // The quantized part is the row with those channels set to 0, byte for byte.
    std::vector<float> d(keys.begin() + dim, keys.begin() + 2 * dim);
    for (int j = 0; j < 4; ++j) d[want_channels[j]] = 0.0f;
    std::vector<unsigned char> packed(rows.packed().key_row_bytes());
    kk::reference_table().quant.quantize_row[kk::index_of(quant_format::int4_asym)][0](d.data(), packed.data(), dim, 32);
    EXPECT_EQ(std::memcmp(packed.data(), rows.packed().packed_key_row(1), packed.size()), 0);
    // Remaining range: -0.5 .. 3 -> d = 3.5 / 15; each element of token 1 within d / 2 (+ fp16 scale rounding).
    std::vector<float> decoded(dim);
    rows.decode_keys(kk::reference_table(), 1, 1, decoded.data());
    for (std::size_t i = 0; i < dim; ++i) EXPECT_NEAR(decoded[i], keys[dim + i], 3.5 / 15 / 2 * 1.01) << i;
}

// ---------------------------------------------------------------------------
// Power iteration.

TEST(Gear, PowerIterationRecoversAnExactlyRankRMatrix) {
    const std::size_t n = 64, dim = 128;
    for (std::size_t rank = 1; rank <= 4; ++rank)
        for (std::size_t iterations : {1u, 3u}) {
            SCOPED_TRACE("rank " + std::to_string(rank) + ", iterations " + std::to_string(iterations));
            // M = U V^T with U, V of small integers: every entry exact in float.
            const auto u = random_floats(n * rank, 51 + static_cast<std::uint32_t>(rank));
            const auto v = random_floats(dim * rank, 61 + static_cast<std::uint32_t>(rank));
            std::vector<float> m(n * dim, 0.0f);
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t d = 0; d < dim; ++d) {
                    double x = 0.0;
                    for (std::size_t i = 0; i < rank; ++i)
                        x += std::round(4 * u[t * rank + i]) * std::round(4 * v[d * rank + i]);
                    m[t * dim + d] = static_cast<float>(x);
                }
            std::vector<double> p(rank * n), qf(rank * dim);
            kk::gear::power_iteration<kk::reference_arch>(
                [&](std::size_t t, float* row) { std::copy(m.begin() + t * dim, m.begin() + (t + 1) * dim, row); }, n,
                dim, rank, iterations, p.data(), qf.data());
            double diff = 0.0, norm = 0.0;
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t d = 0; d < dim; ++d) {
                    double x = 0.0;
                    for (std::size_t i = 0; i < rank; ++i) x += p[i * n + t] * qf[i * dim + d];
                    diff += (x - m[t * dim + d]) * (x - m[t * dim + d]);
                    norm += static_cast<double>(m[t * dim + d]) * m[t * dim + d];
                }
            EXPECT_LT(std::sqrt(diff / norm), 1e-12); // exact data, double arithmetic
            // P has orthonormal columns.
            for (std::size_t i = 0; i < rank; ++i)
                for (std::size_t j = 0; j <= i; ++j) {
                    double dot = 0.0;
                    for (std::size_t t = 0; t < n; ++t) dot += p[i * n + t] * p[j * n + t];
                    EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-12);
                }
        }
}

// A rank-r part of a generic matrix: L is the best rank-r approximation within
// span(P), so ||R - L|| < ||R|| and a higher rank leaves less.
TEST(Gear, LowRankPartReducesTheStoredError) {
    const std::size_t dim = 128, tokens = 128;
    const auto keys = random_floats(tokens * dim, 71), values = random_floats(tokens * dim, 72);
    double previous = INFINITY;
    for (std::size_t rank : {0u, 1u, 2u, 4u}) {
        const kvc::gear_rows rows = make_rows(gear_of(2, 64, rank), dim, keys, values, tokens);
        const head_values s = stored(rows);
        double error = 0.0;
        for (std::size_t i = 0; i < tokens * dim; ++i) error += (s.keys[i] - keys[i]) * (s.keys[i] - keys[i]);
        EXPECT_LT(error, previous) << "rank " << rank;
        previous = error;
    }
}

// ---------------------------------------------------------------------------
// Attention.

// Prefill in chunks, decode token by token: every output against the double
// oracle over the stored parts; on every instruction set.
TEST(Gear, AttentionMatchesOracleOverStoredPartsOnEveryInstructionSet) {
    arch_guard guard;
    kvc_test::chunked_run run(shape(2, 3, 128), {24, 24, 24, 24}, 40, 81);
    for (std::size_t i = 0; i < run.keys.size(); i += 128) run.keys[i + 9] *= 8.0f; // an outlier channel
    const kvc::cache_config& c = run.config;
    const auto rows_of = [](const gear_cache& cache) {
        std::vector<head_values> heads;
        for (std::size_t h = 0; h < cache.config().kv_heads; ++h) heads.push_back(stored(cache.head(0, h)));
        return heads;
    };
    const auto over_parts = [&](const std::vector<head_values>& heads, const float* query, std::size_t visible) {
        return oracle(c, heads, query, visible);
    };
    for (unsigned bits : {2u, 4u})
        for (kvc::arch_id arch : archs()) {
            SCOPED_TRACE(std::string(kvc::name_of(arch)) + " bits " + std::to_string(bits));
            kvc::set_active_arch(arch);
            gear_cache cache(c, {}, {}, gear_of(bits, 32, 3));
            const double worst = run.worst_error(cache, rows_of, over_parts);
            EXPECT_EQ(cache.head(0, 0).chunks(), run.total / 32);
            EXPECT_EQ(cache.head(0, 0).recent_tokens(), run.total % 32);
            EXPECT_LE(worst, 2e-5);
        }
}

// The kernel of every table against the scalar reference on the same storage:
// logits and outputs, with ragged chunks (after keep) and a partial fp16 segment.
TEST(Gear, KernelOfEveryInstructionSetMatchesTheReference) {
    const std::size_t dim = 128, tokens = 200, group = 4;
    auto keys = random_floats(tokens * dim, 91), values = random_floats(tokens * dim, 92);
    kvc::gear_rows rows = make_rows(gear_of(4, 64, 2), dim, keys, values, tokens);
    std::vector<std::uint32_t> kept;
    for (std::uint32_t t = 0; t < tokens; ++t)
        if (t % 3 != 1 && !(t >= 64 && t < 128 && t != 99)) kept.push_back(t); // chunk 1 keeps one token
    rows.keep(kept.data(), kept.size());
    ASSERT_EQ(rows.chunks(), 3u);
    EXPECT_EQ(rows.chunk_size(1), 1u);
    const std::size_t held = rows.tokens();
    const auto queries = random_floats(group * dim, 93, 1.5f);
    const auto run = [&](const kk::kernel_table& k, std::vector<float>& out, std::vector<float>& logits) {
        std::vector<float> max(group), sum(group), acc(group * dim);
        kk::decode_state s{max.data(), sum.data(), acc.data()};
        kk::common::reset_state<kk::reference_arch>(s, group, dim);
        kk::decode_problem p;
        p.dim = dim;
        p.group = group;
        p.queries = queries.data();
        p.query_stride = dim;
        p.scale = 1.0f / std::sqrt(128.0f);
        logits.assign(group * held, 0.0f);
        p.logits = logits.data();
        p.logits_stride = held;
        rows.attend(k, p, s);
        out.resize(group * dim);
        kk::common::finalize_state<kk::reference_arch>(s, group, dim, out.data(), dim);
    };
    std::vector<float> want, want_logits;
    run(kk::reference_table(), want, want_logits);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        std::vector<float> got, got_logits;
        run(*kk::table_for(arch), got, got_logits);
        for (std::size_t i = 0; i < want_logits.size(); ++i) EXPECT_NEAR(got_logits[i], want_logits[i], 2e-5) << i;
        EXPECT_LT(kvc_test::relative_error(got, want), 2e-6);
    }
    // The logits are the oracle's, token by token.
    const head_values s = stored(rows);
    for (std::size_t g = 0; g < group; ++g) {
        const std::vector<float> q_int8 = kvc_test::dequantized_query(queries.data() + g * dim, dim);
        for (std::size_t t = 0; t < held; ++t) {
            const double dot = s.logit_dot(queries.data() + g * dim, q_int8, t, dim);
            EXPECT_NEAR(want_logits[g * held + t], dot / std::sqrt(128.0), 2e-5) << g << ' ' << t;
        }
    }
}

// keep() moves parts without re-encoding: kept tokens decode to the same bits.
TEST(Gear, KeepIsExactAndDropsEmptyChunks) {
    const std::size_t dim = 64, tokens = 150;
    const auto keys = random_floats(tokens * dim, 94), values = random_floats(tokens * dim, 95);
    kvc::gear_rows rows = make_rows(gear_of(2, 32, 2, 0.05), dim, keys, values, tokens);
    ASSERT_EQ(rows.chunks(), 4u);
    ASSERT_EQ(rows.recent_tokens(), 22u);
    std::vector<float> before_k(tokens * dim), before_v(tokens * dim);
    rows.decode_keys(kk::reference_table(), 0, tokens, before_k.data());
    rows.decode_values(kk::reference_table(), 0, tokens, before_v.data());
    std::vector<std::uint32_t> kept;
    for (std::uint32_t t = 0; t < tokens; ++t)
        if ((t < 32 && t % 2 == 0) || t >= 96) kept.push_back(t); // chunks 1 and 2 go entirely
    kvc::gear_rows copy = rows;
    copy.keep(kept.data(), kept.size());
    EXPECT_EQ(copy.tokens(), kept.size());
    EXPECT_EQ(copy.chunks(), 2u);
    EXPECT_EQ(copy.chunk_size(0), 16u);
    EXPECT_EQ(copy.chunk_size(1), 32u);
    EXPECT_EQ(copy.recent_tokens(), 22u);
    std::vector<float> after_k(kept.size() * dim), after_v(kept.size() * dim);
    copy.decode_keys(kk::reference_table(), 0, kept.size(), after_k.data());
    copy.decode_values(kk::reference_table(), 0, kept.size(), after_v.data());
    for (std::size_t i = 0; i < kept.size(); ++i)
        for (std::size_t d = 0; d < dim; ++d) {
            ASSERT_EQ(after_k[i * dim + d], before_k[kept[i] * dim + d]) << i;
            ASSERT_EQ(after_v[i * dim + d], before_v[kept[i] * dim + d]) << i;
        }
    // Appending continues: the buffer fills to a chunk and compresses.
    copy.reserve_for_append(10);
    for (std::size_t t = 0; t < 10; ++t)
        copy.push_back(kk::reference_table(), kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    EXPECT_EQ(copy.chunks(), 3u);
    EXPECT_EQ(copy.recent_tokens(), 0u);
}

// ---------------------------------------------------------------------------
// Memory.

TEST(Gear, BytesMatchLayoutFormulaAndMemoryResource) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &counter;
    for (unsigned bits : {2u, 4u}) {
        SCOPED_TRACE(bits);
        {
            gear_cache cache(c, {}, {}, gear_of(bits));
            const std::size_t metadata = cache.bytes();
            EXPECT_EQ(metadata, counter.in_use);
            const std::size_t tokens = 300;
            cache.reserve(tokens);
            const auto keys = random_floats(tokens * c.kv_heads * c.head_dim, 96);
            for (std::size_t l = 0; l < c.layers; ++l)
                cache.append(l, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                             token_major(keys.data(), tokens, c.kv_heads, c.head_dim), 0);
            // Per compressed token: two packed rows of 4 groups of (4 + 32 * bits / 8) bytes,
            // and a record of 2 x 2 sparse pairs (4 bytes) + 2 x 2 coefficients (2 bytes).
            const std::size_t row = 4 * (4 + 32 * bits / 8);
            const std::size_t token = 2 * row + 2 * 2 * 4 + 2 * 2 * 2;
            const std::size_t chunk = 4 + 2 * 2 * 128 * 2; // count, key and value B (2 x 128 fp16)
            const std::size_t buffer = 64 * 2 * 128 * 2;   // fp16 keys and values, capacity n_b
            const std::size_t head_bytes = 256 * token + 4 * chunk + buffer;
            for (std::size_t l = 0; l < c.layers; ++l)
                for (std::size_t h = 0; h < c.kv_heads; ++h) {
                    EXPECT_EQ(cache.head(l, h).bytes(), head_bytes);
                    EXPECT_EQ(cache.head(l, h).stored_bytes(), 256 * token + 4 * chunk + 44 * 2 * 128 * 2);
                }
            EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * (head_bytes + tokens * 4));
            EXPECT_EQ(cache.bytes(), counter.in_use);
            // Bits per value as documented in the header.
            EXPECT_NEAR(gear_of(bits).bits_per_value(128), bits == 4 ? 6.25 : 4.25, 0.005);
            // Appending token by token (geometric growth) still counts exactly.
            for (std::size_t t = 0; t < 70; ++t)
                cache.append(0, token_major(keys.data(), 1, c.kv_heads, c.head_dim),
                             token_major(keys.data(), 1, c.kv_heads, c.head_dim), static_cast<std::int64_t>(tokens + t));
            EXPECT_EQ(cache.head(0, 0).chunks(), 5u);
            EXPECT_EQ(cache.bytes(), counter.in_use);
        }
        EXPECT_EQ(counter.in_use, 0u);
    }
}

// ---------------------------------------------------------------------------
// Construction.

TEST(Gear, RejectsUnsupportedParameters) {
    const auto make = [](q::gear g, std::size_t dim) { return error_of([&] { gear_cache cache(shape(1, 1, dim), {}, {}, g); }); };
    const auto contains = [](const std::string& message, const char* part) {
        EXPECT_NE(message.find(part), std::string::npos) << message;
        EXPECT_NE(message.find("kvc::quant::gear"), std::string::npos) << message;
    };
    q::gear g;
    g.bits = 3;
    contains(make(g, 128), "expected bits 2, 4 or 8 for the quantized part, got 3");
    g = {};
    g.group_size = 48;
    contains(make(g, 96), "expected group size 32, 64 or 128, got 48");
    g = {};
    g.group_size = 64;
    contains(make(g, 96), "expected head_dim a multiple of the group size 64, got head_dim 96");
    g = {};
    contains(make(g, 1024), "expected head_dim <= 512, got 1024");
    g.rank = 5;
    contains(make(g, 128), "expected rank 0..4, got 5");
    g = {};
    g.chunk_tokens = 2;
    contains(make(g, 128), "expected chunk_tokens 4..256, got 2");
    g.chunk_tokens = 300;
    contains(make(g, 128), "expected chunk_tokens 4..256, got 300");
    g = {};
    g.outlier_fraction = 0.3;
    contains(make(g, 128), "expected outlier_fraction in 0..0.25, got 0.3");
    g.outlier_fraction = std::numeric_limits<double>::quiet_NaN();
    contains(make(g, 128), "expected outlier_fraction in 0..0.25, got nan");
    g = {};
    g.iterations = 0;
    contains(make(g, 128), "expected 1..16 power iterations, got 0");
    g.rank = 0; // no low-rank part: iterations unused
    EXPECT_EQ(make(g, 128), "(no kvc::error)");
    g = {};
    g.outlier_fraction = 0.25; // 16 per side for 128: at the limit
    EXPECT_EQ(make(g, 128), "(no kvc::error)");
    contains(make(g, 256), "expected at most min(16, head_dim / 4) outliers per side, got 32 for head_dim 256");
}

// ---------------------------------------------------------------------------
// NaN and Inf.

// A non-finite row must not spread through the chunk's factors: every other
// token stores exactly what it would if that row were all zeros (a row whose
// residual is 0, the same as excluding it). Other heads are untouched, the
// head's attention is NaN, and evicting the token restores finite outputs.
TEST(Gear, NonFiniteInputPoisonsOnlyItsTokenAndHead) {
    arch_guard guard;
    const auto c = shape(2, 2, 128);
    const std::size_t tokens = 80, bad = 25, row = c.kv_heads * c.head_dim; // 64 compressed, 16 in fp16
    const auto queries = random_floats(c.query_heads * c.head_dim, 97);
    for (float special : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
        for (std::size_t where : {bad, std::size_t{70}}) { // compressed, or still in the fp16 buffer
            for (kvc::arch_id arch : archs()) {
                SCOPED_TRACE(std::string(kvc::name_of(arch)) + " special " + std::to_string(special) + " at " +
                             std::to_string(where));
                kvc::set_active_arch(arch);
                auto keys = random_floats(tokens * row, 98), values = random_floats(tokens * row, 99);
                auto zeroed_keys = keys; // head 0's key row of the bad token all zeros
                for (std::size_t d = 0; d < c.head_dim; ++d) zeroed_keys[where * row + d] = 0.0f;
                keys[where * row + 40] = special; // head 0, key element 40 (group 1)
                gear_cache clean(c, {}, {}, gear_of(4)), dirty(c, {}, {}, gear_of(4));
                clean.append(0, token_major(zeroed_keys.data(), tokens, 2, 128),
                             token_major(values.data(), tokens, 2, 128), 0);
                dirty.append(0, token_major(keys.data(), tokens, 2, 128), token_major(values.data(), tokens, 2, 128), 0);
                const head_values a = stored(clean.head(0, 0)), b = stored(dirty.head(0, 0));
                for (std::size_t t = 0; t < tokens; ++t)
                    for (std::size_t d = 0; d < c.head_dim; ++d) {
                        if (t == where) continue;
                        ASSERT_EQ(a.keys[t * 128 + d], b.keys[t * 128 + d]) << t << ' ' << d;
                        ASSERT_EQ(a.values[t * 128 + d], b.values[t * 128 + d]) << t << ' ' << d;
                    }
                // The bad token's key holds a non-finite value at element 40 (NaN in its group
                // once compressed; the fp16 value itself while buffered); its value row is clean.
                EXPECT_FALSE(std::isfinite(b.keys[where * 128 + 40]));
                for (std::size_t d = 0; d < 128; ++d) EXPECT_TRUE(std::isfinite(b.values[where * 128 + d]));
                // Head 1: identical to a run without the bad value.
                gear_cache plain(c, {}, {}, gear_of(4));
                auto original = random_floats(tokens * row, 98);
                plain.append(0, token_major(original.data(), tokens, 2, 128), token_major(values.data(), tokens, 2, 128), 0);
                const head_values p1 = stored(plain.head(0, 1)), d1 = stored(dirty.head(0, 1));
                EXPECT_EQ(p1.keys, d1.keys);
                EXPECT_EQ(p1.values, d1.values);
                std::vector<float> out(c.query_heads * c.head_dim), full_out(out.size());
                dirty.attend(0, queries.data(), out.data());
                kvc::full_cache full(c); // fp16, what the buffer holds
                full.append(0, token_major(keys.data(), tokens, 2, 128), token_major(values.data(), tokens, 2, 128), 0);
                full.attend(0, queries.data(), full_out.data());
                const bool buffered = where >= 64;
                for (std::size_t j = 0; j < c.query_heads; ++j) {
                    const float x = out[j * c.head_dim];
                    if (j >= 2) EXPECT_TRUE(std::isfinite(x)) << j;
                    // Compressed: its key group is NaN. Buffered: as full_cache (an infinite key
                    // gives a logit of +inf -> NaN, or -inf -> weight 0, by the sign of q . k).
                    else if (!buffered) EXPECT_TRUE(std::isnan(x)) << j;
                    else EXPECT_EQ(std::isnan(x), std::isnan(full_out[j * c.head_dim])) << j;
                }
                // Evict it from head 0 (keep every other token): finite and equal to the oracle.
                std::vector<std::uint32_t> kept;
                for (std::uint32_t t = 0; t < tokens; ++t)
                    if (t != where) kept.push_back(t);
                kvc::gear_rows healed = dirty.head(0, 0);
                healed.keep(kept.data(), kept.size());
                std::vector<float> max(2), sum(2), acc(2 * 128), healed_out(2 * 128);
                kk::decode_state s{max.data(), sum.data(), acc.data()};
                kk::common::reset_state<kk::reference_arch>(s, 2, 128);
                kk::decode_problem p;
                p.group = 2;
                p.dim = 128;
                p.queries = queries.data();
                p.query_stride = 128;
                p.scale = c.logit_scale();
                healed.attend(kk::active(), p, s);
                kk::common::finalize_state<kk::reference_arch>(s, 2, 128, healed_out.data(), 128);
                const std::vector<head_values> heads{stored(healed), stored(healed)};
                auto c1 = shape(1, 2, 128);
                EXPECT_LE(worst_head_error(c1, healed_out.data(), oracle(c1, heads, queries.data(), kept.size())), 2e-5);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fidelity against full_cache (f32).

template <class Q>
double error_against_full(const Q& policy, const std::vector<float>& keys, const std::vector<float>& values,
                          const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    auto c = shape(4, 4, 128);
    c.storage = kvc::dtype::f32;
    return kvc_test::mean_error_against_full(quant_cache<Q>(c, {}, {}, policy, {}), keys, values, queries, tokens,
                                             steps);
}

TEST(Gear, BeatsItsPlainQuantizerAndImprovesWithBits) {
    const std::size_t tokens = 512, steps = 8;
    for (bool outlier_channels : {false, true}) {
        SCOPED_TRACE(outlier_channels ? "outlier channels" : "gaussian");
        auto keys = random_floats(tokens * 4 * 128, 101), values = random_floats(tokens * 4 * 128, 102);
        if (outlier_channels)
            for (std::size_t i = 0; i < keys.size(); i += 128)
                for (std::size_t ch : {3u, 40u, 77u, 120u}) keys[i + ch] *= 10.0f, values[i + ch] *= 10.0f;
        const auto queries = random_floats(steps * 16 * 128, 103);
        const double q4 = error_against_full(q::q4_1{}, keys, values, queries, tokens, steps);
        const double q2 = error_against_full(q::block<q::int2_asym, 32>{}, keys, values, queries, tokens, steps);
        const double g4 = error_against_full(gear_of(4), keys, values, queries, tokens, steps);
        const double g2 = error_against_full(gear_of(2), keys, values, queries, tokens, steps);
        const double g2r4 = error_against_full(gear_of(2, 64, 4), keys, values, queries, tokens, steps);
        std::cout << "[ kvc      ] " << (outlier_channels ? "outlier channels" : "gaussian")
                  << ": relative error vs full_cache f32: int4_asym " << q4 << ", gear 4-bit " << g4 << ", int2_asym "
                  << q2 << ", gear 2-bit " << g2 << ", gear 2-bit rank 4 " << g2r4 << std::endl;
        EXPECT_LT(g4, q4);
        EXPECT_LT(g2, q2);
        EXPECT_LT(g4, g2);
        EXPECT_LT(g2r4, g2);
    }
}

} // namespace
