// kvc/kernels/reference/kvquant.hpp -- the scalar reference of the KVQuant (Q3) kernels.
//
// Element by element, written to be obviously right: each key row is decoded
// (dense codes, then the outliers overwrite their elements), put back into the
// natural channel order and rotated by RoPE at its position with cos/sin
// evaluated in double for every token (as kernels::rope_rotate does); values
// are decoded element by element; attention is the token-by-token online
// softmax of reference::attend_partial over those rows. The SIMD kernels
// (kernels/quant/kvquant_simd.hpp) are tested against this, and the storage
// uses the row decoders below for decode_keys/decode_values.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/kvquant_problem.hpp"
#include "kvc/kernels/reference/kernels.hpp"

namespace kvc::kernels::reference {

// Pre-RoPE key of row t in stored channel order: dense decode, outliers exact.
inline void kvquant_stored_key(const kvquant_rows& r, std::size_t t, std::size_t dim, float* out) noexcept {
    const unsigned char* codes = r.key_codes + t * r.row_bytes;
    for (std::size_t s = 0; s < dim; ++s)
        out[s] = r.key_offset[s] + r.key_scale[s] * r.key_codebook[kvquant_code<reference_arch>(codes, s, r.bits)];
    const std::uint32_t first = t ? r.outlier_end[t - 1] : 0;
    for (std::uint32_t i = first; i < r.outlier_end[t]; ++i) out[r.outlier_channel[i]] = r.outlier_value[i];
}

// The key of row t as attention sees it, in natural channel order: rotated by
// RoPE at positions[t] (rotate = true) or as stored, before RoPE (false).
inline void kvquant_key(const kvquant_rows& r, std::size_t t, std::size_t dim, bool rotate, float* out) noexcept {
    float stored[kvquant_max_dim];
    kvquant_stored_key(r, t, dim, stored);
    if (rotate) {
        const double position = static_cast<double>(r.positions[t]);
        const std::size_t pairs = r.rotary_pairs;
        for (std::size_t i = 0; i < pairs; ++i) {
            const double angle = position * r.rope_frequency[i];
            const double c = std::cos(angle), s = std::sin(angle);
            const double x = stored[i], y = stored[pairs + i];
            stored[i] = static_cast<float>(x * c - y * s);
            stored[pairs + i] = static_cast<float>(x * s + y * c);
        }
    }
    for (std::size_t s = 0; s < dim; ++s) out[r.channel_of[s]] = stored[s];
}

// Value row t (natural order).
inline void kvquant_value(const kvquant_rows& r, std::size_t t, std::size_t dim, float* out) noexcept {
    const unsigned char* codes = r.value_codes + t * r.row_bytes;
    const float offset = r.value_params[2 * t], half = r.value_params[2 * t + 1];
    for (std::size_t d = 0; d < dim; ++d)
        out[d] = offset + half * r.value_codebook[kvquant_code<reference_arch>(codes, d, r.bits)];
}

inline void kvquant_attend_partial(const kvquant_decode_problem& p, const decode_state& s) noexcept {
    float key[kvquant_max_dim], value[kvquant_max_dim];
    for (std::size_t t = 0; t < p.tokens; ++t) {
        kvquant_key(p.rows, t, p.dim, true, key);
        kvquant_value(p.rows, t, p.dim, value);
        for (std::size_t g = 0; g < p.group; ++g) {
            const float* q = p.queries + g * p.query_stride;
            float* acc = s.acc + g * p.dim;
            float dot = 0.0f;
            for (std::size_t d = 0; d < p.dim; ++d) dot += q[d] * key[d];
            const float logit = token_logit(p, dot, g, t);
            const float weight = online_softmax_step(logit, s.max[g], s.sum[g], acc, p.dim);
            for (std::size_t d = 0; d < p.dim; ++d) acc[d] += weight * value[d];
        }
    }
}

inline constexpr kvquant_kernels make_kvquant_kernels() noexcept { return kvquant_kernels{&kvquant_attend_partial}; }

} // namespace kvc::kernels::reference
