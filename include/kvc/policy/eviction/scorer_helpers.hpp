// kvc/policy/eviction/scorer_helpers.hpp -- pieces the query-, sketch- and hash-based scorers share.
//
// - Per-query causal attention over the recorded recent queries (E4
//   scissorhands, E16 global_local). The cache records queries without their
//   positions; the i-th newest recorded query is taken to sit at
//   last_position - i. That holds in the normal flow, where every attention
//   call follows the append of its own tokens (decode: append then attend;
//   chunked prefill: append the chunk then attend_chunk) and compression runs
//   between an attention call and the next append (as the cache's schedule
//   does), and lets each query see only the held tokens at or before its
//   position, as it did when it ran.
// - A seeded standard-normal stream that gives the same numbers on every
//   platform and standard library (std::normal_distribution does not), for
//   the fixed Gaussian matrices of E12 leverage and E15 hash_evict.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kvc/kernels/table.hpp"
#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict::score_detail {

// Position of recorded query `i` (oldest first) under the flow described above.
inline std::int64_t recorded_query_position(const head_inputs& in, std::size_t i) noexcept {
    return in.last_position - static_cast<std::int64_t>(in.query_count - 1 - i);
}

// Held tokens a query at `position` could see: the prefix with positions <= position.
inline std::size_t visible_prefix(const head_inputs& in, std::int64_t position) noexcept {
    const std::int32_t* end = in.positions + in.tokens;
    if (position >= static_cast<std::int64_t>(in.positions[in.tokens - 1])) return in.tokens;
    if (position < static_cast<std::int64_t>(in.positions[0])) return 0;
    return static_cast<std::size_t>(
        std::upper_bound(in.positions, end, static_cast<std::int32_t>(position)) - in.positions);
}

// Calls visit(probabilities, visible) once per (recorded query, query head of
// the group) for the newest `newest` recorded queries, oldest first, with the
// softmax of that query over the `visible` held tokens it could see (a causal
// prefix). Returns how many rows it visited. Needs keys and recorded queries.
template <class Visit>
std::size_t for_each_recent_attention(const head_inputs& in, std::size_t newest, Visit&& visit) {
    if (in.query_count == 0 || in.tokens == 0) return 0;
    const kernels::kernel_table& k = *in.kernels;
    constexpr int f32 = kernels::index_of(dtype::f32);
    const std::size_t first = in.query_count > newest ? in.query_count - newest : 0;
    std::vector<float> row(in.tokens);
    std::size_t rows = 0;
    for (std::size_t q = first; q < in.query_count; ++q) {
        const std::size_t visible = visible_prefix(in, recorded_query_position(in, q));
        if (visible == 0) continue;
        for (std::size_t g = 0; g < in.group; ++g) {
            const float* query = in.queries + (q * in.group + g) * in.dim;
            for (std::size_t t = 0; t < visible; ++t) row[t] = in.scale * k.dot[f32](query, in.keys + t * in.dim, in.dim);
            k.softmax(row.data(), visible);
            visit(static_cast<const float*>(row.data()), visible);
            ++rows;
        }
    }
    return rows;
}

// Standard normal numbers from a 64-bit seed: splitmix64 for uniforms, Box-Muller for normals.
class gaussian_stream {
public:
    explicit gaussian_stream(std::uint64_t seed) noexcept : state_(seed) {}
    float next() noexcept {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        constexpr double two_pi = 6.283185307179586476925286766559;
        const double u1 = uniform_open(), u2 = uniform_open();
        const double radius = std::sqrt(-2.0 * std::log(u1));
        spare_ = static_cast<float>(radius * std::sin(two_pi * u2));
        has_spare_ = true;
        return static_cast<float>(radius * std::cos(two_pi * u2));
    }

private:
    // Uniform in (0, 1]: never 0, so the logarithm is finite.
    double uniform_open() noexcept {
        std::uint64_t x = (state_ += 0x9e3779b97f4a7c15ull);
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        x ^= x >> 31;
        return (static_cast<double>(x >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    }
    std::uint64_t state_;
    float spare_ = 0.0f;
    bool has_spare_ = false;
};

inline unsigned popcount64(std::uint64_t x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    return static_cast<unsigned>(__builtin_popcountll(x));
#else
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return static_cast<unsigned>((x * 0x0101010101010101ull) >> 56);
#endif
}

} // namespace kvc::evict::score_detail
