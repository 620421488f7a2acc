// Decode attention (attend_partial + finalize), chunked causal prefill and the
// attention mass statistics, on every instruction set this CPU supports and
// for the three storage formats, against the scalar reference and against a
// double-precision oracle (kernel_test_util.hpp) that computes
// softmax(scale q.k + bias) @ V directly from the stored (exactly dequantized)
// rows.
//
// Tolerances:
// - The issue fixes ||out - exact|| / ||exact|| <= 1e-5 per head for logits of
//   ordinary size. Rounding errors in the logits (random walks of ~sqrt(dim)
//   roundings of unit size) and in the T-term weighted sum (~sqrt(T) u) stay
//   around 1e-6 for dim <= 256 and T ~ 1000; the worst observed error is
//   printed by each test.
// - Every element is also held to the rigorous bound of attend_oracle
//   (|out_d - exact_d| <= rho * sum_t p_t |v_td|), which is what the
//   large-logit tests rely on: there the logits themselves carry absolute
//   rounding errors of order u * |logit| * dim that no implementation avoids.
// - Logits: |logit - exact| <= gamma_n(dim + 2) (|scale| sum|q k| + |bias|).
// - Kernel vs reference: twice the bound against the oracle (both are within it).
// - Mass: sum over heads (and queries) of the probability bounds, plus
//   gamma_n(additions + 1) for accumulating into mass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "kernel_test_util.hpp"

namespace {

using namespace kvc_test;

constexpr double required_relative_error = 1e-5;
const std::uint32_t sentinel_bits = 0x7fbadbadu; // a NaN kernels must never write

std::vector<std::size_t> head_dims() {
    std::vector<std::size_t> dims = {8, 12, 24, 40, 64, 72, 96, 100, 128, 136, 200, 256};
    rng_type rng(20);
    for (int i = 0; i < 3; ++i) dims.push_back(8 + rng() % 249);
    return dims;
}

struct decode_shape {
    std::size_t dim = 0, tokens = 0, group = 1;
    std::size_t key_pad = 0, value_pad = 0, query_pad = 0, logits_pad = 0;
    bool bias = false, logits = true;
    float scale = 1.0f;
    std::size_t key_dim = 0; // the problem's key_dim (0: keys as wide as values)
};

std::string describe_shape(const decode_shape& s) {
    return "dim=" + std::to_string(s.dim) + " tokens=" + std::to_string(s.tokens) + " group=" + std::to_string(s.group) +
           " key_stride=dim+" + std::to_string(s.key_pad) + " value_stride=dim+" + std::to_string(s.value_pad) +
           " query_stride=dim+" + std::to_string(s.query_pad) + (s.bias ? " bias" : "") + (s.logits ? " logits" : "");
}

// Every head dim with every group size 1..8; token counts rotate through odd,
// batch-boundary and block-boundary (64) values so each appears with many dims
// and groups. Strides are dim plus 0..5 elements; bases sit an odd number of
// elements past a 64-byte boundary (decode_case).
std::vector<decode_shape> decode_shapes() {
    const std::size_t token_counts[] = {1, 3, 63, 64, 65, 127, 129, 1000, 2, 17, 200, 513};
    constexpr std::size_t count = sizeof token_counts / sizeof token_counts[0];
    rng_type rng(21);
    std::vector<decode_shape> shapes;
    const auto dims = head_dims();
    for (std::size_t i = 0; i < dims.size(); ++i)
        for (std::size_t group = 1; group <= 8; ++group) {
            decode_shape s;
            s.dim = dims[i];
            s.group = group;
            s.tokens = token_counts[(i * 8 + group * 5) % count];
            s.key_pad = rng() % 6;
            s.value_pad = rng() % 6;
            s.query_pad = rng() % 4;
            s.logits_pad = rng() % 4;
            s.bias = rng() % 2 == 0;
            s.logits = rng() % 3 != 0;
            // From nearly uniform to sharply peaked attention.
            s.scale = std::uniform_real_distribution<float>(0.5f, 3.0f)(rng) / std::sqrt(static_cast<float>(s.dim));
            shapes.push_back(s);
        }
    return shapes;
}

// The data of one decode problem, its oracle per head, and the reference run.
struct decode_case {
    decode_shape shape;
    dtype type;
    rows keys, values;
    query_buffers queries;
    aligned_array<float> bias;
    sequence seq;
    std::vector<head_oracle> oracle;

    decode_case(const decode_shape& s, dtype t, rng_type& rng)
        : shape(s), type(t), keys(t, s.tokens, s.dim, s.dim + s.key_pad, odd_offset(rng)),
          values(t, s.tokens, s.dim, s.dim + s.value_pad, odd_offset(rng)),
          queries(s.group, s.dim, s.query_pad, odd_offset(rng)), bias(s.bias ? s.tokens : 0, odd_offset(rng)) {
        fill_normal(keys, rng);
        fill_normal(values, rng);
        for (std::size_t g = 0; g < s.group; ++g) fill_normal(queries.head(g), s.dim, rng);
        // Biases as in zero_merge: log of a slot's count, count 1 .. 16.
        for (std::size_t t = 0; t < bias.size(); ++t) bias[t] = std::log(static_cast<float>(1 + rng() % 16));
        seq.append(keys, values, 0, s.tokens, s.bias ? bias.data() : nullptr);
        compute_oracle();
    }

