// kvc/policy/quantization/block.hpp -- Q1 block formats (with Q5 separate key/value formats and Q9 sinks).
//
// What it is. Every key and value row is quantized per token in groups of G
// consecutive elements along the head dim; each group stores an fp16 scale
// (and, for the asymmetric formats, an fp16 minimum) and G codes. Attention
// runs directly on the packed rows (kernels/quant/simd.hpp): scores on packed
// keys, the weighted sum over packed values, widened in registers only.
// Source: the block formats of llama.cpp/ggml (q8_0, q4_0, q4_1: reported
// q8_0 K and V cache perplexity 6.2322 -> 6.2344), generalised to other bit
// widths, fp8 and G = 64, 128; docs/METHODS.md Q1, Q5 (separate key and value bit
// widths: keys usually need more) and Q9 (the first n tokens in fp16).
//
//   kvc::quant::q4_0                                    int4 symmetric, G = 32, ggml's block_q4_0 bytes
//   kvc::quant::block<kvc::quant::int8_sym, 64>         one format for keys and values
//   kvc::quant::block_kv<kvc::quant::int4_sym,
//                        kvc::quant::int2_asym, 32>     keys 4 bits, values 2 bits (Q5)
//   kvc::quant::block<kvc::quant::int4_sym, 32, 4>      the first 4 tokens of every head in fp16 (Q9)
//
// Layouts (bytes per group of G; bits per value = 8 * bytes / G):
//
//   format      group bytes       G = 32        G = 64        G = 128       G = 32 equals
//   int8_sym    2 + G             34: 8.5 b/v   66: 8.25      130: 8.125    ggml block_q8_0
//   int4_sym    2 + G/2           18: 4.5       34: 4.25      66: 4.125     ggml block_q4_0
//   int4_asym   4 + G/2           20: 5.0       36: 4.5       68: 4.25      ggml block_q4_1
//   int2_asym   4 + G/4           12: 3.0       20: 2.5       36: 2.25      (kvc)
//   fp8_e4m3    2 + G             34: 8.5       66: 8.25      130: 8.125    (kvc)
//   fp8_e5m2    2 + G             34: 8.5       66: 8.25      130: 8.125    (kvc)
//
// The byte order inside a group and the rounding rules are documented in
// kernels/quant/format.hpp and kernels/quant/common.hpp (and docs/QUANTIZATION.md).
//
// Parameters chosen where the sources leave them open:
// - Scales are stored in fp16 rounded *up* in magnitude (and the asymmetric
//   minimum rounded down), then values are quantized against the stored
//   scale: every element is within d / 2 of its code (q4_0's clamped opposite
//   extreme within d), and every instruction set produces the same bytes.
// - fp8 groups carry an fp16 scale (amax / 448 for e4m3, amax / 57344 for
//   e5m2) so each group uses the top of the fp8 range; rounding is to nearest
//   even with saturation to the largest finite value.
// - NaN or Inf in an appended row: the group that holds it gets a NaN scale
//   and decodes to NaN (attention over that head then yields NaN, as
//   full_cache would); no other group, row or token is touched, and evicting
//   the token (keep) restores finite outputs. compressed_cache::append calls
//   the noexcept push_back directly, so rejecting such input with kvc::error
//   would need a scan in the cache before anything is stored.
// - Key scores against the integer formats use the query quantized to int8
//   per 32 elements (as llama.cpp's q8 activations; the rule and its error
//   bound are in kernels/quant/common.hpp, quantize_query): d = max|q| / 127,
//   c = RNE(q * 127 / max|q|), and per 32-element payload an exact integer
//   dot product of key codes and c, then the scales in fp32. That is what
//   lets AVX-512 VNNI score 64 byte products per instruction; every other
//   instruction set and the scalar reference compute the same scores (the
//   float kernels against the dequantized query d c). The score moves from
//   the fp32-query score by at most |scale| sum_p (max_p|q| / 254) sum_p |k|
//   (+ a few ulps): for N(0, 1) queries ~0.4% of |scale| sum |q k|, below the
//   4-bit key error. fp8 keys, the fp16 sink rows and all values are unaffected.
// - Sink tokens are a template parameter (default 0): compressed_cache builds
//   every head with the static make_head(config), which cannot see a policy
//   object. packed_rows takes the count at run time for direct users.
#pragma once

