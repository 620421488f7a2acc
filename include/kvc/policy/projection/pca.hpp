// kvc/policy/projection/pca.hpp -- P1 PCA projection: keys and values kept as
// rank-r latents in per-head orthonormal bases, attention in the latent space.
//
// What it is: the keys (and values) of one KV head occupy few directions of
// head_dim. With an orthonormal basis U (head_dim x r) of the directions that
// carry most of their energy, each row x is stored as its r coordinates U^T x
// and stands for U U^T x. Attention needs no reconstructed row:
// <q, U U^T k> = <U^T q, U^T k> (the query is projected once per step and
// query head), and the output sum_t a_t U U^T v_t = U (sum_t a_t U^T v_t) is
// accumulated in latent space and lifted once. Sources: Saxena, Saha,
// Choudhary and Roy, "Eigen Attention: Attention in Low-Rank Space for KV
// Cache Compression", Findings of EMNLP 2024, arXiv:2408.05646 (bases from an
// SVD of calibration keys and values, attention in the low-rank space);
// Chang et al., "Palu: Compressing KV-Cache with Low-Rank Projection", 2024,
// arXiv:2407.21118 (low-rank latents cached instead of keys and values).
// METHODS.md P1.
//
//   auto a = kvc::calibration::calibrate_pca(config, sample_keys, sample_values);  // calibration/pca.hpp
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::pca>
//       cache(config, {}, {}, {}, kvc::project::pca(a, 32));                  // rank 32 of the artifact's
//   // or bases trained elsewhere: kvc::project::pca(kvc::project::pca_bases{...})
//
// Choices made where the sources leave room:
// - One rank r for keys and values (Palu and Eigen Attention pick them per
//   layer and separately); the latents of a head are one r-wide store.
// - Every token is projected as it is appended, prompt and decode alike (no
//   full-precision window: that is P5); the projection stage has nothing
//   left to do and project() returns nullopt.
// - Bases must be orthonormal (<u_i, u_j> within 1e-4 of 0 or 1, checked in
//   double when the policy is built): U U^T is then the orthogonal projector
//   and latent attention is exact attention over the projected rows. Palu's
//   non-orthogonal factorisations (a separate reconstruction matrix) are not
//   accepted.
// - Calibration is the uncentred second moment (no mean subtracted): the
//   stored row is U U^T x, not mu + U U^T (x - mu), so nothing but the
//   latents is added to attention. A key's mean direction is then usually
//   the first component.
// - Storage: the latents are the codec's own store built for width r
//   (stored_width): quant::none<T> keeps them as they are, any codec that
//   accepts r-wide rows quantizes them (Palu quantizes its latents after a
//   Hadamard rotation: quant::rotated<...> here), and attention runs that
//   codec's fused kernel over them. KVQuant (keys before RoPE) is refused.
//   Palu's rotation is a choice of codec here, not part of PCA.
// - Memory: the codec's bytes for 2 r-wide rows a token (2 r elements over
//   quant::none), plus each head's own fp32 copy of its two
//   bases (2 head_dim r 4 bytes, 32 KiB at 128 x 32) in the cache's resource;
//   the policy's copy (shared by every copy of the policy) is not in bytes().
// - Palu's group-head latents (one latent shared by several KV heads) are
//   not implemented.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/policy/projection/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/latent_rows.hpp"

namespace kvc::project {

// Bases supplied by the engine: for every (layer, KV head) a head_dim x rank
// matrix with orthonormal columns, row-major, [layers][kv_heads][head_dim][rank].
struct pca_bases {
    std::size_t layers = 0, kv_heads = 0, head_dim = 0, rank = 0;
    std::vector<float> keys, values;
};

// Largest |<u_i, u_j> - [i == j]| a basis may show (fp32 bases rounded from
// exact ones are about 1e-7 sqrt(head_dim) off).
inline constexpr double pca_orthonormal_tolerance = 1e-4;

// Throws kvc::error unless the head_dim x rank matrix u (row-major) is finite
// and has orthonormal columns within pca_orthonormal_tolerance, naming `which`
// basis of which (layer, KV head), the pair of columns and their product.
inline void check_orthonormal(const float* u, std::size_t dim, std::size_t rank, const char* which, std::size_t layer,
                              std::size_t head, const char* who) {
    for (std::size_t i = 0; i < dim * rank; ++i)
        detail::require(std::isfinite(u[i]), who, ": the ", which, " basis of layer ", layer, ", KV head ", head,
                        " holds ", u[i], " (row ", i / rank, ", column ", i % rank, "), expected finite values");
    for (std::size_t i = 0; i < rank; ++i)
        for (std::size_t j = i; j < rank; ++j) {
            double dot = 0.0;
            for (std::size_t d = 0; d < dim; ++d)
                dot += static_cast<double>(u[d * rank + i]) * static_cast<double>(u[d * rank + j]);
            const double expected = i == j ? 1.0 : 0.0;
            detail::require(std::fabs(dot - expected) <= pca_orthonormal_tolerance, who, ": the ", which,
                            " basis of layer ", layer, ", KV head ", head, " is not orthonormal: <u_", i, ", u_", j,
                            "> = ", dot, ", expected ", expected, " (within ", pca_orthonormal_tolerance, ")");
        }
}

class pca {
public:
    using family = projection_family;
    static constexpr bool projects = true;

    template <class Inner>
    using head_storage = latent_rows<Inner>;

    // From the engine's bases: throws kvc::error (naming what was expected
    // and what was given) for a shape that does not add up, a rank outside
    // 1..head_dim, a non-finite element or a basis that is not orthonormal.
    explicit pca(pca_bases bases) { adopt(std::move(bases), "kvc::project::pca"); }

