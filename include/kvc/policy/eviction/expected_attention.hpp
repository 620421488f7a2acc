// kvc/policy/eviction/expected_attention.hpp -- E9 expected attention from query statistics.
//
// Source: Devoto et al., "Expected Attention: KV Cache Compression by
// Estimating Attention from Future Queries Distribution" (2025,
// arXiv:2510.00636); reference code in kvpress's ExpectedAttentionPress.
// Model future queries of each query head as Gaussian, q ~ N(mu, S). The
// expected unnormalised attention of key k is E[exp(scale q.k)] =
// exp(scale mu.k + scale^2 k^T S k / 2), i.e. with scale = 1/sqrt(d) the
// expected logit mu^T k / sqrt d + k^T S k / (2d). Softmax over the head's
// tokens, averaged over the GQA group, times ||v_t||_2: keep the tokens the
// coming queries are expected to read and that move the output when read.
// Needs no attention matrix; works after prefill and during decode.
//
// DEVIATION from the source, on purpose: the paper takes mu and S of the
// *pre-RoPE* queries and averages the RoPE rotation over the next n_future
// (512) positions. kvc does not see pre-RoPE queries (it records the queries
// attention ran with, post-RoPE in most engines) nor the model's RoPE, so mu
// and S here are the mean and covariance of the newest `window` (64) recorded
// queries, as they are, with no rotation averaging. Close to the paper when
// the recent queries' rotations are near the coming ones (short horizons);
// it also costs a 64-query ring per layer the cache keeps only for this scorer.
//
// Other choices:
// - S is the population covariance (divide by n, as the reference code);
//   k^T S k is computed as ||C k||^2 / n with C the centred queries (n x d),
//   so the cost is T x d x n per query head, an Eigen matrix product.
// - The logit scale is the cache's (config.scale, 1/sqrt(d) by default).
// - use_value_norm (true): multiply by (p_t + epsilon) * ||v_t||_2,
//   epsilon = 0 as the reference. Set false when wrapping this scorer in
//   value_weighted (which applies its own value norm).
// - No recorded query yet: every token scores 0 (the selector keeps the most recent).
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <cstddef>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct expected_attention {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 64;
    static constexpr bool needs_keys = true, needs_values = true;
    std::size_t window = query_window; // recent queries the statistics come from (at most query_window)
    bool use_covariance = true;
    bool use_value_norm = true;
    float epsilon = 0.0f;

    void validate() const {
        detail::require(window >= 1 && window <= query_window,
                        "evict::score::expected_attention: expected window in 1..", query_window, ", got ", window);
        detail::require(std::isfinite(epsilon) && epsilon >= 0.0f,
                        "evict::score::expected_attention: expected epsilon >= 0, got ", epsilon);
    }

    void score(const head_inputs& in, float* scores) const {
        using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        using strided_rows = Eigen::Map<const row_matrix, 0, Eigen::OuterStride<>>;
        const Eigen::Index n = static_cast<Eigen::Index>(in.tokens), d = static_cast<Eigen::Index>(in.dim);
        Eigen::Map<Eigen::VectorXf> out(scores, n);
        out.setZero();
        if (n == 0 || in.query_count == 0) return;
        const std::size_t count = in.query_count < window ? in.query_count : window;
        const std::size_t first = in.query_count - count;
        const Eigen::Map<const row_matrix> keys(in.keys, n, d);
        const float scale = in.scale;
        Eigen::VectorXf logits(n);
        for (std::size_t g = 0; g < in.group; ++g) {
            // This query head's recorded queries: rows group * dim apart.
            const strided_rows queries(in.queries + (first * in.group + g) * in.dim, static_cast<Eigen::Index>(count), d,
                                       Eigen::OuterStride<>(static_cast<Eigen::Index>(in.group * in.dim)));
            const Eigen::RowVectorXf mu = queries.colwise().mean();
            logits.noalias() = scale * (keys * mu.transpose());
            if (use_covariance && count > 1) {
                const Eigen::MatrixXf centred = queries.rowwise() - mu;
                const Eigen::MatrixXf projected = keys * centred.transpose(); // row t: (C k_t)^T
                logits += (0.5f * scale * scale / static_cast<float>(count)) * projected.rowwise().squaredNorm();
            }
            in.kernels->softmax(logits.data(), in.tokens);
            out += logits;
        }
        out /= static_cast<float>(in.group);
        if (use_value_norm) {
            const Eigen::Map<const row_matrix> values(in.values, n, d);
            out = (out.array() + epsilon) * values.rowwise().norm().array();
        }
    }
};

} // namespace score
using expected_attention = policy<score::expected_attention>;
} // namespace kvc::evict
