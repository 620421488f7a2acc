// full_cache: the baseline every compressed configuration is measured against.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "cache_test_util.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc::cache_config;
using kvc::dtype;
using kvc::full_cache;
using kvc::kv_view;
using kvc::layout_token_major;
using kvc_test::random_floats;

using token_major = kv_view<const float, layout_token_major>;

cache_config shape(std::size_t layers, std::size_t kv_heads, std::size_t query_heads, std::size_t dim, dtype storage) {
    cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.storage = storage;
    return c;
}

// Byte-for-byte snapshot of what a layer holds, to prove an operation changed nothing.
std::vector<unsigned char> snapshot(const full_cache& cache, std::size_t layer) {
    const auto& c = cache.config();
    std::vector<unsigned char> out;
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const auto& rows = cache.head(layer, h);
        for (std::size_t t = 0; t < rows.tokens(); ++t) {
            const auto* k = static_cast<const unsigned char*>(rows.key_row(t));
            const auto* v = static_cast<const unsigned char*>(rows.value_row(t));
            out.insert(out.end(), k, k + rows.row_bytes());
            out.insert(out.end(), v, v + rows.row_bytes());
        }
    }
    const std::int32_t* p = cache.positions(layer);
    out.insert(out.end(), reinterpret_cast<const unsigned char*>(p),
               reinterpret_cast<const unsigned char*>(p + cache.tokens(layer)));
    return out;
}

class FullCacheByDtype : public ::testing::TestWithParam<dtype> {};

TEST_P(FullCacheByDtype, DecodeMatchesDoubleOracle) {
    // GQA 3: query heads 0-2 read KV head 0, 3-5 KV head 1; odd token count.
    const cache_config c = shape(1, 2, 6, 40, GetParam());
    full_cache cache(c);
    const std::size_t tokens = 77;
    const auto keys = random_floats(tokens * 2 * 40, 1), values = random_floats(tokens * 2 * 40, 2);
    cache.append(0, token_major(keys.data(), tokens, 2, 40), token_major(values.data(), tokens, 2, 40), 0);
    const auto queries = random_floats(6 * 40, 3);
    std::vector<float> out(6 * 40), mass(2 * tokens);
    cache.attend(0, queries.data(), out.data(), mass.data());
    std::vector<double> oracle_mass;
    const auto oracle = kvc_test::oracle_attention(c, keys, values, tokens, queries.data(), &oracle_mass);
    // fp32 arithmetic over 40-element dots and 77-term sums: ~1e-6 relative.
    EXPECT_LT(kvc_test::relative_error(out, oracle), 1e-5);
    for (std::size_t i = 0; i < mass.size(); ++i) EXPECT_NEAR(mass[i], oracle_mass[i], 1e-5) << "token " << i;
}

TEST_P(FullCacheByDtype, StoresRowsRoundedToNearestEven) {
    const cache_config c = shape(1, 1, 1, 16, GetParam());
    full_cache cache(c);
    const auto keys = random_floats(5 * 16, 4, 1000.0f), values = random_floats(5 * 16, 5, 1e-6f);
    cache.append(0, token_major(keys.data(), 5, 1, 16), token_major(values.data(), 5, 1, 16), 10);
    const auto& rows = cache.head(0, 0);
    ASSERT_EQ(rows.tokens(), 5u);
    for (std::size_t t = 0; t < 5; ++t)
        for (std::size_t d = 0; d < 16; ++d) {
            float key = 0, value = 0;
            if (GetParam() == dtype::f32) {
                key = static_cast<const float*>(rows.key_row(t))[d];
                value = static_cast<const float*>(rows.value_row(t))[d];
            } else if (GetParam() == dtype::f16) {
                key = kvc::to_float(static_cast<const kvc::half*>(rows.key_row(t))[d]);
                value = kvc::to_float(static_cast<const kvc::half*>(rows.value_row(t))[d]);
            } else {
                key = kvc::to_float(static_cast<const kvc::bfloat16*>(rows.key_row(t))[d]);
                value = kvc::to_float(static_cast<const kvc::bfloat16*>(rows.value_row(t))[d]);
            }
            EXPECT_EQ(key, static_cast<float>(kvc_test::stored_value(keys[t * 16 + d], GetParam())));
            EXPECT_EQ(value, static_cast<float>(kvc_test::stored_value(values[t * 16 + d], GetParam())));
        }
    for (std::size_t t = 0; t < 5; ++t) EXPECT_EQ(cache.positions(0)[t], static_cast<std::int32_t>(10 + t));
}

