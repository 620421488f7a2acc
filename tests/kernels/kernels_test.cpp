// The row kernels of every kernel_table (dot, axpy, softmax, from_f32, to_f32)
// on every instruction set this CPU supports, against the scalar reference and
// against exact (double) results, for the three storage formats.
//
// Tolerances (kernel_test_util.hpp has the error model):
// - dot of n products: any summation order is within gamma_n(n) * sum|q_i x_i| of
//   the exact dot, so kernel and reference are within 2 gamma_n(n) * sum|q_i x_i|.
// - axpy: y + a x rounds at most twice (once with FMA): gamma_n(2) (|a x| + |y|).
// - softmax: see softmax_bound below.
// - from_f32 / to_f32: bit-exact (round to nearest even is a function).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_test_util.hpp"

namespace {

using namespace kvc_test;

// Lengths covering every tail of every vector width (up to 16 lanes, 2 x 16
// unrolled), the head dims of real models, and a few long or random ones.
std::vector<std::size_t> row_lengths() {
    std::vector<std::size_t> n;
    for (std::size_t i = 0; i <= 70; ++i) n.push_back(i);
    for (std::size_t d : {72, 96, 100, 127, 128, 129, 136, 200, 255, 256, 257, 1000}) n.push_back(d);
    rng_type rng(7);
    for (int i = 0; i < 4; ++i) n.push_back(8 + rng() % 249);
    return n;
}

// ---------------------------------------------------------------------------

TEST(KernelTables, EveryAvailableTableIsComplete) {
    const auto tables = tables_under_test();
    ASSERT_FALSE(tables.empty());
    EXPECT_EQ(tables.front()->arch, arch_id::scalar);
    for (const kk::kernel_table* table : tables) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        EXPECT_EQ(table, kk::table_for(table->arch));
        EXPECT_NE(table->softmax, nullptr);
        for (int i = 0; i < kk::dtype_count; ++i) {
            EXPECT_NE(table->dot[i], nullptr);
            EXPECT_NE(table->axpy[i], nullptr);
            EXPECT_NE(table->from_f32[i], nullptr);
            EXPECT_NE(table->to_f32[i], nullptr);
            EXPECT_NE(table->attend_partial[i], nullptr);
            EXPECT_NE(table->prefill[i], nullptr);
        }
        EXPECT_NE(table->accumulate_mass, nullptr);
    }
}

// The decode attention statistics: mass[t] += sum_g exp(l(g, t) - max g) / sum g,
// against the same sum in double, on every set (xsimd's exp is within a few
// ulp of libm's); accumulated on top of what is there; a group that saw
// nothing (sum 0) adds nothing.
TEST(AccumulateMass, MatchesDoubleDefinitionOnEveryArch) {
    rng_type rng(29);
    std::uniform_real_distribution<float> dist(-20.0f, 5.0f);
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        for (std::size_t tokens : {1, 7, 16, 17, 64, 100, 1031})
            for (std::size_t group : {1, 3, 4}) {
                const std::size_t stride = tokens + 3;
                std::vector<float> logits(group * stride), max(group), sum(group), mass(tokens, 0.25f);
                for (float& l : logits) l = dist(rng);
                for (std::size_t g = 0; g < group; ++g) {
                    max[g] = *std::max_element(logits.begin() + static_cast<std::ptrdiff_t>(g * stride),
                                               logits.begin() + static_cast<std::ptrdiff_t>(g * stride + tokens));
                    sum[g] = g == 1 ? 0.0f : 1.0f + 0.5f * static_cast<float>(g); // any normaliser; 0: skipped
                }
                std::vector<double> want(tokens, 0.25);
                for (std::size_t g = 0; g < group; ++g)
                    if (sum[g] > 0.0f)
                        for (std::size_t t = 0; t < tokens; ++t)
                            want[t] += std::exp(double(logits[g * stride + t]) - max[g]) / sum[g];
                table->accumulate_mass(logits.data(), stride, group, tokens, max.data(), sum.data(), mass.data());
                for (std::size_t t = 0; t < tokens; ++t)
                    // Per term: the float difference l - max (0.5 ulp of |l - max| <= 25, i.e. <= 1e-6
                    // absolute, so <= 1e-6 relative after exp), exp itself (a few ulp), the product and
                    // the sum (1 ulp each): < 2e-6 relative; 4e-6 leaves room.
                    ASSERT_NEAR(mass[t], want[t], 4e-6 * want[t]) << "tokens " << tokens << " group " << group << " t " << t;
            }
    }
}

