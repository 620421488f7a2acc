// kvc/policy/eviction/policy.hpp -- how an eviction policy is put together.
//
// An eviction policy is a scorer (E1-E18 in docs/METHODS.md: how important is each
// token of a KV head), a budget (how many tokens each head keeps; sinks and a
// recent window always stay and count inside it), a selector (B1 per-head
// top-k by default) and a schedule (B9: when compression runs). The cache
// owns every piece of running state (accumulated attention, recent queries)
// per (layer, KV head), so policies stay small values.
//
//   using policy = kvc::evict::knorm;   // = evict::policy<score::knorm>
//   kvc::compressed_cache<policy, ...> cache(config, policy(kvc::evict::budget::ratio(0.25)));
//
// A default-constructed policy keeps everything (ratio 1): eviction starts
// only once a budget is given.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/policy/eviction/protocol.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc::evict {

// How a budget is spread over layers (B3 PyramidKV, B7 layer weights). The
// per-layer budgets average the uniform one, so the cache's total stays put.
struct layer_allocation {
    enum class kind { uniform, pyramid, weights };
    kind mode = kind::uniform;
    double beta = 20.0;          // pyramid: the last layer gets 1/beta of the mean, the first 2 - 1/beta
    std::vector<double> weights; // weights: one importance weight per layer (e.g. 1 - cos(h_in, h_out))

    static layer_allocation uniform() { return {}; }
    static layer_allocation pyramid(double beta = 20.0) {
        layer_allocation a;
        a.mode = kind::pyramid;
        a.beta = beta;
        return a;
    }
    static layer_allocation by_weights(std::vector<double> weights) {
        layer_allocation a;
        a.mode = kind::weights;
        a.weights = std::move(weights);
        return a;
    }

    // The factor layer `layer` of `layers` applies to the mean budget.
    double factor(std::size_t layer, std::size_t layers) const noexcept {
        switch (mode) {
        case kind::uniform: return 1.0;
        case kind::pyramid: {
            if (layers < 2) return 1.0;
            const double low = 1.0 / beta, high = 2.0 - 1.0 / beta;
            return high - (high - low) * static_cast<double>(layer) / static_cast<double>(layers - 1);
        }
        case kind::weights: {
            double sum = 0.0;
            for (double w : weights) sum += w;
            return weights[layer] * static_cast<double>(layers) / sum;
        }
        }
        return 1.0;
    }

    void validate(std::size_t layers) const {
        if (mode == kind::pyramid)
            detail::require(beta >= 1.0 && std::isfinite(beta), "evict::layer_allocation: expected pyramid beta >= 1, got ",
                            beta);
        if (mode == kind::weights) {
            detail::require(weights.size() == layers, "evict::layer_allocation: expected one weight per layer (",
                            layers, "), got ", weights.size());
            double sum = 0.0;
            for (std::size_t l = 0; l < weights.size(); ++l) {
                detail::require(std::isfinite(weights[l]) && weights[l] >= 0.0,
                                "evict::layer_allocation: expected finite weights >= 0, got weights[", l, "] = ",
                                weights[l]);
                sum += weights[l];
            }
            detail::require(sum > 0.0, "evict::layer_allocation: expected some positive layer weight");
        }
    }
};

// How many tokens a KV head keeps after compression.
struct budget {
    double keep_ratio = 1.0;     // fraction of the tokens the head has seen (used when tokens == 0)
    std::size_t tokens = 0;      // absolute tokens per head; overrides keep_ratio when nonzero
    std::size_t bytes = 0;       // B8: bytes for the whole cache's tokens; overrides tokens and keep_ratio
    std::size_t sinks = 4;       // the first tokens of the sequence, always kept (attention sinks)
    std::size_t window = 16;     // the most recent tokens, always kept
    layer_allocation layers{};   // how the budget is spread over layers

    static budget ratio(double keep_ratio, std::size_t sinks = 4, std::size_t window = 16) {
        budget b;
        b.keep_ratio = keep_ratio;
        b.sinks = sinks;
        b.window = window;
        return b;
    }
    // tokens 0 throws kvc::error: the field's 0 means "use keep_ratio", which
    // keeps everything by default, the opposite of a budget of no tokens.
    static budget absolute(std::size_t tokens, std::size_t sinks = 4, std::size_t window = 16) {
        detail::require(tokens >= 1, "evict::budget::absolute: expected tokens >= 1 per head, got 0");
        budget b;
        b.tokens = tokens;
        b.sinks = sinks;
        b.window = window;
        return b;
    }
    // B8: one budget in bytes over the whole cache. The cache turns it into
    // tokens per head with what its codec spends per token, so a codec with
    // fewer bits keeps more tokens for the same bytes.
    // bytes 0 throws kvc::error, as absolute(0).
    static budget in_bytes(std::size_t bytes, std::size_t sinks = 4, std::size_t window = 16) {
        detail::require(bytes >= 1, "evict::budget::in_bytes: expected bytes >= 1, got 0");
        budget b;
        b.bytes = bytes;
        b.sinks = sinks;
        b.window = window;
        return b;
    }
    budget with_layers(layer_allocation allocation) const {
        budget b = *this;
        b.layers = std::move(allocation);
        return b;
    }

