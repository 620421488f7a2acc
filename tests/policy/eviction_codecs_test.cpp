// Eviction composed with quantization: an evicted-and-quantized cache works end
// to end. The kept rows are the codec's own bytes, untouched (eviction never
// re-quantizes a block codec's rows), attention over the ragged packed heads
// equals a double-precision attention over exactly the kept rows' stored
// values, and the memory of the evicted rows goes back to the resource.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "../kernels/quantized_query_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;
namespace quant = kvc::quant;

template <class Eviction, class Codec>
struct pairing {
    using eviction = Eviction;
    using codec = Codec;
};

template <class P>
class EvictQuantized : public ::testing::Test {};

using pairings = ::testing::Types<pairing<evict::snapkv, quant::q8_0>, pairing<evict::knorm, quant::q4_0>,
                                  pairing<evict::h2o, quant::block_kv<quant::int8_sym, quant::int4_asym, 32, 4>>,
                                  pairing<evict::policy<evict::score::snapkv, evict::adakv>, quant::q4_1>,
                                  pairing<evict::streaming, quant::block<quant::fp8_e4m3, 64>>>;
TYPED_TEST_SUITE(EvictQuantized, pairings);

TYPED_TEST(EvictQuantized, KeptRowsAreUntouchedAttentionMatchesAndMemoryIsFreed) {
    using cache_type = kvc::compressed_cache<typename TypeParam::eviction, kvc::merge::none,
                                             typename TypeParam::codec, kvc::project::none>;
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 8;
    c.head_dim = 64;
    kvc_test::counting_resource counter;
    c.resource = &counter;
    const std::size_t tokens = 300, dim = c.head_dim;
    const std::vector<float> keys = random_floats(tokens * c.kv_heads * dim, 11);
    const std::vector<float> values = random_floats(tokens * c.kv_heads * dim, 12);
    const std::vector<float> queries = random_floats(tokens * c.query_heads * dim, 13);

    typename TypeParam::eviction policy(evict::budget::ratio(0.25));
    cache_type cache(c, policy);
    std::vector<float> out(tokens * c.query_heads * dim);
    for (std::size_t layer = 0; layer < c.layers; ++layer) {
        cache.append(layer, token_major(keys.data(), tokens, c.kv_heads, dim),
                     token_major(values.data(), tokens, c.kv_heads, dim), 0);
        cache.attend_chunk(layer, queries.data(), tokens, out.data());
    }
    // What each head stores for each position, before eviction.
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    std::map<std::pair<std::size_t, std::size_t>, std::vector<float>> stored_keys, stored_values;
    for (std::size_t layer = 0; layer < c.layers; ++layer)
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            auto& sk = stored_keys[{layer, h}];
            auto& sv = stored_values[{layer, h}];
            sk.resize(tokens * dim);
            sv.resize(tokens * dim);
            cache.head(layer, h).decode_keys(k, 0, tokens, sk.data());
            cache.head(layer, h).decode_values(k, 0, tokens, sv.data());
        }
    const std::size_t bytes_before = cache.bytes();
    EXPECT_EQ(counter.in_use, bytes_before);

    std::size_t row_bytes_before = 0;
    for (std::size_t layer = 0; layer < c.layers; ++layer)
        for (std::size_t h = 0; h < c.kv_heads; ++h) row_bytes_before += cache.head(layer, h).bytes();

    cache.compress();
    cache.shrink_to_fit();
    EXPECT_EQ(counter.in_use, cache.bytes()); // bytes() is exactly what the resource holds
    EXPECT_LT(cache.bytes(), bytes_before);
    // Every head holds exactly its kept rows: packed rows (scales inside) and
    // fp16 sink rows, nothing for the evicted ones. (The policy's own state,
    // e.g. SnapKV's window of recent queries, is a fixed cost outside the rows.)
    std::size_t row_bytes_after = 0;
    for (std::size_t layer = 0; layer < c.layers; ++layer)
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const kvc::packed_rows& rows = cache.head(layer, h);
            EXPECT_EQ(rows.bytes(), rows.packed_tokens() * (rows.key_row_bytes() + rows.value_row_bytes()) +
                                        rows.sink_tokens() * kvc::packed_layout::sink_token_bytes(dim));
            row_bytes_after += rows.bytes();
        }
    EXPECT_LE(row_bytes_after * 4, row_bytes_before + 4 * c.layers * c.kv_heads * 4 * 2 * dim * 2)
        << "a quarter of the rows (sink rows in fp16 may cost a little more)";

    for (std::size_t layer = 0; layer < c.layers; ++layer) {
        std::size_t total = 0;
        for (std::size_t h = 0; h < c.kv_heads; ++h) total += cache.tokens(layer, h);
        EXPECT_EQ(total, c.kv_heads * 75u) << "keep ratio 0.25 of 300 tokens per head (in total for AdaKV)";
        const float* q = queries.data() + (tokens - 1) * c.query_heads * dim;
        std::vector<double> want(c.query_heads * dim, 0.0);
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const std::size_t held = cache.tokens(layer, h);
            const std::int32_t* positions = cache.positions(layer, h);
            std::vector<float> kept_keys(held * dim), kept_values(held * dim);
            cache.head(layer, h).decode_keys(k, 0, held, kept_keys.data());
            cache.head(layer, h).decode_values(k, 0, held, kept_values.data());
            const auto& sk = stored_keys[{layer, h}];
            const auto& sv = stored_values[{layer, h}];
            for (std::size_t i = 0; i < held; ++i) {
                if (i > 0) {
                    ASSERT_LT(positions[i - 1], positions[i]);
                }
                const std::size_t p = static_cast<std::size_t>(positions[i]);
                for (std::size_t d = 0; d < dim; ++d) {
                    ASSERT_EQ(kept_keys[i * dim + d], sk[p * dim + d]) << "layer " << layer << " head " << h;
                    ASSERT_EQ(kept_values[i * dim + d], sv[p * dim + d]) << "layer " << layer << " head " << h;
                }
            }
            // The oracle: softmax attention in double over exactly these rows,
            // scored with the int8 query the integer key formats use
            // (kernels/quant/common.hpp, quantize_query) on the packed rows and
            // with the fp32 query on fp16 sink rows.
            constexpr auto key_format = TypeParam::codec::key_format::format;
            const std::size_t sinks = cache.head(layer, h).sink_tokens();
            for (std::size_t g = 0; g < c.group(); ++g) {
                const std::size_t j = h * c.group() + g;
                const std::vector<float> exact(q + j * dim, q + (j + 1) * dim);
                const std::vector<float> packed_query =
                    kvc_test::quantizes_query(key_format) ? kvc_test::dequantized_query(q + j * dim, dim) : exact;
                std::vector<double> logits(held);
                double max = -INFINITY;
                for (std::size_t i = 0; i < held; ++i) {
                    double dot = 0.0;
                    const std::vector<float>& query = i < sinks ? exact : packed_query;
                    for (std::size_t d = 0; d < dim; ++d) dot += double(query[d]) * kept_keys[i * dim + d];
                    logits[i] = dot * c.logit_scale();
                    max = std::max(max, logits[i]);
                }
                double sum = 0.0;
                for (double& l : logits) sum += (l = std::exp(l - max));
                for (std::size_t i = 0; i < held; ++i)
                    for (std::size_t d = 0; d < dim; ++d)
                        want[j * dim + d] += logits[i] / sum * kept_values[i * dim + d];
            }
        }
        std::vector<float> got(c.query_heads * dim);
        cache.attend(layer, q, got.data());
        EXPECT_LT(kvc_test::relative_error(got, want), 1e-5) << "layer " << layer;
    }
}

