// Q8 channel-coupled vector quantization (kvc::quant::cq): the CQ kernels on
// every instruction set (and the portable code path) against the scalar
// reference and a double-precision oracle over the exact centroid values, a
// hand-worked tiny codebook, the codec inside compressed_cache (attention,
// bytes against the layout formula and a counting resource, bad input,
// NaN/Inf, keep), and fidelity: error falls with bits per group and is far
// lower with codebooks calibrated on the data's distribution.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/kernel_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/cq_common.hpp"
#include "kvc/kernels/simd/kernels.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

namespace kk = kvc::kernels;
namespace cal = kvc::calibration;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kvc_test::arch_guard;
using kvc_test::archs;
using kvc_test::error_of;
using kvc_test::shape;
using cq_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::cq, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<kvc::quant::cq>);

struct cq_table {
    std::string name;
    const kk::cq_kernels* kernels;
};

// Every table's CQ section, and the portable (NEON) code path on SSE2.
std::vector<cq_table> tables() {
    std::vector<cq_table> out;
    for (const kk::kernel_table* t : kvc_test::tables_under_test()) out.push_back({kvc::name_of(t->arch), &t->cq});
#if defined(__SSE2__) && KVC_X86_64
    static constexpr kk::cq_kernels portable = kk::simd::make_cq_kernels_of<xsimd::sse2, true>();
    out.push_back({"portable(sse2)", &portable});
#endif
    return out;
}

// An artifact with the given codebooks (artifact order [l][h][g][k][c]).
cal::artifact make_artifact(std::size_t layers, std::size_t heads, std::size_t dim, std::size_t c, std::size_t bits,
                            std::vector<float> keys, std::vector<float> values) {
    cal::artifact a;
    a.kind = "cq";
    const std::vector<std::uint64_t> s = {layers, heads, dim / c, std::uint64_t{1} << bits, c};
    a.tensors.push_back({"channels_per_group", {1}, {static_cast<float>(c)}});
    a.tensors.push_back({"bits", {1}, {static_cast<float>(bits)}});
    a.tensors.push_back({"key_codebooks", s, std::move(keys)});
    a.tensors.push_back({"value_codebooks", s, std::move(values)});
    return a;
}

cal::artifact random_artifact(std::size_t layers, std::size_t heads, std::size_t dim, std::size_t c,
                              std::size_t bits, std::uint32_t seed) {
    const std::size_t n = layers * heads * dim * (std::size_t{1} << bits);
    return make_artifact(layers, heads, dim, c, bits, random_floats(n, seed), random_floats(n, seed + 1));
}

// ---------------------------------------------------------------------------
// Hand-worked: dim 4, c = 2, b = 1 (two centroids per group), scale 1.
//   key group 0: k0 = (1, 0), k1 = (0, 1);   key group 1: k0 = (0, 0), k1 = (2, 2)
//   value group 0: k0 = (1, 2), k1 = (3, 4); value group 1: k0 = (-1, 0), k1 = (0, 5)
//   token 0: key (0.9, 0.1, 1.8, 2.1) -> codes (0, 1) -> (1, 0, 2, 2)
//            value (2.9, 4.2, 0.1, 4.0) -> codes (1, 1) -> (3, 4, 0, 5)
//   token 1: key (0.2, 0.7, 0.1, -0.1) -> codes (1, 0) -> (0, 1, 0, 0)
//            value (1.1, 1.9, -0.8, 0.2) -> codes (0, 0) -> (1, 2, -1, 0)
//   q = (1, 2, 0.5, -1): logits 1 + 1 - 2 = 0 and 2; p = (1, e^2) / (1 + e^2);
//   out = p0 (3, 4, 0, 5) + p1 (1, 2, -1, 0).
TEST(CqCodec, HandWorkedTinyCodebook) {
    arch_guard guard;
    const auto a = make_artifact(1, 1, 4, 2, 1, {1, 0, 0, 1, 0, 0, 2, 2}, {1, 2, 3, 4, -1, 0, 0, 5});
    auto c = shape(1, 1, 4);
    c.scale = 1.0f;
    const std::vector<float> keys = {0.9f, 0.1f, 1.8f, 2.1f, 0.2f, 0.7f, 0.1f, -0.1f};
    const std::vector<float> values = {2.9f, 4.2f, 0.1f, 4.0f, 1.1f, 1.9f, -0.8f, 0.2f};
    const std::vector<float> q = {1.0f, 2.0f, 0.5f, -1.0f};
    const double p0 = 1.0 / (1.0 + std::exp(2.0)), p1 = 1.0 - p0;
    const double want[4] = {p0 * 3 + p1 * 1, p0 * 4 + p1 * 2, p0 * 0 + p1 * -1, p0 * 5 + p1 * 0};
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cq_cache cache(c, {}, {}, kvc::quant::cq(a));
        cache.append(0, token_major(keys.data(), 2, 1, 4), token_major(values.data(), 2, 1, 4), 0);
        const auto& head = cache.head(0, 0);
        ASSERT_EQ(head.row_bytes(), 1u); // two 1-bit codes
        EXPECT_EQ(head.key_codes(0)[0], 0b10);
        EXPECT_EQ(head.key_codes(1)[0], 0b01);
        EXPECT_EQ(head.value_codes(0)[0], 0b11);
        EXPECT_EQ(head.value_codes(1)[0], 0b00);
        std::vector<float> k(8), v(8);
        head.decode_keys(kk::active(), 0, 2, k.data());
        head.decode_values(kk::active(), 0, 2, v.data());
        EXPECT_EQ(k, (std::vector<float>{1, 0, 2, 2, 0, 1, 0, 0}));
        EXPECT_EQ(v, (std::vector<float>{3, 4, 0, 5, 1, 2, -1, 0}));
        float out[4];
        cache.attend(0, q.data(), out);
        for (int d = 0; d < 4; ++d) EXPECT_NEAR(out[d], want[d], 2e-6) << d;
    }
}