    // Tokens to keep for a head of `layer` (of `layers`) that holds `held`
    // tokens and has seen `seen`. Never below the protected sinks + window
    // (the budget counts them), never above `held`.
    // `tokens_for_bytes` is what a byte budget buys per head (the cache computes it).
    std::size_t target(std::size_t held, std::size_t seen, std::size_t layer = 0, std::size_t layers = 1,
                       std::size_t tokens_for_bytes = 0) const noexcept {
        const double mean = bytes != 0    ? static_cast<double>(tokens_for_bytes)
                            : tokens != 0 ? static_cast<double>(tokens)
                                          : keep_ratio * static_cast<double>(seen);
        const double scaled = std::ceil(mean * layers_factor(layer, layers) - 1e-9);
        // A budget of SIZE_MAX tokens scales to 2^64 or more, which no size_t
        // holds (converting it is undefined): it keeps everything held. The
        // bound is SIZE_MAX rounded to double, 2^64 itself on 64-bit targets.
        if (!(scaled < static_cast<double>(std::numeric_limits<std::size_t>::max()))) return held;
        std::size_t want = scaled > 0.0 ? static_cast<std::size_t>(scaled) : 0;
        want = std::max(want, protected_tokens());
        return std::min(want, held);
    }

    // Sinks + window: the tokens every head keeps (SIZE_MAX if the sum does
    // not fit, which validate() rejects).
    std::size_t protected_tokens() const noexcept { return detail::saturating_add(sinks, window); }

    void validate(std::size_t layer_count = 1) const {
        detail::require(bytes != 0 || tokens != 0 || (keep_ratio > 0.0 && keep_ratio <= 1.0),
                        "evict::budget: expected keep_ratio in (0, 1] or tokens > 0, got keep_ratio ", keep_ratio);
        const std::size_t kept = detail::checked_add(sinks, window, "evict::budget", "sinks", "window");
        detail::require(tokens == 0 || tokens >= kept, "evict::budget: tokens ", tokens,
                        " must be at least sinks + window = ", kept, " (the budget counts them)");
        layers.validate(layer_count);
    }

    // B8: tokens per head that `bytes` buys over `heads` heads at `bytes_per_token`
    // each. Divides twice instead of multiplying heads by bytes_per_token, which
    // could wrap; floor(floor(b / h) / c) == floor(b / (h * c)).
    std::size_t tokens_for_bytes(std::size_t heads, std::size_t bytes_per_token) const noexcept {
        return heads == 0 || bytes_per_token == 0 ? 0 : bytes / heads / bytes_per_token;
    }

private:
    double layers_factor(std::size_t layer, std::size_t count) const noexcept { return layers.factor(layer, count); }
};

// When compression runs (B9). After the prompt: at the first decode append
// that follows chunked prefill (attend_chunk). During decode (single-token
// appends): whenever a token would put a head more than `interval` tokens
// over its target, the head goes back to the target (compressed before the
// token is stored, leaving room for it); a multi-token append never triggers it, so a
// prefill chunk stays whole until attend_chunk has seen it. compress() runs
// it on demand.
struct schedule {
    bool after_prefill = true;
    std::size_t interval = 0; // 0: no decode-time compression; SIZE_MAX: never

    // Whether a head holding `held` tokens against `target` is due for
    // decode-time compression: more than `interval` over its target. Compared
    // by difference, so a large interval (an engine's "never") cannot wrap.
    bool due(std::size_t held, std::size_t target) const noexcept {
        return interval != 0 && held > target && held - target > interval;
    }
};

// B10: after eviction, rotate the kept keys so their positions become
// contiguous again (first position, first + 1, ...), as unbounded streaming
// generation needs: the engine then takes the next position from
// cache.next_position(layer) for its own RoPE. Needs the model's RoPE and
// the same kept length in every head (B1 per-head top-k).
struct rerotation {
    bool enabled = false;
    rope_config rope{};
};

