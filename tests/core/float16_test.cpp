// Tests for kvc/core/float16.hpp against oracles that share no code with it:
// values decoded from the format's fields with std::ldexp, round-to-nearest-even
// found by searching a table of all representable values, and, where the CPU
// has them, the F16C and AVX512_BF16 conversion instructions.
#include "kvc/core/float16.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KVC_TEST_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define KVC_TEST_X86 0
#endif

namespace {

using kvc::bfloat16;
using kvc::half;

std::uint32_t bits_of(float value) {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

float float_of(std::uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

std::string hex(std::uint32_t value) {
    std::ostringstream out;
    out << "0x" << std::hex << value;
    return out.str();
}

// Counts failures in the exhaustive loops and keeps the first few, so a broken
// conversion reports a handful of lines instead of sixty thousand.
class failures {
public:
    void add(const std::string& what) {
        if (count_++ < 8) examples_ += "\n  " + what;
    }
    std::size_t count() const { return count_; }
    const std::string& examples() const { return examples_; }

private:
    std::size_t count_ = 0;
    std::string examples_;
};

#define EXPECT_NO_FAILURES(log) EXPECT_EQ((log).count(), 0u) << (log).examples()

// ---------------------------------------------------------------------------
// Oracles built from the format definitions only.

bool is_half_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }
bool is_bf16_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x007fu) != 0; }