// ---------------------------------------------------------------------------
// Kernels.

struct kernel_case {
    std::size_t dim, channels, bits, group, tokens;
};

// Random codes and codebooks; the double oracle over the centroid values.
struct kernel_data {
    kernel_case k;
    std::size_t groups, clusters, row_bytes;
    std::vector<float> key_book, value_book; // [g][j][k]
    std::vector<unsigned char> keys, values;
    std::vector<unsigned> key_codes, value_codes; // [t][g]
    std::vector<float> queries, bias;
    kernel_data(const kernel_case& c, std::uint32_t seed)
        : k(c), groups(c.dim / c.channels), clusters(std::size_t{1} << c.bits),
          row_bytes(kk::cq_row_bytes(c.dim / c.channels, c.bits)) {
        key_book = random_floats(c.dim * clusters, seed);
        value_book = random_floats(c.dim * clusters, seed + 1);
        queries = random_floats(c.group * c.dim, seed + 2);
        bias = random_floats(c.tokens, seed + 3, 0.5f);
        std::mt19937 rng(seed + 4);
        std::uniform_int_distribution<unsigned> code(0, static_cast<unsigned>(clusters - 1));
        keys.resize(c.tokens * row_bytes + 1, 0xa5); // one guard byte
        values.resize(c.tokens * row_bytes + 1, 0xa5);
        key_codes.resize(c.tokens * groups);
        value_codes.resize(c.tokens * groups);
        std::vector<unsigned char> codes(groups);
        for (std::size_t t = 0; t < c.tokens; ++t) {
            for (int which = 0; which < 2; ++which) {
                for (std::size_t g = 0; g < groups; ++g) {
                    codes[g] = static_cast<unsigned char>(code(rng));
                    (which ? value_codes : key_codes)[t * groups + g] = codes[g];
                }
                kk::cq_common::pack_codes<kk::reference_arch>(codes.data(), groups, c.bits,
                                                              (which ? values : keys).data() + t * row_bytes);
            }
        }
    }
    double key(std::size_t t, std::size_t d) const {
        const std::size_t g = d / k.channels, j = d % k.channels;
        return key_book[(g * k.channels + j) * clusters + key_codes[t * groups + g]];
    }
    double value(std::size_t t, std::size_t d) const {
        const std::size_t g = d / k.channels, j = d % k.channels;
        return value_book[(g * k.channels + j) * clusters + value_codes[t * groups + g]];
    }
    kk::cq_decode_problem problem(std::size_t first, std::size_t count, float* logits, float* workspace) const {
        kk::cq_decode_problem p;
        p.rows.keys = keys.data() + first * row_bytes;
        p.rows.values = values.data() + first * row_bytes;
        p.rows.row_bytes = row_bytes;
        p.rows.key_codebook = key_book.data();
        p.rows.value_codebook = value_book.data();
        p.rows.channels = k.channels;
        p.rows.bits = k.bits;
        p.tokens = count;
        p.dim = k.dim;
        p.group = k.group;
        p.queries = queries.data();
        p.query_stride = k.dim;
        p.scale = 0.3f;
        p.bias = bias.data() + first;
        p.logits = logits ? logits + first : nullptr;
        p.logits_stride = k.tokens;
        p.workspace = workspace;
        return p;
    }
    double logit(std::size_t h, std::size_t t) const {
        double dot = 0.0;
        for (std::size_t d = 0; d < k.dim; ++d) dot += static_cast<double>(queries[h * k.dim + d]) * key(t, d);
        return 0.3 * dot + bias[t];
    }
    // Bound on |logit error| of any float evaluation: every product and sum over dim terms.
    double logit_bound(std::size_t h, std::size_t t) const {
        double magnitude = 0.0;
        for (std::size_t d = 0; d < k.dim; ++d) magnitude += std::fabs(queries[h * k.dim + d] * key(t, d));
        return kvc_test::gamma_n(static_cast<double>(2 * k.dim + 4)) * (0.3 * magnitude + std::fabs(bias[t])) + 1e-30;
    }
    std::vector<double> output(std::size_t h) const {
        std::vector<double> l(k.tokens), out(k.dim, 0.0);
        double max = -INFINITY, sum = 0.0;
        for (std::size_t t = 0; t < k.tokens; ++t) max = std::max(max, l[t] = logit(h, t));
        for (double& x : l) sum += (x = std::exp(x - max));
        for (std::size_t t = 0; t < k.tokens; ++t)
            for (std::size_t d = 0; d < k.dim; ++d) out[d] += l[t] / sum * value(t, d);
        return out;
    }
};