namespace selection {

// Marks the sinks (first positions of the sequence) and the recent window of
// one head, at most `limit` tokens; returns how many it marked.
inline std::size_t protect(const head_candidates& head, const budget& b, std::int64_t first_position,
                           std::size_t limit, std::vector<char>& chosen) {
    chosen.assign(head.held, 0);
    std::size_t taken = 0;
    // Offsets from the first position, in unsigned: sinks may exceed int64's range (a sum would wrap).
    const auto is_sink = [&](std::size_t t) {
        return static_cast<std::uint64_t>(head.positions[t] - first_position) < static_cast<std::uint64_t>(b.sinks);
    };
    for (std::size_t t = 0; t < head.held && is_sink(t) && taken < limit; ++t) chosen[t] = 1, ++taken;
    for (std::size_t i = 0; i < b.window && i < head.held && taken < limit; ++i)
        if (!chosen[head.held - 1 - i]) chosen[head.held - 1 - i] = 1, ++taken;
    return taken;
}

// Higher score first; NaN last (a broken scorer cannot evict what is useful);
// ties, NaN with NaN included, go to the more recent token. A strict total
// order on token indices, so every selector and scorer that ranks agrees.
inline bool better(const float* scores, std::uint32_t a, std::uint32_t c) noexcept {
    const float sa = scores[a], sc = scores[c];
    const bool nan_a = std::isnan(sa), nan_c = std::isnan(sc);
    if (nan_a || nan_c) return nan_a != nan_c ? nan_c : a > c;
    return sa > sc || (sa == sc && a > c);
}

inline void to_indices(const std::vector<char>& chosen, std::vector<std::uint32_t>& keep) {
    keep.clear();
    for (std::size_t t = 0; t < chosen.size(); ++t)
        if (chosen[t]) keep.push_back(static_cast<std::uint32_t>(t));
}

// A score as an unsigned integer that orders as better() orders scores:
// NaN lowest (0), -0 equal to +0, -inf above NaN. Selecting on these integers
// is several times faster than comparing through the float scores.
inline std::uint32_t monotone_key(float s) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &s, sizeof bits);
    const std::uint32_t magnitude = bits & 0x7fffffffu;
    // Negative: flip every bit; positive: set the sign bit. Written without
    // branches so the loop over a head's scores vectorises.
    const std::uint32_t flip = static_cast<std::uint32_t>(static_cast<std::int32_t>(bits) >> 31) | 0x80000000u;
    std::uint32_t key = bits ^ flip; // -inf maps to 0x007fffff, above NaN's 0
    key = magnitude == 0 ? 0x80000000u : key;
    return magnitude > 0x7f800000u ? 0u : key;
}

// Adds the `count` best unchosen tokens of a head to `chosen`: higher score
// first, NaN last, ties to the more recent token (better()'s order). A radix
// select over monotone_key finds the count-th best key in three histogram
// rounds (11 + 11 + 10 bits); every token above it is taken, then the tokens
// equal to it from the most recent back. Linear time and almost branch-free:
// 32K random scores take a few tens of microseconds, where nth_element over
// indices took half a millisecond.
inline void take_best(const head_candidates& head, std::size_t count, std::vector<char>& chosen) {
    const std::size_t n = head.held;
    std::vector<std::uint32_t> keys(n);
    for (std::size_t t = 0; t < n; ++t) keys[t] = monotone_key(head.scores[t]);
    std::size_t open = 0;
    for (std::size_t t = 0; t < n; ++t) open += chosen[t] == 0;
    count = std::min(count, open);
    if (count == 0) return;
    if (count == open) {
        std::fill(chosen.begin(), chosen.end(), char{1});
        return;
    }
    // The count-th largest key among the unchosen tokens, one digit at a
    // time. Four histograms are filled in turn (scores cluster in a few bins,
    // and consecutive increments of one counter would wait on each other);
    // after the first digit only the tokens in the chosen bin are visited.
    constexpr std::size_t bins = std::size_t{1} << 11;
    std::vector<std::uint32_t> histogram(4 * bins, 0u);
    for (std::size_t t = 0; t < n; ++t) histogram[(t & 3) * bins + (keys[t] >> 21)] += chosen[t] == 0;
    std::size_t rank = count; // rank-th largest among the tokens matching the digits found so far
    const auto pick_digit = [&](std::uint32_t top) {
        const auto in_bin = [&](std::uint32_t digit) {
            return std::size_t{histogram[digit]} + histogram[bins + digit] + histogram[2 * bins + digit] +
                   histogram[3 * bins + digit];
        };
        std::uint32_t digit = top;
        while (in_bin(digit) < rank) rank -= in_bin(digit--);
        return digit;
    };
    std::uint32_t prefix = pick_digit(0x7ffu) << 21;
    std::vector<std::uint32_t> candidates(n);
    std::size_t matching = 0;
    for (std::size_t t = 0; t < n; ++t) {
        candidates[matching] = static_cast<std::uint32_t>(t);
        const bool unchosen = chosen[t] == 0, in_bucket = (keys[t] >> 21) == (prefix >> 21);
        matching += static_cast<std::size_t>(unchosen) & static_cast<std::size_t>(in_bucket); // branch-free
    }
    std::uint32_t prefix_mask = 0xffe00000u;
    for (const unsigned shift : {10u, 0u}) {
        const std::uint32_t digit_mask = shift == 0 ? 0x3ffu : 0x7ffu;
        std::fill(histogram.begin(), histogram.end(), 0u);
        for (std::size_t i = 0; i < matching; ++i) {
            const std::uint32_t key = keys[candidates[i]];
            histogram[(i & 3) * bins + ((key >> shift) & digit_mask)] += (key & prefix_mask) == prefix;
        }
        prefix |= pick_digit(digit_mask) << shift;
        prefix_mask |= digit_mask << shift;
    }
    const std::uint32_t cut = prefix; // `rank` tokens equal to it are still to take
    for (std::size_t t = 0; t < n; ++t) chosen[t] = static_cast<char>(chosen[t] | (keys[t] > cut));
    for (std::size_t i = matching; i-- > 0 && rank != 0;) {
        const std::uint32_t t = candidates[i];
        if (!chosen[t] && keys[t] == cut) chosen[t] = 1, --rank;
    }
}

} // namespace selection

