// kvc/kernels/quant/simd.hpp -- the xsimd quantization kernels, templated on an xsimd Arch.
//
// Included at the end of kernels/simd/kernels.hpp (make_table puts these in
// the table's `quant` section); the same rules hold: nothing but xsimd and
// templates on the Arch.
//
// Structure. Every format decodes a payload of 32 elements into 32 / lanes
// float batches, batch i holding elements i * lanes .. i * lanes + lanes - 1
// (codes<A, F>). Bytes are widened to 32-bit lanes by byte_loader<A>, which
// SSE2, AVX2 and AVX-512 implement with their own widening instructions;
// other instruction sets (NEON) use a generic version through a small buffer.
// fp8 is decoded through the fp16 converter where the set has one (F16C).
//
// Fused decode attention (attend_partial): tokens in blocks of 64; for each
// block the logits of H query heads (1..4) at a time, each key payload decoded
// once into registers and used for all H heads; one online-softmax update per
// head; then the weighted sum of the value rows in register tiles of whole
// payloads x H heads. No dequantized copy of a row is ever written to memory.
// The key and value formats are chosen at run time: the kernel picks, once
// per call, a logits routine for the key format and an accumulation routine
// for the value format (function pointers, called once per block of 64 tokens).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include <xsimd/xsimd.hpp>

#include "kvc/core/config.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/kernels/simd/kernels.hpp"

// Fixed-count loops are unrolled and the per-step helpers forced inline so the
// accumulators stay in registers. Under AddressSanitizer (CI's sanitizer
// build) both are left to the compiler: the instrumented, fully unrolled
// kernels take minutes to compile, and the arithmetic is the same.
#if defined(__SANITIZE_ADDRESS__)
#define KVC_QUANT_UNROLL
#define KVC_QUANT_INLINE inline
#else
#define KVC_QUANT_UNROLL KVC_UNROLL
#define KVC_QUANT_INLINE KVC_ALWAYS_INLINE
#endif