    void compute_oracle() {
        oracle.clear();
        for (std::size_t g = 0; g < shape.group; ++g)
            oracle.push_back(attend_oracle(seq, seq.tokens(), queries.head(g), shape.scale));
    }

    kk::decode_problem problem() const {
        kk::decode_problem p;
        p.keys = keys.data();
        p.values = values.data();
        p.key_stride = keys.stride();
        p.value_stride = values.stride();
        p.tokens = shape.tokens;
        p.dim = shape.dim;
        p.group = shape.group;
        p.queries = queries.head(0);
        p.query_stride = queries.stride;
        p.scale = shape.scale;
        p.bias = shape.bias ? bias.data() : nullptr;
        p.key_dim = shape.key_dim;
        return p;
    }
};

struct decode_result {
    std::vector<float> out;     // [group][dim]
    std::vector<float> max, sum;
    std::size_t logits_stride = 0;
    aligned_array<float> logits; // [group][logits_stride], padding keeps the sentinel
};

decode_result run_decode(const kk::kernel_table& table, const decode_case& c) {
    const decode_shape& s = c.shape;
    decode_result r;
    state_buffers state(s.group, s.dim, 3);
    kk::decode_problem p = c.problem();
    if (s.logits) {
        r.logits_stride = s.tokens + s.logits_pad;
        r.logits = aligned_array<float>((s.group - 1) * r.logits_stride + s.tokens, 5);
        r.logits.fill(float_of(sentinel_bits));
        p.logits = r.logits.data();
        p.logits_stride = r.logits_stride;
    }
    table.attend_partial[slot(c.type)](p, state.view());
    r.out = state.finalize();
    r.max.assign(state.max.data(), state.max.data() + s.group);
    r.sum.assign(state.sum.data(), state.sum.data() + s.group);
    return r;
}

// Worst relative error (vs the oracle) seen per arch, printed at the end of a test.
class error_log {
public:
    explicit error_log(const char* what) : what_(what) {}
    void add(arch_id arch, double relative) { worst_[kvc::name_of(arch)] = std::max(worst_[kvc::name_of(arch)], relative); }
    ~error_log() {
        std::cout << "[ kvc      ] " << what_ << ": worst ||out - exact|| / ||exact||:";
        for (const auto& [arch, worst] : worst_) std::cout << ' ' << arch << ' ' << std::setprecision(3) << worst;
        std::cout << std::endl;
    }

private:
    const char* what_;
    std::map<std::string, double> worst_;
};

// Output of every head against the oracle: norm-relative 1e-5 (when
// `check_norm`) and the elementwise rigorous bound.
void expect_matches_oracle(const std::vector<head_oracle>& oracle, const float* out, std::size_t out_head_stride,
                           std::size_t dim, error_log* log, arch_id arch, bool check_norm = true) {
    for (std::size_t g = 0; g < oracle.size(); ++g) {
        SCOPED_TRACE("head " + std::to_string(g));
        const head_oracle& o = oracle[g];
        const float* head = out + g * out_head_stride;
        EXPECT_TRUE(all_finite(head, dim));
        EXPECT_TRUE(within("out", head, dim, [&](std::size_t d) { return o.out[d]; },
                           [&](std::size_t d) { return o.out_bound(d); }));
        const double relative = relative_error(head, o.out);
        if (log != nullptr) log->add(arch, relative);
        if (check_norm) {
            EXPECT_LE(relative, required_relative_error);
        }
    }
}

// Reported logits of every head: against the oracle, and the state's max is the
// largest of them.
void expect_logits_match(const std::vector<head_oracle>& oracle, const float* logits, std::size_t stride,
                         std::size_t first, std::size_t count) {
    for (std::size_t g = 0; g < oracle.size(); ++g) {
        SCOPED_TRACE("head " + std::to_string(g));
        const head_oracle& o = oracle[g];
        EXPECT_TRUE(within("logit", logits + g * stride, count, [&](std::size_t t) { return o.logit[first + t]; },
                           [&](std::size_t t) { return o.logit_err[first + t]; }));
    }
}

// mass[t] from accumulate_mass against sum_g p_gt; the mass sums to `group`.
void expect_mass_matches(const std::vector<head_oracle>& oracle, const float* mass, std::size_t tokens) {
    const std::size_t group = oracle.size();
    std::vector<double> exact(tokens, 0.0), bound(tokens, 0.0);
    for (const head_oracle& o : oracle)
        for (std::size_t t = 0; t < tokens; ++t) {
            exact[t] += o.prob[t];
            bound[t] += o.prob_bound(t) + gamma_n(static_cast<double>(group) + 1.0) * o.prob[t] * (1.0 + o.rho);
        }
    double total = 0.0, total_bound = 0.0;
    for (std::size_t t = 0; t < tokens; ++t) {
        total += mass[t];
        total_bound += bound[t];
    }
    EXPECT_TRUE(within("mass", mass, tokens, [&](std::size_t t) { return exact[t]; }, [&](std::size_t t) { return bound[t]; }));
    EXPECT_LE(std::fabs(total - static_cast<double>(group)), total_bound) << "sum of mass " << total;
}

std::vector<float> decode_mass(const decode_result& r, std::size_t group, std::size_t tokens) {
    std::vector<float> mass(tokens, 0.0f);
    kk::common::accumulate_mass<kk::reference_arch>(r.logits.data(), r.logits_stride, group, tokens, r.max.data(),
                                                    r.sum.data(), mass.data());
    return mass;
}

// ---------------------------------------------------------------------------

TEST(AttendPartial, MatchesOracleAndReferenceOnRandomShapes) {
    const auto tables = tables_under_test();
    error_log log("decode, random shapes");
    rng_type rng(22);
    for (dtype type : all_dtypes)
        for (const decode_shape& shape : decode_shapes()) {
            SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " " + describe_shape(shape));
            const decode_case c(shape, type, rng);
            const decode_result ref = run_decode(reference(), c);
            for (const kk::kernel_table* table : tables) {
                SCOPED_TRACE(std::string("arch=") + kvc::name_of(table->arch));
                const int before = failures_so_far();
                const decode_result got = run_decode(*table, c);
                expect_matches_oracle(c.oracle, got.out.data(), shape.dim, shape.dim, &log, table->arch);
                for (std::size_t g = 0; g < shape.group; ++g) {
                    const head_oracle& o = c.oracle[g];
                    EXPECT_TRUE(within("out vs reference", got.out.data() + g * shape.dim, shape.dim,
                                       [&](std::size_t d) { return ref.out[g * shape.dim + d]; },
                                       [&](std::size_t d) { return 2.0 * o.out_bound(d); }));
                }
                if (shape.logits) {
                    expect_logits_match(c.oracle, got.logits.data(), got.logits_stride, 0, shape.tokens);
                    for (std::size_t g = 0; g < shape.group; ++g) {
                        const float* row = got.logits.data() + g * got.logits_stride;
                        EXPECT_EQ(got.max[g], *std::max_element(row, row + shape.tokens)) << "head " << g;
                        EXPECT_TRUE(within("logit vs reference", row, shape.tokens,
                                           [&](std::size_t t) { return ref.logits[g * ref.logits_stride + t]; },
                                           [&](std::size_t t) { return 2.0 * c.oracle[g].logit_err[t]; }));
                        for (std::size_t t = shape.tokens; t < got.logits_stride && g + 1 < shape.group; ++t)
                            EXPECT_EQ(bits_of(row[t]), sentinel_bits) << "logits padding written at " << t;
                    }
                    const std::vector<float> mass = decode_mass(got, shape.group, shape.tokens);
                    expect_mass_matches(c.oracle, mass.data(), shape.tokens);
                }
                if (failures_so_far() - before > 0) return; // one failing shape says enough
            }
        }
}

