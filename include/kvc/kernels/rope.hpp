// kvc/kernels/rope.hpp -- rotary position embedding of one row, for key re-rotation (B10).
//
// RoPE rotates channel pairs by angle position * theta^(-2i / rotary_dims).
// Rotations compose, so moving a stored key from position p to p' is one more
// rotation by (p' - p): the result equals the key computed at p' up to float
// rounding. Angles and the rotation are evaluated in double so a large
// position difference adds no error beyond the final rounding to float.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/core/error.hpp"

namespace kvc {

struct rope_config {
    double theta = 10000.0;
    std::size_t rotary_dims = 0; // channels rotated (the first ones); 0 means all of head_dim
    bool interleaved = true;     // pairs (2i, 2i+1) as llama2.c; false: (i, i + rotary_dims/2) as HF Llama
};

namespace detail {
// Throws kvc::error unless `rope` can rotate rows of `dim` channels: theta
// positive and finite, rotary_dims even and at most dim. rope_rotate (and the
// callers' stack rows of dim floats) rely on it. `who` starts the message.
inline void validate_rope(const rope_config& rope, std::size_t dim, const char* who) {
    require(rope.theta > 0.0 && std::isfinite(rope.theta), who, ": expected a RoPE theta > 0 and finite, got ",
            rope.theta);
    const std::size_t rotary = rope.rotary_dims ? rope.rotary_dims : dim;
    require(rotary % 2 == 0 && rotary <= dim, who, ": expected RoPE rotary_dims even and at most head_dim ", dim,
            " (0: all), got ", rope.rotary_dims);
}
} // namespace detail

namespace kernels {

// Rotates `row` (dim floats) as RoPE does for a position change of `delta`.
inline void rope_rotate(const rope_config& rope, float* row, std::size_t dim, std::int64_t delta) noexcept {
    const std::size_t rotary = rope.rotary_dims ? rope.rotary_dims : dim;
    const std::size_t pairs = rotary / 2;
    for (std::size_t i = 0; i < pairs; ++i) {
        const double frequency = std::pow(rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary));
        const double angle = static_cast<double>(delta) * frequency;
        const double c = std::cos(angle), s = std::sin(angle);
        const std::size_t a = rope.interleaved ? 2 * i : i, b = rope.interleaved ? 2 * i + 1 : i + pairs;
        const double x = row[a], y = row[b];
        row[a] = static_cast<float>(x * c - y * s);
        row[b] = static_cast<float>(x * s + y * c);
    }
}

} // namespace kernels
} // namespace kvc
