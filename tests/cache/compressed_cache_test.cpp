// compressed_cache with every slot `none` is full_cache: same bits, same bytes of payload.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;

template <class T>
using identity_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<T>, kvc::project::none>;

static_assert(!identity_cache<kvc::half>::collects_attention_stats, "none policies ask for no attention statistics");
static_assert(!identity_cache<kvc::half>::collects_queries, "none policies ask for no query window");

template <class T>
class IdentityComposition : public ::testing::Test {};
using element_types = ::testing::Types<float, kvc::half, kvc::bfloat16>;
TYPED_TEST_SUITE(IdentityComposition, element_types);

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TYPED_TEST(IdentityComposition, BitIdenticalToFullCacheOnEveryInstructionSet) {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 3;
    c.query_heads = 12;
    c.head_dim = 72; // not a multiple of the AVX-512 width: exercises the tails too
    c.storage = kvc::dtype_of_v<TypeParam>;
    const std::size_t prompt = 150, chunk = 30, steps = 21;
    const std::size_t total = prompt + steps;
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const auto keys = random_floats(total * row, 31), values = random_floats(total * row, 32);
    const auto queries = random_floats(total * qrow, 33);

    kvc::arch_id archs[kvc::arch_count];
    const int count = kvc::kernels::available_archs(archs);
    const kvc::arch_id original = kvc::active_arch();
    for (int a = 0; a < count; ++a) {
        SCOPED_TRACE(kvc::name_of(archs[a]));
        kvc::set_active_arch(archs[a]);
        kvc::full_cache full(c);
        identity_cache<TypeParam> composed(c);
        for (std::size_t l = 0; l < c.layers; ++l) {
            // Prefill in chunks with attention statistics, then decode token by token.
            for (std::size_t t0 = 0; t0 < prompt; t0 += chunk) {
                const token_major k(keys.data() + t0 * row, chunk, c.kv_heads, c.head_dim);
                const token_major v(values.data() + t0 * row, chunk, c.kv_heads, c.head_dim);
                full.append(l, k, v, static_cast<std::int64_t>(t0));
                composed.append(l, k, v, static_cast<std::int64_t>(t0));
                std::vector<float> out_full(chunk * qrow), out_composed(chunk * qrow);
                std::vector<float> mass_full(c.kv_heads * (t0 + chunk)), mass_composed(mass_full.size());
                full.attend_chunk(l, queries.data() + t0 * qrow, chunk, out_full.data(), mass_full.data());
                composed.attend_chunk(l, queries.data() + t0 * qrow, chunk, out_composed.data(), mass_composed.data());
                ASSERT_TRUE(same_floats(out_full, out_composed)) << "prefill layer " << l << " chunk at " << t0;
                ASSERT_TRUE(same_floats(mass_full, mass_composed));
            }
            for (std::size_t t = prompt; t < total; ++t) {
                const token_major k(keys.data() + t * row, 1, c.kv_heads, c.head_dim);
                const token_major v(values.data() + t * row, 1, c.kv_heads, c.head_dim);
                full.append(l, k, v, static_cast<std::int64_t>(t));
                composed.append(l, k, v, static_cast<std::int64_t>(t));
                std::vector<float> out_full(qrow), out_composed(qrow);
                std::vector<float> mass_full(c.kv_heads * (t + 1)), mass_composed(mass_full.size());
                full.attend(l, queries.data() + t * qrow, out_full.data(), mass_full.data());
                composed.attend(l, queries.data() + t * qrow, out_composed.data(), mass_composed.data());
                ASSERT_TRUE(same_floats(out_full, out_composed)) << "decode layer " << l << " token " << t;
                ASSERT_TRUE(same_floats(mass_full, mass_composed));
            }
            for (std::size_t h = 0; h < c.kv_heads; ++h) {
                ASSERT_EQ(composed.tokens(l, h), full.tokens(l));
                for (std::size_t t = 0; t < total; ++t) ASSERT_EQ(composed.positions(l, h)[t], full.positions(l)[t]);
            }
            EXPECT_EQ(composed.tokens(l), total * c.kv_heads);
        }
    }
    kvc::set_active_arch(original);
}

TEST(CompressedCache, BytesCountEveryAllocation) {
    kvc_test::counting_resource counter;
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 2;
    c.head_dim = 16;
    c.resource = &counter;
    {
        identity_cache<kvc::half> cache(c);
        const std::size_t metadata = counter.in_use;
        EXPECT_EQ(cache.bytes(), metadata);
        cache.reserve(10);
        // Per layer and KV head: 10 key and 10 value rows of 16 halves, and 10 int32 positions.
        EXPECT_EQ(cache.bytes(), metadata + 2 * 2 * (2 * 10 * 16 * 2 + 10 * 4));
        const auto data = random_floats(10 * 2 * 16, 34);
        cache.append(1, token_major(data.data(), 10, 2, 16), token_major(data.data(), 10, 2, 16), 0);
        EXPECT_EQ(cache.bytes(), counter.in_use);
        cache.clear();
        EXPECT_EQ(cache.bytes(), metadata);
    }
    EXPECT_EQ(counter.in_use, 0u);
}

TEST(CompressedCache, BadInputThrowsAndChangesNothing) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 8;
    identity_cache<float> cache(c);
    const auto data = random_floats(4 * 2 * 8, 35);
    cache.append(0, token_major(data.data(), 4, 2, 8), token_major(data.data(), 4, 2, 8), 0);
    const std::size_t bytes = cache.bytes();
    EXPECT_THROW(cache.append(1, token_major(data.data(), 1, 2, 8), token_major(data.data(), 1, 2, 8), 9), kvc::error);
    EXPECT_THROW(cache.append(0, token_major(data.data(), 1, 2, 8), token_major(data.data(), 1, 2, 8), 3), kvc::error);
    EXPECT_THROW(cache.append(0, token_major(data.data(), 2, 4, 8), token_major(data.data(), 2, 4, 8), 9), kvc::error);
    std::vector<float> q(32), out(32);
    EXPECT_THROW(cache.attend_chunk(0, q.data(), 5, out.data()), kvc::error);
    EXPECT_THROW(cache.attend(0, q.data(), nullptr), kvc::error);
    EXPECT_EQ(cache.tokens(0), 8u);
    EXPECT_EQ(cache.bytes(), bytes);
    try {
        identity_cache<float> bad(kvc::cache_config{});
        ADD_FAILURE() << "an empty config must be rejected";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find("compressed_cache"), std::string::npos) << e.what();
    }
}

} // namespace
