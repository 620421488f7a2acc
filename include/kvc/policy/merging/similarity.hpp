// kvc/policy/merging/similarity.hpp -- M2 similarity merge (KVMerger, D2O):
// dropped values blended into their most similar kept token, keys untouched.
//
// What it is: each token the eviction plan drops joins the kept token whose
// key is most cosine-similar to its key (similarity s); its value is blended
// into that token's value with weight w = s * ||v_e|| / (||v_e|| + ||v_t||),
// v_t <- (v_t + sum_e w_e v_e) / (1 + sum_e w_e). The kept key is left as it
// is, so its RoPE rotation (its position) stays valid.
// Sources: Wan et al., "D2O: Dynamic Discriminative Operations for Efficient
// Long-Context Inference of Large Language Models", ICLR 2025, arXiv:2406.13035
// (its token-level compensation: evicted tokens recalled and merged into
// similar retained ones when similar enough); Wang et al., "Model Tells You
// Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks"
// (KVMerger), 2024, arXiv:2407.08454, for merging by key similarity;
// METHODS.md M2 for the weight.
//
// Choices where the sources leave room:
// - The weight is METHODS.md's, not KVMerger's Gaussian kernel over merging
//   sets of consecutive similar tokens: kvc merges what any scorer drops,
//   which need not be consecutive.
// - One fixed similarity threshold (D2O keeps an exponential moving average
//   of it): a dropped token merges only when s >= threshold. Validated in
//   [-1, 1] (a cosine); since a weight w <= 0 would subtract a value (and could
//   make 1 + sum w vanish), only s > 0 ever merges, so every threshold <= 0
//   means "every positively similar token". Default 0 (merge all of them).
// - No count and no attention bias: the method reweights values only. A kept
//   token merged in an earlier compression is an ordinary token to the next.
// - The kept key is re-stored as it was decoded (the protocol rewrites whole
//   rows): exact for quant::none (decode then encode of a stored f32, f16 or
//   bf16 value is the identity; f32 and f16 are tested); a block codec re-encodes its own dequantized
//   key, which may move it by its rounding.
// - A dropped row that is not finite (or has a zero key) is just dropped; a
//   kept row that is not finite receives nothing.
#pragma once

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

namespace kvc::merge {

struct similarity {
    using family = merging_family;
    static constexpr bool merges = true;

    // Dropped tokens whose best cosine similarity is below it are just dropped.
    float threshold = 0.0f;

    similarity() = default;
    explicit similarity(float threshold_) noexcept : threshold(threshold_) {}

    void validate() const {
        detail::require(threshold >= -1.0f && threshold <= 1.0f,
                        "merge::similarity: expected a similarity threshold in [-1, 1], got ", threshold);
    }

    template <class Layer>
    void fold(const Layer& layer, std::size_t h, merge_plan& plan) const {
        const std::size_t held = layer.held(h), dim = layer.config().head_dim;
        const kernels::kernel_table& k = layer.kernels();
        const int f32 = kernels::index_of(dtype::f32);
        const std::vector<std::uint32_t> dropped = dropped_of(plan.kept, held);
        if (dropped.empty()) return;

        const kept_rows kept = gather_kept(layer, h, plan.kept);
        std::vector<float> value_sums(kept.size() * dim, 0.0f);
        std::vector<double> weights(kept.size(), 0.0);
        std::vector<unsigned char> joined(kept.size(), 0);
        for_each_dropped(layer, h, dropped, [&](std::uint32_t, const float* key, const float*value, float key_norm,
                                                float value_norm) {
            const nearest_kept to = nearest_of(k, kept, key, key_norm);
            if (to.at == kept.size() || !(to.similarity > 0.0f) || to.similarity < threshold) return;
            const float norms = value_norm + kept.value_norm[to.at];
            if (!(norms > 0.0f)) return; // both values zero: nothing to blend
            const float weight = to.similarity * value_norm / norms;
            k.axpy[f32](weight, value, value_sums.data() + to.at * dim, dim);
            weights[to.at] += static_cast<double>(weight);
            joined[to.at] = 1;
        });

        std::vector<float> value(dim);
        for (std::size_t i = 0; i < kept.size(); ++i) {
            if (!joined[i]) continue;
            float* sum = value_sums.data() + i * dim;
            k.axpy[f32](1.0f, kept.value(i), sum, dim);
            scaled_copy(k, static_cast<float>(1.0 / (1.0 + weights[i])), sum, value.data(), dim);
            plan.rewrite(static_cast<std::uint32_t>(i), kept.key(i), value.data(), dim, 1.0f);
        }
    }

    // No column: the blend lives in the values alone.
    template <class Columns>
    void settle(const merge_plan&, Columns&) const noexcept {}
};

} // namespace kvc::merge
