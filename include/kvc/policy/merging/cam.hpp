// kvc/policy/merging/cam.hpp -- M1 CaM: each dropped value spread over the
// kept tokens that follow it, scaled by its attention.
//
// What it is: a token the eviction plan drops is not lost outright: its value
// is added, in equal parts, to the values of the next m kept tokens after it,
// scaled by p = min(1, A_e / mean(A over those m)), where A is the attention
// a token has accumulated. A dropped token that drew as much attention as its
// successors hands its whole value on; one that drew little hands on little.
// Keys are untouched (RoPE positions stay valid), and there is no count.
// Source: Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs
// Inference", ICML 2024; METHODS.md M1.
//
// Choices where the source leaves room (or where kvc departs from it):
// - Deterministic: CaM samples a Bernoulli(p) mask per dropped token and adds
//   v_e / m when it fires; kvc adds its expectation p * v_e / m, so a run is
//   reproducible and the merge does not depend on a random stream.
// - A: the attention mass each token has drawn since it arrived, summed over
//   every query of its GQA group (H2O's statistic, which CaM builds on), kept
//   by this policy in its own column so it works with any eviction policy
//   (streaming included), whatever statistic the scorer keeps.
// - The window is the next m tokens the plan keeps after the dropped one (in
//   original order); near the end of the head fewer than m follow, and the
//   value is split over those n (p * v_e / n), so the amount handed on does
//   not depend on where the token sat. A token with no kept successor is
//   just dropped.
// - When the window has drawn no attention at all (mean 0, e.g. no attention
//   was run since it arrived), p = 1: nothing says the dropped token mattered less.
// - The merged values are computed from the rows as they were before this
//   compression (drops in one plan add up; the order they are taken in does
//   not matter). A merged token's A is its own; CaM's statistic is not moved.
// - A dropped row that is not finite, or a non-finite p, contributes nothing.
// - The kept key is re-stored as it was decoded (the protocol rewrites whole
//   rows): exact for quant::none.
// Known limit, measured: the additive merge assumes the kept tokens' attention
// is what it was before the drop, true when one token goes per step (CaM's
// setting), false when a compression drops most of a head at once. On kvref
// at keep ratio 0.125 after the prompt it raises attention-output error from
// 0.35 (H2O alone) to 1.41 (tests/engine/attention_error_test.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/policy/merging/nearest.hpp"
#include "kvc/policy/merging/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc::merge {

namespace column {
// The attention mass a held token has drawn, summed over queries (CaM's A).
struct cam_attention {
    using value_type = float;
    static constexpr value_type initial = 0.0f;
};
} // namespace column

struct cam {
    using family = merging_family;
    static constexpr bool merges = true;
    static constexpr bool needs_attention_stats = true;
    using columns = column_list<column::cam_attention>;

    // m: how many following kept tokens share a dropped value.
    std::size_t window = 32;

    cam() = default;
    explicit cam(std::size_t m) noexcept : window(m) {}

    void validate() const {
        detail::require(window >= 1, "merge::cam: expected a merge window m >= 1 (kept tokens sharing a dropped value), got ",
                        window);
    }

    template <class Layer>
    void observe(const Layer& layer, const float* mass, std::size_t) const noexcept {
        for (std::size_t h = 0; h < layer.config().kv_heads; ++h) {
            const std::size_t held = layer.held(h);
            float* attention = layer.template mutable_column<column::cam_attention>(h);
            for (std::size_t t = 0; t < held; ++t) attention[t] += mass[t];
            mass += held;
        }
    }

    template <class Layer>
    void fold(const Layer& layer, std::size_t h, merge_plan& plan) const {
        const std::size_t held = layer.held(h), dim = layer.config().head_dim;
        const kernels::kernel_table& k = layer.kernels();
        const int f32 = kernels::index_of(dtype::f32);
        const float* attention = layer.template column<column::cam_attention>(h);
        const std::vector<std::uint32_t> dropped = dropped_of(plan.kept, held);
        if (dropped.empty()) return;

        const kept_rows kept = gather_kept(layer, h, plan.kept);
        std::vector<float> value_sums(kept.size() * dim, 0.0f);
        std::vector<unsigned char> joined(kept.size(), 0);
        for_each_dropped(layer, h, dropped, [&](std::uint32_t t, const float*, const float* value, float, float) {
            const std::size_t first =
                static_cast<std::size_t>(std::upper_bound(plan.kept.begin(), plan.kept.end(), t) - plan.kept.begin());
            const std::size_t n = std::min(window, kept.size() - first);
            if (n == 0) return;
            double mean = 0.0;
            for (std::size_t j = first; j < first + n; ++j) mean += static_cast<double>(attention[plan.kept[j]]);
            mean /= static_cast<double>(n);
            const double p = mean > 0.0 ? std::min(1.0, static_cast<double>(attention[t]) / mean) : 1.0;
            if (!std::isfinite(p) || !(p > 0.0)) return;
            const float share = static_cast<float>(p / static_cast<double>(n));
            for (std::size_t j = first; j < first + n; ++j) {
                k.axpy[f32](share, value, value_sums.data() + j * dim, dim);
                joined[j] = 1;
            }
        });

        for (std::size_t i = 0; i < kept.size(); ++i) {
            if (!joined[i]) continue;
            float* value = value_sums.data() + i * dim;
            k.axpy[f32](1.0f, kept.value(i), value, dim);
            plan.rewrite(static_cast<std::uint32_t>(i), kept.key(i), value, dim, 1.0f);
        }
    }

    // No column to write: merged tokens keep the attention they drew.
    template <class Columns>
    void settle(const merge_plan&, Columns&) const noexcept {}
};

} // namespace kvc::merge