TEST(Dot, MatchesReferenceAndExactWithinSummationBound) {
    rng_type rng(11);
    for (const kk::kernel_table* table : tables_under_test())
        for (dtype type : all_dtypes) {
            SCOPED_TRACE(describe(*table, type));
            const int before = failures_so_far();
            for (std::size_t n : row_lengths()) {
                SCOPED_TRACE("n=" + std::to_string(n));
                aligned_array<float> q(n, odd_offset(rng));
                fill_normal(q.data(), n, rng);
                rows x(type, 1, n, n, odd_offset(rng));
                fill_normal(x, rng);
                double exact = 0.0, magnitude = 0.0;
                for (std::size_t i = 0; i < n; ++i) {
                    exact += q[i] * x.get(0, i);
                    magnitude += std::fabs(q[i] * x.get(0, i));
                }
                const double bound = gamma_n(static_cast<double>(n)) * magnitude + n * underflow_slack;
                const float got = table->dot[slot(type)](q.data(), x.row(0), n);
                const float want = reference().dot[slot(type)](q.data(), x.row(0), n);
                EXPECT_LE(std::fabs(got - exact), bound) << "got " << got << " exact " << exact;
                EXPECT_LE(std::fabs(static_cast<double>(got) - want), 2.0 * bound) << "got " << got << " reference " << want;
                if (failures_so_far() - before > 4) return;
            }
        }
}

TEST(Axpy, MatchesReferenceAndExactWithinTwoRoundings) {
    rng_type rng(12);
    for (const kk::kernel_table* table : tables_under_test())
        for (dtype type : all_dtypes) {
            SCOPED_TRACE(describe(*table, type));
            const int before = failures_so_far();
            for (std::size_t n : row_lengths()) {
                SCOPED_TRACE("n=" + std::to_string(n));
                rows x(type, 1, n, n, odd_offset(rng));
                fill_normal(x, rng);
                aligned_array<float> y(n, odd_offset(rng)), y_ref(n, 3);
                fill_normal(y.data(), n, rng);
                for (std::size_t i = 0; i < n; ++i) y_ref[i] = y[i];
                const float a = std::normal_distribution<float>(0.0f, 2.0f)(rng);
                std::vector<double> exact(n), bound(n);
                for (std::size_t i = 0; i < n; ++i) {
                    exact[i] = y[i] + static_cast<double>(a) * x.get(0, i);
                    bound[i] = gamma_n(2) * (std::fabs(a * x.get(0, i)) + std::fabs(y[i])) + underflow_slack;
                }
                table->axpy[slot(type)](a, x.row(0), y.data(), n);
                reference().axpy[slot(type)](a, x.row(0), y_ref.data(), n);
                EXPECT_TRUE(within("y", y.data(), n, [&](std::size_t i) { return exact[i]; },
                                   [&](std::size_t i) { return bound[i]; }));
                EXPECT_TRUE(within("y vs reference", y.data(), n, [&](std::size_t i) { return y_ref[i]; },
                                   [&](std::size_t i) { return 2.0 * bound[i]; }));
                if (failures_so_far() - before > 4) return;
            }
        }
}

// ---------------------------------------------------------------------------
// softmax

// Relative error bound of each softmax output (same argument as the attention
// bound in kernel_test_util.hpp, without logit errors): each exp(x_i - max)
// sees the rounding of its argument (u R, R the input range) and one exp (E);
// an implementation that keeps a running max multiplies the sum by a rescale
// factor each time the max grows (k times, k = number of prefix-max records):
// E + 2u plus argument roundings summing to u R. The n-term sum, the reciprocal
// and the final product add gamma_n(n + 4). Perturbations delta of the exponents
// change a normalised value by at most a factor exp(+-2 delta).
double softmax_bound(const std::vector<float>& x) {
    const double u = unit_roundoff;
    float max = -std::numeric_limits<float>::infinity(), min = std::numeric_limits<float>::infinity();
    std::size_t records = 0;
    for (float v : x) {
        if (v > max) ++records;
        max = std::max(max, v);
        min = std::min(min, v);
    }
    const double range = static_cast<double>(max) - min;
    const double delta = 2.0 * u * range + static_cast<double>(records + 1) * (exp_relative_error + 2.0 * u);
    return std::expm1(2.0 * delta + 3.0 * gamma_n(static_cast<double>(x.size()) + 4.0));
}

