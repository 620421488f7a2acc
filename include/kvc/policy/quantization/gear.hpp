// kvc/policy/quantization/gear.hpp -- GEAR (docs/METHODS.md Q7): X = Q(D) + L + S.
//
// What it is. Each key and value row x_t is split three ways:
//   S  sparse outliers: per token the largest and the smallest values, kept
//      exactly (fp16 value + channel index);
//   D  the rest (x_t with the outlier channels set to 0), quantized per token
//      with a Q1 block format (int4_asym or int2_asym, groups of G);
//   L  a rank-r approximation of the quantization error R = D - Q(D), by power
//      iteration over a chunk of n_b tokens: L = A B with A (n_b x r) and B (r x dim).
// A stored row is Q(d_t) + A_t B + S_t; attention runs on these parts without
// rebuilding any row (kernels/quant/gear.hpp has the fused kernel).
// Source: Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for
// Near-Lossless Generative Inference of LLM" (2024): sparsity ratio s = 2%,
// rank 2-4, 3 power iterations, streaming in chunks with an fp16 buffer;
// reported near-lossless at 4 bits.
//
//   kvc::quant::gear{}                                  4 bits, G = 32, s = 2%, r = 2, n_b = 64
//   kvc::quant::gear{2}                                 2 bits
//   kvc::quant::gear g; g.rank = 4; g.chunk_tokens = 128;
//
// Parameters chosen where the source is open (or where kvc differs):
// - s is the fraction of each token's elements held in S (the paper's
//   sparsity ratio), half taken from the top and half from the bottom of the
//   token's values (signed: both ends of the range an asymmetric quantizer must
//   cover): outliers_per_side = round(s * dim / 2), at least 1 when s > 0.
//   head_dim 128, s = 2%: 1 + 1 per row (1.6% of the elements); dim 256: 3 + 3.
//   Outliers are per token, for keys and values alike (the paper's
//   per-channel key grouping, KIVI-style, is Q2's business; here Q(D) reuses
//   the per-token Q1 rows).
// - S entries are (uint16 channel, fp16 value): 4 bytes each. D holds 0 at
//   the outlier channels, so S is added, not substituted (x = Q(D) + L + S
//   holds at every element, as in the paper).
// - Quantized part: bits 4 -> int4_asym, 2 -> int2_asym (8 -> int8_sym is
//   accepted too), groups of G = 32, 64 or 128 along the head dim, the Q1
//   rounding rules (docs/QUANTIZATION.md).
// - Streaming: the newest tokens wait in fp16 (exactly as full_cache stores
//   them) until chunk_tokens n_b (default 64, 4..256) of them are there; the
//   chunk is then compressed at once, inside the append that fills it. A
//   sequence of T tokens holds T mod n_b (or fewer, after eviction) in fp16.
// - Power iteration: subspace iteration in double (P = orth(R Q), Q = R^T P,
//   modified Gram-Schmidt) from a fixed pseudo-random start (splitmix64, fixed
//   seed), `iterations` (3) rounds, so encoding is deterministic and the same
//   on every instruction set. The residual rows are recomputed from the fp16
//   buffer and the packed rows in each round (no workspace: the append that
//   compresses is noexcept).
// - Factors in fp16: B_c (r x dim per chunk, per key and value) and A_t (r per
//   token). Each component is balanced (A scaled by sqrt of its norm, B
//   divided by it) so both stay in fp16's normal range; a component fp16
//   cannot hold is dropped (set to 0), leaving that chunk with Q + S only.
// - Eviction: keep() is exact. Q(d_t), S_t and A_t move with their token, and
//   a chunk keeps its B_c while any of its tokens remain; nothing is re-encoded.
// - NaN or +-Inf in an appended row: in the fp16 buffer it is what full_cache
//   would store. When its chunk is compressed, the row gets no outliers (empty
//   S entries), its Q1 groups holding a non-finite value decode to NaN (the
//   Q1 rule), its residual is excluded from the power iteration (treated as 0),
//   and its A_t is 0: the other tokens of the chunk get the same factors as if
//   that row were clean, except for their own finite error. Attention of the
//   KV head holding it returns NaN; evicting the token restores finite outputs.
//   fp32 input beyond fp16's range becomes +-Inf in the buffer.
//
// Memory per compressed token (dim d, G, r, o = 2 * outliers_per_side):
//   2 * (d / G * group bytes of the format) + 2 * (4 o + 2 r) bytes,
// per chunk 4 + 4 r d bytes, and the fp16 buffer 4 d bytes per token slot
// (capacity n_b). d = 128, G = 32, r = 2, o = 2, n_b = 64, averaged over K and V:
//   4 bits: 5.0 (Q) + 0.75 (S, A) + 0.502 (B, count) = 6.25 bits/value
//   2 bits: 3.0 + 0.75 + 0.502 = 4.25 bits/value
// (S costs 0.5, A 0.25 of those 0.75: the overhead is the price of the
// fidelity gain over the plain Q1 format, see docs/QUANTIZATION.md.)
#pragma once

