// Shared helpers of the quantization kernel tests: the quant sections under
// test (every table this CPU runs, plus the portable -- NEON -- code path
// instantiated for SSE2 in this translation unit), test data with the shapes
// that stress quantizers, and packed rows built with the scalar reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "quantized_query_util.hpp"
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc_test {

using kk::quant_format;

inline constexpr quant_format all_formats[] = {quant_format::int8_sym,  quant_format::int4_sym,
                                               quant_format::int4_asym, quant_format::int2_asym,
                                               quant_format::fp8_e4m3,  quant_format::fp8_e5m2};
inline constexpr std::size_t all_group_sizes[] = {32, 64, 128};

inline const char* name_of(quant_format f) { return kk::info_of(f).name; }
inline int slot(quant_format f) { return kk::index_of(f); }

struct quant_table {
    std::string name;
    arch_id arch;
    const kk::quant_kernels* kernels;
};

// Every table's quant section, and the portable code path on SSE2.
inline std::vector<quant_table> quant_tables_under_test() {
    std::vector<quant_table> tables;
    for (const kk::kernel_table* table : tables_under_test())
        tables.push_back({kvc::name_of(table->arch), table->arch, &table->quant});
#if defined(KVC_USE_DISPATCH_LIBRARY)
    // tables_under_test() has the AVX-512 table with VNNI key scores where the
    // CPU has VNNI; the one without (what AVX-512 CPUs without VNNI run) too.
    if (kvc::cpu().avx512_vnni && kk::table_for(arch_id::avx512) != nullptr)
        if (const kk::kernel_table* plain = kk::dispatch_table_avx512())
            tables.push_back({"avx512-no-vnni", arch_id::avx512, &plain->quant});
#endif
#if defined(__SSE2__) && KVC_X86_64
    static constexpr kk::quant_kernels portable = kk::simd::make_quant_kernels_of<xsimd::sse2, true>();
    tables.push_back({"portable(sse2)", arch_id::sse2, &portable});
#endif
    return tables;
}

inline const kk::quant_kernels& quant_reference() { return kk::reference_table().quant; }

inline std::size_t group_bytes(quant_format f, std::size_t group_size) {
    return kk::info_of(f).group_bytes(group_size);
}
inline std::size_t row_bytes(quant_format f, std::size_t n, std::size_t group_size) {
    return n / group_size * group_bytes(f, group_size);
}

// Kinds of rows a quantizer must handle.
enum class data_kind { normal, outliers, constant, zeros, tiny, huge, mixed_extremes, small_integers };
inline constexpr data_kind all_kinds[] = {data_kind::normal,   data_kind::outliers, data_kind::constant,
                                          data_kind::zeros,    data_kind::tiny,     data_kind::huge,
                                          data_kind::mixed_extremes, data_kind::small_integers};
inline const char* name_of(data_kind k) {
    switch (k) {
    case data_kind::normal: return "normal";
    case data_kind::outliers: return "outliers";
    case data_kind::constant: return "constant";
    case data_kind::zeros: return "zeros";
    case data_kind::tiny: return "tiny";
    case data_kind::huge: return "huge";
    case data_kind::mixed_extremes: return "mixed_extremes";
    case data_kind::small_integers: return "small_integers";
    }
    return "?";
}

// n values of the given kind; `fp16_range` keeps them representable in fp16 (and bf16).
inline std::vector<float> make_data(data_kind kind, std::size_t n, rng_type& rng, bool fp16_range) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> small(-9, 9);
    std::vector<float> x(n);
    switch (kind) {
    case data_kind::normal:
        for (float& v : x) v = normal(rng);
        break;
    case data_kind::outliers:
        for (std::size_t i = 0; i < n; ++i) x[i] = normal(rng) * (i % 37 == 5 ? 40.0f : 1.0f);
        break;
    case data_kind::constant: {
        const float c = normal(rng);
        for (float& v : x) v = c;
        break;
    }
    case data_kind::zeros:
        for (std::size_t i = 0; i < n; ++i) x[i] = i % 3 == 0 ? -0.0f : 0.0f;
        break;
    case data_kind::tiny: // down to the fp16 subnormals (fp32 input goes further)
        for (float& v : x) v = normal(rng) * (fp16_range ? 1e-6f : 1e-30f);
        break;
    case data_kind::huge: // fp16: up to 60000; fp32: beyond what an fp16 scale can cover
        for (float& v : x) v = fp16_range ? std::max(-6e4f, std::min(6e4f, normal(rng) * 2e4f)) : normal(rng) * 1e7f;
        break;
    case data_kind::mixed_extremes: // +a and -a both present (the q4_0 tie), and everything between
        for (std::size_t i = 0; i < n; ++i) x[i] = (i % 32 == 3) ? 6.5f : (i % 32 == 17 ? -6.5f : normal(rng));
        break;
    case data_kind::small_integers: // many exact ties of the rounding
        for (float& v : x) v = static_cast<float>(small(rng)) * 0.5f;
        break;
    }
    return x;
}

