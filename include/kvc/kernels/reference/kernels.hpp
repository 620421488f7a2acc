// kvc/kernels/reference/kernels.hpp -- the scalar reference of every kernel.
//
// Plain loops, written to be obviously right rather than fast: every SIMD
// kernel is tested against these on every instruction set. They are also what
// runs under KVC_ARCH=scalar and on CPUs with no SIMD unit kvc knows.
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>

#include "kvc/kernels/common.hpp"

namespace kvc::kernels::reference {

using common::element;
using A = reference_arch;

template <dtype D>
float dot(const float* q, const void* row, std::size_t n) noexcept {
    const auto* x = static_cast<const typename element<A, D>::storage*>(row);
    float total = 0.0f;
    for (std::size_t i = 0; i < n; ++i) total += q[i] * element<A, D>::load(x + i);
    return total;
}

// y += a * x
template <dtype D>
void axpy(float a, const void* x_row, float* y, std::size_t n) noexcept {
    const auto* x = static_cast<const typename element<A, D>::storage*>(x_row);
    for (std::size_t i = 0; i < n; ++i) y[i] += a * element<A, D>::load(x + i);
}

// In-place softmax. One pass keeps a running max and rescales the running sum
// whenever the max grows, so the exponentials never overflow; a second pass
// normalises.
inline void softmax(float* x, std::size_t n) noexcept {
    float max = -std::numeric_limits<float>::infinity();
    float sum = 0.0f;
    for (std::size_t i = 0; i < n; ++i) {
        if (x[i] > max) {
            sum *= std::exp(max - x[i]);
            max = x[i];
        }
        sum += std::exp(x[i] - max);
    }
    const float inverse = 1.0f / sum;
    for (std::size_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - max) * inverse;
}

template <dtype D>
void from_f32(const float* src, void* dst_row, std::size_t n) noexcept {
    auto* dst = static_cast<typename element<A, D>::storage*>(dst_row);
    for (std::size_t i = 0; i < n; ++i) element<A, D>::store(dst + i, src[i]);
}

template <dtype D>
void to_f32(const void* src_row, float* dst, std::size_t n) noexcept {
    const auto* src = static_cast<const typename element<A, D>::storage*>(src_row);
    for (std::size_t i = 0; i < n; ++i) dst[i] = element<A, D>::load(src + i);
}

// The two halves of one token of decode attention for query head g, shared
// by every reference (this one and those of the quantized and sparse rows),
// so that all of them define the online softmax by the same operations in the
// same order. Between the two the caller computes nothing; after the second it
// adds weight * (the token's value row) to acc, decoding the row its own way.

// The token's logit from its dot product with the query: scaled, plus the
// token's additive bias, and written to the problem's logits when it asks for
// them. `index` is the token's place in bias and logits (a segment after the
// sink rows starts past them).
inline float token_logit(const decode_queries& p, float dot, std::size_t g, std::size_t index) noexcept {
    float logit = p.scale * dot;
    if (p.bias) logit += p.bias[index];
    if (p.logits) p.logits[g * p.logits_stride + index] = logit;
    return logit;
}

// Folds `logit` into the running max and sum of one query head: when it
// raises the max, the sum and the dim accumulators are first rescaled by
// exp(old max - logit). Returns the token's weight exp(logit - max), already
// added to the sum.
inline float online_softmax_step(float logit, float& max, float& sum, float* acc, std::size_t dim) noexcept {
    if (logit > max) {
        const float rescale = std::exp(max - logit);
        sum *= rescale;
        for (std::size_t d = 0; d < dim; ++d) acc[d] *= rescale;
        max = logit;
    }
    const float weight = std::exp(logit - max);
    sum += weight;
    return weight;
}

// Token by token online softmax: the definition of decode attention.
template <dtype D>
void attend_partial(const decode_problem& p, const decode_state& s) noexcept {
    using storage = typename element<A, D>::storage;
    const auto* keys = static_cast<const storage*>(p.keys);
    const auto* values = static_cast<const storage*>(p.values);
    for (std::size_t g = 0; g < p.group; ++g) {
        const float* q = p.queries + g * p.query_stride;
        float* acc = s.acc + g * p.dim;
        for (std::size_t t = 0; t < p.tokens; ++t) {
            const float logit = token_logit(p, dot<D>(q, keys + t * p.key_stride, key_width(p)), g, t);
            const float weight = online_softmax_step(logit, s.max[g], s.sum[g], acc, p.dim);
            axpy<D>(weight, values + t * p.value_stride, acc, p.dim);
        }
    }
}

template <dtype D>
void prefill(const prefill_problem& p, float* workspace) noexcept {
    common::prefill_by_rows<A, &attend_partial<D>>(p, workspace);
}

} // namespace kvc::kernels::reference