TEST(Softmax, MatchesReferenceAndExactOnEveryLengthAndScale) {
    std::vector<std::size_t> lengths;
    for (std::size_t n = 1; n <= 40; ++n) lengths.push_back(n);
    for (std::size_t n : {63, 64, 65, 127, 128, 129, 255, 1000, 1031}) lengths.push_back(n);
    rng_type rng(13);
    for (int i = 0; i < 3; ++i) lengths.push_back(1 + rng() % 700);

    struct spread {
        const char* name;
        float low, high;
    };
    // Logit-like inputs, wide ones, and magnitudes where exp without the max
    // subtraction would overflow (e^89 > FLT_MAX) or underflow to zero.
    const spread spreads[] = {{"[-3,3]", -3.0f, 3.0f},
                              {"[-30,30]", -30.0f, 30.0f},
                              {"[80,500]", 80.0f, 500.0f},
                              {"[-500,-80]", -500.0f, -80.0f}};

    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        const int before = failures_so_far();
        for (const spread& s : spreads)
            for (std::size_t n : lengths) {
                SCOPED_TRACE(std::string("inputs in ") + s.name + " n=" + std::to_string(n));
                std::uniform_real_distribution<float> dist(s.low, s.high);
                std::vector<float> input(n);
                for (float& v : input) v = dist(rng);
                if (n > 4) { // a tie for the maximum
                    const std::size_t top = static_cast<std::size_t>(std::max_element(input.begin(), input.end()) - input.begin());
                    input[(top + n / 2) % n] = input[top];
                }

                double max = -std::numeric_limits<double>::infinity();
                for (float v : input) max = std::max(max, static_cast<double>(v));
                std::vector<double> exact(n);
                double sum = 0.0;
                for (std::size_t i = 0; i < n; ++i) sum += (exact[i] = std::exp(input[i] - max));
                for (double& e : exact) e /= sum;
                const double rho = softmax_bound(input);

                aligned_array<float> x(n, odd_offset(rng)), x_ref(n, 1);
                for (std::size_t i = 0; i < n; ++i) x[i] = x_ref[i] = input[i];
                table->softmax(x.data(), n);
                reference().softmax(x_ref.data(), n);

                EXPECT_TRUE(all_finite(x.data(), n));
                EXPECT_TRUE(within("p", x.data(), n, [&](std::size_t i) { return exact[i]; },
                                   [&](std::size_t i) { return rho * exact[i] + underflow_slack; }));
                EXPECT_TRUE(within("p vs reference", x.data(), n, [&](std::size_t i) { return x_ref[i]; },
                                   [&](std::size_t i) { return 2.0 * (rho * exact[i] + underflow_slack); }));
                double total = 0.0;
                for (std::size_t i = 0; i < n; ++i) total += x[i];
                EXPECT_LE(std::fabs(total - 1.0), rho + n * underflow_slack);
                // Tighter, since the sum cancels: p_i / p_top = exp(x_i - x_top) up to
                // the exps of both (2E), the argument rounding (u |x_i - x_top|) and
                // the two products with 1/sum (2u), both ways (x2); p_top >= 1/n turns
                // the underflow slack of p_i into n 2^-126 on the ratio.
                const std::size_t top = static_cast<std::size_t>(std::max_element(input.begin(), input.end()) - input.begin());
                std::vector<float> ratio(n);
                for (std::size_t i = 0; i < n; ++i) ratio[i] = static_cast<float>(static_cast<double>(x[i]) / x[top]);
                EXPECT_TRUE(within(
                    "p / p_max", ratio.data(), n, [&](std::size_t i) { return std::exp(static_cast<double>(input[i]) - input[top]); },
                    [&](std::size_t i) {
                        const double arg = std::fabs(static_cast<double>(input[i]) - input[top]);
                        // + 1 ulp for storing the ratio as float
                        const double rel = std::expm1(2.0 * (unit_roundoff * arg + 2.0 * exp_relative_error + 2.0 * unit_roundoff)) +
                                           2.0 * unit_roundoff;
                        return rel * std::exp(-arg) + n * underflow_slack;
                    }));
                if (failures_so_far() - before > 4) return;
            }
    }
}

