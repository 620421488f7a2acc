// examples/engine/attention_error.hpp -- attention-output error of a compressed
// cache on a real model's own keys, values and queries.
//
// kvc-fidelity measures the end result (next-token KL), where errors of all
// layers compound. This measures each layer's attention on its own: the model
// runs once with a full fp32 cache while a `recording_cache` keeps every key,
// value and query it produced; then each configuration replays exactly those
// rows through its own cache, the way the engine drives it (the prompt in
// chunks with append + attend_chunk, then one append + attend per decode
// step, so policies compress when they would in the engine), and every decode
// step's output is compared with full_cache's on the same rows:
//
//   error = ||out - out_full|| / ||out_full||   per query head, layer and decode step
//
// reported as the mean and the maximum over all of them. The decoded tokens'
// rows are the reference run's, so no error feeds back into later inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cache_choice.hpp"
#include "model.hpp"

namespace engine {

// A kv_cache that records what passes through it on its way to `inner`
// (recorded_rows, cache_choice.hpp: everything the model appended and
// attended with, per layer, in order).
//
// Given `rotate_keys` (the model's RoPE), it also records the keys before
// RoPE: it asks the model for them (wants_keys_before_rope), records them,
// and rotates them itself with kvc's RoPE (kvc::kernels::rope_rotate, cos/sin
// in double) before recording and forwarding them. The model's own rotation
// uses float cos/sin, so the rotated keys then differ from the ordinary
// path's by float rounding (tests/engine/calibration_test.cpp bounds the effect).
class recording_cache final : public kv_cache {
public:
    recording_cache(std::unique_ptr<kv_cache> inner, const kvc::cache_config& shape,
                    std::optional<kvc::rope_config> rotate_keys = std::nullopt)
        : inner_(std::move(inner)), shape_(shape), rope_(rotate_keys) {
        rows_.keys.resize(shape.layers);
        if (rope_) rows_.keys_before_rope.resize(shape.layers);
        rows_.values.resize(shape.layers);
        rows_.queries.resize(shape.layers);
    }

    void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) override {
        const std::size_t dim = shape_.head_dim;
        rotated_.resize(keys.tokens() * shape_.kv_heads * dim);
        for (std::size_t t = 0; t < keys.tokens(); ++t)
            for (std::size_t h = 0; h < shape_.kv_heads; ++h) {
                const float* k = keys.row(t, h);
                const float* v = values.row(t, h);
                if (rope_) {
                    rows_.keys_before_rope[layer].insert(rows_.keys_before_rope[layer].end(), k, k + dim);
                    float* r = &rotated_[(t * shape_.kv_heads + h) * dim];
                    std::copy(k, k + dim, r);
                    kvc::kernels::rope_rotate(*rope_, r, dim, first_position + static_cast<std::int64_t>(t));
                    k = r;
                }
                rows_.keys[layer].insert(rows_.keys[layer].end(), k, k + dim);
                rows_.values[layer].insert(rows_.values[layer].end(), v, v + dim);
            }
        if (rope_)
            inner_->append(layer, view(rotated_.data(), keys.tokens(), shape_.kv_heads, dim), values, first_position);
        else
            inner_->append(layer, keys, values, first_position);
    }
    bool wants_keys_before_rope() const override { return rope_.has_value(); }
    void attend(std::size_t layer, const float* queries, float* out) override {
        record_queries(layer, queries, 1);
        inner_->attend(layer, queries, out);
    }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        record_queries(layer, queries, chunk);
        inner_->attend_chunk(layer, queries, chunk, out);
    }
    void compress(std::size_t layer) override { inner_->compress(layer); }
    std::size_t bytes() const override { return inner_->bytes(); }
    std::size_t query_window_bytes() const override { return inner_->query_window_bytes(); }
    std::size_t rows() const override { return inner_->rows(); }
    void shrink_to_fit() override { inner_->shrink_to_fit(); }

    const recorded_rows& recorded() const noexcept { return rows_; }

private:
    void record_queries(std::size_t layer, const float* queries, std::size_t tokens) {
        const std::size_t floats = tokens * shape_.query_heads * shape_.head_dim;
        rows_.queries[layer].insert(rows_.queries[layer].end(), queries, queries + floats);
    }

    std::unique_ptr<kv_cache> inner_;
    kvc::cache_config shape_;
    std::optional<kvc::rope_config> rope_;
    recorded_rows rows_;
    std::vector<float> rotated_;
};