// Keys stored narrower than values (P3's pruned key channels): with key_dim
// set, a logit reads the first key_dim elements of the query and the key row
// and nothing past them (NaN there), while values keep every element. The
// oracle sees the same keys with zeros past key_dim.
TEST(AttendPartial, KeyDimReadsOnlyThatManyKeyElements) {
    const auto tables = tables_under_test();
    error_log log("decode, keys narrower than values");
    rng_type rng(31);
    std::size_t cases = 0;
    for (dtype type : all_dtypes)
        for (decode_shape shape : decode_shapes()) {
            if (rng() % 3 != 0) continue; // a third of the shapes, on every format
            shape.key_dim = 1 + rng() % shape.dim;
            SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " " + describe_shape(shape) +
                         " key_dim=" + std::to_string(shape.key_dim));
            decode_case c(shape, type, rng);
            for (std::size_t t = 0; t < shape.tokens; ++t)
                for (std::size_t d = shape.key_dim; d < shape.dim; ++d) c.keys.set(t, d, 0.0f);
            c.seq = sequence();
            c.seq.append(c.keys, c.values, 0, shape.tokens, shape.bias ? c.bias.data() : nullptr);
            c.compute_oracle();
            for (std::size_t t = 0; t < shape.tokens; ++t)
                for (std::size_t d = shape.key_dim; d < shape.dim; ++d)
                    c.keys.set(t, d, std::numeric_limits<float>::quiet_NaN());
            ++cases;
            const int before = failures_so_far();
            expect_matches_oracle(c.oracle, run_decode(reference(), c).out.data(), shape.dim, shape.dim, &log,
                                  reference().arch);
            for (const kk::kernel_table* table : tables) {
                SCOPED_TRACE(std::string("arch=") + kvc::name_of(table->arch));
                const decode_result got = run_decode(*table, c);
                expect_matches_oracle(c.oracle, got.out.data(), shape.dim, shape.dim, &log, table->arch);
                if (shape.logits) expect_logits_match(c.oracle, got.logits.data(), got.logits_stride, 0, shape.tokens);
            }
            if (failures_so_far() - before > 0) return;
        }
    EXPECT_GT(cases, 30u);
}