TEST(Softmax, EmptyInputIsLeftAlone) {
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        float canary[2] = {3.0f, -7.0f};
        table->softmax(canary, 0);
        EXPECT_EQ(canary[0], 3.0f);
        EXPECT_EQ(canary[1], -7.0f);
    }
}

// ---------------------------------------------------------------------------
// Conversions: bit-exact against the reference on every arch, at every
// position of a vector (body and tail) and at unaligned addresses.

// Converts `n` elements in runs whose lengths cycle through 1 .. 37, so every
// element goes through both the vector body and the scalar tail of the kernels,
// at many alignments. Runs of length 0 come first, as a no-op.
template <class Convert>
void convert_in_runs(std::size_t n, Convert convert) {
    convert(0, 0);
    std::size_t start = 0, run = 1;
    while (start < n) {
        const std::size_t count = std::min(run, n - start);
        convert(start, count);
        start += count;
        run = run % 37 + 1;
    }
}

bool half_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

TEST(Conversions, ToF32IsBitExactForEveryHalfAndBf16Pattern) {
    for (dtype type : {dtype::f16, dtype::bf16}) {
        constexpr std::size_t n = 65536;
        aligned_array<std::uint16_t> src(n, 3);
        for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<std::uint16_t>(i);

        // The reference agrees with kvc/core/float16.hpp (tested on its own).
        aligned_array<float> want(n, 0);
        reference().to_f32[slot(type)](src.data(), want.data(), n);
        int mismatches = 0;
        for (std::size_t i = 0; i < n && mismatches < 5; ++i) {
            const auto h = static_cast<std::uint16_t>(i);
            const float core = type == dtype::f16 ? kvc::detail::float_from_half_bits_soft(h)
                                                  : kvc::detail::float_from_bf16_bits_soft(h);
            const bool nan_in = type == dtype::f16 ? half_is_nan(h) : bf16_is_nan(h);
            if (bits_of(want[i]) != bits_of(core) || nan_in != std::isnan(want[i])) {
                ++mismatches;
                ADD_FAILURE() << kvc::name_of(type) << " reference to_f32(" << hex(h) << ") = " << hex(bits_of(want[i]))
                              << ", kvc/core says " << hex(bits_of(core));
            }
        }

        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(describe(*table, type));
            for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{5}}) {
                aligned_array<float> got(n, offset);
                got.fill(float_of(0x7fbadbadu));
                convert_in_runs(n, [&](std::size_t start, std::size_t count) {
                    table->to_f32[slot(type)](src.data() + start, got.data() + start, count);
                });
                mismatches = 0;
                for (std::size_t i = 0; i < n && mismatches < 5; ++i)
                    if (bits_of(got[i]) != bits_of(want[i])) {
                        ++mismatches;
                        ADD_FAILURE() << "to_f32(" << hex(static_cast<std::uint32_t>(i)) << ") = " << hex(bits_of(got[i]))
                                      << ", reference " << hex(bits_of(want[i]));
                    }
            }
        }
    }
}

