// kvc/kernels/table.hpp -- the kernels of one instruction set, as function pointers.
//
// The cache picks one table per call (docs/ARCHITECTURE.md: dispatch once per call on a
// (layer, head) block, never inside inner loops). Entries indexed by dtype are
// per storage format: [dtype::f32], [dtype::f16], [dtype::bf16].
#pragma once

#include <cstddef>

#include "kvc/kernels/arch.hpp"
#include "kvc/kernels/hadamard/common.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/quant/kivi_problem.hpp"
#include "kvc/kernels/quant/cq_problem.hpp"
#include "kvc/kernels/quant/kvquant_problem.hpp"
#include "kvc/kernels/quant/gear.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace kvc::kernels {

inline constexpr int dtype_count = 3;

struct kernel_table {
    arch_id arch;
    // <q, row> with q in fp32 and the row in the storage format.
    float (*dot[dtype_count])(const float* q, const void* row, std::size_t n) noexcept;
    // y += a * row
    void (*axpy[dtype_count])(float a, const void* row, float* y, std::size_t n) noexcept;
    // In-place numerically stable softmax.
    void (*softmax)(float* x, std::size_t n) noexcept;
    // Row conversion between fp32 and the storage format (round to nearest even).
    void (*from_f32[dtype_count])(const float* src, void* dst, std::size_t n) noexcept;
    void (*to_f32[dtype_count])(const void* src, float* dst, std::size_t n) noexcept;
    // Decode attention partial over stored rows (see decode_problem).
    void (*attend_partial[dtype_count])(const decode_problem&, const decode_state&) noexcept;
    // Chunked causal prefill; workspace holds prefill_workspace_floats(...) floats.
    void (*prefill[dtype_count])(const prefill_problem&, float* workspace) noexcept;
    // Block quantization (Q1 formats): quantize/dequantize rows, fused attention
    // over packed rows (kernels/quant/problem.hpp).
    quant_kernels quant;
    // Q4: the orthonormal Hadamard rotation of rows (kernels/hadamard/common.hpp).
    hadamard_kernels hadamard;
    // Unstructured sparsity (Q10): bitmap + kept fp16 values per row (kernels/sparse/problem.hpp).
    sparse_kernels sparse;
    // KIVI (Q2): per-channel key blocks, fused attention (kernels/quant/kivi_problem.hpp).
    kivi_kernels kivi;
    // Channel-coupled vector quantization (Q8): nearest-centroid codes and
    // attention on the codes through lookup tables (kernels/quant/cq_problem.hpp).
    cq_kernels cq;
    // KVQuant (Q3): attention over pre-RoPE non-uniform codes with sparse
    // outliers, RoPE applied inside (kernels/quant/kvquant_problem.hpp).
    kvquant_kernels kvquant;
    // GEAR (Q7): attention over Q(X) + low rank + sparse (kernels/quant/gear.hpp).
    gear_kernels gear;
    // Decode's per-token attention mass, vectorised (the statistics attention-
    // based eviction consumes): mass[t] += sum_g exp(logit(g, t) - max(g)) / sum(g),
    // common::accumulate_mass's definition, with the set's own exp.
    void (*accumulate_mass)(const float* logits, std::size_t logits_stride, std::size_t group, std::size_t tokens,
                            const float* max, const float* sum, float* mass) noexcept;
};

constexpr int index_of(dtype type) noexcept { return static_cast<int>(type); }

} // namespace kvc::kernels