namespace kvc::kernels::simd {
namespace quant {

namespace qc = quant_common;

template <class A>
using ints = xsimd::batch<std::int32_t, A>;

// Lane select for 32-bit integer batches, done in the float domain (same
// bits): xsimd 8.1's integer select for AVX-512BW also compiles its 8/16-bit
// blends for 32-bit lanes, which GCC rejects at -O0 (header-only builds).
template <class A>
inline ints<A> select_ints(const xsimd::batch_bool<float, A>& condition, ints<A> if_true, ints<A> if_false) noexcept {
    return xsimd::bitwise_cast<ints<A>>(xsimd::select(condition, xsimd::bitwise_cast<floats<A>>(if_true),
                                                      xsimd::bitwise_cast<floats<A>>(if_false)));
}

// ---------------------------------------------------------------------------
// Bytes <-> 32-bit lanes.

// Portable: through a buffer (any instruction set xsimd knows). Every
// template below takes `Portable`: true selects these generic pieces even
// where an instruction set has its own, so the tests can run the code path
// of NEON (and of any set without a specialisation) on x86.
template <class A, bool Portable = false>
struct byte_loader {
    static constexpr std::size_t lanes = ints<A>::size;
    // lanes bytes at p, zero-extended.
    static ints<A> u8(const unsigned char* p) noexcept {
        alignas(64) std::int32_t buffer[lanes];
        for (std::size_t i = 0; i < lanes; ++i) buffer[i] = p[i];
        return ints<A>::load_aligned(buffer);
    }
    // lanes bytes at p, sign-extended.
    static ints<A> s8(const unsigned char* p) noexcept {
        alignas(64) std::int32_t buffer[lanes];
        for (std::size_t i = 0; i < lanes; ++i) buffer[i] = static_cast<std::int8_t>(p[i]);
        return ints<A>::load_aligned(buffer);
    }
    // 16 lanes only: 2-bit codes 16 * half .. 16 * half + 15 of an int2 payload
    // (lane l: bits 2 (2 half + l / 8) of byte l % 8).
    static ints<A> int2_codes(const unsigned char* p, std::size_t half) noexcept {
        alignas(64) std::int32_t buffer[lanes];
        for (std::size_t i = 0; i < lanes; ++i) buffer[i] = (p[i % 8] >> (2 * (2 * half + i / 8))) & 3;
        return ints<A>::load_aligned(buffer);
    }
    // The low byte of every lane to p (lanes bytes).
    static void store_u8(unsigned char* p, ints<A> x) noexcept {
        alignas(64) std::int32_t buffer[lanes];
        x.store_aligned(buffer);
        for (std::size_t i = 0; i < lanes; ++i) p[i] = static_cast<unsigned char>(buffer[i]);
    }
};

// fp16 scale bits -> float.
template <class A, bool Portable = false>
struct half_scalar {
    static float load(const unsigned char* p) noexcept { return qc::half_value<A>(qc::load_u16<A>(p)); }
};

#if defined(__SSE2__)
template <>
struct byte_loader<xsimd::sse2, false> {
    static constexpr std::size_t lanes = 4;
    static __m128i load4(const unsigned char* p) noexcept {
        std::int32_t word;
        std::memcpy(&word, p, sizeof word);
        return _mm_cvtsi32_si128(word);
    }
    static ints<xsimd::sse2> u8(const unsigned char* p) noexcept {
        const __m128i zero = _mm_setzero_si128();
        return _mm_unpacklo_epi16(_mm_unpacklo_epi8(load4(p), zero), zero);
    }
    static ints<xsimd::sse2> s8(const unsigned char* p) noexcept {
        const __m128i b = load4(p);
        const __m128i w = _mm_srai_epi16(_mm_unpacklo_epi8(b, b), 8);
        return _mm_srai_epi32(_mm_unpacklo_epi16(w, w), 16);
    }
    static void store_u8(unsigned char* p, ints<xsimd::sse2> x) noexcept {
        const __m128i w = _mm_packs_epi32(x, x);
        const std::int32_t word = _mm_cvtsi128_si32(_mm_packus_epi16(w, w));
        std::memcpy(p, &word, sizeof word);
    }
};
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <>
struct byte_loader<avx2_arch, false> {
    static constexpr std::size_t lanes = 8;
    static __m128i load8(const unsigned char* p) noexcept {
        return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    }
    static ints<avx2_arch> u8(const unsigned char* p) noexcept { return _mm256_cvtepu8_epi32(load8(p)); }
    static ints<avx2_arch> s8(const unsigned char* p) noexcept { return _mm256_cvtepi8_epi32(load8(p)); }
    static void store_u8(unsigned char* p, ints<avx2_arch> x) noexcept {
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
    }
};
template <>
struct half_scalar<avx2_arch, false> {
    static float load(const unsigned char* p) noexcept { return _cvtsh_ss(qc::load_u16<avx2_arch>(p)); }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct byte_loader<xsimd::avx512bw, false> {
    static constexpr std::size_t lanes = 16;
    static __m128i load16(const unsigned char* p) noexcept {
        return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    static ints<xsimd::avx512bw> u8(const unsigned char* p) noexcept { return _mm512_cvtepu8_epi32(load16(p)); }
    static ints<xsimd::avx512bw> s8(const unsigned char* p) noexcept { return _mm512_cvtepi8_epi32(load16(p)); }
    static ints<xsimd::avx512bw> int2_codes(const unsigned char* p, std::size_t half) noexcept {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        // 16-bit shifts pull bits of the next byte into bits 6..7; the mask drops them.
        const __m128i low = half == 0 ? b : _mm_srli_epi16(b, 4);
        const __m128i pair = _mm_and_si128(_mm_unpacklo_epi64(low, _mm_srli_epi16(low, 2)), _mm_set1_epi8(3));
        return _mm512_cvtepu8_epi32(pair);
    }
    static void store_u8(unsigned char* p, ints<xsimd::avx512bw> x) noexcept {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(x));
    }
};
template <>
struct half_scalar<xsimd::avx512bw, false> {
    static float load(const unsigned char* p) noexcept { return _cvtsh_ss(qc::load_u16<xsimd::avx512bw>(p)); }
};
#endif

} // namespace quant
} // namespace kvc::kernels::simd

// F16C scalar conversions for the per-group scalar work (bit-identical to the
// software conversions: round to nearest even).
namespace kvc::kernels::quant_common {
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <>
struct half_convert<simd::avx2_arch> {
    static std::uint16_t from_float(float x) noexcept {
        return static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    }
    static float to_float(std::uint16_t bits) noexcept { return _cvtsh_ss(bits); }
};
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct half_convert<xsimd::avx512bw> {
    static std::uint16_t from_float(float x) noexcept {
        return static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    }
    static float to_float(std::uint16_t bits) noexcept { return _cvtsh_ss(bits); }
};
#endif
} // namespace kvc::kernels::quant_common

namespace kvc::kernels::simd {
namespace quant {

// ---------------------------------------------------------------------------
// Payload -> codes. decode() writes 32 / lanes batches; an element's value is
// code * (d * unit) (+ m), exactly the float of format.hpp's rule (see
// quant_common::value_of: code * d is exact, unit is a power of two).

template <class A, quant_format F, bool Portable = false>
struct codes {
    static constexpr std::size_t lanes = floats<A>::size;
    static constexpr std::size_t batches = quant_payload_elements / lanes;
    static constexpr float unit = 1.0f;
    static void decode(const unsigned char* payload, floats<A>* out) noexcept {
        using bytes = byte_loader<A, Portable>;
        if constexpr (F == quant_format::int8_sym) {
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < batches; ++i) out[i] = xsimd::batch_cast<float>(bytes::s8(payload + i * lanes));
        } else if constexpr (F == quant_format::int4_sym || F == quant_format::int4_asym) {
            constexpr std::size_t half = batches / 2;
            const ints<A> bias(F == quant_format::int4_sym ? 8 : 0);
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < half; ++i) {
                const ints<A> b = bytes::u8(payload + i * lanes);
                out[i] = xsimd::batch_cast<float>((b & ints<A>(15)) - bias);
                out[i + half] = xsimd::batch_cast<float>((b >> 4) - bias);
            }
        } else if constexpr (F == quant_format::int2_asym) {
            if constexpr (lanes <= 8) {
                constexpr std::size_t quarter = batches / 4; // batches per shift
                KVC_QUANT_UNROLL
                for (std::size_t i = 0; i < quarter; ++i) {
                    const ints<A> b = bytes::u8(payload + i * lanes);
                    out[i] = xsimd::batch_cast<float>(b & ints<A>(3));
                    out[quarter + i] = xsimd::batch_cast<float>((b >> 2) & ints<A>(3));
                    out[2 * quarter + i] = xsimd::batch_cast<float>((b >> 4) & ints<A>(3));
                    out[3 * quarter + i] = xsimd::batch_cast<float>((b >> 6) & ints<A>(3));
                }
            } else { // 16 lanes: batch i is codes 16 i .. 16 i + 15
                out[0] = xsimd::batch_cast<float>(bytes::int2_codes(payload, 0));
                out[1] = xsimd::batch_cast<float>(bytes::int2_codes(payload, 1));
            }
        } else if constexpr (F == quant_format::fp8_e4m3) {
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < batches; ++i) {
                const ints<A> c = bytes::u8(payload + i * lanes);
                const ints<A> magnitude = c & ints<A>(0x7f);
                const ints<A> normal = (magnitude << 20) + ints<A>(120 << 23);
                const ints<A> subnormal =
                    xsimd::bitwise_cast<ints<A>>(xsimd::batch_cast<float>(magnitude) * floats<A>(0x1p-9f));
                ints<A> value = select_ints<A>(xsimd::batch_cast<float>(magnitude) < floats<A>(8.0f), subnormal, normal);
                value = select_ints<A>(xsimd::batch_cast<float>(magnitude) == floats<A>(127.0f), ints<A>(0x7fc00000), value);
                out[i] = xsimd::bitwise_cast<floats<A>>(value | ((c & ints<A>(0x80)) << 24));
            }
        } else { // fp8_e5m2
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < batches; ++i) {
                const ints<A> c = bytes::u8(payload + i * lanes);
                const ints<A> magnitude = c & ints<A>(0x7f);
                const ints<A> normal = (magnitude << 21) + ints<A>(112 << 23);
                const ints<A> subnormal =
                    xsimd::bitwise_cast<ints<A>>(xsimd::batch_cast<float>(magnitude) * floats<A>(0x1p-16f));
                const ints<A> special = ints<A>(0x7f800000) | ((magnitude & ints<A>(3)) << 21);
                ints<A> value = select_ints<A>(xsimd::batch_cast<float>(magnitude) < floats<A>(4.0f), subnormal, normal);
                value = select_ints<A>(xsimd::batch_cast<float>(magnitude) >= floats<A>(124.0f), special, value);
                out[i] = xsimd::bitwise_cast<floats<A>>(value | ((c & ints<A>(0x80)) << 24));
            }
        }
    }
};

