// Issue 12 item 4: a per-token additive logit, declared as a column by a
// policy (merging keeps log(count) there), applied by every codec's attention
// in decode and in chunked prefill.
//
// The oracle does not recompute a codec's logits (integer formats score
// against an int8-quantized query, rotated codecs in their own space): the
// same cache without the bias gives each token's probability p_t (one query
// head per KV head, so its attention mass is exactly that), and with biases
// b_t the output must be sum_t p_t e^b_t v_t / sum_t p_t e^b_t over the values
// the cache stores, computed in double; in prefill, query i's probabilities
// renormalised over rows 0..i.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/mixed.hpp"
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
    c.query_heads = 2; // group 1: a head's attention mass is its query's probabilities
    c.head_dim = 64;
    c.storage = kvc::dtype::f16;
    return c;
}

// sum_s p_s e^(b_s) v_s / sum_s p_s e^(b_s) over rows 0..last of one head, in
// double: p_s the unbiased probabilities, v_s the stored value rows.
std::vector<double> biased_output(const float* probabilities, const std::vector<float>& stored, std::size_t last,
                                  std::size_t dim) {
    std::vector<double> out(dim, 0.0);
    double total = 0.0;
    for (std::size_t s = 0; s <= last; ++s) {
        const double w = double(probabilities[s]) * std::exp(bias_of_position(static_cast<std::int32_t>(s)));
        total += w;
        for (std::size_t d = 0; d < dim; ++d) out[d] += w * stored[s * dim + d];
    }
    for (double& x : out) x /= total;
    return out;
}

template <class Codec>
class AttentionBias : public ::testing::Test {};
using codecs = ::testing::Types<kvc::quant::none<kvc::half>, kvc::quant::q4_0, kvc::quant::kivi<4, 32, 16>,
                                kvc::quant::with_sinks<kvc::quant::q8_0>, kvc::quant::rotated<kvc::quant::q8_0>,
                                kvc::quant::gear, kvc::quant::sparse,
                                kvc::quant::mixed<kvc::quant::int8_sym, kvc::quant::int4_sym, 32>>;

// Mixed precision (Q6) attends its high rows, then its low rows: split them,
// so biases must follow tokens through its token map.
template <class Cache>
void split_precision(Cache& cache) {
    if constexpr (kvc::detail::has_assign_precision<typename Cache::head_storage>::value) {
        for (std::size_t h = 0; h < cache.config().kv_heads; ++h) {
            std::vector<float> scores(cache.tokens(0, h));
            for (std::size_t t = 0; t < scores.size(); ++t) scores[t] = static_cast<float>((t * 7) % 5); // scattered
            cache.assign_precision(0, h, scores.data());
        }
    }
}
TYPED_TEST_SUITE(AttentionBias, codecs);

// The check on the active instruction set (the bias reaches the decode
// kernels of every set; prefill runs them prefix by prefix).
template <class TypeParam>
void check_bias_on_active_arch() {
    using biased_cache = kvc::compressed_cache<kvc::evict::none, bias_writer, TypeParam, kvc::project::none>;
    using plain_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, TypeParam, kvc::project::none>;
    static_assert(biased_cache::columns_type::template has<kvc::attention_bias_column>);
    const kvc::cache_config c = bias_shape();
    const std::size_t dim = c.head_dim, heads = c.kv_heads, prompt = 48, steps = 6, total = prompt + steps;
    const std::size_t row = heads * dim;
    const auto keys = kvc_test::random_floats(total * row, 61), values = kvc_test::random_floats(total * row, 62);
    const auto queries = kvc_test::random_floats(total * row, 63, 0.5f);
    const auto rows_of = [&](const std::vector<float>& data, std::size_t first, std::size_t n) {
        return token_major(data.data() + first * row, n, heads, dim);
    };
    const auto& k = kvc::kernels::active();
    // A cache holding the prompt (mixed precision: split over both precisions).
    const auto with_prompt = [&](auto& cache) {
        cache.append(0, rows_of(keys, 0, prompt), rows_of(values, 0, prompt), 0);
        split_precision(cache);
    };

    // Decode against the oracle built from the unbiased cache's probabilities.
    biased_cache biased(c);
    plain_cache plain(c);
    with_prompt(biased);
    with_prompt(plain);
    double worst = 0.0, bias_effect = 0.0;
    for (std::size_t t = prompt; t < total; ++t) {
        biased.append(0, rows_of(keys, t, 1), rows_of(values, t, 1), static_cast<std::int64_t>(t));
        plain.append(0, rows_of(keys, t, 1), rows_of(values, t, 1), static_cast<std::int64_t>(t));
        const std::size_t held = t + 1;
        std::vector<float> with_bias(row), without(row), mass(heads * held);
        biased.attend(0, queries.data() + t * row, with_bias.data());
        plain.attend(0, queries.data() + t * row, without.data(), mass.data());
        for (std::size_t h = 0; h < heads; ++h) {
            std::vector<float> stored(held * dim);
            plain.head(0, h).decode_values(k, 0, held, stored.data());
            const auto expected = biased_output(mass.data() + h * held, stored, held - 1, dim);
            for (std::size_t d = 0; d < dim; ++d) {
                worst = std::max(worst, std::abs(with_bias[h * dim + d] - expected[d]));
                bias_effect = std::max(bias_effect, double(std::abs(with_bias[h * dim + d] - without[h * dim + d])));
            }
        }
    }
    EXPECT_LT(worst, 1e-4) << "decode: fp32 arithmetic over the same logits";
    EXPECT_GT(bias_effect, 0.05) << "the bias must matter for this test to mean anything";

    // Chunked prefill over the same stored rows: query i sees rows 0..i. The
    // unbiased probabilities of a prefix are those over every row,
    // renormalised over the prefix (from a decode step of the plain cache).
    biased_cache chunked(c);
    plain_cache rows(c);
    with_prompt(chunked);
    with_prompt(rows);
    std::vector<float> out(prompt * row);
    chunked.attend_chunk(0, queries.data(), prompt, out.data());
    double prefill_worst = 0.0;
    for (std::size_t i = 0; i < prompt; ++i) {
        std::vector<float> ignored(row), mass(heads * prompt);
        rows.attend(0, queries.data() + i * row, ignored.data(), mass.data());
        for (std::size_t h = 0; h < heads; ++h) {
            std::vector<float> stored(prompt * dim);
            rows.head(0, h).decode_values(k, 0, prompt, stored.data());
            const auto expected = biased_output(mass.data() + h * prompt, stored, i, dim);
            for (std::size_t d = 0; d < dim; ++d)
                prefill_worst = std::max(prefill_worst, std::abs(out[i * row + h * dim + d] - expected[d]));
        }
    }
    EXPECT_LT(prefill_worst, 1e-4) << "prefill: fp32 arithmetic over the same logits";
}

TYPED_TEST(AttentionBias, EveryCodecAddsItInDecodeAndPrefill) {
    kvc_test::on_every_arch([] {
        check_bias_on_active_arch<TypeParam>();
    });
}

} // namespace
