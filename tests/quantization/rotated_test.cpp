// Q4 Hadamard rotation (kvc::quant::rotated) and its kernel, on every
// instruction set: the transform against hand-worked cases and a dense
// Hadamard matrix in double, orthonormality, the sign table, every SIMD
// kernel equal to the scalar reference; in compressed_cache: lossless
// rotation around none<float> against full_cache and a double oracle, bytes
// equal to the inner codec's, construction errors, NaN isolation, keep();
// and the point of it: lower int4 key and attention error with rotation on
// keys with outlier channels and on the keys of the real model kvref.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "engine/engine_test_util.hpp"
#include "engine/model.hpp"
#include "kernels/kernel_test_util.hpp"
#include "kernels/quantized_query_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/random.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/hadamard/common.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

namespace q = kvc::quant;
using kvc::kernels::hadamard_direction;
using kvc_test::gamma_n;
using kvc_test::random_floats;
using kvc_test::reference;
using kvc_test::tables_under_test;
using kvc_test::unit_roundoff;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::worst_head_error;

template <class Q>
using quant_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Q, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<q::rotated<q::q4_0>>);
static_assert(q::rotated<q::q4_0>::key_bits_per_value() == q::q4_0::key_bits_per_value());
static_assert(std::is_same_v<q::rotated<q::none<float>>::head_storage, kvc::rotated_rows<kvc::dense_rows, true>>);

// fp32 storage: full_cache, what rotated<none<float>> is compared with, holds the exact rows.
kvc::cache_config shape(std::size_t kv_heads, std::size_t group, std::size_t dim, std::size_t layers = 1) {
    kvc::cache_config c = kvc_test::shape(kv_heads, group, dim, layers);
    c.storage = kvc::dtype::f32;
    return c;
}

// ---------------------------------------------------------------------------
// The transform.

// The dense matrix H = B D of kernels/hadamard/common.hpp, built from its
// definition: (H_n)_ij = (-1)^popcount(i & j) / sqrt(n) per block.
std::vector<double> dense_hadamard(std::size_t dim, bool signs) {
    std::vector<double> h(dim * dim, 0.0);
    for (std::size_t offset = 0; offset < dim;) {
        std::size_t n = 1;
        while (2 * n <= dim - offset) n *= 2;
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < n; ++j) {
                unsigned bits = 0;
                for (std::size_t m = i & j; m; m &= m - 1) ++bits;
                const double s = signs ? kvc::kernels::hadamard_signs_of<kvc::kernels::reference_arch>::table.value[offset + j] : 1.0;
                h[(offset + i) * dim + offset + j] = (bits % 2 ? -1.0 : 1.0) * s / std::sqrt(static_cast<double>(n));
            }
        offset += n;
    }
    return h;
}

const std::size_t transform_dims[] = {1, 2, 3, 4, 5, 8, 16, 24, 32, 48, 64, 96, 100, 127, 128, 256, 1024};

TEST(HadamardKernel, HandWorkedDims2And4OnEveryInstructionSet) {
    for (const auto* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        // dim 2: (3, 1) -> (3 + 1, 3 - 1) / sqrt 2 = (2 sqrt 2, sqrt 2).
        float two[2] = {3.0f, 1.0f};
        table->hadamard.rotate(two, 1, 2, 2, false, hadamard_direction::forward);
        EXPECT_FLOAT_EQ(two[0], 2.0f * std::sqrt(2.0f));
        EXPECT_FLOAT_EQ(two[1], std::sqrt(2.0f));
        // dim 4: H_4 (1, 2, 3, 4) / 2 = (1+2+3+4, 1-2+3-4, 1+2-3-4, 1-2-3+4) / 2 = (5, -1, -2, 0), exact.
        float four[4] = {1.0f, 2.0f, 3.0f, 4.0f};
        table->hadamard.rotate(four, 1, 4, 4, false, hadamard_direction::forward);
        EXPECT_EQ(four[0], 5.0f);
        EXPECT_EQ(four[1], -1.0f);
        EXPECT_EQ(four[2], -2.0f);
        EXPECT_EQ(four[3], 0.0f);
        // ... and back (H_4 / 2 is its own inverse).
        table->hadamard.rotate(four, 1, 4, 4, false, hadamard_direction::inverse);
        EXPECT_EQ(four[0], 1.0f);
        EXPECT_EQ(four[1], 2.0f);
        EXPECT_EQ(four[2], 3.0f);
        EXPECT_EQ(four[3], 4.0f);
        // dim 3 = 2 + 1: the last element is left alone.
        float three[3] = {3.0f, 1.0f, -7.0f};
        table->hadamard.rotate(three, 1, 3, 3, false, hadamard_direction::forward);
        EXPECT_FLOAT_EQ(three[0], 2.0f * std::sqrt(2.0f));
        EXPECT_EQ(three[2], -7.0f);
    }
}

