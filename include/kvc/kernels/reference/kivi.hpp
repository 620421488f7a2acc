// kvc/kernels/reference/kivi.hpp -- the scalar reference of the KIVI (Q2) kernels.
//
// Attention as the definition: the fp16 sink rows through the fp16 reference
// partial, then every packed token with its key and value elements decoded
// one by one (kivi_common::key_element, reference::element_value) and folded
// into the running softmax token by token, then the fp16 residual rows.
#pragma once

#include <cstdint>
#include <cstddef>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/kivi_common.hpp"
#include "kvc/kernels/quant/kivi_problem.hpp"
#include "kvc/kernels/reference/kernels.hpp"
#include "kvc/kernels/reference/quant.hpp"

namespace kvc::kernels::reference {

template <quant_format F>
void kivi_quantize_key_block(const std::uint16_t* keys, std::size_t stride, std::size_t dim, std::size_t group_size,
                             unsigned char* block, unsigned char* non_finite) noexcept {
    kivi_common::quantize_key_block<A, F>(keys, stride, dim, group_size, block, non_finite);
}

template <quant_format F>
void kivi_dequantize_key(const unsigned char* block, std::size_t dim, std::size_t i, float* out) noexcept {
    kivi_common::dequantize_key<A, F>(block, dim, i, out);
}

template <quant_format F>
void kivi_packed_partial(const kivi_decode_problem& p, const decode_state& s) noexcept {
    const auto* blocks = static_cast<const unsigned char*>(p.key_blocks);
    const auto* values = static_cast<const unsigned char*>(p.values);
    const std::size_t first = p.sink.tokens; // index of the first packed token in bias and logits
    for (std::size_t g = 0; g < p.group; ++g) {
        const float* q = p.queries + g * p.query_stride;
        float* acc = s.acc + g * p.dim;
        for (std::size_t t = 0; t < p.quantized; ++t) {
            const unsigned char* block = blocks + t / p.group_size * p.key_block_bytes;
            const unsigned char* v = values + t * p.value_row_bytes;
            float dot = 0.0f;
            for (std::size_t d = 0; d < p.dim; ++d)
                dot += q[d] * kivi_common::key_element<A, F>(block, p.dim, t % p.group_size, d);
            const float logit = token_logit(p, dot, g, first + t);
            const float weight = online_softmax_step(logit, s.max[g], s.sum[g], acc, p.dim);
            for (std::size_t d = 0; d < p.dim; ++d) acc[d] += weight * element_value<F>(v, d, p.group_size);
        }
    }
}

inline void kivi_attend_partial(const kivi_decode_problem& p, const decode_state& s) noexcept {
    if (p.sink.tokens > 0) attend_partial<dtype::f16>(kivi_common::segment_problem<A>(p, p.sink, 0), s);
    if (p.format == quant_format::int4_asym) kivi_packed_partial<quant_format::int4_asym>(p, s);
    else kivi_packed_partial<quant_format::int2_asym>(p, s);
    if (p.residual.tokens > 0)
        attend_partial<dtype::f16>(kivi_common::segment_problem<A>(p, p.residual, p.sink.tokens + p.quantized), s);
}

constexpr kivi_kernels make_kivi_kernels() noexcept {
    using F = quant_format;
    return kivi_kernels{
        {&kivi_quantize_key_block<F::int2_asym>, &kivi_quantize_key_block<F::int4_asym>},
        {&kivi_dequantize_key<F::int2_asym>, &kivi_dequantize_key<F::int4_asym>},
        &kivi_attend_partial,
    };
}

} // namespace kvc::kernels::reference