// B1: each head keeps its `target` best tokens; sinks and the recent window
// first (they count inside the target). Writes ascending indices per head.
struct per_head_topk {
    static constexpr bool uses_target = true;
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        keep.resize(layer.heads.size());
        std::vector<char> chosen;
        for (std::size_t h = 0; h < layer.heads.size(); ++h) {
            const head_candidates& head = layer.heads[h];
            const std::size_t target = std::min(head.target, head.held);
            const std::size_t taken = selection::protect(head, *layer.keep, layer.first_position, target, chosen);
            selection::take_best(head, target - taken, chosen);
            selection::to_indices(chosen, keep[h]);
        }
    }
};

// B2 AdaKV: the layer's budget (the sum of its heads' targets) is shared.
// Each head first keeps `alpha` of its fair share (its protected tokens
// count there), then the rest goes to the best remaining tokens of any head,
// so heads end with different lengths and the layer with exactly its total.
// Scores are compared across heads as the scorer gives them (attention-based
// scores are probabilities, so they compare naturally).
struct adakv {
    static constexpr bool uses_target = true;
    double alpha = 0.2;

    void validate() const {
        detail::require(alpha >= 0.0 && alpha <= 1.0, "evict::adakv: expected alpha in [0, 1], got ", alpha);
    }
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        const std::size_t heads = layer.heads.size();
        keep.resize(heads);
        std::vector<std::vector<char>> chosen(heads);
        std::size_t total = 0, used = 0;
        for (std::size_t h = 0; h < heads; ++h) {
            const head_candidates& head = layer.heads[h];
            const std::size_t target = std::min(head.target, head.held);
            total += target;
            const std::size_t floor = std::max<std::size_t>(
                static_cast<std::size_t>(std::ceil(alpha * static_cast<double>(target))), 0);
            const std::size_t taken = selection::protect(head, *layer.keep, layer.first_position, target, chosen[h]);
            const std::size_t first = floor > taken ? std::min(floor, target) - taken : 0;
            selection::take_best(head, first, chosen[h]);
            used += taken + first;
        }
        // The rest of the layer's budget: globally best tokens across heads.
        struct candidate {
            float score;
            std::uint32_t head, token;
        };
        std::vector<candidate> pool;
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t t = 0; t < layer.heads[h].held; ++t)
                if (!chosen[h][t])
                    pool.push_back({layer.heads[h].scores[t], static_cast<std::uint32_t>(h), static_cast<std::uint32_t>(t)});
        const std::size_t rest = std::min(total - std::min(total, used), pool.size());
        std::partial_sort(pool.begin(), pool.begin() + static_cast<std::ptrdiff_t>(rest), pool.end(),
                          [](const candidate& a, const candidate& c) {
                              if (std::isnan(a.score) != std::isnan(c.score)) return std::isnan(c.score);
                              if (a.score != c.score) return a.score > c.score;
                              return a.head != c.head ? a.head < c.head : a.token > c.token;
                          });
        for (std::size_t i = 0; i < rest; ++i) chosen[pool[i].head][pool[i].token] = 1;
        for (std::size_t h = 0; h < heads; ++h) selection::to_indices(chosen[h], keep[h]);
    }
};

