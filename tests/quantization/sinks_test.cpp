// Q9 sink protection for any codec (kvc::quant::with_sinks) inside
// compressed_cache, with several inner codecs, on every instruction set:
// sinks alone bit-identical to full_cache fp16; attention against a double
// oracle over the stored values (fp16 sink rows, decoded inner rows); chunked
// prefill straddling the sink boundary equal to decode step by step; bytes()
// against the layout formula and a counting memory resource; eviction of
// sinks and inner tokens; NaN isolation; construction errors; and a hand-made
// case where the sinks draw most attention and keeping them exact pays.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

namespace q = kvc::quant;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;
using kvc_test::exact_query;
using kvc_test::int8_query;
using kvc_test::oracle_over_stored;
using kvc_test::query_map;
using kvc_test::rotated_int8_query;
using kvc_test::shape;
using kvc_test::stored;
using kvc_test::stored_rows;
using kvc_test::worst_head_error;

template <class Q, class E = kvc::evict::none>
using cache_of = kvc::compressed_cache<E, kvc::merge::none, Q, kvc::project::none>;

using sparse4 = q::with_sinks<q::sparse, 4>;
using q4_0_4 = q::with_sinks<q::q4_0, 4>;
using kivi4 = q::with_sinks<q::kivi<2>, 4>;
using rotated4 = q::with_sinks<q::rotated<q::q4_0>, 4>;
using mixed4 = q::with_sinks<q::mixed<q::int8_sym, q::int2_asym, 32>, 4>;

static_assert(kvc::is_quantization_policy_v<sparse4>);
static_assert(!kvc::detail::wants_positions<sparse4::head_storage>::value);
static_assert(kvc::detail::has_compacted<sparse4::head_storage>::value);
static_assert(kvc::detail::has_assign_precision<mixed4::head_storage>::value);
static_assert(!kvc::detail::has_assign_precision<sparse4::head_storage>::value);

float fp16(float x) { return kvc::to_float(kvc::to_half(x)); }

template <class Cache>
void append(Cache& cache, const std::vector<float>& keys, const std::vector<float>& values, std::size_t first,
            std::size_t count) {
    const auto& c = cache.config();
    const std::size_t row = c.kv_heads * c.head_dim;
    cache.append(0, token_major(keys.data() + first * row, count, c.kv_heads, c.head_dim),
                 token_major(values.data() + first * row, count, c.kv_heads, c.head_dim),
                 static_cast<std::int64_t>(first));
}

// ---------------------------------------------------------------------------
// Sinks alone: full_cache fp16 bit for bit (attend, attend_chunk, mass).

template <class Q>
void expect_sinks_only_identical_to_full(const Q& policy) {
    const auto c = shape(2, 3, 64);
    const std::size_t tokens = 4, qrow = c.query_heads * c.head_dim, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 11), values = random_floats(tokens * row, 12);
    const auto queries = random_floats(tokens * qrow, 13);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cache_of<Q> cache(c, {}, {}, policy);
        kvc::full_cache full(c);
        // A chunk of 3 (prefill), then one decode token: 4 tokens, all sinks.
        append(cache, keys, values, 0, 3);
        append(full, keys, values, 0, 3);
        std::vector<float> a(3 * qrow), b(3 * qrow), ma(3 * c.kv_heads), mb(3 * c.kv_heads);
        full.attend_chunk(0, queries.data(), 3, a.data(), ma.data());
        cache.attend_chunk(0, queries.data(), 3, b.data(), mb.data());
        for (std::size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << "prefill output " << i;
        for (std::size_t i = 0; i < ma.size(); ++i) ASSERT_EQ(ma[i], mb[i]) << "prefill mass " << i;
        append(cache, keys, values, 3, 1);
        append(full, keys, values, 3, 1);
        ASSERT_EQ(cache.head(0, 0).sink_tokens(), 4u);
        ASSERT_EQ(cache.head(0, 0).inner_tokens(), 0u);
        std::vector<float> d(qrow), e(qrow), md(4 * c.kv_heads), me(4 * c.kv_heads);
        full.attend(0, queries.data() + 3 * qrow, d.data(), md.data());
        cache.attend(0, queries.data() + 3 * qrow, e.data(), me.data());
        for (std::size_t i = 0; i < d.size(); ++i) ASSERT_EQ(d[i], e[i]) << "decode output " << i;
        for (std::size_t i = 0; i < md.size(); ++i) ASSERT_EQ(md[i], me[i]) << "decode mass " << i;
    }
}