TEST_P(FullCacheByDtype, ChunkedPrefillEqualsStepByStepDecode) {
    const cache_config c = shape(1, 2, 8, 32, GetParam());
    const std::size_t prompt = 23, chunk = 9, total = prompt + chunk;
    const auto keys = random_floats(total * 2 * 32, 6), values = random_floats(total * 2 * 32, 7);
    const auto queries = random_floats(chunk * 8 * 32, 8);

    full_cache chunked(c);
    chunked.append(0, token_major(keys.data(), total, 2, 32), token_major(values.data(), total, 2, 32), 0);
    std::vector<float> out(chunk * 8 * 32), mass(2 * total);
    chunked.attend_chunk(0, queries.data(), chunk, out.data(), mass.data());

    full_cache stepped(c);
    stepped.append(0, token_major(keys.data(), prompt, 2, 32), token_major(values.data(), prompt, 2, 32), 0);
    std::vector<float> expected_mass(2 * total, 0.0f);
    for (std::size_t i = 0; i < chunk; ++i) {
        const std::size_t t = prompt + i;
        stepped.append(0, token_major(keys.data() + t * 64, 1, 2, 32), token_major(values.data() + t * 64, 1, 2, 32),
                       static_cast<std::int64_t>(t));
        std::vector<float> step(8 * 32), step_mass(2 * (t + 1));
        stepped.attend(0, queries.data() + i * 8 * 32, step.data(), step_mass.data());
        for (std::size_t j = 0; j < step.size(); ++j) EXPECT_FLOAT_EQ(out[i * 8 * 32 + j], step[j]);
        for (std::size_t h = 0; h < 2; ++h)
            for (std::size_t s = 0; s <= t; ++s) expected_mass[h * total + s] += step_mass[h * (t + 1) + s];
    }
    for (std::size_t i = 0; i < mass.size(); ++i) EXPECT_NEAR(mass[i], expected_mass[i], 1e-5);
    double sum = 0;
    for (float m : mass) sum += m;
    EXPECT_NEAR(sum, static_cast<double>(chunk * 8), 1e-3); // every query's probabilities sum to 1
}

INSTANTIATE_TEST_SUITE_P(AllStorage, FullCacheByDtype, ::testing::Values(dtype::f32, dtype::f16, dtype::bf16),
                         [](const auto& info) { return std::string(kvc::name_of(info.param)); });