// B5 top-p (Twilight): each head keeps its best tokens until their share of
// the head's total score reaches p; B5 threshold (DMS-like): every token
// whose score exceeds tau. The kept length is an output; sinks and window
// stay. Scores are shifted so the smallest is 0 before shares are taken
// (scorers such as knorm give negative scores).
struct top_p {
    static constexpr bool uses_target = false;
    double p = 0.9;

    void validate() const { detail::require(p > 0.0 && p <= 1.0, "evict::top_p: expected p in (0, 1], got ", p); }
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        keep.resize(layer.heads.size());
        std::vector<char> chosen;
        for (std::size_t h = 0; h < layer.heads.size(); ++h) {
            const head_candidates& head = layer.heads[h];
            selection::protect(head, *layer.keep, layer.first_position, head.held, chosen);
            float lowest = std::numeric_limits<float>::infinity();
            for (std::size_t t = 0; t < head.held; ++t)
                if (!std::isnan(head.scores[t])) lowest = std::min(lowest, head.scores[t]);
            double total = 0.0;
            for (std::size_t t = 0; t < head.held; ++t)
                if (!std::isnan(head.scores[t])) total += static_cast<double>(head.scores[t] - lowest);
            std::vector<std::uint32_t> order(head.held);
            std::iota(order.begin(), order.end(), 0u);
            std::sort(order.begin(), order.end(),
                      [&](std::uint32_t a, std::uint32_t c) { return selection::better(head.scores, a, c); });
            double mass = 0.0;
            for (std::uint32_t t : order) {
                if (total <= 0.0 || mass >= p * total || std::isnan(head.scores[t])) break;
                chosen[t] = 1;
                mass += static_cast<double>(head.scores[t] - lowest);
            }
            selection::to_indices(chosen, keep[h]);
        }
    }
};

struct threshold {
    static constexpr bool uses_target = false;
    float tau = 0.0f;
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        keep.resize(layer.heads.size());
        std::vector<char> chosen;
        for (std::size_t h = 0; h < layer.heads.size(); ++h) {
            const head_candidates& head = layer.heads[h];
            selection::protect(head, *layer.keep, layer.first_position, head.held, chosen);
            for (std::size_t t = 0; t < head.held; ++t)
                if (head.scores[t] > tau) chosen[t] = 1;
            selection::to_indices(chosen, keep[h]);
        }
    }
};

// B4 ChunkKV: tokens are grouped in chunks of `chunk` consecutive positions;
// a chunk's score is the sum of its tokens' scores over every head of the
// layer, and whole chunks are kept, best first, while they fit the head's
// target (so a head may keep slightly less than its target: never more).
// Every head keeps the same chunks, which keeps semantic units whole.
// Choice: the chunk that would overflow the target is skipped and smaller
// later chunks may still fill the gap (the partial last chunk is smaller).
struct chunkkv {
    static constexpr bool uses_target = true;
    std::size_t chunk = 10;

    void validate() const { detail::require(chunk >= 1, "evict::chunkkv: expected chunk >= 1, got 0"); }
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        const std::size_t heads = layer.heads.size();
        keep.resize(heads);
        std::vector<char> chosen;
        std::vector<std::size_t> ids;    // chunk ids holding tokens in any head, ascending (filled once)
        std::vector<double> chunk_score; // per entry of ids
        for (std::size_t h = 0; h < heads; ++h) {
            const head_candidates& head = layer.heads[h];
            const std::size_t target = std::min(head.target, head.held);
            std::size_t taken = selection::protect(head, *layer.keep, layer.first_position, target, chosen);
            if (target >= head.held) {
                selection::to_indices(chosen, keep[h]);
                continue;
            }
            // Chunk scores over every head, by position. Tables are indexed by
            // the chunks that hold tokens (ascending), not by chunk id: positions
            // need only increase, so ids can span far more than the tokens held.
            if (ids.empty()) {
                for (const head_candidates& other : layer.heads)
                    for (std::size_t t = 0; t < other.held; ++t) ids.push_back(chunk_of(layer, other.positions[t]));
                std::sort(ids.begin(), ids.end());
                ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
                chunk_score.assign(ids.size(), 0.0);
                for (const head_candidates& other : layer.heads)
                    for (std::size_t t = 0; t < other.held; ++t)
                        if (!std::isnan(other.scores[t])) chunk_score[index_of(ids, layer, other.positions[t])] += other.scores[t];
            }
            // This head's unprotected tokens, per chunk.
            std::vector<std::vector<std::uint32_t>> members(ids.size());
            for (std::size_t t = 0; t < head.held; ++t)
                if (!chosen[t]) members[index_of(ids, layer, head.positions[t])].push_back(static_cast<std::uint32_t>(t));
            std::vector<std::size_t> order(ids.size());
            std::iota(order.begin(), order.end(), std::size_t{0});
            std::stable_sort(order.begin(), order.end(),
                             [&](std::size_t a, std::size_t c) { return chunk_score[a] > chunk_score[c]; });
            for (std::size_t id : order) {
                if (members[id].empty() || taken + members[id].size() > target) continue;
                for (std::uint32_t t : members[id]) chosen[t] = 1;
                taken += members[id].size();
            }
            selection::to_indices(chosen, keep[h]);
        }
    }