// Exact arithmetic: small integers in q and k, scale a power of two and biases
// with few bits make every partial sum exact, so every arch must report the
// logits scale * q.k + bias exactly, in any summation order.
TEST(AttendPartial, LogitsAreExactlyScaledDotPlusBiasWhenArithmeticIsExact) {
    rng_type rng(23);
    std::uniform_int_distribution<int> small(-8, 8);
    for (dtype type : all_dtypes)
        for (std::size_t dim : {8, 12, 40, 100, 256})
            for (std::size_t group : {1, 3, 5, 8}) {
                const std::size_t tokens = 67 + dim % 13;
                SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " dim=" + std::to_string(dim) +
                             " group=" + std::to_string(group));
                rows keys(type, tokens, dim, dim + 3, 1), values(type, tokens, dim, dim + 1, 3);
                query_buffers q(group, dim, 2, 5);
                std::vector<float> bias(tokens);
                for (std::size_t t = 0; t < tokens; ++t) {
                    for (std::size_t d = 0; d < dim; ++d) {
                        keys.set(t, d, static_cast<float>(small(rng)));
                        values.set(t, d, static_cast<float>(small(rng)));
                    }
                    bias[t] = static_cast<float>(small(rng)) * 0.25f;
                }
                for (std::size_t g = 0; g < group; ++g)
                    for (std::size_t d = 0; d < dim; ++d) q.head(g)[d] = static_cast<float>(small(rng));
                const float scale = 0.0625f;
                for (const kk::kernel_table* table : tables_under_test()) {
                    SCOPED_TRACE(kvc::name_of(table->arch));
                    state_buffers state(group, dim);
                    std::vector<float> logits(group * tokens);
                    kk::decode_problem p;
                    p.keys = keys.data();
                    p.values = values.data();
                    p.key_stride = keys.stride();
                    p.value_stride = values.stride();
                    p.tokens = tokens;
                    p.dim = dim;
                    p.group = group;
                    p.queries = q.head(0);
                    p.query_stride = q.stride;
                    p.scale = scale;
                    p.bias = bias.data();
                    p.logits = logits.data();
                    p.logits_stride = tokens;
                    table->attend_partial[slot(type)](p, state.view());
                    int mismatches = 0;
                    for (std::size_t g = 0; g < group; ++g)
                        for (std::size_t t = 0; t < tokens && mismatches < 3; ++t) {
                            double dot = 0.0;
                            for (std::size_t d = 0; d < dim; ++d) dot += q.head(g)[d] * keys.get(t, d);
                            const double want = scale * dot + bias[t];
                            if (logits[g * tokens + t] != want) {
                                ++mismatches;
                                ADD_FAILURE() << "logit(" << g << ", " << t << ") = " << logits[g * tokens + t]
                                              << ", expected " << want;
                            }
                        }
                }
            }
}

// A strong bias on one token makes it dominate; a bias on every token equal to
// a constant changes nothing. Both against the oracle with bias.
TEST(AttendPartial, BiasIsAddedToTheLogits) {
    rng_type rng(24);
    error_log log("decode, bias");
    for (dtype type : all_dtypes) {
        decode_shape shape;
        shape.dim = 72;
        shape.tokens = 129;
        shape.group = 5;
        shape.key_pad = 3;
        shape.value_pad = 1;
        shape.bias = true;
        shape.scale = 1.0f / std::sqrt(72.0f);
        decode_case c(shape, type, rng);
        for (std::size_t t = 0; t < shape.tokens; ++t) c.bias[t] = 0.0f;
        c.bias[77] = 30.0f; // e^30: token 77 takes all but ~1e-11 of the mass
        c.seq = sequence();
        c.seq.append(c.keys, c.values, 0, shape.tokens, c.bias.data());
        c.compute_oracle();
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(describe(*table, type));
            const decode_result got = run_decode(*table, c);
            expect_matches_oracle(c.oracle, got.out.data(), shape.dim, shape.dim, &log, table->arch);
            expect_logits_match(c.oracle, got.logits.data(), got.logits_stride, 0, shape.tokens);
            // The other 128 tokens share at most 128 e^(-30 + 2 max|logit|) < 1e-7 of the mass.
            for (std::size_t g = 0; g < shape.group; ++g)
                for (std::size_t d = 0; d < shape.dim; ++d)
                    EXPECT_NEAR(got.out[g * shape.dim + d], c.values.get(77, d), 1e-6 * (1.0 + std::fabs(c.values.get(77, d))));
        }
        // Constant bias: the oracle and the outputs do not move beyond rounding.
        for (std::size_t t = 0; t < shape.tokens; ++t) c.bias[t] = 2.5f;
        c.seq = sequence();
        c.seq.append(c.keys, c.values, 0, shape.tokens, c.bias.data());
        c.compute_oracle();
        for (const kk::kernel_table* table : tables_under_test()) {
            SCOPED_TRACE(describe(*table, type) + " constant bias");
            const decode_result got = run_decode(*table, c);
            expect_matches_oracle(c.oracle, got.out.data(), shape.dim, shape.dim, &log, table->arch);
        }
    }
}

