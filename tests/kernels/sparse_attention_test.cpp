// Sparse rows (Q10: bitmap + kept fp16 values): the encoder on hand-worked
// rows (selection, ties, NaN/Inf), identical bytes on every instruction set,
// and fused decode attention on every instruction set (and the portable --
// NEON -- code path) against a double-precision oracle over the exact stored
// element values and against the scalar reference. Tolerances are those of
// attention_test.cpp (kernel_test_util.hpp has the error model).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"
#include "kvc/kernels/simd/kernels.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace {

using namespace kvc_test;

struct sparse_table {
    std::string name;
    const kk::sparse_kernels* kernels;
};

std::vector<sparse_table> sparse_tables_under_test() {
    std::vector<sparse_table> tables;
    for (const kk::kernel_table* table : tables_under_test()) tables.push_back({kvc::name_of(table->arch), &table->sparse});
#if defined(__SSE2__) && KVC_X86_64
    static constexpr kk::sparse_kernels portable = kk::simd::make_sparse_kernels_of<xsimd::sse2, true>();
    tables.push_back({"portable(sse2)", &portable});
#endif
    return tables;
}

const kk::sparse_kernels& sparse_reference() { return kk::reference_table().sparse; }

std::vector<unsigned char> encode(const kk::sparse_kernels& k, const std::vector<float>& x, std::size_t kept) {
    std::vector<unsigned char> row(kk::sparse_row_bytes(x.size(), kept));
    k.encode_row[slot(dtype::f32)](x.data(), row.data(), x.size(), kept);
    return row;
}

std::uint16_t u16_at(const std::vector<unsigned char>& row, std::size_t byte) {
    return static_cast<std::uint16_t>(row[byte] | (row[byte + 1] << 8));
}

// ---------------------------------------------------------------------------
// Encoder.

TEST(SparseEncode, KeepsLargestMagnitudesTiesToLowerIndex) {
    // |x|: 4 at 1 and 4, 3 at 15, 2 at 2 and 6, then 1, 0.5 and zeros.
    std::vector<float> x(16, 0.0f);
    x[0] = 1.0f, x[1] = -4.0f, x[2] = 2.0f, x[4] = 4.0f, x[5] = 0.5f, x[6] = -2.0f, x[15] = 3.0f;
    for (const sparse_table& t : sparse_tables_under_test()) {
        SCOPED_TRACE(t.name);
        const auto three = encode(*t.kernels, x, 3);
        ASSERT_EQ(three.size(), 2u + 6u);
        EXPECT_EQ(three[0], 0x12); // elements 1 and 4
        EXPECT_EQ(three[1], 0x80); // element 15
        EXPECT_EQ(u16_at(three, 2), 0xc400); // -4
        EXPECT_EQ(u16_at(three, 4), 0x4400); // 4
        EXPECT_EQ(u16_at(three, 6), 0x4200); // 3
        // Four: the tie of |2| at elements 2 and 6 goes to element 2.
        const auto four = encode(*t.kernels, x, 4);
        EXPECT_EQ(four[0], 0x16);
        EXPECT_EQ(four[1], 0x80);
        EXPECT_EQ(u16_at(four, 2), 0xc400); // element order: -4, 2, 4, 3
        EXPECT_EQ(u16_at(four, 4), 0x4000);
        EXPECT_EQ(u16_at(four, 6), 0x4400);
        EXPECT_EQ(u16_at(four, 8), 0x4200);
        // Nine: all seven nonzeros and the two lowest-index zeros (3 and 7).
        const auto nine = encode(*t.kernels, x, 9);
        EXPECT_EQ(nine[0], 0xff);
        EXPECT_EQ(nine[1], 0x80);
        std::vector<float> decoded(16);
        t.kernels->decode_row(nine.data(), decoded.data(), 16);
        for (std::size_t i = 0; i < 16; ++i) EXPECT_EQ(decoded[i], x[i]) << i;
        t.kernels->decode_row(three.data(), decoded.data(), 16);
        for (std::size_t i = 0; i < 16; ++i)
            EXPECT_EQ(decoded[i], (i == 1 || i == 4 || i == 15) ? x[i] : 0.0f) << i;
    }
}

