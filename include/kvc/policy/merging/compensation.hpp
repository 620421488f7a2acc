// kvc/policy/merging/compensation.hpp -- M5: one compensation slot per KV head.
//
// What it is: everything eviction drops from a head is folded into one extra
// slot holding the count-weighted mean key and mean value of the dropped
// tokens, attended with the additive logit log(count): the slot weighs as the
// tokens it stands for would if their keys were all its key. Tokens whose
// keys are close to their mean therefore lose almost nothing; dropping n
// tokens identical to each other loses nothing at all.
// Source: METHODS.md M5; the compensation token of RazorAttention (Tang et
// al., 2024) for its non-retrieval heads (B6), where it is the mean of the
// dropped keys and values.
//
// Choices where the source leaves room:
// - One slot per head, ever: a later compression folds what it drops into the
//   existing slot (the held token with a positive bias, i.e. a count above 1),
//   weighting each row by its count, so the slot is always the mean over every
//   token ever dropped from the head. When the eviction plan drops the slot
//   itself, it is folded with the rest and the new slot takes the index of the
//   first dropped token (for streaming: right after the sinks).
// - The count lives in the bias column alone (exp(bias) = count, exact to a
//   float's rounding); no separate count column, so a token costs 4 bytes more
//   than without merging, not 8.
// - The slot is one token beyond the eviction budget (the method's "extra slot").
// - A dropped row whose squared norm is not finite (NaN, Inf, overflow) is
//   left out of the slot and its count, so one bad row cannot poison the head.
// - It is composed with any eviction policy (not only streaming heads); the
//   slot keeps the position of the token whose index it took.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/policy/merging/nearest.hpp"
#include "kvc/policy/merging/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc::merge {

struct compensation {
    using family = merging_family;
    static constexpr bool merges = true;
    using columns = column_list<attention_bias_column>;

    template <class Layer>
    void fold(const Layer& layer, std::size_t h, merge_plan& plan) const {
        const std::size_t held = layer.held(h), dim = layer.config().head_dim;
        const kernels::kernel_table& k = layer.kernels();
        const float* bias = layer.template column<attention_bias_column>(h);
        const std::vector<std::uint32_t> dropped = dropped_of(plan.kept, held);
        if (dropped.empty()) return;

        // The slot an earlier compression made, if any: the token standing for most.
        std::size_t slot = held;
        for (std::size_t t = 0; t < held; ++t)
            if (bias[t] > 0.0f && (slot == held || bias[t] > bias[slot])) slot = t;
        const bool slot_kept =
            slot != held && std::binary_search(plan.kept.begin(), plan.kept.end(), static_cast<std::uint32_t>(slot));

        // Sums of the rows weighted by their counts (a plain token counts 1).
        std::vector<float> key(dim, 0.0f), value(dim, 0.0f);
        double count = 0.0;
        const int f32 = kernels::index_of(dtype::f32);
        auto add = [&](std::uint32_t t, const float* key_row, const float* value_row, float, float) {
            const float weight = std::exp(bias[t]);
            k.axpy[f32](weight, key_row, key.data(), dim);
            k.axpy[f32](weight, value_row, value.data(), dim);
            count += static_cast<double>(weight);
        };
        for_each_dropped(layer, h, dropped, add); // finite rows only
        if (slot_kept) for_each_dropped(layer, h, std::vector<std::uint32_t>{static_cast<std::uint32_t>(slot)}, add);
        if (count == 0.0) return; // every dropped row was non-finite: nothing to stand for

        const float inverse = static_cast<float>(1.0 / count);
        for (std::size_t d = 0; d < dim; ++d) key[d] *= inverse, value[d] *= inverse;
        const std::uint32_t index = slot_kept ? static_cast<std::uint32_t>(slot) : dropped.front();
        auto at = std::lower_bound(plan.kept.begin(), plan.kept.end(), index);
        if (!slot_kept) at = plan.kept.insert(at, index);
        plan.rewrite(static_cast<std::uint32_t>(at - plan.kept.begin()), key.data(), value.data(), dim,
                     static_cast<float>(count));
    }

    template <class Columns>
    void settle(const merge_plan& plan, Columns& columns) const noexcept {
        write_log_counts(plan, columns);
    }
};

} // namespace kvc::merge
