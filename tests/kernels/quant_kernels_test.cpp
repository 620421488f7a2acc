// The block-format row kernels (quantize_row, dequantize_row) on every
// instruction set this CPU supports and on the portable (NEON) code path,
// against the scalar reference, plus the format rules themselves:
//
// - quantize_row: bit-exact with the reference for every format, group size
//   and source dtype, on data that stresses quantizers (outliers, constant
//   groups, zeros, fp16 subnormals, values beyond fp16's reach, +-a ties,
//   exact rounding ties), unaligned source and destination, nothing written
//   past the row. Every operation is an IEEE operation with a defined
//   result (max/min, one division per group, the multiply by the reciprocal,
//   round to nearest even), so no tolerance is needed.
// - dequantize_row: bit-exact (NaN matches NaN) on arbitrary bytes, scales
//   included (subnormal, inf, NaN) and fp8 NaN codes.
// - Round trip: |x - value| <= |d| / 2 per element (|d| for q4_0's clamped
//   opposite extreme), fp8 within half an fp8 step of x / d, with a relative
//   slack of 1e-4 d for the fp32 rounding of x * (1 / d).
// - Layouts: hand-computed q8_0, q4_0 and q4_1 blocks byte for byte; blocks
//   written by ggml's rules decode to ggml's values.
// - fp8: all 256 codes of both formats decode to their OCP definition and
//   encode back; midpoints round to even; saturation; NaN/Inf groups.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "quant_test_util.hpp"

