// kvc::recycling_resource: reuse of freed blocks, its limits, and that a
// cache compacting through it stops asking the upstream for memory.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/core/recycling_resource.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::counting_resource;

TEST(RecyclingResource, AFreedBlockServesTheNextRequestOfASimilarSize) {
    counting_resource upstream;
    kvc::recycling_resource pool(SIZE_MAX, &upstream);
    void* a = pool.allocate(1000, 64);
    EXPECT_EQ(upstream.allocations, 1u);
    pool.deallocate(a, 1000, 64);
    EXPECT_EQ(pool.retained_bytes(), 1000u);
    EXPECT_EQ(upstream.in_use, 1000u); // kept, not returned
    void* b = pool.allocate(700, 64);  // at least two thirds of 1000: reuse
    EXPECT_EQ(b, a);
    EXPECT_EQ(upstream.allocations, 1u);
    EXPECT_EQ(pool.retained_bytes(), 0u);
    EXPECT_EQ(pool.in_use_bytes(), 1000u);
    pool.deallocate(b, 700, 64); // freed with the request's size: the pool remembers the block's
    EXPECT_EQ(pool.retained_bytes(), 1000u);
    void* c = pool.allocate(600, 64); // less than two thirds: a new block
    EXPECT_NE(c, a);
    EXPECT_EQ(upstream.allocations, 2u);
    void* d = pool.allocate(1001, 64); // larger than every kept block: a new block
    EXPECT_EQ(upstream.allocations, 3u);
    pool.deallocate(c, 600, 64);
    pool.deallocate(d, 1001, 64);
    EXPECT_EQ(pool.in_use_bytes(), 0u);
    EXPECT_EQ(pool.retained_bytes(), 2601u);
    pool.release();
    EXPECT_EQ(pool.retained_bytes(), 0u);
    EXPECT_EQ(upstream.in_use, 0u);
}

TEST(RecyclingResource, BestFitAndAlignment) {
    counting_resource upstream;
    kvc::recycling_resource pool(SIZE_MAX, &upstream);
    void* big = pool.allocate(1200, 64);
    void* small = pool.allocate(1000, 64);
    void* loose = pool.allocate(1000, 16);
    pool.deallocate(big, 1200, 64);
    pool.deallocate(small, 1000, 64);
    pool.deallocate(loose, 1000, 16);
    void* fit = pool.allocate(900, 64); // 1000 (64) fits best; the 16-aligned one may not serve 64
    EXPECT_EQ(fit, small);
    void* next = pool.allocate(900, 64);
    EXPECT_EQ(next, big); // the only remaining block aligned to 64 and within 1.5x
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(next) % 64, 0u);
    void* any = pool.allocate(900, 8);
    EXPECT_EQ(any, loose);
    for (void* p : {fit, next, any}) pool.deallocate(p, 900, 8);
}

TEST(RecyclingResource, KeepsNoMoreThanItsLimitAndReturnsEverythingWhenDestroyed) {
    counting_resource upstream;
    {
        kvc::recycling_resource pool(1500, &upstream);
        void* a = pool.allocate(1000, 64);
        void* b = pool.allocate(1000, 64);
        pool.deallocate(a, 1000, 64);
        EXPECT_EQ(pool.retained_bytes(), 1000u);
        pool.deallocate(b, 1000, 64); // would exceed 1500: goes back upstream
        EXPECT_EQ(pool.retained_bytes(), 1000u);
        EXPECT_EQ(upstream.in_use, 1000u);
    }
    EXPECT_EQ(upstream.in_use, 0u);
}

// A cache evicting through the pool: its bytes() is exact as before, and once
// the pool has seen one round of compaction, the next sequence's compaction
// takes every buffer from the pool (no upstream allocation at all).
TEST(RecyclingResource, CompactionReusesThePoolsBlocks) {
    counting_resource upstream;
    kvc::recycling_resource pool(SIZE_MAX, &upstream);
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 64;
    c.resource = &pool;
    using cache_type = kvc::compressed_cache<kvc::evict::knorm, kvc::merge::none, kvc::quant::none<float>,
                                             kvc::project::none>;
    const std::size_t tokens = 512;
    const auto keys = kvc_test::random_floats(tokens * 2 * 64, 5);
    const kvc::kv_view<const float> view(keys.data(), tokens, 2, 64);
    std::size_t first_round_allocations = 0;
    for (int round = 0; round < 2; ++round) {
        cache_type cache(c, kvc::evict::knorm(kvc::evict::budget::ratio(0.25)));
        cache.reserve(tokens);
        cache.append(0, view, view, 0);
        const std::size_t before = upstream.allocations;
        cache.compress();
        EXPECT_EQ(cache.tokens(0, 0), 128u);
        if (round == 0) {
            first_round_allocations = upstream.allocations - before;
            EXPECT_EQ(cache.bytes(), pool.in_use_bytes()); // every block requested at its exact size
        } else {
            EXPECT_EQ(upstream.allocations - before, 0u) << "the second compaction should allocate nothing upstream";
            EXPECT_LE(cache.bytes(), pool.in_use_bytes()); // reused blocks may be up to 1.5x the request
        }
    }
    EXPECT_GT(first_round_allocations, 0u);
    pool.release();
    EXPECT_EQ(upstream.in_use, 0u);
}

} // namespace
