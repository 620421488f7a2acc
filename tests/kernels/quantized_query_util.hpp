// The int8 query of the integer key formats, written out independently of
// the library (kernels/quant/common.hpp, quantize_query, is the rule) for the
// oracles of the quantized attention tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "kvc/kernels/quant/format.hpp"

namespace kvc_test {

// Whether scores against this key format use the int8 query (kernels/quant/common.hpp).
inline bool quantizes_query(kvc::kernels::quant_format f) { return f != kvc::kernels::quant_format::fp8_e4m3 && f != kvc::kernels::quant_format::fp8_e5m2; }

// The dequantized int8 query q^ of the documented rule (kernels/quant/common.hpp,
// quantize_query), written out here independently: per 32 elements
// a = max |q|, d = a / 127, c = RNE(q * (127 / a)), q^ = d * c in fp32.
inline std::vector<float> dequantized_query(const float* q, std::size_t dim) {
    std::vector<float> out(dim);
    for (std::size_t p = 0; p < dim; p += 32) {
        float a = 0.0f;
        for (std::size_t j = p; j < p + 32; ++j) a = std::max(a, std::fabs(q[j]));
        if (!std::isfinite(a)) {
            for (std::size_t j = p; j < p + 32; ++j) out[j] = std::nanf("");
            continue;
        }
        if (a < 0x1p-96f) {
            for (std::size_t j = p; j < p + 32; ++j) out[j] = 0.0f;
            continue;
        }
        const float inverse = 127.0f / a, d = a / 127.0f;
        for (std::size_t j = p; j < p + 32; ++j)
            out[j] = d * std::nearbyint(std::min(127.0f, std::max(-127.0f, q[j] * inverse)));
    }
    return out;
}

} // namespace kvc_test