namespace {

using namespace kvc_test;
namespace qc = kvc::kernels::quant_common;
using ref_arch = kk::reference_arch;

constexpr double slack = 1e-4; // in units of the scale: fp32 rounding of x * (1 / d)

std::vector<std::size_t> lengths_for(std::size_t group_size) {
    std::vector<std::size_t> n = {group_size, 2 * group_size, 128 / group_size * group_size + group_size};
    if (group_size <= 256) n.push_back(256);
    n.push_back(1024);
    std::vector<std::size_t> valid;
    for (std::size_t v : n)
        if (v % group_size == 0 && std::find(valid.begin(), valid.end(), v) == valid.end()) valid.push_back(v);
    return valid;
}

TEST(QuantTables, EveryTableHasEveryQuantKernel) {
    for (const quant_table& t : quant_tables_under_test()) {
        SCOPED_TRACE(t.name);
        EXPECT_NE(t.kernels->attend_partial, nullptr);
        EXPECT_NE(t.kernels->prefill, nullptr);
        for (quant_format f : all_formats) {
            EXPECT_NE(t.kernels->dequantize_row[slot(f)], nullptr);
            for (dtype d : all_dtypes) EXPECT_NE(t.kernels->quantize_row[slot(f)][slot(d)], nullptr);
        }
    }
}

TEST(QuantizeRow, BitExactWithReferenceOnEveryInstructionSet) {
    const auto tables = quant_tables_under_test();
    rng_type rng(101);
    for (quant_format f : all_formats)
        for (std::size_t g : all_group_sizes)
            for (dtype type : all_dtypes)
                for (data_kind kind : all_kinds)
                    for (std::size_t n : lengths_for(g)) {
                        SCOPED_TRACE(std::string(name_of(f)) + " G=" + std::to_string(g) + " from " +
                                     kvc::name_of(type) + " " + name_of(kind) + " n=" + std::to_string(n));
                        const source_row src(type, make_data(kind, n, rng, type != dtype::f32), odd_offset(rng));
                        const std::size_t bytes = row_bytes(f, n, g);
                        packed_buffer want(bytes, 3);
                        quant_reference().quantize_row[slot(f)][slot(type)](src.data(), want.get(), n, g);
                        ASSERT_TRUE(want.guard_intact());
                        for (const quant_table& t : tables) {
                            SCOPED_TRACE(t.name);
                            packed_buffer got(bytes, 1 + rng() % 7);
                            t.kernels->quantize_row[slot(f)][slot(type)](src.data(), got.get(), n, g);
                            EXPECT_TRUE(got.guard_intact()) << "wrote past the row";
                            const auto mismatch = std::mismatch(want.get(), want.get() + bytes, got.get());
                            if (mismatch.first != want.get() + bytes) {
                                const std::size_t at = static_cast<std::size_t>(mismatch.first - want.get());
                                ADD_FAILURE() << "byte " << at << " (group " << at / group_bytes(f, g) << "): got 0x"
                                              << std::hex << int(*mismatch.second) << ", reference 0x"
                                              << int(*mismatch.first);
                                return;
                            }
                        }
                    }
}

TEST(DequantizeRow, BitExactWithReferenceOnArbitraryBytes) {
    const auto tables = quant_tables_under_test();
    rng_type rng(102);
    for (quant_format f : all_formats)
        for (std::size_t g : all_group_sizes)
            for (std::size_t n : lengths_for(g)) {
                SCOPED_TRACE(std::string(name_of(f)) + " G=" + std::to_string(g) + " n=" + std::to_string(n));
                const std::size_t bytes = row_bytes(f, n, g);
                for (int round = 0; round < 4; ++round) {
                    aligned_array<unsigned char> src(bytes, 1 + rng() % 7);
                    for (std::size_t i = 0; i < bytes; ++i) src[i] = static_cast<unsigned char>(rng());
                    // Mostly ordinary scales, some subnormal, some inf/NaN.
                    for (std::size_t gi = 0; gi < n / g; ++gi) {
                        unsigned char* header = src.data() + gi * group_bytes(f, g);
                        const unsigned pick = rng() % 16;
                        std::uint16_t scale = static_cast<std::uint16_t>(0x2000 + rng() % 0x3000);
                        if (pick == 0) scale = static_cast<std::uint16_t>(rng() % 0x400);    // subnormal
                        if (pick == 1) scale = static_cast<std::uint16_t>(0x7c00 + rng() % 4); // inf / NaN
                        if (rng() % 2) scale |= 0x8000;
                        std::memcpy(header, &scale, 2);
                    }
                    std::vector<float> want(n);
                    quant_reference().dequantize_row[slot(f)](src.data(), want.data(), n, g);
                    for (const quant_table& t : tables) {
                        SCOPED_TRACE(t.name);
                        aligned_array<float> got(n, 1 + rng() % 7);
                        t.kernels->dequantize_row[slot(f)](src.data(), got.data(), n, g);
                        for (std::size_t i = 0; i < n; ++i)
                            if (!same_float(got[i], want[i])) {
                                ADD_FAILURE() << "element " << i << ": got " << got[i] << " (" << hex(bits_of(got[i]))
                                              << "), reference " << want[i] << " (" << hex(bits_of(want[i])) << ")";
                                return;
                            }
                    }
                }
            }
}

// ---------------------------------------------------------------------------
// Round trip.

struct group_view {
    float scale, minimum;
    bool saturated; // the scale or minimum hit fp16's largest finite value
};

group_view header_of(quant_format f, const unsigned char* group) {
    std::uint16_t d, m = 0;
    std::memcpy(&d, group, 2);
    if (kk::info_of(f).has_minimum) std::memcpy(&m, group + 2, 2);
    return {kvc::to_float(kvc::half::from_bits(d)), kvc::to_float(kvc::half::from_bits(m)),
            (d & 0x7fff) == 0x7bff || (m & 0x7fff) == 0x7bff};
}

// Bound on |x - value| for one element, in absolute terms.
double element_bound(quant_format f, double x, const group_view& h) {
    const double d = std::fabs(h.scale);
    if (d == 0.0) return 0.0; // a group of zeros (or one asymmetric constant) is stored exactly
    switch (f) {
    case quant_format::int8_sym: return d * (0.5 + slack);
    case quant_format::int4_sym: {
        const double y = x / h.scale; // the code is clamped at 7: error up to d there
        return y > 7.5 - slack ? d * (1.0 + slack) : d * (0.5 + slack);
    }
    case quant_format::int4_asym:
    case quant_format::int2_asym:
        return d * (0.5 + slack) + 0x1p-23 * std::fabs(x) + 0x1p-23 * std::fabs(h.minimum);
    case quant_format::fp8_e4m3: {
        const double y = std::fabs(x) / d;
        return d * (std::max(0x1p-4 * y, 0x1p-10) + slack);
    }
    case quant_format::fp8_e5m2: {
        const double y = std::fabs(x) / d;
        return d * (std::max(0x1p-3 * y, 0x1p-17) + slack);
    }
    }
    return 0.0;
}

TEST(QuantizeRow, RoundTripWithinHalfAStep) {
    rng_type rng(103);
    for (quant_format f : all_formats)
        for (std::size_t g : all_group_sizes)
            for (dtype type : all_dtypes)
                for (data_kind kind : all_kinds) {
                    SCOPED_TRACE(std::string(name_of(f)) + " G=" + std::to_string(g) + " from " +
                                 kvc::name_of(type) + " " + name_of(kind));
                    const std::size_t n = 512;
                    const source_row src(type, make_data(kind, n, rng, type != dtype::f32), 1);
                    std::vector<unsigned char> packed(row_bytes(f, n, g));
                    std::vector<float> back(n);
                    quant_reference().quantize_row[slot(f)][slot(type)](src.data(), packed.data(), n, g);
                    quant_reference().dequantize_row[slot(f)](packed.data(), back.data(), n, g);
                    int failures = 0;
                    for (std::size_t i = 0; i < n && failures < 3; ++i) {
                        const group_view h = header_of(f, packed.data() + i / g * group_bytes(f, g));
                        const double x = src.value(i);
                        if (h.saturated) { // finite, and no larger than the format can say
                            EXPECT_TRUE(std::isfinite(back[i]));
                            continue;
                        }
                        const double bound = element_bound(f, x, h);
                        if (!(std::fabs(back[i] - x) <= bound)) {
                            ++failures;
                            ADD_FAILURE() << "element " << i << ": " << x << " -> " << back[i] << ", error "
                                          << std::fabs(back[i] - x) << " > bound " << bound << " (scale " << h.scale
                                          << ", minimum " << h.minimum << ")";
                        }
                    }
                }
}

// Scales are the smallest fp16 that covers the group: one step less would not.
TEST(QuantizeRow, ScaleIsTheSmallestCoveringHalf) {
    rng_type rng(104);
    for (int round = 0; round < 2000; ++round) {
        const std::vector<float> x = make_data(data_kind::normal, 32, rng, true);
        float amax = 0.0f, lo = x[0], hi = x[0];
        for (float v : x) {
            amax = std::max(amax, std::fabs(v));
            lo = std::min(lo, v);
            hi = std::max(hi, v);
        }
        unsigned char block[34];
        quant_reference().quantize_row[slot(quant_format::int8_sym)][slot(dtype::f32)](x.data(), block, 32, 32);
        std::uint16_t d;
        std::memcpy(&d, block, 2);
        const float scale = kvc::to_float(kvc::half::from_bits(d));
        EXPECT_GE(static_cast<double>(scale) * 127.0, amax * (1.0 - 1e-7));
        EXPECT_LT(static_cast<double>(kvc::to_float(kvc::half::from_bits(static_cast<std::uint16_t>(d - 1)))) * 127.0,
                  amax);
        unsigned char block1[20];
        quant_reference().quantize_row[slot(quant_format::int4_asym)][slot(dtype::f32)](x.data(), block1, 32, 32);
        std::uint16_t d1, m1;
        std::memcpy(&d1, block1, 2);
        std::memcpy(&m1, block1 + 2, 2);
        const float minimum = kvc::to_float(kvc::half::from_bits(m1));
        EXPECT_LE(minimum, lo);
        EXPECT_GE(static_cast<double>(minimum) + 15.0 * kvc::to_float(kvc::half::from_bits(d1)), hi * (1.0 - 1e-6));
    }
}

// ---------------------------------------------------------------------------
// Layouts: ggml's q8_0, q4_0 and q4_1 blocks, computed by hand.

std::vector<unsigned char> quantize_block(quant_format f, const std::vector<float>& x) {
    std::vector<unsigned char> out(group_bytes(f, 32));
    for (const quant_table& t : quant_tables_under_test()) {
        std::vector<unsigned char> got(out.size());
        t.kernels->quantize_row[slot(f)][slot(dtype::f32)](x.data(), got.data(), 32, 32);
        if (t.arch == arch_id::scalar) out = got;
        else EXPECT_EQ(got, out) << t.name;
    }
    return out;
}

TEST(Layout, Q8_0HandComputedBlock) {
    // amax 127 -> d = 1.0 (fp16 0x3c00), q_j = x_j.
    std::vector<float> x(32);
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>((j * 37) % 255 - 127);
    x[5] = 127.0f;
    const auto block = quantize_block(quant_format::int8_sym, x);
    ASSERT_EQ(block.size(), 34u);
    EXPECT_EQ(block[0], 0x00);
    EXPECT_EQ(block[1], 0x3c);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(static_cast<std::int8_t>(block[2 + j]), static_cast<int>(x[j])) << j;
}

TEST(Layout, Q4_0HandComputedBlock) {
    // Largest magnitude +8 -> d = 8 / -8 = -1.0 (fp16 0xbc00); nibble = RNE(x / d) + 8 = 8 - x.
    // x_j = 8 - j for j < 16 (8 .. -7), x_{j+16} = j - 7 (-7 .. 8 excluded: -7 .. 8 with 8 at j = 15).
    std::vector<float> x(32);
    for (int j = 0; j < 16; ++j) {
        x[j] = static_cast<float>(8 - j);
        x[j + 16] = static_cast<float>(j - 7);
    }
    const auto block = quantize_block(quant_format::int4_sym, x);
    ASSERT_EQ(block.size(), 18u);
    EXPECT_EQ(block[0], 0x00);
    EXPECT_EQ(block[1], 0xbc);
    for (int j = 0; j < 16; ++j) {
        const int low = 8 - static_cast<int>(x[j]), high = 8 - static_cast<int>(x[j + 16]);
        EXPECT_EQ(block[2 + j], low | high << 4) << "byte " << j;
    }
    // Element values: (nibble - 8) * d give x back exactly.
    std::vector<float> back(32);
    quant_reference().dequantize_row[slot(quant_format::int4_sym)](block.data(), back.data(), 32, 32);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(back[j], x[j]) << j;
}

TEST(Layout, Q4_1HandComputedBlock) {
    // x_j = (j % 16) - 3: min -3 (fp16 0xc200), max 12, d = 15 / 15 = 1 (0x3c00), nibble = x + 3 = j % 16.
    std::vector<float> x(32);
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j % 16 - 3);
    const auto block = quantize_block(quant_format::int4_asym, x);
    ASSERT_EQ(block.size(), 20u);
    EXPECT_EQ(block[0], 0x00);
    EXPECT_EQ(block[1], 0x3c);
    EXPECT_EQ(block[2], 0x00);
    EXPECT_EQ(block[3], 0xc2);
    for (int j = 0; j < 16; ++j) EXPECT_EQ(block[4 + j], j | j << 4) << "byte " << j;
}