// Specials and rounding boundaries, as float bit patterns.
std::vector<std::uint32_t> special_floats() {
    std::vector<std::uint32_t> v = {
        0x00000000u, 0x80000000u,             // signed zeros
        0x7f800000u, 0xff800000u,             // infinities
        0x7fc00000u, 0xffc00000u,             // quiet NaNs
        0x7f800001u, 0xff800001u,             // signalling NaNs, payload only in the low bits
        0x7fa00000u, 0x7fbfe000u, 0x7fffffffu, 0xffffffffu, 0x7fc01234u, 0x7f812345u,
        0x00000001u, 0x80000001u, 0x007fffffu, 0x00400000u, // float subnormals
        0x00800000u, 0x80800000u, 0x7f7fffffu, 0xff7fffffu, // smallest / largest normal float
        0x3f800000u, 0xbf800000u,
    };
    const float values[] = {
        65504.0f, 65519.0f, 65519.996f, 65520.0f, 65536.0f, -65520.0f, // half overflow boundary
        0x1p-24f, 0x1p-25f, 0x1.000002p-25f, 0x1.8p-25f, 0x1.8p-24f, 0x1p-26f, // half subnormal rounding
        0x1.8p-23f, 0x1.4p-23f, 0x1.ffcp-15f, 0x1.ffep-15f, 0x1.fffp-15f, 0x1p-14f, 0x1.ffcp-16f,
        1.0f + 0x1p-11f, 1.0f + 0x3p-11f, 1.0f + 0x1p-11f + 0x1p-23f, 2048.5f, 2049.0f, 2051.0f, // half ties
        1.0f + 0x1p-8f, 1.0f + 0x3p-8f, 1.0f + 0x1p-8f + 0x1p-23f, 257.0f, 259.0f,            // bf16 ties
        0x1.fep127f, 0x1.ffp127f, 0x1.fefffep127f, 0x1p-133f, 0x1p-134f, 0x1.8p-133f,           // bf16 extremes
    };
    for (float x : values) {
        v.push_back(bits_of(x));
        v.push_back(bits_of(-x));
    }
    // For every exponent: the exact halfway points of half (13 dropped bits) and
    // bf16 (16 dropped bits) with odd and even kept parts, and their neighbours.
    for (std::uint32_t e = 0; e < 255; ++e)
        for (std::uint32_t kept : {0x0u, 0x1u, 0x2u, 0x3ffu, 0x155u})
            for (std::uint32_t dropped : {0x0fffu, 0x1000u, 0x1001u}) {
                v.push_back((e << 23) | (kept << 13) | dropped);
                v.push_back(0x80000000u | (e << 23) | ((kept & 0x7fu) << 16) | (dropped << 3));
                v.push_back((e << 23) | ((kept & 0x7fu) << 16) | (dropped == 0x1000u ? 0x8000u : dropped == 0x0fffu ? 0x7fffu : 0x8001u));
            }
    return v;
}

// Element i of a converted row, as bits (through memcpy: the row may hold floats).
std::uint32_t code_at(const std::uint16_t* row, std::size_t i, std::size_t width) {
    std::uint32_t code = 0;
    if (width == 2) {
        std::memcpy(&code, row + i * 2, 4);
    } else {
        code = row[i];
    }
    return code;
}

template <class Values>
void check_from_f32_bit_exact(const Values& patterns) {
    const std::size_t n = patterns.size();
    aligned_array<float> src(n, 1);
    for (std::size_t i = 0; i < n; ++i) src[i] = float_of(patterns[i]);
    for (dtype type : all_dtypes) {
        const std::size_t width = kvc::size_of(type) / 2; // in uint16 units
        aligned_array<std::uint16_t> want(n * width, 0);
        reference().from_f32[slot(type)](src.data(), want.data(), n);
        if (type != dtype::f32) { // the reference agrees with kvc/core/float16.hpp
            int mismatches = 0;
            for (std::size_t i = 0; i < n && mismatches < 5; ++i) {
                const std::uint16_t core = type == dtype::f16 ? kvc::detail::half_bits_from_float_soft(src[i])
                                                              : kvc::detail::bf16_bits_from_float_soft(src[i]);
                const bool nan_out = type == dtype::f16 ? half_is_nan(want[i]) : bf16_is_nan(want[i]);
                if (want[i] != core || nan_out != std::isnan(src[i])) {
                    ++mismatches;
                    ADD_FAILURE() << kvc::name_of(type) << " reference from_f32(" << hex(patterns[i])
                                  << ") = " << hex(want[i]) << ", kvc/core says " << hex(core);
                }
            }
        }
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(describe(*table, type));
            for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{3}}) {
                aligned_array<std::uint16_t> got(n * width, offset * width);
                got.fill(0xbadbu);
                convert_in_runs(n, [&](std::size_t start, std::size_t count) {
                    table->from_f32[slot(type)](src.data() + start, got.data() + start * width, count);
                });
                int mismatches = 0;
                for (std::size_t i = 0; i < n && mismatches < 5; ++i) {
                    const std::uint32_t g = code_at(got.data(), i, width), w = code_at(want.data(), i, width);
                    if (g != w) {
                        ++mismatches;
                        ADD_FAILURE() << "from_f32(" << hex(patterns[i]) << ") = " << hex(g) << ", reference " << hex(w);
                    }
                }
            }
        }
    }
}

