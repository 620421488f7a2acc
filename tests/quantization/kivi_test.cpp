// Q2 KIVI (kvc::quant::kivi, storage/kivi_rows.hpp, kernels/quant/kivi_*.hpp):
// a hand-worked block, the fused attention on every instruction set (and the
// portable code path) against the scalar reference and a double oracle over
// the exact stored values, prefill, attention inside compressed_cache, bytes
// against the layout formula and a counting resource, bad input, NaN/Inf,
// eviction (compacted), and fidelity against full_cache with outlier channels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kernels/quant_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/kivi_simd.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/storage/kivi_rows.hpp"
#include "kvc/view/kv_view.hpp"
#include "quantization/codec_test_util.hpp"

namespace {

using namespace kvc_test;
namespace q = kvc::quant;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using kk::quant_format;

template <class Q>
using quant_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Q, kvc::project::none>;

static_assert(kvc::is_quantization_policy_v<q::kivi<2>>);
static_assert(q::kivi<4>::key_bits_per_value() == 5.0 && q::kivi<4>::value_bits_per_value() == 5.0);
static_assert(q::kivi<2>::key_bits_per_value() == 3.0 && q::kivi<2>::value_bits_per_value() == 3.0);
static_assert(q::kivi<2, 128>::key_bits_per_value() == 2.25 && q::kivi<2, 128>::value_bits_per_value() == 2.25);

kvc::kivi_layout layout_of(quant_format f, std::size_t g, std::size_t r, std::size_t s) {
    kvc::kivi_layout l;
    l.format = f;
    l.group_size = g;
    l.residual = r;
    l.sink_tokens = s;
    return l;
}

float half_at(const unsigned char* p) {
    std::uint16_t bits;
    std::memcpy(&bits, p, 2);
    return kvc::to_float(kvc::half::from_bits(bits));
}

float code_at(quant_format f, const unsigned char* payload, std::size_t j) {
    return f == quant_format::int4_asym ? kk::quant_common::code_of<kk::reference_arch, quant_format::int4_asym>(payload, j)
                                        : kk::quant_common::code_of<kk::reference_arch, quant_format::int2_asym>(payload, j);
}

// Scale, minimum and code of channel c of quantized token t, read from the documented layout.
struct key_factors {
    float scale, minimum, code;
};
key_factors factors_of(const kvc::kivi_rows& h, std::size_t t, std::size_t c) {
    const std::size_t dim = h.dim(), g = h.layout().group_size;
    const unsigned char* block = h.key_block(t / g);
    const unsigned char* payload = block + 4 * dim + (t % g) * kk::kivi_code_row_bytes(h.layout().format, dim) +
                                   c / 32 * kk::info_of(h.layout().format).payload_bytes;
    return {half_at(block + 2 * c), half_at(block + 2 * dim + 2 * c), code_at(h.layout().format, payload, c % 32)};
}

// The stored sequence of a head in double, with the bound magnitudes of its keys.
sequence sequence_of(const kvc::kivi_rows& h) {
    sequence seq;
    const std::size_t n = h.tokens(), dim = h.dim();
    seq.dim = dim;
    std::vector<float> k(n * dim), v(n * dim);
    h.decode_keys(reference(), 0, n, k.data());
    h.decode_values(reference(), 0, n, v.data());
    seq.k.assign(k.begin(), k.end());
    seq.v.assign(v.begin(), v.end());
    seq.k_bound.resize(n * dim);
    seq.extra_roundings = 2; // q * d rounded, and the element value rounded in the oracle's reference
    for (std::size_t t = 0; t < n; ++t)
        for (std::size_t c = 0; c < dim; ++c) {
            const std::size_t body = t - h.sink_tokens();
            if (t >= h.sink_tokens() && body < h.quantized_tokens()) {
                const key_factors f = factors_of(h, body, c);
                seq.k_bound[t * dim + c] = std::fabs(double(f.code) * f.scale) + std::fabs(double(f.minimum));
            } else {
                seq.k_bound[t * dim + c] = std::fabs(seq.k[t * dim + c]);
            }
        }
    return seq;
}

kk::dense_segment segment_of(const kvc::dense_rows& rows) {
    kk::dense_segment s;
    s.keys = rows.key_row(0);
    s.values = rows.value_row(0);
    s.stride = rows.dim();
    s.tokens = rows.tokens();
    return s;
}

kk::kivi_decode_problem problem_of(const kvc::kivi_rows& h) {
    kk::kivi_decode_problem p;
    p.sink = segment_of(h.sink());
    p.key_blocks = h.key_block(0);
    p.key_block_bytes = h.key_block_bytes();
    p.values = h.value_row(0);
    p.value_row_bytes = h.value_row_bytes();
    p.quantized = h.quantized_tokens();
    p.format = h.layout().format;
    p.group_size = h.layout().group_size;
    p.residual = segment_of(h.residual());
    p.dim = h.dim();
    return p;
}

kvc::kivi_rows make_head(const kvc::kivi_layout& layout, std::size_t dim, const std::vector<float>& k,
                         const std::vector<float>& v) {
    kvc::kivi_rows h(layout, dim, kvc::default_resource());
    const std::size_t n = k.size() / dim;
    h.reserve(n);
    for (std::size_t t = 0; t < n; ++t) h.push_back(reference(), dtype::f32, k.data() + t * dim, v.data() + t * dim);
    return h;
}

// Keys with outlier channels (as real keys have), Gaussian values.
void outlier_data(std::size_t tokens, std::size_t dim, rng_type& rng, std::vector<float>& k, std::vector<float>& v) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    k.resize(tokens * dim);
    v.resize(tokens * dim);
    for (std::size_t i = 0; i < k.size(); ++i) k[i] = normal(rng) * (i % dim == 7 || i % dim == 40 % dim ? 8.0f : 1.0f);
    for (float& x : v) x = normal(rng);
}