// Runs [0, split) with the reference, then [split, tokens) with `kernels`
// into the same running state (chaining), and returns the finalized output.
std::vector<float> run(const kk::cq_kernels& kernels, const kernel_data& data, std::size_t split,
                       std::vector<float>& logits) {
    const auto& c = data.k;
    std::vector<float> workspace(kk::cq_workspace_floats(c.dim, c.channels, c.bits), std::nanf(""));
    std::vector<float> max(c.group), sum(c.group), acc(c.group * c.dim), out(c.group * c.dim);
    const kk::decode_state state{max.data(), sum.data(), acc.data()};
    kk::common::reset_state<kk::reference_arch>(state, c.group, c.dim);
    logits.assign(c.group * c.tokens, std::nanf(""));
    if (split > 0) kk::reference_table().cq.attend_partial(data.problem(0, split, logits.data(), workspace.data()), state);
    kernels.attend_partial(data.problem(split, c.tokens - split, logits.data(), workspace.data()), state);
    kk::common::finalize_state<kk::reference_arch>(state, c.group, c.dim, out.data(), c.dim);
    return out;
}

TEST(CqKernels, AttentionMatchesDoubleOracleOnEveryInstructionSet) {
    const kernel_case cases[] = {
        {128, 4, 8, 4, 300}, {128, 8, 8, 4, 200}, {64, 2, 8, 1, 65},  {128, 4, 3, 5, 130},
        {32, 8, 5, 3, 64},   {16, 1, 2, 8, 63},   {24, 4, 7, 2, 1},   {128, 8, 1, 4, 129},
    };
    std::uint32_t seed = 100;
    for (const kernel_case& c : cases) {
        const kernel_data data(c, seed += 10);
        std::vector<std::vector<double>> want;
        for (std::size_t h = 0; h < c.group; ++h) want.push_back(data.output(h));
        for (const cq_table& table : tables()) {
            for (std::size_t split : {std::size_t{0}, c.tokens / 2}) {
                SCOPED_TRACE(table.name + " dim=" + std::to_string(c.dim) + " c=" + std::to_string(c.channels) +
                             " b=" + std::to_string(c.bits) + " group=" + std::to_string(c.group) +
                             " tokens=" + std::to_string(c.tokens) + " split=" + std::to_string(split));
                std::vector<float> logits;
                const auto out = run(*table.kernels, data, split, logits);
                for (std::size_t h = 0; h < c.group; ++h) {
                    for (std::size_t t = 0; t < c.tokens; ++t)
                        ASSERT_NEAR(logits[h * c.tokens + t], data.logit(h, t), data.logit_bound(h, t)) << h << ' ' << t;
                    double diff = 0.0, norm = 0.0;
                    for (std::size_t d = 0; d < c.dim; ++d) {
                        diff += (out[h * c.dim + d] - want[h][d]) * (out[h * c.dim + d] - want[h][d]);
                        norm += want[h][d] * want[h][d];
                    }
                    EXPECT_LE(std::sqrt(diff / norm), 2e-5) << "head " << h;
                }
                ASSERT_EQ(data.keys.back(), 0xa5); // guard bytes untouched
            }
        }
    }
}

