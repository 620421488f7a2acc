// Q1 block codecs (kvc::quant::block / block_kv, with Q5 key/value formats
// and Q9 sinks) inside compressed_cache, on every instruction set:
// attention against a double oracle over the values the storage holds,
// error against full_cache decreasing with bits, bytes() against each
// layout's formula and a counting memory resource, construction errors,
// NaN/Inf isolation, keep() compaction, sink tokens in full precision, and
// eviction running on packed storage.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "quantization/codec_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/storage/packed_rows.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

namespace q = kvc::quant;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kvc::kernels::quant_format;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;
using kvc_test::exact_query;
using kvc_test::int8_query;
using kvc_test::oracle_over_stored;
using kvc_test::query_map;
using kvc_test::shape;
using kvc_test::stored;
using kvc_test::stored_heads;
using kvc_test::stored_rows;
using kvc_test::worst_head_error;

template <class Q>
using quant_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Q, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<q::q4_0>);
static_assert(std::is_same_v<q::q4_0, q::block_kv<q::int4_sym, q::int4_sym, 32, 0>>);
static_assert(q::q8_0::key_bits_per_value() == 8.5 && q::q4_0::key_bits_per_value() == 4.5 &&
              q::q4_1::key_bits_per_value() == 5.0);
static_assert(q::block<q::int2_asym, 128>::value_bits_per_value() == 2.25);
static_assert(q::block<q::fp8_e4m3, 64>::key_bits_per_value() == 8.25);
static_assert(!quant_cache<q::q4_0>::collects_attention_stats && !quant_cache<q::q4_0>::collects_queries);

// Packed rows of an integer key format are scored against the dequantized
// int8 query (kernels/quant/common.hpp), fp8 rows and the fp16 sink rows
// against the fp32 query.
query_map key_query(quant_format key_format) { return kvc_test::quantizes_query(key_format) ? int8_query : exact_query; }

// ---------------------------------------------------------------------------

template <class Q>
class BlockCodec : public ::testing::Test {};
using codecs = ::testing::Types<q::q8_0, q::q4_0, q::q4_1, q::block<q::int2_asym, 64>, q::block<q::fp8_e4m3, 128>,
                                q::block<q::fp8_e5m2, 32>, q::block_kv<q::int8_sym, q::int2_asym, 64>,
                                q::block<q::int4_sym, 32, 3>>;
TYPED_TEST_SUITE(BlockCodec, codecs);

// Prefill in chunks and decode token by token; every output against the
// oracle over the stored values (only float rounding differs), on every set.
TYPED_TEST(BlockCodec, AttentionMatchesOracleOverStoredValuesOnEveryInstructionSet) {
    arch_guard guard;
    const kvc_test::chunked_run run(shape(3, 2, 128), {32, 32, 32}, 9, 41);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        quant_cache<TypeParam> cache(run.config);
        EXPECT_LE(run.worst_error_over_stored(cache, key_query(TypeParam::layout().key_format)), 2e-5);
    }
}

// bytes(): packed rows (scales and minimums inside) and fp16 sinks, exactly
// the layout's formula after an exact reserve, and exactly what the memory
// resource handed out.
TYPED_TEST(BlockCodec, BytesMatchLayoutFormulaAndMemoryResource) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &counter;
    {
        quant_cache<TypeParam> cache(c);
        const std::size_t metadata = cache.bytes();
        EXPECT_EQ(metadata, counter.in_use);
        const std::size_t tokens = 300;
        cache.reserve(tokens);
        const auto keys = random_floats(tokens * c.kv_heads * c.head_dim, 44);
        for (std::size_t l = 0; l < c.layers; ++l)
            cache.append(l, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                         token_major(keys.data(), tokens, c.kv_heads, c.head_dim), 0);
        const kvc::packed_layout layout = TypeParam::layout();
        const std::size_t sinks = std::min(tokens, TypeParam::sink_tokens);
        // Per token and head: the two rows, dim / G groups each of header + payload.
        const auto group_bytes = [&](quant_format f) { return kvc::kernels::info_of(f).group_bytes(TypeParam::group_size); };
        const std::size_t packed_token = c.head_dim / TypeParam::group_size *
                                         (group_bytes(layout.key_format) + group_bytes(layout.value_format));
        const std::size_t head_bytes = (tokens - sinks) * packed_token + sinks * 2 * c.head_dim * 2;
        for (std::size_t l = 0; l < c.layers; ++l)
            for (std::size_t h = 0; h < c.kv_heads; ++h) EXPECT_EQ(cache.head(l, h).bytes(), head_bytes);
        // Positions: one int32 per token and head (the cache's own bookkeeping).
        EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * (head_bytes + tokens * 4));
        EXPECT_EQ(cache.bytes(), counter.in_use);
        // Bits per value as documented (keys and values averaged, no sinks).
        if (TypeParam::sink_tokens == 0) {
            EXPECT_DOUBLE_EQ(8.0 * packed_token / (2.0 * c.head_dim),
                             (TypeParam::key_bits_per_value() + TypeParam::value_bits_per_value()) / 2.0);
        }
    }
    EXPECT_EQ(counter.in_use, 0u);
}

