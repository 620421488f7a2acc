// tests/engine/synthetic_calibration.hpp -- calibration rows for the engine's
// calibrated policies (cq:*, kvquant:*, qfilter, head_roles) without a model:
// smooth, varied keys (before and after a RoPE-like change, here simply
// different rows), values and queries for any cache shape.
#pragma once

#include <cmath>
#include <cstddef>
#include <memory>

#include "engine/cache_choice.hpp"

namespace engine_test {

// `sequences` sequences of `length` tokens each, for every layer of `shape`.
inline engine::calibration synthetic_calibration(const kvc::cache_config& shape, std::size_t sequences = 2,
                                                 std::size_t length = 150) {
    auto rows = std::make_shared<engine::recorded_rows>();
    const std::size_t tokens = sequences * length, floats = tokens * shape.kv_heads * shape.head_dim;
    for (auto* part : {&rows->keys, &rows->keys_before_rope, &rows->values, &rows->queries})
        part->assign(shape.layers, {});
    for (std::size_t layer = 0; layer < shape.layers; ++layer) {
        for (std::size_t i = 0; i < floats; ++i) {
            const double x = static_cast<double>(i) * 0.37 + static_cast<double>(layer);
            rows->keys[layer].push_back(static_cast<float>(std::sin(x) + 0.1 * std::cos(3.1 * x)));
            rows->keys_before_rope[layer].push_back(static_cast<float>(std::cos(1.3 * x)));
            rows->values[layer].push_back(static_cast<float>(std::sin(0.7 * x + 1.0)));
        }
        for (std::size_t i = 0; i < tokens * shape.query_heads * shape.head_dim; ++i)
            rows->queries[layer].push_back(static_cast<float>(std::cos(0.23 * static_cast<double>(i) + 0.5)));
    }
    rows->sequences.assign(sequences, length);
    engine::calibration calibrated;
    calibrated.rows = [rows]() -> const engine::recorded_rows& { return *rows; };
    calibrated.text = "synthetic";
    return calibrated;
}

} // namespace engine_test
