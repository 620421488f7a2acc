// Shared helpers of the kernel tests: the tables under test, storage rows with
// unaligned bases and padded strides, random data, a double-precision
// attention oracle, and the rounding-error bounds the comparisons use.
//
// Error model. u = 2^-24 is the unit roundoff of float (round to nearest) and
// gamma_n(n) = n u / (1 - n u) bounds the relative error of any n-step chain of
// float multiplications/additions (Higham, "Accuracy and Stability of Numerical
// Algorithms", 3.1): whatever order a kernel sums n products in (lanes, two
// accumulators, horizontal add, scalar tail; FMA or not), the result differs
// from the exact sum by at most gamma_n(n) * sum |terms|. The one measured constant
// is the accuracy of exp: glibc's expf is within 0.51 ulp and xsimd 8.1's
// vector exp within 1.53 ulp (measured over 2M arguments on sse2, avx2 and
// avx512), so every exp is assumed within 2 ulp, i.e. relative error 2 * 2^-23.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/table.hpp"

namespace kvc_test {

using kvc::arch_id;
using kvc::dtype;
namespace kk = kvc::kernels;

// ---------------------------------------------------------------------------
// Rounding model (see the comment at the top).

inline constexpr double unit_roundoff = 0x1p-24;
inline constexpr double exp_relative_error = 2.0 * 0x1p-23; // 2 ulp
// Absolute slack per term for gradual underflow: a product or exp that lands
// below FLT_MIN loses at most 2^-126 absolutely (even if flushed to zero).
inline constexpr double underflow_slack = 0x1p-126;

inline double gamma_n(double n) {
    const double nu = n * unit_roundoff;
    return nu / (1.0 - nu);
}

// ---------------------------------------------------------------------------
// Tables and dtypes.

inline constexpr dtype all_dtypes[] = {dtype::f32, dtype::f16, dtype::bf16};

inline int slot(dtype type) { return kk::index_of(type); }

// Every table this CPU and build can run, the scalar reference first.
inline std::vector<const kk::kernel_table*> tables_under_test() {
    arch_id archs[kvc::arch_count];
    const int count = kk::available_archs(archs);
    std::vector<const kk::kernel_table*> tables;
    for (int i = 0; i < count; ++i) tables.push_back(kk::table_for(archs[i]));
    static bool printed = false;
    if (!printed) {
        printed = true;
        std::cout << "[ kvc      ] instruction sets under test:";
        for (const kk::kernel_table* table : tables) std::cout << ' ' << kvc::name_of(table->arch);
        std::cout << std::endl;
    }
    return tables;
}

inline const kk::kernel_table& reference() { return kk::reference_table(); }

inline std::string describe(const kk::kernel_table& table, dtype type) {
    return std::string("arch=") + kvc::name_of(table.arch) + " dtype=" + kvc::name_of(type);
}

// Counts the failures recorded so far in the running test, so loops over many
// shapes can stop after a few failing ones instead of flooding the log.
inline int failures_so_far() {
    const ::testing::TestResult* result = ::testing::UnitTest::GetInstance()->current_test_info()->result();
    int failed = 0;
    for (int i = 0; i < result->total_part_count(); ++i)
        if (result->GetTestPartResult(i).failed()) ++failed;
    return failed;
}

// ---------------------------------------------------------------------------
// Bits.

inline std::uint32_t bits_of(float value) {
    std::uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline float float_of(std::uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline std::string hex(std::uint32_t value) {
    std::ostringstream out;
    out << "0x" << std::hex << value;
    return out.str();
}

// ---------------------------------------------------------------------------
// Memory: 64-byte aligned allocations of exactly the elements asked for, with
// the data starting `offset` elements past the boundary. The exact size lets
// AddressSanitizer catch any read past the last element.

template <class T>
class aligned_array {
public:
    aligned_array() = default;
    aligned_array(std::size_t count, std::size_t offset) : count_(count), offset_(offset) {
        bytes_ = (count + offset) * sizeof(T);
        raw_ = static_cast<unsigned char*>(::operator new(bytes_ == 0 ? 1 : bytes_, std::align_val_t{64}));
        std::memset(raw_, 0, bytes_);
    }
    aligned_array(const aligned_array&) = delete;
    aligned_array& operator=(const aligned_array&) = delete;
    aligned_array(aligned_array&& other) noexcept { swap(other); }
    aligned_array& operator=(aligned_array&& other) noexcept {
        aligned_array(std::move(other)).swap(*this);
        return *this;
    }
    ~aligned_array() {
        if (raw_ != nullptr) ::operator delete(raw_, std::align_val_t{64});
    }

    T* data() noexcept { return reinterpret_cast<T*>(raw_ + offset_ * sizeof(T)); }
    const T* data() const noexcept { return reinterpret_cast<const T*>(raw_ + offset_ * sizeof(T)); }
    T& operator[](std::size_t i) noexcept { return data()[i]; }
    const T& operator[](std::size_t i) const noexcept { return data()[i]; }
    std::size_t size() const noexcept { return count_; }
    void fill(T value) noexcept { std::fill(data(), data() + count_, value); }

private:
    void swap(aligned_array& other) noexcept {
        std::swap(raw_, other.raw_);
        std::swap(count_, other.count_);
        std::swap(offset_, other.offset_);
        std::swap(bytes_, other.bytes_);
    }
    unsigned char* raw_ = nullptr;
    std::size_t count_ = 0, offset_ = 0, bytes_ = 0;
};

// Stored key or value rows in one of the storage formats: row t starts at
// data() + t * stride elements; the buffer ends right after the last row's
// `dim` elements. Padding between rows holds NaN, so a kernel that reads past
// `dim` inside a row poisons its result.
class rows {
public:
    rows(dtype type, std::size_t tokens, std::size_t dim, std::size_t stride, std::size_t offset)
        : type_(type), tokens_(tokens), dim_(dim), stride_(stride) {
        const std::size_t elements = tokens == 0 ? 0 : (tokens - 1) * stride + dim;
        if (type == dtype::f32) {
            f32_ = aligned_array<float>(elements, offset);
            f32_.fill(std::numeric_limits<float>::quiet_NaN());
        } else {
            bits_ = aligned_array<std::uint16_t>(elements, offset);
            bits_.fill(type == dtype::f16 ? std::uint16_t{0x7e00} : std::uint16_t{0x7fc0});
        }
    }

    dtype type() const { return type_; }
    std::size_t tokens() const { return tokens_; }
    std::size_t dim() const { return dim_; }
    std::size_t stride() const { return stride_; }

    const void* data() const {
        return type_ == dtype::f32 ? static_cast<const void*>(f32_.data()) : static_cast<const void*>(bits_.data());
    }
    // Row t, or where it would start (for segments that begin at t).
    const void* row(std::size_t t) const {
        if (type_ == dtype::f32) return f32_.data() + t * stride_;
        return bits_.data() + t * stride_;
    }

    // Stores x rounded to the storage format (kvc/core/float16.hpp conversions,
    // not the kernels under test).
    void set(std::size_t t, std::size_t d, float x) {
        const std::size_t i = t * stride_ + d;
        switch (type_) {
        case dtype::f32: f32_[i] = x; break;
        case dtype::f16: bits_[i] = kvc::to_half(x).bits; break;
        case dtype::bf16: bits_[i] = kvc::to_bfloat16(x).bits; break;
        }
    }
    // The stored value, exactly.
    double get(std::size_t t, std::size_t d) const {
        const std::size_t i = t * stride_ + d;
        switch (type_) {
        case dtype::f32: return f32_[i];
        case dtype::f16: return kvc::to_float(kvc::half::from_bits(bits_[i]));
        case dtype::bf16: return kvc::to_float(kvc::bfloat16::from_bits(bits_[i]));
        }
        return 0.0;
    }

private:
    dtype type_;
    std::size_t tokens_, dim_, stride_;
    aligned_array<float> f32_;
    aligned_array<std::uint16_t> bits_;
};

using rng_type = std::mt19937_64;

inline void fill_normal(rows& r, rng_type& rng, double sigma = 1.0) {
    std::normal_distribution<float> normal(0.0f, static_cast<float>(sigma));
    for (std::size_t t = 0; t < r.tokens(); ++t)
        for (std::size_t d = 0; d < r.dim(); ++d) r.set(t, d, normal(rng));
}

inline void fill_normal(float* x, std::size_t n, rng_type& rng, double sigma = 1.0) {
    std::normal_distribution<float> normal(0.0f, static_cast<float>(sigma));
    for (std::size_t i = 0; i < n; ++i) x[i] = normal(rng);
}

// A small odd element offset from the 64-byte boundary (1, 3, 5 or 7 elements).
inline std::size_t odd_offset(rng_type& rng) { return 1 + 2 * (rng() % 4); }

// ---------------------------------------------------------------------------
// Double-precision attention oracle, computed directly from the definition:
// logits l_t = scale * <q, k_t> + bias_t, p = softmax(l), out = sum_t p_t v_t.

// Keys, values and biases of a sequence in double, gathered from one or more
// stored segments (each dequantized exactly).
struct sequence {
    std::size_t dim = 0;
    std::vector<double> k, v, bias; // k, v: [tokens][dim]; bias empty or [tokens]
    // Optional, for kernels that compute <q, k> from the factors of each key
    // element (KIVI: code * d + m): k_bound [tokens][dim] replaces |k| in the
    // logit error bound, and extra_roundings is added to its chain length.
    std::vector<double> k_bound;
    std::size_t extra_roundings = 0;
    std::size_t tokens() const { return dim == 0 ? 0 : k.size() / dim; }

    // Appends rows [first, first + count) of K/V; bias (if any) indexed from 0.
    void append(const rows& keys, const rows& values, std::size_t first, std::size_t count, const float* b) {
        dim = keys.dim();
        if (b == nullptr && !bias.empty()) ADD_FAILURE() << "sequence: mixing biased and unbiased segments";
        for (std::size_t t = first; t < first + count; ++t) {
            for (std::size_t d = 0; d < dim; ++d) k.push_back(keys.get(t, d));
            for (std::size_t d = 0; d < dim; ++d) v.push_back(values.get(t, d));
            if (b != nullptr) bias.push_back(b[t - first]);
        }
    }
};

struct head_oracle {
    std::size_t tokens = 0;
    std::vector<double> logit;     // exact logits
    std::vector<double> logit_err; // bound on |float logit - exact logit| per token
    std::vector<double> prob;      // softmax
    std::vector<double> out;       // [dim]
    std::vector<double> out_abs;   // sum_t p_t |v_td|: the scale errors in out are relative to
    double rho = 0.0;              // relative error bound of every float weight/probability
    double v_max = 0.0;            // max |v|, for the underflow slack
    double out_bound(std::size_t d) const { return rho * out_abs[d] + tokens * underflow_slack * v_max; }
    double prob_bound(std::size_t t) const { return rho * prob[t] + underflow_slack; }
};

// Attention of query q over the first `prefix` tokens of `seq`.
//
// The bound: every float logit is within logit_err_t of the exact one (a dot of
// dim products, then one rounding for the scale and one for the bias:
// gamma_n(dim + 2) * (|scale| sum|q k| + |bias|)). Inside the softmax, each weight
// exp(l - max) sees the rounding of its argument (u |l - max| <= u R, R the
// logit range), one exp (E), and each time the running max grows, the earlier
// weights are multiplied by a rescale factor with the same kinds of error plus
// the rounding of the multiplication (E + 2u, arguments summing to at most R).
// All of these act as perturbations of the logits by at most
//     delta = max logit_err + 2 u (R + 2 max logit_err) + (k + 1) (E + 2u),
// k = number of rescales (tokens that may set a new running max, counted with
// the logit error as tolerance; the blocked kernels rescale at most once per
// such token). Perturbing logits by at most delta changes each normalised weight
// by a factor within exp(+-2 delta). The sums of weights and of weighted values
// (T terms) and the final division add gamma_n(T + 4) each, relative to
// sum p |v|. Hence |out_d - exact_d| <= expm1(2 delta + 3 gamma_n(T + 4)) *
// sum_t p_t |v_td|, plus T * 2^-126 * max|v| for weights that underflow.
//
// With `given_logits`, those (float) logits are taken as exact instead of
// computing them from q and the keys: the oracle then checks only the softmax
// and the weighted sum of a kernel, given the logits it reported.
// `later_q`, when given, replaces q for tokens `later_from` on (quantized key
// rows scored against a quantized query after fp16 sink rows).
inline head_oracle attend_oracle(const sequence& seq, std::size_t prefix, const float* q, float scale,
                                 const float* given_logits = nullptr, const float* later_q = nullptr,
                                 std::size_t later_from = 0) {
    const std::size_t dim = seq.dim;
    const std::size_t tokens = prefix;
    const double u = unit_roundoff;
    head_oracle o;
    o.tokens = tokens;
    o.logit.resize(tokens);
    o.logit_err.resize(tokens);
    o.prob.resize(tokens);
    o.out.assign(dim, 0.0);
    o.out_abs.assign(dim, 0.0);
    if (tokens == 0) return o;

    double max = -std::numeric_limits<double>::infinity(), min = std::numeric_limits<double>::infinity();
    double max_err = 0.0;
    for (std::size_t t = 0; t < tokens; ++t) {
        double dot = 0.0, abs_dot = 0.0;
        for (std::size_t d = 0; d < dim; ++d) {
            const float* query = later_q != nullptr && t >= later_from ? later_q : q;
            const double product = static_cast<double>(query[d]) * seq.k[t * dim + d];
            dot += product;
            abs_dot += seq.k_bound.empty() ? std::fabs(product)
                                           : std::fabs(static_cast<double>(q[d])) * seq.k_bound[t * dim + d];
        }
        const double b = seq.bias.empty() ? 0.0 : seq.bias[t];
        const double chain = static_cast<double>(dim) + 2.0 + static_cast<double>(seq.extra_roundings);
        o.logit[t] = static_cast<double>(scale) * dot + b;
        o.logit_err[t] = gamma_n(chain) * (std::fabs(scale) * abs_dot + std::fabs(b)) + chain * underflow_slack;
        if (given_logits != nullptr) {
            o.logit[t] = given_logits[t];
            o.logit_err[t] = 0.0;
        }
        max = std::max(max, o.logit[t]);
        min = std::min(min, o.logit[t]);
        max_err = std::max(max_err, o.logit_err[t]);
    }
    double sum = 0.0;
    for (std::size_t t = 0; t < tokens; ++t) sum += (o.prob[t] = std::exp(o.logit[t] - max));
    for (std::size_t t = 0; t < tokens; ++t) o.prob[t] /= sum;
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t d = 0; d < dim; ++d) {
            const double v = seq.v[t * dim + d];
            o.out[d] += o.prob[t] * v;
            o.out_abs[d] += o.prob[t] * std::fabs(v);
            o.v_max = std::max(o.v_max, std::fabs(v));
        }

    std::size_t rescales = 0;
    double running = -std::numeric_limits<double>::infinity();
    for (std::size_t t = 0; t < tokens; ++t) {
        if (o.logit[t] >= running - 2.0 * max_err) ++rescales;
        running = std::max(running, o.logit[t]);
    }
    const double range = max - min;
    const double delta = max_err + 2.0 * u * (range + 2.0 * max_err) +
                         static_cast<double>(rescales + 1) * (exp_relative_error + 2.0 * u);
    o.rho = std::expm1(2.0 * delta + 3.0 * gamma_n(static_cast<double>(tokens) + 4.0));
    return o;
}

// ||got - exact||_2 / ||exact||_2 for one head's output.
inline double relative_error(const float* got, const std::vector<double>& exact) {
    double diff = 0.0, norm = 0.0;
    for (std::size_t d = 0; d < exact.size(); ++d) {
        diff += (got[d] - exact[d]) * (got[d] - exact[d]);
        norm += exact[d] * exact[d];
    }
    return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

inline bool all_finite(const float* x, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i])) return false;
    return true;
}

