// A decode step allocates nothing once the cache has warmed up: an engine
// calls append + attend per token and layer, thousands of times a second.
//
// This executable replaces the global operator new to count calls (the cache's
// own memory goes through its memory_resource, which is counted separately), so
// it lives alone: no other test shares the replacement.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/streaming.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {
std::atomic<std::size_t> global_news{0};
}

void* operator new(std::size_t bytes) {
    global_news.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(bytes ? bytes : 1)) return p;
    throw std::bad_alloc();
}
// Out of line: inlined into a caller, GCC 12 pairs the free() with the
// built-in meaning of operator new and warns (-Wmismatched-new-delete).
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;
template <class Policy>
using evicting_cache = kvc::compressed_cache<Policy, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::none>;

// GQA 4 over 4096 tokens: the logits a decode step with statistics keeps are
// 4 x 4096 floats, far past what the kernels' call-local scratch holds inline.
kvc::cache_config decode_shape() {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 8;
    c.head_dim = 64;
    c.storage = kvc::dtype::f16;
    return c;
}

constexpr std::size_t prompt = 4096;

// Reserves room for the prompt and the decode steps, and appends the prompt to every layer.
template <class Cache>
Cache& prefilled(Cache& cache, const kvc::cache_config& c) {
    cache.reserve(prompt + 64);
    const auto rows = kvc_test::random_floats(prompt * c.kv_heads * c.head_dim, 3);
    for (std::size_t l = 0; l < c.layers; ++l)
        cache.append(l, token_major(rows.data(), prompt, c.kv_heads, c.head_dim),
                     token_major(rows.data(), prompt, c.kv_heads, c.head_dim), 0);
    return cache;
}

// Counts operator new calls over `steps` decode steps (append one token, then
// attend, on every layer), after one untimed step has warmed the scratch.
template <class Cache>
std::size_t news_per_decode(Cache& cache, const kvc::cache_config& c, std::int64_t position, std::size_t steps,
                            bool caller_mass) {
    const auto row = kvc_test::random_floats(c.kv_heads * c.head_dim, 5);
    const auto queries = kvc_test::random_floats(c.query_heads * c.head_dim, 6);
    std::vector<float> out(c.query_heads * c.head_dim);
    std::vector<float> mass(c.kv_heads * (static_cast<std::size_t>(position) + steps + 1));
    auto step = [&](std::int64_t p) {
        for (std::size_t l = 0; l < c.layers; ++l) {
            cache.append(l, token_major(row.data(), 1, c.kv_heads, c.head_dim),
                         token_major(row.data(), 1, c.kv_heads, c.head_dim), p);
            cache.attend(l, queries.data(), out.data(), caller_mass ? mass.data() : nullptr);
        }
    };
    step(position);
    const std::size_t before = global_news.load();
    for (std::size_t s = 1; s <= steps; ++s) step(position + static_cast<std::int64_t>(s));
    return global_news.load() - before;
}

TEST(DecodeAllocation, FullCacheDecodeAllocatesNothing) {
    const kvc::cache_config c = decode_shape();
    kvc::full_cache cache(c);
    EXPECT_EQ(news_per_decode(prefilled(cache, c), c, prompt, 32, false), 0u);
}

// H2O collects attention statistics on every decode step: its mass and the
// kernels' logits live in the cache's scratch, reused from step to step.
TEST(DecodeAllocation, StatisticsCollectingDecodeAllocatesNothing) {
    const kvc::cache_config c = decode_shape();
    evicting_cache<evict::h2o> cache(c, evict::h2o(evict::budget::absolute(8192)));
    EXPECT_EQ(news_per_decode(prefilled(cache, c), c, prompt, 32, false), 0u);
    // The same with the caller's own mass buffer.
    EXPECT_EQ(news_per_decode(cache, c, prompt + 40, 16, true), 0u);
    // The counter sees allocations (a control for the two above).
    const std::size_t before = global_news.load();
    std::vector<float>* probe = new std::vector<float>(1);
    delete probe;
    EXPECT_GT(global_news.load(), before);
}

// A cache without statistics decodes without allocating either.
TEST(DecodeAllocation, ScoreOnlyPolicyDecodeAllocatesNothing) {
    const kvc::cache_config c = decode_shape();
    evicting_cache<evict::streaming> cache(c, evict::streaming(evict::budget::absolute(8192)));
    EXPECT_EQ(news_per_decode(prefilled(cache, c), c, prompt, 32, false), 0u);
}

} // namespace
