// kvc/policy/quantization/mixed.hpp -- Q6 mixed precision by importance (MiKV, ZipCache).
//
// What it is. Instead of evicting unimportant tokens, keep them at low
// precision: a scorer (any of policy/eviction's, or the engine's own numbers)
// ranks the tokens of a head, the most important fraction is stored in a high
// precision block format and the rest in a low one. Sources: MiKV ("No Token
// Left Behind", Yang et al. 2024: evicted-candidate tokens kept at low
// precision, important ones high) and ZipCache (He et al. 2024: saliency
// decides each token's bit width); reported 4.98x smaller cache with 0.38%
// accuracy drop (Mistral-7B, GSM8k); docs/METHODS.md Q6.
//
//   using codec = kvc::quant::mixed<kvc::quant::int8_sym, kvc::quant::int2_asym, 32>;
//   kvc::compressed_cache<evict::none, merge::none, codec, project::none> cache(config, {}, {}, codec(0.2));
//   ... cache.assign_precision(layer, kv_head, scores);   // scores: tokens(layer, kv_head) floats, higher = keep
//
// Storage: storage/mixed_rows.hpp (two packed bodies in the Q1 formats and a
// token -> row map of 4 bytes per token). Bytes of a head holding n tokens
// after an assignment (exact reserve):
//   ceil(f n) * 2 * row(High) + (n - ceil(f n)) * 2 * row(Low) + 4 n,
//   row(F) = dim / G * group bytes of F (block.hpp's table).
//
// Choices where the sources are silent:
// - The split is made when the engine calls assign_precision (the hook of
//   compressed_cache), with whatever scores it likes; the codec has no
//   scorer of its own. Tokens appended later arrive in the high format (they
//   are the recent window) and stay there until the next assignment.
// - ceil(f n) tokens go high (f = high_fraction in [0, 1], run time); ties
//   in score go to the more recent token; NaN scores are rejected (kvc::error,
//   head unchanged); +-Inf are ordinary extremes.
// - Re-encoding starts from the stored values: a row that keeps its format
//   keeps its bytes, a demoted row is the low format of its high-format
//   values, and a promoted row is the high format of its low-format values (it
//   does not regain the precision it lost). Keeping the original would cost
//   fp16 rows for every token, which is what this codec exists to avoid.
// - Attention runs the fused packed kernel over the high rows, then the low
//   rows, in one running state; logits and biases are indexed by token.
// - NaN/Inf in appended rows: as the block formats (only the affected group
//   of that row decodes to NaN; block.hpp).
// - Keys and values of a token share its format. No sink tokens.
#pragma once

#include <cstddef>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/mixed_rows.hpp"

namespace kvc::quant {

template <class HighFormat, class LowFormat, std::size_t GroupSize = 32>
struct mixed {
    static_assert(is_block_format_v<HighFormat> && is_block_format_v<LowFormat>,
                  "kvc::quant::mixed: formats must be int8_sym, int4_sym, int4_asym, int2_asym, fp8_e4m3 or fp8_e5m2");
    static_assert(GroupSize == 32 || GroupSize == 64 || GroupSize == 128,
                  "kvc::quant::mixed: the group size must be 32, 64 or 128");

    using family = quantization_family;
    using head_storage = mixed_rows;
    using high_format = HighFormat;
    using low_format = LowFormat;
    static constexpr std::size_t group_size = GroupSize;

    double high_fraction = 0.2; // share of each head's tokens stored high after an assignment

    mixed() = default;
    explicit mixed(double fraction) noexcept : high_fraction(fraction) {}

    // Bits per stored element (scales included) of each format.
    static constexpr double high_bits_per_value() noexcept {
        return 8.0 * static_cast<double>(kernels::info_of(HighFormat::format).group_bytes(GroupSize)) / GroupSize;
    }
    static constexpr double low_bits_per_value() noexcept {
        return 8.0 * static_cast<double>(kernels::info_of(LowFormat::format).group_bytes(GroupSize)) / GroupSize;
    }

    void validate(const cache_config& config) const {
        detail::require(high_fraction >= 0.0 && high_fraction <= 1.0,
                        "kvc::quant::mixed: expected a high-precision fraction in [0, 1], got ", high_fraction);
        detail::require(config.head_dim % GroupSize == 0, "kvc::quant::mixed: expected head_dim a multiple of the group size ",
                        GroupSize, ", got head_dim ", config.head_dim);
    }

    head_storage make_head(const cache_config& config) const {
        validate(config);
        return mixed_rows(HighFormat::format, LowFormat::format, GroupSize, config.head_dim, high_fraction,
                          config.resource, "kvc::quant::mixed");
    }
};

} // namespace kvc::quant