TEST(BlockCodec, Q4_0RowsAre72BytesPer128Elements) {
    // 128 dims: 4 groups x 18 bytes per row; fp16 would be 256 bytes per row.
    const auto c = shape(1, 1, 128);
    quant_cache<q::q4_0> cache(c);
    cache.reserve(10);
    const auto keys = random_floats(10 * 128, 45);
    cache.append(0, token_major(keys.data(), 10, 1, 128), token_major(keys.data(), 10, 1, 128), 0);
    EXPECT_EQ(cache.head(0, 0).bytes(), 10u * 2 * 72);
    EXPECT_EQ(cache.head(0, 0).key_row_bytes(), 72u);
}

// ---------------------------------------------------------------------------
// Fidelity against full_cache.

template <class Q>
double error_against_full(const std::vector<float>& keys, const std::vector<float>& values,
                          const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    return kvc_test::mean_error_against_full(quant_cache<Q>(shape(4, 4, 128)), keys, values, queries, tokens, steps);
}

TEST(BlockCodec, ErrorAgainstFullCacheDecreasesWithBits) {
    const std::size_t tokens = 512, steps = 8;
    auto keys = random_floats(tokens * 4 * 128, 46), values = random_floats(tokens * 4 * 128, 47);
    for (std::size_t i = 0; i < keys.size(); i += 128) keys[i + 5] *= 6.0f; // an outlier channel
    const auto queries = random_floats(steps * 16 * 128, 48, 2.0f);
    const double e8 = error_against_full<q::q8_0>(keys, values, queries, tokens, steps);
    const double e4 = error_against_full<q::q4_0>(keys, values, queries, tokens, steps);
    const double e4a = error_against_full<q::q4_1>(keys, values, queries, tokens, steps);
    const double e2 = error_against_full<q::block<q::int2_asym, 32>>(keys, values, queries, tokens, steps);
    const double fp8a = error_against_full<q::block<q::fp8_e4m3, 32>>(keys, values, queries, tokens, steps);
    const double fp8b = error_against_full<q::block<q::fp8_e5m2, 32>>(keys, values, queries, tokens, steps);
    const double k8v2 = error_against_full<q::block_kv<q::int8_sym, q::int2_asym, 32>>(keys, values, queries, tokens, steps);
    const double k2v8 = error_against_full<q::block_kv<q::int2_asym, q::int8_sym, 32>>(keys, values, queries, tokens, steps);
    std::cout << "[ kvc      ] relative error vs full_cache f16: q8_0 " << e8 << ", q4_0 " << e4 << ", q4_1 " << e4a
              << ", int2 " << e2 << ", e4m3 " << fp8a << ", e5m2 " << fp8b << ", K8V2 " << k8v2 << ", K2V8 " << k2v8
              << std::endl;
    EXPECT_LT(e8, 0.05); // sharp logits (queries of std 2) and an outlier channel make this a hard case
    EXPECT_LT(e8, e4);
    EXPECT_LT(e4, e2);
    EXPECT_LT(e4a, e2);
    EXPECT_LT(e8, fp8a);   // 8-bit integers beat 3 mantissa bits at the same size
    EXPECT_LT(fp8a, fp8b); // 3 mantissa bits beat 2
    EXPECT_LT(fp8a, e4);
}

// ---------------------------------------------------------------------------
// Construction.