TEST(Layout, Int2AndFp8HandComputedBlocks) {
    // int2: x_j = j % 4 (min 0, max 3, d = 1): byte i = code i | code i+8 << 2 | code i+16 << 4 | code i+24 << 6.
    std::vector<float> x(32);
    for (int j = 0; j < 32; ++j) x[j] = static_cast<float>((j * 7 + j / 8) % 4);
    const auto block = quantize_block(quant_format::int2_asym, x);
    ASSERT_EQ(block.size(), 12u);
    EXPECT_EQ(block[1], 0x3c); // d = 1
    EXPECT_EQ(block[2] | block[3] << 8, 0);
    for (int i = 0; i < 8; ++i) {
        const int expected = static_cast<int>(x[i]) | static_cast<int>(x[i + 8]) << 2 |
                             static_cast<int>(x[i + 16]) << 4 | static_cast<int>(x[i + 24]) << 6;
        EXPECT_EQ(block[4 + i], expected) << "byte " << i;
    }
    // e4m3: amax 448 -> d = 1: codes are the fp8 encodings of x itself.
    std::vector<float> y = {448.0f, -448.0f, 1.0f, -1.0f, 0.0f, 0.0078125f /* 2^-7 */, 0x1p-9f, 240.0f};
    y.resize(32, 0.5f);
    const auto fp8 = quantize_block(quant_format::fp8_e4m3, y);
    EXPECT_EQ(fp8[0], 0x00);
    EXPECT_EQ(fp8[1], 0x3c);
    // 448 -> S.1111.110, 1 -> 0.0111.000, 2^-7 is subnormal (4 units of 2^-9), 240 = 1.875 * 2^7 -> 0.1110.111.
    const unsigned char expected[] = {0x7e, 0xfe, 0x38, 0xb8, 0x00, 0x04, 0x01, 0x77};
    for (int i = 0; i < 8; ++i) EXPECT_EQ(fp8[2 + i], expected[i]) << "element " << i;
}

