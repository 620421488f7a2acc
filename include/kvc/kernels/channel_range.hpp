// kvc/kernels/channel_range.hpp -- per-channel ranges of rows and rows
// normalised by them (what LagKV, E11, scores a chunk with).
//
// Row by row, so a caller that decodes one stored row at a time (any codec)
// never holds a token x dim block: the token loop is the caller's, the
// channel loops are here.
#pragma once

#include <cstddef>

namespace kvc::kernels {

// low[d] = min(low[d], row[d]), high[d] = max(high[d], row[d]).
inline void widen_channel_range(const float* row, std::size_t dim, float* low, float* high) noexcept {
    for (std::size_t d = 0; d < dim; ++d) {
        low[d] = row[d] < low[d] ? row[d] : low[d];
        high[d] = row[d] > high[d] ? row[d] : high[d];
    }
}

// high[d] becomes 1 / (high[d] - low[d]), or 0 for a channel without range.
inline void invert_channel_range(const float* low, float* high, std::size_t dim) noexcept {
    for (std::size_t d = 0; d < dim; ++d) {
        const float range = high[d] - low[d];
        high[d] = range > 0.0f ? 1.0f / range : 0.0f;
    }
}

// row[d] = (row[d] - low[d]) * inverse[d].
inline void normalise_by_range(float* row, const float* low, const float* inverse, std::size_t dim) noexcept {
    for (std::size_t d = 0; d < dim; ++d) row[d] = (row[d] - low[d]) * inverse[d];
}

// row[d] -= offset.
inline void subtract(float* row, float offset, std::size_t dim) noexcept {
    for (std::size_t d = 0; d < dim; ++d) row[d] -= offset;
}

} // namespace kvc::kernels