TEST(BlockCodec, RejectsUnsupportedHeadDimGroupSizeAndBitWidth) {
    const std::string dim = error_of([] { quant_cache<q::block<q::int4_sym, 64>> cache(shape(1, 1, 96)); });
    EXPECT_NE(dim.find("kvc::quant::block"), std::string::npos) << dim;
    EXPECT_NE(dim.find("expected head_dim a multiple of the group size 64, got head_dim 96"), std::string::npos) << dim;
    const std::string dim72 = error_of([] { quant_cache<q::q8_0> cache(shape(2, 2, 72)); });
    EXPECT_NE(dim72.find("multiple of the group size 32, got head_dim 72"), std::string::npos) << dim72;

    kvc::packed_layout layout;
    layout.group_size = 48;
    const std::string group = error_of([&] { kvc::packed_rows rows(layout, 96, kvc::default_resource()); });
    EXPECT_NE(group.find("expected group size 32, 64 or 128, got 48"), std::string::npos) << group;

    // Direct users of packed_rows can ask for more than a cache allows; the
    // kernels' quantized-query buffers hold 1024 elements.
    layout.group_size = 32;
    const std::string wide = error_of([&] { kvc::packed_rows rows(layout, 1056, kvc::default_resource()); });
    EXPECT_NE(wide.find("expected head_dim at most 1024, got 1056"), std::string::npos) << wide;

    layout.value_format = static_cast<quant_format>(7);
    const std::string format = error_of([&] { kvc::packed_rows rows(layout, 64, kvc::default_resource()); });
    EXPECT_NE(format.find("expected key and value formats int8_sym, int4_sym"), std::string::npos) << format;

    const std::string bits = error_of([] { (void)q::integer_format(3, true); });
    EXPECT_NE(bits.find("expected 8 bits symmetric, 4 bits (either) or 2 bits asymmetric, got 3 bits symmetric"),
              std::string::npos)
        << bits;
    EXPECT_NE(error_of([] { (void)q::integer_format(8, false); }).find("got 8 bits asymmetric"), std::string::npos);
    EXPECT_EQ(q::integer_format(2, false), quant_format::int2_asym);
    EXPECT_EQ(q::integer_format(4, false), quant_format::int4_asym);
}

// ---------------------------------------------------------------------------
// NaN and Inf in appended data.

TEST(BlockCodec, NonFiniteInputPoisonsOnlyItsGroupAndHead) {
    arch_guard guard;
    const auto c = shape(2, 2, 128);
    const std::size_t tokens = 40, bad = 25, row = c.kv_heads * c.head_dim;
    for (float special : {std::numeric_limits<float>::quiet_NaN(), INFINITY}) {
        for (kvc::arch_id arch : archs()) {
            SCOPED_TRACE(std::string(kvc::name_of(arch)) + " special " + std::to_string(special));
            kvc::set_active_arch(arch);
            auto keys = random_floats(tokens * row, 49), values = random_floats(tokens * row, 50);
            quant_cache<q::q4_0> clean(c), dirty(c);
            clean.append(0, token_major(keys.data(), tokens, 2, 128), token_major(values.data(), tokens, 2, 128), 0);
            keys[bad * row + 0 * 128 + 40] = special; // head 0, key group 1 (elements 32..63)
            dirty.append(0, token_major(keys.data(), tokens, 2, 128), token_major(values.data(), tokens, 2, 128), 0);
            // Storage: only head 0, token `bad`, key group 1 differs; it decodes to NaN.
            for (std::size_t h = 0; h < 2; ++h) {
                const stored_rows a = stored(clean, 0, h), b = stored(dirty, 0, h);
                EXPECT_EQ(a.values, b.values);
                for (std::size_t i = 0; i < a.keys.size(); ++i) {
                    const bool poisoned = h == 0 && i / 128 == bad && i % 128 / 32 == 1;
                    if (poisoned) EXPECT_TRUE(std::isnan(b.keys[i])) << i;
                    else EXPECT_EQ(a.keys[i], b.keys[i]) << "head " << h << " element " << i;
                }
            }
            // Attention: head 0's query group sees the NaN logit; head 1's does not.
            const auto queries = random_floats(c.query_heads * 128, 51);
            std::vector<float> out(c.query_heads * 128), reference(out.size());
            dirty.attend(0, queries.data(), out.data());
            clean.attend(0, queries.data(), reference.data());
            for (std::size_t j = 0; j < c.query_heads; ++j)
                for (std::size_t d = 0; d < 128; ++d) {
                    if (j / c.group() == 0) EXPECT_TRUE(std::isnan(out[j * 128 + d]));
                    else EXPECT_EQ(out[j * 128 + d], reference[j * 128 + d]);
                }
        }
    }
}