// Same result as the reference, up to float rounding.
TEST(CqKernels, AttentionMatchesReference) {
    const kernel_data data({128, 4, 8, 4, 500}, 7);
    std::vector<float> want_logits, logits;
    const auto want = run(kk::reference_table().cq, data, 0, want_logits);
    for (const cq_table& table : tables()) {
        SCOPED_TRACE(table.name);
        const auto got = run(*table.kernels, data, 0, logits);
        EXPECT_LE(kvc_test::relative_error(got, want), 1e-5);
    }
}

// Codes: the nearest centroid; sets may differ from the reference only on near ties.
TEST(CqKernels, EncodeRowPicksNearestCentroidOnEveryInstructionSet) {
    struct shape_case {
        std::size_t dim, channels, bits;
    };
    for (const shape_case s : {shape_case{128, 4, 8}, shape_case{128, 8, 8}, shape_case{64, 2, 6},
                               shape_case{32, 4, 3}, shape_case{16, 1, 1}, shape_case{40, 8, 4}}) {
        const std::size_t groups = s.dim / s.channels, clusters = std::size_t{1} << s.bits;
        const auto book = random_floats(s.dim * clusters, 3);
        const std::size_t bytes = kk::cq_row_bytes(groups, s.bits);
        for (std::uint32_t row = 0; row < 20; ++row) {
            const auto x = random_floats(s.dim, 50 + row);
            auto distance = [&](std::size_t g, unsigned k) {
                double d = 0.0;
                for (std::size_t j = 0; j < s.channels; ++j) {
                    const double e = static_cast<double>(x[g * s.channels + j]) - book[(g * s.channels + j) * clusters + k];
                    d += e * e;
                }
                return d;
            };
            for (const cq_table& table : tables()) {
                SCOPED_TRACE(table.name + " dim=" + std::to_string(s.dim) + " c=" + std::to_string(s.channels) +
                             " b=" + std::to_string(s.bits));
                std::vector<unsigned char> out(bytes + 1, 0xa5);
                table.kernels->encode_row(x.data(), book.data(), s.dim, s.channels, s.bits, out.data());
                ASSERT_EQ(out[bytes], 0xa5);
                for (std::size_t g = 0; g < groups; ++g) {
                    const unsigned code = kk::cq_common::code_at<kk::reference_arch>(out.data(), g, s.bits);
                    double best = INFINITY;
                    for (unsigned k = 0; k < clusters; ++k) best = std::min(best, distance(g, k));
                    EXPECT_LE(distance(g, code), best * (1 + 1e-5) + 1e-12) << "group " << g;
                }
            }
        }
    }
}

TEST(CqKernels, NonFiniteGroupsGetCodeZeroAndLeaveOthersAlone) {
    const std::size_t dim = 32, c = 4, bits = 8, groups = dim / c, clusters = 256;
    const auto book = random_floats(dim * clusters, 9);
    auto x = random_floats(dim, 10);
    std::vector<unsigned char> clean(groups);
    kk::reference_table().cq.encode_row(x.data(), book.data(), dim, c, bits, clean.data());
    x[1] = std::numeric_limits<float>::quiet_NaN();
    x[9] = std::numeric_limits<float>::infinity();
    x[14] = -std::numeric_limits<float>::infinity();
    x[19] = 1e30f; // every squared distance overflows
    for (const cq_table& table : tables()) {
        SCOPED_TRACE(table.name);
        std::vector<unsigned char> out(groups);
        table.kernels->encode_row(x.data(), book.data(), dim, c, bits, out.data());
        for (std::size_t g = 0; g < groups; ++g) {
            if (g == 0 || g == 2 || g == 3 || g == 4) EXPECT_EQ(out[g], 0) << g;
            else EXPECT_EQ(out[g], clean[g]) << g;
        }
    }
}

