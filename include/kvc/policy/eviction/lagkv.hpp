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
// - The rows are decoded chunk by chunk (the scored chunk and its successor),
//   never the whole head at once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {

struct lagkv {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false; // reads the rows chunk by chunk
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

        // Two chunks of keys and of values at a time: the one scored and its
        // successor, which becomes the next one scored (each row decoded once).
        const std::size_t chunk_floats = lag * in.dim;
        std::vector<float> keys(2 * chunk_floats), values(2 * chunk_floats);
        float* key_chunk = keys.data();
        float* key_next = keys.data() + chunk_floats;
        float* value_chunk = values.data();
        float* value_next = values.data() + chunk_floats;
        const kernels::kernel_table& k = *in.kernels;
        in.rows->keys(in.rows->head, k, sink, lag, key_chunk);
        in.rows->values(in.rows->head, k, sink, lag, value_chunk);
        std::vector<float> key_score(lag), value_score(lag), combined(lag), low(in.dim), inverse(in.dim);
        std::vector<std::uint32_t> order(lag);
        for (std::size_t c = 0; c < scored_chunks; ++c) {
            const std::size_t start = sink + c * lag;
            in.rows->keys(in.rows->head, k, start + lag, lag, key_next);
            in.rows->values(in.rows->head, k, start + lag, lag, value_next);
            chunk_spread(k, in.dim, key_chunk, key_next, low.data(), inverse.data(), key_score.data());
            chunk_spread(k, in.dim, value_chunk, value_next, low.data(), inverse.data(), value_score.data());
            for (std::size_t i = 0; i < lag; ++i) combined[i] = 0.5f * (key_score[i] + value_score[i]);
            // Rank within the chunk, lowest first; NaN lowest; ties to the later token.
            std::iota(order.begin(), order.end(), 0u);
            std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
                return selection::better(combined.data(), b, a);
            });
            for (std::size_t rank = 0; rank < lag; ++rank)
                scores[start + order[rank]] = static_cast<float>(rank) / static_cast<float>(lag);
            std::swap(key_chunk, key_next);
            std::swap(value_chunk, value_next);
        }
    }

private:
    // out[i] = softmax over the chunk of std_channels((x_i - min_next) / (max_next - min_next)),
    // rows [lag][dim]; low and inverse are scratch of dim floats.
    void chunk_spread(const kernels::kernel_table& k, std::size_t dim, const float* chunk, const float* next,
                      float* low, float* inverse, float* out) const {
        for (std::size_t d = 0; d < dim; ++d) low[d] = inverse[d] = next[d];
        for (std::size_t i = 1; i < lag; ++i)
            for (std::size_t d = 0; d < dim; ++d) {
                const float x = next[i * dim + d];
                low[d] = std::min(low[d], x);
                inverse[d] = std::max(inverse[d], x); // the maximum, until turned into 1 / range below
            }
        for (std::size_t d = 0; d < dim; ++d) {
            const float range = inverse[d] - low[d];
            inverse[d] = range > 0.0f ? 1.0f / range : 0.0f;
        }
        for (std::size_t i = 0; i < lag; ++i) {
            const float* row = chunk + i * dim;
            if (dim < 2) {
                out[i] = 0.0f;
                continue;
            }
            float mean = 0.0f;
            for (std::size_t d = 0; d < dim; ++d) mean += (row[d] - low[d]) * inverse[d];
            mean /= static_cast<float>(dim);
            float squares = 0.0f;
            for (std::size_t d = 0; d < dim; ++d) {
                const float deviation = (row[d] - low[d]) * inverse[d] - mean;
                squares += deviation * deviation;
            }
            out[i] = std::sqrt(squares / static_cast<float>(dim - 1));
        }
        k.softmax(out, lag);
    }
};

} // namespace score
using lagkv = policy<score::lagkv>;
} // namespace kvc::evict
