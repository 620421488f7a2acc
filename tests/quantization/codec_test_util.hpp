// Shared pieces of the codec suites (tests/quantization): the per-instruction-set
// scaffolding, the rows a head stores, and the check every codec runs on
// every instruction set: prefill in chunks, then decode token by token, each
// output against attention in double over the rows the cache holds then.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_test {

// Restores the active instruction set at the end of a test.
class arch_guard {
public:
    arch_guard() : arch_(kvc::active_arch()) {}
    ~arch_guard() { kvc::set_active_arch(arch_); }
    arch_guard(const arch_guard&) = delete;
    arch_guard& operator=(const arch_guard&) = delete;

private:
    kvc::arch_id arch_;
};

// Every instruction set this CPU and this build have kernels for.
inline std::vector<kvc::arch_id> archs() {
    kvc::arch_id list[kvc::arch_count];
    const int count = kvc::kernels::available_archs(list);
    return std::vector<kvc::arch_id>(list, list + count);
}

// kv_heads KV heads of `group` query heads each, head dim `dim`, default storage.
inline kvc::cache_config shape(std::size_t kv_heads, std::size_t group, std::size_t dim, std::size_t layers = 1) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads * group;
    c.head_dim = dim;
    return c;
}

// ---------------------------------------------------------------------------
// What a head stores, and attention in double over it.

// The rows of one head as the scalar reference decodes them (the exact values
// attention uses), [tokens][dim]; `sinks` leading rows held in fp16 (0 for
// stores without sink rows).
struct stored_rows {
    std::vector<float> keys, values;
    std::size_t sinks = 0;
};

template <class S, class = void>
struct has_sink_tokens : std::false_type {};
template <class S>
struct has_sink_tokens<S, std::void_t<decltype(std::declval<const S&>().sink_tokens())>> : std::true_type {};

template <class Store>
stored_rows stored(const Store& head, std::size_t dim) {
    const std::size_t tokens = head.tokens();
    stored_rows r{std::vector<float>(tokens * dim), std::vector<float>(tokens * dim), 0};
    if constexpr (has_sink_tokens<Store>::value) r.sinks = head.sink_tokens();
    head.decode_keys(kvc::kernels::reference_table(), 0, tokens, r.keys.data());
    head.decode_values(kvc::kernels::reference_table(), 0, tokens, r.values.data());
    return r;
}

// Of KV head h of a cache's layer, and of every KV head of the layer.
template <class Cache>
stored_rows stored(const Cache& cache, std::size_t layer, std::size_t h) {
    return stored(cache.head(layer, h), cache.config().head_dim);
}
template <class Cache>
std::vector<stored_rows> stored_heads(const Cache& cache, std::size_t layer = 0) {
    std::vector<stored_rows> heads;
    for (std::size_t h = 0; h < cache.config().kv_heads; ++h) heads.push_back(stored(cache, layer, h));
    return heads;
}

// The query a codec scores its (non-sink) keys with, from the fp32 query of
// one head: itself, or for the integer Q1 key formats the int8 query
// (kernels/quant/common.hpp, quantize_query), in the codec's own space.
using query_map = std::function<std::vector<float>(const float* q, std::size_t dim)>;
inline std::vector<float> exact_query(const float* q, std::size_t dim) { return std::vector<float>(q, q + dim); }
inline std::vector<float> int8_query(const float* q, std::size_t dim) { return dequantized_query(q, dim); }
// rotated<block with an integer key format>: H^T deq(H q), through the same
// rotation kernels the codec runs.
inline std::vector<float> rotated_int8_query(const float* q, std::size_t dim) {
    std::vector<float> x(q, q + dim);
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    k.hadamard.rotate(x.data(), 1, dim, dim, true, kvc::kernels::hadamard_direction::forward);
    x = dequantized_query(x.data(), dim);
    k.hadamard.rotate(x.data(), 1, dim, dim, true, kvc::kernels::hadamard_direction::inverse);
    return x;
}

// The softmax of one query head's logits (one per row, in double) applied to
// the value rows [rows][dim], added to out[0, dim).
template <class Value>
void add_softmax_output(std::vector<double> logits, const std::vector<Value>& values, std::size_t dim, double* out) {
    double max = -INFINITY;
    for (double l : logits) max = std::max(max, l);
    double sum = 0.0;
    for (double& l : logits) sum += (l = std::exp(l - max));
    for (std::size_t t = 0; t < logits.size(); ++t)
        for (std::size_t d = 0; d < dim; ++d) out[d] += logits[t] / sum * values[t * dim + d];
}

// Decode attention in double of queries [query_heads][head_dim] over the
// first `visible` stored rows of each head (query head j reads heads[j / group]).
// Sink rows meet the fp32 query, the other rows `inner(query)`.
inline std::vector<double> oracle_over_stored(const kvc::cache_config& c, const std::vector<stored_rows>& heads,
                                              const float* queries, std::size_t visible,
                                              const query_map& inner = exact_query) {
    const std::size_t dim = c.head_dim, group = c.group();
    std::vector<double> out(c.query_heads * dim, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        const stored_rows& hv = heads[j / group];
        const std::vector<float> inner_query = inner(queries + j * dim, dim);
        std::vector<double> logits(visible);
        for (std::size_t t = 0; t < visible; ++t) {
            const float* query = t < hv.sinks ? queries + j * dim : inner_query.data();
            double dot = 0.0;
            for (std::size_t d = 0; d < dim; ++d) dot += static_cast<double>(query[d]) * hv.keys[t * dim + d];
            logits[t] = dot * c.logit_scale();
        }
        add_softmax_output(std::move(logits), hv.values, dim, out.data() + j * dim);
    }
    return out;
}