TEST(Conversions, FromF32IsBitExactOnSpecialValuesAndTies) { check_from_f32_bit_exact(special_floats()); }

TEST(Conversions, FromF32IsBitExactOnRandomPatterns) {
    // Uniform bit patterns, and patterns with exponents in and around the half
    // range (subnormal, normal, overflow) where the rounding work happens.
    rng_type rng(14);
    std::vector<std::uint32_t> patterns(1u << 18);
    for (std::size_t i = 0; i < patterns.size(); ++i) {
        std::uint32_t p = static_cast<std::uint32_t>(rng());
        if (i % 2 == 1) p = (p & 0x807fffffu) | static_cast<std::uint32_t>(96 + rng() % 51) << 23;
        patterns[i] = p;
    }
    check_from_f32_bit_exact(patterns);
}

TEST(Conversions, KnownRoundingsOnEveryArch) {
    struct known {
        float x;
        std::uint16_t half, bf16;
    };
    const known cases[] = {
        {0.0f, 0x0000, 0x0000},
        {-0.0f, 0x8000, 0x8000},
        {1.0f, 0x3c00, 0x3f80},
        {1.0f + 0x1p-11f, 0x3c00, 0x3f80},            // half tie, even below
        {1.0f + 0x3p-11f, 0x3c02, 0x3f80},            // half tie, even above
        {1.0f + 0x1p-8f, 0x3c04, 0x3f80},             // bf16 tie, even below
        {1.0f + 0x3p-8f, 0x3c0c, 0x3f82},             // bf16 tie, even above
        {65504.0f, 0x7bff, 0x4780},
        {65519.0f, 0x7bff, 0x4780},
        {65520.0f, 0x7c00, 0x4780},                   // half overflow tie goes to infinity
        {-65520.0f, 0xfc00, 0xc780},
        {0x1p-24f, 0x0001, 0x3380},                   // smallest half subnormal
        {0x1p-25f, 0x0000, 0x3300},                   // tie between 0 and 2^-24: even (zero)
        {0x1.000002p-25f, 0x0001, 0x3300},
        {0x1.8p-24f, 0x0002, 0x33c0},                 // tie between 1 and 2 subnormal units: 2
        {0x1.ffep-15f, 0x0400, 0x3880},               // rounds up into the smallest normal half
        {0x1.fefffep127f, 0x7c00, 0x7f7f},
        {0x1.ffp127f, 0x7c00, 0x7f80},                // bf16 overflow tie goes to infinity
        {std::numeric_limits<float>::infinity(), 0x7c00, 0x7f80},
        {-std::numeric_limits<float>::infinity(), 0xfc00, 0xff80},
        {float_of(0x00000001u), 0x0000, 0x0000},      // float subnormal
        {float_of(0x80400000u), 0x8000, 0x8040},      // float subnormal keeps its sign and bf16 bits
    };
    constexpr std::size_t n = sizeof cases / sizeof cases[0];
    aligned_array<float> src(n, 1);
    for (std::size_t i = 0; i < n; ++i) src[i] = cases[i].x;
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        aligned_array<std::uint16_t> h(n, 1), b(n, 3);
        table->from_f32[slot(dtype::f16)](src.data(), h.data(), n);
        table->from_f32[slot(dtype::bf16)](src.data(), b.data(), n);
        for (std::size_t i = 0; i < n; ++i) {
            SCOPED_TRACE("x = " + hex(bits_of(cases[i].x)));
            EXPECT_EQ(hex(h[i]), hex(cases[i].half));
            EXPECT_EQ(hex(b[i]), hex(cases[i].bf16));
        }
        // NaN stays NaN (quiet), with its sign, in both formats.
        const float nans[] = {float_of(0x7fc00000u), float_of(0xff800001u), float_of(0x7f800001u), float_of(0x7fbfffffu)};
        aligned_array<std::uint16_t> hn(4, 1), bn(4, 1);
        table->from_f32[slot(dtype::f16)](nans, hn.data(), 4);
        table->from_f32[slot(dtype::bf16)](nans, bn.data(), 4);
        for (std::size_t i = 0; i < 4; ++i) {
            EXPECT_TRUE(half_is_nan(hn[i]) && (hn[i] & 0x0200u)) << hex(hn[i]);
            EXPECT_TRUE(bf16_is_nan(bn[i]) && (bn[i] & 0x0040u)) << hex(bn[i]);
            EXPECT_EQ((hn[i] >> 15) != 0, std::signbit(nans[i]));
            EXPECT_EQ((bn[i] >> 15) != 0, std::signbit(nans[i]));
        }
    }
}