TEST(WithSinks, SinksAloneAreFullCacheFp16BitForBit) {
    arch_guard guard;
    {
        SCOPED_TRACE("sparse");
        expect_sinks_only_identical_to_full(sparse4{q::sparse(0.5)});
    }
    {
        SCOPED_TRACE("q4_0");
        expect_sinks_only_identical_to_full(q4_0_4{});
    }
    {
        SCOPED_TRACE("kivi<2>");
        expect_sinks_only_identical_to_full(kivi4{});
    }
    {
        SCOPED_TRACE("rotated<q4_0>");
        expect_sinks_only_identical_to_full(rotated4{});
    }
    {
        SCOPED_TRACE("mixed");
        expect_sinks_only_identical_to_full(mixed4{});
    }
}

// ---------------------------------------------------------------------------
// More tokens: prefill in chunks (the first straddling the boundary), then
// decode; every output against the double oracle over what the head stores.

template <class Q>
void expect_matches_oracle(const Q& policy, double tolerance, const query_map& inner = exact_query) {
    const kvc_test::chunked_run run(shape(2, 2, 64), {7, 30, 27}, 6, 21);
    const kvc::cache_config& c = run.config;
    const std::size_t row = run.row(), total = run.total;
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cache_of<Q> cache(c, {}, {}, policy);
        EXPECT_LE(run.worst_error_over_stored(cache, inner), tolerance);
        // The first 4 tokens are the input's fp16 values; the rest are the inner codec's.
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const auto& head = cache.head(0, h);
            ASSERT_EQ(head.sink_tokens(), 4u);
            ASSERT_EQ(head.inner_tokens(), total - 4);
            const stored_rows v = stored(head, c.head_dim);
            for (std::size_t t = 0; t < 4; ++t)
                for (std::size_t d = 0; d < c.head_dim; ++d) {
                    ASSERT_EQ(v.keys[t * c.head_dim + d], fp16(run.keys[t * row + h * c.head_dim + d]));
                    ASSERT_EQ(v.values[t * c.head_dim + d], fp16(run.values[t * row + h * c.head_dim + d]));
                }
            std::vector<float> inner(4 * c.head_dim);
            head.inner().decode_keys(kvc::kernels::reference_table(), 2, 4, inner.data());
            for (std::size_t i = 0; i < inner.size(); ++i) ASSERT_EQ(inner[i], v.keys[6 * c.head_dim + i]);
        }
    }
}

TEST(WithSinks, AttentionMatchesOracleOverStoredValuesOnEveryInstructionSet) {
    arch_guard guard;
    {
        SCOPED_TRACE("sparse");
        expect_matches_oracle(sparse4{q::sparse(0.5)}, 2e-5);
    }
    {
        SCOPED_TRACE("q4_0");
        expect_matches_oracle(q4_0_4{}, 2e-5, int8_query);
    }
    {
        SCOPED_TRACE("kivi<2> (residual 32: blocks form)");
        expect_matches_oracle(q::with_sinks<q::kivi<2, 32, 32>, 4>{}, 2e-5);
    }
    {
        SCOPED_TRACE("rotated<q4_0>");
        expect_matches_oracle(rotated4{}, 2e-5, rotated_int8_query);
    }
    {
        SCOPED_TRACE("mixed");
        expect_matches_oracle(mixed4{}, 2e-5, int8_query);
    }
}

// ---------------------------------------------------------------------------
// Prefill in chunks (straddling the boundary, and one inside the sinks)
// equals appending and attending token by token.

