// Fused attention over packed rows (quant attend_partial and prefill) on every
// instruction set this CPU supports and on the portable (NEON) code path,
// against a double-precision oracle that uses the exact element values of the
// packed rows (dequantized by the reference) and the fp16 sink rows, and
// against the scalar reference.
//
// Keys of the integer formats are scored against the int8 query of
// quant_common::quantize_query: the oracle then uses that dequantized query
// (dequantized_query, written out independently in quant_test_util.hpp) for
// the packed rows, the fp32 query for the fp16 sink rows; a separate test
// bounds the difference to the fp32-query scores.
//
// Since the oracle sees exactly the values the kernels widen in registers,
// the only difference left is float rounding, and the tolerances are those of
// attention_test.cpp (kernel_test_util.hpp has the error model): every output
// element within attend_oracle's rigorous bound, norm-relative error <= 2e-5
// per head, logits within gamma_n(dim + 2) (|scale| sum |q k| + |bias|), kernel
// vs reference within twice the bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "quant_test_util.hpp"

namespace {

using namespace kvc_test;

constexpr double required_relative_error = 2e-5;
const std::uint32_t sentinel_bits = 0x7fbadbadu;

struct quant_shape {
    quant_format key_format, value_format;
    std::size_t group_size, dim, group, tokens, sinks;
    bool bias, logits;
    float scale;
};

std::string describe(const quant_shape& s) {
    return std::string("K ") + name_of(s.key_format) + " V " + name_of(s.value_format) + " G=" +
           std::to_string(s.group_size) + " dim=" + std::to_string(s.dim) + " group=" + std::to_string(s.group) +
           " tokens=" + std::to_string(s.tokens) + " sinks=" + std::to_string(s.sinks) + (s.bias ? " bias" : "") +
           (s.logits ? " logits" : "");
}

std::vector<quant_shape> shapes() {
    std::vector<std::pair<quant_format, quant_format>> pairs;
    for (quant_format f : all_formats) pairs.emplace_back(f, f);
    pairs.emplace_back(quant_format::int8_sym, quant_format::int4_sym);
    pairs.emplace_back(quant_format::int4_sym, quant_format::int2_asym);
    pairs.emplace_back(quant_format::fp8_e4m3, quant_format::int4_asym);
    pairs.emplace_back(quant_format::int2_asym, quant_format::fp8_e5m2);
    const std::size_t token_counts[] = {1, 2, 63, 64, 65, 130, 257, 17};
    const std::size_t sink_counts[] = {0, 0, 1, 4};
    rng_type rng(201);
    std::vector<quant_shape> out;
    std::size_t i = 0;
    for (const auto& [k, v] : pairs)
        for (std::size_t g : all_group_sizes)
            for (std::size_t variant = 0; variant < 3; ++variant, ++i) {
                quant_shape s;
                s.key_format = k;
                s.value_format = v;
                s.group_size = g;
                std::vector<std::size_t> dims;
                for (std::size_t d : {32, 64, 96, 128, 192, 256})
                    if (d % g == 0) dims.push_back(d);
                s.dim = dims[(i * 7 + variant) % dims.size()];
                s.group = 1 + (i * 3 + variant) % 8;
                s.tokens = token_counts[(i * 5 + variant) % 8];
                s.sinks = sink_counts[(i + variant) % 4];
                s.bias = rng() % 2 == 0;
                s.logits = rng() % 3 != 0;
                s.scale = std::uniform_real_distribution<float>(0.5f, 3.0f)(rng) / std::sqrt(static_cast<float>(s.dim));
                out.push_back(s);
            }
    return out;
}

// One problem: fp16 sink rows, packed rows (reference quantizer), queries, and
// the oracle over the exact values.
struct quant_case {
    quant_shape shape;
    rows sink_keys, sink_values;
    std::size_t key_row_bytes, value_row_bytes;
    aligned_array<unsigned char> keys, values;
    query_buffers queries;
    aligned_array<float> bias;
    sequence seq;