// Against the dense matrix in double, forward (H x) and inverse (H^T x), with
// and without signs. An output is a sum of n = 2^k terms +-x_j / sqrt(n)
// computed through k butterfly stages and one scaling: within
// gamma(k + 1) sum_j |x_j| / sqrt(n) of the exact value.
TEST(HadamardKernel, MatchesDenseMatrixInDoubleOnEveryInstructionSet) {
    for (const auto* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        for (std::size_t dim : transform_dims)
            for (bool signs : {false, true})
                for (auto direction : {hadamard_direction::forward, hadamard_direction::inverse}) {
                    SCOPED_TRACE("dim " + std::to_string(dim) + (signs ? " signs" : " plain") +
                                 (direction == hadamard_direction::forward ? " forward" : " inverse"));
                    const std::size_t rows = 3, stride = dim + 5; // padded rows, left untouched
                    auto x = random_floats(rows * stride, static_cast<std::uint32_t>(dim * 7 + signs), 2.0f);
                    const auto original = x;
                    table->hadamard.rotate(x.data(), rows, stride, dim, signs, direction);
                    const auto h = dense_hadamard(dim, signs);
                    for (std::size_t r = 0; r < rows; ++r) {
                        const float* in = original.data() + r * stride;
                        for (std::size_t i = 0; i < dim; ++i) {
                            double exact = 0.0, magnitude = 0.0;
                            for (std::size_t j = 0; j < dim; ++j) {
                                const double m = direction == hadamard_direction::forward ? h[i * dim + j]
                                                                                          : h[j * dim + i];
                                exact += m * in[j];
                                magnitude += std::fabs(m * in[j]);
                            }
                            const double k = std::log2(static_cast<double>(dim)) + 2.0;
                            ASSERT_LE(std::fabs(x[r * stride + i] - exact), gamma_n(k) * magnitude)
                                << "row " << r << " element " << i;
                        }
                        for (std::size_t i = dim; i < stride; ++i) ASSERT_EQ(x[r * stride + i], original[r * stride + i]);
                    }
                }
    }
}

// The SIMD kernels do the reference's additions in its order: equal bit for bit.
TEST(HadamardKernel, EveryInstructionSetEqualsTheScalarReferenceExactly) {
    for (const auto* table : tables_under_test())
        for (std::size_t dim : transform_dims)
            for (bool signs : {false, true})
                for (auto direction : {hadamard_direction::forward, hadamard_direction::inverse}) {
                    auto got = random_floats(4 * dim, static_cast<std::uint32_t>(dim + 100), 3.0f);
                    auto want = got;
                    table->hadamard.rotate(got.data(), 4, dim, dim, signs, direction);
                    reference().hadamard.rotate(want.data(), 4, dim, dim, signs, direction);
                    ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
                        << kvc::name_of(table->arch) << " dim " << dim;
                }
}

// H^T H = I: the columns H e_j (forward of unit vectors) are orthonormal, and
// inverse(forward(x)) = x, within the rounding of the kernel.
TEST(HadamardKernel, IsOrthonormal) {
    for (const auto* table : tables_under_test())
        for (std::size_t dim : {std::size_t{4}, std::size_t{64}, std::size_t{96}, std::size_t{100}, std::size_t{128}})
            for (bool signs : {false, true}) {
                SCOPED_TRACE(std::string(kvc::name_of(table->arch)) + " dim " + std::to_string(dim));
                std::vector<float> columns(dim * dim, 0.0f);
                for (std::size_t j = 0; j < dim; ++j) columns[j * dim + j] = 1.0f;
                table->hadamard.rotate(columns.data(), dim, dim, dim, signs, hadamard_direction::forward);
                // Each column element is +-1/sqrt(n) rounded once (or 0): relative error <= u.
                double worst = 0.0;
                for (std::size_t a = 0; a < dim; ++a)
                    for (std::size_t b = 0; b < dim; ++b) {
                        double dot = 0.0;
                        for (std::size_t i = 0; i < dim; ++i)
                            dot += static_cast<double>(columns[a * dim + i]) * columns[b * dim + i];
                        worst = std::max(worst, std::fabs(dot - (a == b ? 1.0 : 0.0)));
                    }
                EXPECT_LE(worst, 3.0 * unit_roundoff);
                auto x = random_floats(dim, 9, 1.0f);
                auto y = x;
                table->hadamard.rotate(y.data(), 1, dim, dim, signs, hadamard_direction::forward);
                table->hadamard.rotate(y.data(), 1, dim, dim, signs, hadamard_direction::inverse);
                double norm = 0.0;
                for (float v : x) norm += static_cast<double>(v) * v;
                for (std::size_t i = 0; i < dim; ++i)
                    EXPECT_LE(std::fabs(y[i] - x[i]), 2.0 * gamma_n(std::log2(static_cast<double>(dim)) + 2.0) *
                                                          std::sqrt(norm));
            }
}