template <class Q>
void expect_prefill_equals_decode(const Q& policy) {
    const auto c = shape(2, 2, 64);
    const std::size_t chunks[] = {2, 5, 9}, total = 16; // 0-1 sinks; 2-6 straddles (2,3 sinks); 7-15 inner
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const auto keys = random_floats(total * row, 31), values = random_floats(total * row, 32);
    const auto queries = random_floats(total * qrow, 33);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cache_of<Q> chunked(c, {}, {}, policy), stepped(c, {}, {}, policy);
        std::vector<float> got(total * qrow), want(total * qrow);
        std::vector<float> mass_got, mass_want(total * c.kv_heads, 0.0f);
        std::size_t t0 = 0;
        for (std::size_t n : chunks) {
            append(chunked, keys, values, t0, n);
            std::vector<float> mass((t0 + n) * c.kv_heads);
            chunked.attend_chunk(0, queries.data() + t0 * qrow, n, got.data() + t0 * qrow, mass.data());
            mass_got = mass; // the last chunk's mass: its queries over all tokens
            t0 += n;
        }
        const std::size_t last_chunk = chunks[2];
        for (std::size_t t = 0; t < total; ++t) {
            append(stepped, keys, values, t, 1);
            std::vector<float> mass((t + 1) * c.kv_heads);
            stepped.attend(0, queries.data() + t * qrow, want.data() + t * qrow, mass.data());
            if (t >= total - last_chunk) // per head: mass over the t + 1 tokens held
                for (std::size_t h = 0; h < c.kv_heads; ++h)
                    for (std::size_t s = 0; s <= t; ++s) mass_want[h * total + s] += mass[h * (t + 1) + s];
        }
        // Tokens 0-1 (sinks only): the fused fp16 prefill against the fp16
        // decode partial. From the straddling chunk on, prefill runs the same
        // partials as decode (the later rows masked by a -inf bias): the
        // scalar reference gives the same bits; a SIMD kernel puts a row in a
        // vector block or in its scalar tail depending on how many rows it
        // runs, so its results differ by float rounding only.
        const bool reference = arch == kvc::arch_id::scalar;
        for (std::size_t t = 0; t < total; ++t) {
            const std::vector<float> a(got.begin() + t * qrow, got.begin() + (t + 1) * qrow);
            const std::vector<float> b(want.begin() + t * qrow, want.begin() + (t + 1) * qrow);
            if (reference && t >= 2) ASSERT_EQ(a, b) << "token " << t;
            else ASSERT_LE(kvc_test::relative_error(a, b), 1e-6) << "token " << t;
        }
        for (std::size_t i = 0; i < mass_want.size(); ++i) EXPECT_NEAR(mass_got[i], mass_want[i], 1e-5f) << "mass " << i;
    }
}

TEST(WithSinks, ChunkedPrefillAcrossTheBoundaryEqualsDecodeStepByStep) {
    arch_guard guard;
    {
        SCOPED_TRACE("sparse");
        expect_prefill_equals_decode(sparse4{q::sparse(0.5)});
    }
    {
        SCOPED_TRACE("q4_0");
        expect_prefill_equals_decode(q4_0_4{});
    }
    {
        SCOPED_TRACE("kivi<2> (all in the residual)");
        expect_prefill_equals_decode(kivi4{});
    }
    {
        SCOPED_TRACE("rotated<q4_0>");
        expect_prefill_equals_decode(rotated4{});
    }
}

// ---------------------------------------------------------------------------
// bytes(): fp16 sinks (4 x dim bytes a token) + the inner store, exactly what
// the memory resource handed out.

