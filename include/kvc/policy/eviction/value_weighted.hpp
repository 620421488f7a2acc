// kvc/policy/eviction/value_weighted.hpp -- E14 CriticalKV: two-stage selection weighted by value norms.
//
// Source: Feng et al., "Identify Critical KV Cache in LLM Inference from an
// Output Perturbation Perspective" (2025, arXiv:2502.03805); reference code in
// kvpress's CriticalKVPress. Attention weight alone does not say how much a
// token moves the output: that also scales with its value. Stage 1 keeps the
// best `first_stage` (half) of the budget by the base scorer's score; stage 2
// ranks the rest by (s_t + epsilon) * ||v_t W_o||_1.
//
//   using policy = kvc::evict::value_weighted<kvc::evict::score::snapkv>;
//
// Choices where the source leaves room:
// - No W_o: kvc sees one KV head's values, not the model's output projection,
//   so stage 2 uses ||v_t||_1 (docs/METHODS.md, E14). The ranking then ignores
//   how W_o stretches each value direction.
// - Stage 1 takes floor(first_stage * target) tokens, target = what the
//   selector keeps (head_inputs::target), over every held token; protected
//   sinks and window tokens that fall in it count towards it.
// - Scores returned: stage-2 tokens keep (s_t - shift + epsilon) * ||v_t||_1,
//   so their magnitudes stay comparable across heads (AdaKV); stage-1 tokens
//   get distinct values just above the largest of those, ordered by base
//   score. per_head_topk therefore keeps the sinks and window, then the
//   stage-1 tokens best first, then stage 2 best first: with no protected
//   tokens that is exactly the two-stage set.
// - shift: base scores can be negative (knorm, keydiff), which would invert
//   the product; if the smallest stage-2 base score is negative the scores
//   are shifted so it becomes 0. Attention-based bases (>= 0) are untouched,
//   as in the paper.
// - Forwards the base's needs (attention statistics, queries, keys, external
//   scores, scores made at append) and its observe(); adds needs_values.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"
#include "kvc/policy/eviction/snapkv.hpp"

namespace kvc::evict {
namespace score {

template <class Base = snapkv>
struct value_weighted {
    static constexpr bool needs_attention_stats = Base::needs_attention_stats;
    static constexpr std::size_t query_window = Base::query_window;
    static constexpr bool needs_keys = Base::needs_keys, needs_values = true;
    static constexpr bool needs_external_scores = needs_external_scores_of<Base>::value;
    static constexpr bool scores_on_append = scores_on_append_of<Base>::value;

    Base base{};
    double first_stage = 0.5; // share of the target chosen by the base score alone
    float epsilon = 1e-4f;

    value_weighted() = default;
    explicit value_weighted(Base base_, double first_stage_ = 0.5, float epsilon_ = 1e-4f)
        : base(std::move(base_)), first_stage(first_stage_), epsilon(epsilon_) {}

    void validate() const {
        if constexpr (detail::has_validate<Base>::value) base.validate();
        detail::require(first_stage >= 0.0 && first_stage <= 1.0,
                        "evict::score::value_weighted: expected first_stage in [0, 1], got ", first_stage);
        detail::require(std::isfinite(epsilon) && epsilon >= 0.0f,
                        "evict::score::value_weighted: expected epsilon >= 0, got ", epsilon);
    }

    template <class B = Base, std::enable_if_t<B::needs_attention_stats, int> = 0>
    void observe(float* state, const float* mass, std::size_t tokens, std::size_t queries) const {
        base.observe(state, mass, tokens, queries);
    }

    template <class B = Base>
    auto on_append(const kernels::kernel_table& k, const float* key, const float* value, std::size_t dim) const noexcept
        -> decltype(std::declval<const B&>().on_append(k, key, value, dim)) {
        return base.on_append(k, key, value, dim);
    }
    template <class B = Base>
    auto on_append_rows(const append_inputs& in, float* scores) const noexcept
        -> decltype(std::declval<const B&>().on_append_rows(in, scores)) {
        base.on_append_rows(in, scores);
    }
    template <class B = Base>
    auto append_scratch(std::size_t dim) const noexcept -> decltype(std::declval<const B&>().append_scratch(dim)) {
        return base.append_scratch(dim);
    }

    void score(const head_inputs& in, float* scores) const {
        using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        const std::size_t tokens = in.tokens;
        if (tokens == 0) return;
        std::vector<float> base_score(tokens);
        base.score(in, base_score.data());

        // Stage 1: the best floor(first_stage * target) by the base score.
        const std::size_t first = std::min(
            tokens, static_cast<std::size_t>(std::floor(first_stage * static_cast<double>(in.target))));
        std::vector<std::uint32_t> order(tokens);
        std::iota(order.begin(), order.end(), 0u);
        std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(first), order.end(),
                          [&](std::uint32_t a, std::uint32_t c) { return selection::better(base_score.data(), a, c); });
        std::vector<char> in_first(tokens, 0);
        for (std::size_t i = 0; i < first; ++i) in_first[order[i]] = 1;

        // Stage 2: (s - shift + epsilon) * ||v||_1 for the rest.
        float lowest = std::numeric_limits<float>::infinity();
        for (std::size_t t = 0; t < tokens; ++t)
            if (!in_first[t] && std::isfinite(base_score[t])) lowest = std::min(lowest, base_score[t]);
        const float shift = lowest < 0.0f ? lowest : 0.0f;
        const Eigen::Map<const row_matrix> values(in.values, static_cast<Eigen::Index>(tokens),
                                                  static_cast<Eigen::Index>(in.dim));
        const Eigen::VectorXf l1 = values.cwiseAbs().rowwise().sum();
        float top = -std::numeric_limits<float>::infinity();
        for (std::size_t t = 0; t < tokens; ++t) {
            if (in_first[t]) continue;
            scores[t] = (base_score[t] - shift + epsilon) * l1(static_cast<Eigen::Index>(t));
            if (std::isfinite(scores[t])) top = std::max(top, scores[t]);
        }
        if (!std::isfinite(top)) top = 0.0f;
        // Stage-1 tokens: distinct values above every stage-2 score, best base score highest.
        float level = top;
        for (std::size_t i = first; i-- > 0;) {
            level = std::nextafter(level, std::numeric_limits<float>::infinity());
            scores[order[i]] = level;
        }
    }
};

} // namespace score
template <class Base = score::snapkv>
using value_weighted = policy<score::value_weighted<Base>>;
} // namespace kvc::evict