// fp8 through F16C: e5m2 is the top byte of an fp16; e4m3's magnitude shifted
// into an fp16 is its value / 256 (exponent bias 15 instead of 7), subnormals
// included; S.1111.111 becomes an fp16 NaN.
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <>
struct codes<avx2_arch, quant_format::fp8_e5m2, false> {
    static constexpr std::size_t batches = 4;
    static constexpr float unit = 1.0f;
    static void decode(const unsigned char* payload, floats<avx2_arch>* out) noexcept {
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < 2; ++i) {
            const __m128i h = _mm_slli_epi16(
                _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(payload + 8 * i))), 8);
            out[i] = _mm256_cvtph_ps(h);
            out[i + 2] = _mm256_cvtph_ps(_mm_slli_epi16(
                _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(payload + 16 + 8 * i))), 8));
        }
    }
};
template <>
struct codes<avx2_arch, quant_format::fp8_e4m3, false> {
    static constexpr std::size_t batches = 4;
    static constexpr float unit = 256.0f;
    // Sign-extended byte << 7 with bit 14 cleared is the fp16 of value / 256;
    // S.1111.111 (fp16 magnitude 0x3f80) becomes NaN.
    static __m128i to_half(const unsigned char* p) noexcept {
        const __m128i c = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
        const __m128i h = _mm_and_si128(_mm_slli_epi16(c, 7), _mm_set1_epi16(static_cast<short>(0xbfff)));
        const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_set1_epi16(0x3f80));
        return _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7c00)));
    }
    static void decode(const unsigned char* payload, floats<avx2_arch>* out) noexcept {
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < 4; ++i) out[i] = _mm256_cvtph_ps(to_half(payload + 8 * i));
    }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct codes<xsimd::avx512bw, quant_format::fp8_e5m2, false> {
    static constexpr std::size_t batches = 2;
    static constexpr float unit = 1.0f;
    static void decode(const unsigned char* payload, floats<xsimd::avx512bw>* out) noexcept {
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < 2; ++i) {
            const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + 16 * i)));
            out[i] = _mm512_cvtph_ps(_mm256_slli_epi16(c, 8));
        }
    }
};
template <>
struct codes<xsimd::avx512bw, quant_format::fp8_e4m3, false> {
    static constexpr std::size_t batches = 2;
    static constexpr float unit = 256.0f;
    static void decode(const unsigned char* payload, floats<xsimd::avx512bw>* out) noexcept {
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < 2; ++i) {
            // Sign-extended byte << 7: the sign lands in bits 15 and 14, exponent and
            // mantissa in 13..7; clearing bit 14 leaves the fp16 of value / 256.
            const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + 16 * i)));
            const __m256i h = _mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16(static_cast<short>(0xbfff)));
            // S.1111.111 (fp16 magnitude 0x3f80) is NaN.
            const __mmask16 nan =
                _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x3f80));
            out[i] = _mm512_cvtph_ps(_mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7e00)));
        }
    }
};
#endif

// Nibbles and bit pairs split in the byte domain (128-bit operations, cheap)
// before one widening per batch, instead of shifting and masking 32-bit lanes.
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <quant_format F>
struct byte_domain_codes_avx2 {
    static constexpr std::size_t batches = 4;
    static constexpr float unit = 1.0f;
    static __m256 widen(__m128i bytes) noexcept {
        if constexpr (F == quant_format::int4_sym) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        else return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    }
    static void decode(const unsigned char* payload, floats<avx2_arch>* out) noexcept {
        if constexpr (F == quant_format::int2_asym) {
            const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(payload));
            const __m128i three = _mm_set1_epi8(3);
            out[0] = widen(_mm_and_si128(b, three));
            out[1] = widen(_mm_and_si128(_mm_srli_epi16(b, 2), three));
            out[2] = widen(_mm_and_si128(_mm_srli_epi16(b, 4), three));
            out[3] = widen(_mm_and_si128(_mm_srli_epi16(b, 6), three));
        } else {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload));
            const __m128i mask = _mm_set1_epi8(15);
            __m128i low = _mm_and_si128(b, mask), high = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            if constexpr (F == quant_format::int4_sym) {
                low = _mm_sub_epi8(low, _mm_set1_epi8(8));
                high = _mm_sub_epi8(high, _mm_set1_epi8(8));
            }
            out[0] = widen(low);
            out[1] = widen(_mm_unpackhi_epi64(low, low));
            out[2] = widen(high);
            out[3] = widen(_mm_unpackhi_epi64(high, high));
        }
    }
};
template <>
struct codes<avx2_arch, quant_format::int4_sym, false> : byte_domain_codes_avx2<quant_format::int4_sym> {};
template <>
struct codes<avx2_arch, quant_format::int4_asym, false> : byte_domain_codes_avx2<quant_format::int4_asym> {};
template <>
struct codes<avx2_arch, quant_format::int2_asym, false> : byte_domain_codes_avx2<quant_format::int2_asym> {};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <quant_format F>
struct byte_domain_codes_avx512 {
    static constexpr std::size_t batches = 2;
    static constexpr float unit = 1.0f;
    static __m512 widen(__m128i bytes) noexcept {
        if constexpr (F == quant_format::int4_sym) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        else return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    }
    static void decode(const unsigned char* payload, floats<xsimd::avx512bw>* out) noexcept {
        if constexpr (F == quant_format::int2_asym) {
            const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(payload));
            const __m128i three = _mm_set1_epi8(3);
            const __m128i b4 = _mm_srli_epi16(b, 4);
            out[0] = widen(_mm_and_si128(_mm_unpacklo_epi64(b, _mm_srli_epi16(b, 2)), three));
            out[1] = widen(_mm_and_si128(_mm_unpacklo_epi64(b4, _mm_srli_epi16(b4, 2)), three));
        } else {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload));
            const __m128i mask = _mm_set1_epi8(15);
            __m128i low = _mm_and_si128(b, mask), high = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            if constexpr (F == quant_format::int4_sym) {
                low = _mm_sub_epi8(low, _mm_set1_epi8(8));
                high = _mm_sub_epi8(high, _mm_set1_epi8(8));
            }
            out[0] = widen(low);
            out[1] = widen(high);
        }
    }
};
template <>
struct codes<xsimd::avx512bw, quant_format::int4_sym, false> : byte_domain_codes_avx512<quant_format::int4_sym> {};
template <>
struct codes<xsimd::avx512bw, quant_format::int4_asym, false> : byte_domain_codes_avx512<quant_format::int4_asym> {};
template <>
struct codes<xsimd::avx512bw, quant_format::int2_asym, false> : byte_domain_codes_avx512<quant_format::int2_asym> {};
#endif

// The header of a group: scale (times the decoder's unit) and minimum, broadcast.
template <class A, quant_format F, bool Portable>
struct group_header {
    floats<A> scale, minimum;
    explicit group_header(const unsigned char* group) noexcept
        : scale(half_scalar<A, Portable>::load(group) * codes<A, F, Portable>::unit),
          minimum(format_traits<F>::has_minimum ? half_scalar<A, Portable>::load(group + 2) : 0.0f) {}
    floats<A> value(floats<A> code) const noexcept {
        if constexpr (format_traits<F>::has_minimum) return xsimd::fma(code, scale, minimum);
        else return code * scale;
    }
};

template <class A, quant_format F>
inline std::size_t group_bytes(std::size_t group_size) noexcept {
    return format_traits<F>::header_bytes + group_size / quant_payload_elements * format_traits<F>::payload_bytes;
}

// ---------------------------------------------------------------------------
// Rows.

template <class A, bool Portable, quant_format F>
void dequantize_row(const void* src, float* dst, std::size_t n, std::size_t group_size) noexcept {
    using decoder = codes<A, F, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* group = static_cast<const unsigned char*>(src);
    const std::size_t payloads = group_size / quant_payload_elements;
    for (std::size_t e = 0; e < n; group += group_bytes<A, F>(group_size)) {
        const group_header<A, F, Portable> header(group);
        const unsigned char* payload = group + format_traits<F>::header_bytes;
        for (std::size_t s = 0; s < payloads; ++s, payload += format_traits<F>::payload_bytes, e += quant_payload_elements) {
            floats<A> x[decoder::batches];
            decoder::decode(payload, x);
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < decoder::batches; ++i) header.value(x[i]).store_unaligned(dst + e + i * lanes);
        }
    }
}