// binary16: value = (-1)^s * 2^(e-15) * 1.m, or 2^-14 * 0.m when e == 0.
double half_value(std::uint16_t h) {
    const double sign = (h & 0x8000u) ? -1.0 : 1.0;
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x03ff;
    if (exponent == 0x1f) return mantissa ? std::numeric_limits<double>::quiet_NaN()
                                          : sign * std::numeric_limits<double>::infinity();
    if (exponent == 0) return sign * std::ldexp(mantissa, -24);
    return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

// bfloat16: value = (-1)^s * 2^(e-127) * 1.m (7 mantissa bits), or 2^-126 * 0.m.
double bf16_value(std::uint16_t b) {
    const double sign = (b & 0x8000u) ? -1.0 : 1.0;
    const int exponent = (b >> 7) & 0xff;
    const int mantissa = b & 0x7f;
    if (exponent == 0xff) return mantissa ? std::numeric_limits<double>::quiet_NaN()
                                          : sign * std::numeric_limits<double>::infinity();
    if (exponent == 0) return sign * std::ldexp(mantissa, -133);
    return sign * std::ldexp(128 + mantissa, exponent - 134);
}

// Round to nearest, ties to even, by looking the magnitude up among all
// non-negative codes (whose values increase with the code). Infinity stands in
// at the value the next binade would start at, which is how IEEE 754 defines
// overflow under nearest-even. Differences are exact in double wherever a tie
// is possible, so the comparison is exact where it matters.
class nearest_even_oracle {
public:
    nearest_even_oracle(std::uint16_t infinity_code, double (*decode)(std::uint16_t), double overflow_value)
        : infinity_code_(infinity_code) {
        values_.reserve(infinity_code + 1u);
        for (std::uint32_t code = 0; code < infinity_code; ++code) values_.push_back(decode(static_cast<std::uint16_t>(code)));
        values_.push_back(overflow_value);
    }

    std::uint16_t round(float x) const {
        const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
        const double magnitude = std::fabs(static_cast<double>(x));
        const auto above_it = std::upper_bound(values_.begin(), values_.end(), magnitude);
        const auto below = static_cast<std::size_t>(above_it - values_.begin()) - 1;
        if (below == infinity_code_) return static_cast<std::uint16_t>(sign | infinity_code_);
        const double distance_below = magnitude - values_[below];
        const double distance_above = values_[below + 1] - magnitude;
        std::size_t chosen;
        if (distance_below < distance_above) chosen = below;
        else if (distance_above < distance_below) chosen = below + 1;
        else chosen = (below % 2 == 0) ? below : below + 1;  // the code's low bit is the mantissa's
        return static_cast<std::uint16_t>(sign | chosen);
    }

private:
    std::uint16_t infinity_code_;
    std::vector<double> values_;
};

const nearest_even_oracle& half_oracle() {
    static const nearest_even_oracle oracle(0x7c00, half_value, 65536.0);
    return oracle;
}

const nearest_even_oracle& bf16_oracle() {
    static const nearest_even_oracle oracle(0x7f80, bf16_value, std::ldexp(1.0, 128));
    return oracle;
}

// Random floats: uniform bit patterns (mostly far outside half range), plus
// patterns whose exponent lands in or around the half range.
std::vector<float> random_floats(std::size_t count, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<float> result;
    result.reserve(count);
    std::uniform_int_distribution<std::uint32_t> exponent_near_half(96, 146);
    for (std::size_t i = 0; i < count; ++i) {
        std::uint32_t pattern = rng();
        if (i % 2 == 1) pattern = (pattern & 0x807fffffu) | (exponent_near_half(rng) << 23);
        result.push_back(float_of(pattern));
    }
    return result;
}

// ---------------------------------------------------------------------------
// The types themselves.

TEST(Float16Types, StorageShape) {
    static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2);
    static_assert(std::is_trivially_copyable_v<half> && std::is_trivially_copyable_v<bfloat16>);
    static_assert(std::is_trivially_default_constructible_v<half>);
    static_assert(std::is_trivially_default_constructible_v<bfloat16>);
    static_assert(std::is_standard_layout_v<half> && std::is_standard_layout_v<bfloat16>);
    // Conversions are explicit both ways: a silent narrowing is a silent rounding.
    static_assert(std::is_constructible_v<half, float> && !std::is_convertible_v<float, half>);
    static_assert(std::is_constructible_v<bfloat16, float> && !std::is_convertible_v<float, bfloat16>);
    static_assert(std::is_constructible_v<float, half> && !std::is_convertible_v<half, float>);
    static_assert(std::is_constructible_v<float, bfloat16> && !std::is_convertible_v<bfloat16, float>);

    constexpr half one = half::from_bits(0x3c00);
    static_assert(one.bits == 0x3c00);
    constexpr bfloat16 two = bfloat16::from_bits(0x4000);
    static_assert(two.bits == 0x4000);
    static_assert(kvc::same_bits(one, half::from_bits(0x3c00)));
    static_assert(!kvc::same_bits(half::from_bits(0x0000), half::from_bits(0x8000)));
    static_assert(!kvc::same_bits(two, bfloat16::from_bits(0x4001)));

    EXPECT_EQ(half{}.bits, 0u);
    EXPECT_EQ(bfloat16{}.bits, 0u);
    EXPECT_EQ(static_cast<float>(one), 1.0f);
    EXPECT_EQ(static_cast<float>(two), 2.0f);
    EXPECT_EQ(half(1.0f).bits, 0x3c00u);
    EXPECT_EQ(bfloat16(-2.0f).bits, 0xc000u);
    EXPECT_EQ(kvc::to_float(0.25f), 0.25f);
}

// ---------------------------------------------------------------------------
// half: exhaustive.

TEST(Half, ToFloatIsExactForEveryPattern) {
    failures log;
    for (std::uint32_t code = 0; code <= 0xffff; ++code) {
        const auto h = static_cast<std::uint16_t>(code);
        const float got = kvc::to_float(half::from_bits(h));
        const float soft = kvc::detail::float_from_half_bits_soft(h);
        const float member = static_cast<float>(half::from_bits(h));
        if (bits_of(got) != bits_of(soft) || bits_of(got) != bits_of(member))
            log.add(hex(h) + ": to_float, soft and operator float disagree");
        if (is_half_nan(h)) {
            if (!std::isnan(got) || std::signbit(got) != ((h & 0x8000u) != 0))
                log.add(hex(h) + ": NaN became " + hex(bits_of(got)));
            // Quieted, and the half payload survives in the top mantissa bits.
            const std::uint32_t expected = ((h & 0x8000u) << 16) | 0x7fc00000u | ((h & 0x3ffu) << 13);
            if (bits_of(got) != expected) log.add(hex(h) + ": NaN became " + hex(bits_of(got)) + ", want " + hex(expected));
            continue;
        }
        const double want = half_value(h);
        if (static_cast<double>(got) != want || std::signbit(got) != std::signbit(want))
            log.add(hex(h) + ": got " + std::to_string(got) + " want " + std::to_string(want));
    }
    EXPECT_NO_FAILURES(log);
}