TEST(SparseEncode, NanAndInfinityRankAboveEveryNumber) {
    std::vector<float> x(32, 0.0f);
    for (std::size_t i = 0; i < 32; ++i) x[i] = 1000.0f + static_cast<float>(i);
    x[20] = std::numeric_limits<float>::quiet_NaN();
    x[9] = -std::numeric_limits<float>::infinity();
    x[3] = 1e6f; // beyond fp16: becomes +Inf, as full_cache's fp16 would store it
    for (const sparse_table& t : sparse_tables_under_test()) {
        SCOPED_TRACE(t.name);
        const auto row = encode(*t.kernels, x, 2);
        std::vector<float> decoded(32);
        t.kernels->decode_row(row.data(), decoded.data(), 32);
        EXPECT_TRUE(std::isnan(decoded[20]));
        // Two Inf (3 and 9) tie below NaN: the lower index wins.
        EXPECT_EQ(decoded[3], std::numeric_limits<float>::infinity());
        for (std::size_t i = 0; i < 32; ++i)
            if (i != 20 && i != 3) {
                EXPECT_EQ(decoded[i], 0.0f) << i;
            }
    }
}

// Every table writes the reference's bytes, from every source dtype, and
// decodes them to the same floats; keeping everything reproduces fp16.
TEST(SparseEncode, SameBytesOnEveryInstructionSetFromEveryDtype) {
    rng_type rng(301);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (std::size_t dim : {16, 48, 128, 256})
        for (dtype from : all_dtypes)
            for (std::size_t kept : {std::size_t{1}, dim / 4, dim / 2 + 3, dim}) {
                SCOPED_TRACE("dim " + std::to_string(dim) + " kept " + std::to_string(kept) + " from " +
                             std::to_string(slot(from)));
                std::vector<float> x(dim);
                for (std::size_t i = 0; i < dim; ++i) x[i] = normal(rng) * (i % 5 == 0 ? 0.001f : 1.0f);
                x[dim / 3] = x[dim / 2]; // an exact tie
                rows source(from, 1, dim, dim, 1);
                for (std::size_t i = 0; i < dim; ++i) source.set(0, i, x[i]);
                std::vector<unsigned char> want(kk::sparse_row_bytes(dim, kept));
                sparse_reference().encode_row[slot(from)](source.row(0), want.data(), dim, kept);
                std::vector<float> want_values(dim);
                sparse_reference().decode_row(want.data(), want_values.data(), dim);
                std::size_t nonzero_kept = 0;
                for (std::size_t i = 0; i < dim; ++i) {
                    const float h = kvc::to_float(kvc::to_half(static_cast<float>(source.get(0, i))));
                    if (want_values[i] != 0.0f) {
                        EXPECT_EQ(want_values[i], h) << i;
                        ++nonzero_kept;
                    }
                }
                EXPECT_LE(nonzero_kept, kept);
                for (const sparse_table& t : sparse_tables_under_test()) {
                    SCOPED_TRACE(t.name);
                    std::vector<unsigned char> got(want.size() + 8, 0xa5);
                    t.kernels->encode_row[slot(from)](source.row(0), got.data(), dim, kept);
                    EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin()));
                    for (std::size_t i = want.size(); i < got.size(); ++i) EXPECT_EQ(got[i], 0xa5) << "wrote past the row";
                    std::vector<float> values(dim);
                    t.kernels->decode_row(want.data(), values.data(), dim);
                    EXPECT_EQ(values, want_values);
                }
            }
}

// ---------------------------------------------------------------------------
// Attention.

TEST(SparseAttendPartial, HandWorkedTwoTokens) {
    // Keys (kept 3 of 16): token 0 keeps -4, 4, 3 (logit 3 with q = ones);
    // token 1 keeps 2, 1 and the zero at element 1 (logit 3). Values (kept 1):
    // 8 at element 2, and -6 at element 9. Equal weights: out[2] = 4, out[9] = -3.
    std::vector<float> k0(16, 0.0f), k1(16, 0.0f), v0(16, 0.25f), v1(16, 0.0f);
    k0[1] = -4.0f, k0[4] = 4.0f, k0[15] = 3.0f, k0[2] = 0.5f;
    k1[0] = 2.0f, k1[5] = 1.0f;
    v0[2] = 8.0f;
    v1[9] = -6.0f;
    std::vector<unsigned char> keys, values;
    for (const auto* k : {&k0, &k1}) {
        const auto row = encode(sparse_reference(), *k, 3);
        keys.insert(keys.end(), row.begin(), row.end());
    }
    for (const auto* v : {&v0, &v1}) {
        const auto row = encode(sparse_reference(), *v, 1);
        values.insert(values.end(), row.begin(), row.end());
    }
    const std::vector<float> q(16, 1.0f);
    for (const sparse_table& t : sparse_tables_under_test()) {
        SCOPED_TRACE(t.name);
        state_buffers state(1, 16);
        kk::sparse_decode_problem p;
        p.rows.keys = keys.data();
        p.rows.values = values.data();
        p.rows.key_row_bytes = kk::sparse_row_bytes(16, 3);
        p.rows.value_row_bytes = kk::sparse_row_bytes(16, 1);
        p.tokens = 2;
        p.dim = 16;
        p.queries = q.data();
        p.query_stride = 16;
        float logits[2];
        p.logits = logits;
        t.kernels->attend_partial(p, state.view());
        EXPECT_EQ(logits[0], 3.0f);
        EXPECT_EQ(logits[1], 3.0f);
        const auto out = state.finalize();
        for (std::size_t d = 0; d < 16; ++d) EXPECT_EQ(out[d], d == 2 ? 4.0f : (d == 9 ? -3.0f : 0.0f)) << d;
    }
}