// Flash-decoding: the tokens split into segments of different lengths, folded
// one after the other into the same state, give the one-call result and the
// oracle; logits and bias are indexed per segment.
TEST(AttendPartial, SegmentsFoldIntoOneStateLikeOneCall) {
    struct split_shape {
        std::size_t dim, tokens, group;
        bool bias;
    };
    const split_shape shapes[] = {{64, 1000, 3, true}, {100, 513, 5, false}, {128, 200, 8, true},
                                  {40, 129, 1, true},  {256, 65, 4, false},  {12, 300, 7, true}};
    const std::size_t lengths[] = {1, 63, 64, 65, 7, 129, 2, 200, 3};
    rng_type rng(25);
    error_log log("decode, split into segments");
    for (dtype type : all_dtypes)
        for (const split_shape& ss : shapes) {
            decode_shape shape;
            shape.dim = ss.dim;
            shape.tokens = ss.tokens;
            shape.group = ss.group;
            shape.key_pad = 1 + rng() % 5;
            shape.value_pad = rng() % 5;
            shape.query_pad = 1;
            shape.bias = ss.bias;
            shape.logits = true;
            shape.scale = 1.5f / std::sqrt(static_cast<float>(ss.dim));
            SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " " + describe_shape(shape));
            const decode_case c(shape, type, rng);
            for (const kk::kernel_table* table : tables_under_test()) {
                SCOPED_TRACE(std::string("arch=") + kvc::name_of(table->arch));
                const decode_result whole = run_decode(*table, c);

                state_buffers state(shape.group, shape.dim, 5);
                decode_result split;
                split.logits_stride = shape.tokens;
                split.logits = aligned_array<float>(shape.group * shape.tokens, 1);
                std::size_t start = 0, segments = 0;
                for (std::size_t i = 0; start < shape.tokens; ++i) {
                    const std::size_t count = std::min(lengths[i % 9], shape.tokens - start);
                    kk::decode_problem p = c.problem();
                    p.keys = c.keys.row(start);
                    p.values = c.values.row(start);
                    p.tokens = count;
                    if (p.bias != nullptr) p.bias += start;
                    p.logits = split.logits.data() + start;
                    p.logits_stride = split.logits_stride;
                    table->attend_partial[slot(type)](p, state.view());
                    start += count;
                    ++segments;
                }
                split.out = state.finalize();
                split.max.assign(state.max.data(), state.max.data() + shape.group);
                split.sum.assign(state.sum.data(), state.sum.data() + shape.group);
                SCOPED_TRACE(std::to_string(segments) + " segments");

                expect_matches_oracle(c.oracle, split.out.data(), shape.dim, shape.dim, &log, table->arch);
                expect_logits_match(c.oracle, split.logits.data(), split.logits_stride, 0, shape.tokens);
                for (std::size_t g = 0; g < shape.group; ++g)
                    EXPECT_TRUE(within("split vs one call", split.out.data() + g * shape.dim, shape.dim,
                                       [&](std::size_t d) { return whole.out[g * shape.dim + d]; },
                                       [&](std::size_t d) { return 2.0 * c.oracle[g].out_bound(d); }));
                // The mass of the whole sequence from the segments' logits and the final state.
                const std::vector<float> mass = decode_mass(split, shape.group, shape.tokens);
                expect_mass_matches(c.oracle, mass.data(), shape.tokens);
            }
        }
}

// A compressed cache attends over segments stored in different formats (e.g.
// an fp16 or bf16 body and an fp32 window) with one state.
TEST(AttendPartial, SegmentsOfDifferentStorageFormatsShareOneState) {
    const std::size_t dim = 96, group = 3;
    struct part {
        dtype type;
        std::size_t tokens;
    };
    const part parts[] = {{dtype::f16, 600}, {dtype::bf16, 333}, {dtype::f32, 65}};
    rng_type rng(26);
    std::vector<rows> keys, values;
    sequence seq;
    std::vector<float> bias;
    for (const part& pt : parts) {
        keys.emplace_back(pt.type, pt.tokens, dim, dim + 5, odd_offset(rng));
        values.emplace_back(pt.type, pt.tokens, dim, dim + 2, odd_offset(rng));
        fill_normal(keys.back(), rng);
        fill_normal(values.back(), rng);
        const std::size_t first = bias.size();
        for (std::size_t t = 0; t < pt.tokens; ++t) bias.push_back(std::log(static_cast<float>(1 + rng() % 8)));
        seq.append(keys.back(), values.back(), 0, pt.tokens, bias.data() + first);
    }
    query_buffers q(group, dim, 3, 1);
    for (std::size_t g = 0; g < group; ++g) fill_normal(q.head(g), dim, rng);
    const float scale = 2.0f / std::sqrt(static_cast<float>(dim));
    std::vector<head_oracle> oracle;
    for (std::size_t g = 0; g < group; ++g) oracle.push_back(attend_oracle(seq, seq.tokens(), q.head(g), scale));

    error_log log("decode, mixed storage formats");
    for (const kk::kernel_table* table : tables_under_test()) {
        SCOPED_TRACE(kvc::name_of(table->arch));
        state_buffers state(group, dim);
        std::vector<float> logits(group * seq.tokens());
        std::size_t start = 0;
        for (std::size_t i = 0; i < 3; ++i) {
            kk::decode_problem p;
            p.keys = keys[i].data();
            p.values = values[i].data();
            p.key_stride = keys[i].stride();
            p.value_stride = values[i].stride();
            p.tokens = parts[i].tokens;
            p.dim = dim;
            p.group = group;
            p.queries = q.head(0);
            p.query_stride = q.stride;
            p.scale = scale;
            p.bias = bias.data() + start;
            p.logits = logits.data() + start;
            p.logits_stride = seq.tokens();
            table->attend_partial[slot(parts[i].type)](p, state.view());
            start += parts[i].tokens;
        }
        const std::vector<float> out = state.finalize();
        expect_matches_oracle(oracle, out.data(), dim, dim, &log, table->arch);
        expect_logits_match(oracle, logits.data(), seq.tokens(), 0, seq.tokens());
        std::vector<float> mass(seq.tokens(), 0.0f);
        kk::common::accumulate_mass<kk::reference_arch>(logits.data(), seq.tokens(), group, seq.tokens(), state.max.data(),
                                                        state.sum.data(), mass.data());
        expect_mass_matches(oracle, mass.data(), seq.tokens());
    }
}

