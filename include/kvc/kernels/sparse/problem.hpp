// kvc/kernels/sparse/problem.hpp -- arguments of the unstructured-sparsity kernels (Q10) and their table section.
//
// Row layout (one key or one value row of `dim` elements, dim a multiple of 16):
//
//   bitmap: dim / 8 bytes       bit i % 8 of byte i / 8 is set when element i is kept
//   values: kept fp16 values    little-endian, in ascending element order
//
// Every row of one kind keeps the same number of elements, so a row has a fixed
// size (dim / 8 + 2 * kept bytes) and row t starts at t * row_bytes. The
// element values are: the kept fp16 value where the bit is set, +0 elsewhere.
// Kernels read 16 elements at a time: a 16-bit slice of the bitmap and the
// next popcount(slice) fp16 values, widened into registers (never a dense row
// in memory).
#pragma once

#include <cstddef>

#include "kvc/kernels/problem.hpp"

namespace kvc::kernels {

// Elements per bitmap slice the kernels widen at once; dim must be a multiple.
inline constexpr std::size_t sparse_chunk_elements = 16;

// Bytes of one sparse row of `dim` elements keeping `kept` of them.
constexpr std::size_t sparse_row_bytes(std::size_t dim, std::size_t kept) noexcept { return dim / 8 + 2 * kept; }

// The sparse rows of one KV head.
struct sparse_rows {
    const void* keys = nullptr;   // row t at keys + t * key_row_bytes (bytes)
    const void* values = nullptr; // row t at values + t * value_row_bytes
    std::size_t key_row_bytes = 0;
    std::size_t value_row_bytes = 0;
};

// Decode attention of one KV head for its query group over `tokens` sparse
// rows, folded into a running softmax state (a partial, as decode_problem).
// bias and logits are indexed by token.
struct sparse_decode_problem : decode_queries {
    // Queries: dim a multiple of sparse_chunk_elements; bias [tokens].
    sparse_rows rows;
    std::size_t tokens = 0;
};

// The sparse section of a kernel_table.
struct sparse_kernels {
    // n elements of a row in the source format ([index_of(dtype)]) -> one
    // sparse row keeping `kept` (1..n) elements: the largest magnitudes of the
    // row's fp16 values, ties to the lower index, NaN above every number
    // (kernels/sparse/common.hpp). Same bytes on every instruction set.
    void (*encode_row[3])(const void* src, void* dst, std::size_t n, std::size_t kept) noexcept;
    // One sparse row -> n floats (kept values, zeros elsewhere).
    void (*decode_row)(const void* src, float* dst, std::size_t n) noexcept;
    // Folds the rows into `state` (see sparse_decode_problem).
    void (*attend_partial)(const sparse_decode_problem&, const decode_state&) noexcept;
};

} // namespace kvc::kernels