private:
    std::size_t chunk_of(const layer_candidates& layer, std::int32_t position) const noexcept {
        return static_cast<std::size_t>(position - layer.first_position) / chunk;
    }
    std::size_t index_of(const std::vector<std::size_t>& ids, const layer_candidates& layer,
                         std::int32_t position) const noexcept {
        return static_cast<std::size_t>(std::lower_bound(ids.begin(), ids.end(), chunk_of(layer, position)) - ids.begin());
    }
};

// Whether a selector keeps the same number of tokens in every head (key
// re-rotation needs it): B1 per-head top-k does; a selector chosen at run
// time (select::any) answers for the one it holds.
template <class S, class = void>
struct has_runtime_equal_lengths : std::false_type {};
template <class S>
struct has_runtime_equal_lengths<S, std::void_t<decltype(bool{std::declval<const S&>().equal_lengths()})>>
    : std::true_type {};
template <class S>
bool keeps_equal_lengths(const S& selector) noexcept {
    if constexpr (has_runtime_equal_lengths<S>::value) return selector.equal_lengths();
    else return (void)selector, std::is_same_v<S, per_head_topk>;
}

// The policy type the eviction slot of compressed_cache takes.
template <class Scorer, class Selector = per_head_topk>
struct policy {
    static_assert(check_scorer<Scorer>());
    static_assert(check_selector<Selector>());
    using family = eviction_family;
    using scorer_type = Scorer;
    using selector_type = Selector;
    static constexpr bool evicts = true;
    static constexpr bool needs_attention_stats = Scorer::needs_attention_stats;
    static constexpr bool needs_queries = Scorer::query_window > 0;
    static constexpr std::size_t query_window = Scorer::query_window;
    using columns = scorer_columns_t<Scorer>; // per-token state the host keeps for the scorer

    budget keep{};
    schedule when{};
    Scorer scorer{};
    Selector selector{};
    rerotation rerotate{};

    // Only when both stages have a default: score::any holds a chosen scorer and
    // has none, and a defaulted constructor would still make clang evaluate
    // `Scorer scorer{}` (a hard error) when anything asks is_constructible.
    template <class S = Scorer, class Sel = Selector,
              std::enable_if_t<std::is_default_constructible_v<S> && std::is_default_constructible_v<Sel>, int> = 0>
    policy() {}
    explicit policy(budget keep_budget, schedule when_to = {}, Scorer scorer_ = {}, Selector selector_ = {})
        : keep(keep_budget), when(when_to), scorer(std::move(scorer_)), selector(std::move(selector_)) {}

    // What the host must collect for the scorer, as values (policy/traits.hpp):
    // the constants above for a scorer type, the held scorer's for score::any.
    policy_requests requests() const noexcept {
        const scorer_needs needs = needs_of(scorer);
        policy_requests r;
        r.attention_stats = needs.attention_stats;
        r.query_window = needs.query_window;
        return r;
    }
    // Whether the scorer uses one of the columns it declares (score::any
    // declares every column a scorer may use; the host keeps only these).
    template <class Column>
    bool keeps_column() const noexcept {
        const scorer_needs needs = needs_of(scorer);
        if constexpr (std::is_same_v<Column, column::attention_state>) return needs.attention_stats;
        else if constexpr (std::is_same_v<Column, column::external_score>) return needs.external_scores;
        else if constexpr (std::is_same_v<Column, column::append_score>) return needs.scores_on_append;
        else return true;
    }