// ggml's reference quantizers, written from their definition (ggml-quants.c):
// q4_0: d = max / -8 with max the signed value of largest magnitude, d and
// 1/d in fp32, nibble = min(15, (int)(x / d + 8.5)); q4_1: d = (max - min) / 15,
// nibble = min(15, (int)((x - min) / d + 0.5)); q8_0: d = amax / 127, roundf(x / d).
std::vector<unsigned char> ggml_q4_0(const std::vector<float>& x) {
    float amax = 0.0f, max = 0.0f;
    for (float v : x)
        if (amax < std::fabs(v)) {
            amax = std::fabs(v);
            max = v;
        }
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    std::vector<unsigned char> b(18);
    const std::uint16_t h = kvc::to_half(d).bits;
    std::memcpy(b.data(), &h, 2);
    for (int j = 0; j < 16; ++j) {
        const int lo = std::min(15, static_cast<int>(x[j] * id + 8.5f));
        const int hi = std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
        b[2 + j] = static_cast<unsigned char>(lo | hi << 4);
    }
    return b;
}

std::vector<unsigned char> ggml_q4_1(const std::vector<float>& x) {
    const float min = *std::min_element(x.begin(), x.end()), max = *std::max_element(x.begin(), x.end());
    const float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    std::vector<unsigned char> b(20);
    const std::uint16_t hd = kvc::to_half(d).bits, hm = kvc::to_half(min).bits;
    std::memcpy(b.data(), &hd, 2);
    std::memcpy(b.data() + 2, &hm, 2);
    for (int j = 0; j < 16; ++j) {
        const int lo = std::min(15, static_cast<int>((x[j] - min) * id + 0.5f));
        const int hi = std::min(15, static_cast<int>((x[j + 16] - min) * id + 0.5f));
        b[4 + j] = static_cast<unsigned char>(lo | hi << 4);
    }
    return b;
}

