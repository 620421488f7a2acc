// kvc/kernels/common.hpp -- kernel pieces that are the same on every instruction set.
//
// Everything here is a template on `A` (an xsimd Arch, or reference_arch for
// the scalar reference) even where A is unused: each dispatch unit then gets
// its own instantiation, compiled with its own flags, and the linker can never
// merge an AVX-512 copy into code that runs on an older CPU (docs/ARCHITECTURE.md).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/kernels/problem.hpp"

namespace kvc::kernels {

// Tag of the portable scalar reference.
struct reference_arch {};

namespace common {

// Scalar exp through the compiler builtin (a call into libm), never through an
// inline library wrapper that a dispatch unit would compile with its own flags.
template <class A>
inline float exp(float x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_expf(x);
#else
    return std::exp(x);
#endif
}

// Scalar float <-> half/bfloat16 with round-to-nearest-even; bit-exact with
// F16C. Kernels use these for tails; the public conversions live in core/float16.hpp.
template <class A>
inline float half_bits_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    std::uint32_t mantissa = h & 0x3ffu;
    std::uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { // subnormal half: normalise
        int shift = 0;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            ++shift;
        }
        mantissa &= 0x3ffu;
        bits = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

template <class A>
inline std::uint16_t float_to_half_bits(float value) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
    const std::uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) { // inf or NaN (NaN is quietened)
        const std::uint16_t nan = magnitude > 0x7f800000u ? static_cast<std::uint16_t>(0x200u | ((magnitude >> 13) & 0x3ffu)) : 0u;
        return static_cast<std::uint16_t>(sign | 0x7c00u | nan);
    }
    if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u); // rounds past 65504
    if (magnitude < 0x38800000u) { // below the smallest normal half: subnormal or zero
        if (magnitude < 0x33000000u) return sign; // below half the smallest subnormal
        const std::uint32_t exponent = magnitude >> 23;
        const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
        const std::uint32_t shift = 126u - exponent; // 14 .. 24
        std::uint32_t result = mantissa >> shift;
        const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
        const std::uint32_t halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (result & 1u))) ++result;
        return static_cast<std::uint16_t>(sign | result);
    }
    std::uint32_t result = ((magnitude >> 13) - (112u << 10));
    const std::uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) ++result;
    return static_cast<std::uint16_t>(sign | result);
}

template <class A>
inline float bf16_bits_to_float(std::uint16_t b) noexcept {
    const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

template <class A>
inline std::uint16_t float_to_bf16_bits(float value) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u); // quiet NaN
    const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

// Element access for the three storage formats, by dtype tag.
template <class A, dtype D>
struct element;
template <class A>
struct element<A, dtype::f32> {
    using storage = float;
    static float load(const storage* p) noexcept { return *p; }
    static void store(storage* p, float x) noexcept { *p = x; }
};
template <class A>
struct element<A, dtype::f16> {
    using storage = std::uint16_t;
    static float load(const storage* p) noexcept { return half_bits_to_float<A>(*p); }
    static void store(storage* p, float x) noexcept { *p = float_to_half_bits<A>(x); }
};
template <class A>
struct element<A, dtype::bf16> {
    using storage = std::uint16_t;
    static float load(const storage* p) noexcept { return bf16_bits_to_float<A>(*p); }
    static void store(storage* p, float x) noexcept { *p = float_to_bf16_bits<A>(x); }
};

template <class A>
inline void reset_state(const decode_state& state, std::size_t group, std::size_t dim) noexcept {
    for (std::size_t g = 0; g < group; ++g) {
        state.max[g] = -std::numeric_limits<float>::infinity();
        state.sum[g] = 0.0f;
        for (std::size_t d = 0; d < dim; ++d) state.acc[g * dim + d] = 0.0f;
    }
}

// out(g) = acc(g) / sum(g). A head that saw no token (empty cache) outputs zeros.
template <class A>
inline void finalize_state(const decode_state& state, std::size_t group, std::size_t dim, float* out,
                           std::size_t out_stride) noexcept {
    for (std::size_t g = 0; g < group; ++g) {
        const float inverse = state.sum[g] > 0.0f ? 1.0f / state.sum[g] : 0.0f;
        for (std::size_t d = 0; d < dim; ++d) out[g * out_stride + d] = state.acc[g * dim + d] * inverse;
    }
}