// keep() without the poisoned token restores finite attention, identical to
// storage that never saw it.
TEST(PackedRows, EvictingThePoisonedTokenRestoresAttention) {
    arch_guard guard;
    const std::size_t dim = 64, tokens = 30, bad = 12;
    kvc::packed_layout layout;
    layout.key_format = quant_format::int4_asym;
    layout.value_format = quant_format::int8_sym;
    layout.group_size = 32;
    auto keys = random_floats(tokens * dim, 52);
    const auto values = random_floats(tokens * dim, 53);
    keys[bad * dim + 3] = std::numeric_limits<float>::quiet_NaN();
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        const auto& k = kvc::kernels::active();
        kvc::packed_rows with(layout, dim, kvc::default_resource()), without(layout, dim, kvc::default_resource());
        with.reserve(tokens);
        without.reserve(tokens);
        std::vector<std::uint32_t> kept;
        for (std::size_t t = 0; t < tokens; ++t) {
            with.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
            if (t != bad) {
                without.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
                kept.push_back(static_cast<std::uint32_t>(t));
            }
        }
        const auto attend = [&](const kvc::packed_rows& rows) {
            const auto q = random_floats(2 * dim, 54);
            std::vector<float> max(2), sum(2), acc(2 * dim), out(2 * dim);
            const kvc::kernels::decode_state state{max.data(), sum.data(), acc.data()};
            kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(state, 2, dim);
            kvc::kernels::decode_problem p;
            p.group = 2;
            p.queries = q.data();
            p.query_stride = dim;
            p.scale = 0.125f;
            rows.attend(k, p, state);
            kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(state, 2, dim, out.data(), dim);
            return out;
        };
        const auto poisoned = attend(with);
        EXPECT_TRUE(std::isnan(poisoned[0]));
        with.keep(kept.data(), kept.size());
        EXPECT_EQ(with.tokens(), tokens - 1);
        EXPECT_EQ(attend(with), attend(without));
    }
}

// ---------------------------------------------------------------------------
// keep() and sinks.

TEST(PackedRows, KeepCompactsSinkAndPackedRows) {
    const std::size_t dim = 128, tokens = 20;
    kvc::packed_layout layout;
    layout.key_format = quant_format::int4_sym;
    layout.value_format = quant_format::int2_asym;
    layout.group_size = 64;
    layout.sink_tokens = 3;
    const auto& k = kvc::kernels::active();
    kvc::packed_rows rows(layout, dim, kvc::default_resource());
    rows.reserve(tokens);
    const auto keys = random_floats(tokens * dim, 55), values = random_floats(tokens * dim, 56);
    for (std::size_t t = 0; t < tokens; ++t) rows.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    EXPECT_EQ(rows.sink_tokens(), 3u);
    EXPECT_EQ(rows.packed_tokens(), 17u);
    std::vector<float> before_k(tokens * dim), before_v(tokens * dim);
    rows.decode_keys(k, 0, tokens, before_k.data());
    rows.decode_values(k, 0, tokens, before_v.data());
    // Sinks are fp16 copies of the input; packed rows are not.
    for (std::size_t i = 0; i < 3 * dim; ++i)
        EXPECT_EQ(before_k[i], kvc::to_float(kvc::to_half(keys[i])));

    const std::vector<std::uint32_t> kept = {0, 2, 5, 7, 19};
    rows.keep(kept.data(), kept.size());
    EXPECT_EQ(rows.tokens(), 5u);
    EXPECT_EQ(rows.sink_tokens(), 2u);
    EXPECT_EQ(rows.packed_tokens(), 3u);
    std::vector<float> after_k(5 * dim), after_v(5 * dim);
    rows.decode_keys(k, 0, 5, after_k.data());
    rows.decode_values(k, 0, 5, after_v.data());
    for (std::size_t i = 0; i < kept.size(); ++i)
        for (std::size_t d = 0; d < dim; ++d) {
            EXPECT_EQ(after_k[i * dim + d], before_k[kept[i] * dim + d]);
            EXPECT_EQ(after_v[i * dim + d], before_v[kept[i] * dim + d]);
        }
    // A token appended after packed rows exist is packed, even with a sink slot free.
    rows.reserve_for_append(1);
    rows.push_back(k, kvc::dtype::f32, keys.data(), values.data());
    EXPECT_EQ(rows.sink_tokens(), 2u);
    EXPECT_EQ(rows.packed_tokens(), 4u);
    // Memory goes back on shrink_to_fit.
    rows.shrink_to_fit();
    EXPECT_EQ(rows.bytes(), 2 * 2 * dim * 2 + 4 * (rows.key_row_bytes() + rows.value_row_bytes()));
    // Keeping only sinks empties the packed body; the next token fills a sink slot again.
    const std::vector<std::uint32_t> sinks_only = {0};
    rows.keep(sinks_only.data(), 1);
    rows.reserve_for_append(1);
    rows.push_back(k, kvc::dtype::f32, keys.data(), values.data());
    EXPECT_EQ(rows.sink_tokens(), 2u);
    EXPECT_EQ(rows.packed_tokens(), 0u);
}

