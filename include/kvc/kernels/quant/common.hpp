// kvc/kernels/quant/common.hpp -- the scalar rules of the block formats, shared by every instruction set.
//
// Everything here is a template on the Arch `A` (docs/ARCHITECTURE.md: dispatch units
// hold only Arch-templated code), even where A is unused.
//
// How a group of G values x_0..x_{G-1} is quantized (every kernel, every
// instruction set, bit for bit):
//
//   int8_sym   d = amax / 127, rounded up to fp16; q = RNE(x / d) in -127..127.
//   int4_sym   m = the value of largest magnitude (the positive one when +a and
//              -a tie), d = m / -8 rounded away from zero to fp16 (negative when
//              m > 0, as ggml's q4_0), q = clamp(RNE(x / d), -8, 7) + 8. The
//              extreme value maps to -8 exactly, so all 16 levels are used; a
//              value of the opposite sign beyond 7.5 |d| is clamped to 7 (error
//              up to |d| for those, |d| / 2 for all others).
//   int4_asym  m = min rounded down to fp16, d = (max - m) / 15 rounded up to
//   int2_asym  fp16 (/ 3 for two bits); q = RNE((x - m) / d) in 0..15 (0..3).
//              Rounding m down and d up makes [m, m + 15 d] cover the group, so
//              every element is within d / 2.
//   fp8_*      d = amax / 448 (e4m3) or amax / 57344 (e5m2), rounded up to
//              fp16, so the group's largest magnitude lands at the top of the
//              fp8 range; e = fp8(x / d), round to nearest even, saturating to
//              the largest finite value (never NaN or inf from finite input).
//
// "x / d" is computed as x * (1 / d) in fp32 (one exact reciprocal per group),
// and RNE is round to nearest, ties to even. ggml's reference rounds ties away
// from zero (roundf, or +0.5 and truncate) and uses the unrounded fp32 scale;
// its SIMD paths round ties to even. kvc quantizes with the scale as stored
// (fp16), so x - value(q) <= d / 2 holds for the stored d, and every instruction
// set gives the same bytes. Ties are measure-zero on real data; the bytes of a
// block are read identically by both (the layout is the same).
//
// Scales outside fp16: a group whose scale (or minimum) would exceed 65504 in
// magnitude saturates to 65504 and its codes clamp (only reachable with fp32
// input above ~8e6); scales below the smallest fp16 subnormal round up to it.
//
// NaN and Inf: a group with any NaN or +-Inf element is stored with a NaN
// scale (and NaN minimum), codes 0: all G of its elements decode to NaN. Only
// that group of that row is affected; every other group and every other token
// keeps its exact value (no state is shared between groups).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/problem.hpp"

