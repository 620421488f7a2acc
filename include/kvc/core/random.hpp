// kvc/core/random.hpp -- the one pseudo-random generator kvc uses for reproducible choices.
//
// splitmix64 (Steele, Lea, Flood 2014): small, fast and the same on every
// machine. constexpr, so fixed tables (the sign diagonal of the Hadamard
// rotation, kernels/hadamard/common.hpp) are computed at compile time from the
// same generator that seeds k-means (calibration/kmeans.hpp).
#pragma once

#include <cstdint>

namespace kvc {

class splitmix64 {
public:
    explicit constexpr splitmix64(std::uint64_t seed) noexcept : state_(seed) {}
    constexpr std::uint64_t next() noexcept {
        std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    // Uniform in [0, 1).
    constexpr double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

private:
    std::uint64_t state_;
};

} // namespace kvc