    // The eviction stage of compress: scores every KV head of the layer the
    // host lends (see "What the host lends a stage" in protocol.hpp) and
    // selects what the budget keeps, making room for `incoming` tokens about
    // to be appended (0 for an explicit compress): each head keeps what the
    // budget allows once they are in, less them, with the recent window
    // shortened by as many (they will be its newest tokens). Fills `kept`
    // with ascending indices per head and returns true, or returns false
    // when no head has anything to drop. Changes nothing (it may throw bad_alloc).
    template <class Layer>
    bool plan(const Layer& layer, std::size_t incoming, std::vector<std::vector<std::uint32_t>>& kept) const {
        const cache_config& config = layer.config();
        const kernels::kernel_table& k = layer.kernels();
        const std::size_t heads = config.kv_heads, dim = config.head_dim;
        const scorer_needs needs = needs_of(scorer);
        std::vector<std::vector<float>> scores(heads);
        std::vector<float> keys, values, recent;
        layer_candidates candidates;
        candidates.heads.resize(heads);
        candidates.layer = layer.index();
        budget shortened; // the budget with the window less the incoming tokens
        candidates.keep = &keep;
        if (incoming != 0) {
            shortened = keep;
            shortened.window -= std::min(shortened.window, incoming);
            candidates.keep = &shortened;
        }
        candidates.first_position = layer.first_position();
        bool any = false;
        for (std::size_t h = 0; h < heads; ++h) {
            const std::size_t held = layer.held(h);
            const std::size_t with_incoming = target_of(layer, held + incoming, layer.seen() + incoming);
            const std::size_t target = with_incoming - std::min(with_incoming, incoming);
            head_candidates& candidate = candidates.heads[h];
            candidate.positions = layer.positions(h);
            candidate.held = held;
            candidate.target = target;
            if (held == 0 || (uses_target_of(selector) && target >= held)) {
                candidate.target = held; // nothing to drop
                scores[h].assign(held, 0.0f);
                candidate.scores = scores[h].data();
                continue;
            }
            head_inputs in;
            in.layer = layer.index();
            in.kv_head = h;
            in.tokens = held;
            in.target = target;
            in.dim = dim;
            in.positions = candidate.positions;
            in.last_position = layer.last_position();
            in.scale = config.logit_scale();
            in.kernels = &k;
            in.group = config.group();
            const row_source rows = row_source::of(layer.rows(h));
            in.rows = &rows;
            // Each `if constexpr` keeps out what a scorer type never asks for;
            // the run-time test inside is true for it, and decides for score::any.
            if constexpr (Scorer::needs_keys)
                if (needs.keys) {
                    keys.resize(held * dim);
                    layer.rows(h).decode_keys(k, 0, held, keys.data());
                    in.keys = keys.data();
                }
            if constexpr (Scorer::needs_values)
                if (needs.values) {
                    values.resize(held * dim);
                    layer.rows(h).decode_values(k, 0, held, values.data());
                    in.values = values.data();
                }
            if constexpr (Scorer::needs_attention_stats)
                if (needs.attention_stats) in.attention = layer.template column<column::attention_state>(h);
            if constexpr (needs_external_scores_of<Scorer>::value)
                if (needs.external_scores) in.external = layer.template column<column::external_score>(h);
            if constexpr (scores_on_append_of<Scorer>::value)
                if (needs.scores_on_append) in.appended = layer.template column<column::append_score>(h);
            if constexpr (query_window > 0)
                if (needs.query_window > 0) {
                    in.query_count = layer.queries(h, needs.query_window, recent);
                    in.queries = recent.data();
                }
            scores[h].resize(held);
            scorer.score(in, scores[h].data());
            candidate.scores = scores[h].data();
            any = true;
        }
        if (!any) return false;
        selector.select(candidates, kept);
        return true;
    }