// ---------------------------------------------------------------------------
// The codec in compressed_cache.

std::vector<float> oracle(const kvc::cache_config& c, const cq_cache& cache, const float* queries) {
    const std::size_t dim = c.head_dim, group = c.group();
    std::vector<float> out(c.query_heads * dim);
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const auto& head = cache.head(0, h);
        const std::size_t tokens = head.tokens();
        std::vector<float> k(tokens * dim), v(tokens * dim);
        head.decode_keys(kk::reference_table(), 0, tokens, k.data());
        head.decode_values(kk::reference_table(), 0, tokens, v.data());
        for (std::size_t j = h * group; j < (h + 1) * group; ++j) {
            std::vector<double> l(tokens), o(dim, 0.0);
            double max = -INFINITY, sum = 0.0;
            for (std::size_t t = 0; t < tokens; ++t) {
                double dot = 0.0;
                for (std::size_t d = 0; d < dim; ++d) dot += static_cast<double>(queries[j * dim + d]) * k[t * dim + d];
                max = std::max(max, l[t] = dot * c.logit_scale());
            }
            for (double& x : l) sum += (x = std::exp(x - max));
            for (std::size_t t = 0; t < tokens; ++t)
                for (std::size_t d = 0; d < dim; ++d) o[d] += l[t] / sum * v[t * dim + d];
            for (std::size_t d = 0; d < dim; ++d) out[j * dim + d] = static_cast<float>(o[d]);
        }
    }
    return out;
}

TEST(CqCodec, PrefillAndDecodeMatchOracleOverCentroidsOnEveryInstructionSet) {
    arch_guard guard;
    const auto c = shape(2, 3, 64);
    const auto a = random_artifact(1, 2, 64, 4, 6, 20);
    const std::size_t prompt = 96, chunk = 32, steps = 5, total = prompt + steps;
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const auto keys = random_floats(total * row, 21), values = random_floats(total * row, 22);
    const auto queries = random_floats(total * qrow, 23);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cq_cache cache(c, {}, {}, kvc::quant::cq(a));
        double worst = 0.0;
        for (std::size_t t0 = 0; t0 < prompt; t0 += chunk) {
            cache.append(0, token_major(keys.data() + t0 * row, chunk, c.kv_heads, c.head_dim),
                         token_major(values.data() + t0 * row, chunk, c.kv_heads, c.head_dim),
                         static_cast<std::int64_t>(t0));
            std::vector<float> out(chunk * qrow);
            cache.attend_chunk(0, queries.data() + t0 * qrow, chunk, out.data());
            // The last query of the chunk sees every token: compare it with the oracle.
            const auto want = oracle(c, cache, queries.data() + (t0 + chunk - 1) * qrow);
            worst = std::max(worst, kvc_test::relative_error(
                                        std::vector<float>(out.end() - static_cast<std::ptrdiff_t>(qrow), out.end()), want));
        }
        for (std::size_t t = prompt; t < total; ++t) {
            cache.append(0, token_major(keys.data() + t * row, 1, c.kv_heads, c.head_dim),
                         token_major(values.data() + t * row, 1, c.kv_heads, c.head_dim), static_cast<std::int64_t>(t));
            std::vector<float> out(qrow);
            cache.attend(0, queries.data() + t * qrow, out.data());
            worst = std::max(worst, kvc_test::relative_error(out, oracle(c, cache, queries.data() + t * qrow)));
        }
        EXPECT_LE(worst, 2e-5);
    }
}