// The sign diagonal is splitmix64's bits from the documented seed, and
// splitmix64 is the published generator (seed 0 starts 0xe220a8397b1dcdaf).
TEST(HadamardKernel, SignTableIsTheDocumentedSplitmixSequence) {
    kvc::splitmix64 zero(0);
    EXPECT_EQ(zero.next(), 0xe220a8397b1dcdafull);
    EXPECT_EQ(zero.next(), 0x6e789e6aa1b965f4ull);
    // Independent of kvc::splitmix64: the generator written out here.
    std::uint64_t state = kvc::kernels::hadamard_sign_seed, word = 0;
    std::size_t negative = 0;
    for (std::size_t i = 0; i < kvc::kernels::hadamard_max_dim; ++i) {
        if (i % 64 == 0) {
            state += 0x9E3779B97F4A7C15ull;
            std::uint64_t z = state;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            word = z ^ (z >> 31);
        }
        const float want = (word >> (i % 64)) & 1u ? -1.0f : 1.0f;
        ASSERT_EQ(kvc::kernels::hadamard_signs_of<kvc::kernels::reference_arch>::table.value[i], want) << i;
        negative += want < 0.0f;
    }
    // A fair coin: 1024 flips land within 4 standard deviations (16) of 512.
    EXPECT_NEAR(static_cast<double>(negative), 512.0, 64.0);
}

// ---------------------------------------------------------------------------
// In the cache.

// Rows of one head as the store decodes them (original space), [tokens][dim].
template <class Cache>
std::vector<float> decoded_keys(const Cache& cache, std::size_t layer, std::size_t h) {
    const auto& head = cache.head(layer, h);
    std::vector<float> out(head.tokens() * cache.config().head_dim);
    head.decode_keys(kvc::kernels::active(), 0, head.tokens(), out.data());
    return out;
}
template <class Cache>
std::vector<float> decoded_values(const Cache& cache, std::size_t layer, std::size_t h) {
    const auto& head = cache.head(layer, h);
    std::vector<float> out(head.tokens() * cache.config().head_dim);
    head.decode_values(kvc::kernels::active(), 0, head.tokens(), out.data());
    return out;
}