TEST(Half, RoundTripKeepsEveryPattern) {
    failures log;
    for (std::uint32_t code = 0; code <= 0xffff; ++code) {
        const auto h = static_cast<std::uint16_t>(code);
        const float wide = kvc::to_float(half::from_bits(h));
        const std::uint16_t back = kvc::to_half(wide).bits;
        const std::uint16_t constructed = half(wide).bits;
        const std::uint16_t soft = kvc::detail::half_bits_from_float_soft(wide);
        if (back != constructed || back != soft) log.add(hex(h) + ": to_half, half(float) and soft disagree");
        if (is_half_nan(h)) {
            if (!is_half_nan(back) || (back & 0x8000u) != (h & 0x8000u) || (back & 0x0200u) == 0)
                log.add(hex(h) + ": NaN came back as " + hex(back));
        } else if (back != h) {
            log.add(hex(h) + ": came back as " + hex(back));
        }
    }
    EXPECT_NO_FAILURES(log);
}

// ---------------------------------------------------------------------------
// half: rounding.

TEST(Half, MidpointsRoundToEvenAndNeighboursRoundAway) {
    failures log;
    // Every pair of adjacent finite halves, 0x7bfe/0x7bff being the last.
    for (std::uint32_t low = 0; low < 0x7bff; ++low) {
        const auto high = low + 1;
        const double midpoint = (half_value(static_cast<std::uint16_t>(low)) + half_value(static_cast<std::uint16_t>(high))) / 2;
        const auto mid = static_cast<float>(midpoint);
        if (static_cast<double>(mid) != midpoint) {
            log.add(hex(low) + ": midpoint not representable in float");
            continue;
        }
        const std::uint32_t even = (low % 2 == 0) ? low : high;
        const float below = std::nextafter(mid, 0.0f);
        const float above = std::nextafter(mid, std::numeric_limits<float>::infinity());
        for (const std::uint32_t sign : {0u, 0x8000u}) {
            const float s = sign ? -1.0f : 1.0f;
            const std::uint16_t at = kvc::to_half(s * mid).bits;
            const std::uint16_t under = kvc::to_half(s * below).bits;
            const std::uint16_t over = kvc::to_half(s * above).bits;
            if (at != (sign | even)) log.add(hex(sign | low) + " tie: got " + hex(at) + " want " + hex(sign | even));
            if (under != (sign | low)) log.add(hex(sign | low) + " below tie: got " + hex(under));
            if (over != (sign | high)) log.add(hex(sign | low) + " above tie: got " + hex(over));
        }
    }
    EXPECT_NO_FAILURES(log);
}