// ---------------------------------------------------------------------------
// Hand-worked blocks.

// dim 32, G 32, R 0: key[t][c] = c / 4 + (t % 16) / 2 gives every channel the
// minimum c / 4 and the range 7.5, so d = 0.5 and code (t % 16) exactly; value
// row t is t + (c % 16) / 4 (minimum t, scale 0.25, code c % 16). Every
// element is stored exactly.
TEST(KiviRows, HandWorkedFourBitBlock) {
    const std::size_t dim = 32, n = 32;
    std::vector<float> k(n * dim), v(n * dim);
    for (std::size_t t = 0; t < n; ++t)
        for (std::size_t c = 0; c < dim; ++c) {
            k[t * dim + c] = 0.25f * c + 0.5f * (t % 16);
            v[t * dim + c] = static_cast<float>(t) + 0.25f * (c % 16);
        }
    const kvc::kivi_rows h = make_head(layout_of(quant_format::int4_asym, 32, 0, 0), dim, k, v);
    ASSERT_EQ(h.blocks(), 1u);
    ASSERT_EQ(h.quantized_tokens(), 32u);
    ASSERT_EQ(h.residual_tokens(), 0u);
    EXPECT_EQ(h.key_block_bytes(), 4u * 32 + 32u * 16); // scales, minimums, 16 bytes of nibbles per token
    EXPECT_EQ(h.value_row_bytes(), 20u);                 // one q4_1 group
    const unsigned char* block = h.key_block(0);
    for (std::size_t c = 0; c < dim; ++c) {
        EXPECT_EQ(half_at(block + 2 * c), 0.5f) << c;
        EXPECT_EQ(half_at(block + 64 + 2 * c), 0.25f * c) << c;
    }
    for (std::size_t t = 0; t < n; ++t)
        for (std::size_t j = 0; j < 16; ++j) // channels j and j + 16 share byte j: code t % 16 in both nibbles
            EXPECT_EQ(block[128 + t * 16 + j], (t % 16) * 17) << t << ' ' << j;
    std::vector<float> sk(n * dim), sv(n * dim);
    h.decode_keys(reference(), 0, n, sk.data());
    h.decode_values(reference(), 0, n, sv.data());
    EXPECT_EQ(sk, k);
    EXPECT_EQ(sv, v);

    // Query 2 e_0, scale 1: logit_t = 2 * k[t][0] = t % 16; the output is the
    // softmax-weighted mean of the value rows, worked out here in double.
    std::vector<float> query(dim, 0.0f);
    query[0] = 2.0f;
    std::vector<double> want(dim, 0.0);
    double sum = 0.0;
    for (std::size_t t = 0; t < n; ++t) sum += std::exp(static_cast<double>(t % 16));
    for (std::size_t t = 0; t < n; ++t)
        for (std::size_t c = 0; c < dim; ++c)
            want[c] += std::exp(static_cast<double>(t % 16)) / sum * (static_cast<double>(t) + 0.25 * (c % 16));
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        state_buffers state(1, dim);
        kk::decode_problem p;
        p.group = 1;
        p.queries = query.data();
        p.query_stride = dim;
        p.scale = 1.0f;
        h.attend(*table, p, state.view());
        const auto out = state.finalize();
        for (std::size_t c = 0; c < dim; ++c) EXPECT_NEAR(out[c], want[c], 1e-5 * std::fabs(want[c])) << c;
    }
}

// Two bits: key[t][c] = c / 4 + (t % 4) gives d = 1 and code t % 4; byte j of
// a token's 8 code bytes holds channels j, j + 8, j + 16, j + 24.
TEST(KiviRows, HandWorkedTwoBitBlockAndResidualRule) {
    const std::size_t dim = 32, g = 32, r = 4;
    std::vector<float> k(70 * dim), v(70 * dim);
    for (std::size_t t = 0; t < 70; ++t)
        for (std::size_t c = 0; c < dim; ++c) {
            k[t * dim + c] = 0.25f * c + static_cast<float>(t % 4);
            v[t * dim + c] = static_cast<float>(t % 7) + 0.5f * static_cast<float>(c % 4);
        }
    kvc::kivi_rows h(layout_of(quant_format::int2_asym, g, r, 0), dim, kvc::default_resource());
    h.reserve(70);
    for (std::size_t t = 0; t < 70; ++t) {
        h.push_back(reference(), dtype::f32, k.data() + t * dim, v.data() + t * dim);
        // A block forms when the residual reaches R + G = 36 tokens.
        const std::size_t n = t + 1;
        const std::size_t blocks = n >= r + g ? (n - r) / g : 0;
        ASSERT_EQ(h.blocks(), blocks) << n;
        ASSERT_EQ(h.residual_tokens(), n - blocks * g) << n;
        ASSERT_LE(h.residual_tokens(), r + g - 1);
    }
    ASSERT_EQ(h.blocks(), 2u);
    const unsigned char* block = h.key_block(1);
    for (std::size_t c = 0; c < dim; ++c) {
        EXPECT_EQ(half_at(block + 2 * c), 1.0f);
        EXPECT_EQ(half_at(block + 64 + 2 * c), 0.25f * c);
    }
    for (std::size_t i = 0; i < g; ++i)
        for (std::size_t j = 0; j < 8; ++j) EXPECT_EQ(block[128 + i * 8 + j], ((32 + i) % 4) * 85) << i;
    std::vector<float> sk(70 * dim), sv(70 * dim);
    h.decode_keys(reference(), 0, 70, sk.data());
    h.decode_values(reference(), 0, 70, sv.data());
    EXPECT_EQ(sk, k); // every element exact: quantized ones by construction, residual ones are fp16-exact
    EXPECT_EQ(sv, v);
}