// rotated<none<float>> is attention over the original rows up to float
// rounding. Bound per query head (a first-order rounding analysis): the
// rotation changes each element of a rotated row by at most
// r |x|_2 with r = gamma(log2 n + 2) (a sum of n terms |x_j| / sqrt(n) <= |x|_2),
// so a logit moves by at most scale (2 r sqrt(d) |q| |k| + gamma(d + 2) sum|q k|)
// = delta; the softmax weights by a factor exp(+-2 delta), and the output
// rotated back adds 2 r sqrt(d) max|v| per element, plus the weighted sum's
// own gamma(T + 4). Compared in the 2-norm of the head's output.
TEST(Rotated, NoneFloatAttentionEqualsFullCacheWithinRounding) {
    arch_guard guard;
    for (std::size_t dim : {std::size_t{64}, std::size_t{96}, std::size_t{3}})
        for (kvc::arch_id arch : archs()) {
            SCOPED_TRACE(std::string(kvc::name_of(arch)) + " dim " + std::to_string(dim));
            kvc::set_active_arch(arch);
            const auto c = shape(2, 3, dim);
            const std::size_t prompt = 40, chunk = 20, steps = 5, total = prompt + steps;
            const std::size_t row = c.kv_heads * dim, qrow = c.query_heads * dim;
            const auto keys = random_floats(total * row, 1), values = random_floats(total * row, 2);
            const auto queries = random_floats(total * qrow, 3);
            quant_cache<q::rotated<q::none<float>>> rotated(c);
            kvc::full_cache full(c);
            const double r = gamma_n(std::log2(static_cast<double>(dim)) + 2.0), sd = std::sqrt(double(dim));
            auto bound = [&](std::size_t visible, const float* query) {
                double worst = 0.0;
                for (std::size_t j = 0; j < c.query_heads; ++j) {
                    const std::size_t h = j / c.group();
                    double qn = 0.0, delta = 0.0, vmax = 0.0, out_norm = 0.0;
                    for (std::size_t d = 0; d < dim; ++d) qn += double(query[j * dim + d]) * query[j * dim + d];
                    for (std::size_t t = 0; t < visible; ++t) {
                        double kn = 0.0, vn = 0.0, abs_dot = 0.0;
                        for (std::size_t d = 0; d < dim; ++d) {
                            const double k = keys[(t * c.kv_heads + h) * dim + d], v = values[(t * c.kv_heads + h) * dim + d];
                            kn += k * k;
                            vn += v * v;
                            abs_dot += std::fabs(query[j * dim + d] * k);
                        }
                        delta = std::max(delta, c.logit_scale() * (2.0 * r * sd * std::sqrt(qn * kn) + gamma_n(dim + 2.0) * abs_dot));
                        vmax = std::max(vmax, std::sqrt(vn));
                    }
                    (void)out_norm;
                    // |out| <= max |v|; the relative bound uses the output norm below.
                    worst = std::max(worst, (std::expm1(2.0 * delta + 3.0 * gamma_n(visible + 4.0)) + 2.0 * r * sd * sd) * vmax);
                }
                return worst; // absolute 2-norm bound per head
            };
            auto check = [&](const float* got, const float* want, std::size_t visible, const float* query) {
                const double b = bound(visible, query);
                for (std::size_t j = 0; j < c.query_heads; ++j) {
                    double diff = 0.0;
                    for (std::size_t d = 0; d < dim; ++d)
                        diff += double(got[j * dim + d] - want[j * dim + d]) * (got[j * dim + d] - want[j * dim + d]);
                    ASSERT_LE(std::sqrt(diff), b) << "query head " << j << " visible " << visible;
                }
            };
            for (std::size_t t0 = 0; t0 < prompt; t0 += chunk) {
                const token_major k(keys.data() + t0 * row, chunk, c.kv_heads, dim), v(values.data() + t0 * row, chunk, c.kv_heads, dim);
                rotated.append(0, k, v, static_cast<std::int64_t>(t0));
                full.append(0, k, v, static_cast<std::int64_t>(t0));
                std::vector<float> a(chunk * qrow), b(chunk * qrow);
                std::vector<float> mass_a(c.kv_heads * (t0 + chunk)), mass_b(mass_a.size());
                rotated.attend_chunk(0, queries.data() + t0 * qrow, chunk, a.data(), mass_a.data());
                full.attend_chunk(0, queries.data() + t0 * qrow, chunk, b.data(), mass_b.data());
                for (std::size_t i = 0; i < chunk; ++i)
                    check(a.data() + i * qrow, b.data() + i * qrow, t0 + i + 1, queries.data() + (t0 + i) * qrow);
                for (std::size_t t = 0; t < mass_a.size(); ++t) ASSERT_NEAR(mass_a[t], mass_b[t], 1e-4) << t;
            }
            for (std::size_t t = prompt; t < total; ++t) {
                const token_major k(keys.data() + t * row, 1, c.kv_heads, dim), v(values.data() + t * row, 1, c.kv_heads, dim);
                rotated.append(0, k, v, static_cast<std::int64_t>(t));
                full.append(0, k, v, static_cast<std::int64_t>(t));
                std::vector<float> a(qrow), b(qrow);
                rotated.attend(0, queries.data() + t * qrow, a.data());
                full.attend(0, queries.data() + t * qrow, b.data());
                check(a.data(), b.data(), t + 1, queries.data() + t * qrow);
                // And against attention in double over the original rows.
                const auto exact = kvc_test::oracle_attention(c, keys, values, t + 1, queries.data() + t * qrow);
                EXPECT_LE(worst_head_error(c, a.data(), exact), 1e-4);
            }
            // decode_keys / decode_values are the original rows, within the two rotations' rounding.
            for (std::size_t h = 0; h < c.kv_heads; ++h) {
                const auto k = decoded_keys(rotated, 0, h), v = decoded_values(rotated, 0, h);
                for (std::size_t t = 0; t < total; ++t) {
                    double kn = 0.0, vn = 0.0;
                    for (std::size_t d = 0; d < dim; ++d) {
                        kn += double(keys[(t * c.kv_heads + h) * dim + d]) * keys[(t * c.kv_heads + h) * dim + d];
                        vn += double(values[(t * c.kv_heads + h) * dim + d]) * values[(t * c.kv_heads + h) * dim + d];
                    }
                    for (std::size_t d = 0; d < dim; ++d) {
                        ASSERT_LE(std::fabs(k[t * dim + d] - keys[(t * c.kv_heads + h) * dim + d]), 2.0 * r * std::sqrt(kn));
                        ASSERT_LE(std::fabs(v[t * dim + d] - values[(t * c.kv_heads + h) * dim + d]), 2.0 * r * std::sqrt(vn));
                    }
                }
            }
        }
}