// Pass 1 of a group: max, min, and whether any element is NaN or infinite.
// Formats that only need the largest magnitude (int8_sym, fp8) reduce |x|
// once and report it as max (min = -max): plan_group only uses max(max, -min).
template <class A, bool Portable, quant_format F, dtype D>
KVC_QUANT_INLINE qc::group_stats group_stats_of(const typename common::element<A, D>::storage* src,
                                                 std::size_t group_size) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    constexpr bool magnitude_only =
        F == quant_format::int8_sym || F == quant_format::fp8_e4m3 || F == quant_format::fp8_e5m2;
    const floats<A> largest(3.40282347e38f);
    xsimd::batch_bool<float, A> finite(true);
    if constexpr (magnitude_only) {
        floats<A> amax(0.0f);
        for (std::size_t i = 0; i < group_size; i += lanes) {
            const floats<A> a = xsimd::abs(loader<A, D>::load(src + i));
            amax = xsimd::max(amax, a);
            finite = finite & (a <= largest);
        }
        const float m = lane_extremes<A, Portable>::max(amax);
        return qc::group_stats{m, -m, !xsimd::all(finite)};
    } else {
        floats<A> high(-std::numeric_limits<float>::infinity()), low(std::numeric_limits<float>::infinity());
        for (std::size_t i = 0; i < group_size; i += lanes) {
            const floats<A> x = loader<A, D>::load(src + i);
            high = xsimd::max(high, x);
            low = xsimd::min(low, x);
            finite = finite & (xsimd::abs(x) <= largest);
        }
        return qc::group_stats{lane_extremes<A, Portable>::max(high), lane_extremes<A, Portable>::min(low),
                               !xsimd::all(finite)};
    }
}

// Pass 2 of a group: header and codes.
template <class A, bool Portable, quant_format F, dtype D>
KVC_QUANT_INLINE void encode_group(const typename common::element<A, D>::storage* src, unsigned char* out,
                                    std::size_t group_size, const qc::group_plan& plan) noexcept {
    using traits = format_traits<F>;
    using bytes = byte_loader<A, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = quant_payload_elements / lanes;
    const std::size_t payloads = group_size / quant_payload_elements;
    qc::store_u16<A>(out, plan.scale_bits);
    if constexpr (traits::has_minimum) qc::store_u16<A>(out + 2, plan.minimum_bits);
    unsigned char* payload = out + traits::header_bytes;
    if (plan.non_finite) {
        std::memset(payload, 0, payloads * traits::payload_bytes);
        return;
    }
    const floats<A> inverse(plan.inverse), offset(plan.offset), lowest(plan.low), highest(plan.high);
    const ints<A> bias(plan.bias);
    for (std::size_t s = 0; s < payloads; ++s, payload += traits::payload_bytes) {
        ints<A> c[batches];
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < batches; ++i) {
            const floats<A> x = loader<A, D>::load(src + s * quant_payload_elements + i * lanes);
            if constexpr (F == quant_format::fp8_e4m3 || F == quant_format::fp8_e5m2) {
                constexpr bool e4m3 = F == quant_format::fp8_e4m3;
                const ints<A> bits = xsimd::bitwise_cast<ints<A>>(x * inverse);
                const ints<A> sign = (bits >> 24) & ints<A>(0x80);
                const ints<A> a = bits & ints<A>(0x7fffffff);
                const ints<A> sub =
                    xsimd::nearbyint_as_int(xsimd::bitwise_cast<floats<A>>(a) * floats<A>(e4m3 ? 512.0f : 65536.0f));
                constexpr std::int32_t mantissa_shift = e4m3 ? 20 : 21;
                const ints<A> normal = xsimd::min(
                    ((a + ints<A>((1 << (mantissa_shift - 1)) - 1) + ((a >> mantissa_shift) & ints<A>(1))) >> mantissa_shift) -
                        ints<A>(e4m3 ? (120 << 3) : (112 << 2)),
                    ints<A>(e4m3 ? 0x7e : 0x7b));
                c[i] = select_ints<A>(xsimd::bitwise_cast<floats<A>>(a) < xsimd::bitwise_cast<floats<A>>(ints<A>(e4m3 ? 0x3c800000 : 0x38800000)), sub, normal) | sign;
            } else {
                // (x - 0) * inverse is x * inverse bit for bit, -0 included.
                const floats<A> shifted = format_traits<F>::has_minimum ? x - offset : x;
                const floats<A> y = xsimd::min(xsimd::max(shifted * inverse, lowest), highest);
                c[i] = xsimd::nearbyint_as_int(y) + bias;
            }
        }
        if constexpr (F == quant_format::int8_sym || F == quant_format::fp8_e4m3 || F == quant_format::fp8_e5m2) {
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < batches; ++i) bytes::store_u8(payload + i * lanes, c[i] & ints<A>(0xff));
        } else if constexpr (F == quant_format::int4_sym || F == quant_format::int4_asym) {
            constexpr std::size_t half = batches / 2;
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < half; ++i) bytes::store_u8(payload + i * lanes, c[i] | (c[i + half] << 4));
        } else { // int2_asym
            if constexpr (lanes <= 8) {
                constexpr std::size_t quarter = batches / 4;
                KVC_QUANT_UNROLL
                for (std::size_t i = 0; i < quarter; ++i)
                    bytes::store_u8(payload + i * lanes, c[i] | (c[i + quarter] << 2) | (c[i + 2 * quarter] << 4) |
                                                             (c[i + 3 * quarter] << 6));
            } else { // 16 lanes: elements 0..15 in c[0], 16..31 in c[1]
                unsigned char low[lanes], high[lanes];
                bytes::store_u8(low, c[0]);
                bytes::store_u8(high, c[1]);
                for (std::size_t j = 0; j < 8; ++j)
                    payload[j] = static_cast<unsigned char>(low[j] | low[j + 8] << 2 | high[j] << 4 | high[j + 8] << 6);
            }
        }
    }
}

// Scales of up to 8 groups. Generic: quant_common::plan_group per group.
template <class A, bool Portable, quant_format F>
struct group_planner {
    static void plan(const qc::group_stats* stats, std::size_t groups, qc::group_plan* plans) noexcept {
        for (std::size_t g = 0; g < groups; ++g) plans[g] = qc::plan_group<A, F>(stats[g]);
    }
};