// ---------------------------------------------------------------------------
// Kernels on every instruction set.

struct kivi_table {
    std::string name;
    const kk::kivi_kernels* kernels;
};

std::vector<kivi_table> kivi_tables() {
    std::vector<kivi_table> tables;
    for (const kk::kernel_table* table : tables_under_test()) tables.push_back({kvc::name_of(table->arch), &table->kivi});
#if defined(__SSE2__) && KVC_X86_64
    static constexpr kk::kivi_kernels portable = kk::simd::make_kivi_kernels_of<xsimd::sse2, true>();
    tables.push_back({"portable(sse2)", &portable});
#endif
    return tables;
}

struct kivi_shape {
    quant_format format;
    std::size_t group_size, residual, sinks, dim, group, tokens;
    bool bias, logits;
    float scale;
};

std::string describe(const kivi_shape& s) {
    return std::string(kk::info_of(s.format).name) + " G=" + std::to_string(s.group_size) +
           " R=" + std::to_string(s.residual) + " sinks=" + std::to_string(s.sinks) + " dim=" + std::to_string(s.dim) +
           " group=" + std::to_string(s.group) + " tokens=" + std::to_string(s.tokens) + (s.bias ? " bias" : "") +
           (s.logits ? " logits" : "");
}

std::vector<kivi_shape> kernel_shapes() {
    std::vector<kivi_shape> out;
    rng_type rng(301);
    const std::size_t token_counts[] = {1, 161, 230, 333, 450, 517};
    const std::size_t residuals[] = {0, 16, 64};
    std::size_t i = 0;
    for (quant_format f : {quant_format::int4_asym, quant_format::int2_asym})
        for (std::size_t g : {32, 64, 128})
            for (std::size_t variant = 0; variant < 4; ++variant, ++i) {
                kivi_shape s;
                s.format = f;
                s.group_size = g;
                std::vector<std::size_t> dims;
                for (std::size_t d : {32, 64, 96, 128, 256})
                    if (d % g == 0) dims.push_back(d);
                s.dim = dims[(i * 3 + variant) % dims.size()];
                s.residual = residuals[(i + variant) % 3];
                s.sinks = (i + 2 * variant) % 3 == 0 ? 3 : 0;
                s.group = 1 + (i * 5 + variant) % 8;
                s.tokens = token_counts[(i * 7 + variant) % 6];
                s.bias = rng() % 2 == 0;
                s.logits = rng() % 3 != 0;
                s.scale = std::uniform_real_distribution<float>(0.5f, 3.0f)(rng) / std::sqrt(static_cast<float>(s.dim));
                out.push_back(s);
            }
    return out;
}