// rotated<block<..>> attends exactly what it stores: decode and prefill
// against a double oracle over decode_keys/decode_values (original space),
// and the stored rows are the same bytes on every instruction set.
TEST(Rotated, BlockAttentionMatchesOracleOverStoredRowsOnEveryInstructionSet) {
    arch_guard guard;
    const kvc_test::chunked_run run(shape(2, 4, 128), {32, 32}, 6, 11);
    const kvc::cache_config& c = run.config;
    const std::size_t total = run.total;
    std::vector<float> first_keys;
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        quant_cache<q::rotated<q::q4_0>> cache(c);
        // q4_0 keys are scored against the int8 query (kernels/quant/common.hpp,
        // quantize_query) of the rotated query: in the original space that is
        // H^T deq(H q), what the oracle scores the decoded keys with; every
        // 7th query of a chunk.
        const double worst = run.worst_error_over_stored(cache, kvc_test::rotated_int8_query, 7);
        // As block_test's bound for the codec alone, plus the rotations of queries and output (~1e-6).
        EXPECT_LE(worst, 2e-5);
        // Same stored bytes everywhere (the rotation and the quantizer are exact functions of the input).
        std::vector<float> stored(c.head_dim * total);
        cache.head(0, 1).inner().decode_keys(kvc::kernels::reference_table(), 0, total, stored.data());
        if (first_keys.empty()) first_keys = stored;
        else EXPECT_EQ(0, std::memcmp(stored.data(), first_keys.data(), stored.size() * sizeof(float)));
    }
}

// The rotation stores nothing: bytes() equal to the inner codec's for the same
// appends, equal to what the memory resource handed out.
TEST(Rotated, BytesEqualInnerCodecAndMemoryResource) {
    const auto keys = random_floats(300 * 2 * 128, 5);
    auto fill = [&](auto& cache) {
        cache.reserve(300);
        for (std::size_t l = 0; l < 2; ++l)
            for (std::size_t t0 = 0; t0 < 300; t0 += 100)
                cache.append(l, token_major(keys.data() + t0 * 256, 100, 2, 128),
                             token_major(keys.data() + t0 * 256, 100, 2, 128), static_cast<std::int64_t>(t0));
    };
    kvc_test::counting_resource plain_counter, rotated_counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &plain_counter;
    quant_cache<q::block<q::int4_sym, 32>> plain(c);
    c.resource = &rotated_counter;
    quant_cache<q::rotated<q::block<q::int4_sym, 32>>> rotated(c);
    fill(plain);
    fill(rotated);
    for (std::size_t l = 0; l < 2; ++l)
        for (std::size_t h = 0; h < 2; ++h) {
            EXPECT_EQ(rotated.head(l, h).bytes(), plain.head(l, h).bytes());
            // 300 tokens x 4 groups of 18 bytes x (key + value).
            EXPECT_EQ(rotated.head(l, h).bytes(), 300u * 4 * 18 * 2);
        }
    EXPECT_EQ(rotated.bytes(), rotated_counter.in_use);
    EXPECT_EQ(plain.bytes(), plain_counter.in_use);
    // The cache's own bookkeeping differs only by the head objects (the
    // wrapper keeps dim and the sign flag next to the inner store), 4 heads.
    using rotated_head = quant_cache<q::rotated<q::block<q::int4_sym, 32>>>::head_storage;
    EXPECT_EQ(rotated.bytes() - plain.bytes(), 4 * (sizeof(rotated_head) - sizeof(kvc::packed_rows)));
}

