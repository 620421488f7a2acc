// kvc/kernels/quant/cq_problem.hpp -- arguments of the channel-coupled vector quantization (CQ, Q8) kernels.
//
// A CQ row of `dim` elements is dim / c codes, one per group of c adjacent
// channels, each code b bits (1..8) naming one of the 2^b centroids of that
// group's codebook. Codes are packed LSB first: the code of group g is bits
// [g * b, g * b + b) of the row, bit i of the row being bit i % 8 of byte
// i / 8; a row is ceil(dim / c * b / 8) bytes. With b = 8 a code is a byte.
//
// Codebooks are given channel-major inside a group, [groups][c][2^b]: entry
// (g, j, k) is channel j of centroid k of group g. That is the layout the
// kernels read contiguously (over the centroids, for the query lookup table
// and for the nearest-centroid search).
#pragma once

#include <cstddef>

#include "kvc/kernels/problem.hpp"

namespace kvc::kernels {

// The codes and codebooks of one KV head.
struct cq_rows {
    const unsigned char* keys = nullptr;   // row t at keys + t * row_bytes
    const unsigned char* values = nullptr; // row t at values + t * row_bytes
    std::size_t row_bytes = 0;             // ceil(dim / channels * bits / 8)
    const float* key_codebook = nullptr;   // [dim / channels][channels][1 << bits]
    const float* value_codebook = nullptr;
    std::size_t channels = 4;              // c: 1, 2, 4 or 8, divides dim
    std::size_t bits = 8;                  // b: 1..8
};

// Bytes of one packed row of `groups` codes of `bits` bits.
constexpr std::size_t cq_row_bytes(std::size_t groups, std::size_t bits) noexcept { return (groups * bits + 7) / 8; }

// Decode attention of one KV head for its query group over `tokens` CQ rows,
// folded into `state` (which may already hold other segments: the kernels
// combine through common::merge_state). bias and logits as decode_problem.
struct cq_decode_problem : decode_queries {
    // Queries: bias [tokens].
    cq_rows rows;
    std::size_t tokens = 0;
    float* workspace = nullptr;     // cq_workspace_floats(dim, channels, bits) floats
};

// Most groups a row may have (head dims up to 1024 with c = 1).
inline constexpr std::size_t max_cq_groups = 1024;

// Query heads one pass of the fused kernel handles together (the lanes of
// its lookup tables and histograms).
inline constexpr std::size_t cq_pass_heads = 4;
// Tokens per softmax block.
inline constexpr std::size_t cq_block_tokens = 64;

// Workspace of attend_partial: a lookup table and a histogram of
// groups x 2^b x cq_pass_heads floats each, the pass's accumulator and output
// (cq_pass_heads x dim each), the block's weights and the local state. The
// scalar reference uses the first groups x 2^b floats.
constexpr std::size_t cq_workspace_floats(std::size_t dim, std::size_t channels, std::size_t bits) noexcept {
    const std::size_t table = dim / channels * (std::size_t{1} << bits) * cq_pass_heads;
    return 2 * table + 2 * cq_pass_heads * dim + cq_block_tokens * cq_pass_heads + 2 * cq_pass_heads;
}

// The CQ section of a kernel_table.
struct cq_kernels {
    // Codes of one fp32 row: for each group the nearest centroid in squared
    // Euclidean distance (ties: the lowest index). A group holding NaN or
    // +-Inf, or whose distances all overflow float, gets code 0. Instruction
    // sets may differ only where two distances tie within float rounding.
    void (*encode_row)(const float* x, const float* codebook, std::size_t dim, std::size_t channels,
                       std::size_t bits, unsigned char* out) noexcept;
    // Folds the rows into `state` for the query group (see cq_decode_problem).
    void (*attend_partial)(const cq_decode_problem&, const decode_state&) noexcept;
};

} // namespace kvc::kernels
