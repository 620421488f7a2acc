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
// (the selector's ties go to later chunks). A chunk not scored yet (the last
// full chunk, which has no complete successor, and the partial tail after
// it) scores 1, above every rank (at most (lag - 1) / lag), and so do the sinks.
//
// As in the paper, a chunk is scored once, when its successor is complete,
// and at append time: the appended rows (and the chunk before them) are
// still in cache then, and compression reads one float per token instead of
// every key and value of the head (on a 32K-token layer of 8 heads that
// pass cost several times a decode attention pass).
//
// Choices where the source leaves room:
// - Chunks are cut by position: chunk c holds positions first + sinks + c*lag
//   .. + lag - 1 of the sequence. If some of a chunk's tokens were evicted
//   before it was scored (only when the budget is smaller than the unscored
//   tail), it is scored over its survivors against its successor's survivors,
//   with ranks divided by `lag` all the same.
// - The first `sinks` positions are the sinks (score 1); keep this equal to
//   the budget's sinks, which is what keeps the first tokens of the sequence.
// - With fewer than sinks + 2 * lag tokens no chunk has been scored: every
//   token scores 1 and ties go to the newest, so the policy keeps the newest
//   tokens, as StreamingLLM would. For short contexts lower `lag`.
// - A channel whose reference range is zero contributes 0 (no information)
//   instead of dividing by zero. Standard deviation with n - 1, as torch.std.
// - Key re-rotation (B10) renumbers positions; chunks are then cut over the
//   renumbered sequence from the next append on.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/kernels/channel_range.hpp"
#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {

struct lagkv {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    static constexpr bool scores_on_append = true;
    std::size_t lag = 128; // chunk length
    std::size_t sinks = 4; // leading positions kept as sinks (match budget.sinks)

    void validate() const {
        detail::require(lag >= 2 && lag <= (std::size_t{1} << 24),
                        "evict::score::lagkv: expected lag in 2..2^24 (a chunk needs a spread), got ", lag);
        // Positions are int32: more sinks than that would turn negative when added to the first position.
        detail::require(sinks <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
                        "evict::score::lagkv: expected sinks at most 2^31 - 1 (positions are int32), got ", sinks);
    }

    // Key and value spreads of a chunk, then a row, the reference's per-channel
    // minimum and inverse range, and a row of ones.
    std::size_t append_scratch(std::size_t dim) const noexcept { return 2 * lag + 4 * dim; }

    // New tokens score 1 (not scored yet); every chunk whose successor the
    // append completed gets its ranks.
    void on_append_rows(const append_inputs& in, float* scores) const noexcept {
        for (std::size_t t = in.held_before; t < in.held; ++t) scores[t] = 1.0f;
        const std::int64_t chunks_from = in.first_position + static_cast<std::int64_t>(sinks);
        const auto length = static_cast<std::int64_t>(lag);
        for (std::size_t t = in.held_before; t < in.held; ++t) {
            const std::int64_t offset = in.positions[t] - chunks_from + 1; // tokens of the chunked sequence so far
            if (offset < 2 * length || offset % length != 0) continue;
            const std::int64_t start = chunks_from + (offset / length - 2) * length; // first position of chunk c
            score_chunk(in, start, scores);
        }
    }

    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.appended[t];
    }

private:
    // Ranks the held tokens of the chunk at positions [start, start + lag)
    // against the held tokens of the next chunk.
    void score_chunk(const append_inputs& in, std::int64_t start, float* scores) const noexcept {
        const std::int32_t* begin = in.positions;
        const std::int32_t* end = in.positions + in.held;
        const auto at = [&](std::int64_t position) {
            return static_cast<std::size_t>(std::lower_bound(begin, end, position) - begin);
        };
        const auto length = static_cast<std::int64_t>(lag);
        const std::size_t first = at(start), middle = at(start + length), last = at(start + 2 * length);
        const std::size_t count = middle - first;
        if (count == 0) return;
        float* key_spread = in.scratch;
        float* value_spread = in.scratch + lag;
        float* row = in.scratch + 2 * lag;
        float* low = row + in.dim;
        float* inverse = low + in.dim;
        spread(in, in.rows->keys, first, count, middle, last, row, low, inverse, key_spread);
        spread(in, in.rows->values, first, count, middle, last, row, low, inverse, value_spread);
        for (std::size_t i = 0; i < count; ++i) key_spread[i] = 0.5f * (key_spread[i] + value_spread[i]);
        // Rank within the chunk, lowest first (NaN lowest, ties to the later
        // token). The order is sorted in the value slots, free by now: chunk
        // indices are exact in a float (validate() keeps lag below 2^24).
        float* order = value_spread;
        for (std::size_t i = 0; i < count; ++i) order[i] = static_cast<float>(i);
        std::sort(order, order + count, [&](float a, float b) {
            return selection::better(key_spread, static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(a));
        });
        for (std::size_t rank = 0; rank < count; ++rank)
            scores[first + static_cast<std::size_t>(order[rank])] = static_cast<float>(rank) / static_cast<float>(lag);
    }

    using decode_rows = void (*)(const void*, const kernels::kernel_table&, std::size_t, std::size_t, float*);

    // out[i] = softmax over the chunk of std_channels((x_i - min_next) / (max_next - min_next)),
    // for held rows [first, first + count) against the reference rows [reference, reference_end).
    void spread(const append_inputs& in, decode_rows decode, std::size_t first, std::size_t count,
                std::size_t reference, std::size_t reference_end, float* row, float* low, float* inverse,
                float* out) const noexcept {
        const std::size_t dim = in.dim;
        const kernels::kernel_table& k = *in.kernels;
        constexpr int f32 = kernels::index_of(dtype::f32);
        float* ones = inverse + dim;
        for (std::size_t d = 0; d < dim; ++d) ones[d] = 1.0f;
        if (reference == reference_end) { // no reference rows: no information
            for (std::size_t d = 0; d < dim; ++d) low[d] = inverse[d] = 0.0f;
        } else {
            decode(in.rows->head, k, reference, 1, low);
            for (std::size_t d = 0; d < dim; ++d) inverse[d] = low[d]; // the maximum, for now
        }
        for (std::size_t t = reference + 1; t < reference_end; ++t) {
            decode(in.rows->head, k, t, 1, row);
            kernels::widen_channel_range(row, dim, low, inverse);
        }
        kernels::invert_channel_range(low, inverse, dim);
        for (std::size_t i = 0; i < count; ++i) {
            if (dim < 2) {
                out[i] = 0.0f;
                continue;
            }
            // The two sums over channels go through the dot kernel: a float
            // sum written as a loop is one long dependency chain the compiler
            // may not reorder, and it was most of LagKV's append cost.
            decode(in.rows->head, k, first + i, 1, row);
            kernels::normalise_by_range(row, low, inverse, dim);
            kernels::subtract(row, k.dot[f32](row, ones, dim) / static_cast<float>(dim), dim);
            out[i] = std::sqrt(k.dot[f32](row, row, dim) / static_cast<float>(dim - 1));
        }
        k.softmax(out, count);
    }
};

} // namespace score
using lagkv = policy<score::lagkv>;
} // namespace kvc::evict