TEST(Half, OverflowThreshold) {
    EXPECT_EQ(kvc::to_half(65504.0f).bits, 0x7bffu);
    EXPECT_EQ(kvc::to_half(65519.99f).bits, 0x7bffu);
    EXPECT_EQ(kvc::to_half(std::nextafter(65520.0f, 0.0f)).bits, 0x7bffu);
    // 65520 is the midpoint between 65504 (odd mantissa) and 2^16: ties to even is infinity.
    EXPECT_EQ(kvc::to_half(65520.0f).bits, 0x7c00u);
    EXPECT_EQ(kvc::to_half(-65520.0f).bits, 0xfc00u);
    EXPECT_EQ(kvc::to_half(-65519.99f).bits, 0xfbffu);
    EXPECT_EQ(kvc::to_half(65536.0f).bits, 0x7c00u);
    EXPECT_EQ(kvc::to_half(1e10f).bits, 0x7c00u);
    EXPECT_EQ(kvc::to_half(FLT_MAX).bits, 0x7c00u);
    EXPECT_EQ(kvc::to_half(-FLT_MAX).bits, 0xfc00u);
    EXPECT_EQ(kvc::to_half(std::numeric_limits<float>::infinity()).bits, 0x7c00u);
    EXPECT_EQ(kvc::to_half(-std::numeric_limits<float>::infinity()).bits, 0xfc00u);
    EXPECT_EQ(kvc::to_float(half::from_bits(0x7bff)), 65504.0f);
    EXPECT_TRUE(std::isinf(kvc::to_float(half::from_bits(0x7c00))));
    EXPECT_TRUE(std::isinf(kvc::to_float(half::from_bits(0xfc00))) && kvc::to_float(half::from_bits(0xfc00)) < 0);
}

TEST(Half, SubnormalBoundaries) {
    const float smallest = std::ldexp(1.0f, -24);  // the smallest subnormal half
    EXPECT_EQ(kvc::to_float(half::from_bits(0x0001)), smallest);
    EXPECT_EQ(kvc::to_float(half::from_bits(0x03ff)), std::ldexp(1023.0f, -24));
    EXPECT_EQ(kvc::to_float(half::from_bits(0x0400)), std::ldexp(1.0f, -14));
    EXPECT_EQ(kvc::to_float(half::from_bits(0x8001)), -smallest);

    EXPECT_EQ(kvc::to_half(smallest).bits, 0x0001u);
    EXPECT_EQ(kvc::to_half(smallest / 2).bits, 0x0000u);  // tie between 0 and 1: even is 0
    EXPECT_EQ(kvc::to_half(-smallest / 2).bits, 0x8000u);
    EXPECT_EQ(kvc::to_half(std::nextafter(smallest / 2, 1.0f)).bits, 0x0001u);
    EXPECT_EQ(kvc::to_half(std::nextafter(smallest / 2, 0.0f)).bits, 0x0000u);
    EXPECT_EQ(kvc::to_half(smallest * 1.5f).bits, 0x0002u);  // tie between 1 and 2
    EXPECT_EQ(kvc::to_half(smallest * 2.5f).bits, 0x0002u);  // tie between 2 and 3
    EXPECT_EQ(kvc::to_half(std::ldexp(1023.0f, -24)).bits, 0x03ffu);
    EXPECT_EQ(kvc::to_half(std::ldexp(1023.5f, -24)).bits, 0x0400u);  // rounds up into the normals
    EXPECT_EQ(kvc::to_half(std::nextafter(std::ldexp(1023.5f, -24), 0.0f)).bits, 0x03ffu);
    EXPECT_EQ(kvc::to_half(std::ldexp(1.0f, -14)).bits, 0x0400u);
    // Float subnormals and tiny normals are far below half's smallest subnormal.
    EXPECT_EQ(kvc::to_half(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
    EXPECT_EQ(kvc::to_half(-std::numeric_limits<float>::denorm_min()).bits, 0x8000u);
    EXPECT_EQ(kvc::to_half(FLT_MIN).bits, 0x0000u);
    EXPECT_EQ(kvc::to_half(1e-30f).bits, 0x0000u);
}

TEST(Half, SignedZero) {
    EXPECT_EQ(kvc::to_half(0.0f).bits, 0x0000u);
    EXPECT_EQ(kvc::to_half(-0.0f).bits, 0x8000u);
    const float negative_zero = kvc::to_float(half::from_bits(0x8000));
    EXPECT_EQ(negative_zero, 0.0f);
    EXPECT_TRUE(std::signbit(negative_zero));
    EXPECT_FALSE(std::signbit(kvc::to_float(half::from_bits(0x0000))));
}

TEST(Half, EveryFloatNaNStaysNaNWithItsSign) {
    failures log;
    for (std::uint32_t payload = 1; payload <= 0x7fffffu; ++payload) {
        for (const std::uint32_t sign : {0u, 0x80000000u}) {
            const std::uint32_t pattern = sign | 0x7f800000u | payload;
            const std::uint16_t h = kvc::to_half(float_of(pattern)).bits;
            if (!is_half_nan(h) || ((h & 0x8000u) != 0) != (sign != 0) || (h & 0x0200u) == 0)
                log.add(hex(pattern) + " became " + hex(h));
        }
    }
    EXPECT_NO_FAILURES(log);
    EXPECT_EQ(kvc::to_half(float_of(0x7fc00000u)).bits, 0x7e00u);
    EXPECT_EQ(kvc::to_half(float_of(0xffc00000u)).bits, 0xfe00u);
    EXPECT_EQ(kvc::to_half(float_of(0x7f800001u)).bits, 0x7e00u);  // payload only in dropped bits
}

TEST(Half, RandomFloatsMatchNearestEvenOracle) {
    failures log;
    for (const float x : random_floats(2'000'000, 20240611u)) {
        if (std::isnan(x)) continue;
        const std::uint16_t got = kvc::to_half(x).bits;
        const std::uint16_t want = half_oracle().round(x);
        if (got != want) log.add(hex(bits_of(x)) + ": got " + hex(got) + " want " + hex(want));
    }
    EXPECT_NO_FAILURES(log);
}

// ---------------------------------------------------------------------------
// half against F16C, an implementation that shares nothing with ours.

#if KVC_TEST_X86
__attribute__((target("f16c"))) std::uint16_t f16c_half_bits(float x) {
    return static_cast<std::uint16_t>(_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT)));
}

