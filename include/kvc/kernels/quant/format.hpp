// kvc/kernels/quant/format.hpp -- the packed block formats the quantization kernels read and write.
//
// A row of `dim` elements is dim / G groups of G elements (G = 32, 64 or 128),
// stored one after another. A group is a header (an fp16 scale d, then for the
// asymmetric formats an fp16 minimum m) followed by G / 32 payloads of 32
// elements each:
//
//   format     header   payload of 32 elements                          value of element j
//   int8_sym   d        32 bytes, int8 q_j                              q_j * d
//   int4_sym   d        16 bytes: q_j in the low nibble of byte j,      (q_j - 8) * d
//                       q_{j+16} in the high nibble of byte j
//   int4_asym  d, m     16 bytes, nibbles as int4_sym                   q_j * d + m
//   int2_asym  d, m     8 bytes: q_j in bits 2k..2k+1 of byte j % 8,     q_j * d + m
//                       k = j / 8 (byte i holds i, i+8, i+16, i+24)
//   fp8_e4m3   d        32 bytes, OCP FP8 E4M3 (bias 7, max 448, no inf, e_j * d
//                       S.1111.111 is NaN)
//   fp8_e5m2   d        32 bytes, OCP FP8 E5M2 (bias 15, max 57344,     e_j * d
//                       IEEE-like inf and NaN)
//
// All fp16 and multi-byte fields are little-endian and unaligned. With G = 32
// the int8_sym, int4_sym and int4_asym groups are byte for byte llama.cpp/ggml's
// block_q8_0 (34 bytes), block_q4_0 (18 bytes) and block_q4_1 (20 bytes).
//
// This header is plain data shared by policies and kernels. Nothing here is a
// function the dispatch units call (they must contain only Arch-templated
// code); kernels read the per-format constants of format_traits by value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvc::kernels {

enum class quant_format : std::uint8_t { int8_sym = 0, int4_sym = 1, int4_asym = 2, int2_asym = 3, fp8_e4m3 = 4, fp8_e5m2 = 5 };
inline constexpr int quant_format_count = 6;

// Elements per payload: every group is G / quant_payload_elements payloads.
inline constexpr std::size_t quant_payload_elements = 32;

template <quant_format F>
struct format_traits;
template <>
struct format_traits<quant_format::int8_sym> {
    static constexpr std::size_t bits = 8, header_bytes = 2, payload_bytes = 32;
    static constexpr bool has_minimum = false;
};
template <>
struct format_traits<quant_format::int4_sym> {
    static constexpr std::size_t bits = 4, header_bytes = 2, payload_bytes = 16;
    static constexpr bool has_minimum = false;
};
template <>
struct format_traits<quant_format::int4_asym> {
    static constexpr std::size_t bits = 4, header_bytes = 4, payload_bytes = 16;
    static constexpr bool has_minimum = true;
};
template <>
struct format_traits<quant_format::int2_asym> {
    static constexpr std::size_t bits = 2, header_bytes = 4, payload_bytes = 8;
    static constexpr bool has_minimum = true;
};
template <>
struct format_traits<quant_format::fp8_e4m3> {
    static constexpr std::size_t bits = 8, header_bytes = 2, payload_bytes = 32;
    static constexpr bool has_minimum = false;
};
template <>
struct format_traits<quant_format::fp8_e5m2> {
    static constexpr std::size_t bits = 8, header_bytes = 2, payload_bytes = 32;
    static constexpr bool has_minimum = false;
};

// The same constants at run time, for storage and policies (kernels use
// format_traits, whose members are compile-time constants).
struct quant_format_info {
    const char* name;
    std::size_t bits, header_bytes, payload_bytes;
    bool has_minimum;
    // Bytes of one group of `group_size` elements (a multiple of 32).
    constexpr std::size_t group_bytes(std::size_t group_size) const noexcept {
        return header_bytes + group_size / quant_payload_elements * payload_bytes;
    }
};

constexpr quant_format_info info_of(quant_format format) noexcept {
    switch (format) {
    case quant_format::int8_sym: return {"int8_sym", 8, 2, 32, false};
    case quant_format::int4_sym: return {"int4_sym", 4, 2, 16, false};
    case quant_format::int4_asym: return {"int4_asym", 4, 4, 16, true};
    case quant_format::int2_asym: return {"int2_asym", 2, 4, 8, true};
    case quant_format::fp8_e4m3: return {"fp8_e4m3", 8, 2, 32, false};
    case quant_format::fp8_e5m2: return {"fp8_e5m2", 8, 2, 32, false};
    }
    return {"?", 0, 0, 0, false};
}

constexpr bool is_valid(quant_format format) noexcept {
    return static_cast<int>(format) < quant_format_count; // the underlying type is unsigned
}

} // namespace kvc::kernels