// Logits of magnitude 80 .. 500 (and beyond): exp of them would overflow float,
// so only the running max keeps the softmax finite. The output must be finite,
// match the oracle within the rigorous bound (the logits alone carry errors
// ~ u * dim * |logit| here, far above 1e-5 of anything), and match, much more
// tightly, the softmax of the logits the kernel itself reported.
TEST(AttendPartial, LargeLogitsDoNotOverflow) {
    enum class kind { sharp, high_plateau, low_plateau, large_bias };
    const char* names[] = {"logits ~ N(0, 300^2)", "logits ~ 400 +- 3", "logits ~ -400 +- 3", "bias in [80, 500]"};
    rng_type rng(27);
    error_log log("decode, large logits (vs own logits)");
    for (dtype type : all_dtypes)
        for (kind k : {kind::sharp, kind::high_plateau, kind::low_plateau, kind::large_bias})
            for (std::size_t dim : {64, 100})
                for (std::size_t tokens : {65, 1000}) {
                    decode_shape shape;
                    shape.dim = dim;
                    shape.tokens = tokens;
                    shape.group = 3;
                    shape.key_pad = 1;
                    shape.value_pad = 2;
                    shape.bias = k == kind::large_bias;
                    shape.scale = 1.0f / std::sqrt(static_cast<float>(dim));
                    SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " " + names[static_cast<int>(k)] + " " +
                                 describe_shape(shape));
                    decode_case c(shape, type, rng);
                    if (k == kind::sharp)
                        for (std::size_t g = 0; g < shape.group; ++g)
                            for (std::size_t d = 0; d < dim; ++d) c.queries.head(g)[d] *= 300.0f;
                    if (k == kind::high_plateau || k == kind::low_plateau) {
                        // Queries close to head 0's, keys k_t = m + noise with m parallel
                        // to it: scale * <q, k_t> is about +-400 (+- a few) for each head.
                        std::vector<double> mean(dim, 0.0);
                        for (std::size_t g = 1; g < shape.group; ++g)
                            for (std::size_t d = 0; d < dim; ++d)
                                c.queries.head(g)[d] = c.queries.head(0)[d] + 0.3f * c.queries.head(g)[d];
                        double norm2 = 0.0;
                        for (std::size_t d = 0; d < dim; ++d) {
                            mean[d] = c.queries.head(0)[d];
                            norm2 += mean[d] * mean[d];
                        }
                        const double target = k == kind::high_plateau ? 400.0 : -400.0;
                        const double factor = target / (shape.scale * norm2);
                        for (std::size_t t = 0; t < tokens; ++t)
                            for (std::size_t d = 0; d < dim; ++d)
                                c.keys.set(t, d, static_cast<float>(factor * mean[d] + c.keys.get(t, d)));
                    }
                    if (k == kind::large_bias)
                        for (std::size_t t = 0; t < tokens; ++t)
                            c.bias[t] = std::uniform_real_distribution<float>(80.0f, 500.0f)(rng);
                    c.seq = sequence();
                    c.seq.append(c.keys, c.values, 0, tokens, shape.bias ? c.bias.data() : nullptr);
                    c.compute_oracle();
                    double magnitude = 0.0;
                    for (const head_oracle& o : c.oracle)
                        for (double l : o.logit) magnitude = std::max(magnitude, std::fabs(l));
                    EXPECT_GT(magnitude, 80.0); // the data does what the test claims
                    if (k == kind::high_plateau || k == kind::low_plateau) {
                        for (const head_oracle& o : c.oracle)
                            for (double l : o.logit) EXPECT_TRUE(std::fabs(l) > 300.0 && std::fabs(l) < 500.0) << l;
                    }

                    for (const kk::kernel_table* table : tables_under_test()) {
                        SCOPED_TRACE(std::string("arch=") + kvc::name_of(table->arch));
                        const decode_result got = run_decode(*table, c);
                        expect_matches_oracle(c.oracle, got.out.data(), dim, dim, nullptr, table->arch, false);
                        expect_logits_match(c.oracle, got.logits.data(), got.logits_stride, 0, tokens);
                        std::vector<head_oracle> own;
                        for (std::size_t g = 0; g < shape.group; ++g) {
                            EXPECT_TRUE(std::isfinite(got.max[g]) && std::isfinite(got.sum[g]) && got.sum[g] >= 0.999f)
                                << "head " << g << " max " << got.max[g] << " sum " << got.sum[g];
                            own.push_back(attend_oracle(c.seq, tokens, c.queries.head(g), shape.scale,
                                                        got.logits.data() + g * got.logits_stride));
                        }
                        expect_matches_oracle(own, got.out.data(), dim, dim, &log, table->arch, false);
                        const std::vector<float> mass = decode_mass(got, shape.group, tokens);
                        expect_mass_matches(c.oracle, mass.data(), tokens);
                    }
                }
}