#include <cmath>
#include <cstddef>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/gear_rows.hpp"

namespace kvc::quant {

struct gear {
    using family = quantization_family;
    using head_storage = gear_rows;

    unsigned bits = 4;                // of the quantized part: 4 or 2 (asymmetric), or 8 (symmetric)
    std::size_t group_size = 32;      // 32, 64 or 128
    double outlier_fraction = 0.02;   // s: fraction of each row kept exactly, half per end, 0 .. 0.25
    std::size_t rank = 2;             // r: 0 (no low-rank part) .. 4
    std::size_t chunk_tokens = 64;    // n_b: 4 .. 256
    std::size_t iterations = 3;       // power iterations per chunk, 1 .. 16

    // Per row: this many largest and as many smallest values go to S.
    std::size_t outliers_per_side(std::size_t dim) const noexcept {
        if (!(outlier_fraction > 0.0)) return 0;
        const double per_side = std::round(outlier_fraction * static_cast<double>(dim) / 2.0);
        return per_side < 1.0 ? 1 : static_cast<std::size_t>(per_side);
    }

    // The storage layout for head dim `dim`; throws kvc::error for unsupported parameters.
    gear_layout layout(std::size_t dim) const {
        detail::require(bits == 2 || bits == 4 || bits == 8,
                        "kvc::quant::gear: expected bits 2, 4 or 8 for the quantized part, got ", bits);
        detail::require(outlier_fraction >= 0.0 && outlier_fraction <= 0.25,
                        "kvc::quant::gear: expected outlier_fraction in 0..0.25, got ", outlier_fraction);
        gear_layout l;
        l.format = bits == 8 ? kernels::quant_format::int8_sym
                             : (bits == 4 ? kernels::quant_format::int4_asym : kernels::quant_format::int2_asym);
        l.group_size = group_size;
        l.outliers_per_side = outliers_per_side(dim);
        l.rank = rank;
        l.chunk_tokens = chunk_tokens;
        l.iterations = iterations;
        detail::validate_gear_layout(l, dim, "kvc::quant::gear");
        return l;
    }

    void validate(const cache_config& config) const { (void)layout(config.head_dim); }

    head_storage make_head(const cache_config& config) const {
        return gear_rows(layout(config.head_dim), config.head_dim, config.resource, "kvc::quant::gear");
    }

    // Bits per stored element of a compressed token, key and value averaged,
    // chunk factors shared over full chunks (the fp16 buffer not included).
    double bits_per_value(std::size_t dim) const {
        const gear_layout l = layout(dim);
        const double per_token = static_cast<double>(l.compressed_token_bytes(dim)) +
                                 static_cast<double>(l.chunk_bytes(dim)) / static_cast<double>(l.chunk_tokens);
        return 8.0 * per_token / (2.0 * static_cast<double>(dim));
    }
};

} // namespace kvc::quant
