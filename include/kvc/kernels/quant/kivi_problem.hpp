// kvc/kernels/quant/kivi_problem.hpp -- the KIVI (Q2) layout, kernel arguments and table section.
//
// KIVI quantizes keys per channel and values per token. One KV head holds, in
// token order:
//
//   sink (fp16 rows)   key blocks + value rows (packed)   residual (fp16 rows)
//   t < s              s <= t < s + quantized              the newest tokens
//
// A key block covers G consecutive tokens (G = 32, 64 or 128) and all `dim`
// channels; each channel has its own asymmetric scale and minimum over those
// G tokens:
//
//   offset 0              dim fp16 scales d_c (channel c at 2 c)
//   offset 2 dim          dim fp16 minimums m_c
//   offset 4 dim + i r    codes of token i of the block (r = code row bytes):
//                         dim / 32 payloads of 32 channels in the int4_asym
//                         (16 bytes) or int2_asym (8 bytes) element order of
//                         format.hpp
//
// and key element (i, c) is code * d_c + m_c (quant_common::value_of). The
// value rows are ordinary packed rows of format.hpp in the same format
// (int4_asym or int2_asym), groups of G channels: token t's row at
// values + t * value_row_bytes.
//
// This header is plain data shared by storage and kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/problem.hpp"

namespace kvc::kernels {

// Largest head dim the KIVI kernels and storage handle (stack buffers of this many floats).
inline constexpr std::size_t kivi_max_dim = 1024;

// Bytes of the codes of one token of a key block (dim a multiple of 32).
constexpr std::size_t kivi_code_row_bytes(quant_format format, std::size_t dim) noexcept {
    return dim / quant_payload_elements * info_of(format).payload_bytes;
}
// Bytes of one key block of `group_size` tokens: scales, minimums, codes.
constexpr std::size_t kivi_key_block_bytes(quant_format format, std::size_t dim, std::size_t group_size) noexcept {
    return 4 * dim + group_size * kivi_code_row_bytes(format, dim);
}
// Slot of a KIVI format in the per-format entries: int2_asym 0, int4_asym 1.
constexpr int kivi_slot(quant_format format) noexcept { return format == quant_format::int4_asym ? 1 : 0; }

// Decode attention of one KV head for its query group over sink.tokens fp16
// rows, `quantized` packed tokens, then residual.tokens fp16 rows. Bias and
// logits are indexed over that whole sequence in that order. `quantized` may
// end inside a block (prefixes, for causal prefill).
struct kivi_decode_problem : decode_queries {
    // Queries: dim a multiple of group_size; bias [sink.tokens + quantized + residual.tokens].
    dense_segment sink;
    const void* key_blocks = nullptr;   // block b at key_blocks + b * key_block_bytes
    std::size_t key_block_bytes = 0;
    const void* values = nullptr;       // value row t at values + t * value_row_bytes
    std::size_t value_row_bytes = 0;
    std::size_t quantized = 0;
    quant_format format = quant_format::int4_asym; // int4_asym or int2_asym (keys and values)
    std::size_t group_size = 32;        // tokens per key block = channels per value group
    dense_segment residual;
};

// The KIVI section of a kernel_table; per-format entries indexed by kivi_slot.
struct kivi_kernels {
    // Quantizes `group_size` fp16 key rows (row i at keys + i * stride
    // elements, dim elements each) into one key block. Per channel the scale
    // and minimum follow the int4_asym / int2_asym rules of
    // kernels/quant/common.hpp over the block's finite elements;
    // non_finite[i] is set to 1 when row i holds a NaN or infinity (its
    // non-finite elements get code 0), else 0.
    void (*quantize_key_block[2])(const std::uint16_t* keys, std::size_t stride, std::size_t dim,
                                  std::size_t group_size, unsigned char* block, unsigned char* non_finite) noexcept;
    // Token i of a key block -> dim floats, each exactly its element value.
    void (*dequantize_key[2])(const unsigned char* block, std::size_t dim, std::size_t i, float* out) noexcept;
    // Folds the sink rows, the packed tokens and the residual rows into `state`.
    void (*attend_partial)(const kivi_decode_problem&, const decode_state&) noexcept;
};

} // namespace kvc::kernels