// The prefill query i sees exactly the first tokens - chunk + i + 1 tokens.
TEST(CqCodec, PrefillIsCausal) {
    const auto c = shape(1, 2, 32);
    const auto a = random_artifact(1, 1, 32, 4, 4, 30);
    const std::size_t n = 20;
    const auto keys = random_floats(n * 32, 31), values = random_floats(n * 32, 32);
    const auto queries = random_floats(n * 64, 33);
    cq_cache chunked(c, {}, {}, kvc::quant::cq(a)), stepwise(c, {}, {}, kvc::quant::cq(a));
    chunked.append(0, token_major(keys.data(), n, 1, 32), token_major(values.data(), n, 1, 32), 0);
    std::vector<float> out(n * 64), step(64);
    chunked.attend_chunk(0, queries.data(), n, out.data());
    for (std::size_t t = 0; t < n; ++t) {
        stepwise.append(0, token_major(keys.data() + t * 32, 1, 1, 32), token_major(values.data() + t * 32, 1, 1, 32),
                        static_cast<std::int64_t>(t));
        stepwise.attend(0, queries.data() + t * 64, step.data());
        for (std::size_t i = 0; i < 64; ++i) EXPECT_EQ(out[t * 64 + i], step[i]) << t << ' ' << i;
    }
}

TEST(CqCodec, BytesMatchLayoutFormulaAndMemoryResource) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 128, 2);
    c.resource = &counter;
    for (std::size_t bits : {std::size_t{8}, std::size_t{5}}) {
        {
            cq_cache cache(c, {}, {}, kvc::quant::cq(random_artifact(2, 2, 128, 8, bits, 40)));
            const std::size_t codebooks = 2 * 128 * (std::size_t{1} << bits) * sizeof(float);
            for (std::size_t l = 0; l < 2; ++l)
                for (std::size_t h = 0; h < 2; ++h) EXPECT_EQ(cache.head(l, h).bytes(), codebooks);
            const std::size_t metadata = cache.bytes();
            EXPECT_EQ(metadata, counter.in_use);
            const std::size_t tokens = 300;
            cache.reserve(tokens);
            const auto keys = random_floats(tokens * c.kv_heads * c.head_dim, 44);
            for (std::size_t l = 0; l < c.layers; ++l)
                cache.append(l, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                             token_major(keys.data(), tokens, c.kv_heads, c.head_dim), 0);
            // 16 groups of 8 channels: 16 codes of b bits per row, rounded up to bytes.
            const std::size_t row = (16 * bits + 7) / 8;
            EXPECT_EQ(cache.head(0, 0).row_bytes(), row);
            const std::size_t head_bytes = tokens * 2 * row + codebooks;
            for (std::size_t l = 0; l < c.layers; ++l)
                for (std::size_t h = 0; h < c.kv_heads; ++h) EXPECT_EQ(cache.head(l, h).bytes(), head_bytes);
            EXPECT_EQ(cache.bytes(), metadata - c.layers * c.kv_heads * codebooks +
                                         c.layers * c.kv_heads * (head_bytes + tokens * 4));
            EXPECT_EQ(cache.bytes(), counter.in_use);
            cache.clear(); // codes released, codebooks kept
            EXPECT_EQ(cache.head(0, 0).bytes(), codebooks);
            EXPECT_EQ(cache.bytes(), counter.in_use);
        }
        EXPECT_EQ(counter.in_use, 0u);
    }
    EXPECT_DOUBLE_EQ(kvc::quant::cq(random_artifact(1, 1, 64, 8, 8, 1)).bits_per_channel(), 1.0);
    EXPECT_DOUBLE_EQ(kvc::quant::cq(random_artifact(1, 1, 64, 4, 8, 1)).bits_per_channel(), 2.0);
}