TEST(Rotated, InnerCodecConstraintsStillApply) {
    try {
        quant_cache<q::rotated<q::q4_0>> cache(shape(1, 1, 48));
        FAIL() << "head_dim 48 with groups of 32 must be rejected";
    } catch (const kvc::error& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find("multiple of the group size 32"), std::string::npos) << what;
        EXPECT_NE(what.find("48"), std::string::npos) << what;
    }
    auto bad = shape(1, 1, 0);
    EXPECT_THROW(q::rotated<q::none<float>>{}.make_head(bad), kvc::error);
    bad.head_dim = kvc::max_head_dim + 1;
    EXPECT_THROW(q::rotated<q::none<float>>{}.make_head(bad), kvc::error);
    // Head dims the blocks handle, with a codec that has no dim constraint.
    EXPECT_NO_THROW(quant_cache<q::rotated<q::none<float>>>(shape(1, 1, 3)));
    EXPECT_NO_THROW(quant_cache<q::rotated<q::q4_0>>(shape(1, 1, 96)));
}

// A NaN in one key spreads over that token's rotated row (dim 64: one block):
// that token decodes to NaN everywhere, attention over the head is NaN, the
// other tokens are bit-identical to a run without the NaN, the other KV head
// is untouched, and evicting the token restores finite, equal outputs.
TEST(Rotated, NaNSpreadsOverItsRowOnlyAndEvictionRemovesIt) {
    arch_guard guard;
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        for (bool in_value : {false, true}) {
            const auto c = shape(2, 2, 64);
            const std::size_t tokens = 12, bad = 5, row = 2 * 64;
            auto keys = random_floats(tokens * row, 21), values = random_floats(tokens * row, 22);
            const auto queries = random_floats(c.query_heads * 64, 23);
            quant_cache<q::rotated<q::q4_0>> clean(c), dirty(c);
            clean.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
            (in_value ? values : keys)[bad * row + 3] = std::numeric_limits<float>::quiet_NaN(); // head 0, channel 3
            dirty.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
            const auto got = in_value ? decoded_values(dirty, 0, 0) : decoded_keys(dirty, 0, 0);
            const auto want = in_value ? decoded_values(clean, 0, 0) : decoded_keys(clean, 0, 0);
            for (std::size_t t = 0; t < tokens; ++t)
                for (std::size_t d = 0; d < 64; ++d) {
                    if (t == bad) ASSERT_TRUE(std::isnan(got[t * 64 + d])) << d;
                    else ASSERT_EQ(got[t * 64 + d], want[t * 64 + d]);
                }
            EXPECT_EQ(decoded_keys(dirty, 0, 1), decoded_keys(clean, 0, 1));
            std::vector<float> out(c.query_heads * 64), reference(out.size());
            dirty.attend(0, queries.data(), out.data());
            clean.attend(0, queries.data(), reference.data());
            for (std::size_t j = 0; j < c.query_heads; ++j)
                for (std::size_t d = 0; d < 64; ++d) {
                    if (j / c.group() == 0) ASSERT_TRUE(std::isnan(out[j * 64 + d])) << j << " " << d;
                    else ASSERT_EQ(out[j * 64 + d], reference[j * 64 + d]);
                }
            // Evict the token from both caches' head 0 (keep), then the outputs agree again.
            std::vector<std::uint32_t> kept;
            for (std::uint32_t t = 0; t < tokens; ++t)
                if (t != bad) kept.push_back(t);
            auto dirty_head = dirty.head(0, 0), clean_head = clean.head(0, 0);
            dirty_head.keep(kept.data(), kept.size());
            clean_head.keep(kept.data(), kept.size());
            kvc::detail::attention_scratch scratch(2 * 66);
            for (const auto* head : {&dirty_head, &clean_head}) {
                kvc::kernels::decode_problem p;
                p.group = 2;
                p.queries = queries.data();
                p.query_stride = 64;
                p.scale = c.logit_scale();
                const auto state = scratch.state(2);
                kvc::kernels::common::reset_state<kvc::kernels::reference_arch>(state, 2, 64);
                head->attend(kvc::kernels::active(), p, state);
                kvc::kernels::common::finalize_state<kvc::kernels::reference_arch>(
                    state, 2, 64, (head == &dirty_head ? out : reference).data(), 64);
            }
            for (std::size_t i = 0; i < 2 * 64; ++i) {
                ASSERT_TRUE(std::isfinite(out[i]));
                ASSERT_EQ(out[i], reference[i]);
            }
        }
    }
}