std::vector<unsigned char> ggml_q8_0(const std::vector<float>& x) {
    float amax = 0.0f;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    std::vector<unsigned char> b(34);
    const std::uint16_t h = kvc::to_half(d).bits;
    std::memcpy(b.data(), &h, 2);
    for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<unsigned char>(static_cast<std::int8_t>(std::round(x[j] * id)));
    return b;
}

// Blocks ggml writes decode to ggml's values ((q - 8) d, q d + m, q d) on every set.
TEST(Layout, GgmlWrittenBlocksDecodeToGgmlValues) {
    rng_type rng(105);
    for (int round = 0; round < 200; ++round) {
        const auto x = make_data(round % 2 ? data_kind::outliers : data_kind::normal, 32, rng, true);
        const auto q40 = ggml_q4_0(x), q41 = ggml_q4_1(x), q80 = ggml_q8_0(x);
        auto half_at = [](const std::vector<unsigned char>& b, int at) {
            std::uint16_t h;
            std::memcpy(&h, b.data() + at, 2);
            return kvc::to_float(kvc::half::from_bits(h));
        };
        std::vector<float> want40(32), want41(32), want80(32);
        for (int j = 0; j < 32; ++j) {
            const int n40 = j < 16 ? q40[2 + j] & 15 : q40[2 + j - 16] >> 4;
            const int n41 = j < 16 ? q41[4 + j] & 15 : q41[4 + j - 16] >> 4;
            want40[j] = static_cast<float>(n40 - 8) * half_at(q40, 0);
            want41[j] = static_cast<float>(n41) * half_at(q41, 0) + half_at(q41, 2);
            want80[j] = static_cast<float>(static_cast<std::int8_t>(q80[2 + j])) * half_at(q80, 0);
        }
        for (const quant_table& t : quant_tables_under_test()) {
            std::vector<float> got(32);
            t.kernels->dequantize_row[slot(quant_format::int4_sym)](q40.data(), got.data(), 32, 32);
            EXPECT_EQ(got, want40) << t.name << " q4_0";
            t.kernels->dequantize_row[slot(quant_format::int4_asym)](q41.data(), got.data(), 32, 32);
            EXPECT_EQ(got, want41) << t.name << " q4_1";
            t.kernels->dequantize_row[slot(quant_format::int8_sym)](q80.data(), got.data(), 32, 32);
            EXPECT_EQ(got, want80) << t.name << " q8_0";
        }
    }
}