__attribute__((target("f16c"))) float f16c_float(std::uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

// Asked of cpuid directly: clang 14's __builtin_cpu_supports does not know
// "f16c", and both instructions also need the OS to save the vector state.
std::uint64_t os_saved_state() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0;  // OSXSAVE
    unsigned low = 0, high = 0;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return (static_cast<std::uint64_t>(high) << 32) | low;
}

bool cpu_has_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    return (ecx & (1u << 29)) != 0 && (os_saved_state() & 0x6u) == 0x6u;  // F16C; XMM and YMM state
}

bool cpu_has_avx512_bf16() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(ebx & (1u << 16)) || eax < 1) return false;  // AVX512F
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;            // AVX512_BF16
    return (os_saved_state() & 0xe6u) == 0xe6u;  // XMM, YMM, opmask and ZMM state
}

// Float patterns laid out along the half format: every sign, float exponent
// and top-10 mantissa bits, with the 13 bits half drops set to the values
// that decide rounding; and, in the half subnormal range where more bits are
// dropped, every kept value with the dropped bits at the same decision points.
std::vector<std::uint32_t> structured_float_patterns() {
    std::vector<std::uint32_t> patterns;
    const std::uint32_t low_bits[] = {0x0000, 0x0001, 0x0002, 0x07ff, 0x0fff, 0x1000, 0x1001, 0x17ff, 0x1ffe, 0x1fff};
    for (std::uint32_t prefix = 0; prefix < (1u << 19); ++prefix)
        for (const std::uint32_t low : low_bits) patterns.push_back((prefix << 13) | low);
    for (std::uint32_t exponent = 102; exponent <= 113; ++exponent) {
        const std::uint32_t shift = 126 - exponent;  // significand bits below the half subnormal ulp
        const std::uint32_t halfway = 1u << (shift - 1);
        const std::uint32_t mask = (1u << shift) - 1;
        for (std::uint32_t kept = 0; kept <= (0xffffffu >> shift); ++kept) {
            for (const std::uint32_t dropped : {0u, 1u, halfway - 1, halfway, halfway + 1, mask}) {
                const std::uint32_t significand = (kept << shift) | dropped;
                if (significand < 0x800000u || significand > 0xffffffu) continue;
                for (const std::uint32_t sign : {0u, 0x80000000u})
                    patterns.push_back(sign | (exponent << 23) | (significand & 0x7fffffu));
            }
        }
    }
    return patterns;
}