// Row storage in a source dtype with an odd offset from a 64-byte boundary.
struct source_row {
    dtype type;
    std::size_t n;
    aligned_array<float> f32;
    aligned_array<std::uint16_t> bits;
    source_row(dtype t, const std::vector<float>& x, std::size_t offset)
        : type(t), n(x.size()), f32(t == dtype::f32 ? x.size() : 0, offset),
          bits(t == dtype::f32 ? 0 : x.size(), offset) {
        for (std::size_t i = 0; i < n; ++i) {
            if (t == dtype::f32) f32[i] = x[i];
            else if (t == dtype::f16) bits[i] = kvc::to_half(x[i]).bits;
            else bits[i] = kvc::to_bfloat16(x[i]).bits;
        }
    }
    const void* data() const {
        return type == dtype::f32 ? static_cast<const void*>(f32.data()) : static_cast<const void*>(bits.data());
    }
    float value(std::size_t i) const {
        if (type == dtype::f32) return f32[i];
        if (type == dtype::f16) return kvc::to_float(kvc::half::from_bits(bits[i]));
        return kvc::to_float(kvc::bfloat16::from_bits(bits[i]));
    }
};

// Packed bytes with guard bytes after them that no kernel may write.
struct packed_buffer {
    static constexpr std::size_t guard = 16;
    static constexpr unsigned char poison = 0xa5;
    std::size_t bytes;
    aligned_array<unsigned char> data;
    packed_buffer(std::size_t b, std::size_t offset) : bytes(b), data(b + guard, offset) { data.fill(poison); }
    unsigned char* get() { return data.data(); }
    const unsigned char* get() const { return data.data(); }
    bool guard_intact() const {
        for (std::size_t i = bytes; i < bytes + guard; ++i)
            if (data[i] != poison) return false;
        return true;
    }
};

// Rows of `tokens` x `dim` quantized (reference) into one buffer, and their exact values.
struct packed_rows_data {
    quant_format format;
    std::size_t tokens, dim, group_size, row_bytes;
    std::vector<unsigned char> bytes;
    std::vector<float> values; // [tokens][dim], the element values (reference dequantize)
    packed_rows_data(quant_format f, std::size_t t, std::size_t d, std::size_t g, const std::vector<float>& x)
        : format(f), tokens(t), dim(d), group_size(g), row_bytes(kvc_test::row_bytes(f, d, g)), bytes(t * row_bytes),
          values(t * d) {
        for (std::size_t i = 0; i < t; ++i) {
            quant_reference().quantize_row[slot(f)][kk::index_of(dtype::f32)](x.data() + i * d, bytes.data() + i * row_bytes,
                                                                              d, g);
            quant_reference().dequantize_row[slot(f)](bytes.data() + i * row_bytes, values.data() + i * d, d, g);
        }
    }
};

inline bool same_float(float a, float b) {
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
    return bits_of(a) == bits_of(b);
}

} // namespace kvc_test
