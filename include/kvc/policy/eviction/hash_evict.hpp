// kvc/policy/eviction/hash_evict.hpp -- E15 HashEvict: locality-sensitive hashing of keys against the query.
//
// Source: Liu et al., "HashEvict: A Pre-Attention KV Cache Eviction Strategy
// using Locality-Sensitive Hashing" (2024). A fixed Gaussian projection R
// (d x b) turns a vector into b sign bits, sign(x R) (SimHash). Two vectors'
// Hamming distance estimates the angle between them, so a key whose bits are
// far from the current query's bits would get little attention: it goes.
// score = -Hamming(sign(k R), sign(q R)), q the most recent query.
//
// Choices where the source leaves room:
// - b = `bits` (32; anything in 1..64 works, the paper uses 16 or 32), R drawn
//   once from `seed`, the same for every layer and head, so scores repeat.
// - The most recent recorded query (query_window = 1). Under GQA the distances
//   to each query head of the group are averaged (the group mean every scorer uses), not
//   OR-ed: an OR of sign bits has no angular meaning.
// - Memory for compute: the paper stores b bits per token and hashes each key
//   once; kvc recomputes the key bits from the keys at every compression
//   (one d x b projection per held token, an Eigen matrix product) so the
//   cache needs no extra per-token state and works with every codec.
// - No query recorded yet (compression before any attention call): every
//   token scores 0 and the selector keeps the most recent.
// - A projection of exactly 0 counts as a 0 bit.
#pragma once

#include <Eigen/Dense>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct hash_evict {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 1;
    static constexpr bool needs_keys = true, needs_values = false;
    std::size_t bits = 32;
    std::uint64_t seed = 0x68617368657669ull;

    void validate() const {
        detail::require(bits >= 1 && bits <= 64, "evict::score::hash_evict: expected bits in 1..64, got ", bits);
    }

    void score(const head_inputs& in, float* scores) const {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = 0.0f;
        if (in.query_count == 0 || in.tokens == 0) return;
        using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        const Eigen::Index n = static_cast<Eigen::Index>(in.tokens), d = static_cast<Eigen::Index>(in.dim);
        const Eigen::Index b = static_cast<Eigen::Index>(bits), group = static_cast<Eigen::Index>(in.group);
        const Eigen::MatrixXf projection = planes(d);
        const Eigen::Map<const row_matrix> keys(in.keys, n, d);
        const Eigen::Map<const row_matrix> query(in.queries + (in.query_count - 1) * in.group * in.dim, group, d);
        const row_matrix key_side = keys * projection, query_side = query * projection;
        std::vector<std::uint64_t> query_codes(in.group);
        for (Eigen::Index g = 0; g < group; ++g) query_codes[static_cast<std::size_t>(g)] = code(query_side.row(g).data(), b);
        const float inverse_group = 1.0f / static_cast<float>(in.group);
        for (Eigen::Index t = 0; t < n; ++t) {
            const std::uint64_t key_code = code(key_side.row(t).data(), b);
            unsigned distance = 0;
            for (std::uint64_t q : query_codes) distance += score_detail::popcount64(key_code ^ q);
            scores[t] = -static_cast<float>(distance) * inverse_group;
        }
    }

private:
    // The d x b Gaussian hyperplanes.
    Eigen::MatrixXf planes(Eigen::Index d) const {
        Eigen::MatrixXf r(d, static_cast<Eigen::Index>(bits));
        score_detail::gaussian_stream normal(seed);
        for (Eigen::Index j = 0; j < r.cols(); ++j)
            for (Eigen::Index i = 0; i < d; ++i) r(i, j) = normal.next();
        return r;
    }
    static std::uint64_t code(const float* projected, Eigen::Index b) noexcept {
        std::uint64_t bitset = 0;
        for (Eigen::Index j = 0; j < b; ++j)
            if (projected[j] > 0.0f) bitset |= std::uint64_t{1} << j;
        return bitset;
    }
};

} // namespace score
using hash_evict = policy<score::hash_evict>;
} // namespace kvc::evict