TEST(WithSinks, BytesAreSinkRowsPlusInnerStoreAndMatchMemoryResource) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &counter;
    const std::size_t tokens = 300, dim = 128;
    const auto keys = random_floats(tokens * c.kv_heads * dim, 41);
    {
        cache_of<sparse4> cache(c, {}, {}, sparse4{q::sparse(0.5)});
        const std::size_t metadata = cache.bytes();
        EXPECT_EQ(metadata, counter.in_use);
        cache.reserve(tokens);
        for (std::size_t l = 0; l < c.layers; ++l)
            cache.append(l, token_major(keys.data(), tokens, c.kv_heads, dim), token_major(keys.data(), tokens, c.kv_heads, dim), 0);
        const std::size_t sink_token = 2 * dim * 2, sparse_token = (dim / 8 + 2 * 64) * 2;
        for (std::size_t l = 0; l < c.layers; ++l)
            for (std::size_t h = 0; h < c.kv_heads; ++h) {
                const auto& head = cache.head(l, h);
                EXPECT_EQ(head.bytes(), 4 * sink_token + (tokens - 4) * sparse_token);
                EXPECT_EQ(head.bytes(), head.sink().bytes() + head.inner().bytes());
                EXPECT_EQ(head.stored_bytes(), head.bytes());
                EXPECT_EQ(head.bytes_per_token(), sparse_token);
            }
        EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * (4 * sink_token + (tokens - 4) * sparse_token + tokens * 4));
        EXPECT_EQ(cache.bytes(), counter.in_use);
    }
    EXPECT_EQ(counter.in_use, 0u);
    {
        cache_of<q4_0_4> cache(c, {}, {}, q4_0_4{{}, 2});
        const std::size_t metadata = cache.bytes();
        cache.reserve(tokens);
        for (std::size_t l = 0; l < c.layers; ++l)
            cache.append(l, token_major(keys.data(), tokens, c.kv_heads, dim), token_major(keys.data(), tokens, c.kv_heads, dim), 0);
        const std::size_t q4_token = 2 * (dim / 32) * 18;
        EXPECT_EQ(cache.head(1, 1).sink_tokens(), 2u);
        EXPECT_EQ(cache.head(1, 1).bytes(), 2 * 2 * dim * 2 + (tokens - 2) * q4_token);
        EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * (2 * 2 * dim * 2 + (tokens - 2) * q4_token + tokens * 4));
        EXPECT_EQ(cache.bytes(), counter.in_use);
        // Eviction returns memory: compacted heads hold exactly their rows.
        cache.clear();
    }
    EXPECT_EQ(counter.in_use, 0u);
}

// ---------------------------------------------------------------------------
// Eviction: kept sinks first, then the kept inner rows, values unchanged.