TEST(KiviKernels, AttentionMatchesOracleOverExactValuesAndReference) {
    const auto tables = kivi_tables();
    double worst = 0.0;
    std::size_t with_blocks = 0;
    rng_type rng(302);
    for (const kivi_shape& s : kernel_shapes()) {
        SCOPED_TRACE(describe(s));
        std::vector<float> k, v;
        outlier_data(s.tokens, s.dim, rng, k, v);
        const kvc::kivi_rows h = make_head(layout_of(s.format, s.group_size, s.residual, s.sinks), s.dim, k, v);
        with_blocks += h.blocks() > 0;
        sequence seq = sequence_of(h);
        query_buffers queries(s.group, s.dim, rng() % 3, odd_offset(rng));
        for (std::size_t g = 0; g < s.group; ++g) fill_normal(queries.head(g), s.dim, rng);
        aligned_array<float> bias(s.bias ? s.tokens : 0, 1);
        for (std::size_t t = 0; t < bias.size(); ++t) bias[t] = std::log(static_cast<float>(1 + rng() % 16));
        if (s.bias) seq.bias.assign(bias.data(), bias.data() + bias.size());
        std::vector<head_oracle> oracle;
        for (std::size_t g = 0; g < s.group; ++g) oracle.push_back(attend_oracle(seq, s.tokens, queries.head(g), s.scale));

        kk::kivi_decode_problem p = problem_of(h);
        p.group = s.group;
        p.queries = queries.head(0);
        p.query_stride = queries.stride;
        p.scale = s.scale;
        p.bias = s.bias ? bias.data() : nullptr;
        const auto run = [&](const kk::kivi_kernels& kernels, std::vector<float>& logits, std::vector<float>& max) {
            state_buffers state(s.group, s.dim, 3);
            kk::kivi_decode_problem run_p = p;
            const std::size_t stride = s.tokens + 2;
            if (s.logits) {
                logits.assign(s.group * stride, float_of(0x7fbadbadu));
                run_p.logits = logits.data();
                run_p.logits_stride = stride;
            }
            kernels.attend_partial(run_p, state.view());
            max.assign(state.max.data(), state.max.data() + s.group);
            return state.finalize();
        };
        std::vector<float> ref_logits, ref_max;
        const auto ref = run(kk::reference_table().kivi, ref_logits, ref_max);
        for (const kivi_table& t : tables) {
            SCOPED_TRACE(t.name);
            const int before = failures_so_far();
            std::vector<float> logits, max;
            const auto got = run(*t.kernels, logits, max);
            for (std::size_t g = 0; g < s.group; ++g) {
                SCOPED_TRACE("head " + std::to_string(g));
                const head_oracle& o = oracle[g];
                const float* head = got.data() + g * s.dim;
                EXPECT_TRUE(all_finite(head, s.dim));
                EXPECT_TRUE(within("out", head, s.dim, [&](std::size_t d) { return o.out[d]; },
                                   [&](std::size_t d) { return o.out_bound(d); }));
                EXPECT_TRUE(within("out vs reference", head, s.dim, [&](std::size_t d) { return ref[g * s.dim + d]; },
                                   [&](std::size_t d) { return 2.0 * o.out_bound(d); }));
                const double relative = relative_error(head, o.out);
                worst = std::max(worst, relative);
                EXPECT_LE(relative, 2e-5);
                if (s.logits) {
                    const float* row = logits.data() + g * (s.tokens + 2);
                    EXPECT_TRUE(within("logit", row, s.tokens, [&](std::size_t i) { return o.logit[i]; },
                                       [&](std::size_t i) { return o.logit_err[i]; }));
                    EXPECT_EQ(max[g], *std::max_element(row, row + s.tokens));
                    EXPECT_EQ(bits_of(row[s.tokens]), 0x7fbadbadu) << "logits padding written";
                }
            }
            if (failures_so_far() > before) return;
        }
    }
    EXPECT_GE(with_blocks, kernel_shapes().size() / 2); // most shapes have quantized blocks
    std::cout << "[ kvc      ] KIVI decode: worst ||out - exact|| / ||exact|| " << worst << std::endl;
}

// Causal prefill through the storage: query i sees a prefix that may end
// inside the sink, inside a key block or inside the residual.
TEST(KiviKernels, PrefillMatchesOracleOverPrefixesWithMass) {
    rng_type rng(303);
    const kivi_shape shapes[] = {
        {quant_format::int4_asym, 32, 16, 2, 64, 4, 120, false, false, 0.15f},
        {quant_format::int2_asym, 64, 0, 0, 128, 3, 150, false, false, 0.1f},
    };
    for (const kivi_shape& s : shapes) {
        SCOPED_TRACE(describe(s));
        std::vector<float> k, v;
        outlier_data(s.tokens, s.dim, rng, k, v);
        const kvc::kivi_rows h = make_head(layout_of(s.format, s.group_size, s.residual, s.sinks), s.dim, k, v);
        const sequence seq = sequence_of(h);
        const std::size_t chunk = 90; // the prefixes end in every segment
        std::vector<float> queries(chunk * s.group * s.dim);
        fill_normal(queries.data(), queries.size(), rng);
        std::vector<std::vector<head_oracle>> oracle(chunk);
        std::vector<double> exact_mass(s.tokens, 0.0), mass_bound(s.tokens, 1e-6 * chunk);
        for (std::size_t i = 0; i < chunk; ++i)
            for (std::size_t g = 0; g < s.group; ++g) {
                const std::size_t prefix = s.tokens - chunk + i + 1;
                oracle[i].push_back(attend_oracle(seq, prefix, queries.data() + (i * s.group + g) * s.dim, s.scale));
                for (std::size_t t = 0; t < prefix; ++t) {
                    exact_mass[t] += oracle[i].back().prob[t];
                    mass_bound[t] += oracle[i].back().prob_bound(t) + 1e-6 * oracle[i].back().prob[t];
                }
            }
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(kvc::name_of(table->arch));
            kk::prefill_problem p;
            p.chunk = chunk;
            p.group = s.group;
            p.queries = queries.data();
            p.query_token_stride = s.group * s.dim;
            p.query_head_stride = s.dim;
            std::vector<float> out(chunk * s.group * s.dim), mass(s.tokens, 0.0f);
            p.out = out.data();
            p.out_token_stride = s.group * s.dim;
            p.out_head_stride = s.dim;
            p.scale = s.scale;
            p.mass = mass.data();
            std::vector<float> workspace(kk::prefill_workspace_floats(s.group, s.dim, s.tokens, true));
            h.prefill(*table, p, workspace.data());
            for (std::size_t i = 0; i < chunk; ++i)
                for (std::size_t g = 0; g < s.group; ++g) {
                    const head_oracle& o = oracle[i][g];
                    EXPECT_TRUE(within("out", out.data() + (i * s.group + g) * s.dim, s.dim,
                                       [&](std::size_t d) { return o.out[d]; },
                                       [&](std::size_t d) { return o.out_bound(d); }))
                        << "query " << i << " head " << g;
                }
            EXPECT_TRUE(within("mass", mass.data(), s.tokens, [&](std::size_t i) { return exact_mass[i]; },
                               [&](std::size_t i) { return mass_bound[i]; }));
        }
    }
}