// Decode-time compression on a quantized cache holds the budget through 2000 steps.
TEST(EvictQuantizedDecode, ScheduleKeepsAQuantizedCacheAtItsTarget) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 32;
    using cache_type = kvc::compressed_cache<evict::tova, kvc::merge::none, quant::q4_0, kvc::project::none>;
    cache_type cache(c, evict::tova(evict::budget::absolute(64), evict::schedule{true, 8}));
    std::vector<float> out(c.query_heads * c.head_dim);
    for (std::size_t t = 0; t < 2000; ++t) {
        const std::vector<float> k = random_floats(c.kv_heads * c.head_dim, 1000 + static_cast<std::uint32_t>(t));
        const std::vector<float> q = random_floats(c.query_heads * c.head_dim, 5000 + static_cast<std::uint32_t>(t));
        cache.append(0, token_major(k.data(), 1, c.kv_heads, c.head_dim), token_major(k.data(), 1, c.kv_heads, c.head_dim),
                     static_cast<std::int64_t>(t));
        cache.attend(0, q.data(), out.data());
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            ASSERT_LE(cache.tokens(0, h), 64u + 8u) << "step " << t;
            ASSERT_GE(cache.tokens(0, h), std::min<std::size_t>(t + 1, 64u)) << "step " << t;
        }
        for (float x : out) ASSERT_TRUE(std::isfinite(x));
    }
}

} // namespace