namespace kvc::kernels::quant_common {

template <class A>
inline std::uint16_t load_u16(const void* p) noexcept {
    std::uint16_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return bits;
}

template <class A>
inline void store_u16(void* p, std::uint16_t bits) noexcept {
    std::memcpy(p, &bits, sizeof bits);
}

template <class A>
inline float magnitude_of(float x) noexcept {
    return x < 0.0f ? -x : x;
}

// Scalar fp16 conversions (round to nearest even). Instruction sets with a
// converter specialise this (kernels/quant/simd.hpp: F16C); results are
// bit-identical, the software path is just slower.
template <class A>
struct half_convert {
    static std::uint16_t from_float(float x) noexcept { return common::float_to_half_bits<A>(x); }
    static float to_float(std::uint16_t bits) noexcept { return common::half_bits_to_float<A>(bits); }
};

template <class A>
inline float half_value(std::uint16_t bits) noexcept {
    return half_convert<A>::to_float(bits);
}

// fp16 bits of the half nearest to x with magnitude >= |x| (x finite), saturating at 65504.
// Branch-free on the rounding direction: whether RNE rounded down is data
// dependent (a coin flip on real data) and a mispredicted branch per group
// would cost more than the rest of the group's scalar work.
template <class A>
inline std::uint16_t half_away_from_zero(float x) noexcept {
    std::uint16_t h = half_convert<A>::from_float(x);
    const bool below = magnitude_of<A>(half_value<A>(h)) < magnitude_of<A>(x);
    h = static_cast<std::uint16_t>(h + static_cast<std::uint16_t>(below)); // next magnitude up, same sign
    if ((h & 0x7fffu) >= 0x7c00u) h = static_cast<std::uint16_t>((h & 0x8000u) | 0x7bffu);
    return h;
}

// fp16 bits of the largest half <= x (x finite), saturating at -65504.
template <class A>
inline std::uint16_t half_down(float x) noexcept {
    std::uint16_t h = half_convert<A>::from_float(x);
    const bool above = half_value<A>(h) > x;
    // One step toward -inf: magnitude up for negative halves, down for positive ones.
    const std::uint16_t step = (h & 0x8000u) ? std::uint16_t{1} : std::uint16_t{0xffffu};
    h = static_cast<std::uint16_t>(h + (above ? step : std::uint16_t{0}));
    if ((h & 0x7fffu) >= 0x7c00u) h = static_cast<std::uint16_t>((h & 0x8000u) | 0x7bffu);
    return h;
}

inline constexpr std::uint16_t half_nan_bits = 0x7e00u;

// Summary of a group, from the first pass over it.
struct group_stats {
    float max;
    float min;
    bool non_finite; // any NaN or +-Inf
};

// Everything the second pass needs: header bits, and x -> code as
// code = RNE(clamp((x - offset) * inverse, low, high)) + bias (integer formats)
// or fp8(x * inverse) (fp8 formats).
// (Plain aggregates without member initialisers: trivially constructible, so
// no constructor symbol can ever be emitted into a dispatch unit.)
struct group_plan {
    std::uint16_t scale_bits;
    std::uint16_t minimum_bits;
    float offset;
    float inverse;
    float low, high;
    int bias;
    bool non_finite;
};

template <class A>
inline float inverse_of(std::uint16_t scale_bits) noexcept {
    const float d = half_value<A>(scale_bits);
    return d != 0.0f ? 1.0f / d : 0.0f;
}

template <class A, quant_format F>
inline group_plan plan_group(const group_stats& s) noexcept {
    group_plan plan{};
    if (s.non_finite) {
        plan.non_finite = true;
        plan.scale_bits = half_nan_bits;
        plan.minimum_bits = half_nan_bits;
        return plan;
    }
    // "+ 0.0f" turns -0 into +0: max/min of signed zeros differ between
    // instruction sets, the bytes must not.
    const float high = s.max + 0.0f, low = s.min + 0.0f;
    const float amax = (high > -low ? high : -low) + 0.0f;
    if constexpr (F == quant_format::int8_sym) {
        plan.scale_bits = half_away_from_zero<A>(amax / 127.0f);
        plan.low = -127.0f;
        plan.high = 127.0f;
    } else if constexpr (F == quant_format::int4_sym) {
        const float extreme = high >= -low ? high : low; // +0 when the group is all zeros (d = -0, as ggml)
        plan.scale_bits = half_away_from_zero<A>(extreme / -8.0f);
        plan.low = -8.0f;
        plan.high = 7.0f;
        plan.bias = 8;
    } else if constexpr (F == quant_format::int4_asym || F == quant_format::int2_asym) {
        constexpr float levels = F == quant_format::int4_asym ? 15.0f : 3.0f;
        plan.minimum_bits = half_down<A>(low);
        plan.offset = half_value<A>(plan.minimum_bits);
        plan.scale_bits = half_away_from_zero<A>((high - plan.offset) / levels);
        plan.low = 0.0f;
        plan.high = levels;
    } else if constexpr (F == quant_format::fp8_e4m3) {
        plan.scale_bits = half_away_from_zero<A>(amax / 448.0f);
    } else {
        plan.scale_bits = half_away_from_zero<A>(amax / 57344.0f);
    }
    plan.inverse = inverse_of<A>(plan.scale_bits);
    return plan;
}

template <class A>
inline float round_to_nearest_even(float x) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_nearbyintf(x); // the default rounding mode: to nearest, ties to even
#else
    return std::nearbyint(x);
#endif
}

// fp32 (finite) -> fp8 with round to nearest even and saturation.
template <class A>
inline std::uint8_t encode_e4m3(float x) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const std::uint32_t sign = (bits >> 24) & 0x80u;
    const std::uint32_t a = bits & 0x7fffffffu;
    std::uint32_t code;
    if (a < 0x3c800000u) { // below 2^-6: subnormal e4m3, units of 2^-9 (8 units = the smallest normal)
        float magnitude;
        std::memcpy(&magnitude, &a, sizeof magnitude);
        code = static_cast<std::uint32_t>(round_to_nearest_even<A>(magnitude * 512.0f));
    } else {
        code = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
        if (code > 0x7eu) code = 0x7eu;
    }
    return static_cast<std::uint8_t>(sign | code);
}