TEST(Conversions, F32CopiesBitsIncludingNaNPayloads) {
    rng_type rng(15);
    constexpr std::size_t n = 4099;
    aligned_array<float> src(n, 1);
    for (std::size_t i = 0; i < n; ++i) {
        std::uint32_t p = static_cast<std::uint32_t>(rng());
        if (i % 3 == 0) p |= 0x7f800000u; // inf / NaN with random payloads
        src[i] = float_of(p);
    }
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        aligned_array<float> stored(n, 3), loaded(n, 5);
        convert_in_runs(n, [&](std::size_t start, std::size_t count) {
            table->from_f32[slot(dtype::f32)](src.data() + start, stored.data() + start, count);
        });
        convert_in_runs(n, [&](std::size_t start, std::size_t count) {
            table->to_f32[slot(dtype::f32)](stored.data() + start, loaded.data() + start, count);
        });
        int mismatches = 0;
        for (std::size_t i = 0; i < n && mismatches < 5; ++i)
            if (bits_of(loaded[i]) != bits_of(src[i]) || bits_of(stored[i]) != bits_of(src[i])) {
                ++mismatches;
                ADD_FAILURE() << hex(bits_of(src[i])) << " -> " << hex(bits_of(stored[i])) << " -> " << hex(bits_of(loaded[i]));
            }
    }
}

TEST(Conversions, StoredValuesRoundTripExactly) {
    // Every non-NaN half / bf16 value is a float, so to_f32 then from_f32 must
    // give back the same bits on every arch.
    for (dtype type : {dtype::f16, dtype::bf16}) {
        std::vector<std::uint16_t> codes;
        for (std::uint32_t c = 0; c <= 0xffff; ++c) {
            const auto h = static_cast<std::uint16_t>(c);
            if (!(type == dtype::f16 ? half_is_nan(h) : bf16_is_nan(h))) codes.push_back(h);
        }
        const std::size_t n = codes.size();
        aligned_array<std::uint16_t> src(n, 1);
        std::copy(codes.begin(), codes.end(), src.data());
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(describe(*table, type));
            aligned_array<float> wide(n, 1);
            aligned_array<std::uint16_t> back(n, 5);
            table->to_f32[slot(type)](src.data(), wide.data(), n);
            table->from_f32[slot(type)](wide.data(), back.data(), n);
            int mismatches = 0;
            for (std::size_t i = 0; i < n && mismatches < 5; ++i)
                if (back[i] != src[i]) {
                    ++mismatches;
                    ADD_FAILURE() << hex(src[i]) << " -> " << hex(bits_of(wide[i])) << " -> " << hex(back[i]);
                }
        }
    }
}

TEST(Conversions, ZeroLengthWritesNothing) {
    for (const kk::kernel_table* table : tables_under_test())
        for (dtype type : all_dtypes) {
            SCOPED_TRACE(describe(*table, type));
            float src[1] = {1.0f};
            float dst_f[1] = {-5.0f};
            std::uint32_t dst_bits[1] = {0xdeadbeefu};
            table->from_f32[slot(type)](src, dst_bits, 0);
            table->to_f32[slot(type)](dst_bits, dst_f, 0);
            EXPECT_EQ(dst_bits[0], 0xdeadbeefu);
            EXPECT_EQ(dst_f[0], -5.0f);
        }
}

} // namespace