template <class Q>
void expect_compaction_keeps_order(const Q& policy) {
    const auto c = shape(1, 1, 64);
    const std::size_t tokens = 20, dim = 64;
    const auto keys = random_floats(tokens * dim, 51), values = random_floats(tokens * dim, 52);
    const auto head = policy.make_head(c);
    auto h = head;
    h.reserve_for_append(tokens);
    for (std::size_t t = 0; t < tokens; ++t)
        h.push_back(kvc::kernels::active(), kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    const stored_rows before = stored(h, dim);
    const std::vector<std::uint32_t> kept = {0, 2, 5, 7, 8, 15, 19};
    auto small = h.compacted(kept.data(), kept.size());
    EXPECT_EQ(small.sink_tokens(), 2u);
    EXPECT_EQ(small.inner_tokens(), 5u);
    const stored_rows after = stored(small, dim);
    for (std::size_t i = 0; i < kept.size(); ++i)
        for (std::size_t d = 0; d < dim; ++d) {
            ASSERT_EQ(after.keys[i * dim + d], before.keys[kept[i] * dim + d]) << i;
            ASSERT_EQ(after.values[i * dim + d], before.values[kept[i] * dim + d]) << i;
        }
    // Later tokens go to the inner store: the order stays sinks, then inner rows.
    small.reserve_for_append(1);
    small.push_back(kvc::kernels::active(), kvc::dtype::f32, keys.data(), values.data());
    EXPECT_EQ(small.sink_tokens(), 2u);
    EXPECT_EQ(small.inner_tokens(), 6u);
    // Only sinks kept: the sink segment refills up to its limit.
    const std::vector<std::uint32_t> first = {1};
    auto sinks_only = h.compacted(first.data(), 1);
    sinks_only.reserve_for_append(5);
    for (std::size_t t = 0; t < 5; ++t)
        sinks_only.push_back(kvc::kernels::active(), kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    EXPECT_EQ(sinks_only.sink_tokens(), 4u);
    EXPECT_EQ(sinks_only.inner_tokens(), 2u);
    // Only inner rows kept.
    const std::vector<std::uint32_t> late = {4, 10};
    const auto inner_only = h.compacted(late.data(), 2);
    EXPECT_EQ(inner_only.sink_tokens(), 0u);
    EXPECT_EQ(stored(inner_only, dim).keys[dim], before.keys[10 * dim]);
    EXPECT_EQ(h.tokens(), tokens); // the source is untouched
}

TEST(WithSinks, CompactionKeepsSinksThenInnerRows) {
    {
        SCOPED_TRACE("sparse (keep + shrink)");
        expect_compaction_keeps_order(sparse4{q::sparse(0.5)});
    }
    {
        SCOPED_TRACE("q4_0 (keep + shrink)");
        expect_compaction_keeps_order(q4_0_4{});
    }
    {
        SCOPED_TRACE("kivi<2> (its compacted)");
        expect_compaction_keeps_order(kivi4{});
    }
    {
        SCOPED_TRACE("rotated<q4_0>");
        expect_compaction_keeps_order(rotated4{});
    }
}

TEST(WithSinks, EvictionInsideCompressedCache) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 100, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 53), values = random_floats(tokens * row, 54);
    cache_of<sparse4, kvc::evict::knorm> cache(c, kvc::evict::knorm(kvc::evict::budget::absolute(40, 4, 8)), {},
                                               sparse4{q::sparse(0.6)});
    cache_of<sparse4> twin(c, {}, {}, sparse4{q::sparse(0.6)});
    append(cache, keys, values, 0, tokens);
    append(twin, keys, values, 0, tokens);
    const std::size_t before = cache.bytes();
    cache.compress();
    EXPECT_LT(cache.bytes(), before);
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        ASSERT_EQ(cache.tokens(0, h), 40u);
        const auto& head = cache.head(0, h);
        EXPECT_EQ(head.sink_tokens(), 4u); // budget::absolute(40, 4 sinks, ...) keeps the first 4
        const stored_rows kept = stored(head, 64), all = stored(twin.head(0, h), 64);
        const std::int32_t* positions = cache.positions(0, h);
        for (std::size_t i = 0; i < 40; ++i)
            for (std::size_t d = 0; d < 64; ++d) ASSERT_EQ(kept.keys[i * 64 + d], all.keys[positions[i] * 64 + d]);
    }
}

// ---------------------------------------------------------------------------
// NaN in a sink row: the head's attention is NaN while it is held, the other
// head and every other token are untouched, and evicting it restores finite outputs.

