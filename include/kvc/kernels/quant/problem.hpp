// kvc/kernels/quant/problem.hpp -- arguments of the quantization kernels and their table section.
//
// The fused attention kernels read keys and values in their packed block form
// (format.hpp) and never write a dequantized copy: each group is widened in
// registers, used, and dropped. A problem may start with a short segment of
// full-precision fp16 rows (Q9 sink tokens) that is attended first, then the
// packed body, through one running softmax state (decode_state), exactly as
// if the two segments were one sequence.
#pragma once

#include <cstddef>

#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/quant/format.hpp"

namespace kvc::kernels {

// The packed rows of one KV head and their formats.
struct quant_rows {
    const void* keys = nullptr;       // row t at keys + t * key_row_bytes (bytes)
    const void* values = nullptr;     // row t at values + t * value_row_bytes
    std::size_t key_row_bytes = 0;    // (dim / group_size) * group bytes of key_format
    std::size_t value_row_bytes = 0;
    quant_format key_format = quant_format::int8_sym;
    quant_format value_format = quant_format::int8_sym;
    std::size_t group_size = 32;      // 32, 64 or 128; divides dim
};

// Optional leading segment in fp16 (dim elements per row, `stride` elements apart).
struct dense_segment {
    const void* keys = nullptr;
    const void* values = nullptr;
    std::size_t stride = 0;
    std::size_t tokens = 0;
};

// Decode attention of one KV head for its query group over sink.tokens fp16
// rows followed by `tokens` packed rows. Token indices of bias and logits run
// over the whole sequence: the sink rows first, then the packed rows.
struct quant_decode_problem : decode_queries {
    // Queries: dim a multiple of rows.group_size, at most 1024 (quant_common::query_max_dim); bias [sink.tokens + tokens].
    dense_segment sink;
    quant_rows rows;
    std::size_t tokens = 0;         // packed rows
};

// Chunked causal prefill over the same storage: `chunk` queries, the last
// `chunk` of the sink.tokens + tokens rows; query i sees rows
// 0 .. sink.tokens + tokens - chunk + i. Strides as prefill_problem.
struct quant_prefill_problem {
    dense_segment sink;
    quant_rows rows;
    std::size_t tokens = 0;
    std::size_t chunk = 0;
    std::size_t dim = 0;
    std::size_t group = 1;
    const float* queries = nullptr;
    std::size_t query_token_stride = 0;
    std::size_t query_head_stride = 0;
    float* out = nullptr;
    std::size_t out_token_stride = 0;
    std::size_t out_head_stride = 0;
    float scale = 1.0f;
    float* mass = nullptr;          // optional [sink.tokens + tokens], accumulated into
    const float* bias = nullptr;    // optional [sink.tokens + tokens]: additive logit of each row
};

// The quantization section of a kernel_table. Entries indexed by format are
// [index_of(quant_format)], by source dtype [index_of(dtype)].
struct quant_kernels {
    // n elements (a multiple of group_size) of a row in the source format ->
    // n / group_size packed groups. Round to nearest even; see
    // kernels/quant/common.hpp for the scales, saturation and NaN/Inf rules.
    void (*quantize_row[quant_format_count][3])(const void* src, void* dst, std::size_t n,
                                                 std::size_t group_size) noexcept;
    // Packed groups -> n floats, each exactly the value of its element (format.hpp).
    void (*dequantize_row[quant_format_count])(const void* src, float* dst, std::size_t n,
                                               std::size_t group_size) noexcept;
    // Folds the sink rows, then the packed rows, into `state`.
    void (*attend_partial)(const quant_decode_problem&, const decode_state&) noexcept;
    // Workspace: prefill_workspace_floats(group, dim, sink.tokens + tokens, mass != nullptr) floats.
    void (*prefill)(const quant_prefill_problem&, float* workspace) noexcept;
};

constexpr int index_of(quant_format format) noexcept { return static_cast<int>(format); }

} // namespace kvc::kernels