// ---------------------------------------------------------------------------
// Inside compressed_cache.

template <class Q>
class KiviCodec : public ::testing::Test {};
using codecs = ::testing::Types<q::kivi<4>, q::kivi<2>, q::kivi<2, 64, 16, 3>, q::kivi<4, 128, 0>, q::kivi<4, 32, 32, 2>>;
TYPED_TEST_SUITE(KiviCodec, codecs);

TYPED_TEST(KiviCodec, AttentionMatchesOracleOverStoredValuesOnEveryInstructionSet) {
    arch_guard guard;
    const chunked_run run(shape(3, 2, 128), {64, 64, 64}, 40, 71);
    for (kvc::arch_id arch : archs()) {
        SCOPED_TRACE(kvc::name_of(arch));
        kvc::set_active_arch(arch);
        quant_cache<TypeParam> cache(run.config);
        const double worst = run.worst_error_over_stored(cache, exact_query, 7); // every 7th query of a chunk
        const auto& head = cache.head(0, 0);
        EXPECT_LE(head.residual_tokens(), TypeParam::residual + TypeParam::group_size - 1);
        EXPECT_GT(head.blocks(), 0u);
        EXPECT_LE(worst, 2e-5);
    }
}

// bytes(): sink rows, key blocks, value rows, residual rows; the formula after
// an exact reserve, and exactly what the memory resource handed out.
TYPED_TEST(KiviCodec, BytesMatchLayoutFormulaAndMemoryResource) {
    constexpr std::size_t dim = 128, G = TypeParam::group_size, R = TypeParam::residual, S = TypeParam::sink_tokens;
    constexpr std::size_t bits = TypeParam::bits;
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, dim, 2);
    c.resource = &counter;
    for (std::size_t tokens : {std::size_t{2}, std::size_t{150}, std::size_t{700}}) {
        {
            quant_cache<TypeParam> cache(c);
            const std::size_t metadata = cache.bytes();
            EXPECT_EQ(metadata, counter.in_use);
            cache.reserve(tokens);
            const auto keys = random_floats(tokens * c.kv_heads * dim, 81);
            for (std::size_t l = 0; l < c.layers; ++l)
                cache.append(l, token_major(keys.data(), tokens, c.kv_heads, dim),
                             token_major(keys.data(), tokens, c.kv_heads, dim), 0);
            const std::size_t sinks = std::min(tokens, S), body = tokens - sinks;
            const std::size_t blocks = body >= R + G ? (body - R) / G : 0;
            const std::size_t block_bytes = dim * 2 + dim * 2 + G * dim * bits / 8; // scales, minimums, codes
            const std::size_t value_row = dim / G * (4 + G * bits / 8);             // per group: d, m, codes
            const std::size_t residual_rows = std::min(body, R + G);                 // capacity, not contents
            const std::size_t head_bytes =
                sinks * 4 * dim + blocks * block_bytes + blocks * G * value_row + residual_rows * 4 * dim;
            for (std::size_t l = 0; l < c.layers; ++l)
                for (std::size_t h = 0; h < c.kv_heads; ++h) {
                    EXPECT_EQ(cache.head(l, h).bytes(), head_bytes) << tokens;
                    EXPECT_EQ(cache.head(l, h).quantized_tokens(), blocks * G);
                }
            EXPECT_EQ(cache.bytes(), metadata + c.layers * c.kv_heads * (head_bytes + tokens * 4)); // + positions
            EXPECT_EQ(cache.bytes(), counter.in_use);
            EXPECT_DOUBLE_EQ(8.0 * (block_bytes / double(G) + value_row) / (2.0 * dim),
                             (TypeParam::key_bits_per_value() + TypeParam::value_bits_per_value()) / 2.0);
        }
        EXPECT_EQ(counter.in_use, 0u);
    }
}

// Growth without reserve stays within what the resource reports, and the
// residual never holds more than R + G rows of capacity.
TEST(KiviCodec, GrowthByOneTokenCountsEveryByte) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 2, 64);
    c.resource = &counter;
    quant_cache<q::kivi<2, 32, 64>> cache(c);
    const auto keys = random_floats(500 * 2 * 64, 82);
    for (std::size_t t = 0; t < 500; ++t) {
        cache.append(0, token_major(keys.data() + t * 128, 1, 2, 64), token_major(keys.data() + t * 128, 1, 2, 64),
                     static_cast<std::int64_t>(t));
        ASSERT_EQ(cache.bytes(), counter.in_use);
        ASSERT_LE(cache.head(0, 1).residual().bytes(), (64u + 32u) * 4 * 64);
    }
}

