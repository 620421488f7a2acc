// Q10 unstructured sparsity (kvc::quant::sparse) inside compressed_cache, on
// every instruction set: attention against a double oracle over the values the
// storage holds, error against full_cache growing with sparsity (and s = 0
// storing exactly full_cache's fp16 values), bytes() against the layout
// formula and a counting memory resource, construction errors, NaN/Inf
// isolation, and eviction running on sparse storage.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
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
using kvc_test::shape;
using kvc_test::stored;
using kvc_test::stored_rows;
using sparse_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, q::sparse, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<q::sparse>);

// ---------------------------------------------------------------------------

TEST(SparseCodec, KeptCountsAndBitsPerValue) {
    EXPECT_EQ(q::sparse::kept_of(0.5, 128), 64u);
    EXPECT_EQ(q::sparse::kept_of(0.7, 128), 39u); // ceil(38.4)
    EXPECT_EQ(q::sparse::kept_of(0.75, 128), 32u);
    EXPECT_EQ(q::sparse::kept_of(0.0, 128), 128u);
    EXPECT_EQ(q::sparse::kept_of(0.999, 16), 1u);
    EXPECT_DOUBLE_EQ(q::sparse(0.5).key_bits_per_value(128), 9.0);     // 16 + 128 bytes per 128 elements
    EXPECT_DOUBLE_EQ(q::sparse(0.7).value_bits_per_value(128), 5.875); // 16 + 78
}

// Prefill in chunks and decode token by token; every output against the
// oracle over the stored values, on every set.
TEST(SparseCodec, AttentionMatchesOracleOverStoredValuesOnEveryInstructionSet) {
    arch_guard guard;
    for (std::size_t dim : {std::size_t{128}, std::size_t{80}}) {
        const kvc_test::chunked_run run(shape(3, 2, dim), {32, 32, 32}, 9, 71);
        const std::size_t row = run.row();
        for (kvc::arch_id arch : archs()) {
            SCOPED_TRACE(std::string(kvc::name_of(arch)) + " dim " + std::to_string(dim));
            kvc::set_active_arch(arch);
            sparse_cache cache(run.config, {}, {}, q::sparse(0.5, 0.7));
            EXPECT_LE(run.worst_error_over_stored(cache), 2e-5);
            // The stored rows keep exactly the chosen counts, with the input's fp16 values.
            const stored_rows h0 = stored(cache, 0, 1);
            for (std::size_t t = 0; t < run.total; ++t) {
                std::size_t nonzero = 0;
                for (std::size_t d = 0; d < dim; ++d) {
                    const float k = h0.keys[t * dim + d];
                    if (k != 0.0f) {
                        ++nonzero;
                        EXPECT_EQ(k, kvc::to_float(kvc::to_half(run.keys[t * row + dim + d])));
                    }
                }
                EXPECT_EQ(nonzero, dim / 2) << "token " << t; // Gaussian data: no kept zeros
            }
        }
    }
}

// bytes(): exactly rows x (bitmap + kept fp16) after an exact reserve, and
// exactly what the memory resource handed out.
TEST(SparseCodec, BytesMatchLayoutFormulaAndMemoryResource) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &counter;
    {
        sparse_cache cache(c, {}, {}, q::sparse(0.5, 0.7));
        const std::size_t metadata = cache.bytes();
        EXPECT_EQ(metadata, counter.in_use);
        const std::size_t tokens = 300;
        cache.reserve(tokens);
        const auto keys = random_floats(tokens * c.kv_heads * c.head_dim, 74);
        for (std::size_t l = 0; l < c.layers; ++l)
            cache.append(l, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                         token_major(keys.data(), tokens, c.kv_heads, c.head_dim), 0);
        const std::size_t per_token = (128 / 8 + 2 * 64) + (128 / 8 + 2 * 39); // 144 + 94
        for (std::size_t l = 0; l < c.layers; ++l)
            for (std::size_t h = 0; h < c.kv_heads; ++h) {
                EXPECT_EQ(cache.head(l, h).bytes(), tokens * per_token);
                EXPECT_EQ(cache.head(l, h).bytes_per_token(), per_token);
            }
        EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * tokens * (per_token + 4));
        EXPECT_EQ(cache.bytes(), counter.in_use);
        // Against fp16 (512 bytes per token and head): 238 bytes.
        EXPECT_LT(cache.head(0, 0).bytes(), tokens * 512 / 2);
    }
    EXPECT_EQ(counter.in_use, 0u);
}

