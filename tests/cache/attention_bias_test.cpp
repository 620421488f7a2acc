// Issue 12 item 4: a per-token additive logit, declared as a column by a
// policy (merging keeps log(count) there), applied by every codec's attention
// in decode and in chunked prefill. The oracle is double-precision attention
// over the rows the cache stores (decoded), with the same biases.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using token_major = kvc::kv_view<const float, kvc::layout_token_major>;

// A bias a merger could hold: position p weighs as if it stood for 1 + p % 4
// tokens (log count), known the moment the token is appended.
double bias_of_position(std::int32_t position) { return std::log(1.0 + position % 4); }

struct bias_writer {
    using family = kvc::merging_family;
    static constexpr bool merges = false;
    static constexpr bool observes_append = true;
    using columns = kvc::column_list<kvc::attention_bias_column>;
    std::size_t append_scratch_floats(std::size_t) const noexcept { return 0; }
    template <class Layer, class K, class V>
    void on_append(const Layer& layer, std::size_t count, const K&, const V&, float*) const noexcept {
        for (std::size_t h = 0; h < layer.config().kv_heads; ++h) {
            float* bias = layer.template mutable_column<kvc::attention_bias_column>(h);
            const std::int32_t* positions = layer.positions(h);
            for (std::size_t t = layer.held(h) - count; t < layer.held(h); ++t)
                bias[t] = static_cast<float>(bias_of_position(positions[t]));
        }
    }
};

kvc::cache_config bias_shape() {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 6;
    c.head_dim = 64;
    c.storage = kvc::dtype::f16;
    return c;
}

// Attention of one query head over the first `visible` stored rows of KV head h, in double.
std::vector<double> oracle(const std::vector<float>& keys, const std::vector<float>& values, std::size_t visible,
                           const float* query, const kvc::cache_config& c, bool with_bias) {
    const std::size_t dim = c.head_dim;
    std::vector<double> logits(visible), out(dim, 0.0);
    double max = -INFINITY, sum = 0.0;
    for (std::size_t t = 0; t < visible; ++t) {
        double dot = 0.0;
        for (std::size_t d = 0; d < dim; ++d) dot += double(query[d]) * keys[t * dim + d];
        logits[t] = dot * c.logit_scale() + (with_bias ? bias_of_position(static_cast<std::int32_t>(t)) : 0.0);
        max = std::max(max, logits[t]);
    }
    for (double& l : logits) sum += (l = std::exp(l - max));
    for (std::size_t t = 0; t < visible; ++t)
        for (std::size_t d = 0; d < dim; ++d) out[d] += logits[t] / sum * values[t * dim + d];
    return out;
}

template <class Codec>
class AttentionBias : public ::testing::Test {};
using codecs = ::testing::Types<kvc::quant::none<kvc::half>, kvc::quant::q4_0, kvc::quant::kivi<4, 32, 16>,
                                kvc::quant::with_sinks<kvc::quant::q8_0>, kvc::quant::rotated<kvc::quant::q8_0>,
                                kvc::quant::gear, kvc::quant::sparse>;
TYPED_TEST_SUITE(AttentionBias, codecs);

TYPED_TEST(AttentionBias, EveryCodecAddsItInDecodeAndPrefill) {
    using cache_type = kvc::compressed_cache<kvc::evict::none, bias_writer, TypeParam, kvc::project::none>;
    static_assert(cache_type::columns_type::template has<kvc::attention_bias_column>);
    const kvc::cache_config c = bias_shape();
    const std::size_t dim = c.head_dim, group = c.group(), prompt = 48, steps = 6, total = prompt + steps;
    const std::size_t row = c.kv_heads * dim, qrow = c.query_heads * dim;
    const auto keys = kvc_test::random_floats(total * row, 61), values = kvc_test::random_floats(total * row, 62);
    const auto queries = kvc_test::random_floats(total * qrow, 63, 0.5f);
    cache_type cache(c);
    const auto& k = kvc::kernels::active();
    double worst = 0.0, bias_effect = 0.0;
    // Compares the cache's outputs for queries [first, first + n) (query i sees tokens 0..first + i) with the oracle.
    auto check = [&](const std::vector<float>& got, std::size_t first, std::size_t n) {
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const std::size_t held = cache.tokens(0, h);
            std::vector<float> stored_keys(held * dim), stored_values(held * dim);
            cache.head(0, h).decode_keys(k, 0, held, stored_keys.data());
            cache.head(0, h).decode_values(k, 0, held, stored_values.data());
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t g = 0; g < group; ++g) {
                    const std::size_t j = h * group + g;
                    const float* q = queries.data() + (first + i) * qrow + j * dim;
                    const auto expected = oracle(stored_keys, stored_values, first + i + 1, q, c, true);
                    const auto unbiased = oracle(stored_keys, stored_values, first + i + 1, q, c, false);
                    for (std::size_t d = 0; d < dim; ++d) {
                        worst = std::max(worst, std::abs(got[i * qrow + j * dim + d] - expected[d]));
                        bias_effect = std::max(bias_effect, std::abs(expected[d] - unbiased[d]));
                    }
                }
        }
    };
    cache.append(0, token_major(keys.data(), prompt, c.kv_heads, dim), token_major(values.data(), prompt, c.kv_heads, dim), 0);
    std::vector<float> out(prompt * qrow);
    cache.attend_chunk(0, queries.data(), prompt, out.data());
    check(out, 0, prompt);
    for (std::size_t t = prompt; t < total; ++t) {
        cache.append(0, token_major(keys.data() + t * row, 1, c.kv_heads, dim),
                     token_major(values.data() + t * row, 1, c.kv_heads, dim), static_cast<std::int64_t>(t));
        std::vector<float> step(qrow);
        cache.attend(0, queries.data() + t * qrow, step.data());
        check(step, t, 1);
    }
    // fp32 arithmetic over the stored rows: far below what the bias moves (it changes outputs by ~0.1-1).
    EXPECT_LT(worst, 2e-4);
    EXPECT_GT(bias_effect, 0.05) << "the bias must matter for this test to mean anything";
}

} // namespace