// Folds the running state `from` into `into` (same group and dim), as if
// `into` had also seen `from`'s tokens: for codecs that attend a segment in
// their own transformed space (e.g. rotated values) and map its accumulator
// back before joining the other segments. A state that saw nothing is a no-op.
template <class A>
inline void merge_state(const decode_state& into, const decode_state& from, std::size_t group,
                        std::size_t dim) noexcept {
    for (std::size_t g = 0; g < group; ++g) {
        if (!(from.sum[g] > 0.0f)) continue;
        if (!(into.sum[g] > 0.0f)) {
            into.max[g] = from.max[g];
            into.sum[g] = from.sum[g];
            for (std::size_t d = 0; d < dim; ++d) into.acc[g * dim + d] = from.acc[g * dim + d];
            continue;
        }
        const float max = into.max[g] > from.max[g] ? into.max[g] : from.max[g];
        const float a = exp<A>(into.max[g] - max), b = exp<A>(from.max[g] - max);
        into.max[g] = max;
        into.sum[g] = into.sum[g] * a + from.sum[g] * b;
        for (std::size_t d = 0; d < dim; ++d)
            into.acc[g * dim + d] = into.acc[g * dim + d] * a + from.acc[g * dim + d] * b;
    }
}

// merge_state, except that a segment whose softmax went NaN (a NaN key or
// query makes every logit of the head NaN) poisons the output as one pass
// over every segment would: merge_state skips states with no positive sum.
// For stores that attend in a transformed space and map the state back
// (quant::rotated's values, project::pca's latents).
template <class A>
inline void merge_state_keeping_nan(const decode_state& into, const decode_state& from, std::size_t group,
                                    std::size_t dim) noexcept {
    merge_state<A>(into, from, group, dim);
    for (std::size_t g = 0; g < group; ++g)
        if (from.sum[g] != from.sum[g]) {
            into.sum[g] = from.sum[g];
            into.max[g] = from.max[g];
            for (std::size_t d = 0; d < dim; ++d) into.acc[g * dim + d] = from.sum[g];
        }
}

// mass[t] += sum_g exp(logit(g, t) - max(g)) / sum(g): the probability mass
// each token received from the group, from the logits the partial stored.
template <class A>
inline void accumulate_mass(const float* logits, std::size_t logits_stride, std::size_t group,
                            std::size_t tokens, const float* max, const float* sum, float* mass) noexcept {
    for (std::size_t g = 0; g < group; ++g) {
        if (!(sum[g] > 0.0f)) continue;
        const float inverse = 1.0f / sum[g];
        const float* row = logits + g * logits_stride;
        for (std::size_t t = 0; t < tokens; ++t) mass[t] += exp<A>(row[t] - max[g]) * inverse;
    }
}

// Chunked causal prefill as one decode pass per query, for any storage whose
// decode can fold "the first n rows" into a running softmax state: query i of
// the chunk sees the first visible = tokens - chunk + i + 1 of the `tokens`
// rows, and attend_prefix(visible, d, state) folds exactly those rows into
// `state` for d's query group. d carries the query side (dim, group, queries,
// query_stride, scale, logits, logits_stride; tokens = visible); the callback
// supplies the rows. Outputs and attention mass are exactly those of decode
// attention token by token; the cost is chunk passes over the rows (no tiling
// across queries). Logits rows are `tokens` apart, so a callback may write
// logits past `visible` (with_sinks masks its later rows rather than cutting
// them). Problem: prefill_problem or quant_prefill_problem (both name the
// query and output fields alike). workspace: prefill_workspace_floats(p.group,
// p.dim, tokens, p.mass != nullptr) floats.
template <class A, class Problem, class AttendPrefix>
inline void prefill_by_decode(const Problem& p, std::size_t tokens, float* workspace,
                              AttendPrefix&& attend_prefix) noexcept {
    const decode_state state{workspace, workspace + p.group, workspace + 2 * p.group};
    float* logits = p.mass ? workspace + p.group * (p.dim + 2) : nullptr;
    for (std::size_t i = 0; i < p.chunk; ++i) {
        const std::size_t visible = tokens - p.chunk + i + 1;
        decode_problem d;
        d.tokens = visible;
        d.dim = p.dim;
        d.group = p.group;
        d.queries = p.queries + i * p.query_token_stride;
        d.query_stride = p.query_head_stride;
        d.scale = p.scale;
        d.bias = p.bias; // indexed by row, like the logits: a query sees the first `visible`
        d.logits = logits;
        d.logits_stride = tokens;
        reset_state<A>(state, p.group, p.dim);
        attend_prefix(visible, d, state);
        finalize_state<A>(state, p.group, p.dim, p.out + i * p.out_token_stride, p.out_head_stride);
        if (logits) accumulate_mass<A>(logits, tokens, p.group, visible, state.max, state.sum, p.mass);
    }
}

// prefill_by_decode over plain rows and a decode partial of the same arch.
template <class A, void (*Partial)(const decode_problem&, const decode_state&) noexcept>
inline void prefill_by_rows(const prefill_problem& p, float* workspace) noexcept {
    prefill_by_decode<A>(p, p.tokens, workspace,
                         [&p](std::size_t, decode_problem d, const decode_state& state) noexcept {
                             d.keys = p.keys;
                             d.values = p.values;
                             d.key_stride = p.key_stride;
                             d.value_stride = p.value_stride;
                             Partial(d, state);
                         });
}

} // namespace common
} // namespace kvc::kernels