struct sparse_shape {
    std::size_t dim, group, tokens, key_kept, value_kept;
    bool bias, logits;
    float scale;
};

std::string describe(const sparse_shape& s) {
    return "dim=" + std::to_string(s.dim) + " group=" + std::to_string(s.group) + " tokens=" + std::to_string(s.tokens) +
           " kept K " + std::to_string(s.key_kept) + " V " + std::to_string(s.value_kept) + (s.bias ? " bias" : "") +
           (s.logits ? " logits" : "");
}

std::vector<sparse_shape> shapes() {
    const std::size_t dims[] = {16, 32, 48, 64, 80, 128, 256};
    const std::size_t token_counts[] = {1, 2, 63, 64, 65, 130, 257, 17};
    const double fractions[] = {0.1, 0.3, 0.5, 0.75, 1.0};
    rng_type rng(302);
    std::vector<sparse_shape> out;
    for (std::size_t i = 0; i < 40; ++i) {
        sparse_shape s;
        s.dim = dims[i % 7];
        s.group = 1 + (i * 3) % 8;
        s.tokens = token_counts[(i * 5) % 8];
        s.key_kept = std::max<std::size_t>(1, static_cast<std::size_t>(fractions[i % 5] * s.dim));
        s.value_kept = std::max<std::size_t>(1, static_cast<std::size_t>(fractions[(i * 2 + 1) % 5] * s.dim));
        s.bias = rng() % 2 == 0;
        s.logits = rng() % 3 != 0;
        s.scale = std::uniform_real_distribution<float>(0.5f, 3.0f)(rng) / std::sqrt(static_cast<float>(s.dim));
        out.push_back(s);
    }
    return out;
}

// Rows encoded by the reference, with odd offsets and exact sizes (ASan sees overreads).
struct sparse_case {
    sparse_shape shape;
    std::size_t key_row_bytes, value_row_bytes;
    aligned_array<unsigned char> keys, values;
    query_buffers queries;
    aligned_array<float> bias;
    sequence seq;

    sparse_case(const sparse_shape& s, rng_type& rng)
        : shape(s), key_row_bytes(kk::sparse_row_bytes(s.dim, s.key_kept)),
          value_row_bytes(kk::sparse_row_bytes(s.dim, s.value_kept)), keys(s.tokens * key_row_bytes, odd_offset(rng)),
          values(s.tokens * value_row_bytes, odd_offset(rng)), queries(s.group, s.dim, rng() % 3, odd_offset(rng)),
          bias(s.bias ? s.tokens : 0, 1) {
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> k(s.dim), v(s.dim), decoded(s.dim);
        seq.dim = s.dim;
        for (std::size_t t = 0; t < s.tokens; ++t) {
            for (std::size_t d = 0; d < s.dim; ++d) k[d] = normal(rng) * (d % s.dim == 7 ? 8.0f : 1.0f);
            for (float& x : v) x = normal(rng);
            sparse_reference().encode_row[slot(dtype::f32)](k.data(), keys.data() + t * key_row_bytes, s.dim, s.key_kept);
            sparse_reference().encode_row[slot(dtype::f32)](v.data(), values.data() + t * value_row_bytes, s.dim,
                                                            s.value_kept);
            sparse_reference().decode_row(keys.data() + t * key_row_bytes, decoded.data(), s.dim);
            seq.k.insert(seq.k.end(), decoded.begin(), decoded.end());
            sparse_reference().decode_row(values.data() + t * value_row_bytes, decoded.data(), s.dim);
            seq.v.insert(seq.v.end(), decoded.begin(), decoded.end());
        }
        for (std::size_t g = 0; g < s.group; ++g) fill_normal(queries.head(g), s.dim, rng);
        for (std::size_t t = 0; t < bias.size(); ++t) bias[t] = std::log(static_cast<float>(1 + rng() % 16));
        if (s.bias) seq.bias.assign(bias.data(), bias.data() + bias.size());
    }