TEST(CqCodec, BadInputThrowsKvcError) {
    const auto good = random_artifact(2, 2, 64, 4, 4, 50);
    // Artifact for another shape than the cache.
    EXPECT_NE(error_of([&] { cq_cache(shape(2, 2, 64, 3), {}, {}, kvc::quant::cq(good)); }).find("2 layers x 2 KV heads x head_dim 64"),
              std::string::npos);
    EXPECT_NE(error_of([&] { cq_cache(shape(4, 1, 64, 2), {}, {}, kvc::quant::cq(good)); }).find("the cache has 2 x 4 x 64"),
              std::string::npos);
    EXPECT_NE(error_of([&] { cq_cache(shape(2, 1, 128, 2), {}, {}, kvc::quant::cq(good)); }).find("head_dim 64"),
              std::string::npos);
    // Malformed artifacts.
    auto wrong_kind = good;
    wrong_kind.kind = "qfilter";
    EXPECT_NE(error_of([&] { kvc::quant::cq{wrong_kind}; }).find("kind 'cq'"), std::string::npos);
    auto mismatched = good;
    mismatched.tensors[3].shape[1] = 1;
    mismatched.tensors[3].values.resize(mismatched.tensors[3].elements());
    EXPECT_NE(error_of([&] { kvc::quant::cq{mismatched}; }).find("value_codebooks"), std::string::npos);
    auto bad_bits = good;
    bad_bits.tensors[1].values[0] = 9.0f;
    EXPECT_NE(error_of([&] { kvc::quant::cq{bad_bits}; }).find("bits 1..8"), std::string::npos);
    auto bad_channels = good;
    bad_channels.tensors[0].values[0] = 3.0f;
    EXPECT_NE(error_of([&] { kvc::quant::cq{bad_channels}; }).find("channels_per_group 1, 2, 4 or 8"),
              std::string::npos);
    auto nan_centroid = good;
    nan_centroid.tensors[2].values[5] = std::nanf("");
    EXPECT_NE(error_of([&] { kvc::quant::cq{nan_centroid}; }).find("finite centroids"), std::string::npos);
    auto missing = good;
    missing.tensors.pop_back();
    EXPECT_NE(error_of([&] { kvc::quant::cq{missing}; }).find("value_codebooks"), std::string::npos);
    // dim not a multiple of c, for the head storage directly.
    const std::vector<float> book(30 * 16 * 2);
    EXPECT_NE(error_of([&] { kvc::quant::cq_head(30, 4, 4, book.data(), book.data(), nullptr); })
                  .find("head_dim a multiple of 4"),
              std::string::npos);
}

// NaN/Inf in appended rows: the affected groups take code 0 (centroid 0),
// every other group, token and head is stored exactly as without them, and
// attention stays finite.
TEST(CqCodec, NonFiniteInputTakesCodeZeroAndDoesNotSpread) {
    arch_guard guard;
    const auto c = shape(2, 2, 32);
    const auto a = random_artifact(1, 2, 32, 4, 8, 60);
    const std::size_t n = 10, row = 2 * 32;
    const auto keys = random_floats(n * row, 61), values = random_floats(n * row, 62);
    auto bad_keys = keys, bad_values = values;
    bad_keys[4 * row + 32 + 5] = std::numeric_limits<float>::quiet_NaN(); // token 4, head 1, group 1
    bad_values[7 * row + 0 + 31] = -std::numeric_limits<float>::infinity(); // token 7, head 0, group 7
    const auto q = random_floats(2 * 2 * 32, 63);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        cq_cache clean(c, {}, {}, kvc::quant::cq(a)), dirty(c, {}, {}, kvc::quant::cq(a));
        clean.append(0, token_major(keys.data(), n, 2, 32), token_major(values.data(), n, 2, 32), 0);
        dirty.append(0, token_major(bad_keys.data(), n, 2, 32), token_major(bad_values.data(), n, 2, 32), 0);
        for (std::size_t h = 0; h < 2; ++h)
            for (std::size_t t = 0; t < n; ++t)
                for (std::size_t g = 0; g < 8; ++g) {
                    const bool key_hit = h == 1 && t == 4 && g == 1, value_hit = h == 0 && t == 7 && g == 7;
                    EXPECT_EQ(dirty.head(0, h).key_codes(t)[g], key_hit ? 0 : clean.head(0, h).key_codes(t)[g]);
                    EXPECT_EQ(dirty.head(0, h).value_codes(t)[g], value_hit ? 0 : clean.head(0, h).value_codes(t)[g]);
                }
        std::vector<float> out(2 * 2 * 32);
        dirty.attend(0, q.data(), out.data());
        for (float x : out) EXPECT_TRUE(std::isfinite(x));
    }
}