// keep() and compacted() forward to the inner store: the kept tokens decode as before.
TEST(Rotated, KeepAndCompactedKeepTheSelectedRows) {
    const auto c = shape(1, 1, 64);
    const auto keys = random_floats(10 * 64, 31), values = random_floats(10 * 64, 32);
    quant_cache<q::rotated<q::none<kvc::half>>> cache(c);
    cache.append(0, token_major(keys.data(), 10, 1, 64), token_major(values.data(), 10, 1, 64), 0);
    const auto all = decoded_keys(cache, 0, 0);
    const std::uint32_t kept[] = {1, 4, 9};
    auto head = cache.head(0, 0);
    const auto compact = head.compacted(kept, 3);
    head.keep(kept, 3);
    for (const auto* h : {static_cast<const decltype(head)*>(&head), &compact}) {
        ASSERT_EQ(h->tokens(), 3u);
        std::vector<float> rows(3 * 64);
        h->decode_keys(kvc::kernels::active(), 0, 3, rows.data());
        for (std::size_t i = 0; i < 3; ++i)
            for (std::size_t d = 0; d < 64; ++d) ASSERT_EQ(rows[i * 64 + d], all[kept[i] * 64 + d]);
    }
    EXPECT_EQ(compact.bytes(), compact.inner().bytes());
}

// ---------------------------------------------------------------------------
// Fidelity: what the rotation is for.

struct fidelity {
    double key_error = 0.0;       // ||K^ - K||_F / ||K||_F over every head
    double attention_error = 0.0; // ||O^ - O||_F / ||O||_F over every query, O from full_cache f32
};

// Appends keys/values [tokens][kv_heads][dim] to a one-layer cache of codec Q,
// then measures key error and the error of a causal prefill over all tokens.
template <class Q>
fidelity measure(const kvc::cache_config& c, const std::vector<float>& keys, const std::vector<float>& values,
                 const std::vector<float>& queries, std::size_t tokens) {
    quant_cache<Q> cache(c);
    kvc::full_cache full(c);
    const token_major k(keys.data(), tokens, c.kv_heads, c.head_dim), v(values.data(), tokens, c.kv_heads, c.head_dim);
    cache.append(0, k, v, 0);
    full.append(0, k, v, 0);
    fidelity f;
    double diff = 0.0, norm = 0.0;
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const auto got = decoded_keys(cache, 0, h);
        for (std::size_t t = 0; t < tokens; ++t)
            for (std::size_t d = 0; d < c.head_dim; ++d) {
                const double want = keys[(t * c.kv_heads + h) * c.head_dim + d];
                diff += (got[t * c.head_dim + d] - want) * (got[t * c.head_dim + d] - want);
                norm += want * want;
            }
    }
    f.key_error = std::sqrt(diff / norm);
    std::vector<float> got(tokens * c.query_heads * c.head_dim), want(got.size());
    cache.attend_chunk(0, queries.data(), tokens, got.data());
    full.attend_chunk(0, queries.data(), tokens, want.data());
    f.attention_error = kvc_test::relative_error(got, want);
    return f;
}

// Keys with a few outlier channels (the same channels in every token, 20x
// the others, as in real keys): int4 with groups of 32 spends its range on
// the outlier; rotated, the outlier is spread over 64 channels.
TEST(RotatedFidelity, LowersInt4KeyErrorWithOutlierChannels) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 256;
    auto keys = random_floats(tokens * 2 * 64, 41);
    const auto values = random_floats(keys.size(), 42), queries = random_floats(tokens * 4 * 64, 43);
    for (std::size_t t = 0; t < tokens * 2; ++t)
        for (std::size_t channel : {5, 40}) keys[t * 64 + channel] = 20.0f + keys[t * 64 + channel];
    const auto plain = measure<q::q4_0>(c, keys, values, queries, tokens);
    const auto rotated = measure<q::rotated<q::q4_0>>(c, keys, values, queries, tokens);
    const auto keys_only = measure<q::rotated<q::q4_0, false>>(c, keys, values, queries, tokens);
    std::cout << "[ outliers ] int4 g32 key error " << plain.key_error << " -> " << rotated.key_error
              << " rotated; attention error " << plain.attention_error << " -> " << rotated.attention_error
              << " (keys only: " << keys_only.attention_error << ")\n";
    EXPECT_LT(rotated.key_error, 0.5 * plain.key_error);
    EXPECT_LT(rotated.attention_error, plain.attention_error);
    EXPECT_LT(keys_only.attention_error, plain.attention_error);
}