// ---------------------------------------------------------------------------
// Bad input.

TEST(KiviCodec, RejectsUnsupportedHeadDimGroupSizeAndBits) {
    const std::string dim = error_of([] { quant_cache<q::kivi<4, 64>> cache(shape(1, 1, 96)); });
    EXPECT_NE(dim.find("kvc::quant::kivi: expected head_dim a multiple of the group size 64"), std::string::npos) << dim;
    EXPECT_NE(dim.find("got head_dim 96"), std::string::npos) << dim;
    const std::string dim40 = error_of([] { quant_cache<q::kivi<2>> cache(shape(2, 2, 40)); });
    EXPECT_NE(dim40.find("group size 32"), std::string::npos) << dim40;

    const std::string group = error_of(
        [] { kvc::kivi_rows rows(layout_of(quant_format::int4_asym, 16, 0, 0), 64, kvc::default_resource()); });
    EXPECT_NE(group.find("expected group size 32, 64 or 128, got 16"), std::string::npos) << group;
    const std::string bits = error_of(
        [] { kvc::kivi_rows rows(layout_of(quant_format::int8_sym, 32, 0, 0), 64, kvc::default_resource()); });
    EXPECT_NE(bits.find("expected 4 or 2 bits (int4_asym or int2_asym), got format code 0"), std::string::npos) << bits;
    const std::string big = error_of(
        [] { kvc::kivi_rows rows(layout_of(quant_format::int4_asym, 32, 0, 0), 2048, kvc::default_resource()); });
    EXPECT_NE(big.find("at most 1024, got head_dim 2048"), std::string::npos) << big;
}

// ---------------------------------------------------------------------------
// NaN and Inf.

std::vector<float> attend_head(const kk::kernel_table& table, const kvc::kivi_rows& h, const std::vector<float>& q,
                               std::size_t group) {
    state_buffers state(group, h.dim());
    kk::decode_problem p;
    p.group = group;
    p.queries = q.data();
    p.query_stride = h.dim();
    p.scale = 0.125f;
    h.attend(table, p, state.view());
    return state.finalize();
}

// A NaN or Inf key element of a quantized token: its block's other tokens keep
// finite keys within d / 2 of their input, its value row turns NaN (so the
// head's attention is NaN, as full_cache's), and evicting it restores finite
// attention equal to the oracle over the kept stored values.
TEST(KiviRows, NonFiniteKeyIsConfinedToItsTokenAndEvictable) {
    const std::size_t dim = 64, n = 100, bad = 37; // R 16, G 32: tokens 0..63 quantized, bad in block 1
    rng_type rng(304);
    std::vector<float> k, v;
    outlier_data(n, dim, rng, k, v);
    std::vector<float> q(2 * dim);
    fill_normal(q.data(), q.size(), rng);
    for (float poison : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        SCOPED_TRACE(poison);
        std::vector<float> dirty_k = k;
        dirty_k[bad * dim + 5] = poison;
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(kvc::name_of(table->arch));
            kvc::kivi_rows h(layout_of(quant_format::int4_asym, 32, 16, 0), dim, kvc::default_resource());
            h.reserve(n);
            for (std::size_t t = 0; t < n; ++t) h.push_back(*table, dtype::f32, dirty_k.data() + t * dim, v.data() + t * dim);
            ASSERT_EQ(h.quantized_tokens(), 64u);
            const auto out = attend_head(*table, h, q, 2);
            EXPECT_TRUE(std::isnan(out[0]));
            std::vector<float> sk(n * dim), sv(n * dim);
            h.decode_keys(*table, 0, n, sk.data());
            h.decode_values(*table, 0, n, sv.data());
            for (std::size_t t = 32; t < 64; ++t) {
                if (t == bad) {
                    for (std::size_t c = 0; c < dim; ++c) EXPECT_TRUE(std::isnan(sv[t * dim + c]));
                    continue;
                }
                for (std::size_t c = 0; c < dim; ++c) {
                    const float d = factors_of(h, t, c).scale;
                    const float input = kvc::to_float(kvc::to_half(k[t * dim + c]));
                    EXPECT_LE(std::fabs(sk[t * dim + c] - input), 0.5f * d) << t << ' ' << c;
                    EXPECT_TRUE(std::isfinite(sv[t * dim + c]));
                }
            }
            std::vector<std::uint32_t> kept;
            for (std::size_t t = 0; t < n; ++t)
                if (t != bad) kept.push_back(static_cast<std::uint32_t>(t));
            const kvc::kivi_rows clean = h.compacted(kept.data(), kept.size());
            ASSERT_EQ(clean.tokens(), n - 1);
            const auto after = attend_head(*table, clean, q, 2);
            EXPECT_TRUE(all_finite(after.data(), after.size()));
            const sequence seq = sequence_of(clean);
            for (std::size_t g = 0; g < 2; ++g) {
                const head_oracle o = attend_oracle(seq, n - 1, q.data() + g * dim, 0.125f);
                EXPECT_TRUE(within("out", after.data() + g * dim, dim, [&](std::size_t d) { return o.out[d]; },
                                   [&](std::size_t d) { return o.out_bound(d); }));
            }
        }
    }
}

