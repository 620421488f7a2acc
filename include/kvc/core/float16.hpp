// kvc/core/float16.hpp -- the 16-bit element types: IEEE binary16 (kvc::half)
// and bfloat16 (kvc::bfloat16), as plain 2-byte storage with exact conversions.
//
// Engines hand kvc their KV buffers in fp16 or bf16, and C++17 has no such
// types, so these are storage only: no arithmetic, no operator== (bit equality
// and float equality disagree on NaN and on +0/-0, and either choice would
// surprise someone). Code converts to float, works, and converts back.
//
// Narrowing rounds to nearest, ties to even, in every range (subnormals,
// overflow to infinity): the same bits as F16C and as the SIMD kernels, so a
// value does not change depending on which path stored it. NaN stays NaN and is quieted, keeping its sign and the
// upper payload bits, as F16C does.
//
// The software conversions are plain integer code with no dependence on the
// floating-point environment (FTZ/DAZ set by an engine does not change them).
// When the translation unit itself is compiled with F16C, half conversions use
// the instruction; the software versions stay callable in kvc::detail so tests
// can hold the two against each other. bfloat16 has no hardware path here:
// AVX512_BF16's VCVTNEPS2BF16 flushes subnormals to zero, which would make
// results depend on the build flags.
//
// Every function is forced inline: an out-of-line copy compiled in a dispatch
// unit with wide-vector flags could otherwise be picked by the linker for code
// that runs on an older CPU (docs/ARCHITECTURE.md, "Kernels and dispatch"). Kernels in
// src/dispatch still should not call these for bulk work; they convert with
// their own Arch-templated code.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvc/core/config.hpp"

#if !defined(KVC_NO_F16C) && defined(__F16C__) && (defined(__GNUC__) || defined(__clang__))
#define KVC_FLOAT16_USES_F16C 1
#include <immintrin.h>
#else
#define KVC_FLOAT16_USES_F16C 0
#endif

namespace kvc {
namespace detail {
namespace fp16 {

KVC_ALWAYS_INLINE std::uint32_t bits_of(float value) noexcept {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

KVC_ALWAYS_INLINE float float_of(std::uint32_t bits) noexcept {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

// The integer cores are constexpr so constants can be built at compile time;
// only the float <-> bits step (memcpy) keeps the float signatures from being so.

constexpr std::uint16_t half_from_float_bits(std::uint32_t f) noexcept {
    const auto sign = static_cast<std::uint16_t>((f >> 16) & 0x8000u);
    const std::uint32_t magnitude = f & 0x7fffffffu;

    if (magnitude > 0x7f800000u) {
        // Quiet bit forced on, so a payload that lived only in the discarded
        // low 13 bits cannot turn the NaN into infinity.
        return static_cast<std::uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x03ffu));
    }
    // 65520 is halfway between 65504 (largest half, odd mantissa) and 2^16;
    // the tie goes to the even side, which is infinity. Covers infinity too.
    if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);

    if (magnitude >= 0x38800000u) {
        // Normal half. Adding just under half an ulp, plus one when the kept
        // part is odd, rounds to nearest-even; a carry out of the mantissa
        // lands in the exponent, which is the right answer.
        const std::uint32_t odd = (magnitude >> 13) & 1u;
        const std::uint32_t rounded = magnitude + 0x0fffu + odd;
        return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
    }

    // Subnormal half: the result is |x| / 2^-24 rounded to an integer.
    const std::uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return sign;  // below 2^-25: rounds to zero (2^-25 itself ties to zero)
    const std::uint32_t significand = (magnitude & 0x007fffffu) | 0x00800000u;
    const std::uint32_t shift = 126 - exponent;  // 14 .. 24
    std::uint32_t kept = significand >> shift;
    const std::uint32_t dropped = significand & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (dropped > halfway || (dropped == halfway && (kept & 1u))) ++kept;
    // kept may reach 0x400, which is exactly the encoding of the smallest normal.
    return static_cast<std::uint16_t>(sign | kept);
}

constexpr std::uint32_t float_bits_from_half(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    std::uint32_t mantissa = h & 0x03ffu;

    if (exponent == 0x1f) {
        // Signaling NaNs come out quiet, matching VCVTPH2PS.
        return mantissa == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u | (mantissa << 13));
    }
    if (exponent != 0) return sign | ((exponent + 112) << 23) | (mantissa << 13);
    if (mantissa == 0) return sign;