TEST(HalfHardware, FloatToHalfMatchesF16C) {
    if (!cpu_has_f16c()) GTEST_SKIP() << "CPU lacks F16C; the software path is checked against the table oracle only";
    failures log;
    std::mt19937 rng(7u);
    std::size_t checked = 0;
    auto check = [&](std::uint32_t pattern) {
        const float x = float_of(pattern);
        const std::uint16_t hardware = f16c_half_bits(x);
        const std::uint16_t soft = kvc::detail::half_bits_from_float_soft(x);
        const std::uint16_t public_path = kvc::to_half(x).bits;
        if (soft != hardware || public_path != hardware)
            log.add(hex(pattern) + ": soft " + hex(soft) + " public " + hex(public_path) + " F16C " + hex(hardware));
        ++checked;
    };
    for (int i = 0; i < 20'000'000; ++i) check(rng());
    for (const std::uint32_t pattern : structured_float_patterns()) check(pattern);
    EXPECT_NO_FAILURES(log) << " of " << checked;
}

TEST(HalfHardware, HalfToFloatMatchesF16CForEveryPattern) {
    if (!cpu_has_f16c()) GTEST_SKIP() << "CPU lacks F16C";
    failures log;
    for (std::uint32_t code = 0; code <= 0xffff; ++code) {
        const auto h = static_cast<std::uint16_t>(code);
        const std::uint32_t hardware = bits_of(f16c_float(h));
        const std::uint32_t soft = bits_of(kvc::detail::float_from_half_bits_soft(h));
        if (soft != hardware) log.add(hex(h) + ": soft " + hex(soft) + " F16C " + hex(hardware));
    }
    EXPECT_NO_FAILURES(log);
}
#endif

// ---------------------------------------------------------------------------
// bfloat16.

TEST(BFloat16, ToFloatIsTheTopHalfForEveryPattern) {
    failures log;
    for (std::uint32_t code = 0; code <= 0xffff; ++code) {
        const auto b = static_cast<std::uint16_t>(code);
        const float got = kvc::to_float(bfloat16::from_bits(b));
        if (bits_of(got) != code << 16) log.add(hex(b) + ": got " + hex(bits_of(got)));
        if (bits_of(static_cast<float>(bfloat16::from_bits(b))) != code << 16) log.add(hex(b) + ": operator float differs");
        if (bits_of(kvc::detail::float_from_bf16_bits_soft(b)) != code << 16) log.add(hex(b) + ": soft differs");
        if (is_bf16_nan(b)) {
            if (!std::isnan(got)) log.add(hex(b) + ": NaN lost");
        } else if (static_cast<double>(got) != bf16_value(b)) {
            log.add(hex(b) + ": value " + std::to_string(got) + " want " + std::to_string(bf16_value(b)));
        }
    }
    EXPECT_NO_FAILURES(log);
}

TEST(BFloat16, RoundTripKeepsEveryPattern) {
    failures log;
    for (std::uint32_t code = 0; code <= 0xffff; ++code) {
        const auto b = static_cast<std::uint16_t>(code);
        const float wide = kvc::to_float(bfloat16::from_bits(b));
        const std::uint16_t back = kvc::to_bfloat16(wide).bits;
        if (back != bfloat16(wide).bits || back != kvc::detail::bf16_bits_from_float_soft(wide))
            log.add(hex(b) + ": to_bfloat16, bfloat16(float) and soft disagree");
        if (is_bf16_nan(b)) {
            if (!is_bf16_nan(back) || (back & 0x8000u) != (b & 0x8000u) || (back & 0x0040u) == 0)
                log.add(hex(b) + ": NaN came back as " + hex(back));
        } else if (back != b) {
            log.add(hex(b) + ": came back as " + hex(back));
        }
    }
    EXPECT_NO_FAILURES(log);
}