    // From a calibration artifact of kind "pca" (calibration/pca.hpp): the
    // first `rank` columns (the leading components; 0 takes all it holds).
    explicit pca(const calibration::artifact& a, std::size_t rank = 0) {
        const char* who = "kvc::project::pca";
        detail::require(a.kind == "pca", who, ": expected a calibration artifact of kind 'pca', got '", a.kind, "'");
        const calibration::tensor* keys = nullptr;
        for (const calibration::tensor& t : a.tensors)
            if (t.name == "key_basis") keys = &t;
        detail::require(keys != nullptr, who, ": the artifact has no tensor 'key_basis'");
        detail::require(keys->shape.size() == 4 && keys->shape[3] >= 1 && keys->shape[3] <= keys->shape[2], who,
                        ": expected key_basis of shape [layers][kv_heads][head_dim][rank], rank 1..head_dim, got ",
                        keys->shape.size(), " extents");
        const calibration::tensor& values = a.get("value_basis", keys->shape);
        const auto held = static_cast<std::size_t>(keys->shape[3]);
        if (rank == 0) rank = held;
        detail::require(rank <= held, who, ": asked for rank ", rank, ", the artifact holds ", held, " components");
        pca_bases b;
        b.layers = static_cast<std::size_t>(keys->shape[0]);
        b.kv_heads = static_cast<std::size_t>(keys->shape[1]);
        b.head_dim = static_cast<std::size_t>(keys->shape[2]);
        b.rank = rank;
        const std::size_t rows = b.layers * b.kv_heads * b.head_dim;
        b.keys.resize(rows * rank);
        b.values.resize(rows * rank);
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < rank; ++j) {
                b.keys[i * rank + j] = keys->values[i * held + j];
                b.values[i * rank + j] = values.values[i * held + j];
            }
        adopt(std::move(b), who);
    }

    std::size_t layers() const noexcept { return layers_; }
    std::size_t kv_heads() const noexcept { return kv_heads_; }
    std::size_t head_dim() const noexcept { return head_dim_; }
    std::size_t rank() const noexcept { return rank_; }
    // Every head's bases, [layers][kv_heads][head_dim][rank] (P4 Loki reads the key bases).
    const std::vector<float>& key_bases() const noexcept { return *keys_; }
    const std::vector<float>& value_bases() const noexcept { return *values_; }

    // compressed_cache calls this first: the bases must be for this cache's shape.
    void validate(const cache_config& config) const {
        detail::require(config.layers == layers_ && config.kv_heads == kv_heads_ && config.head_dim == head_dim_,
                        "kvc::project::pca: the bases are for ", layers_, " layers x ", kv_heads_,
                        " KV heads x head_dim ", head_dim_, ", the cache has ", config.layers, " x ", config.kv_heads,
                        " x ", config.head_dim);
    }

    // The codec stores r-wide rows: the latents.
    std::size_t stored_width(const cache_config&) const noexcept { return rank_; }

    template <class Inner>
    latent_rows<Inner> make_head(Inner inner, const cache_config& config, std::size_t layer,
                                 std::size_t kv_head) const {
        validate(config);
        const std::size_t offset = (layer * kv_heads_ + kv_head) * head_dim_ * rank_;
        return latent_rows<Inner>(std::move(inner), head_dim_, rank_, config.resource, keys_->data() + offset,
                                  values_->data() + offset, rank_);
    }

    // Rows are projected as they arrive: the stage has nothing to do.
    template <class Layer, class Store>
    std::optional<Store> project(const Layer&, std::size_t, const Store&) const {
        return std::nullopt;
    }

private:
    void adopt(pca_bases b, const char* who) {
        detail::require(b.layers >= 1 && b.kv_heads >= 1 && b.head_dim >= 1 && b.head_dim <= max_head_dim, who,
                        ": expected layers, kv_heads >= 1 and head_dim in 1..", max_head_dim, ", got ", b.layers,
                        ", ", b.kv_heads, ", ", b.head_dim);
        detail::require(b.rank >= 1 && b.rank <= b.head_dim, who, ": expected a rank in 1..", b.head_dim,
                        " (head_dim), got ", b.rank);
        const std::size_t per_head = b.head_dim * b.rank, elements = b.layers * b.kv_heads * per_head;
        detail::require(b.keys.size() == elements && b.values.size() == elements, who, ": expected ", elements,
                        " floats of keys and of values ([", b.layers, "][", b.kv_heads, "][", b.head_dim, "][", b.rank,
                        "]), got ", b.keys.size(), " and ", b.values.size());
        for (const std::vector<float>* basis : {&b.keys, &b.values})
            for (std::size_t l = 0; l < b.layers; ++l)
                for (std::size_t h = 0; h < b.kv_heads; ++h)
                    check_orthonormal(basis->data() + (l * b.kv_heads + h) * per_head, b.head_dim, b.rank,
                                      basis == &b.keys ? "key" : "value", l, h, who);
        layers_ = b.layers;
        kv_heads_ = b.kv_heads;
        head_dim_ = b.head_dim;
        rank_ = b.rank;
        keys_ = std::make_shared<const std::vector<float>>(std::move(b.keys));
        values_ = std::make_shared<const std::vector<float>>(std::move(b.values));
    }

    std::size_t layers_ = 0, kv_heads_ = 0, head_dim_ = 0, rank_ = 0;
    std::shared_ptr<const std::vector<float>> keys_, values_; // [layers][kv_heads][head_dim][rank]
};

} // namespace kvc::project