    // Subnormal half: every one is a normal float; shift the leading one into
    // the implicit position and lower the exponent to match.
    std::uint32_t float_exponent = 113;  // the exponent of 2^-14, before normalizing
    while ((mantissa & 0x0400u) == 0) {
        mantissa <<= 1;
        --float_exponent;
    }
    return sign | (float_exponent << 23) | ((mantissa & 0x03ffu) << 13);
}

constexpr std::uint16_t bf16_from_float_bits(std::uint32_t f) noexcept {
    if ((f & 0x7fffffffu) > 0x7f800000u) {
        // Truncating alone would turn a NaN with payload only in the low half
        // into infinity; forcing the quiet bit keeps it a NaN.
        return static_cast<std::uint16_t>((f >> 16) | 0x0040u);
    }
    // Same nearest-even bias trick as for half. It is right across the whole
    // range: subnormals share the format's layout, a carry into the exponent
    // is the correct rounding, and at the top it carries into infinity.
    const std::uint32_t odd = (f >> 16) & 1u;
    return static_cast<std::uint16_t>((f + 0x7fffu + odd) >> 16);
}

constexpr std::uint32_t float_bits_from_bf16(std::uint16_t b) noexcept {
    // bfloat16 is the top half of a float, so widening is exact, including
    // NaN payloads. NaNs are not quieted here: a plain shift is what every
    // SIMD widening does, and scalar and vector results must agree.
    return static_cast<std::uint32_t>(b) << 16;
}

} // namespace fp16

KVC_ALWAYS_INLINE std::uint16_t half_bits_from_float_soft(float value) noexcept {
    return fp16::half_from_float_bits(fp16::bits_of(value));
}

KVC_ALWAYS_INLINE float float_from_half_bits_soft(std::uint16_t bits) noexcept {
    return fp16::float_of(fp16::float_bits_from_half(bits));
}

KVC_ALWAYS_INLINE std::uint16_t bf16_bits_from_float_soft(float value) noexcept {
    return fp16::bf16_from_float_bits(fp16::bits_of(value));
}

KVC_ALWAYS_INLINE float float_from_bf16_bits_soft(std::uint16_t bits) noexcept {
    return fp16::float_of(fp16::float_bits_from_bf16(bits));
}

KVC_ALWAYS_INLINE std::uint16_t half_bits_from_float(float value) noexcept {
#if KVC_FLOAT16_USES_F16C
    // The immediate selects nearest-even regardless of MXCSR.RC. DAZ may zero
    // a float subnormal input, but those round to a signed zero half anyway.
    // The vector form rather than _cvtss_sh: clang's _cvtss_sh macro uses a
    // compound literal, which -Wpedantic rejects in C++.
    const __m128i converted = _mm_cvtps_ph(_mm_set_ss(value), _MM_FROUND_TO_NEAREST_INT);
    return static_cast<std::uint16_t>(_mm_cvtsi128_si32(converted));
#else
    return half_bits_from_float_soft(value);
#endif
}

KVC_ALWAYS_INLINE float float_from_half_bits(std::uint16_t bits) noexcept {
#if KVC_FLOAT16_USES_F16C
    return _cvtsh_ss(bits);
#else
    return float_from_half_bits_soft(bits);
#endif
}

} // namespace detail

// IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits; max finite 65504.
struct half {
    std::uint16_t bits;

    half() = default;  // trivial, so buffers of half can be allocated without a pass of stores
    KVC_ALWAYS_INLINE explicit half(float value) noexcept : bits(detail::half_bits_from_float(value)) {}

    KVC_ALWAYS_INLINE explicit operator float() const noexcept { return detail::float_from_half_bits(bits); }

    static constexpr half from_bits(std::uint16_t raw) noexcept {
        half result{};
        result.bits = raw;
        return result;
    }
};

// bfloat16: the top 16 bits of a float (1 sign, 8 exponent, 7 mantissa bits).
struct bfloat16 {
    std::uint16_t bits;

    bfloat16() = default;
    KVC_ALWAYS_INLINE explicit bfloat16(float value) noexcept
        : bits(detail::bf16_bits_from_float_soft(value)) {}

    KVC_ALWAYS_INLINE explicit operator float() const noexcept { return detail::float_from_bf16_bits_soft(bits); }

    static constexpr bfloat16 from_bits(std::uint16_t raw) noexcept {
        bfloat16 result{};
        result.bits = raw;
        return result;
    }
};

// Engine buffers are reinterpreted as arrays of these, so the layout is fixed.
static_assert(sizeof(half) == 2 && alignof(half) == alignof(std::uint16_t), "kvc::half must be 2 bytes");
static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == alignof(std::uint16_t), "kvc::bfloat16 must be 2 bytes");
static_assert(std::is_trivially_copyable_v<half> && std::is_trivially_copyable_v<bfloat16>,
              "kvc 16-bit types must be trivially copyable");