// Non-finite data still in the residual is held as full_cache holds it (fp16):
// attention is NaN; a NaN value element of a quantized token spoils only its
// own value group.
TEST(KiviRows, NonFiniteInResidualAndValues) {
    const std::size_t dim = 64;
    rng_type rng(305);
    std::vector<float> k, v;
    outlier_data(60, dim, rng, k, v);
    std::vector<float> q(dim);
    fill_normal(q.data(), q.size(), rng);
    q[1] = 1.0f; // the infinite key element makes its logit +inf: every output NaN, as full_cache
    v[3 * dim + 40] = std::numeric_limits<float>::quiet_NaN(); // token 3: quantized, value group 1 of 2
    k[55 * dim + 1] = std::numeric_limits<float>::infinity();   // token 55: in the residual
    kvc::kivi_rows h = make_head(layout_of(quant_format::int2_asym, 32, 16, 0), dim, k, v);
    ASSERT_EQ(h.quantized_tokens(), 32u);
    std::vector<float> sv(60 * dim);
    h.decode_values(reference(), 0, 60, sv.data());
    for (std::size_t i = 0; i < 60 * dim; ++i) EXPECT_EQ(std::isnan(sv[i]), i / dim == 3 && i % dim >= 32) << i;
    std::vector<float> sk(60 * dim);
    h.decode_keys(reference(), 0, 60, sk.data());
    EXPECT_TRUE(std::isinf(sk[55 * dim + 1]));
    for (const kk::kernel_table* table : tables_under_test()) {
        const auto out = attend_head(*table, h, q, 1);
        for (float x : out) EXPECT_TRUE(std::isnan(x));
    }
}

// ---------------------------------------------------------------------------
// Eviction.

// compacted(): kept sinks and kept residual tokens that stay in the residual
// are bit-exact; re-blocked tokens are within half the new block's step of
// their old stored value rounded to fp16; attention over the compacted head
// equals the oracle over exactly its stored values.
TEST(KiviRows, CompactedReblocksKeptTokens) {
    const std::size_t dim = 128, n = 400;
    rng_type rng(306);
    std::vector<float> k, v;
    outlier_data(n, dim, rng, k, v);
    std::vector<float> q(4 * dim);
    fill_normal(q.data(), q.size(), rng);
    for (quant_format f : {quant_format::int4_asym, quant_format::int2_asym}) {
        SCOPED_TRACE(kk::info_of(f).name);
        const kvc::kivi_rows h = make_head(layout_of(f, 32, 64, 3), dim, k, v);
        std::vector<float> old_k(n * dim), old_v(n * dim);
        h.decode_keys(reference(), 0, n, old_k.data());
        h.decode_values(reference(), 0, n, old_v.data());
        for (std::size_t keep_every : {2, 3, 7}) {
            SCOPED_TRACE(keep_every);
            std::vector<std::uint32_t> kept = {1};
            for (std::size_t t = 3; t < n; ++t)
                if (t % keep_every == 0 || t + 20 >= n) kept.push_back(static_cast<std::uint32_t>(t));
            const kvc::kivi_rows c = h.compacted(kept.data(), kept.size());
            ASSERT_EQ(c.tokens(), kept.size());
            EXPECT_EQ(c.sink_tokens(), 1u);
            EXPECT_LE(c.residual_tokens(), 64u + 32u - 1);
            const std::size_t body = kept.size() - 1;
            EXPECT_EQ(c.blocks(), body >= 96 ? (body - 64) / 32 : 0);
            std::vector<float> new_k(kept.size() * dim), new_v(kept.size() * dim);
            c.decode_keys(reference(), 0, kept.size(), new_k.data());
            c.decode_values(reference(), 0, kept.size(), new_v.data());
            const std::size_t old_residual_start = 3 + h.quantized_tokens();
            for (std::size_t i = 0; i < kept.size(); ++i) {
                const std::size_t t = kept[i];
                const bool in_new_residual = i >= 1 + c.quantized_tokens();
                for (std::size_t d = 0; d < dim; ++d) {
                    const float ok = old_k[t * dim + d], nk = new_k[i * dim + d];
                    const float ov = old_v[t * dim + d], nv = new_v[i * dim + d];
                    if (i == 0 || (in_new_residual && t >= old_residual_start)) {
                        ASSERT_EQ(nk, ok) << i;
                        ASSERT_EQ(nv, ov) << i;
                    } else if (in_new_residual) { // quantized before, now fp16 of the element value
                        ASSERT_EQ(nk, kvc::to_float(kvc::to_half(ok)));
                        ASSERT_EQ(nv, kvc::to_float(kvc::to_half(ov)));
                    } else {
                        const float step = factors_of(c, i - 1, d).scale;
                        ASSERT_LE(std::fabs(nk - kvc::to_float(kvc::to_half(ok))), 0.5f * step) << i << ' ' << d;
                        // values: the row rule of Q1, within d / 2 of the fp16 input, with d the
                        // group's range / levels rounded up to fp16 (at most 2^-10 relative)
                        const double levels = f == quant_format::int4_asym ? 15.0 : 3.0;
                        double lo = INFINITY, hi = -INFINITY;
                        for (std::size_t e = d / 32 * 32; e < d / 32 * 32 + 32; ++e) {
                            const double x = kvc::to_float(kvc::to_half(old_v[t * dim + e]));
                            lo = std::min(lo, x), hi = std::max(hi, x);
                        }
                        ASSERT_LE(std::fabs(nv - kvc::to_float(kvc::to_half(ov))),
                                  0.5 * (hi - lo) / levels * (1.0 + 0x1p-10) * (1.0 + 0x1p-23));
                    }
                }
            }
            const sequence seq = sequence_of(c);
            for (const kk::kernel_table* table : tables_under_test()) {
                SCOPED_TRACE(kvc::name_of(table->arch));
                const auto out = attend_head(*table, c, q, 4);
                for (std::size_t g = 0; g < 4; ++g) {
                    const head_oracle o = attend_oracle(seq, kept.size(), q.data() + g * dim, 0.125f);
                    EXPECT_TRUE(within("out", out.data() + g * dim, dim, [&](std::size_t d) { return o.out[d]; },
                                       [&](std::size_t d) { return o.out_bound(d); }));
                    EXPECT_LE(relative_error(out.data() + g * dim, o.out), 2e-5);
                }
            }
        }
    }
}