// Where ggml's fp32 scale is an exact fp16 and no element sits on a rounding
// tie, kvc writes ggml's bytes exactly.
TEST(Layout, SameBytesAsGgmlWhenScalesAreExactAndNoTies) {
    rng_type rng(106);
    std::uniform_int_distribution<int> code(-8, 7);
    int compared = 0;
    for (int round = 0; round < 500; ++round) {
        // x = (integer + offset) * 2^k: the scale is a power of two, the codes are exact.
        const float unit = std::ldexp(1.0f, static_cast<int>(rng() % 7) - 3);
        std::vector<float> x(32);
        for (float& v : x) v = static_cast<float>(code(rng)) * unit;
        x[rng() % 32] = 8.0f * unit; // the extreme: positive 8 units, d = -unit
        for (float& v : x)
            if (v == -8.0f * unit) v = -7.0f * unit;
        EXPECT_EQ(quantize_block(quant_format::int4_sym, x), ggml_q4_0(x));
        ++compared;
        std::vector<float> y(32);
        for (float& v : y) v = static_cast<float>(code(rng) + 8) * unit - 3.0f * unit;
        y[0] = -3.0f * unit;
        y[1] = 12.0f * unit; // range exactly 15 units
        EXPECT_EQ(quantize_block(quant_format::int4_asym, y), ggml_q4_1(y));
        std::vector<float> z(32);
        for (float& v : z) v = static_cast<float>(static_cast<int>(rng() % 255) - 127) * unit;
        z[2] = 127.0f * unit;
        EXPECT_EQ(quantize_block(quant_format::int8_sym, z), ggml_q8_0(z));
    }
    EXPECT_EQ(compared, 500);
}

// ---------------------------------------------------------------------------
// fp8.

double e4m3_definition(unsigned code) {
    const int sign = code & 0x80 ? -1 : 1, exponent = (code >> 3) & 15, mantissa = code & 7;
    if ((code & 0x7f) == 0x7f) return std::numeric_limits<double>::quiet_NaN();
    if (exponent == 0) return sign * std::ldexp(mantissa / 8.0, -6);
    return sign * std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
}

