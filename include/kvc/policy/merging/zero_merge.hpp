// kvc/policy/merging/zero_merge.hpp -- M4 ZeroMerge: dropped tokens join kept
// slots that count them, attended with log(count).
//
// What it is: every token the eviction plan drops is merged into one kept
// token; a kept token that has absorbed others becomes a slot carrying a
// count c (how many original tokens it stands for) and the count-weighted
// mean of their keys and values, and attention adds log c to its logit, so
// the slot weighs as c tokens would if their keys were all its key. Tokens
// identical to the slot they join therefore lose nothing.
// Source: Liu, Liu and Tang, "ZeroMerge: Parameter-Free KV Cache Compression
// for Memory-Efficient Long-Context LLMs", 2025, arXiv:2503.10714 (later
// titled ZSMerge): residual merging with compensated attention scores,
// parameter-free.
//
// Choices where the source leaves room (or where kvc departs from it):
// - Which slot a token joins: the kept token whose key is most cosine-similar
//   to its key (the first on a tie), among finite kept rows with a nonzero key.
//   The paper's head-level budget allocation (its multi-dimensional token
//   importance) is the eviction policy's business here: zero_merge composes
//   with any scorer and merges what that scorer drops.
// - Keys are merged as well as values (the count-weighted mean), since the
//   log(count) compensation is only exact when the slot's key stands for the
//   tokens it counts. Under RoPE the mean key mixes positions; the slot keeps
//   the position of the kept token it was.
// - Counts live in the bias column alone (exp(bias) = count, to a float's
//   rounding), as M5's do: a slot dropped later contributes its count c to the
//   slot it joins, and a kept slot's own count is carried, so the counts of a
//   head always add up, with its plain tokens, to the tokens it has seen.
// - No token beyond the eviction budget: the merged slots are kept tokens.
// - A dropped row that is not finite (or has a zero key) is just dropped.
#pragma once

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

struct zero_merge {
    using family = merging_family;
    static constexpr bool merges = true;
    using columns = column_list<attention_bias_column>;

    template <class Layer>
    void fold(const Layer& layer, std::size_t h, merge_plan& plan) const {
        const std::size_t held = layer.held(h), dim = layer.config().head_dim;
        const kernels::kernel_table& k = layer.kernels();
        const int f32 = kernels::index_of(dtype::f32);
        const float* bias = layer.template column<attention_bias_column>(h);
        const std::vector<std::uint32_t> dropped = dropped_of(plan.kept, held);
        if (dropped.empty()) return;

        const kept_rows kept = gather_kept(layer, h, plan.kept);
        // Per kept token: the count-weighted sums of what joins it, and that count.
        std::vector<float> key_sums(kept.size() * dim, 0.0f), value_sums(kept.size() * dim, 0.0f);
        std::vector<double> joined(kept.size(), 0.0);
        for_each_dropped(layer, h, dropped, [&](std::uint32_t t, const float* key, const float* value, float key_norm,
                                                float) {
            const nearest_kept to = nearest_of(k, kept, key, key_norm);
            if (to.at == kept.size()) return;
            const float count = std::exp(bias[t]);
            k.axpy[f32](count, key, key_sums.data() + to.at * dim, dim);
            k.axpy[f32](count, value, value_sums.data() + to.at * dim, dim);
            joined[to.at] += static_cast<double>(count);
        });

        std::vector<float> key(dim), value(dim);
        for (std::size_t i = 0; i < kept.size(); ++i) {
            if (joined[i] == 0.0) continue;
            const float own = std::exp(bias[plan.kept[i]]);
            float* key_sum = key_sums.data() + i * dim;
            float* value_sum = value_sums.data() + i * dim;
            k.axpy[f32](own, kept.key(i), key_sum, dim);
            k.axpy[f32](own, kept.value(i), value_sum, dim);
            const double count = joined[i] + static_cast<double>(own);
            const float inverse = static_cast<float>(1.0 / count);
            scaled_copy(k, inverse, key_sum, key.data(), dim);
            scaled_copy(k, inverse, value_sum, value.data(), dim);
            plan.rewrite(static_cast<std::uint32_t>(i), key.data(), value.data(), dim, static_cast<float>(count));
        }
    }

    template <class Columns>
    void settle(const merge_plan& plan, Columns& columns) const noexcept {
        write_log_counts(plan, columns);
    }
};

} // namespace kvc::merge