TEST(BFloat16, MidpointsRoundToEvenAndNeighboursRoundAway) {
    failures log;
    for (std::uint32_t low = 0; low < 0x7f7f; ++low) {
        const auto high = low + 1;
        const double midpoint = (bf16_value(static_cast<std::uint16_t>(low)) + bf16_value(static_cast<std::uint16_t>(high))) / 2;
        const auto mid = static_cast<float>(midpoint);
        if (static_cast<double>(mid) != midpoint) {
            log.add(hex(low) + ": midpoint not representable in float");
            continue;
        }
        const std::uint32_t even = (low % 2 == 0) ? low : high;
        const float below = std::nextafter(mid, 0.0f);
        const float above = std::nextafter(mid, std::numeric_limits<float>::infinity());
        for (const std::uint32_t sign : {0u, 0x8000u}) {
            const float s = sign ? -1.0f : 1.0f;
            const std::uint16_t at = kvc::to_bfloat16(s * mid).bits;
            const std::uint16_t under = kvc::to_bfloat16(s * below).bits;
            const std::uint16_t over = kvc::to_bfloat16(s * above).bits;
            if (at != (sign | even)) log.add(hex(sign | low) + " tie: got " + hex(at) + " want " + hex(sign | even));
            if (under != (sign | low)) log.add(hex(sign | low) + " below tie: got " + hex(under));
            if (over != (sign | high)) log.add(hex(sign | low) + " above tie: got " + hex(over));
        }
    }
    EXPECT_NO_FAILURES(log);
}

TEST(BFloat16, OverflowNearFloatMax) {
    const float largest = static_cast<float>(bf16_value(0x7f7f));  // (2 - 2^-7) * 2^127
    const float tie = static_cast<float>(std::ldexp(255.5, 120));   // halfway to 2^128
    EXPECT_EQ(kvc::to_bfloat16(largest).bits, 0x7f7fu);
    EXPECT_EQ(kvc::to_bfloat16(std::nextafter(tie, 0.0f)).bits, 0x7f7fu);
    // 0x7f7f has an odd mantissa, so the tie and everything above it go to infinity.
    EXPECT_EQ(kvc::to_bfloat16(tie).bits, 0x7f80u);
    EXPECT_EQ(kvc::to_bfloat16(FLT_MAX).bits, 0x7f80u);
    EXPECT_EQ(kvc::to_bfloat16(-FLT_MAX).bits, 0xff80u);
    EXPECT_EQ(kvc::to_bfloat16(std::numeric_limits<float>::infinity()).bits, 0x7f80u);
    EXPECT_EQ(kvc::to_bfloat16(-std::numeric_limits<float>::infinity()).bits, 0xff80u);
}