// Records what the model hands its cache (keys, values, queries per layer)
// while a full_cache f32 serves attention.
class recording_cache final : public engine::kv_cache {
public:
    explicit recording_cache(const kvc::cache_config& c) : full_(c), layers_(c.layers) {}
    void append(std::size_t layer, const view& k, const view& v, std::int64_t first) override {
        for (std::size_t t = 0; t < k.tokens(); ++t)
            for (std::size_t h = 0; h < k.heads(); ++h) {
                const float* kr = static_cast<const float*>(k.row(t, h));
                const float* vr = static_cast<const float*>(v.row(t, h));
                layers_[layer].keys.insert(layers_[layer].keys.end(), kr, kr + k.dim());
                layers_[layer].values.insert(layers_[layer].values.end(), vr, vr + v.dim());
            }
        full_.append(layer, k, v, first);
    }
    void attend(std::size_t layer, const float* queries, float* out) override {
        record(layer, queries, 1);
        full_.attend(layer, queries, out);
    }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        record(layer, queries, chunk);
        full_.attend_chunk(layer, queries, chunk, out);
    }
    std::size_t bytes() const override { return full_.bytes(); }
    std::size_t rows() const override { return 0; }
    void shrink_to_fit() override {}

    struct layer_record {
        std::vector<float> keys, values, queries; // [tokens][heads][dim]
    };
    const layer_record& layer(std::size_t l) const { return layers_[l]; }

private:
    void record(std::size_t layer, const float* queries, std::size_t chunk) {
        const auto& c = full_.config();
        layers_[layer].queries.insert(layers_[layer].queries.end(), queries, queries + chunk * c.query_heads * c.head_dim);
    }
    kvc::full_cache full_;
    std::vector<layer_record> layers_;
};

// The assertion: on the keys the real model produces (kvref, every
// layer), int4 (q4_0) key error and attention-output error are lower with
// the rotation than without.
TEST(RotatedFidelity, LowersInt4KeyErrorOnKvrefKeys) {
    const auto files = engine_test::kvref();
    KVC_SKIP_WITHOUT(files);
    auto model = engine::transformer::load(files.model.string());
    const auto& s = model.shape();
    std::ifstream text(files.eval_text, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(text)), std::istreambuf_iterator<char>());
    const std::size_t tokens = engine_test::scaled(384, 96);
    ASSERT_GE(bytes.size(), 1000 + tokens);
    std::vector<int> ids(tokens);
    for (std::size_t i = 0; i < tokens; ++i) ids[i] = static_cast<unsigned char>(bytes[1000 + i]);
    kvc::cache_config c = shape(s.kv_heads, s.heads / s.kv_heads, s.head_dim(), s.layers);
    recording_cache recorder(c);
    model.prefill(ids.data(), tokens, 0, recorder, tokens);
    kvc::cache_config one = c;
    one.layers = 1;
    fidelity plain_total, rotated_total;
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto& r = recorder.layer(l);
        const auto plain = measure<q::q4_0>(one, r.keys, r.values, r.queries, tokens);
        const auto rotated = measure<q::rotated<q::q4_0>>(one, r.keys, r.values, r.queries, tokens);
        std::cout << "[ kvref    ] layer " << l << ": key error " << plain.key_error << " -> " << rotated.key_error
                  << ", attention error " << plain.attention_error << " -> " << rotated.attention_error << "\n";
        plain_total.key_error += plain.key_error / s.layers;
        rotated_total.key_error += rotated.key_error / s.layers;
        plain_total.attention_error += plain.attention_error / s.layers;
        rotated_total.attention_error += rotated.attention_error / s.layers;
    }
    EXPECT_LT(rotated_total.key_error, plain_total.key_error);
    EXPECT_LT(rotated_total.attention_error, plain_total.attention_error);
}

} // namespace
