// kvc/kernels/reference/quant.hpp -- the scalar reference of the quantization kernels.
//
// Element by element, written to be obviously right: quantize with the rules
// of kernels/quant/common.hpp, decode each element with code_of/value_of, and
// attention as the token-by-token online softmax of reference::attend_partial
// over those values. Every SIMD kernel is tested against these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/kernels/reference/kernels.hpp"

namespace kvc::kernels::reference {

namespace qc = quant_common;

// The codes of one group of `group_size` elements.
template <quant_format F>
void quantize_group(const float* x, unsigned char* out, std::size_t group_size) noexcept {
    using traits = format_traits<F>;
    qc::group_stats stats{x[0], x[0], false};
    for (std::size_t i = 0; i < group_size; ++i) {
        if (!(qc::magnitude_of<A>(x[i]) <= 3.40282347e38f)) stats.non_finite = true;
        stats.max = x[i] > stats.max ? x[i] : stats.max;
        stats.min = x[i] < stats.min ? x[i] : stats.min;
    }
    const qc::group_plan plan = qc::plan_group<A, F>(stats);
    qc::store_u16<A>(out, plan.scale_bits);
    if constexpr (traits::has_minimum) qc::store_u16<A>(out + 2, plan.minimum_bits);
    unsigned char* payload = out + traits::header_bytes;
    std::memset(payload, 0, group_size / quant_payload_elements * traits::payload_bytes);
    if (plan.non_finite) return;
    for (std::size_t i = 0; i < group_size; ++i) {
        unsigned char* p = payload + i / quant_payload_elements * traits::payload_bytes;
        const std::size_t j = i % quant_payload_elements;
        if constexpr (F == quant_format::fp8_e4m3) {
            p[j] = qc::encode_e4m3<A>(x[i] * plan.inverse);
        } else if constexpr (F == quant_format::fp8_e5m2) {
            p[j] = qc::encode_e5m2<A>(x[i] * plan.inverse);
        } else {
            float y = (x[i] - plan.offset) * plan.inverse;
            y = y < plan.low ? plan.low : (y > plan.high ? plan.high : y);
            const int q = static_cast<int>(qc::round_to_nearest_even<A>(y)) + plan.bias;
            if constexpr (F == quant_format::int8_sym) {
                p[j] = static_cast<unsigned char>(static_cast<std::int8_t>(q));
            } else if constexpr (F == quant_format::int2_asym) {
                p[j % 8] = static_cast<unsigned char>(p[j % 8] | (q << (2 * (j / 8))));
            } else { // nibbles: element j low half of byte j, element j + 16 high half of byte j
                p[j % 16] = static_cast<unsigned char>(p[j % 16] | (q << (j < 16 ? 0 : 4)));
            }
        }
    }
}

template <quant_format F, dtype D>
void quantize_row(const void* src, void* dst, std::size_t n, std::size_t group_size) noexcept {
    using storage = typename element<A, D>::storage;
    const auto* in = static_cast<const storage*>(src);
    auto* out = static_cast<unsigned char*>(dst);
    const std::size_t group_bytes =
        format_traits<F>::header_bytes + group_size / quant_payload_elements * format_traits<F>::payload_bytes;
    float x[128];
    for (std::size_t g = 0; g * group_size < n; ++g) {
        for (std::size_t i = 0; i < group_size; ++i) x[i] = element<A, D>::load(in + g * group_size + i);
        quantize_group<F>(x, out + g * group_bytes, group_size);
    }
}

// Value of element i of a packed row.
template <quant_format F>
float element_value(const unsigned char* row, std::size_t i, std::size_t group_size) noexcept {
    using traits = format_traits<F>;
    const std::size_t group_bytes = traits::header_bytes + group_size / quant_payload_elements * traits::payload_bytes;
    const unsigned char* group = row + i / group_size * group_bytes;
    const float scale = qc::half_value<A>(qc::load_u16<A>(group));
    const float minimum = traits::has_minimum ? qc::half_value<A>(qc::load_u16<A>(group + 2)) : 0.0f;
    const std::size_t within = i % group_size;
    const unsigned char* payload =
        group + traits::header_bytes + within / quant_payload_elements * traits::payload_bytes;
    return qc::value_of<A, F>(qc::code_of<A, F>(payload, within % quant_payload_elements), scale, minimum);
}

template <quant_format F>
void dequantize_row(const void* src, float* dst, std::size_t n, std::size_t group_size) noexcept {
    const auto* row = static_cast<const unsigned char*>(src);
    for (std::size_t i = 0; i < n; ++i) dst[i] = element_value<F>(row, i, group_size);
}

using element_value_fn = float (*)(const unsigned char*, std::size_t, std::size_t) noexcept;

inline element_value_fn element_value_of(quant_format format) noexcept {
    switch (format) {
    case quant_format::int8_sym: return &element_value<quant_format::int8_sym>;
    case quant_format::int4_sym: return &element_value<quant_format::int4_sym>;
    case quant_format::int4_asym: return &element_value<quant_format::int4_asym>;
    case quant_format::int2_asym: return &element_value<quant_format::int2_asym>;
    case quant_format::fp8_e4m3: return &element_value<quant_format::fp8_e4m3>;
    case quant_format::fp8_e5m2: return &element_value<quant_format::fp8_e5m2>;
    }
    return nullptr;
}

// The score of a packed key row against the quantized query of an integer
// key format, in the form that defines it (quant_common::quantize_query):
// per payload an exact integer dot product, then the scales in fp32.
template <quant_format F>
float quantized_score(const unsigned char* row, const qc::quantized_query& q, std::size_t dim,
                      std::size_t group_size) noexcept {
    using traits = format_traits<F>;
    const std::size_t group_bytes = traits::header_bytes + group_size / quant_payload_elements * traits::payload_bytes;
    float score = 0.0f;
    for (std::size_t p = 0; p * quant_payload_elements < dim; ++p) {
        const std::size_t first = p * quant_payload_elements;
        const unsigned char* group = row + first / group_size * group_bytes;
        const float scale = qc::half_value<A>(qc::load_u16<A>(group));
        const float minimum = traits::has_minimum ? qc::half_value<A>(qc::load_u16<A>(group + 2)) : 0.0f;
        const unsigned char* payload = group + traits::header_bytes + first % group_size / quant_payload_elements * traits::payload_bytes;
        std::int32_t dot = 0;
        for (std::size_t j = 0; j < quant_payload_elements; ++j)
            dot += static_cast<std::int32_t>(qc::code_of<A, F>(payload, j)) * q.codes[first + j];
        float term = scale * static_cast<float>(dot);
        if constexpr (traits::has_minimum) term += minimum * static_cast<float>(q.sums[p]);
        score += q.scales[p] * term;
    }
    return score;
}

using quantized_score_fn = float (*)(const unsigned char*, const qc::quantized_query&, std::size_t, std::size_t) noexcept;

inline quantized_score_fn quantized_score_of(quant_format format) noexcept {
    switch (format) {
    case quant_format::int8_sym: return &quantized_score<quant_format::int8_sym>;
    case quant_format::int4_sym: return &quantized_score<quant_format::int4_sym>;
    case quant_format::int4_asym: return &quantized_score<quant_format::int4_asym>;
    case quant_format::int2_asym: return &quantized_score<quant_format::int2_asym>;
    default: return nullptr; // fp8 keys: the fp32 query
    }
}

// The sink rows through the fp16 reference partial, then the packed rows token
// by token: the definition of decode attention over the segmented storage.
inline void quant_attend_partial(const quant_decode_problem& p, const decode_state& s) noexcept {
    if (p.sink.tokens > 0) attend_partial<dtype::f16>(qc::sink_problem<A>(p), s);
    const element_value_fn key_value = element_value_of(p.rows.key_format);
    const element_value_fn value_value = element_value_of(p.rows.value_format);
    const auto* keys = static_cast<const unsigned char*>(p.rows.keys);
    const auto* values = static_cast<const unsigned char*>(p.rows.values);
    const quantized_score_fn quantized = quantized_score_of(p.rows.key_format);
    const std::size_t first = p.sink.tokens; // index of the first packed row in bias and logits
    qc::quantized_query query;
    for (std::size_t g = 0; g < p.group; ++g) {
        const float* q = p.queries + g * p.query_stride;
        if (quantized && p.tokens > 0) qc::quantize_query<A>(q, p.dim, query);
        float* acc = s.acc + g * p.dim;
        for (std::size_t t = 0; t < p.tokens; ++t) {
            const unsigned char* k = keys + t * p.rows.key_row_bytes;
            const unsigned char* v = values + t * p.rows.value_row_bytes;
            float dot = 0.0f;
            if (quantized) {
                dot = quantized(k, query, p.dim, p.rows.group_size);
            } else {
                for (std::size_t d = 0; d < p.dim; ++d) dot += q[d] * key_value(k, d, p.rows.group_size);
            }
            const float logit = token_logit(p, dot, g, first + t);
            const float weight = online_softmax_step(logit, s.max[g], s.sum[g], acc, p.dim);
            for (std::size_t d = 0; d < p.dim; ++d) acc[d] += weight * value_value(v, d, p.rows.group_size);
        }
    }
}

inline void quant_prefill(const quant_prefill_problem& p, float* workspace) noexcept {
    qc::prefill_by_rows<A, &quant_attend_partial>(p, workspace);
}

constexpr quant_kernels make_quant_kernels() noexcept {
    using F = quant_format;
    return quant_kernels{
        {
            {&quantize_row<F::int8_sym, dtype::f32>, &quantize_row<F::int8_sym, dtype::f16>,
             &quantize_row<F::int8_sym, dtype::bf16>},
            {&quantize_row<F::int4_sym, dtype::f32>, &quantize_row<F::int4_sym, dtype::f16>,
             &quantize_row<F::int4_sym, dtype::bf16>},
            {&quantize_row<F::int4_asym, dtype::f32>, &quantize_row<F::int4_asym, dtype::f16>,
             &quantize_row<F::int4_asym, dtype::bf16>},
            {&quantize_row<F::int2_asym, dtype::f32>, &quantize_row<F::int2_asym, dtype::f16>,
             &quantize_row<F::int2_asym, dtype::bf16>},
            {&quantize_row<F::fp8_e4m3, dtype::f32>, &quantize_row<F::fp8_e4m3, dtype::f16>,
             &quantize_row<F::fp8_e4m3, dtype::bf16>},
            {&quantize_row<F::fp8_e5m2, dtype::f32>, &quantize_row<F::fp8_e5m2, dtype::f16>,
             &quantize_row<F::fp8_e5m2, dtype::bf16>},
        },
        {&dequantize_row<F::int8_sym>, &dequantize_row<F::int4_sym>, &dequantize_row<F::int4_asym>,
         &dequantize_row<F::int2_asym>, &dequantize_row<F::fp8_e4m3>, &dequantize_row<F::fp8_e5m2>},
        &quant_attend_partial,
        &quant_prefill,
    };
}

} // namespace kvc::kernels::reference