TEST(BFloat16, SubnormalsAndSignedZero) {
    EXPECT_EQ(kvc::to_bfloat16(0.0f).bits, 0x0000u);
    EXPECT_EQ(kvc::to_bfloat16(-0.0f).bits, 0x8000u);
    EXPECT_TRUE(std::signbit(kvc::to_float(bfloat16::from_bits(0x8000))));
    const float smallest = std::ldexp(1.0f, -133);  // the smallest subnormal bfloat16
    EXPECT_EQ(kvc::to_float(bfloat16::from_bits(0x0001)), smallest);
    EXPECT_EQ(kvc::to_bfloat16(smallest).bits, 0x0001u);
    EXPECT_EQ(kvc::to_bfloat16(smallest / 2).bits, 0x0000u);  // tie to even
    EXPECT_EQ(kvc::to_bfloat16(-smallest / 2).bits, 0x8000u);
    EXPECT_EQ(kvc::to_bfloat16(std::nextafter(smallest / 2, 1.0f)).bits, 0x0001u);
    EXPECT_EQ(kvc::to_bfloat16(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
    EXPECT_EQ(kvc::to_bfloat16(std::ldexp(127.5f, -133)).bits, 0x0080u);  // rounds up into the normals
    EXPECT_EQ(kvc::to_bfloat16(FLT_MIN).bits, 0x0080u);
}

TEST(BFloat16, EveryFloatNaNStaysNaNWithItsSign) {
    failures log;
    for (std::uint32_t payload = 1; payload <= 0x7fffffu; ++payload) {
        for (const std::uint32_t sign : {0u, 0x80000000u}) {
            const std::uint32_t pattern = sign | 0x7f800000u | payload;
            const std::uint16_t b = kvc::to_bfloat16(float_of(pattern)).bits;
            if (!is_bf16_nan(b) || ((b & 0x8000u) != 0) != (sign != 0) || (b & 0x0040u) == 0)
                log.add(hex(pattern) + " became " + hex(b));
        }
    }
    EXPECT_NO_FAILURES(log);
    // Payload only in the low 16 bits: plain truncation would give infinity.
    EXPECT_EQ(kvc::to_bfloat16(float_of(0x7f800001u)).bits, 0x7fc0u);
    EXPECT_EQ(kvc::to_bfloat16(float_of(0xff80ffffu)).bits, 0xffc0u);
    EXPECT_EQ(kvc::to_bfloat16(float_of(0x7fc00000u)).bits, 0x7fc0u);
}

TEST(BFloat16, RandomFloatsMatchNearestEvenOracle) {
    failures log;
    for (const float x : random_floats(2'000'000, 1729u)) {
        if (std::isnan(x)) continue;
        const std::uint16_t got = kvc::to_bfloat16(x).bits;
        const std::uint16_t want = bf16_oracle().round(x);
        if (got != want) log.add(hex(bits_of(x)) + ": got " + hex(got) + " want " + hex(want));
    }
    EXPECT_NO_FAILURES(log);
}

#if KVC_TEST_X86
// VCVTNEPS2BF16 treats subnormal inputs as zero, so those are checked for a
// signed zero from the hardware and otherwise left to the oracles above.
__attribute__((target("avx512f,avx512bf16"))) void bf16_hardware(const float* in, std::uint16_t* out) {
    const __m256bh converted = _mm512_cvtneps_pbh(_mm512_loadu_ps(in));
    std::memcpy(out, &converted, 32);
}

TEST(BFloat16Hardware, FloatToBFloat16MatchesAvx512Bf16) {
    if (!cpu_has_avx512_bf16()) GTEST_SKIP() << "CPU lacks AVX512_BF16 (or the OS does not enable AVX-512)";
    failures log;
    std::mt19937 rng(11u);
    float in[16];
    std::uint16_t out[16];
    for (int block = 0; block < 20'000'000 / 16; ++block) {
        for (float& x : in) x = float_of(rng());
        // Make sure the rounding-relevant low halves hit their edges often.
        in[0] = float_of((bits_of(in[0]) & 0xffff0000u) | 0x8000u);
        in[1] = float_of((bits_of(in[1]) & 0xffff0000u) | 0x7fffu);
        in[2] = float_of((bits_of(in[2]) & 0xffff0000u) | 0x8001u);
        in[3] = float_of((bits_of(in[3]) & 0xffff0000u) | 0xffffu);
        bf16_hardware(in, out);
        for (int i = 0; i < 16; ++i) {
            const std::uint32_t pattern = bits_of(in[i]);
            if ((pattern & 0x7f800000u) == 0) {
                if (out[i] != ((pattern >> 16) & 0x8000u)) log.add(hex(pattern) + ": hardware did not flush to zero");
                continue;
            }
            const std::uint16_t soft = kvc::detail::bf16_bits_from_float_soft(in[i]);
            if (soft != out[i]) log.add(hex(pattern) + ": soft " + hex(soft) + " AVX512_BF16 " + hex(out[i]));
        }
    }
    EXPECT_NO_FAILURES(log);
}
#endif

} // namespace
