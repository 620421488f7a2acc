// kvc/kernels/quant/kvquant_problem.hpp -- arguments of the KVQuant (Q3) kernels and their table section.
//
// The stored form of one KV head (storage/kvquant_rows.hpp, policy/quantization/kvquant.hpp):
//
// - Keys are stored *before* RoPE, in "stored channel order": for a rotary
//   part of R channels (P = R / 2 pairs) stored channel i < P is the first
//   element of pair i, stored channel P + i its second element, and channels
//   R .. dim-1 (not rotated) follow unchanged. For split-half RoPE (HF Llama)
//   that is the natural order; for interleaved RoPE (pairs 2i, 2i+1) it
//   gathers the even channels first. `channel_of[s]` is the natural channel of
//   stored channel s. With this order the rotation of a key is two contiguous
//   vectors per batch of pairs, whatever the RoPE convention.
// - Codes: `bits` (2, 3 or 4) per element, packed by groups of 8 elements in
//   `bits` bytes: element j of a group holds bits [j * bits, j * bits + bits)
//   of the group's little-endian word. A row is dim * bits / 8 bytes; key and
//   value rows have the same size. Buffers keep kvquant_code_slack readable
//   bytes after the last row, so a kernel may load 4 bytes at any group.
// - Key element s of token t (pre-RoPE) = key_offset[s] + key_scale[s] *
//   key_codebook[code], unless (t, s) is in the outlier list, where it is
//   outlier_value exactly. The outliers of token t are entries
//   [t ? outlier_end[t - 1] : 0, outlier_end[t]) (CSR), each a stored channel
//   index and an fp32 value.
// - Value element d of token t (natural order) = value_params[2t] +
//   value_params[2t + 1] * value_codebook[code] (offset and half-range of the
//   token, fp32).
// - The post-RoPE key of token t rotates pair i by positions[t] * rope_frequency[i].
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/kernels/problem.hpp"

namespace kvc::kernels {

// Codebooks are padded to this many floats (a 4-bit book fills one AVX-512 register).
inline constexpr std::size_t kvquant_codebook_slots = 16;
// Largest head dim the kernels take (stack buffers; equals kvc::max_head_dim).
inline constexpr std::size_t kvquant_max_dim = 1024;
// Readable bytes after the last packed row (a 4-byte load at the last group).
inline constexpr std::size_t kvquant_code_slack = 4;

struct kvquant_rows {
    const unsigned char* key_codes = nullptr;   // row t at key_codes + t * row_bytes
    const unsigned char* value_codes = nullptr; // row t at value_codes + t * row_bytes
    std::size_t row_bytes = 0;                  // dim * bits / 8
    unsigned bits = 3;                          // 2, 3 or 4
    const float* value_params = nullptr;        // [t][2]: offset, half-range
    const std::int32_t* positions = nullptr;    // [t]
    const std::uint32_t* outlier_end = nullptr; // [t], CSR exclusive end
    const std::uint16_t* outlier_channel = nullptr;
    const float* outlier_value = nullptr;
    const float* key_codebook = nullptr;   // kvquant_codebook_slots floats, ascending
    const float* value_codebook = nullptr; // kvquant_codebook_slots floats, ascending
    const float* key_scale = nullptr;      // [dim], stored order
    const float* key_offset = nullptr;     // [dim], stored order
    const std::uint16_t* channel_of = nullptr; // [dim]: natural channel of stored channel s
    std::size_t rotary_pairs = 0;
    const double* rope_frequency = nullptr; // [rotary_pairs], radians per position
    const double* rope_step = nullptr;      // [2][rotary_pairs]: cos and sin of rope_frequency
};

// Decode attention of one KV head for its query group over the first `tokens`
// rows of `rows`. Queries (natural channel order) as decode_problem; bias and
// logits are indexed from this problem's first token.
struct kvquant_decode_problem : decode_queries {
    // Queries: dim a multiple of 8, at most kvquant_max_dim; bias [tokens].
    kvquant_rows rows;
    std::size_t tokens = 0;
};

// The KVQuant section of a kernel_table.
struct kvquant_kernels {
    // Folds the rows into `state` (no dequantized row is written to memory
    // beyond one key row in a stack buffer; see kernels/quant/kvquant_simd.hpp).
    void (*attend_partial)(const kvquant_decode_problem&, const decode_state&) noexcept;
};

// The code of element `s` of a packed row (scalar; every kernel uses this rule).
template <class A>
inline unsigned kvquant_code(const unsigned char* row, std::size_t s, unsigned bits) noexcept {
    const unsigned char* group = row + (s / 8) * bits;
    std::uint32_t word = 0;
    for (unsigned b = 0; b < bits; ++b) word |= static_cast<std::uint32_t>(group[b]) << (8 * b);
    return (word >> ((s % 8) * bits)) & ((1u << bits) - 1u);
}

} // namespace kvc::kernels