// keep(): the kept tokens' codes, in order; attention then equals a cache
// that was only given those tokens.
TEST(CqCodec, KeepCompactsCodes) {
    const auto c = shape(1, 2, 32);
    const auto a = random_artifact(1, 1, 32, 8, 3, 70); // 3-bit codes straddle bytes
    const std::size_t n = 12;
    const auto keys = random_floats(n * 32, 71), values = random_floats(n * 32, 72);
    auto head = kvc::quant::cq(a).make_head(c, 0, 0);
    head.reserve_for_append(n);
    for (std::size_t t = 0; t < n; ++t)
        head.push_back(kk::active(), kvc::dtype::f32, keys.data() + t * 32, values.data() + t * 32);
    const std::vector<std::uint32_t> kept = {0, 3, 4, 9, 11};
    auto compacted = head;
    compacted.keep(kept.data(), kept.size());
    ASSERT_EQ(compacted.tokens(), kept.size());
    for (std::size_t i = 0; i < kept.size(); ++i)
        for (std::size_t b = 0; b < head.row_bytes(); ++b) {
            EXPECT_EQ(compacted.key_codes(i)[b], head.key_codes(kept[i])[b]);
            EXPECT_EQ(compacted.value_codes(i)[b], head.value_codes(kept[i])[b]);
        }
}

// ---------------------------------------------------------------------------
// Fidelity against full_cache.

// Keys and values whose c-channel groups are strongly coupled: each group is
// a random point of a per-(head, group) mixture of 16 components, plus small
// noise, on top of per-channel offsets.
std::vector<float> coupled(std::size_t tokens, std::size_t heads, std::size_t dim, std::uint32_t structure_seed,
                           std::uint32_t sample_seed) {
    std::mt19937 structure(structure_seed), sample(sample_seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const std::size_t c = 4, components = 16;
    std::vector<float> centres(heads * dim * components);
    for (float& x : centres) x = 2.0f * normal(structure);
    std::vector<float> x(tokens * heads * dim);
    std::uniform_int_distribution<std::size_t> pick(0, components - 1);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t g = 0; g < dim / c; ++g) {
                const std::size_t k = pick(sample);
                for (std::size_t j = 0; j < c; ++j)
                    x[(t * heads + h) * dim + g * c + j] =
                        centres[((h * dim + g * c + j) * components) + k] + 0.3f * normal(sample);
            }
    return x;
}

double error_against_full(const kvc::quant::cq& codec, const std::vector<float>& keys, const std::vector<float>& values,
                          std::size_t tokens) {
    const auto queries = random_floats(8 * 4 * 64, 80, 0.5f);
    return kvc_test::mean_error_against_full(cq_cache(shape(2, 2, 64), {}, {}, codec), keys, values, queries, tokens, 8);
}

TEST(CqCodec, ErrorFallsWithBitsAndCalibrationOnTheDataMatters) {
    const std::size_t tokens = 256, sample = 512;
    const auto keys = coupled(tokens, 2, 64, 1, 2), values = coupled(tokens, 2, 64, 3, 4);
    // Held-out samples of the same distribution (same structure seed, other samples).
    const auto sample_keys = coupled(sample, 2, 64, 1, 5), sample_values = coupled(sample, 2, 64, 3, 6);
    const token_major sk(sample_keys.data(), sample, 2, 64), sv(sample_values.data(), sample, 2, 64);
    double previous = INFINITY;
    std::vector<double> errors;
    for (std::size_t bits : {2, 4, 6, 8}) {
        cal::cq_options o;
        o.channels_per_group = 4;
        o.bits = bits;
        o.iterations = 15;
        const double e = error_against_full(kvc::quant::cq(cal::calibrate_cq(sk, sv, o)), keys, values, tokens);
        errors.push_back(e);
        EXPECT_LT(e, previous) << bits << " bits";
        previous = e;
    }
    // Codebooks of the same size learnt on unrelated data (Gaussian, other structure).
    const auto other_keys = random_floats(sample * 2 * 64, 90), other_values = random_floats(sample * 2 * 64, 91);
    cal::cq_options o;
    o.bits = 6;
    o.iterations = 15;
    const double unrelated = error_against_full(
        kvc::quant::cq(cal::calibrate_cq(token_major(other_keys.data(), sample, 2, 64),
                                         token_major(other_values.data(), sample, 2, 64), o)),
        keys, values, tokens);
    std::cout << "[ cq       ] rel error c=4, b=2,4,6,8: " << errors[0] << ' ' << errors[1] << ' ' << errors[2] << ' '
              << errors[3] << "; b=6 calibrated on unrelated data: " << unrelated << std::endl;
    EXPECT_LT(errors[2] * 3.0, unrelated);
}

} // namespace