// Eviction through compressed_cache (which compacts with compacted()).
TEST(KiviCodec, EvictionRunsOnKiviStorage) {
    const auto c = shape(2, 2, 64);
    const std::size_t tokens = 300, row = c.kv_heads * c.head_dim;
    const auto keys = random_floats(tokens * row, 83), values = random_floats(tokens * row, 84);
    using evicting = kvc::compressed_cache<kvc::evict::knorm, kvc::merge::none, q::kivi<4, 32, 32, 2>, kvc::project::none>;
    evicting cache(c, kvc::evict::knorm(kvc::evict::budget::absolute(120, 4, 8)));
    cache.append(0, token_major(keys.data(), tokens, 2, 64), token_major(values.data(), tokens, 2, 64), 0);
    const std::size_t before = cache.bytes();
    cache.compress();
    EXPECT_LT(cache.bytes(), before);
    for (std::size_t h = 0; h < 2; ++h) ASSERT_EQ(cache.tokens(0, h), 120u);
    const auto queries = random_floats(c.query_heads * 64, 85);
    std::vector<float> out(c.query_heads * 64);
    cache.attend(0, queries.data(), out.data());
    EXPECT_LE(worst_head_error(c, out.data(), oracle_over_stored(c, stored_heads(cache), queries.data(), 120)), 2e-5);
    // Appending after compaction keeps the rule.
    cache.append(0, token_major(keys.data(), 50, 2, 64), token_major(values.data(), 50, 2, 64), 300);
    EXPECT_LE(cache.head(0, 0).residual_tokens(), 32u + 32u - 1);
}

// ---------------------------------------------------------------------------
// Fidelity against full_cache (fp32) with outlier channels.

template <class Q>
double error_against_full(const std::vector<float>& keys, const std::vector<float>& values,
                          const std::vector<float>& queries, std::size_t tokens, std::size_t steps) {
    auto c = shape(4, 4, 128);
    c.storage = kvc::dtype::f32;
    return kvc_test::mean_error_against_full(quant_cache<Q>(c), keys, values, queries, tokens, steps);
}

TEST(KiviCodec, PerChannelKeysBeatPerTokenKeysOnOutlierChannels) {
    const std::size_t tokens = 1024, steps = 16, row = 4 * 128;
    auto keys = random_floats(tokens * row, 86), values = random_floats(tokens * row, 87);
    // Four fixed channels per head 10x larger, in keys and values (as bench/quant.cpp's fidelity data).
    const std::size_t outliers[] = {3, 50, 77, 120};
    for (std::size_t i = 0; i < keys.size(); i += 128)
        for (std::size_t c : outliers) {
            keys[i + c] *= 10.0f;
            values[i + c] *= 10.0f;
        }
    const auto queries = random_floats(steps * 16 * 128, 88);
    // R = 0: no fp16 window, so only the key grouping differs from block<int4_asym, 32>
    // (KIVI's value rows are exactly that codec's rows).
    const double kivi4 = error_against_full<q::kivi<4, 32, 0>>(keys, values, queries, tokens, steps);
    const double kivi2 = error_against_full<q::kivi<2, 32, 0>>(keys, values, queries, tokens, steps);
    const double per_token4 = error_against_full<q::block<q::int4_asym, 32>>(keys, values, queries, tokens, steps);
    const double kivi4_r = error_against_full<q::kivi<4>>(keys, values, queries, tokens, steps);
    const double kivi2_r = error_against_full<q::kivi<2>>(keys, values, queries, tokens, steps);
    std::cout << "[ kvc      ] relative error vs full_cache f32 (outlier channels): kivi<4,32,R=0> " << kivi4
              << ", kivi<2,32,R=0> " << kivi2 << ", block<int4_asym,32> " << per_token4 << ", kivi<4> (R=128) "
              << kivi4_r << ", kivi<2> (R=128) " << kivi2_r << std::endl;
    EXPECT_LT(kivi4, per_token4);
    EXPECT_LT(kivi4, kivi2);
    EXPECT_LT(kivi4_r, kivi2_r);
    EXPECT_LE(kivi4_r, kivi4); // the fp16 window only removes error
}

} // namespace
