// kvc/kernels/channel_energy.hpp -- per-channel sums of squares over rows.
//
// What query- and key-driven channel selection reads (P3 ThinK scores a key
// channel by the energy of the queries and of the keys in it). Once per
// compression, not per decode step: one scalar pass, accumulated in double so
// the ranking of channels does not depend on the summation order.
#pragma once

#include <cstddef>

namespace kvc::kernels {

// sums[d] += sum over the `count` rows of rows[r * dim + d]^2.
inline void add_channel_energy(const float* rows, std::size_t count, std::size_t dim, double* sums) noexcept {
    for (std::size_t r = 0; r < count; ++r)
        for (std::size_t d = 0; d < dim; ++d) {
            const double x = rows[r * dim + d];
            sums[d] += x * x;
        }
}

} // namespace kvc::kernels