TEST(WithSinks, NanInASinkRowStaysInItsToken) {
    arch_guard guard;
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 12, row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    auto keys = random_floats(tokens * row, 61);
    const auto values = random_floats(tokens * row, 62), queries = random_floats(qrow, 63);
    const auto clean_keys = keys;
    keys[1 * row + 0 * 64 + 5] = std::numeric_limits<float>::quiet_NaN(); // token 1, head 0
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cache_of<q4_0_4> cache(c, {}, {}, q4_0_4{}), clean(c, {}, {}, q4_0_4{});
        append(cache, keys, values, 0, tokens);
        append(clean, clean_keys, values, 0, tokens);
        std::vector<float> out(qrow);
        cache.attend(0, queries.data(), out.data());
        for (std::size_t j = 0; j < c.query_heads; ++j) {
            const bool poisoned = j / c.group() == 0;
            for (std::size_t d = 0; d < 64; ++d) ASSERT_EQ(std::isnan(out[j * 64 + d]), poisoned) << j;
        }
        const stored_rows got = stored(cache.head(0, 0), 64), want = stored(clean.head(0, 0), 64);
        for (std::size_t i = 0; i < got.keys.size(); ++i) {
            if (i == 1 * 64 + 5) {
                EXPECT_TRUE(std::isnan(got.keys[i]));
                continue;
            }
            ASSERT_EQ(got.keys[i], want.keys[i]) << i;
        }
        // Evict token 1 from head 0: finite, and the oracle over what is left.
        std::vector<std::uint32_t> kept;
        for (std::uint32_t t = 0; t < tokens; ++t)
            if (t != 1) kept.push_back(t);
        const auto healed = cache.head(0, 0).compacted(kept.data(), kept.size());
        EXPECT_EQ(healed.sink_tokens(), 3u);
        const stored_rows left = stored(healed, 64);
        std::vector<float> state_acc(c.group() * 64), state_max(c.group()), state_sum(c.group()), healed_out(c.group() * 64);
        const kvc::kernels::decode_state state{state_max.data(), state_sum.data(), state_acc.data()};
        kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(state, c.group(), 64);
        kvc::kernels::decode_problem p;
        p.group = c.group();
        p.queries = queries.data();
        p.query_stride = 64;
        p.scale = c.logit_scale();
        healed.attend(kvc::kernels::active(), p, state);
        kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(state, c.group(), 64, healed_out.data(), 64);
        kvc::cache_config one = shape(1, c.group(), 64);
        const auto want_out = oracle_over_stored(one, {left}, queries.data(), tokens - 1, int8_query);
        EXPECT_LE(worst_head_error(one, healed_out.data(), want_out), 2e-5);
    }
}

// ---------------------------------------------------------------------------
// A hand-made case where the first tokens draw most of the attention: every
// query points along the sink keys, whose values are far from the rest.
// Keeping the sinks in fp16 must cut the error against full_cache fp32.

template <class Plain, class WithSinks>
void expect_sinks_reduce_error(const Plain& plain, const WithSinks& with) {
    auto c = shape(1, 4, 64);
    c.storage = kvc::dtype::f32;
    const std::size_t tokens = 64, dim = 64, qrow = c.query_heads * dim;
    auto keys = random_floats(tokens * dim, 71, 0.5f), values = random_floats(tokens * dim, 72, 0.5f);
    for (std::size_t t = 0; t < 4; ++t)
        for (std::size_t d = 0; d < dim; ++d) {
            keys[t * dim + d] = (d % 2 ? 1.0f : -1.0f) * (1.0f + 0.1f * static_cast<float>(t)) + 0.37f * static_cast<float>(d % 7);
            values[t * dim + d] = 3.0f * std::sin(0.3f * static_cast<float>(d + 11 * t));
        }
    std::vector<float> queries(4 * qrow);
    const auto noise = random_floats(queries.size(), 73, 0.2f);
    for (std::size_t i = 0; i < queries.size(); ++i)
        queries[i] = 0.25f * keys[i % dim] + noise[i]; // close to the sink keys
    kvc::full_cache full(c);
    cache_of<Plain> a(c, {}, {}, plain);
    cache_of<WithSinks> b(c, {}, {}, with);
    append(full, keys, values, 0, tokens);
    append(a, keys, values, 0, tokens);
    append(b, keys, values, 0, tokens);
    double error_plain = 0.0, error_sinks = 0.0, sink_mass = 0.0;
    for (std::size_t s = 0; s < 4; ++s) {
        std::vector<float> want(qrow), x(qrow), y(qrow), mass(tokens);
        full.attend(0, queries.data() + s * qrow, want.data(), mass.data());
        a.attend(0, queries.data() + s * qrow, x.data());
        b.attend(0, queries.data() + s * qrow, y.data());
        error_plain += kvc_test::relative_error(x, want);
        error_sinks += kvc_test::relative_error(y, want);
        sink_mass += (mass[0] + mass[1] + mass[2] + mass[3]) / 4.0; // mass sums the group's 4 query heads
    }
    sink_mass /= 4.0; // mean over the 4 queries
    EXPECT_GT(sink_mass, 0.8) << "the case must put most attention on the sinks";
    EXPECT_LT(error_sinks, 0.25 * error_plain) << "plain " << error_plain << " with sinks " << error_sinks;
    std::printf("  error plain %.3e, with 4 sinks %.3e (sink mass %.2f)\n", error_plain / 4, error_sinks / 4,
                sink_mass);
}