double e5m2_definition(unsigned code) {
    const int sign = code & 0x80 ? -1 : 1, exponent = (code >> 2) & 31, mantissa = code & 3;
    if (exponent == 31) return mantissa ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
    if (exponent == 0) return sign * std::ldexp(mantissa / 4.0, -14);
    return sign * std::ldexp(1.0 + mantissa / 4.0, exponent - 15);
}

TEST(Fp8, EveryCodeDecodesToItsDefinitionAndEncodesBack) {
    for (unsigned c = 0; c < 256; ++c) {
        const auto code = static_cast<std::uint8_t>(c);
        const double e4 = e4m3_definition(c), e5 = e5m2_definition(c);
        const float d4 = qc::decode_e4m3<ref_arch>(code), d5 = qc::decode_e5m2<ref_arch>(code);
        if (std::isnan(e4)) EXPECT_TRUE(std::isnan(d4)) << c;
        else {
            EXPECT_EQ(d4, e4) << "e4m3 code " << c;
            EXPECT_EQ(qc::encode_e4m3<ref_arch>(d4), code) << "e4m3 code " << c;
        }
        if (std::isnan(e5)) EXPECT_TRUE(std::isnan(d5)) << c;
        else {
            EXPECT_EQ(d5, e5) << "e5m2 code " << c;
            if (std::isfinite(e5)) {
                EXPECT_EQ(qc::encode_e5m2<ref_arch>(d5), code) << "e5m2 code " << c;
            }
        }
    }
    EXPECT_EQ(e4m3_definition(0x7e), 448.0);
    EXPECT_EQ(e5m2_definition(0x7b), 57344.0);
}

TEST(Fp8, RoundsToNearestEvenAndSaturates) {
    for (unsigned c = 0; c + 1 < 0x7e; ++c) { // adjacent positive e4m3 codes c, c + 1
        const double a = e4m3_definition(c), b = e4m3_definition(c + 1);
        const float mid = static_cast<float>((a + b) / 2);
        const unsigned even = (c % 2 == 0) ? c : c + 1;
        EXPECT_EQ(qc::encode_e4m3<ref_arch>(mid), even) << "midpoint of " << c;
        EXPECT_EQ(qc::encode_e4m3<ref_arch>(std::nextafter(mid, 1e9f)), c + 1);
        EXPECT_EQ(qc::encode_e4m3<ref_arch>(std::nextafter(mid, -1e9f)), c);
        EXPECT_EQ(qc::encode_e4m3<ref_arch>(-mid), 0x80 | even);
    }
    for (unsigned c = 0; c + 1 < 0x7b; ++c) {
        const double a = e5m2_definition(c), b = e5m2_definition(c + 1);
        const float mid = static_cast<float>((a + b) / 2);
        EXPECT_EQ(qc::encode_e5m2<ref_arch>(mid), (c % 2 == 0) ? c : c + 1) << "midpoint of " << c;
    }
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(449.0f), 0x7e);
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(464.0f), 0x7e); // would round to 480, which is NaN: saturate
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(-1e30f), 0xfe);
    EXPECT_EQ(qc::encode_e5m2<ref_arch>(61440.0f), 0x7b); // would round to inf: saturate
    EXPECT_EQ(qc::encode_e5m2<ref_arch>(3e38f), 0x7b);
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(0x1p-11f), 0x00);  // a quarter of the smallest subnormal
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(0x1p-10f), 0x00);  // half of it: tie to even (0)
    EXPECT_EQ(qc::encode_e4m3<ref_arch>(0x3p-10f), 0x02);  // 1.5 units: tie to even (2)
}