static_assert(std::is_trivially_default_constructible_v<half> && std::is_trivially_default_constructible_v<bfloat16>,
              "kvc 16-bit types must be trivially default constructible");
static_assert(std::is_standard_layout_v<half> && std::is_standard_layout_v<bfloat16>,
              "kvc 16-bit types must be standard layout");

// Engine buffers of another 16-bit type, as the pointer kv_view takes.
//
//   std::uint16_t* k16 = ...;                 // fp16 bits, the engine's own type
//   kvc::kv_view<const kvc::half> k(kvc::as_half(k16), tokens, kv_heads, head_dim);
//
// Accepted: std::uint16_t (fp16 or bf16 bits) and, where the compiler has it,
// _Float16 (fp16 only). An engine with its own half struct converts its pointer
// to std::uint16_t* first, after checking that struct is 2 bytes of fp16 bits.
// The static_asserts above and below fix what makes the cast sound in layout:
// same size and alignment, trivially copyable, standard layout, one uint16_t.
//
// Why the reads are sound, not just the layout: the caches never read a row
// through kvc::half. kv_view::row(t, h) is pointer arithmetic only; append
// hands each row on as `const void*` to std::memcpy (when the cache stores the
// view's own type) or to the kernels (conversion, quantization), which read
// 16-bit elements as std::uint16_t (kernels/common.hpp `element<A, f16>`)
// or with SIMD loads. A std::uint16_t buffer is therefore read as exactly
// the type it holds. Caveats, honestly: (1) a _Float16 buffer is read through
// std::uint16_t lvalues by the scalar kernels, which the standard does not
// bless; the read happens behind the dispatch table's function pointer, after
// the engine's writes, where GCC and Clang cannot reorder it. (2) Element
// access kv_view(t, h, d), used by the calibration routines
// (calibration/kvquant.hpp, head_roles.hpp, cq.hpp), reads half::bits, a
// std::uint16_t member of a struct; GCC and Clang treat that access as
// aliasing std::uint16_t, but the standard does not promise it. Give those
// routines a kvc::half (or float) buffer if that matters to you.
KVC_ALWAYS_INLINE half* as_half(std::uint16_t* bits) noexcept { return reinterpret_cast<half*>(bits); }
KVC_ALWAYS_INLINE const half* as_half(const std::uint16_t* bits) noexcept {
    return reinterpret_cast<const half*>(bits);
}
KVC_ALWAYS_INLINE bfloat16* as_bfloat16(std::uint16_t* bits) noexcept { return reinterpret_cast<bfloat16*>(bits); }
KVC_ALWAYS_INLINE const bfloat16* as_bfloat16(const std::uint16_t* bits) noexcept {
    return reinterpret_cast<const bfloat16*>(bits);
}

#if defined(__FLT16_MANT_DIG__)
// _Float16 is IEEE binary16 wherever the compiler defines it (11 mantissa
// digits incl. the implicit bit, checked), so its bits are kvc::half's.
static_assert(sizeof(_Float16) == sizeof(half) && alignof(_Float16) == alignof(half) && __FLT16_MANT_DIG__ == 11,
              "kvc::as_half: _Float16 must be 2-byte IEEE binary16");
KVC_ALWAYS_INLINE half* as_half(_Float16* values) noexcept { return reinterpret_cast<half*>(values); }
KVC_ALWAYS_INLINE const half* as_half(const _Float16* values) noexcept {
    return reinterpret_cast<const half*>(values);
}
#define KVC_HAS_FLOAT16_AS_HALF 1
#else
#define KVC_HAS_FLOAT16_AS_HALF 0
#endif

KVC_ALWAYS_INLINE float to_float(half value) noexcept { return detail::float_from_half_bits(value.bits); }
KVC_ALWAYS_INLINE float to_float(bfloat16 value) noexcept { return detail::float_from_bf16_bits_soft(value.bits); }
// Lets code templated on the element type write to_float(x) for float too.
KVC_ALWAYS_INLINE float to_float(float value) noexcept { return value; }

KVC_ALWAYS_INLINE half to_half(float value) noexcept { return half::from_bits(detail::half_bits_from_float(value)); }
KVC_ALWAYS_INLINE bfloat16 to_bfloat16(float value) noexcept {
    return bfloat16::from_bits(detail::bf16_bits_from_float_soft(value));
}

// Bit identity, for tests and serialization; not numeric equality.
constexpr bool same_bits(half a, half b) noexcept { return a.bits == b.bits; }
constexpr bool same_bits(bfloat16 a, bfloat16 b) noexcept { return a.bits == b.bits; }

} // namespace kvc