// A row, up to 8 groups at a time in three sweeps (statistics, scales,
// codes): the per-group scalar work (two divisions and the fp16 rounding of
// the scale) is a serial chain of some 60 cycles, and the groups' chains are
// independent, so computing them together lets them overlap.
template <class A, bool Portable, quant_format F, dtype D>
void quantize_row(const void* src, void* dst, std::size_t n, std::size_t group_size) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t chunk = 8;
    const auto* in = static_cast<const storage*>(src);
    auto* out = static_cast<unsigned char*>(dst);
    const std::size_t bytes = group_bytes<A, F>(group_size);
    for (std::size_t e0 = 0; e0 < n; e0 += chunk * group_size) {
        const std::size_t left = (n - e0) / group_size;
        const std::size_t groups = left < chunk ? left : chunk;
        qc::group_stats stats[chunk];
        qc::group_plan plans[chunk];
        for (std::size_t g = 0; g < groups; ++g)
            stats[g] = group_stats_of<A, Portable, F, D>(in + e0 + g * group_size, group_size);
        group_planner<A, Portable, F>::plan(stats, groups, plans);
        for (std::size_t g = 0; g < groups; ++g)
            encode_group<A, Portable, F, D>(in + e0 + g * group_size, out + (e0 / group_size + g) * bytes, group_size,
                                            plans[g]);
    }
}

// ---------------------------------------------------------------------------
// Fused decode attention.

inline constexpr std::size_t block_tokens = 64;

template <std::size_t H>
using weights_block = float[H][block_tokens];

// sums[h] = sum of the lanes of acc[h], h < N. Instruction sets with wide
// registers reduce four accumulators together (one transpose-and-add tree
// instead of four horizontal sums).
template <class A, std::size_t N, bool Portable = false>
struct lane_sums {
    static void reduce(const floats<A>* acc, float* sums) noexcept {
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < N; ++h) sums[h] = xsimd::hadd(acc[h]);
    }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <std::size_t N>
struct lane_sums<xsimd::avx512bw, N, false> {
    static void reduce(const floats<xsimd::avx512bw>* acc, float* sums) noexcept {
        std::size_t h = 0;
        KVC_QUANT_UNROLL
        for (; h + 4 <= N; h += 4) {
            const __m512 a0 = acc[h], a1 = acc[h + 1], a2 = acc[h + 2], a3 = acc[h + 3];
            // [a0 q0+q2, a0 q1+q3, a1 q0+q2, a1 q1+q3] (128-bit quarters q)
            const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
            const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xee));
            // quarter k: four partial sums of accumulator k
            const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xdd));
            const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4e));
            const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
            alignas(64) float lanes[16];
            _mm512_store_ps(lanes, w);
            sums[h] = lanes[0];
            sums[h + 1] = lanes[4];
            sums[h + 2] = lanes[8];
            sums[h + 3] = lanes[12];
        }
        KVC_QUANT_UNROLL
        for (; h < N; ++h) sums[h] = xsimd::hadd(acc[h]);
    }
};
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <std::size_t N>
struct lane_sums<avx2_arch, N, false> {
    static void reduce(const floats<avx2_arch>* acc, float* sums) noexcept {
        std::size_t h = 0;
        KVC_QUANT_UNROLL
        for (; h + 4 <= N; h += 4) {
            const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[h], acc[h + 1]), _mm256_hadd_ps(acc[h + 2], acc[h + 3]));
            _mm_storeu_ps(sums + h, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
        }
        KVC_QUANT_UNROLL
        for (; h < N; ++h) sums[h] = xsimd::hadd(acc[h]);
    }
};
#endif

// Dot products of T consecutive packed key rows (from `row`) with H queries:
// sums[i * H + h] = <q_h, k_i>. Each key payload is decoded once into
// registers; each query batch is loaded once for the T rows.
template <class A, bool Portable, quant_format F, std::size_t H, std::size_t T>
KVC_QUANT_INLINE void key_dots(const quant_decode_problem& p, const unsigned char* row, const float* const* q,
                     float* sums) noexcept {
    using decoder = codes<A, F, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = decoder::batches;
    const std::size_t group_size = p.rows.group_size;
    const std::size_t payloads = group_size / quant_payload_elements;
    const std::size_t stride = group_bytes<A, F>(group_size);
    const std::size_t row_bytes = p.rows.key_row_bytes;
    floats<A> acc[T * H];
    KVC_QUANT_UNROLL
    for (std::size_t j = 0; j < T * H; ++j) acc[j] = floats<A>(0.0f);
    std::size_t e = 0;
    for (std::size_t offset = 0; e < p.dim; offset += stride) {
        floats<A> scale[T], minimum[T];
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < T; ++i) {
            const group_header<A, F, Portable> header(row + i * row_bytes + offset);
            scale[i] = header.scale;
            minimum[i] = header.minimum;
        }
        const unsigned char* payload = row + offset + format_traits<F>::header_bytes;
        for (std::size_t s = 0; s < payloads; ++s, payload += format_traits<F>::payload_bytes, e += quant_payload_elements) {
            floats<A> k[T][batches];
            KVC_QUANT_UNROLL
            for (std::size_t i = 0; i < T; ++i) {
                decoder::decode(payload + i * row_bytes, k[i]);
                KVC_QUANT_UNROLL
                for (std::size_t b = 0; b < batches; ++b) {
                    if constexpr (format_traits<F>::has_minimum) k[i][b] = xsimd::fma(k[i][b], scale[i], minimum[i]);
                    else k[i][b] = k[i][b] * scale[i];
                }
            }
            KVC_QUANT_UNROLL
            for (std::size_t b = 0; b < batches; ++b) {
                KVC_QUANT_UNROLL
                for (std::size_t h = 0; h < H; ++h) {
                    const floats<A> qv = floats<A>::load_unaligned(q[h] + e + b * lanes);
                    KVC_QUANT_UNROLL
                    for (std::size_t i = 0; i < T; ++i) acc[i * H + h] = xsimd::fma(qv, k[i][b], acc[i * H + h]);
                }
            }
        }
    }
    lane_sums<A, T * H, Portable>::reduce(acc, sums);
}

// The H query heads of one attend_heads call. For the integer key formats
// (quant_common::quantize_query) q[h] is the dequantized query q^ and
// quantized[h] its int8 codes; for fp8 keys q[h] is the fp32 query.
template <std::size_t H>
struct head_queries {
    const float* q[H];
    const qc::quantized_query* quantized[H];
};

// weights[h][t] = scale * <q_h, k_(t0 + t)> + bias for the block's packed key
// rows from `begin` on, two rows per step where the registers allow (wide vectors or few heads).
template <class A, bool Portable, quant_format F, std::size_t H>
void key_logits(const quant_decode_problem& p, std::size_t t0, std::size_t count, const head_queries<H>& heads,
                float (*weights)[block_tokens], std::size_t begin) noexcept {
    constexpr std::size_t T = floats<A>::size >= 16 ? 4 : (H <= 2 ? 2 : 1);
    const auto* rows = static_cast<const unsigned char*>(p.rows.keys) + t0 * p.rows.key_row_bytes;
    const float* bias = p.bias ? p.bias + p.sink.tokens + t0 : nullptr;
    const float* const* q = heads.q;
    float sums[T * H];
    std::size_t t = begin;
    for (; t + T <= count; t += T) {
        key_dots<A, Portable, F, H, T>(p, rows + t * p.rows.key_row_bytes, q, sums);
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < T; ++i) {
            KVC_QUANT_UNROLL
            for (std::size_t h = 0; h < H; ++h)
                weights[h][t + i] = sums[i * H + h] * p.scale + (bias ? bias[t + i] : 0.0f);
        }
    }
    for (; t < count; ++t) {
        key_dots<A, Portable, F, H, 1>(p, rows + t * p.rows.key_row_bytes, q, sums);
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) weights[h][t] = sums[h] * p.scale + (bias ? bias[t] : 0.0f);
    }
}

