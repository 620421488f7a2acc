// kvc/policy/quantization/kvquant.hpp -- Q3 KVQuant: pre-RoPE per-channel non-uniform keys, dense-and-sparse.
//
// What it is (Hooper et al., "KVQuant: Towards 10 Million Context Length LLM
// Inference with KV Cache Quantization", 2024; docs/METHODS.md Q3):
// - Keys are quantized BEFORE RoPE (the rotation mixes channel pairs and
//   smears the per-channel outlier structure), per channel, with ranges
//   calibrated offline per (layer, KV head, channel); RoPE is applied inside
//   attention at each token's position.
// - Elements are normalised to [-1, 1] and coded with a non-uniform codebook
//   of 2^b centroids per layer (b = 2, 3, 4) learned by k-means on normalised
//   calibration data.
// - Dense-and-sparse: key elements outside the calibrated range (about the
//   top 1% magnitudes) are kept exactly in a per-token sparse list and
//   excluded from the dense code.
// - Values per token; the first few tokens (attention sinks) in fp16.
// Reported: < 0.1 perplexity loss at 3 bits (LWM-7B 8.90 fp16, 9.22 3-bit).
//
// POSITIONS CONTRACT (read this). The head storage declares
// `wants_positions`; compressed_cache passes each token's position to it.
// The engine must append keys BEFORE RoPE to a cache using this codec (the
// codec rotates them at the stored position inside attention); queries are
// given after RoPE, as always. Positions come from append's first_position.
//
//   auto a = kvc::calibration::calibrate_kvquant(config, sample_keys, sample_values, {3});
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::kvquant, kvc::project::none>
//       cache(config, {}, {}, kvc::quant::kvquant(a, rope));
//
// Choices where the paper is silent or needs gradients:
// - Ranges: the [f/2, 1 - f/2] quantiles per channel (calibration/kvquant.hpp);
//   k-means unweighted (the paper's Fisher weighting needs gradients).
// - Values: per token, normalised by the token's midpoint and half-range
//   (both fp32 per token) and coded with a per-layer non-uniform codebook
//   learned the same way (k-means on normalised calibration values); no
//   sparse list for values.
// - Outliers: at most max_outliers_per_token per token (default: 4 * f * dim
//   rounded up, at least 2) so an append can reserve its worst case and
//   push_back never allocates; beyond that the largest excesses are kept and
//   the rest are clamped to the range edge in the dense code. Each outlier is
//   a u16 stored channel index and the fp32 value (exact for f32, f16, bf16
//   input), with one u32 CSR end offset per token.
// - Sinks (default 1, as the paper keeps the first token) are stored after
//   RoPE in fp16 and attended by the fp16 kernel.
// - RoPE inside attention: the dequantized key row (a stack row of dim
//   floats, reused) is rotated in float by cos/sin carried from token to
//   token by an angle-addition recurrence in double, re-anchored with trig
//   after a position gap and every 1024 tokens (kernels/quant/kvquant_simd.hpp).
//   The scalar reference evaluates cos/sin per token, as kernels::rope_rotate.
// - NaN/Inf in appended data: see kvquant_head::push_back (only that token
//   is affected; a NaN key element is an exact outlier, a NaN value makes the
//   token's value row NaN; attention over the head is then NaN, as
//   full_cache's would be, until the token is evicted).
// - Eviction works (keep compacts codes, outliers and positions); B10 key
//   re-rotation is not offered (no store_key).
//
// Bits per stored token of the body (dim d, b bits, o outliers per token on average):
//   2 * d * b / 8 (codes) + 8 (value offset, half-range) + 4 (outlier end) + 4 (position) + 6 * o
//   e.g. d = 128, b = 3, o = 1.28: 120 bytes = 3.75 bits per key/value element;
// per head once: (2d + 32) * 4 + 3 * (rotary/2) * 8 + 2d bytes of parameters.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/kvquant_head.hpp"

namespace kvc::quant {

class kvquant {
public:
    using family = quantization_family;
    using head_storage = kvquant_head;