TEST(FullCache, EveryViewLayoutAndElementTypeStoresTheSameRows) {
    const std::size_t tokens = 13, heads = 3, dim = 24;
    const cache_config c = shape(1, heads, heads, dim, dtype::f16);
    const auto data = random_floats(tokens * heads * dim, 9);
    full_cache reference(c);
    reference.append(0, token_major(data.data(), tokens, heads, dim), token_major(data.data(), tokens, heads, dim), 0);
    const auto expected = snapshot(reference, 0);

    // Head-major copy.
    std::vector<float> head_major(data.size());
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            std::copy_n(&data[(t * heads + h) * dim], dim, &head_major[(h * tokens + t) * dim]);
    full_cache from_head_major(c);
    kv_view<const float, kvc::layout_head_major> hm(head_major.data(), tokens, heads, dim);
    from_head_major.append(0, hm, hm, 0);
    EXPECT_EQ(snapshot(from_head_major, 0), expected);

    // Strided with padding between heads and tokens.
    const std::size_t head_stride = dim + 5, token_stride = heads * head_stride + 3;
    std::vector<float> padded(tokens * token_stride, NAN);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            std::copy_n(&data[(t * heads + h) * dim], dim, &padded[t * token_stride + h * head_stride]);
    full_cache from_strided(c);
    kv_view<const float, kvc::layout_strided> st(padded.data(), tokens, heads, dim, token_stride, head_stride);
    from_strided.append(0, st, st, 0);
    EXPECT_EQ(snapshot(from_strided, 0), expected);

    // Paged: blocks of 4 tokens in a shuffled pool.
    const std::size_t block = 4, blocks = (tokens + block - 1) / block;
    const std::vector<std::int32_t> table = {2, 0, 3, 1};
    std::vector<float> pool(blocks * block * heads * dim, NAN);
    for (std::size_t t = 0; t < tokens; ++t)
        std::copy_n(&data[t * heads * dim], heads * dim,
                    &pool[(table[t / block] * block + t % block) * heads * dim]);
    full_cache from_paged(c);
    kv_view<const float, kvc::layout_paged> pg(pool.data(), table.data(), table.size(), blocks, block, tokens, heads,
                                                dim);
    from_paged.append(0, pg, pg, 0);
    EXPECT_EQ(snapshot(from_paged, 0), expected);

    // Engine already in fp16: stored as given.
    std::vector<kvc::half> halves(data.size());
    for (std::size_t i = 0; i < data.size(); ++i) halves[i] = kvc::to_half(data[i]);
    full_cache from_half(c);
    kv_view<const kvc::half, layout_token_major> hv(halves.data(), tokens, heads, dim);
    from_half.append(0, hv, hv, 0);
    EXPECT_EQ(snapshot(from_half, 0), expected);

    // Engine in bf16, cache in fp16: converted through fp32 exactly.
    std::vector<kvc::bfloat16> brains(data.size());
    for (std::size_t i = 0; i < data.size(); ++i) brains[i] = kvc::to_bfloat16(data[i]);
    full_cache from_bf16(c);
    kv_view<const kvc::bfloat16, layout_token_major> bv(brains.data(), tokens, heads, dim);
    from_bf16.append(0, bv, bv, 0);
    const auto& rows = from_bf16.head(0, 1);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t d = 0; d < dim; ++d) {
            const kvc::half expected_half = kvc::to_half(kvc::to_float(brains[(t * heads + 1) * dim + d]));
            EXPECT_TRUE(kvc::same_bits(static_cast<const kvc::half*>(rows.key_row(t))[d], expected_half));
        }
}

TEST(FullCache, OneTokenAtATimeEqualsOneChunk) {
    const cache_config c = shape(2, 2, 4, 64, dtype::bf16);
    const auto keys = random_floats(50 * 2 * 64, 10), values = random_floats(50 * 2 * 64, 11);
    full_cache whole(c), single(c);
    whole.append(1, token_major(keys.data(), 50, 2, 64), token_major(values.data(), 50, 2, 64), 100);
    for (std::size_t t = 0; t < 50; ++t)
        single.append(1, token_major(keys.data() + t * 128, 1, 2, 64), token_major(values.data() + t * 128, 1, 2, 64),
                      static_cast<std::int64_t>(100 + t));
    EXPECT_EQ(snapshot(whole, 1), snapshot(single, 1));
    EXPECT_EQ(whole.tokens(0), 0u);
    EXPECT_EQ(whole.tokens(1), 50u);
}

TEST(FullCache, SingleTokenOutputIsItsValueRow) {
    // Hand-worked case: with one token every query's softmax weight is 1.
    const cache_config c = shape(1, 1, 2, 4, dtype::f32);
    full_cache cache(c);
    const float key[4] = {1, 2, 3, 4}, value[4] = {0.5f, -1.0f, 2.0f, 8.0f};
    cache.append(0, token_major(key, 1, 1, 4), token_major(value, 1, 1, 4), 0);
    const float queries[8] = {9, -3, 1, 0, -7, 2, 2, 5};
    float out[8];
    cache.attend(0, queries, out);
    for (int j = 0; j < 2; ++j)
        for (int d = 0; d < 4; ++d) EXPECT_EQ(out[j * 4 + d], value[d]);
}

TEST(FullCache, TwoTokenHandComputedCase) {
    // q.k0 = 0, q.k1 = 2 with scale 1/sqrt(4) = 0.5: logits 0 and 1,
    // weights 1/(1+e) and e/(1+e).
    const cache_config c = shape(1, 1, 1, 4, dtype::f32);
    full_cache cache(c);
    const float keys[8] = {0, 0, 0, 0, 1, 1, 0, 0}, values[8] = {1, 0, 0, 0, 0, 1, 0, 0};
    cache.append(0, token_major(keys, 2, 1, 4), token_major(values, 2, 1, 4), 0);
    const float q[4] = {1, 1, 0, 0};
    float out[4], mass[2];
    cache.attend(0, q, out, mass);
    const double e = std::exp(1.0);
    EXPECT_NEAR(out[0], 1.0 / (1.0 + e), 1e-7);
    EXPECT_NEAR(out[1], e / (1.0 + e), 1e-7);
    EXPECT_EQ(out[2], 0.0f);
    EXPECT_NEAR(mass[0], 1.0 / (1.0 + e), 1e-7);
    EXPECT_NEAR(mass[1], e / (1.0 + e), 1e-7);
}