    kk::sparse_decode_problem problem() const {
        kk::sparse_decode_problem p;
        p.rows.keys = keys.data();
        p.rows.values = values.data();
        p.rows.key_row_bytes = key_row_bytes;
        p.rows.value_row_bytes = value_row_bytes;
        p.tokens = shape.tokens;
        p.dim = shape.dim;
        p.group = shape.group;
        p.queries = queries.head(0);
        p.query_stride = queries.stride;
        p.scale = shape.scale;
        p.bias = shape.bias ? bias.data() : nullptr;
        return p;
    }
};

const std::uint32_t sentinel_bits = 0x7fbadbadu;

struct decode_result {
    std::vector<float> out, max;
    std::size_t logits_stride = 0;
    aligned_array<float> logits;
};

decode_result run_decode(const kk::sparse_kernels& k, const sparse_case& c) {
    const sparse_shape& s = c.shape;
    decode_result r;
    state_buffers state(s.group, s.dim, 3);
    kk::sparse_decode_problem p = c.problem();
    if (s.logits) {
        r.logits_stride = s.tokens + 2;
        r.logits = aligned_array<float>((s.group - 1) * r.logits_stride + s.tokens, 5);
        r.logits.fill(float_of(sentinel_bits));
        p.logits = r.logits.data();
        p.logits_stride = r.logits_stride;
    }
    k.attend_partial(p, state.view());
    r.out = state.finalize();
    r.max.assign(state.max.data(), state.max.data() + s.group);
    return r;
}

TEST(SparseAttendPartial, MatchesOracleOverExactValuesAndReference) {
    const auto tables = sparse_tables_under_test();
    rng_type rng(303);
    double worst = 0.0;
    for (const sparse_shape& shape : shapes()) {
        SCOPED_TRACE(describe(shape));
        const sparse_case c(shape, rng);
        std::vector<head_oracle> oracle;
        for (std::size_t g = 0; g < shape.group; ++g)
            oracle.push_back(attend_oracle(c.seq, shape.tokens, c.queries.head(g), shape.scale));
        const decode_result ref = run_decode(sparse_reference(), c);
        for (const sparse_table& t : tables) {
            SCOPED_TRACE(t.name);
            const int before = failures_so_far();
            const decode_result got = run_decode(*t.kernels, c);
            for (std::size_t g = 0; g < shape.group; ++g) {
                SCOPED_TRACE("head " + std::to_string(g));
                const head_oracle& o = oracle[g];
                const float* head = got.out.data() + g * shape.dim;
                EXPECT_TRUE(all_finite(head, shape.dim));
                EXPECT_TRUE(within("out", head, shape.dim, [&](std::size_t d) { return o.out[d]; },
                                   [&](std::size_t d) { return o.out_bound(d); }));
                EXPECT_TRUE(within("out vs reference", head, shape.dim,
                                   [&](std::size_t d) { return ref.out[g * shape.dim + d]; },
                                   [&](std::size_t d) { return 2.0 * o.out_bound(d); }));
                const double relative = relative_error(head, o.out);
                worst = std::max(worst, relative);
                EXPECT_LE(relative, 2e-5);
                if (shape.logits) {
                    const float* row = got.logits.data() + g * got.logits_stride;
                    EXPECT_TRUE(within("logit", row, shape.tokens, [&](std::size_t i) { return o.logit[i]; },
                                       [&](std::size_t i) { return o.logit_err[i]; }));
                    EXPECT_EQ(got.max[g], *std::max_element(row, row + shape.tokens));
                    if (g + 1 < shape.group) {
                        for (std::size_t i = shape.tokens; i < got.logits_stride; ++i) {
                            EXPECT_EQ(bits_of(row[i]), sentinel_bits) << "logits padding written at " << i;
                        }
                    }
                }
            }
            if (failures_so_far() > before) return;
        }
    }
    std::cout << "[ kvc      ] sparse decode: worst ||out - exact|| / ||exact|| " << worst << std::endl;
}

} // namespace
