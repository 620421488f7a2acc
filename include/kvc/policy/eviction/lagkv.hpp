// kvc/policy/eviction/lagkv.hpp -- E11 LagKV: lag-relative information, attention-free.
//
// Source: Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells
// Which Tokens Are Important" (2025, arXiv:2504.04704); reference code in
// kvpress's LagKVPress. After the sinks the sequence is cut into chunks of
// `lag` (128) tokens. Each chunk's keys are normalised per channel with the
// min and max of the *next* chunk, (x - min) / (max - min); a token's key
// score is the standard deviation over channels of its normalised key, turned
// into a distribution over the chunk by a softmax; the same for values; the
// two are averaged. Tokens are ranked within their chunk and the rank divided
// by `lag` is the score, so every chunk keeps the same share of its tokens
// (the selector's ties go to later chunks). The last full chunk (it has no
// next chunk to be measured against) and the partial tail after it are kept:
// they score 1, above every rank (at most (lag - 1) / lag).
//
// Choices where the source leaves room:
// - Chunks are cut over the tokens the head holds, in order. The paper
//   compresses a chunk once, when its successor is complete; kvc rescoring a
//   head that was compressed before cuts the survivors into chunks again.
// - The first `sinks` held tokens are the sinks (score 1); keep this equal to
//   the budget's sinks, which is what keeps the first tokens of the sequence.
// - With fewer than sinks + 2 * lag held tokens no chunk has a successor:
//   scores rise with recency (the reference code's choice), so the policy
//   keeps the newest tokens, as StreamingLLM would. For short contexts lower `lag`.
// - A channel whose reference range is zero contributes 0 (no information)
//   instead of dividing by zero. Standard deviation with n - 1, as torch.std.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct lagkv {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true, needs_values = true;
    std::size_t lag = 128; // chunk length
    std::size_t sinks = 4; // leading held tokens kept as sinks (match budget.sinks)

    void validate() const {
        detail::require(lag >= 2, "evict::score::lagkv: expected lag >= 2 (a chunk needs a spread), got ", lag);
    }

    void score(const head_inputs& in, float* scores) const {
        const std::size_t tokens = in.tokens, sink = std::min(sinks, tokens);
        for (std::size_t t = 0; t < sink; ++t) scores[t] = 1.0f;
        if (tokens < sink + 2 * lag) {
            for (std::size_t t = sink; t < tokens; ++t)
                scores[t] = static_cast<float>(t - sink) / static_cast<float>(tokens - sink);
            return;
        }
        const std::size_t scored_chunks = (tokens - sink) / lag - 1;
        const std::size_t kept_from = sink + scored_chunks * lag;
        for (std::size_t t = kept_from; t < tokens; ++t) scores[t] = 1.0f;

        std::vector<float> key_score(lag), value_score(lag), combined(lag);
        std::vector<std::uint32_t> order(lag);
        for (std::size_t c = 0; c < scored_chunks; ++c) {
            const std::size_t start = sink + c * lag;
            chunk_spread(in, in.keys, start, key_score.data());
            chunk_spread(in, in.values, start, value_score.data());
            for (std::size_t i = 0; i < lag; ++i) combined[i] = 0.5f * (key_score[i] + value_score[i]);
            // Rank within the chunk, lowest first; NaN lowest; ties to the later token.
            std::iota(order.begin(), order.end(), 0u);
            std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
                return score_detail::ranks_before(combined.data(), b, a);
            });
            for (std::size_t rank = 0; rank < lag; ++rank)
                scores[start + order[rank]] = static_cast<float>(rank) / static_cast<float>(lag);
        }
    }

private:
    using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

    // softmax over the chunk of std_channels((x - min_next) / (max_next - min_next)).
    void chunk_spread(const head_inputs& in, const float* rows, std::size_t start, float* out) const {
        const Eigen::Index n = static_cast<Eigen::Index>(lag), d = static_cast<Eigen::Index>(in.dim);
        const Eigen::Map<const row_matrix> chunk(rows + start * in.dim, n, d);
        const Eigen::Map<const row_matrix> next(rows + (start + lag) * in.dim, n, d);
        const Eigen::RowVectorXf low = next.colwise().minCoeff();
        const Eigen::RowVectorXf range = next.colwise().maxCoeff() - low;
        const Eigen::RowVectorXf inverse = range.unaryExpr([](float r) { return r > 0.0f ? 1.0f / r : 0.0f; });
        const Eigen::ArrayXXf normalised = (chunk.rowwise() - low).array().rowwise() * inverse.array();
        Eigen::Map<Eigen::ArrayXf> spread(out, n);
        if (d < 2) {
            spread.setZero();
        } else {
            const Eigen::ArrayXf mean = normalised.rowwise().mean();
            spread = ((normalised.colwise() - mean).square().rowwise().sum() / static_cast<float>(d - 1)).sqrt();
        }
        in.kernels->softmax(out, lag);
    }
};

} // namespace score
using lagkv = policy<score::lagkv>;
} // namespace kvc::evict