template <class A>
inline std::uint8_t encode_e5m2(float x) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const std::uint32_t sign = (bits >> 24) & 0x80u;
    const std::uint32_t a = bits & 0x7fffffffu;
    std::uint32_t code;
    if (a < 0x38800000u) { // below 2^-14: subnormal e5m2, units of 2^-16
        float magnitude;
        std::memcpy(&magnitude, &a, sizeof magnitude);
        code = static_cast<std::uint32_t>(round_to_nearest_even<A>(magnitude * 65536.0f));
    } else {
        code = ((a + 0xfffffu + ((a >> 21) & 1u)) >> 21) - (112u << 2);
        if (code > 0x7bu) code = 0x7bu;
    }
    return static_cast<std::uint8_t>(sign | code);
}

template <class A>
inline float decode_e4m3(std::uint8_t code) noexcept {
    const std::uint32_t magnitude = code & 0x7fu;
    float value;
    if (magnitude == 0x7fu) {
        value = std::numeric_limits<float>::quiet_NaN();
    } else if (magnitude < 8u) {
        value = static_cast<float>(magnitude) * 0x1p-9f;
    } else {
        const std::uint32_t bits = (magnitude << 20) + (120u << 23);
        std::memcpy(&value, &bits, sizeof value);
    }
    return (code & 0x80u) ? -value : value;
}

template <class A>
inline float decode_e5m2(std::uint8_t code) noexcept {
    return half_value<A>(static_cast<std::uint16_t>(code << 8)); // e5m2 is the top byte of fp16
}

// The integer or fp8 code of element j (0..31) of a payload, as a float:
// q - 8 for int4_sym, q for the other integer formats, the fp8 value.
template <class A, quant_format F>
inline float code_of(const unsigned char* payload, std::size_t j) noexcept {
    if constexpr (F == quant_format::int8_sym) {
        return static_cast<float>(static_cast<std::int8_t>(payload[j]));
    } else if constexpr (F == quant_format::int4_sym || F == quant_format::int4_asym) {
        const unsigned nibble = j < 16 ? payload[j] & 0x0fu : payload[j - 16] >> 4;
        return static_cast<float>(static_cast<int>(nibble) - (F == quant_format::int4_sym ? 8 : 0));
    } else if constexpr (F == quant_format::int2_asym) {
        return static_cast<float>((payload[j % 8] >> (2 * (j / 8))) & 3u);
    } else if constexpr (F == quant_format::fp8_e4m3) {
        return decode_e4m3<A>(payload[j]);
    } else {
        return decode_e5m2<A>(payload[j]);
    }
}

// Value of a code: code * d (+ m). Products of a code (<= 8 significant bits)
// and an fp16 scale (11) are exact in fp32, so the only rounding is the one
// addition of the asymmetric formats: every instruction set, with or without
// FMA, computes the same float.
template <class A, quant_format F>
inline float value_of(float code, float scale, float minimum) noexcept {
    if constexpr (format_traits<F>::has_minimum) {
        return code * scale + minimum;
    } else {
        (void)minimum;
        return code * scale;
    }
}

// ---------------------------------------------------------------------------
// The query of the integer key formats (int8_sym, int4_sym, int4_asym,
// int2_asym). Key scores against these formats use the query quantized to
// int8 per 32 elements (one payload), as llama.cpp's q8 activations, so that
// the dot product of a payload is a sum of integer products:
//
//   a_p = max |q_j| over payload p;  d_p = a_p / 127;  c_j = RNE(q_j * (127 / a_p))
//   (both divisions in fp32; c_j in -127..127). a_p < 2^-96 (or 0): d_p = 0,
//   c_j = 0. A payload with a NaN or +-Inf element: d_p = NaN, c_j = 0, so its
//   scores are NaN, as the fp32 product would be.
//
//   score(k) = sum over payloads p of d_p * (dk * S_p + mk * C_p) with
//   S_p = sum_j code_j * c_j and C_p = sum_j c_j exact in int32, code_j the
//   integer code of the key (q - 8 for int4_sym), dk and mk the scale and
//   minimum of the payload's key group (mk = 0 for the symmetric formats):
//   exactly sum_j value(k_j) * d_p c_j in real arithmetic, i.e. <value(k), q^>
//   with q^_j = d_p c_j, the dequantized query.
//
// Every kernel computes this score up to float rounding (the reference in the
// form above, SIMD kernels either with integer dot products or as the float
// dot product of the key values with q^). fp8 keys use the fp32 query.
// |q_j - q^_j| <= d_p / 2 + 2.01 u |q_j| (u = 2^-24; the second term is the
// rounding of the two divisions), so the score moves by at most
// sum_p (d_p / 2) sum_{j in p} |value(k_j)| + 2.01 u sum_j |q_j value(k_j)|
// from the score with the fp32 query (tests/kernels/quant_attention_test.cpp checks it).