    // Throws kvc::error when the artifact is not a consistent "kvquant" artifact
    // (kind, tensors and shapes, bits, finite ascending codebooks, lower <= upper).
    // max_outliers_per_token 0 picks the default (see above).
    explicit kvquant(calibration::artifact artifact, rope_config rope = {}, std::size_t sink_tokens = 1,
                     std::size_t max_outliers_per_token = 0)
        : rope_(rope), sinks_(sink_tokens), max_outliers_(max_outliers_per_token) {
        detail::require(artifact.kind == "kvquant", "kvc::quant::kvquant: expected a calibration artifact of kind ",
                        "'kvquant', got '", artifact.kind, "'");
        const float b = artifact.get("bits", {1}).values[0];
        detail::require(b == 2.0f || b == 3.0f || b == 4.0f, "kvc::quant::kvquant: expected bits 2, 3 or 4, got ", b);
        bits_ = static_cast<unsigned>(b);
        fraction_ = artifact.get("outlier_fraction", {1}).values[0];
        detail::require(fraction_ >= 0.0 && fraction_ < 0.5,
                        "kvc::quant::kvquant: expected outlier_fraction in [0, 0.5), got ", fraction_);
        const calibration::tensor* lower = nullptr;
        for (const calibration::tensor& t : artifact.tensors)
            if (t.name == "key_lower") lower = &t;
        detail::require(lower != nullptr && lower->shape.size() == 3,
                        "kvc::quant::kvquant: expected tensor 'key_lower' of shape [layers][kv_heads][head_dim]");
        layers_ = static_cast<std::size_t>(lower->shape[0]);
        heads_ = static_cast<std::size_t>(lower->shape[1]);
        dim_ = static_cast<std::size_t>(lower->shape[2]);
        const std::size_t book = std::size_t{1} << bits_;
        lower_ = artifact.get("key_lower", {layers_, heads_, dim_}).values;
        upper_ = artifact.get("key_upper", {layers_, heads_, dim_}).values;
        key_book_ = artifact.get("key_codebook", {layers_, book}).values;
        value_book_ = artifact.get("value_codebook", {layers_, book}).values;
        for (std::size_t i = 0; i < lower_.size(); ++i)
            detail::require(std::isfinite(lower_[i]) && std::isfinite(upper_[i]) && lower_[i] <= upper_[i],
                            "kvc::quant::kvquant: expected finite key ranges with lower <= upper; entry ", i, " is [",
                            lower_[i], ", ", upper_[i], "]");
        for (const std::vector<float>* books : {&key_book_, &value_book_})
            for (std::size_t i = 0; i < books->size(); ++i)
                detail::require(std::isfinite((*books)[i]) && (i % book == 0 || (*books)[i - 1] <= (*books)[i]),
                                "kvc::quant::kvquant: expected finite ascending codebooks; entry ", i, " is ",
                                (*books)[i]);
    }

    unsigned bits() const noexcept { return bits_; }
    double outlier_fraction() const noexcept { return fraction_; }
    std::size_t sink_tokens() const noexcept { return sinks_; }
    const rope_config& rope() const noexcept { return rope_; }
    // The outlier cap per token for a head dim.
    std::size_t max_outliers_per_token(std::size_t dim) const noexcept {
        if (max_outliers_) return max_outliers_;
        const auto automatic = static_cast<std::size_t>(std::ceil(4.0 * fraction_ * static_cast<double>(dim)));
        const std::size_t at_least = automatic < 2 ? 2 : automatic;
        return at_least < dim ? at_least : dim;
    }

    // Called by compressed_cache's constructor: the artifact must match the
    // cache's layers, KV heads and head dim; head_dim a multiple of 8; RoPE's
    // rotary_dims even and <= head_dim; at most max_sink_tokens sinks; the
    // outlier cap <= head_dim.
    void validate(const cache_config& config) const {
        detail::require(config.layers == layers_ && config.kv_heads == heads_ && config.head_dim == dim_,
                        "kvc::quant::kvquant: the artifact is for ", layers_, " layers x ", heads_,
                        " KV heads x head_dim ", dim_, ", the cache has ", config.layers, " x ", config.kv_heads,
                        " x ", config.head_dim);
        detail::require(dim_ % 8 == 0, "kvc::quant::kvquant: expected head_dim a multiple of 8, got ", dim_);
        detail::validate_rope(rope_, dim_, "kvc::quant::kvquant");
        detail::require(sinks_ <= max_sink_tokens, "kvc::quant::kvquant: expected sink_tokens at most ",
                        max_sink_tokens, " (the first few tokens), got ", sinks_);
        detail::require(max_outliers_ <= dim_, "kvc::quant::kvquant: expected max_outliers_per_token <= head_dim ", dim_,
                        ", got ", max_outliers_);
    }

    head_storage make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        validate(config);
        detail::require(layer < layers_ && kv_head < heads_, "kvc::quant::kvquant::make_head: expected layer < ",
                        layers_, " and kv_head < ", heads_, ", got ", layer, " and ", kv_head);
        const std::size_t book = std::size_t{1} << bits_;
        kvquant_head_params p;
        p.bits = bits_;
        p.dim = dim_;
        p.key_lower = lower_.data() + (layer * heads_ + kv_head) * dim_;
        p.key_upper = upper_.data() + (layer * heads_ + kv_head) * dim_;
        p.key_codebook = key_book_.data() + layer * book;
        p.value_codebook = value_book_.data() + layer * book;
        p.rope = rope_;
        p.sink_tokens = sinks_;
        p.max_outliers = max_outliers_per_token(dim_);
        p.outlier_fraction = fraction_;
        return head_storage(p, config.resource);
    }

private:
    rope_config rope_;
    std::size_t sinks_, max_outliers_;
    unsigned bits_ = 3;
    double fraction_ = 0.0;
    std::size_t layers_ = 0, heads_ = 0, dim_ = 0;
    std::vector<float> lower_, upper_, key_book_, value_book_;
};

} // namespace kvc::quant