// tokens == 0 leaves the state (and the logits) untouched, whatever it holds;
// finalize of a state that saw no token gives zeros.
TEST(AttendPartial, EmptyInputLeavesStateUntouchedAndFinalizesToZero) {
    rng_type rng(28);
    for (const kk::kernel_table* table : tables_under_test())
        for (dtype type : all_dtypes)
            for (std::size_t group : {1, 3, 8}) {
                SCOPED_TRACE(describe(*table, type) + " group=" + std::to_string(group));
                const std::size_t dim = 40;
                query_buffers q(group, dim, 1, 1);
                for (std::size_t g = 0; g < group; ++g) fill_normal(q.head(g), dim, rng);
                float logits[8] = {};
                for (float& l : logits) l = float_of(sentinel_bits);
                kk::decode_problem p;
                p.keys = nullptr; // must not be touched
                p.values = nullptr;
                p.key_stride = p.value_stride = dim;
                p.tokens = 0;
                p.dim = dim;
                p.group = group;
                p.queries = q.head(0);
                p.query_stride = q.stride;
                p.scale = 0.5f;
                p.logits = logits;
                p.logits_stride = 1;

                // A fresh state stays fresh and finalizes to zeros.
                state_buffers fresh(group, dim);
                table->attend_partial[slot(type)](p, fresh.view());
                for (std::size_t g = 0; g < group; ++g) {
                    EXPECT_EQ(fresh.max[g], -std::numeric_limits<float>::infinity());
                    EXPECT_EQ(bits_of(fresh.sum[g]), 0u);
                }
                for (float x : fresh.finalize()) EXPECT_EQ(bits_of(x), 0u);
                for (float l : logits) EXPECT_EQ(bits_of(l), sentinel_bits);

                // A state in the middle of an attention keeps every bit.
                state_buffers busy(group, dim);
                for (std::size_t g = 0; g < group; ++g) {
                    busy.max[g] = std::normal_distribution<float>(0.0f, 5.0f)(rng);
                    busy.sum[g] = 1.0f + static_cast<float>(rng() % 100);
                }
                fill_normal(busy.acc.data(), group * dim, rng);
                std::vector<float> before(busy.acc.data(), busy.acc.data() + group * dim);
                before.insert(before.end(), busy.max.data(), busy.max.data() + group);
                before.insert(before.end(), busy.sum.data(), busy.sum.data() + group);
                table->attend_partial[slot(type)](p, busy.view());
                std::vector<float> after(busy.acc.data(), busy.acc.data() + group * dim);
                after.insert(after.end(), busy.max.data(), busy.max.data() + group);
                after.insert(after.end(), busy.sum.data(), busy.sum.data() + group);
                for (std::size_t i = 0; i < before.size(); ++i) EXPECT_EQ(bits_of(after[i]), bits_of(before[i])) << i;
            }
}

// ---------------------------------------------------------------------------
// Prefill

struct prefill_shape {
    std::size_t dim, tokens, chunk, group;
};