#include <cstddef>
#include <type_traits>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/packed_rows.hpp"

namespace kvc::quant {

// The quantized-query buffers of the attention kernels hold any head dim a cache accepts.
static_assert(kernels::quant_common::query_max_dim >= max_head_dim,
              "kernels/quant/common.hpp: query_max_dim must cover cache_config's max_head_dim");

// Format tags.
struct int8_sym {
    static constexpr kernels::quant_format format = kernels::quant_format::int8_sym;
};
struct int4_sym {
    static constexpr kernels::quant_format format = kernels::quant_format::int4_sym;
};
struct int4_asym {
    static constexpr kernels::quant_format format = kernels::quant_format::int4_asym;
};
struct int2_asym {
    static constexpr kernels::quant_format format = kernels::quant_format::int2_asym;
};
struct fp8_e4m3 {
    static constexpr kernels::quant_format format = kernels::quant_format::fp8_e4m3;
};
struct fp8_e5m2 {
    static constexpr kernels::quant_format format = kernels::quant_format::fp8_e5m2;
};

template <class T>
inline constexpr bool is_block_format_v =
    std::is_same_v<T, int8_sym> || std::is_same_v<T, int4_sym> || std::is_same_v<T, int4_asym> ||
    std::is_same_v<T, int2_asym> || std::is_same_v<T, fp8_e4m3> || std::is_same_v<T, fp8_e5m2>;

// The format for an integer bit width chosen at run time: 8 (symmetric), 4
// (symmetric or asymmetric), 2 (asymmetric). Throws kvc::error otherwise.
inline kernels::quant_format integer_format(unsigned bits, bool symmetric) {
    if (bits == 8 && symmetric) return kernels::quant_format::int8_sym;
    if (bits == 4) return symmetric ? kernels::quant_format::int4_sym : kernels::quant_format::int4_asym;
    if (bits == 2 && !symmetric) return kernels::quant_format::int2_asym;
    detail::fail("kvc::quant::integer_format: expected 8 bits symmetric, 4 bits (either) or 2 bits asymmetric, got ",
                 bits, " bits ", symmetric ? "symmetric" : "asymmetric");
}

template <class KeyFormat, class ValueFormat, std::size_t GroupSize = 32, std::size_t SinkTokens = 0>
struct block_kv {
    static_assert(is_block_format_v<KeyFormat> && is_block_format_v<ValueFormat>,
                  "kvc::quant::block_kv: formats must be int8_sym, int4_sym, int4_asym, int2_asym, fp8_e4m3 or fp8_e5m2");
    static_assert(GroupSize == 32 || GroupSize == 64 || GroupSize == 128,
                  "kvc::quant::block_kv: the group size must be 32, 64 or 128");

    using family = quantization_family;
    using key_format = KeyFormat;
    using value_format = ValueFormat;
    using head_storage = packed_rows;
    static constexpr std::size_t group_size = GroupSize;
    static constexpr std::size_t sink_tokens = SinkTokens;

    static constexpr packed_layout layout() noexcept {
        packed_layout l;
        l.key_format = KeyFormat::format;
        l.value_format = ValueFormat::format;
        l.group_size = GroupSize;
        l.sink_tokens = SinkTokens;
        return l;
    }

    // Bits per stored key (value) element, scales and minimums included.
    static constexpr double key_bits_per_value() noexcept {
        return 8.0 * static_cast<double>(kernels::info_of(KeyFormat::format).group_bytes(GroupSize)) / GroupSize;
    }
    static constexpr double value_bits_per_value() noexcept {
        return 8.0 * static_cast<double>(kernels::info_of(ValueFormat::format).group_bytes(GroupSize)) / GroupSize;
    }

    // Called by compressed_cache's constructor for every (layer, KV head):
    // throws kvc::error when the head dim is not a multiple of the group size.
    static head_storage make_head(const cache_config& config) {
        return packed_rows(layout(), config.head_dim, config.resource, "kvc::quant::block");
    }
};

template <class Format, std::size_t GroupSize = 32, std::size_t SinkTokens = 0>
using block = block_kv<Format, Format, GroupSize, SinkTokens>;

// llama.cpp's names for the G = 32 layouts.
using q8_0 = block<int8_sym, 32>;
using q4_0 = block<int4_sym, 32>;
using q4_1 = block<int4_asym, 32>;

} // namespace kvc::quant