// s = 0 keeps every element: exactly full_cache's fp16 values.
TEST(SparseCodec, ZeroSparsityStoresExactlyFp16) {
    arch_guard guard;
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 70, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 75), values = random_floats(tokens * row, 76);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        sparse_cache cache(c, {}, {}, q::sparse(0.0));
        kvc::full_cache full(c); // fp16 storage by default
        cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
        full.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
        for (std::size_t h = 0; h < 2; ++h) {
            const stored_rows s = stored(cache, 0, h);
            for (std::size_t t = 0; t < tokens; ++t)
                for (std::size_t d = 0; d < 64; ++d) {
                    ASSERT_EQ(s.keys[t * 64 + d], kvc::to_float(kvc::to_half(keys[t * row + h * 64 + d])));
                    ASSERT_EQ(s.values[t * 64 + d], kvc::to_float(kvc::to_half(values[t * row + h * 64 + d])));
                }
        }
        const auto queries = random_floats(c.query_heads * 64, 77);
        std::vector<float> a(c.query_heads * 64), b(a.size());
        full.attend(0, queries.data(), a.data());
        cache.attend(0, queries.data(), b.data());
        EXPECT_LE(kvc_test::relative_error(b, a), 1e-5); // same values, float rounding only
    }
}

double error_against_full(double sparsity, const std::vector<float>& keys, const std::vector<float>& values,
                          const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    return kvc_test::mean_error_against_full(sparse_cache(shape(4, 4, 128), {}, {}, q::sparse(sparsity)), keys, values,
                                             queries, tokens, steps);
}

TEST(SparseCodec, ErrorAgainstFullCacheDecreasesWithSparsity) {
    const std::size_t tokens = 512, steps = 8;
    const auto keys = random_floats(tokens * 4 * 128, 78), values = random_floats(tokens * 4 * 128, 79);
    const auto queries = random_floats(steps * 16 * 128, 80, 2.0f);
    const double e90 = error_against_full(0.9, keys, values, queries, tokens, steps);
    const double e70 = error_against_full(0.7, keys, values, queries, tokens, steps);
    const double e50 = error_against_full(0.5, keys, values, queries, tokens, steps);
    const double e0 = error_against_full(0.0, keys, values, queries, tokens, steps);
    std::cout << "[ kvc      ] relative error vs full_cache f16: s=0.9 " << e90 << ", s=0.7 " << e70 << ", s=0.5 "
              << e50 << ", s=0 " << e0 << std::endl;
    EXPECT_LT(e70, e90);
    EXPECT_LT(e50, e70);
    EXPECT_LT(e0, e50);
    EXPECT_LT(e0, 1e-5);
}

TEST(SparseCodec, RejectsBadSparsityAndHeadDim) {
    const auto c = shape(1, 1, 64);
    const std::string one = error_of([&] { sparse_cache cache(c, {}, {}, q::sparse(1.0)); });
    EXPECT_NE(one.find("kvc::quant::sparse: expected key sparsity in [0, 1), got 1"), std::string::npos) << one;
    const std::string negative = error_of([&] { sparse_cache cache(c, {}, {}, q::sparse(0.5, -0.1)); });
    EXPECT_NE(negative.find("expected value sparsity in [0, 1), got -0.1"), std::string::npos) << negative;
    const std::string nan =
        error_of([&] { sparse_cache cache(c, {}, {}, q::sparse(std::numeric_limits<double>::quiet_NaN())); });
    EXPECT_NE(nan.find("expected key sparsity in [0, 1), got nan"), std::string::npos) << nan;
    const std::string dim = error_of([] { sparse_cache cache(shape(1, 1, 72), {}, {}, q::sparse(0.5)); });
    EXPECT_NE(dim.find("expected head_dim a multiple of 16, got head_dim 72"), std::string::npos) << dim;
    const std::string direct = error_of([] { q::sparse(0.5).make_head(shape(1, 1, 40)); });
    EXPECT_NE(direct.find("got head_dim 40"), std::string::npos) << direct;
    const std::string kept = error_of([] { kvc::sparse_rows rows(64, 0, 3, kvc::default_resource()); });
    EXPECT_NE(kept.find("expected 1..64 kept elements per row, got 0 (keys) and 3 (values)"), std::string::npos) << kept;
}

