// kvc/policy/quantization/kivi.hpp -- Q2 KIVI: keys quantized per channel, values per token,
// newest tokens in an fp16 residual window.
//
// Source: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
// KV Cache" (ICML 2024). Key outliers sit in a few fixed channels, so KIVI
// groups keys along tokens (each channel of a block of G tokens gets its own
// scale and minimum), which keeps one large channel from costing the other
// channels their resolution; values have no such structure and are grouped
// per token along channels. Both are asymmetric (scale and minimum), 2 or 4
// bits. The newest tokens stay in full precision until a key group is full.
//
//   kvc::quant::kivi<Bits, G = 32, R = 128, Sinks = 0>
//
// Choices where the paper leaves room (storage/kivi_rows.hpp has the details):
// - One group size G for both: G tokens per key block and G channels per
//   value group (the paper uses 32 for both); G = 32, 64 or 128, head dim a
//   multiple of G.
// - Residual: every token enters an fp16 window (stored as full_cache stores
//   it); when an append leaves R + G tokens there, the oldest G become one key
//   block and G packed value rows. At most R + G - 1 tokens are in fp16
//   between calls (the paper quantizes keys R at a time with R a multiple of
//   G; forming G at a time keeps the window at R..R+G-1 tokens once full).
//   Keys and values wait together, as in the paper's implementation.
// - Ranges are computed from the fp16 residual rows (the stored values), with
//   the scale rounding of kernels/quant/common.hpp: the minimum rounded down
//   and the scale rounded up to fp16, so every element is within d / 2.
// - Optional Q9 sinks: the first Sinks tokens stay in fp16 (as block.hpp).
// - Eviction re-blocks the kept tokens (kivi_rows::compacted).
//
// Bits per value (scales and minimums included, residual and sinks not):
// keys Bits + 32 / G (fp16 scale and minimum per channel and G tokens),
// values Bits + 32 / G: with G = 32, 5 bits (4-bit) and 3 bits (2-bit).
//
// Attention (kernels/quant/kivi_simd.hpp) reads the packed form directly: per
// block it folds the query into the per-channel scales once, so each key
// costs one FMA per element on its widened codes; values go through the
// packed-row kernels of Q1.
#pragma once

#include <cstddef>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/kivi_rows.hpp"

namespace kvc::quant {

template <int Bits, std::size_t GroupSize = 32, std::size_t Residual = 128, std::size_t SinkTokens = 0>
struct kivi {
    static_assert(Bits == 2 || Bits == 4, "kvc::quant::kivi: Bits must be 2 or 4");
    static_assert(GroupSize == 32 || GroupSize == 64 || GroupSize == 128,
                  "kvc::quant::kivi: the group size must be 32, 64 or 128");

    using family = quantization_family;
    using head_storage = kivi_rows;
    static constexpr int bits = Bits;
    static constexpr std::size_t group_size = GroupSize;
    static constexpr std::size_t residual = Residual;
    static constexpr std::size_t sink_tokens = SinkTokens;
    static constexpr kernels::quant_format format =
        Bits == 4 ? kernels::quant_format::int4_asym : kernels::quant_format::int2_asym;

    static constexpr kivi_layout layout() noexcept {
        kivi_layout l;
        l.format = format;
        l.group_size = GroupSize;
        l.residual = Residual;
        l.sink_tokens = SinkTokens;
        return l;
    }

    // Bits per stored key (value) element, scales and minimums included.
    static constexpr double key_bits_per_value() noexcept { return Bits + 32.0 / GroupSize; }
    static constexpr double value_bits_per_value() noexcept {
        return 8.0 * static_cast<double>(kernels::info_of(format).group_bytes(GroupSize)) / GroupSize;
    }

    // Called by compressed_cache's constructor for every (layer, KV head):
    // throws kvc::error unless the head dim is a multiple of the group size (and at most 1024).
    head_storage make_head(const cache_config& config) const {
        return kivi_rows(layout(), config.head_dim, config.resource, "kvc::quant::kivi");
    }
};

} // namespace kvc::quant