// Elementwise |got - want| <= bound(i); reports the worst element only.
template <class Want, class Bound>
::testing::AssertionResult within(const char* what, const float* got, std::size_t n, Want want, Bound bound) {
    double worst = 0.0;
    std::size_t at = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const double error = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want(i)));
        const double b = bound(i);
        const double ratio = error <= b ? 0.0 : (b > 0.0 ? error / b : std::numeric_limits<double>::infinity());
        if (!(ratio <= worst) || std::isnan(error)) {
            worst = std::isnan(error) ? std::numeric_limits<double>::infinity() : ratio;
            at = i;
        }
    }
    if (worst == 0.0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << "[" << at << "] = " << got[at] << ", expected "
                                         << static_cast<double>(want(at)) << " within " << bound(at) << " (error "
                                         << std::fabs(static_cast<double>(got[at]) - static_cast<double>(want(at)))
                                         << ", " << worst << "x the bound)";
}

// ---------------------------------------------------------------------------
// Running one decode attention with a table.

// Softmax state of `group` heads with odd-offset allocations, reset to the
// empty state (max -inf, sum 0, acc 0).
struct state_buffers {
    std::size_t group, dim;
    aligned_array<float> max, sum, acc;
    state_buffers(std::size_t g, std::size_t d, std::size_t offset = 1)
        : group(g), dim(d), max(g, offset), sum(g, offset + 2), acc(g * d, offset) {
        kk::common::reset_state<kk::reference_arch>(view(), group, dim);
    }
    kk::decode_state view() { return kk::decode_state{max.data(), sum.data(), acc.data()}; }
    // out(g) = acc(g) / sum(g), into [group][dim].
    std::vector<float> finalize() {
        std::vector<float> out(group * dim);
        kk::common::finalize_state<kk::reference_arch>(view(), group, dim, out.data(), dim);
        return out;
    }
};

// Queries of a group: query g at data() + g * stride, odd offset.
struct query_buffers {
    std::size_t group, dim, stride;
    aligned_array<float> q;
    query_buffers(std::size_t g, std::size_t d, std::size_t pad, std::size_t offset)
        : group(g), dim(d), stride(d + pad), q(g == 0 ? 0 : (g - 1) * (d + pad) + d, offset) {
        q.fill(std::numeric_limits<float>::quiet_NaN()); // padding poisons
    }
    float* head(std::size_t g) { return q.data() + g * stride; }
    const float* head(std::size_t g) const { return q.data() + g * stride; }
};

} // namespace kvc_test