// acc(g0 + h, payloads u .. u + P - 1) += sum over the block's tokens of
// weights[h][t] * v_(t0 + t): P payloads x batches x H heads of accumulators
// held in registers while the block's value rows stream past.
template <class A, bool Portable, quant_format F, std::size_t H, std::size_t P>
KVC_QUANT_INLINE void accumulate_tile(const quant_decode_problem& p, float* acc_out, const unsigned char* rows,
                                       std::size_t count, std::size_t u, const float (*weights)[block_tokens]) noexcept {
    using decoder = codes<A, F, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = decoder::batches;
    const std::size_t payloads = p.rows.group_size / quant_payload_elements;
    const std::size_t stride = group_bytes<A, F>(p.rows.group_size);
    const std::size_t row_bytes = p.rows.value_row_bytes;
    std::size_t header_offset[P], offset[P];
    KVC_QUANT_UNROLL
    for (std::size_t j = 0; j < P; ++j) {
        header_offset[j] = (u + j) / payloads * stride;
        offset[j] = header_offset[j] + format_traits<F>::header_bytes + (u + j) % payloads * format_traits<F>::payload_bytes;
    }
    float* out = acc_out + u * quant_payload_elements;
    floats<A> acc[H][P * batches];
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < P * batches; ++b) acc[h][b] = floats<A>::load_unaligned(out + h * p.dim + b * lanes);
    }
    const unsigned char* row = rows;
    for (std::size_t t = 0; t < count; ++t, row += row_bytes) {
        floats<A> v[P * batches];
        KVC_QUANT_UNROLL
        for (std::size_t j = 0; j < P; ++j) {
            const group_header<A, F, Portable> header(row + header_offset[j]);
            decoder::decode(row + offset[j], v + j * batches);
            KVC_QUANT_UNROLL
            for (std::size_t b = 0; b < batches; ++b) v[j * batches + b] = header.value(v[j * batches + b]);
        }
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) {
            const floats<A> w(weights[h][t]);
            KVC_QUANT_UNROLL
            for (std::size_t b = 0; b < P * batches; ++b) acc[h][b] = xsimd::fma(w, v[b], acc[h][b]);
        }
    }
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < P * batches; ++b) acc[h][b].store_unaligned(out + h * p.dim + b * lanes);
    }
}

// acc(g0 + h) += sum over the block's tokens of weights[h][t] * v_(t0 + t),
// in tiles of two payloads where the registers hold them (wide vectors), else one.
template <class A, bool Portable, quant_format F, std::size_t H>
void accumulate_values(const quant_decode_problem& p, const decode_state& s, std::size_t g0, std::size_t t0,
                       std::size_t count, const float (*weights)[block_tokens]) noexcept {
    constexpr std::size_t batches = codes<A, F, Portable>::batches;
    constexpr std::size_t P = 2 * batches * H <= 16 ? 2 : 1;
    const auto* rows = static_cast<const unsigned char*>(p.rows.values) + t0 * p.rows.value_row_bytes;
    const std::size_t total = p.dim / quant_payload_elements;
    float* acc = s.acc + g0 * p.dim;
    std::size_t u = 0;
    for (; u + P <= total; u += P) accumulate_tile<A, Portable, F, H, P>(p, acc, rows, count, u, weights);
    for (; u < total; ++u) accumulate_tile<A, Portable, F, H, 1>(p, acc, rows, count, u, weights);
}

template <std::size_t H>
using logits_fn = void (*)(const quant_decode_problem&, std::size_t, std::size_t, const head_queries<H>&,
                           float (*)[block_tokens], std::size_t) noexcept;
template <std::size_t H>
using values_fn = void (*)(const quant_decode_problem&, const decode_state&, std::size_t, std::size_t, std::size_t,
                           const float (*)[block_tokens]) noexcept;

// ---------------------------------------------------------------------------
// Integer key scores with AVX-512 VNNI (VPDPBUSD: 64 unsigned x signed byte
// products summed in fours into 16 int32 lanes, one instruction).
//
// Compiled into the AVX-512 unit through a target attribute (the unit itself
// is built without -mavx512vnni) and reached only through the separate
// AVX-512 + VNNI table (make_table_vnni, picked when cpu().avx512_vnni), so no
// VNNI instruction runs on a CPU without it. Every function here is a
// template on the Arch, so its symbols carry xsimd::avx512bw (dispatch hygiene).
//
// Layout: 16 tokens per step, one int32 lane per token. A payload of the 16
// rows is transposed in registers so that vector j holds dword j (codes
// 4j..4j+3; for int4, after the nibble split, the low or high nibbles) of
// every token; one VPDPBUSD with the query's dword j broadcast then adds four
// products to each token's sum, and the payload's dot products of 16 tokens
// come out in one vector with no horizontal reduction. The key scales and
// minimums of 16 rows are one gather of the group header.
// The codes must be unsigned for VPDPBUSD: int8 keys are stored as k + 128
// (the xor 0x80) and int4_sym as q = code + 8; the surplus 128 C_p or 8 C_p
// (C_p = sum of the query codes) starts the accumulator negative.
#if defined(__AVX512F__) && defined(__AVX512BW__) && (defined(__GNUC__) || defined(__clang__))
#define KVC_QUANT_HAS_VNNI 1
#define KVC_VNNI_TARGET __attribute__((target("avx512vnni")))
#if defined(__SANITIZE_ADDRESS__)
#define KVC_VNNI_INLINE inline
#else
#define KVC_VNNI_INLINE inline __attribute__((always_inline))
#endif

// 4 x 4 transpose of dwords inside each 128-bit block of z[0..3].
template <class A>
KVC_VNNI_TARGET KVC_VNNI_INLINE void transpose_blocks(const __m512i* z, __m512i* out) noexcept {
    const __m512i ab_low = _mm512_unpacklo_epi32(z[0], z[1]), ab_high = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i cd_low = _mm512_unpacklo_epi32(z[2], z[3]), cd_high = _mm512_unpackhi_epi32(z[2], z[3]);
    out[0] = _mm512_unpacklo_epi64(ab_low, cd_low);
    out[1] = _mm512_unpackhi_epi64(ab_low, cd_low);
    out[2] = _mm512_unpacklo_epi64(ab_high, cd_high);
    out[3] = _mm512_unpackhi_epi64(ab_high, cd_high);
}