// Queries (i, g) and outputs (i, g) interleaved as [chunk][group][dim] with
// padding between heads and between tokens.
TEST(Prefill, CausalChunkMatchesOracleAndMassSumsToChunkTimesGroup) {
    const prefill_shape shapes[] = {
        {40, 65, 65, 3},  // the whole prompt in one chunk: query 0 sees one row
        {128, 200, 17, 5}, {100, 129, 1, 8}, {72, 1000, 3, 2}, {256, 64, 63, 1},
        {12, 300, 64, 4},  {8, 7, 7, 7},     {136, 127, 33, 6}, {24, 3, 2, 3},
    };
    rng_type rng(29);
    error_log log("prefill");
    for (dtype type : all_dtypes)
        for (const prefill_shape& s : shapes)
            for (bool with_mass : {true, false}) {
                SCOPED_TRACE(std::string("dtype=") + kvc::name_of(type) + " dim=" + std::to_string(s.dim) +
                             " tokens=" + std::to_string(s.tokens) + " chunk=" + std::to_string(s.chunk) +
                             " group=" + std::to_string(s.group) + (with_mass ? " mass" : ""));
                rows keys(type, s.tokens, s.dim, s.dim + 1 + rng() % 4, odd_offset(rng));
                rows values(type, s.tokens, s.dim, s.dim + rng() % 4, odd_offset(rng));
                fill_normal(keys, rng);
                fill_normal(values, rng);
                const std::size_t q_head = s.dim + 1, q_token = s.group * q_head + 3;
                const std::size_t o_head = s.dim + 2, o_token = s.group * o_head + 1;
                aligned_array<float> queries((s.chunk - 1) * q_token + (s.group - 1) * q_head + s.dim, odd_offset(rng));
                queries.fill(std::numeric_limits<float>::quiet_NaN());
                for (std::size_t i = 0; i < s.chunk; ++i)
                    for (std::size_t g = 0; g < s.group; ++g) fill_normal(queries.data() + i * q_token + g * q_head, s.dim, rng);
                const float scale = 1.5f / std::sqrt(static_cast<float>(s.dim));
                std::vector<float> initial_mass(s.tokens);
                for (float& m : initial_mass) m = static_cast<float>(rng() % 1000) / 1000.0f;

                sequence seq;
                seq.append(keys, values, 0, s.tokens, nullptr);
                std::vector<std::vector<head_oracle>> oracle(s.chunk); // [i][g]
                for (std::size_t i = 0; i < s.chunk; ++i)
                    for (std::size_t g = 0; g < s.group; ++g)
                        oracle[i].push_back(attend_oracle(seq, s.tokens - s.chunk + i + 1,
                                                          queries.data() + i * q_token + g * q_head, scale));
                std::vector<double> mass_exact(initial_mass.begin(), initial_mass.end()), mass_bound(s.tokens, 0.0);
                for (std::size_t i = 0; i < s.chunk; ++i)
                    for (const head_oracle& o : oracle[i])
                        for (std::size_t t = 0; t < o.tokens; ++t) {
                            mass_exact[t] += o.prob[t];
                            mass_bound[t] += o.prob_bound(t) + gamma_n(static_cast<double>(s.chunk * s.group) + 1.0) *
                                                                   o.prob[t] * (1.0 + o.rho);
                        }
                for (std::size_t t = 0; t < s.tokens; ++t)
                    mass_bound[t] += gamma_n(static_cast<double>(s.chunk * s.group) + 1.0) * initial_mass[t];

                struct run {
                    aligned_array<float> out, mass;
                };
                auto prefill = [&](const kk::kernel_table& table) {
                    run r{aligned_array<float>((s.chunk - 1) * o_token + (s.group - 1) * o_head + s.dim, odd_offset(rng)),
                          aligned_array<float>(s.tokens, odd_offset(rng))};
                    r.out.fill(float_of(sentinel_bits));
                    std::copy(initial_mass.begin(), initial_mass.end(), r.mass.data());
                    aligned_array<float> workspace(kk::prefill_workspace_floats(s.group, s.dim, s.tokens, with_mass), 1);
                    kk::prefill_problem p;
                    p.keys = keys.data();
                    p.values = values.data();
                    p.key_stride = keys.stride();
                    p.value_stride = values.stride();
                    p.tokens = s.tokens;
                    p.chunk = s.chunk;
                    p.dim = s.dim;
                    p.group = s.group;
                    p.queries = queries.data();
                    p.query_token_stride = q_token;
                    p.query_head_stride = q_head;
                    p.out = r.out.data();
                    p.out_token_stride = o_token;
                    p.out_head_stride = o_head;
                    p.scale = scale;
                    p.mass = with_mass ? r.mass.data() : nullptr;
                    table.prefill[slot(type)](p, workspace.data());
                    return r;
                };
                const run ref = prefill(reference());
                for (const kk::kernel_table* table : tables_under_test()) {
                    SCOPED_TRACE(std::string("arch=") + kvc::name_of(table->arch));
                    const int before = failures_so_far();
                    const run got = prefill(*table);
                    for (std::size_t i = 0; i < s.chunk; ++i) {
                        SCOPED_TRACE("query " + std::to_string(i) + " sees " + std::to_string(s.tokens - s.chunk + i + 1) +
                                     " rows");
                        expect_matches_oracle(oracle[i], got.out.data() + i * o_token, o_head, s.dim, &log, table->arch);
                        for (std::size_t g = 0; g < s.group; ++g) {
                            const float* head = got.out.data() + i * o_token + g * o_head;
                            EXPECT_TRUE(within("out vs reference", head, s.dim,
                                               [&](std::size_t d) { return ref.out[i * o_token + g * o_head + d]; },
                                               [&](std::size_t d) { return 2.0 * oracle[i][g].out_bound(d); }));
                            // Padding between heads and tokens is not written.
                            const std::size_t pad_end = g + 1 < s.group ? o_head : (i + 1 < s.chunk ? o_token - g * o_head : s.dim);
                            for (std::size_t d = s.dim; d < pad_end; ++d)
                                EXPECT_EQ(bits_of(head[d]), sentinel_bits) << "out padding written at " << d;
                        }
                    }
                    if (with_mass) {
                        EXPECT_TRUE(within("mass", got.mass.data(), s.tokens, [&](std::size_t t) { return mass_exact[t]; },
                                           [&](std::size_t t) { return mass_bound[t]; }));
                        double added = 0.0, bound = 0.0;
                        for (std::size_t t = 0; t < s.tokens; ++t) {
                            added += static_cast<double>(got.mass[t]) - initial_mass[t];
                            bound += mass_bound[t];
                        }
                        EXPECT_LE(std::fabs(added - static_cast<double>(s.chunk * s.group)), bound)
                            << "mass added " << added << ", expected chunk * group = " << s.chunk * s.group;
                    } else {
                        for (std::size_t t = 0; t < s.tokens; ++t) EXPECT_EQ(got.mass[t], initial_mass[t]);
                    }
                    if (failures_so_far() - before > 0) return;
                }
            }
}

} // namespace