// The model's rows over `tokens`: prompt tokens prefilled in chunks, the rest
// decoded one by one; with `keys_before_rope`, keys before RoPE too.
inline recorded_rows record_rows(transformer& model, const std::vector<int>& tokens, std::size_t prompt,
                                 std::size_t chunk, bool keys_before_rope = false) {
    if (prompt == 0 || prompt > tokens.size())
        throw std::invalid_argument("record_rows: expected a prompt of 1.." + std::to_string(tokens.size()) +
                                    " tokens, got " + std::to_string(prompt));
    const kvc::cache_config shape = kv_cache_config(model.shape());
    recording_cache recorder(make_cache(shape, cache_spec{"full:f32", "none"}), shape,
                             keys_before_rope ? std::optional<kvc::rope_config>(model_rope()) : std::nullopt);
    model.prefill(tokens.data(), prompt, 0, recorder, chunk);
    for (std::size_t i = prompt; i < tokens.size(); ++i)
        model.decode(tokens[i], static_cast<std::int64_t>(i), recorder);
    recorded_rows rows = recorder.recorded();
    rows.sequences = {tokens.size()};
    return rows;
}

struct attention_error {
    double mean = 0.0, max = 0.0;
    std::size_t samples = 0; // query heads x layers x decode steps
    double rows_kept = 0.0;  // rows held after the last step / rows appended
};

// Replays `rows` (prompt tokens, then decode steps) through the cache `spec`
// names and through full_cache f32, comparing every decode output.
// Calibrated policies learn from `calibrated`.
inline attention_error measure_attention_error(const kvc::cache_config& shape, const recorded_rows& rows,
                                               std::size_t prompt, std::size_t chunk, const cache_spec& spec,
                                               const calibration& calibrated = {}) {
    const std::size_t kv_row = shape.kv_heads * shape.head_dim, q_row = shape.query_heads * shape.head_dim;
    const std::size_t tokens = rows.keys.at(0).size() / kv_row;
    if (prompt == 0 || prompt >= tokens || chunk == 0)
        throw std::invalid_argument("measure_attention_error: expected 1 <= prompt < " + std::to_string(tokens) +
                                    " recorded tokens and chunk >= 1");
    const auto tested = make_cache(shape, spec, calibrated);
    const auto reference = make_cache(shape, cache_spec{"full:f32", "none"});
    // A cache that stores keys before RoPE (kvquant) is given them, as the model gives them to it.
    auto keys_for = [&](const kv_cache* cache) -> const std::vector<std::vector<float>>& {
        if (!cache->wants_keys_before_rope()) return rows.keys;
        if (rows.keys_before_rope.empty())
            throw std::invalid_argument("measure_attention_error: " + std::string(spec.cache) +
                                        " stores keys before RoPE; record the rows with keys_before_rope");
        return rows.keys_before_rope;
    };
    std::vector<float> out(chunk * q_row), expected(chunk * q_row);
    auto view_of = [&](const std::vector<float>& data, std::size_t first, std::size_t count) {
        return kv_cache::view(data.data() + first * kv_row, count, shape.kv_heads, shape.head_dim);
    };
    for (kv_cache* cache : {tested.get(), reference.get()})
        for (std::size_t done = 0; done < prompt; done += chunk) {
            const std::size_t n = std::min(chunk, prompt - done);
            for (std::size_t layer = 0; layer < shape.layers; ++layer) {
                cache->append(layer, view_of(keys_for(cache)[layer], done, n), view_of(rows.values[layer], done, n),
                              static_cast<std::int64_t>(done));
                cache->attend_chunk(layer, rows.queries[layer].data() + done * q_row, n, out.data());
            }
        }
    attention_error error;
    double total = 0.0;
    for (std::size_t t = prompt; t < tokens; ++t)
        for (std::size_t layer = 0; layer < shape.layers; ++layer) {
            const float* q = rows.queries[layer].data() + t * q_row;
            for (auto [cache, result] : {std::pair{tested.get(), out.data()}, std::pair{reference.get(), expected.data()}}) {
                cache->append(layer, view_of(keys_for(cache)[layer], t, 1), view_of(rows.values[layer], t, 1),
                              static_cast<std::int64_t>(t));
                cache->attend(layer, q, result);
            }
            for (std::size_t h = 0; h < shape.query_heads; ++h) {
                double difference = 0.0, norm = 0.0;
                for (std::size_t d = 0; d < shape.head_dim; ++d) {
                    const double want = expected[h * shape.head_dim + d], got = out[h * shape.head_dim + d];
                    difference += (got - want) * (got - want);
                    norm += want * want;
                }
                const double relative = norm > 0.0 ? std::sqrt(difference / norm) : std::sqrt(difference);
                total += relative;
                error.max = std::max(error.max, relative);
                ++error.samples;
            }
        }
    error.mean = total / static_cast<double>(error.samples);
    error.rows_kept = static_cast<double>(tested->rows()) / static_cast<double>(reference->rows());
    return error;
}

} // namespace engine