// Every fp8 value through the quantizers of every set: with amax at the top of
// the range the scale is exactly 1 and the codes are the encodings of x.
TEST(Fp8, QuantizersEncodeEveryMidpointLikeTheReference) {
    for (quant_format f : {quant_format::fp8_e4m3, quant_format::fp8_e5m2}) {
        const bool e4 = f == quant_format::fp8_e4m3;
        std::vector<float> values;
        const unsigned top = e4 ? 0x7e : 0x7b;
        for (unsigned c = 0; c <= top; ++c) {
            const double a = e4 ? e4m3_definition(c) : e5m2_definition(c);
            values.push_back(static_cast<float>(a));
            if (c < top) {
                const double b = e4 ? e4m3_definition(c + 1) : e5m2_definition(c + 1);
                values.push_back(static_cast<float>((a + b) / 2));
                values.push_back(-static_cast<float>((a + b) / 2));
            }
        }
        while (values.size() % 32) values.push_back(0.0f);
        for (std::size_t g0 = 0; g0 < values.size(); g0 += 32) values[g0] = e4 ? 448.0f : 57344.0f;
        const std::size_t n = values.size();
        std::vector<unsigned char> want(row_bytes(f, n, 32));
        quant_reference().quantize_row[slot(f)][slot(dtype::f32)](values.data(), want.data(), n, 32);
        for (std::size_t i = 0; i < n; ++i) {
            const unsigned char code = want[i / 32 * 34 + 2 + i % 32];
            const unsigned char direct = e4 ? qc::encode_e4m3<ref_arch>(values[i]) : qc::encode_e5m2<ref_arch>(values[i]);
            ASSERT_EQ(code, direct) << name_of(f) << " element " << i << " = " << values[i];
        }
        for (const quant_table& t : quant_tables_under_test()) {
            std::vector<unsigned char> got(want.size());
            t.kernels->quantize_row[slot(f)][slot(dtype::f32)](values.data(), got.data(), n, 32);
            EXPECT_EQ(got, want) << t.name << " " << name_of(f);
        }
    }
}

// ---------------------------------------------------------------------------
// NaN and Inf.

TEST(QuantizeRow, NonFiniteElementPoisonsOnlyItsGroup) {
    rng_type rng(107);
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY};
    for (quant_format f : all_formats)
        for (std::size_t g : all_group_sizes)
            for (dtype type : all_dtypes)
                for (float special : specials) {
                    SCOPED_TRACE(std::string(name_of(f)) + " G=" + std::to_string(g) + " from " +
                                 kvc::name_of(type) + " special " + std::to_string(special));
                    const std::size_t n = 256, groups = n / g, bad_group = 1 % groups;
                    std::vector<float> clean = make_data(data_kind::normal, n, rng, true);
                    std::vector<float> dirty = clean;
                    dirty[bad_group * g + rng() % g] = special;
                    const source_row clean_row(type, clean, 1), dirty_row(type, dirty, 1);
                    for (const quant_table& t : quant_tables_under_test()) {
                        SCOPED_TRACE(t.name);
                        std::vector<unsigned char> a(row_bytes(f, n, g)), b(a.size());
                        t.kernels->quantize_row[slot(f)][slot(type)](clean_row.data(), a.data(), n, g);
                        t.kernels->quantize_row[slot(f)][slot(type)](dirty_row.data(), b.data(), n, g);
                        const std::size_t gb = group_bytes(f, g);
                        for (std::size_t gi = 0; gi < groups; ++gi) {
                            if (gi == bad_group) continue;
                            EXPECT_TRUE(std::equal(a.begin() + gi * gb, a.begin() + (gi + 1) * gb, b.begin() + gi * gb))
                                << "group " << gi << " changed";
                        }
                        std::vector<float> back(n);
                        t.kernels->dequantize_row[slot(f)](b.data(), back.data(), n, g);
                        for (std::size_t i = 0; i < n; ++i) {
                            if (i / g == bad_group) EXPECT_TRUE(std::isnan(back[i])) << "element " << i;
                            else EXPECT_TRUE(std::isfinite(back[i])) << "element " << i;
                        }
                    }
                }
}

} // namespace
