// kvc/policy/projection/loki.hpp -- P4 Loki: top-k attention chosen by
// low-rank key scores.
//
// What it is: keys live mostly in a few principal directions, so the logits
// computed from the leading r coordinates of keys and queries in the keys'
// principal basis rank the tokens nearly as the exact logits do. Loki stores
// keys in that basis (a rotation: nothing is lost), estimates every token's
// logit from r coordinates, and attends exactly over the k tokens with the
// best estimates. It saves reading (r / head_dim of the keys, then k tokens'
// keys and values), not memory. Source: Singhania, Singh, He, Feizi and
// Bhatele, "Loki: Low-Rank Keys for Efficient Sparse Attention", NeurIPS
// 2024, arXiv:2406.02542. METHODS.md P4.
//
//   auto a = kvc::calibration::calibrate_pca(config, sample_keys, sample_values);  // rank 0: every component
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::loki>
//       cache(config, {}, {}, {}, kvc::project::loki(kvc::project::pca(a), 32, 0.125));
//
// Choices made where the source leaves room:
// - The basis is the full-rank key basis of a project::pca (its values'
//   bases are not used): calibration/pca.hpp's, or the engine's.
// - One choice of tokens per KV head for its whole GQA group: a token's
//   score is the largest estimated logit over the group's query heads (the
//   source chooses per query head; one set per KV head reads each chosen row
//   once for the group). k = ceil(ratio x tokens held), at least 1.
// - Every token of a decode step is a candidate (no always-kept window).
// - Prefill attends exactly (the source sparsifies decode only).
// - Over quant::none<T>, like the other projections; storage/loki_rows.hpp
//   has the layout and the decode scratch (about (group + 3) x 4 bytes a
//   token, counted in bytes()).
#pragma once

#include <cstddef>
#include <optional>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/projection/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/loki_rows.hpp"

namespace kvc::project {

class loki {
public:
    using family = projection_family;
    static constexpr bool projects = true;

    template <class Inner>
    using head_storage = loki_rows;

    // `bases` must hold every component (rank = head_dim); rank: the leading
    // coordinates the estimate reads, 1..head_dim; ratio: the share of tokens
    // attended exactly, in (0, 1]. Throws kvc::error otherwise.
    loki(pca bases, std::size_t rank, double ratio) : bases_(std::move(bases)), rank_(rank), ratio_(ratio) {
        detail::require(bases_.rank() == bases_.head_dim(), "kvc::project::loki: expected full-rank key bases (rank ",
                        bases_.head_dim(), "), got rank ", bases_.rank());
        detail::require(rank_ >= 1 && rank_ <= bases_.head_dim(), "kvc::project::loki: expected a rank in 1..",
                        bases_.head_dim(), ", got ", rank_);
        detail::require(ratio_ > 0.0 && ratio_ <= 1.0, "kvc::project::loki: expected a share of tokens in (0, 1], got ",
                        ratio_);
    }

    std::size_t rank() const noexcept { return rank_; }
    double ratio() const noexcept { return ratio_; }

    void validate(const cache_config& config) const { bases_.validate(config); }

    template <class Inner>
    loki_rows make_head(Inner inner, const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        static_assert(std::is_same_v<Inner, dense_rows>,
                      "kvc::project::loki stores rotated rows as plain rows: use it with quant::none<T>");
        validate(config);
        const std::size_t dim = bases_.head_dim();
        return loki_rows(std::move(inner), bases_.key_bases().data() + (layer * bases_.kv_heads() + kv_head) * dim * dim,
                         rank_, ratio_, config.group());
    }

    // Keys are rotated as they arrive and tokens chosen at each decode: the stage has nothing to do.
    template <class Layer>
    std::optional<loki_rows> project(const Layer&, std::size_t, const loki_rows&) const {
        return std::nullopt;
    }

private:
    pca bases_;
    std::size_t rank_;
    double ratio_;
};

} // namespace kvc::project