    quant_case(const quant_shape& s, rng_type& rng)
        : shape(s), sink_keys(dtype::f16, s.sinks, s.dim, s.dim + 3, odd_offset(rng)),
          sink_values(dtype::f16, s.sinks, s.dim, s.dim + 3, 0),
          key_row_bytes(row_bytes(s.key_format, s.dim, s.group_size)),
          value_row_bytes(row_bytes(s.value_format, s.dim, s.group_size)),
          keys(s.tokens * key_row_bytes, odd_offset(rng)), values(s.tokens * value_row_bytes, odd_offset(rng)),
          queries(s.group, s.dim, rng() % 3, odd_offset(rng)), bias(s.bias ? s.sinks + s.tokens : 0, 1) {
        fill_normal(sink_keys, rng);
        fill_normal(sink_values, rng);
        // Keys with a few outlier channels, values Gaussian.
        std::vector<float> k(s.tokens * s.dim), v(s.tokens * s.dim);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (std::size_t i = 0; i < k.size(); ++i) k[i] = normal(rng) * (i % s.dim == 7 ? 8.0f : 1.0f);
        for (float& x : v) x = normal(rng);
        const packed_rows_data pk(s.key_format, s.tokens, s.dim, s.group_size, k);
        const packed_rows_data pv(s.value_format, s.tokens, s.dim, s.group_size, v);
        std::copy(pk.bytes.begin(), pk.bytes.end(), keys.data());
        std::copy(pv.bytes.begin(), pv.bytes.end(), values.data());
        for (std::size_t g = 0; g < s.group; ++g) fill_normal(queries.head(g), s.dim, rng);
        for (std::size_t t = 0; t < bias.size(); ++t) bias[t] = std::log(static_cast<float>(1 + rng() % 16));

        seq.dim = s.dim;
        for (std::size_t t = 0; t < s.sinks; ++t)
            for (std::size_t d = 0; d < s.dim; ++d) {
                seq.k.push_back(sink_keys.get(t, d));
                seq.v.push_back(sink_values.get(t, d));
            }
        for (std::size_t i = 0; i < s.tokens * s.dim; ++i) {
            seq.k.push_back(pk.values[i]);
            seq.v.push_back(pv.values[i]);
        }
        if (s.bias) seq.bias.assign(bias.data(), bias.data() + bias.size());
    }

    std::size_t total() const { return shape.sinks + shape.tokens; }

    // The query the packed rows are scored against (the dequantized int8 query
    // for integer key formats), and the oracle of head g over the first `prefix` rows.
    static std::vector<float> body_query(quant_format key_format, const float* q, std::size_t dim) {
        return quantizes_query(key_format) ? dequantized_query(q, dim) : std::vector<float>(q, q + dim);
    }
    head_oracle oracle(const float* q, std::size_t prefix) const {
        const std::vector<float> body = body_query(shape.key_format, q, shape.dim);
        return attend_oracle(seq, prefix, q, shape.scale, nullptr, body.data(), shape.sinks);
    }