// Payload bytes of 16 rows (row i at payload + i * row_bytes) -> x[j], lane i =
// the unsigned codes paired with the query's dword j (elements 4j..4j+3).
template <class A, quant_format F>
KVC_VNNI_TARGET KVC_VNNI_INLINE void transposed_codes(const unsigned char* payload, std::size_t row_bytes,
                                                      __m512i* x) noexcept {
    if constexpr (F == quant_format::int8_sym) {
        // z[k] = rows k | 4 + k (k < 4), rows 8 + k | 12 + k (k >= 4), 32 bytes each;
        // after the block transposes and one block shuffle, x[j] lists rows 0..15 in order.
        __m512i z[8], w[8];
        KVC_QUANT_UNROLL
        for (std::size_t k = 0; k < 4; ++k) {
            z[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(payload + k * row_bytes))),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(payload + (4 + k) * row_bytes)), 1);
            z[4 + k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
                                              reinterpret_cast<const __m256i*>(payload + (8 + k) * row_bytes))),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(payload + (12 + k) * row_bytes)), 1);
        }
        transpose_blocks<A>(z, w);
        transpose_blocks<A>(z + 4, w + 4);
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        KVC_QUANT_UNROLL
        for (std::size_t j = 0; j < 4; ++j) {
            x[j] = _mm512_xor_si512(_mm512_shuffle_i32x4(w[j], w[4 + j], 0x88), flip);
            x[4 + j] = _mm512_xor_si512(_mm512_shuffle_i32x4(w[j], w[4 + j], 0xdd), flip);
        }
    } else { // int4: 16 bytes per row; block b of z[k] is row 4b + k
        __m512i z[4], v[4];
        KVC_QUANT_UNROLL
        for (std::size_t k = 0; k < 4; ++k) {
            __m512i r = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + k * row_bytes)));
            r = _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + (4 + k) * row_bytes)), 1);
            r = _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + (8 + k) * row_bytes)), 2);
            z[k] = _mm512_inserti32x4(r, _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + (12 + k) * row_bytes)), 3);
        }
        transpose_blocks<A>(z, v);
        const __m512i nibble = _mm512_set1_epi8(0x0f);
        KVC_QUANT_UNROLL
        for (std::size_t j = 0; j < 4; ++j) {
            x[j] = _mm512_and_si512(v[j], nibble);                          // elements 4j..4j+3
            x[4 + j] = _mm512_and_si512(_mm512_srli_epi16(v[j], 4), nibble); // elements 16+4j..
        }
    }
}

template <class A, quant_format F, std::size_t H>
KVC_VNNI_TARGET void key_logits_vnni(const quant_decode_problem& p, std::size_t t0, std::size_t count,
                                     const head_queries<H>& heads, float (*weights)[block_tokens],
                                     std::size_t begin) noexcept {
    using traits = format_traits<F>;
    constexpr std::size_t step = 16;
    // Surplus of the unsigned codes per unit of C_p (see above).
    constexpr std::int32_t surplus = F == quant_format::int8_sym ? 128 : (F == quant_format::int4_sym ? 8 : 0);
    const std::size_t row_bytes = p.rows.key_row_bytes;
    const std::size_t per_group = p.rows.group_size / quant_payload_elements;
    const std::size_t stride = group_bytes<A, F>(p.rows.group_size);
    const std::size_t payloads = p.dim / quant_payload_elements;
    const auto* rows = static_cast<const unsigned char*>(p.rows.keys) + t0 * row_bytes;
    const float* bias = p.bias ? p.bias + p.sink.tokens + t0 : nullptr;
    const __m512i row_offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(row_bytes)));
    const __m512 logit_scale = _mm512_set1_ps(p.scale);
    std::size_t t = begin;
    for (; t + step <= count; t += step) {
        const unsigned char* block = rows + t * row_bytes;
        // The transposed loads visit 16 rows in an order the hardware prefetchers
        // do not follow well from memory (int8 rows: 230 TSC cycles per token
        // and head cold without this, 110-150 with it, 140-165 for the float
        // path); fetch the next 16 rows ahead. Prefetches never fault, so
        // running past the last row is harmless. (Prefetching the value rows
        // too measured anywhere from better to worse on a loaded machine: not kept.)
        const char* next = reinterpret_cast<const char*>(block + step * row_bytes);
        for (std::size_t line = 0; line < step * row_bytes; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
        __m512 score[H];
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) score[h] = _mm512_setzero_ps();
        std::size_t u = 0; // payload index along the row
        for (const unsigned char* group = block; u < payloads; group += stride) {
            const __m512i header = _mm512_i32gather_epi32(row_offsets, group, 1);
            const __m512 scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(header));
            __m512 minimum = _mm512_setzero_ps();
            if constexpr (traits::has_minimum) minimum = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(header, 16)));
            for (std::size_t s = 0; s < per_group; ++s, ++u) {
                __m512i x[8];
                transposed_codes<A, F>(group + traits::header_bytes + s * traits::payload_bytes, row_bytes, x);
                KVC_QUANT_UNROLL
                for (std::size_t h = 0; h < H; ++h) {
                    const qc::quantized_query& q = *heads.quantized[h];
                    const std::int8_t* c = q.codes + u * quant_payload_elements;
                    std::int32_t dword[8];
                    std::memcpy(dword, c, sizeof dword);
                    // Two accumulators halve the VPDPBUSD dependency chain.
                    __m512i even = _mm512_set1_epi32(-surplus * q.sums[u]), odd = _mm512_setzero_si512();
                    KVC_QUANT_UNROLL
                    for (std::size_t j = 0; j < 8; j += 2) {
                        even = _mm512_dpbusd_epi32(even, x[j], _mm512_set1_epi32(dword[j]));
                        odd = _mm512_dpbusd_epi32(odd, x[j + 1], _mm512_set1_epi32(dword[j + 1]));
                    }
                    __m512 term = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), scale);
                    if constexpr (traits::has_minimum)
                        term = _mm512_fmadd_ps(minimum, _mm512_set1_ps(static_cast<float>(q.sums[u])), term);
                    score[h] = _mm512_fmadd_ps(term, _mm512_set1_ps(q.scales[u]), score[h]);
                }
            }
        }
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) {
            __m512 w = _mm512_mul_ps(score[h], logit_scale);
            if (bias) w = _mm512_add_ps(w, _mm512_loadu_ps(bias + t));
            _mm512_store_ps(weights[h] + t, w);
        }
    }
    if (t < count) key_logits<A, false, F, H>(p, t0, count, heads, weights, t);
}
#endif