// NaN in one key element: kept (it ranks above every number), that KV head's
// attention is NaN as full_cache's would be; other heads and other tokens'
// rows are untouched; evicting the token restores the clean result.
TEST(SparseCodec, NonFiniteInputPoisonsOnlyItsTokenAndHead) {
    arch_guard guard;
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 40, bad = 25, row = c.kv_heads * c.head_dim;
    for (float special : {std::numeric_limits<float>::quiet_NaN(), INFINITY}) {
        for (kvc::arch_id arch : archs()) {
            SCOPED_TRACE(std::string(kvc::name_of(arch)) + " special " + std::to_string(special));
            kvc::set_active_arch(arch);
            auto keys = random_floats(tokens * row, 81);
            const auto values = random_floats(tokens * row, 82);
            sparse_cache clean(c, {}, {}, q::sparse(0.7)), dirty(c, {}, {}, q::sparse(0.7));
            clean.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
            keys[bad * row + 0 * 64 + 40] = special; // head 0
            dirty.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
            for (std::size_t h = 0; h < 2; ++h) {
                const stored_rows a = stored(clean, 0, h), b = stored(dirty, 0, h);
                EXPECT_EQ(a.values, b.values);
                for (std::size_t i = 0; i < a.keys.size(); ++i) {
                    if (h == 0 && i / 64 == bad) continue;
                    EXPECT_EQ(a.keys[i], b.keys[i]) << "head " << h << " element " << i;
                }
            }
            const stored_rows poisoned = stored(dirty, 0, 0);
            const float kept = poisoned.keys[bad * 64 + 40];
            if (std::isnan(special)) {
                EXPECT_TRUE(std::isnan(kept));
            } else {
                EXPECT_EQ(kept, special);
            }
            const auto queries = random_floats(c.query_heads * 64, 83);
            std::vector<float> out(c.query_heads * 64), reference(out.size()), full_out(out.size());
            dirty.attend(0, queries.data(), out.data());
            clean.attend(0, queries.data(), reference.data());
            kvc::full_cache full(c);
            full.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
            full.attend(0, queries.data(), full_out.data());
            for (std::size_t j = 0; j < c.query_heads; ++j)
                for (std::size_t d = 0; d < 64; ++d) {
                    if (j / c.group() == 0) {
                        // As full_cache: NaN with a NaN key; with +Inf the logit is +-Inf or NaN, and full_cache agrees on finiteness.
                        EXPECT_EQ(std::isfinite(out[j * 64 + d]), std::isfinite(full_out[j * 64 + d])) << j << " " << d;
                        if (std::isnan(special)) {
                            EXPECT_TRUE(std::isnan(out[j * 64 + d]));
                        }
                    } else {
                        EXPECT_EQ(out[j * 64 + d], reference[j * 64 + d]);
                    }
                }
        }
    }
    // Eviction of the poisoned token (head storage keep) restores finite, identical outputs.
    const auto& k = kvc::kernels::active();
    auto keys = random_floats(tokens * 64, 84);
    const auto values = random_floats(tokens * 64, 85);
    keys[bad * 64 + 3] = std::numeric_limits<float>::quiet_NaN();
    kvc::sparse_rows with(64, 20, 20, kvc::default_resource()), without(64, 20, 20, kvc::default_resource());
    with.reserve(tokens);
    without.reserve(tokens);
    std::vector<std::uint32_t> kept;
    for (std::size_t t = 0; t < tokens; ++t) {
        with.push_back(k, kvc::dtype::f32, keys.data() + t * 64, values.data() + t * 64);
        if (t != bad) {
            without.push_back(k, kvc::dtype::f32, keys.data() + t * 64, values.data() + t * 64);
            kept.push_back(static_cast<std::uint32_t>(t));
        }
    }
    const auto attend = [&](const kvc::sparse_rows& rows) {
        const auto queries = random_floats(2 * 64, 86);
        std::vector<float> max(2), sum(2), acc(2 * 64), out(2 * 64);
        const kvc::kernels::decode_state state{max.data(), sum.data(), acc.data()};
        kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(state, 2, 64);
        kvc::kernels::decode_problem p;
        p.group = 2;
        p.queries = queries.data();
        p.query_stride = 64;
        p.scale = 0.125f;
        rows.attend(k, p, state);
        kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(state, 2, 64, out.data(), 64);
        return out;
    };
    EXPECT_TRUE(std::isnan(attend(with)[0]));
    with.keep(kept.data(), kept.size());
    EXPECT_EQ(with.tokens(), tokens - 1);
    EXPECT_EQ(attend(with), attend(without));
}

TEST(SparseCodec, EvictionRunsOnSparseStorage) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 100, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 87), values = random_floats(tokens * row, 88);
    using evicting = kvc::compressed_cache<kvc::evict::knorm, kvc::merge::none, q::sparse, kvc::project::none>;
    evicting cache(c, kvc::evict::knorm(kvc::evict::budget::absolute(40, 4, 8)), {}, q::sparse(0.6));
    sparse_cache twin(c, {}, {}, q::sparse(0.6));
    cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    twin.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    const std::size_t before = cache.bytes();
    cache.compress();
    EXPECT_LT(cache.bytes(), before);
    for (std::size_t h = 0; h < 2; ++h) {
        ASSERT_EQ(cache.tokens(0, h), 40u);
        const auto& kept_head = cache.head(0, h);
        std::vector<float> kept(40 * 64), all(tokens * 64);
        kept_head.decode_keys(kvc::kernels::reference_table(), 0, 40, kept.data());
        twin.head(0, h).decode_keys(kvc::kernels::reference_table(), 0, tokens, all.data());
        const std::int32_t* positions = cache.positions(0, h);
        for (std::size_t i = 0; i < 40; ++i)
            for (std::size_t d = 0; d < 64; ++d) EXPECT_EQ(kept[i * 64 + d], all[positions[i] * 64 + d]);
    }
}

} // namespace
