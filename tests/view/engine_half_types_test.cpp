// Engine fp16/bf16 buffers of their own 16-bit type (std::uint16_t bits,
// _Float16) go into kv_view through kvc::as_half / kvc::as_bfloat16 (issue 18
// item 5). Oracle: the same bits given as kvc::half / kvc::bfloat16 buffers.
// The cache must store the same bytes and attend to the same output, bit for
// bit, whether it keeps the view's own type (memcpy path) or converts it
// (fp32 storage: the kernels' conversion path).
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/view/kv_view.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

namespace {

// The overloads exist for the engine types and return what kv_view takes.
static_assert(std::is_same_v<decltype(kvc::as_half(std::declval<std::uint16_t*>())), kvc::half*>);
static_assert(std::is_same_v<decltype(kvc::as_half(std::declval<const std::uint16_t*>())), const kvc::half*>);
static_assert(std::is_same_v<decltype(kvc::as_bfloat16(std::declval<const std::uint16_t*>())), const kvc::bfloat16*>);

constexpr std::size_t tokens = 5, kv_heads = 2, query_heads = 4, dim = 8;
constexpr std::size_t elements = tokens * kv_heads * dim;

kvc::cache_config shape(kvc::dtype storage) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.storage = storage;
    return c;
}

// Appends the rows one token at a time (the decode path) and returns the
// attention output of a fixed query, with the cache for byte comparison.
template <class T>
kvc::full_cache filled(kvc::dtype storage, const T* keys, const T* values) {
    kvc::full_cache cache(shape(storage));
    for (std::size_t t = 0; t < tokens; ++t) {
        kvc::kv_view<const T> k(keys + t * kv_heads * dim, 1, kv_heads, dim);
        kvc::kv_view<const T> v(values + t * kv_heads * dim, 1, kv_heads, dim);
        cache.append(0, k, v, static_cast<std::int64_t>(t));
    }
    return cache;
}

std::vector<float> attention(const kvc::full_cache& cache) {
    std::vector<float> q(query_heads * dim), out(query_heads * dim);
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = 0.25f * static_cast<float>(static_cast<int>(i % 7) - 3);
    cache.attend(0, q.data(), out.data());
    return out;
}

void expect_same_cache(const kvc::full_cache& a, const kvc::full_cache& b) {
    const std::size_t row_bytes = dim * kvc::size_of(a.config().storage);
    for (std::size_t h = 0; h < kv_heads; ++h)
        for (std::size_t t = 0; t < tokens; ++t) {
            EXPECT_EQ(std::memcmp(a.head(0, h).key_row(t), b.head(0, h).key_row(t), row_bytes), 0) << h << " " << t;
            EXPECT_EQ(std::memcmp(a.head(0, h).value_row(t), b.head(0, h).value_row(t), row_bytes), 0) << h << " " << t;
        }
    const std::vector<float> x = attention(a), y = attention(b);
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0);
}

// Random finite 16-bit values as raw bits, made by the library's own narrowing.
template <class To>
std::vector<std::uint16_t> random_bits(unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<std::uint16_t> bits(elements);
    for (std::uint16_t& b : bits) b = To(normal(rng)).bits;
    return bits;
}

template <class T>
std::vector<T> as_kvc_type(const std::vector<std::uint16_t>& bits) {
    std::vector<T> out(bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) out[i] = T::from_bits(bits[i]);
    return out;
}

TEST(EngineHalfTypes, Uint16FpBitsViewedAsHalfMatchKvcHalf) {
    const std::vector<std::uint16_t> k16 = random_bits<kvc::half>(1), v16 = random_bits<kvc::half>(2);
    const std::vector<kvc::half> k = as_kvc_type<kvc::half>(k16), v = as_kvc_type<kvc::half>(v16);
    for (kvc::dtype storage : {kvc::dtype::f16, kvc::dtype::f32, kvc::dtype::bf16}) {
        SCOPED_TRACE(static_cast<int>(storage));
        expect_same_cache(filled(storage, kvc::as_half(k16.data()), kvc::as_half(v16.data())),
                          filled(storage, k.data(), v.data()));
    }
}

TEST(EngineHalfTypes, Uint16BfBitsViewedAsBfloat16MatchKvcBfloat16) {
    const std::vector<std::uint16_t> k16 = random_bits<kvc::bfloat16>(3), v16 = random_bits<kvc::bfloat16>(4);
    const std::vector<kvc::bfloat16> k = as_kvc_type<kvc::bfloat16>(k16), v = as_kvc_type<kvc::bfloat16>(v16);
    for (kvc::dtype storage : {kvc::dtype::bf16, kvc::dtype::f32}) {
        SCOPED_TRACE(static_cast<int>(storage));
        expect_same_cache(filled(storage, kvc::as_bfloat16(k16.data()), kvc::as_bfloat16(v16.data())),
                          filled(storage, k.data(), v.data()));
    }
}

#if KVC_HAS_FLOAT16_AS_HALF
// A _Float16 buffer holds IEEE binary16: its values, widened to float by the
// compiler, must be what kvc::half reads from the same bits, and the cache
// must match the kvc::half one.
TEST(EngineHalfTypes, Float16BufferViewedAsHalfMatchesKvcHalf) {
    const std::vector<std::uint16_t> k16 = random_bits<kvc::half>(5), v16 = random_bits<kvc::half>(6);
    std::vector<_Float16> k(elements), v(elements);
    std::memcpy(k.data(), k16.data(), elements * 2);
    std::memcpy(v.data(), v16.data(), elements * 2);
    for (std::size_t i = 0; i < elements; ++i)
        ASSERT_EQ(static_cast<float>(k[i]), kvc::to_float(kvc::half::from_bits(k16[i]))) << i;
    const std::vector<kvc::half> hk = as_kvc_type<kvc::half>(k16), hv = as_kvc_type<kvc::half>(v16);
    for (kvc::dtype storage : {kvc::dtype::f16, kvc::dtype::f32}) {
        SCOPED_TRACE(static_cast<int>(storage));
        expect_same_cache(filled(storage, kvc::as_half(k.data()), kvc::as_half(v.data())),
                          filled(storage, hk.data(), hv.data()));
    }
}
#endif

} // namespace
