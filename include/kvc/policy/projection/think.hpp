// kvc/policy/projection/think.hpp -- P3 ThinK: query-driven pruning of key channels.
//
// What it is: most channels of a head's keys contribute little to its
// logits for the queries that actually arrive. ThinK scores each key channel
// by how much the recent queries and the keys put into it, and physically
// drops the lowest-scoring share of key channels from the stored keys: a
// query then dots only the kept channels. Values stay whole. Source: Xu et
// al., "ThinK: Thinner Key Cache by Query-Driven Pruning", 2024,
// arXiv:2407.21018 (score of channel c: ||Q[:, c]|| ||K[:, c]||; METHODS.md
// P3: mean_q(q_c^2) * mean_t(k_c^2), the same ranking).
//
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>,
//                         kvc::project::think> cache(config, {}, {}, {}, kvc::project::think(0.4));
//
// Choices made where the source leaves room:
// - Per KV head, over the newest 32 queries of its GQA group (every query
//   head of the group) and the keys being pruned: floor(ratio x head_dim)
//   channels dropped, the lowest scores (ties: the higher channel index goes
//   first); at least one channel stays (validate()).
// - The channels are chosen once per head, at its first pruning (the prompt,
//   after attend_chunk), and reused by every later pruning, so all pruned rows
//   of a head share one layout.
// - The newest `window` (128) tokens of a head stay whole; each compression
//   (after the prompt, an eviction schedule's, or compress()) prunes the
//   rest. Tokens generated after it stay whole until the next one.
// - Without recorded queries (a prompt appended without attend_chunk) the
//   score is the key energy alone.
// - It wraps quant::none<T> rows (fp32/fp16/bf16, storage/pruned_rows.hpp);
//   pruning quantized keys (ThinK + KIVI) would need pruned formats per codec.
// - Memory: the kept key channels of the pruned rows, their whole values, the
//   channel list (2 bytes a kept channel) and the whole recent rows; the query
//   window (32 x query_heads x head_dim at the cache's precision) while it lives.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/channel_energy.hpp"
#include "kvc/policy/projection/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/pruned_rows.hpp"

namespace kvc::project {

struct think {
    using family = projection_family;
    static constexpr bool projects = true;
    static constexpr bool needs_queries = true;
    static constexpr std::size_t query_window = 32;

    double ratio = 0.4;       // share of key channels dropped
    std::size_t window = 128; // newest tokens of a head kept whole

    think() = default;
    explicit think(double pruned_share, std::size_t whole_window = 128) : ratio(pruned_share), window(whole_window) {}

    template <class Inner>
    using head_storage = pruned_rows;

    template <class Inner>
    pruned_rows make_head(Inner inner, const cache_config&, std::size_t, std::size_t) const {
        static_assert(std::is_same_v<Inner, dense_rows>,
                      "kvc::project::think prunes rows stored as they are: use it with quant::none<T>");
        return pruned_rows(std::move(inner));
    }

    std::size_t pruned_channels(std::size_t head_dim) const noexcept {
        return static_cast<std::size_t>(std::floor(ratio * static_cast<double>(head_dim)));
    }

    void validate(const cache_config& config) const {
        detail::require(ratio >= 0.0 && ratio < 1.0, "project::think: expected a pruned share in [0, 1), got ", ratio);
        detail::require(pruned_channels(config.head_dim) < config.head_dim, "project::think: a share of ", ratio,
                        " prunes every one of ", config.head_dim, " channels; at least one must stay");
    }

    // The projection stage: prunes every token of `from` but its newest
    // `window`, choosing the head's channels first if it has none yet.
    template <class Layer>
    std::optional<pruned_rows> project(const Layer& layer, std::size_t kv_head, const pruned_rows& from) const {
        const std::size_t recent = from.recent().tokens();
        if (recent <= window) return std::nullopt;
        const std::size_t count = recent - window;
        if (from.kept_channels() != 0) return from.pruned(from.channels(), from.kept_channels(), count);
        const std::vector<std::uint16_t> kept = choose_channels(layer, kv_head, from, count);
        return from.pruned(kept.data(), kept.size(), count);
    }

private:
    // The channels of head `kv_head` with the highest query x key energy, ascending.
    template <class Layer>
    std::vector<std::uint16_t> choose_channels(const Layer& layer, std::size_t kv_head, const pruned_rows& from,
                                               std::size_t count) const {
        const std::size_t dim = from.dim(), group = layer.config().group();
        std::vector<double> query_energy(dim, 0.0), key_energy(dim, 0.0);
        std::vector<float> rows;
        const std::size_t queries = layer.queries(kv_head, query_window, rows);
        kernels::add_channel_energy(rows.data(), queries * group, dim, query_energy.data());
        rows.resize(count * dim);
        from.decode_keys(layer.kernels(), from.body_tokens(), count, rows.data());
        kernels::add_channel_energy(rows.data(), count, dim, key_energy.data());
        std::vector<double> score(dim);
        for (std::size_t c = 0; c < dim; ++c) {
            score[c] = queries != 0 ? query_energy[c] * key_energy[c] : key_energy[c];
            // A channel holding NaN or Inf stays: pruning must not hide what full attention would show.
            if (!std::isfinite(score[c])) score[c] = HUGE_VAL;
        }
        std::vector<std::uint16_t> order(dim);
        std::iota(order.begin(), order.end(), std::uint16_t{0});
        std::stable_sort(order.begin(), order.end(), [&](std::uint16_t a, std::uint16_t b) { return score[a] > score[b]; });
        order.resize(dim - pruned_channels(dim));
        std::sort(order.begin(), order.end());
        return order;
    }
};

} // namespace kvc::project