template <class A, bool Portable, std::size_t H, bool Vnni>
logits_fn<H> logits_for(quant_format format) noexcept {
#if defined(KVC_QUANT_HAS_VNNI)
    if constexpr (Vnni) {
        switch (format) {
        case quant_format::int8_sym: return &key_logits_vnni<A, quant_format::int8_sym, H>;
        case quant_format::int4_sym: return &key_logits_vnni<A, quant_format::int4_sym, H>;
        case quant_format::int4_asym: return &key_logits_vnni<A, quant_format::int4_asym, H>;
        default: break;
        }
    }
#endif
    switch (format) {
    case quant_format::int8_sym: return &key_logits<A, Portable, quant_format::int8_sym, H>;
    case quant_format::int4_sym: return &key_logits<A, Portable, quant_format::int4_sym, H>;
    case quant_format::int4_asym: return &key_logits<A, Portable, quant_format::int4_asym, H>;
    case quant_format::int2_asym: return &key_logits<A, Portable, quant_format::int2_asym, H>;
    case quant_format::fp8_e4m3: return &key_logits<A, Portable, quant_format::fp8_e4m3, H>;
    case quant_format::fp8_e5m2: return &key_logits<A, Portable, quant_format::fp8_e5m2, H>;
    }
    return nullptr;
}

template <class A, bool Portable, std::size_t H>
values_fn<H> values_for(quant_format format) noexcept {
    switch (format) {
    case quant_format::int8_sym: return &accumulate_values<A, Portable, quant_format::int8_sym, H>;
    case quant_format::int4_sym: return &accumulate_values<A, Portable, quant_format::int4_sym, H>;
    case quant_format::int4_asym: return &accumulate_values<A, Portable, quant_format::int4_asym, H>;
    case quant_format::int2_asym: return &accumulate_values<A, Portable, quant_format::int2_asym, H>;
    case quant_format::fp8_e4m3: return &accumulate_values<A, Portable, quant_format::fp8_e4m3, H>;
    case quant_format::fp8_e5m2: return &accumulate_values<A, Portable, quant_format::fp8_e5m2, H>;
    }
    return nullptr;
}

template <class A, bool Portable, std::size_t H, bool Vnni>
void attend_heads(const quant_decode_problem& p, const decode_state& s, std::size_t g0) noexcept {
    const logits_fn<H> logits = logits_for<A, Portable, H, Vnni>(p.rows.key_format);
    const values_fn<H> values = values_for<A, Portable, H>(p.rows.value_format);
    alignas(64) float weights[H][block_tokens];
    // Integer key formats score against the quantized query (quant_common::quantize_query).
    qc::quantized_query quantized[H];
    alignas(64) float dequantized[H][qc::query_max_dim];
    head_queries<H> heads;
    const bool quantize = qc::quantizes_query<A>(p.rows.key_format);
    for (std::size_t h = 0; h < H; ++h) {
        heads.q[h] = p.queries + (g0 + h) * p.query_stride;
        heads.quantized[h] = &quantized[h];
        if (quantize) {
            qc::quantize_query<A>(heads.q[h], p.dim, quantized[h]);
            qc::dequantize_query<A>(quantized[h], p.dim, dequantized[h]);
            heads.q[h] = dequantized[h];
        }
    }
    for (std::size_t t0 = 0; t0 < p.tokens; t0 += block_tokens) {
        const std::size_t count = p.tokens - t0 < block_tokens ? p.tokens - t0 : block_tokens;
        logits(p, t0, count, heads, weights, 0);
        for (std::size_t h = 0; h < H; ++h) {
            if (p.logits) {
                float* out = p.logits + (g0 + h) * p.logits_stride + p.sink.tokens + t0;
                for (std::size_t t = 0; t < count; ++t) out[t] = weights[h][t];
            }
            softmax_update<A>(s, g0 + h, p.dim, weights[h], count);
        }
        values(p, s, g0, t0, count, weights);
    }
}

template <class A, bool Portable, bool Vnni = false>
void attend_partial(const quant_decode_problem& p, const decode_state& s) noexcept {
    if (p.sink.tokens > 0) simd::attend_partial<A, dtype::f16>(qc::sink_problem<A>(p), s);
    if (p.tokens == 0) return;
    std::size_t g0 = 0;
    for (; g0 + 4 <= p.group; g0 += 4) attend_heads<A, Portable, 4, Vnni>(p, s, g0);
    switch (p.group - g0) {
    case 3: attend_heads<A, Portable, 3, Vnni>(p, s, g0); break;
    case 2: attend_heads<A, Portable, 2, Vnni>(p, s, g0); break;
    case 1: attend_heads<A, Portable, 1, Vnni>(p, s, g0); break;
    default: break;
    }
}

template <class A, bool Portable, bool Vnni = false>
void prefill(const quant_prefill_problem& p, float* workspace) noexcept {
    qc::prefill_by_rows<A, &attend_partial<A, Portable, Vnni>>(p, workspace);
}

} // namespace quant

// The quantization section of one instruction set's table. Portable = true
// builds it from the generic pieces only (what NEON runs), for tests.
template <class A, bool Portable>
constexpr quant_kernels make_quant_kernels_of() noexcept {
    using F = quant_format;
    return quant_kernels{
        {
#define KVC_QUANTIZE_ROWS(format)                                                                    \
    {&quant::quantize_row<A, Portable, format, dtype::f32>, &quant::quantize_row<A, Portable, format, dtype::f16>, \
     &quant::quantize_row<A, Portable, format, dtype::bf16>}
            KVC_QUANTIZE_ROWS(F::int8_sym),
            KVC_QUANTIZE_ROWS(F::int4_sym),
            KVC_QUANTIZE_ROWS(F::int4_asym),
            KVC_QUANTIZE_ROWS(F::int2_asym),
            KVC_QUANTIZE_ROWS(F::fp8_e4m3),
            KVC_QUANTIZE_ROWS(F::fp8_e5m2),
#undef KVC_QUANTIZE_ROWS
        },
        {&quant::dequantize_row<A, Portable, F::int8_sym>, &quant::dequantize_row<A, Portable, F::int4_sym>,
         &quant::dequantize_row<A, Portable, F::int4_asym>, &quant::dequantize_row<A, Portable, F::int2_asym>,
         &quant::dequantize_row<A, Portable, F::fp8_e4m3>, &quant::dequantize_row<A, Portable, F::fp8_e5m2>},
        &quant::attend_partial<A, Portable>,
        &quant::prefill<A, Portable>,
    };
}

template <class A>
constexpr quant_kernels make_quant_kernels() noexcept {
    return make_quant_kernels_of<A, false>();
}

#if defined(KVC_QUANT_HAS_VNNI)
// The AVX-512 table with VNNI key scores (kernels/dispatch.hpp picks it when
// cpu().avx512_vnni); everything else is the AVX-512 table.
template <class A>
constexpr kernel_table make_table_vnni(arch_id arch) noexcept {
    kernel_table table = make_table<A>(arch);
    table.quant.attend_partial = &quant::attend_partial<A, false, true>;
    table.quant.prefill = &quant::prefill<A, false, true>;
    return table;
}
#endif

} // namespace kvc::kernels::simd

// The sparse section reuses this header's softmax update and lane sums, so it
// comes after them whichever of the kernel headers is included first.
#include "kvc/kernels/sparse/simd.hpp"
// The KIVI kernels build on the pieces above.
#include "kvc/kernels/quant/kivi_simd.hpp"
// The GEAR section chains this section's kernels; whichever header comes first, it must follow them.
#include "kvc/kernels/quant/gear_simd.hpp"