TEST(WithSinks, SinksCutTheErrorWhenTheyDrawMostAttention) {
    {
        SCOPED_TRACE("q4_0");
        expect_sinks_reduce_error(q::q4_0{}, q4_0_4{});
    }
    {
        SCOPED_TRACE("int2");
        using int2 = q::block<q::int2_asym, 32>;
        expect_sinks_reduce_error(int2{}, q::with_sinks<int2, 4>{});
    }
    {
        SCOPED_TRACE("sparse 0.7");
        expect_sinks_reduce_error(q::sparse(0.7), q::with_sinks<q::sparse, 4>{q::sparse(0.7)});
    }
}

// ---------------------------------------------------------------------------

TEST(WithSinks, RejectsZeroSinksAndForwardsTheInnerCodecsChecks) {
    const auto c = shape(1, 1, 64);
    const std::string zero = error_of([&] { cache_of<sparse4> cache(c, {}, {}, sparse4{q::sparse(0.5), 0}); });
    EXPECT_NE(zero.find("with_sinks: expected sink_tokens >= 1, got 0"), std::string::npos) << zero;
    const std::string inner = error_of([&] { cache_of<sparse4> cache(c, {}, {}, sparse4{q::sparse(1.5)}); });
    EXPECT_NE(inner.find("kvc::quant::sparse: expected key sparsity in [0, 1), got 1.5"), std::string::npos) << inner;
    const std::string dim = error_of([&] { cache_of<q4_0_4> cache(shape(1, 1, 48), {}, {}, q4_0_4{}); });
    EXPECT_NE(dim.find("group size 32, got head_dim 48"), std::string::npos) << dim;
    const std::string direct = error_of([&] { (void)q4_0_4{{}, 0}.make_head(c); });
    EXPECT_NE(direct.find("sink_tokens >= 1"), std::string::npos) << direct;
}

// Q6 under the sinks: the inner store gets the scores of its own tokens.
TEST(WithSinks, AssignPrecisionGetsTheInnerTokensScores) {
    const auto c = shape(1, 1, 64);
    const std::size_t tokens = 14, dim = 64;
    const auto keys = random_floats(tokens * dim, 81), values = random_floats(tokens * dim, 82);
    cache_of<mixed4> cache(c, {}, {}, mixed4{q::mixed<q::int8_sym, q::int2_asym, 32>(0.1)});
    append(cache, keys, values, 0, tokens);
    // One inner token (of 10) stays high at 10%: the highest score among tokens 4..13.
    std::vector<float> scores(tokens, 0.0f);
    scores[0] = 100.0f; // a sink: must not count
    scores[9] = 50.0f;
    cache.assign_precision(0, 0, scores.data());
    const auto& head = cache.head(0, 0);
    EXPECT_EQ(head.inner().high_tokens(), 1u);
    EXPECT_EQ(head.inner().low_tokens(), 9u);
    // Token 9 (inner row 5) decodes at int8 precision, token 10 at int2.
    const stored_rows v = stored(head, dim);
    double err9 = 0.0, err10 = 0.0;
    for (std::size_t d = 0; d < dim; ++d) {
        err9 = std::max(err9, std::abs(static_cast<double>(v.keys[9 * dim + d]) - keys[9 * dim + d]));
        err10 = std::max(err10, std::abs(static_cast<double>(v.keys[10 * dim + d]) - keys[10 * dim + d]));
    }
    EXPECT_LT(err9, 0.05);
    EXPECT_GT(err10, 0.1);
}

} // namespace