    // Scorers that score at append (scores_on_append) do it here, once per
    // append of the layer, after the new rows and their columns are stored:
    // the last `count` tokens of every head; `keys` and `values` are the
    // engine's views of them. `scratch` holds append_scratch_floats(dim).
    static constexpr bool observes_append = scores_on_append_of<Scorer>::value;
    std::size_t append_scratch_floats(std::size_t dim) const noexcept {
        if constexpr (scores_append_rows_of<Scorer>::value)
            if (needs_of(scorer).append_rows) return scorer.append_scratch(dim);
        return (void)dim, 0;
    }
    template <class Layer, class KeyView, class ValueView>
    void on_append(const Layer& layer, std::size_t count, const KeyView& keys, const ValueView& values,
                   float* scratch) const noexcept {
        const scorer_needs needs = needs_of(scorer);
        if (!needs.scores_on_append) return;
        const std::size_t dim = layer.config().head_dim;
        const kernels::kernel_table& k = layer.kernels();
        for (std::size_t h = 0; h < layer.config().kv_heads; ++h) {
            float* appended = layer.template mutable_column<column::append_score>(h);
            const std::size_t held_before = layer.held(h) - count; // heads differ once eviction ran
            if constexpr (scores_append_rows_of<Scorer>::value)
                if (needs.append_rows) {
                    const row_source rows = row_source::of(layer.rows(h));
                    append_inputs in;
                    in.held_before = held_before;
                    in.held = held_before + count;
                    in.dim = dim;
                    in.positions = layer.positions(h);
                    in.first_position = layer.first_position();
                    in.rows = &rows;
                    in.kernels = &k;
                    in.scratch = scratch;
                    scorer.on_append_rows(in, appended);
                    continue;
                }
            (void)scratch;
            if constexpr (scores_append_blocks_of<Scorer>::value) {
                // Rows widened a block at a time, one scorer call a block
                // (score::any: one indirect call per block, not per token).
                constexpr std::size_t block_floats = 4096;
                static_assert(block_floats >= 4 * max_head_dim, "a block holds at least four rows");
                float key_rows[block_floats], value_rows[block_floats];
                const std::size_t block = block_floats / dim;
                for (std::size_t t0 = 0; t0 < count; t0 += block) {
                    const std::size_t n = std::min(block, count - t0);
                    for (std::size_t i = 0; i < n; ++i) {
                        widen_into<KeyView>(k, keys.row(t0 + i, h), key_rows + i * dim, dim);
                        widen_into<ValueView>(k, values.row(t0 + i, h), value_rows + i * dim, dim);
                    }
                    scorer.on_append_block(k, key_rows, value_rows, n, dim, appended + held_before + t0);
                }
            } else if constexpr (scores_each_append_of<Scorer>::value) {
                float key_row[max_head_dim], value_row[max_head_dim];
                for (std::size_t t = 0; t < count; ++t) {
                    const float* key = widened<KeyView>(k, keys.row(t, h), key_row, dim);
                    const float* value = widened<ValueView>(k, values.row(t, h), value_row, dim);
                    appended[held_before + t] = scorer.on_append(k, key, value, dim);
                }
            }
        }
    }

    // The budget's tokens for one head of the layer holding `held` tokens, the layer having seen `seen`.
    template <class Layer>
    std::size_t target_of(const Layer& layer, std::size_t held, std::size_t seen) const noexcept {
        return keep.target(held, seen, layer.index(), layer.config().layers, layer.byte_budget_tokens());
    }

    // After every attention over the layer: folds each head's attention mass
    // (head after head, held(h) floats) into the scorer's running statistic.
    template <class Layer>
    void observe(const Layer& layer, const float* mass, std::size_t query_tokens) const noexcept {
        if constexpr (Scorer::needs_attention_stats) {
            if (!needs_of(scorer).attention_stats) return;
            std::size_t offset = 0;
            for (std::size_t h = 0; h < layer.config().kv_heads; ++h) {
                const std::size_t held = layer.held(h);
                scorer.observe(layer.template mutable_column<column::attention_state>(h), mass + offset, held,
                               query_tokens);
                offset += held;
            }
        } else {
            (void)layer, (void)mass, (void)query_tokens;
        }
    }

    // Checks every parameter against the model's shape (the cache calls this
    // at construction, before anything is stored or evicted).
    void validate(const cache_config& config) const {
        keep.validate(config.layers);
        detail::validate_part(scorer, config);
        detail::validate_part(selector, config);
        detail::require(!rerotate.enabled || keeps_equal_lengths(selector),
                        "evict::policy: key re-rotation needs the same kept length in every head "
                        "(selector per_head_topk)");
        // rerotate decodes a key into a stack row of head_dim floats and rotates rotary_dims / 2 pairs of it.
        if (rerotate.enabled) detail::validate_rope(rerotate.rope, config.head_dim, "evict::policy (key re-rotation)");
    }

private:
    // An engine row as fp32 in `buffer`.
    template <class View, class Element>
    static void widen_into(const kernels::kernel_table& k, const Element* row, float* buffer, std::size_t dim) noexcept {
        if constexpr (View::element_dtype == dtype::f32)
            (void)k, std::memcpy(buffer, row, dim * sizeof(float));
        else
            k.to_f32[kernels::index_of(View::element_dtype)](row, buffer, dim);
    }
    // An engine row as fp32: itself when it is fp32, else widened into `buffer`.
    template <class View, class Element>
    static const float* widened(const kernels::kernel_table& k, const Element* row, float* buffer,
                                std::size_t dim) noexcept {
        if constexpr (View::element_dtype == dtype::f32) {
            return (void)k, (void)buffer, (void)dim, row;
        } else {
            widen_into<View>(k, row, buffer, dim);
            return buffer;
        }
    }
};

} // namespace kvc::evict