// ---------------------------------------------------------------------------
// Fidelity against full_cache: how far a codec's attention is from attention
// over the rows it was given, held at full_cache's precision (the storage
// dtype of the configuration: fp16 by default, f32 where a suite asks).

// The mean over `steps` decode queries (queries [steps][query_heads][head_dim])
// of relative_error(cache's output, full's output), both on layer 0.
template <class Cache>
double mean_error_against(const kvc::full_cache& full, Cache& cache, const std::vector<float>& queries,
                          std::size_t steps) {
    const kvc::cache_config& c = full.config();
    double total = 0.0;
    for (std::size_t s = 0; s < steps; ++s) {
        std::vector<float> want(c.query_heads * c.head_dim), got(want.size());
        full.attend(0, queries.data() + s * want.size(), want.data());
        cache.attend(0, queries.data() + s * want.size(), got.data());
        total += relative_error(got, want);
    }
    return total / static_cast<double>(steps);
}

// The rows keys and values [tokens][kv_heads][head_dim] appended at position 0
// to layer 0 of `cache` and of a full_cache of the same configuration, then
// `prepare(cache)` (e.g. mixed assigns its precisions), then mean_error_against.
template <class Cache, class Prepare>
double mean_error_against_full(Cache&& cache, const std::vector<float>& keys, const std::vector<float>& values,
                               const std::vector<float>& queries, std::size_t tokens, std::size_t steps,
                               Prepare&& prepare) {
    using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
    const kvc::cache_config& c = cache.config();
    kvc::full_cache full(c);
    const token_major k(keys.data(), tokens, c.kv_heads, c.head_dim), v(values.data(), tokens, c.kv_heads, c.head_dim);
    full.append(0, k, v, 0);
    cache.append(0, k, v, 0);
    prepare(cache);
    return mean_error_against(full, cache, queries, steps);
}
template <class Cache>
double mean_error_against_full(Cache&& cache, const std::vector<float>& keys, const std::vector<float>& values,
                               const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    return mean_error_against_full(std::forward<Cache>(cache), keys, values, queries, tokens, steps,
                                   [](const auto&) {});
}

// ---------------------------------------------------------------------------
// Prefill in chunks, then decode token by token, on layer 0 of a cache; every
// output against an oracle over the rows the cache holds at that moment.

struct chunked_run {
    kvc::cache_config config;
    std::vector<std::size_t> chunks; // prefill chunk sizes, in order
    std::size_t prompt = 0;          // tokens prefilled: the sum of chunks
    std::size_t total = 0;           // prompt and the decode steps after it
    std::vector<float> keys, values; // token-major engine rows [total][kv_heads][head_dim]
    std::vector<float> queries;      // [total][query_heads][head_dim]

    // Normal random rows: keys, values and queries from seeds seed, seed + 1, seed + 2.
    chunked_run(const kvc::cache_config& c, std::vector<std::size_t> prefill_chunks, std::size_t decode_steps,
                std::uint32_t seed)
        : config(c), chunks(std::move(prefill_chunks)) {
        for (std::size_t n : chunks) prompt += n;
        total = prompt + decode_steps;
        keys = random_floats(total * row(), seed);
        values = random_floats(total * row(), seed + 1);
        queries = random_floats(total * query_row(), seed + 2);
    }

    std::size_t row() const { return config.kv_heads * config.head_dim; }
    std::size_t query_row() const { return config.query_heads * config.head_dim; }

    // Appends every row to `cache`: each prefill chunk then attended with
    // attend_chunk, each later token with attend. Returns the worst
    // worst_head_error of the chunk outputs (every `stride`-th query) and of
    // every decode output against oracle(rows, query, visible), where rows =
    // rows_of(cache) is taken right after the append that output attends.
    template <class Cache, class RowsOf, class Oracle>
    double worst_error(Cache& cache, RowsOf&& rows_of, Oracle&& oracle, std::size_t stride = 1) const {
        const std::size_t qrow = query_row();
        double worst = 0.0;
        std::size_t t0 = 0;
        for (std::size_t n : chunks) {
            append(cache, t0, n);
            const auto rows = rows_of(cache);
            std::vector<float> out(n * qrow);
            cache.attend_chunk(0, queries.data() + t0 * qrow, n, out.data());
            for (std::size_t i = 0; i < n; i += stride)
                worst = std::max(worst, worst_head_error(config, out.data() + i * qrow,
                                                         oracle(rows, queries.data() + (t0 + i) * qrow, t0 + i + 1)));
            t0 += n;
        }
        for (std::size_t t = prompt; t < total; ++t) {
            append(cache, t, 1);
            const auto rows = rows_of(cache);
            std::vector<float> out(qrow);
            cache.attend(0, queries.data() + t * qrow, out.data());
            worst = std::max(worst,
                             worst_head_error(config, out.data(), oracle(rows, queries.data() + t * qrow, t + 1)));
        }
        return worst;
    }

    // The usual oracle: oracle_over_stored over stored_heads(cache), the
    // non-sink rows scored with `inner`.
    template <class Cache>
    double worst_error_over_stored(Cache& cache, const query_map& inner = exact_query, std::size_t stride = 1) const {
        return worst_error(
            cache, [](const Cache& held) { return stored_heads(held); },
            [&](const std::vector<stored_rows>& heads, const float* query, std::size_t visible) {
                return oracle_over_stored(config, heads, query, visible, inner);
            },
            stride);
    }

private:
    template <class Cache>
    void append(Cache& cache, std::size_t first, std::size_t count) const {
        using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
        cache.append(0, token_major(keys.data() + first * row(), count, config.kv_heads, config.head_dim),
                     token_major(values.data() + first * row(), count, config.kv_heads, config.head_dim),
                     static_cast<std::int64_t>(first));
    }
};

} // namespace kvc_test