inline constexpr std::size_t query_max_dim = 1024; // cache_config's max_head_dim
inline constexpr std::size_t query_max_payloads = query_max_dim / quant_payload_elements;

// Plain aggregate (no constructors: see group_plan).
struct quantized_query {
    alignas(64) std::int8_t codes[query_max_dim];
    float scales[query_max_payloads];      // d_p
    std::int32_t sums[query_max_payloads]; // C_p
};

template <class A>
constexpr bool quantizes_query(quant_format format) noexcept {
    return format == quant_format::int8_sym || format == quant_format::int4_sym ||
           format == quant_format::int4_asym || format == quant_format::int2_asym;
}

// q (dim elements, a multiple of 32, at most query_max_dim) -> codes, d_p, C_p.
template <class A>
inline void quantize_query(const float* q, std::size_t dim, quantized_query& out) noexcept {
    for (std::size_t p = 0; p * quant_payload_elements < dim; ++p) {
        const float* x = q + p * quant_payload_elements;
        std::int8_t* codes = out.codes + p * quant_payload_elements;
        float amax = 0.0f;
        bool finite = true;
        for (std::size_t j = 0; j < quant_payload_elements; ++j) {
            const float a = magnitude_of<A>(x[j]);
            finite = finite && a <= 3.40282347e38f; // false for NaN too
            amax = a > amax ? a : amax;
        }
        std::int32_t sum = 0;
        if (!finite || !(amax >= 0x1p-96f)) {
            for (std::size_t j = 0; j < quant_payload_elements; ++j) codes[j] = 0;
            out.scales[p] = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
        } else {
            const float inverse = 127.0f / amax;
            for (std::size_t j = 0; j < quant_payload_elements; ++j) {
                float y = x[j] * inverse;
                y = y < -127.0f ? -127.0f : (y > 127.0f ? 127.0f : y);
                const int c = static_cast<int>(round_to_nearest_even<A>(y));
                codes[j] = static_cast<std::int8_t>(c);
                sum += c;
            }
            out.scales[p] = amax / 127.0f;
        }
        out.sums[p] = sum;
    }
}

// q^ = d_p c_j as floats (one rounding each): the query the float kernels use.
template <class A>
inline void dequantize_query(const quantized_query& qq, std::size_t dim, float* out) noexcept {
    for (std::size_t i = 0; i < dim; ++i)
        out[i] = qq.scales[i / quant_payload_elements] * static_cast<float>(qq.codes[i]);
}

// common::prefill_by_decode over the sink rows and packed rows: the query
// that sees `visible` tokens takes the first of them from the sinks.
template <class A, void (*Partial)(const quant_decode_problem&, const decode_state&) noexcept>
inline void prefill_by_rows(const quant_prefill_problem& p, float* workspace) noexcept {
    common::prefill_by_decode<A>(
        p, p.sink.tokens + p.tokens, workspace,
        [&p](std::size_t visible, const decode_problem& d, const decode_state& state) noexcept {
            quant_decode_problem q;
            q.sink = p.sink;
            q.sink.tokens = visible < p.sink.tokens ? visible : p.sink.tokens;
            q.rows = p.rows;
            q.tokens = visible - q.sink.tokens;
            queries_of(q) = d;
            Partial(q, state);
        });
}

// The fp16 sink segment as a plain decode problem (its logits and biases come first).
template <class A>
inline decode_problem sink_problem(const quant_decode_problem& p) noexcept {
    decode_problem d;
    d.keys = p.sink.keys;
    d.values = p.sink.values;
    d.key_stride = p.sink.stride;
    d.value_stride = p.sink.stride;
    d.tokens = p.sink.tokens;
    queries_of(d) = p;
    return d;
}

} // namespace kvc::kernels::quant_common