// The first n tokens reproduce full precision: attention over only sink
// tokens is bit-identical to full_cache fp16 (the same fp16 kernel runs).
TEST(BlockCodec, SinkTokensAreFullPrecision) {
    arch_guard guard;
    const auto c = shape(2, 4, 64);
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const auto keys = random_floats(12 * row, 57), values = random_floats(12 * row, 58);
    const auto queries = random_floats(12 * qrow, 59);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        kvc::full_cache full(c);
        quant_cache<q::block<q::int2_asym, 32, 4>> packed(c);
        // Prefill of 4 tokens (all sinks), then decode steps.
        full.append(0, token_major(keys.data(), 4, 2, 64), token_major(values.data(), 4, 2, 64), 0);
        packed.append(0, token_major(keys.data(), 4, 2, 64), token_major(values.data(), 4, 2, 64), 0);
        std::vector<float> a(4 * qrow), b(4 * qrow);
        full.attend_chunk(0, queries.data(), 4, a.data());
        packed.attend_chunk(0, queries.data(), 4, b.data());
        EXPECT_EQ(a, b) << "prefill over sink tokens";
        std::vector<float> x(qrow), y(qrow);
        full.attend(0, queries.data(), x.data());
        packed.attend(0, queries.data(), y.data());
        EXPECT_EQ(x, y) << "decode over sink tokens";
        const stored_rows h = stored(packed, 0, 1);
        for (std::size_t t = 0; t < 4; ++t)
            for (std::size_t d = 0; d < 64; ++d)
                EXPECT_EQ(h.keys[t * 64 + d], kvc::to_float(kvc::to_half(keys[t * row + 64 + d])));
        // Later tokens are packed: 2-bit values now differ from fp16.
        full.append(0, token_major(keys.data() + 4 * row, 8, 2, 64), token_major(values.data() + 4 * row, 8, 2, 64), 4);
        packed.append(0, token_major(keys.data() + 4 * row, 8, 2, 64), token_major(values.data() + 4 * row, 8, 2, 64), 4);
        EXPECT_EQ(packed.head(0, 0).sink_tokens(), 4u);
        EXPECT_EQ(packed.head(0, 0).packed_tokens(), 8u);
        full.attend(0, queries.data(), x.data());
        packed.attend(0, queries.data(), y.data());
        EXPECT_NE(x, y);
    }
}

// ---------------------------------------------------------------------------
// Composition.

TEST(BlockCodec, EvictionRunsOnPackedStorage) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 100, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 60), values = random_floats(tokens * row, 61);
    using evicting = kvc::compressed_cache<kvc::evict::knorm, kvc::merge::none, q::block<q::int4_asym, 32, 2>,
                                           kvc::project::none>;
    evicting cache(c, kvc::evict::knorm(kvc::evict::budget::absolute(40, 4, 8)));
    quant_cache<q::block<q::int4_asym, 32, 2>> twin(c);
    cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    twin.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    const std::size_t before = cache.bytes();
    cache.compress();
    EXPECT_LT(cache.bytes(), before);
    for (std::size_t h = 0; h < 2; ++h) {
        ASSERT_EQ(cache.tokens(0, h), 40u);
        const stored_rows kept = stored(cache, 0, h), all = stored(twin, 0, h);
        const std::int32_t* positions = cache.positions(0, h);
        for (std::size_t i = 0; i < 40; ++i)
            for (std::size_t d = 0; d < 64; ++d) {
                EXPECT_EQ(kept.keys[i * 64 + d], all.keys[positions[i] * 64 + d]);
                EXPECT_EQ(kept.values[i * 64 + d], all.values[positions[i] * 64 + d]);
            }
    }
    const auto queries = random_floats(c.query_heads * 64, 62);
    std::vector<float> out(c.query_heads * 64);
    cache.attend(0, queries.data(), out.data());
    EXPECT_LE(worst_head_error(c, out.data(),
                               oracle_over_stored(c, stored_heads(cache), queries.data(), 40, int8_query)),
              2e-5);
}

TEST(BlockCodec, CopiesAreIndependentAndIdentical) {
    const auto c = shape(2, 2, 64);
    const auto keys = random_floats(50 * 128, 63);
    quant_cache<q::q4_1> a(c);
    a.append(0, token_major(keys.data(), 50, 2, 64), token_major(keys.data(), 50, 2, 64), 0);
    quant_cache<q::q4_1> b(a);
    EXPECT_EQ(a.bytes(), b.bytes());
    const auto queries = random_floats(4 * 64, 64);
    std::vector<float> x(4 * 64), y(4 * 64);
    a.attend(0, queries.data(), x.data());
    b.attend(0, queries.data(), y.data());
    EXPECT_EQ(x, y);
    a.clear();
    b.attend(0, queries.data(), y.data());
    EXPECT_EQ(x, y);
}

} // namespace
