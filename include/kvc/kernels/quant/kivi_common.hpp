// kvc/kernels/quant/kivi_common.hpp -- the scalar rules of KIVI key blocks, shared by every instruction set.
//
// Arch-templated like kernels/quant/common.hpp (dispatch units hold only
// templates on the Arch). Key blocks are written by these scalar functions on
// every instruction set: a block is formed once per G appended tokens and its
// cost (two passes over G x dim fp16 elements) is small next to attention;
// value rows use the vectorised row quantizers of the quant section.
//
// Per channel c of a block of G tokens, with x_ic the fp16 key elements:
//   stats over the finite x_ic (NaN and +-Inf skipped; a channel with no
//   finite element is treated as all zeros), then quant_common::plan_group of
//   the format: m_c = min rounded down to fp16, d_c = (max - m_c) / levels
//   rounded up to fp16, code = RNE(clamp((x - m_c) * (1 / d_c), 0, levels)).
//   Every finite element is within d_c / 2 of its stored value.
// Non-finite elements get code 0 and their token is reported in non_finite,
// so the caller can mark the token (the storage poisons its value row)
// instead of letting one NaN spoil a channel of G tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/kivi_problem.hpp"

namespace kvc::kernels::kivi_common {

namespace qc = quant_common;

template <class A, quant_format F>
void quantize_key_block(const std::uint16_t* keys, std::size_t stride, std::size_t dim, std::size_t group_size,
                        unsigned char* block, unsigned char* non_finite) noexcept {
    constexpr float largest = 3.40282347e38f;
    const std::size_t row_bytes = kivi_code_row_bytes(F, dim);
    unsigned char* codes = block + 4 * dim;
    std::memset(codes, 0, group_size * row_bytes);
    for (std::size_t i = 0; i < group_size; ++i) non_finite[i] = 0;
    for (std::size_t c = 0; c < dim; ++c) {
        bool any = false;
        float high = 0.0f, low = 0.0f;
        for (std::size_t i = 0; i < group_size; ++i) {
            const float x = qc::half_value<A>(keys[i * stride + c]);
            if (!(qc::magnitude_of<A>(x) <= largest)) {
                non_finite[i] = 1;
                continue;
            }
            if (!any) high = low = x;
            high = x > high ? x : high;
            low = x < low ? x : low;
            any = true;
        }
        const qc::group_plan plan = qc::plan_group<A, F>(qc::group_stats{high, low, false});
        qc::store_u16<A>(block + 2 * c, plan.scale_bits);
        qc::store_u16<A>(block + 2 * dim + 2 * c, plan.minimum_bits);
        unsigned char* payload = codes + c / quant_payload_elements * format_traits<F>::payload_bytes;
        const std::size_t j = c % quant_payload_elements;
        for (std::size_t i = 0; i < group_size; ++i) {
            const float x = qc::half_value<A>(keys[i * stride + c]);
            if (!(qc::magnitude_of<A>(x) <= largest)) continue; // code 0
            float y = (x - plan.offset) * plan.inverse;
            y = y < plan.low ? plan.low : (y > plan.high ? plan.high : y);
            const int q = static_cast<int>(qc::round_to_nearest_even<A>(y));
            unsigned char* p = payload + i * row_bytes;
            if constexpr (F == quant_format::int2_asym) p[j % 8] = static_cast<unsigned char>(p[j % 8] | (q << (2 * (j / 8))));
            else p[j % 16] = static_cast<unsigned char>(p[j % 16] | (q << (j < 16 ? 0 : 4)));
        }
    }
}

// Value of channel c of token i of a key block.
template <class A, quant_format F>
inline float key_element(const unsigned char* block, std::size_t dim, std::size_t i, std::size_t c) noexcept {
    const unsigned char* payload = block + 4 * dim + i * kivi_code_row_bytes(F, dim) +
                                   c / quant_payload_elements * format_traits<F>::payload_bytes;
    const float scale = qc::half_value<A>(qc::load_u16<A>(block + 2 * c));
    const float minimum = qc::half_value<A>(qc::load_u16<A>(block + 2 * dim + 2 * c));
    return qc::value_of<A, F>(qc::code_of<A, F>(payload, c % quant_payload_elements), scale, minimum);
}

template <class A, quant_format F>
void dequantize_key(const unsigned char* block, std::size_t dim, std::size_t i, float* out) noexcept {
    for (std::size_t c = 0; c < dim; ++c) out[c] = key_element<A, F>(block, dim, i, c);
}

// An fp16 segment of the problem as a plain decode problem whose bias and
// logits start at token `first` of the sequence.
template <class A>
inline decode_problem segment_problem(const kivi_decode_problem& p, const dense_segment& segment,
                                      std::size_t first) noexcept {
    decode_problem d;
    d.keys = segment.keys;
    d.values = segment.values;
    d.key_stride = segment.stride;
    d.value_stride = segment.stride;
    d.tokens = segment.tokens;
    queries_of(d) = p;
    d.bias = p.bias ? p.bias + first : nullptr;
    d.logits = p.logits ? p.logits + first : nullptr;
    return d;
}

} // namespace kvc::kernels::kivi_common
