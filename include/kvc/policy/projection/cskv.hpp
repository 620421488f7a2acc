// kvc/policy/projection/cskv.hpp -- P5 CSKV's bi-branch cache: the newest
// tokens whole, the older ones as rank-r latents, in one softmax.
//
// What it is: low-rank latents (P1) lose most on the tokens attention leans
// on hardest, the newest ones. CSKV keeps a window of the most recent tokens
// in full precision and stores every older token as its low-rank channel
// features; attention runs over both branches at once. Source: Wang, Li,
// Ning, Yuan, Yan, Dai and Wang, "CSKV: Training-Efficient Channel Shrinking
// for KV Cache in Long-Context Scenarios", NeurIPS 2024 ENLSP workshop,
// arXiv:2409.10593 (low-rank K/V features initialised by (A)SVD and
// fine-tuned layer by layer; a window of about 32 full-precision tokens;
// combined with 4-bit quantization of the features). METHODS.md P5.
//
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::cskv>
//       cache(config, {}, {}, {}, kvc::project::cskv(kvc::project::pca(artifact, 32), 32));
//
// Choices made where the source leaves room:
// - The low-rank features are P1's: per (layer, KV head) orthonormal bases
//   from calibration (calibrate_pca) or the engine, the same rank for keys and
//   values. CSKV's fine-tuned, non-orthogonal factors need the model's
//   weights retrained, which a cache library cannot do; an engine that has
//   them orthonormalised can pass them as pca_bases.
// - The window is the newest `window` tokens (default 32) of each head at
//   each compression: after the prompt, an eviction schedule's, and
//   compress(). Tokens decoded in between stay whole until the next one (so
//   between compressions the window grows; an eviction schedule with an
//   interval bounds it).
// - Older tokens are projected from the rows the window stored (the cache's
//   storage type), not from the engine's original rows.
// - The features are the codec's store at width r (stored_width), so any
//   codec that takes r-wide rows quantizes them (the source's 4-bit QAT
//   becomes post-training quantization here: `q4_0 + cskv:32:32`); the
//   window is dense rows in config.storage.
// - Memory: the body as P1 (the codec's bytes for 2 r-wide rows a token plus
//   each head's two fp32 bases), the window's whole rows.
#pragma once

#include <cstddef>
#include <optional>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/projection/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/window_latent_rows.hpp"

namespace kvc::project {

class cskv {
public:
    using family = projection_family;
    static constexpr bool projects = true;

    template <class Inner>
    using head_storage = window_latent_rows<Inner>;

    // `bases`: the low-rank features (P1's); `window`: tokens kept whole per head.
    explicit cskv(pca bases, std::size_t window = 32) : bases_(std::move(bases)), window_(window) {}

    std::size_t rank() const noexcept { return bases_.rank(); }
    std::size_t window() const noexcept { return window_; }
    const pca& bases() const noexcept { return bases_; }

    void validate(const cache_config& config) const { bases_.validate(config); }
    std::size_t stored_width(const cache_config& config) const noexcept { return bases_.stored_width(config); }

    template <class Inner>
    window_latent_rows<Inner> make_head(Inner inner, const cache_config& config, std::size_t layer,
                                        std::size_t kv_head) const {
        return window_latent_rows<Inner>(bases_.make_head(std::move(inner), config, layer, kv_head),
                                         dense_rows(config.storage, config.head_dim, config.resource));
    }

    // Everything but the newest `window` tokens moves into the latents.
    template <class Layer, class Store>
    std::optional<Store> project(const Layer& layer, std::size_t, const Store& from) const {
        const std::size_t recent = from.window().tokens();
        if (recent <= window_) return std::nullopt;
        return from.moved(layer.kernels(), recent - window_);
    }

private:
    pca bases_;
    std::size_t window_;
};

} // namespace kvc::project