TEST(FullCache, EmptyLayerAttendsToZeros) {
    full_cache cache(shape(1, 1, 1, 8, dtype::f16));
    const auto q = random_floats(8, 12);
    std::vector<float> out(8, 42.0f);
    cache.attend(0, q.data(), out.data());
    for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST(FullCache, BytesAreExactlyWhatTheResourceHandedOut) {
    kvc_test::counting_resource counter;
    cache_config c = shape(3, 2, 4, 64, dtype::f16);
    c.resource = &counter;
    {
        full_cache cache(c);
        const std::size_t metadata = counter.in_use;
        EXPECT_EQ(cache.bytes(), metadata);
        // Layout: per layer and KV head, keys and values of tokens x dim fp16, plus an int32 position per token and layer.
        cache.reserve(100);
        EXPECT_EQ(cache.bytes(), metadata + 3 * 2 * 2 * 100 * 64 * 2 + 3 * 100 * 4);
        EXPECT_EQ(cache.bytes(), counter.in_use);
        const auto keys = random_floats(100 * 2 * 64, 13);
        for (std::size_t l = 0; l < 3; ++l)
            cache.append(l, token_major(keys.data(), 100, 2, 64), token_major(keys.data(), 100, 2, 64), 0);
        EXPECT_EQ(cache.bytes(), metadata + 3 * 2 * 2 * 100 * 64 * 2 + 3 * 100 * 4); // reserved: no growth
        cache.append(0, token_major(keys.data(), 1, 2, 64), token_major(keys.data(), 1, 2, 64), 100);
        EXPECT_EQ(cache.bytes(), counter.in_use); // grown geometrically, still counted exactly
        cache.shrink_to_fit();
        EXPECT_EQ(cache.bytes(), metadata + 2 * 2 * (101 + 2 * 100) * 64 * 2 + (101 + 2 * 100) * 4);
        EXPECT_EQ(cache.bytes(), counter.in_use);
        cache.clear();
        EXPECT_EQ(cache.bytes(), metadata);
        EXPECT_EQ(counter.in_use, metadata);
        EXPECT_EQ(cache.tokens(0), 0u);
    }
    EXPECT_EQ(counter.in_use, 0u); // nothing leaked, nothing taken from elsewhere
}

TEST(FullCache, DefaultResourceHookIsUsed) {
    kvc_test::counting_resource counter;
    kvc::memory_resource* previous = kvc::set_default_resource(&counter);
    {
        full_cache cache(shape(1, 1, 1, 8, dtype::f32));
        const auto data = random_floats(8, 14);
        cache.append(0, token_major(data.data(), 1, 1, 8), token_major(data.data(), 1, 1, 8), 0);
        EXPECT_GT(counter.in_use, 0u);
        EXPECT_EQ(cache.bytes(), counter.in_use);
    }
    kvc::set_default_resource(previous);
    EXPECT_EQ(counter.in_use, 0u);
}

TEST(FullCache, CopyIsIndependent) {
    const cache_config c = shape(1, 1, 2, 16, dtype::f16);
    full_cache original(c);
    const auto data = random_floats(40 * 16, 15);
    original.append(0, token_major(data.data(), 20, 1, 16), token_major(data.data() + 320, 20, 1, 16), 0);
    full_cache copy = original;
    EXPECT_EQ(snapshot(copy, 0), snapshot(original, 0));
    copy.append(0, token_major(data.data(), 1, 1, 16), token_major(data.data(), 1, 1, 16), 20);
    EXPECT_EQ(original.tokens(0), 20u);
    EXPECT_EQ(copy.tokens(0), 21u);
}

// ---- bad input: kvc::error naming what was expected, cache unchanged ----

void expect_error_containing(const std::function<void()>& call, const std::string& needle) {
    try {
        call();
        ADD_FAILURE() << "expected kvc::error mentioning '" << needle << "'";
    } catch (const kvc::error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

TEST(FullCache, InvalidConfigsAreRejected) {
    expect_error_containing([] { full_cache(shape(0, 1, 1, 8, dtype::f16)); }, "layers");
    expect_error_containing([] { full_cache(shape(1, 0, 1, 8, dtype::f16)); }, "kv_heads");
    expect_error_containing([] { full_cache(shape(1, 2, 3, 8, dtype::f16)); }, "query_heads");
    expect_error_containing([] { full_cache(shape(1, 1, 1, 0, dtype::f16)); }, "head_dim");
    expect_error_containing([] { full_cache(shape(1, 1, 1, 4096, dtype::f16)); }, "head_dim");
    cache_config c = shape(1, 1, 1, 8, dtype::f16);
    c.scale = -1.0f;
    expect_error_containing([&] { full_cache{c}; }, "scale");
    c.scale = NAN;
    expect_error_containing([&] { full_cache{c}; }, "scale");
}

TEST(FullCache, BadAppendsThrowAndLeaveTheCacheUnchanged) {
    const cache_config c = shape(2, 2, 4, 16, dtype::f16);
    full_cache cache(c);
    const auto data = random_floats(10 * 3 * 32, 16);
    cache.append(0, token_major(data.data(), 5, 2, 16), token_major(data.data(), 5, 2, 16), 0);
    const auto before = snapshot(cache, 0);
    const std::size_t bytes_before = cache.bytes();
    auto unchanged = [&] {
        EXPECT_EQ(snapshot(cache, 0), before);
        EXPECT_EQ(cache.bytes(), bytes_before);
        EXPECT_EQ(cache.tokens(1), 0u);
    };
    expect_error_containing([&] { cache.append(2, token_major(data.data(), 1, 2, 16), token_major(data.data(), 1, 2, 16), 5); }, "layer");
    unchanged();
    expect_error_containing([&] { cache.append(0, token_major(data.data(), 1, 3, 16), token_major(data.data(), 1, 3, 16), 5); }, "kv_heads");
    unchanged();
    expect_error_containing([&] { cache.append(0, token_major(data.data(), 1, 2, 8), token_major(data.data(), 1, 2, 8), 5); }, "head_dim");
    unchanged();
    expect_error_containing([&] { cache.append(0, token_major(data.data(), 2, 2, 16), token_major(data.data(), 1, 2, 16), 5); }, "tokens");
    unchanged();
    std::vector<kvc::half> halves(64);
    expect_error_containing([&] { cache.append(0, token_major(data.data(), 1, 2, 16), kv_view<const kvc::half, layout_token_major>(halves.data(), 1, 2, 16), 5); }, "element type");
    unchanged();
    expect_error_containing([&] { cache.append(0, token_major(data.data(), 1, 2, 16), token_major(data.data(), 1, 2, 16), 4); }, "position");
    unchanged();
    expect_error_containing([&] { cache.append(1, token_major(data.data(), 1, 2, 16), token_major(data.data(), 1, 2, 16), -3); }, "position");
    unchanged();
    expect_error_containing([&] { cache.append(1, token_major(data.data(), 2, 2, 16), token_major(data.data(), 2, 2, 16), INT32_MAX - 1); }, "position");
    unchanged();
}

TEST(FullCache, BadAttendCallsThrow) {
    full_cache cache(shape(1, 1, 2, 8, dtype::f32));
    std::vector<float> q(16), out(16);
    expect_error_containing([&] { cache.attend(1, q.data(), out.data()); }, "layer");
    expect_error_containing([&] { cache.attend(0, nullptr, out.data()); }, "queries");
    expect_error_containing([&] { cache.attend_chunk(0, q.data(), 1, out.data()); }, "chunk");
    const auto data = random_floats(8, 17);
    cache.append(0, token_major(data.data(), 1, 1, 8), token_major(data.data(), 1, 1, 8), 0);
    expect_error_containing([&] { cache.attend_chunk(0, q.data(), 2, out.data()); }, "chunk");
    expect_error_containing([&] { cache.attend_chunk(0, q.data(), 0, out.data()); }, "chunk");
}

TEST(FullCache, FailedAllocationLosesNoToken) {
    kvc_test::counting_resource counter;
    cache_config c = shape(1, 4, 4, 64, dtype::f32);
    c.resource = &counter;
    full_cache cache(c);
    const auto data = random_floats(64 * 4 * 64, 18);
    cache.append(0, token_major(data.data(), 32, 4, 64), token_major(data.data(), 32, 4, 64), 0);
    cache.shrink_to_fit();
    const auto before = snapshot(cache, 0);
    const auto q = random_floats(4 * 64, 19);
    std::vector<float> out_before(4 * 64), out_after(4 * 64);
    cache.attend(0, q.data(), out_before.data());
    // Growing one K or V buffer of a head from 32 to 64 rows of 64 fp32 takes
    // 16 KiB while the old 8 KiB is still held, then frees the old: net +8 KiB.
    // A 40 KiB allowance lets heads 0 and 1 grow (32 KiB net) and fails on head 2,
    // part-way through the append.
    counter.limit = counter.in_use + 40 * 1024;
    EXPECT_THROW(cache.append(0, token_major(data.data(), 32, 4, 64), token_major(data.data(), 32, 4, 64), 32),
                 std::bad_alloc);
    EXPECT_EQ(cache.tokens(0), 32u);
    EXPECT_EQ(snapshot(cache, 0), before);
    cache.attend(0, q.data(), out_after.data());
    EXPECT_EQ(out_before, out_after);
    EXPECT_EQ(cache.bytes(), counter.in_use);
}

// ---- concurrency: layers of one cache, and a batch of caches ----

TEST(FullCache, LayersCanBeUsedFromSeveralThreads) {
    const cache_config c = shape(4, 2, 8, 64, dtype::f16);
    const auto keys = random_floats(300 * 2 * 64, 20), values = random_floats(300 * 2 * 64, 21);
    const auto queries = random_floats(8 * 64, 22);
    full_cache sequential(c), threaded(c);
    std::vector<std::vector<float>> expected(4, std::vector<float>(8 * 64)), got(4, std::vector<float>(8 * 64));
    for (std::size_t l = 0; l < 4; ++l) {
        for (std::size_t t = 0; t < 300; t += 30)
            sequential.append(l, token_major(keys.data() + t * 128, 30, 2, 64),
                              token_major(values.data() + t * 128, 30, 2, 64), static_cast<std::int64_t>(t));
        sequential.attend(l, queries.data(), expected[l].data());
    }
    std::vector<std::thread> workers;
    for (std::size_t l = 0; l < 4; ++l)
        workers.emplace_back([&, l] {
            for (std::size_t t = 0; t < 300; t += 30) {
                threaded.append(l, token_major(keys.data() + t * 128, 30, 2, 64),
                                token_major(values.data() + t * 128, 30, 2, 64), static_cast<std::int64_t>(t));
                std::vector<float> scratch(8 * 64);
                threaded.attend(l, queries.data(), scratch.data());
            }
            threaded.attend(l, queries.data(), got[l].data());
        });
    for (auto& w : workers) w.join();
    EXPECT_EQ(got, expected);
}

TEST(FullCache, BatchOfSequencesRunsInParallel) {
    const cache_config c = shape(2, 1, 2, 32, dtype::f32);
    std::vector<full_cache> batch(3, full_cache(c));
    std::vector<std::vector<float>> outputs(3, std::vector<float>(64));
    std::vector<std::thread> workers;
    for (std::size_t s = 0; s < 3; ++s)
        workers.emplace_back([&, s] {
            const auto data = random_floats(40 * 32, 100 + static_cast<std::uint32_t>(s));
            for (std::size_t l = 0; l < 2; ++l)
                batch[s].append(l, token_major(data.data(), 40, 1, 32), token_major(data.data(), 40, 1, 32), 0);
            const auto q = random_floats(64, 7);
            batch[s].attend(1, q.data(), outputs[s].data());
        });
    for (auto& w : workers) w.join();
    for (std::size_t s = 0; s < 3; ++s) {
        full_cache alone(c);
        const auto data = random_floats(40 * 32, 100 + static_cast<std::uint32_t>(s));
        alone.append(1, token_major(data.data(), 40, 1, 32), token_major(data.data(), 40, 1, 32), 0);
        const auto q = random_floats(64, 7);
        std::vector<float> out(64);
        alone.attend(1, q.data(), out.data());
        EXPECT_EQ(out, outputs[s]) << "sequence " << s;
    }
}

} // namespace