    kk::quant_rows packed() const {
        kk::quant_rows r;
        r.keys = keys.data();
        r.values = values.data();
        r.key_row_bytes = key_row_bytes;
        r.value_row_bytes = value_row_bytes;
        r.key_format = shape.key_format;
        r.value_format = shape.value_format;
        r.group_size = shape.group_size;
        return r;
    }
    kk::dense_segment sink() const {
        kk::dense_segment d;
        d.keys = sink_keys.data();
        d.values = sink_values.data();
        d.stride = sink_keys.stride();
        d.tokens = shape.sinks;
        return d;
    }
    kk::quant_decode_problem problem() const {
        kk::quant_decode_problem p;
        p.sink = sink();
        p.rows = packed();
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

struct decode_result {
    std::vector<float> out, max, sum;
    std::size_t logits_stride = 0;
    aligned_array<float> logits;
};

decode_result run_decode(const kk::quant_kernels& k, const quant_case& c) {
    const quant_shape& s = c.shape;
    decode_result r;
    state_buffers state(s.group, s.dim, 3);
    kk::quant_decode_problem p = c.problem();
    if (s.logits) {
        r.logits_stride = c.total() + 2;
        r.logits = aligned_array<float>((s.group - 1) * r.logits_stride + c.total(), 5);
        r.logits.fill(float_of(sentinel_bits));
        p.logits = r.logits.data();
        p.logits_stride = r.logits_stride;
    }
    k.attend_partial(p, state.view());
    r.out = state.finalize();
    r.max.assign(state.max.data(), state.max.data() + s.group);
    r.sum.assign(state.sum.data(), state.sum.data() + s.group);
    return r;
}

class error_log {
public:
    explicit error_log(const char* what) : what_(what) {}
    void add(const std::string& table, double relative) { worst_[table] = std::max(worst_[table], relative); }
    ~error_log() {
        std::cout << "[ kvc      ] " << what_ << ": worst ||out - exact|| / ||exact||:";
        for (const auto& [table, worst] : worst_) std::cout << ' ' << table << ' ' << std::setprecision(3) << worst;
        std::cout << std::endl;
    }

private:
    const char* what_;
    std::map<std::string, double> worst_;
};

TEST(QuantAttendPartial, MatchesOracleOverExactValuesAndReference) {
    const auto tables = quant_tables_under_test();
    error_log log("quantized decode");
    rng_type rng(202);
    for (const quant_shape& shape : shapes()) {
        SCOPED_TRACE(describe(shape));
        const quant_case c(shape, rng);
        std::vector<head_oracle> oracle;
        for (std::size_t g = 0; g < shape.group; ++g)
            oracle.push_back(c.oracle(c.queries.head(g), c.total()));
        const decode_result ref = run_decode(quant_reference(), c);
        for (const quant_table& t : tables) {
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
                log.add(t.name, relative);
                EXPECT_LE(relative, required_relative_error);
                if (shape.logits) {
                    const float* row = got.logits.data() + g * got.logits_stride;
                    EXPECT_TRUE(within("logit", row, c.total(), [&](std::size_t i) { return o.logit[i]; },
                                       [&](std::size_t i) { return o.logit_err[i]; }));
                    EXPECT_EQ(got.max[g], *std::max_element(row, row + c.total()));
                    if (g + 1 < shape.group) {
                        for (std::size_t i = c.total(); i < got.logits_stride; ++i) {
                            EXPECT_EQ(bits_of(row[i]), sentinel_bits) << "logits padding written at " << i;
                        }
                    }
                }
            }
            if (failures_so_far() > before) return;
        }
    }
}

// The int8 query against the fp32 one. With a_p = max |q_j| over payload p,
// d_p = fl(a_p / 127), c_j = RNE(fl(q_j fl(127 / a_p))), q^_j = fl(d_p c_j):
// q^_j = q_j (1 + e)^4 + d_p r (1 + e) with |r| <= 1/2 and |e| <= u, so
//   |q_j - q^_j| <= (a_p / 254)(1 + 3u) + 4.01 u |q_j|
// and a packed row's logit moves from the fp32-query logit by at most
//   |scale| (sum_p (a_p / 254)(1 + 3u) sum_{j in p} |k_j| + 4.01 u sum_j |q_j k_j|),
// k the exact key values. Each kernel's logit is within the oracle's float
// error (logit_err, over q^) of the q^ logit, so within the sum of both of
// the fp32-query logit. The second check shows the quantization is visible
// (the bound is not met trivially by an unquantized query).
TEST(QuantAttendPartial, QuantizedQueryScoresWithinDerivedBoundOfFp32Query) {
    const auto tables = quant_tables_under_test();
    rng_type rng(205);
    const double u = unit_roundoff;
    for (quant_format key_format : all_formats) {
        if (!quantizes_query(key_format)) continue;
        for (std::size_t g : all_group_sizes) {
            const quant_shape shape{key_format, quant_format::int8_sym, g, 128, 4, 100, 3, true, true, 0.1f};
            SCOPED_TRACE(describe(shape));
            const quant_case c(shape, rng);
            for (const quant_table& t : tables) {
                SCOPED_TRACE(t.name);
                const decode_result got = run_decode(*t.kernels, c);
                double largest_excess = 0.0; // over the float error alone
                for (std::size_t h = 0; h < shape.group; ++h) {
                    const float* q = c.queries.head(h);
                    const head_oracle quantized = c.oracle(q, c.total());
                    const head_oracle fp32 = attend_oracle(c.seq, c.total(), q, shape.scale);
                    for (std::size_t i = shape.sinks; i < c.total(); ++i) {
                        const double* k = c.seq.k.data() + i * shape.dim;
                        double bound = 0.0, qk = 0.0;
                        for (std::size_t p = 0; p < shape.dim; p += 32) {
                            double a = 0.0, k_sum = 0.0;
                            for (std::size_t j = p; j < p + 32; ++j) {
                                a = std::max(a, std::fabs(static_cast<double>(q[j])));
                                k_sum += std::fabs(k[j]);
                                qk += std::fabs(q[j] * k[j]);
                            }
                            bound += a / 254.0 * (1.0 + 3.0 * u) * k_sum;
                        }
                        bound = std::fabs(shape.scale) * (bound + 4.01 * u * qk) + quantized.logit_err[i];
                        const double logit = got.logits[h * got.logits_stride + i];
                        const double error = std::fabs(logit - fp32.logit[i]);
                        EXPECT_LE(error, bound) << "head " << h << " token " << i;
                        largest_excess = std::max(largest_excess, error - fp32.logit_err[i]);
                    }
                }
                EXPECT_GT(largest_excess, 0.0) << "no token's score shows the query quantization";
            }
        }
    }
}

// Chaining: one call over (sinks + packed rows) equals a state folded first
// over the sinks (fp16 kernel) and then over the packed rows.
TEST(QuantAttendPartial, SinkSegmentChainsThroughTheRunningState) {
    rng_type rng(203);
    quant_shape s{quant_format::int4_sym, quant_format::int4_sym, 32, 128, 4, 100, 5, false, true, 0.09f};
    const quant_case c(s, rng);
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        state_buffers one(s.group, s.dim), two(s.group, s.dim);
        std::vector<float> logits_one(s.group * c.total()), logits_two(s.group * c.total());
        kk::quant_decode_problem p = c.problem();
        p.logits = logits_one.data();
        p.logits_stride = c.total();
        table->quant.attend_partial(p, one.view());

        kk::decode_problem d;
        d.keys = c.sink_keys.data();
        d.values = c.sink_values.data();
        d.key_stride = d.value_stride = c.sink_keys.stride();
        d.tokens = s.sinks;
        d.dim = s.dim;
        d.group = s.group;
        d.queries = c.queries.head(0);
        d.query_stride = c.queries.stride;
        d.scale = s.scale;
        d.logits = logits_two.data();
        d.logits_stride = c.total();
        table->attend_partial[slot(dtype::f16)](d, two.view());
        kk::quant_decode_problem body = c.problem();
        body.sink = kk::dense_segment{};
        body.logits = logits_two.data() + s.sinks; // packed rows' logits after the sinks'
        body.logits_stride = c.total();
        table->quant.attend_partial(body, two.view());

        EXPECT_EQ(one.finalize(), two.finalize());
        EXPECT_EQ(logits_one, logits_two);
    }
}

TEST(QuantPrefill, CausalChunksMatchOracleWithMass) {
    const auto tables = quant_tables_under_test();
    error_log log("quantized prefill");
    rng_type rng(204);
    const quant_shape base[] = {
        {quant_format::int4_sym, quant_format::int4_sym, 32, 64, 4, 40, 0, false, false, 0.15f},
        {quant_format::int8_sym, quant_format::int2_asym, 64, 128, 2, 70, 3, false, false, 0.1f},
        {quant_format::fp8_e4m3, quant_format::int4_asym, 32, 96, 3, 20, 6, false, false, 0.12f},
        {quant_format::int2_asym, quant_format::fp8_e5m2, 128, 128, 1, 33, 2, false, false, 0.08f},
    };
    for (const quant_shape& shape : base)
        for (std::size_t chunk : {std::size_t{1}, std::size_t{7}, shape.sinks + shape.tokens}) {
            SCOPED_TRACE(describe(shape) + " chunk=" + std::to_string(chunk));
            const quant_case c(shape, rng);
            const std::size_t total = c.total();
            const std::size_t qheads = shape.group;
            std::vector<float> queries(chunk * qheads * shape.dim);
            fill_normal(queries.data(), queries.size(), rng);
            std::vector<std::vector<head_oracle>> oracle(chunk);
            std::vector<double> exact_mass(total, 0.0), mass_bound(total, 1e-6 * chunk);
            for (std::size_t i = 0; i < chunk; ++i)
                for (std::size_t g = 0; g < qheads; ++g) {
                    const std::size_t prefix = total - chunk + i + 1;
                    oracle[i].push_back(c.oracle(queries.data() + (i * qheads + g) * shape.dim, prefix));
                    for (std::size_t t = 0; t < prefix; ++t) {
                        exact_mass[t] += oracle[i].back().prob[t];
                        mass_bound[t] += oracle[i].back().prob_bound(t) + 1e-6 * oracle[i].back().prob[t];
                    }
                }
            for (const quant_table& t : tables) {
                SCOPED_TRACE(t.name);
                kk::quant_prefill_problem p;
                p.sink = c.sink();
                p.rows = c.packed();
                p.tokens = shape.tokens;
                p.chunk = chunk;
                p.dim = shape.dim;
                p.group = qheads;
                p.queries = queries.data();
                p.query_token_stride = qheads * shape.dim;
                p.query_head_stride = shape.dim;
                std::vector<float> out(chunk * qheads * shape.dim), mass(total, 0.0f);
                p.out = out.data();
                p.out_token_stride = qheads * shape.dim;
                p.out_head_stride = shape.dim;
                p.scale = shape.scale;
                p.mass = mass.data();
                std::vector<float> workspace(kk::prefill_workspace_floats(qheads, shape.dim, total, true));
                t.kernels->prefill(p, workspace.data());
                for (std::size_t i = 0; i < chunk; ++i)
                    for (std::size_t g = 0; g < qheads; ++g) {
                        const head_oracle& o = oracle[i][g];
                        const float* head = out.data() + (i * qheads + g) * shape.dim;
                        EXPECT_TRUE(within("out", head, shape.dim, [&](std::size_t d) { return o.out[d]; },
                                           [&](std::size_t d) { return o.out_bound(d); }))
                            << "query " << i << " head " << g;
                        log.add(t.name, relative_error(head, o.out));
                    }
                EXPECT_TRUE(within("mass", mass.data(), total, [&](std::size_t i) { return exact_mass[i]; },
                                   [&](std::size_t i) { return mass_bound[i]; }));
            }
        }
}

} // namespace
