// P1 PCA projection (project::pca, storage/latent_rows.hpp, calibration/pca.hpp):
// latent attention is exact attention over the projected rows, rows in the
// span are kept, full rank is the full cache, calibration finds the span and
// is deterministic, bad bases are refused, and bytes() is the layout;
// latents kept by a quantizing codec attend exactly over what that codec
// decodes, a codec that cannot take rows of the rank is refused.
// P4 Loki (project::loki, storage/loki_rows.hpp): exact attention over the
// top-k tokens of the low-rank estimate, full attention when k is every token.
// P5 CSKV (project::cskv, storage/window_latent_rows.hpp): the window exact,
// older tokens as P1's latents, one softmax; a window as long as the
// sequence is the full cache; bytes() is the two branches' layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/pca.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/cskv.hpp"
#include "kvc/policy/projection/loki.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/latent_rows.hpp"
#include "kvc/storage/loki_rows.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using view = kvc::kv_view<const float>;
using pca_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<float>, kvc::project::pca>;
using loki_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<float>, kvc::project::loki>;

constexpr std::size_t layers = 2, kv_heads = 2, query_heads = 4, dim = 32, chunk = 64;

kvc::cache_config shape(kvc::dtype storage = kvc::dtype::f32, kvc::memory_resource* resource = nullptr) {
    return kvc_test::shape_of(layers, kv_heads, query_heads, dim, storage, resource);
}

// A dim x rank matrix with orthonormal columns (Gram-Schmidt in double), row-major.
std::vector<double> orthonormal(std::size_t rank, std::uint32_t seed) {
    const std::vector<float> g = random_floats(dim * rank, seed);
    std::vector<double> u(g.begin(), g.end());
    for (std::size_t j = 0; j < rank; ++j) {
        for (int pass = 0; pass < 2; ++pass) // twice: orthogonal to rounding
            for (std::size_t i = 0; i < j; ++i) {
                double dot = 0.0;
                for (std::size_t d = 0; d < dim; ++d) dot += u[d * rank + j] * u[d * rank + i];
                for (std::size_t d = 0; d < dim; ++d) u[d * rank + j] -= dot * u[d * rank + i];
            }
        double norm = 0.0;
        for (std::size_t d = 0; d < dim; ++d) norm += u[d * rank + j] * u[d * rank + j];
        for (std::size_t d = 0; d < dim; ++d) u[d * rank + j] /= std::sqrt(norm);
    }
    return u;
}

// Bases for every (layer, KV head): keys and values each their own random orthonormal matrix.
kvc::project::pca_bases random_bases(std::size_t rank, std::uint32_t seed) {
    kvc::project::pca_bases b{layers, kv_heads, dim, rank, {}, {}};
    for (std::size_t head = 0; head < layers * kv_heads; ++head)
        for (int which = 0; which < 2; ++which) {
            const std::vector<double> u = orthonormal(rank, seed + static_cast<std::uint32_t>(2 * head + which));
            std::vector<float>& to = which ? b.values : b.keys;
            to.insert(to.end(), u.begin(), u.end());
        }
    return b;
}

// Engine rows [tokens][kv_heads][dim]: random, or (span = true) each head's
// rows random combinations of the columns of its own basis.
std::vector<float> rows_of(const kvc::project::pca_bases& b, const std::vector<float>& basis, std::size_t layer,
                           std::size_t tokens, std::uint32_t seed, bool span) {
    std::vector<float> out = random_floats(tokens * kv_heads * dim, seed);
    if (!span) return out;
    const std::vector<float> c = random_floats(tokens * kv_heads * b.rank, seed + 1);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < kv_heads; ++h) {
            const float* u = basis.data() + (layer * kv_heads + h) * dim * b.rank;
            for (std::size_t d = 0; d < dim; ++d) {
                double x = 0.0;
                for (std::size_t j = 0; j < b.rank; ++j) x += double{u[d * b.rank + j]} * c[(t * kv_heads + h) * b.rank + j];
                out[(t * kv_heads + h) * dim + d] = static_cast<float>(x);
            }
        }
    return out;
}

// U U^T x for every row, in double (rounded to float once at the end).
std::vector<float> projected(const kvc::project::pca_bases& b, const std::vector<float>& basis, std::size_t layer,
                             const std::vector<float>& rows) {
    std::vector<float> out(rows.size());
    for (std::size_t t = 0; t < rows.size() / (kv_heads * dim); ++t)
        for (std::size_t h = 0; h < kv_heads; ++h) {
            const float* u = basis.data() + (layer * kv_heads + h) * dim * b.rank;
            const float* x = rows.data() + (t * kv_heads + h) * dim;
            std::vector<double> c(b.rank, 0.0);
            for (std::size_t d = 0; d < dim; ++d)
                for (std::size_t j = 0; j < b.rank; ++j) c[j] += double{u[d * b.rank + j]} * x[d];
            for (std::size_t d = 0; d < dim; ++d) {
                double y = 0.0;
                for (std::size_t j = 0; j < b.rank; ++j) y += double{u[d * b.rank + j]} * c[j];
                out[(t * kv_heads + h) * dim + d] = static_cast<float>(y);
            }
        }
    return out;
}

struct layer_data {
    std::vector<float> keys, values, queries;
};

// `tokens` tokens per layer: prefilled in chunks through attend_chunk (outputs
// checked against `check_chunk`), then decoded one by one (checked by `check_step`).
template <class Cache, class CheckChunk, class CheckStep>
void run(Cache& cache, const std::vector<layer_data>& data, std::size_t prompt, std::size_t tokens,
         CheckChunk&& check_chunk, CheckStep&& check_step) {
    const std::size_t row = kv_heads * dim, q = query_heads * dim;
    for (std::size_t l = 0; l < layers; ++l) {
        const layer_data& x = data[l];
        std::vector<float> out(chunk * q);
        for (std::size_t first = 0; first < prompt; first += chunk) {
            cache.append(l, view(x.keys.data() + first * row, chunk, kv_heads, dim),
                         view(x.values.data() + first * row, chunk, kv_heads, dim), static_cast<std::int64_t>(first));
            cache.attend_chunk(l, x.queries.data() + first * q, chunk, out.data());
            check_chunk(l, first, out);
        }
    }
    for (std::size_t t = prompt; t < tokens; ++t)
        for (std::size_t l = 0; l < layers; ++l) {
            const layer_data& x = data[l];
            cache.append(l, view(x.keys.data() + t * row, 1, kv_heads, dim),
                         view(x.values.data() + t * row, 1, kv_heads, dim), static_cast<std::int64_t>(t));
            std::vector<float> out(q);
            std::vector<float> mass(kv_heads * (t + 1));
            cache.attend(l, x.queries.data() + t * q, out.data(), mass.data());
            check_step(l, t, out, mass);
        }
}

std::vector<layer_data> draw(const kvc::project::pca_bases& b, std::size_t tokens, std::uint32_t seed, bool span) {
    std::vector<layer_data> data(layers);
    for (std::size_t l = 0; l < layers; ++l) {
        const std::uint32_t s = seed + 10 * static_cast<std::uint32_t>(l);
        data[l].keys = rows_of(b, b.keys, l, tokens, s, span);
        data[l].values = rows_of(b, b.values, l, tokens, s + 2, span);
        data[l].queries = random_floats(tokens * query_heads * dim, s + 4);
    }
    return data;
}

constexpr std::size_t prompt = 2 * chunk, total = prompt + 6;

// Runs `cache` and a full_cache over the same tokens and calls check(got,
// want) on each pair of outputs (every prefill chunk and decode step).
template <class Cache, class Check>
void against_full(Cache& cache, const std::vector<layer_data>& data, Check&& check) {
    kvc::full_cache full(shape());
    std::vector<std::vector<float>> got;
    auto keep = [&](auto, auto, const std::vector<float>& out, auto&&...) { got.push_back(out); };
    run(cache, data, prompt, total, keep, keep);
    std::size_t i = 0;
    auto compare = [&](auto, auto, const std::vector<float>& out, auto&&...) {
        SCOPED_TRACE(i);
        check(got[i++], out);
    };
    run(full, data, prompt, total, compare, compare);
}

auto near_full = [](const std::vector<float>& got, const std::vector<float>& want) {
    EXPECT_LT(kvc_test::relative_error(got, want), 1e-5);
};

// The promise of the latent space: decode and prefill outputs, and decode's
// attention mass, are those of exact attention (in double) over U_k U_k^T k
// and U_v U_v^T v, for random rows far from the span.
void check_latent_attention_on_active_arch() {
    const kvc::project::pca_bases b = random_bases(8, 100);
    const std::vector<layer_data> data = draw(b, total, 1, false);
    std::vector<std::vector<float>> keys(layers), values(layers);
    for (std::size_t l = 0; l < layers; ++l) {
        keys[l] = projected(b, b.keys, l, data[l].keys);
        values[l] = projected(b, b.values, l, data[l].values);
    }
    const kvc::cache_config c = shape();
    pca_cache cache(c, {}, {}, {}, kvc::project::pca(b));
    run(cache, data, prompt, total,
        [&](std::size_t l, std::size_t first, const std::vector<float>& out) {
            for (std::size_t i = 0; i < chunk; ++i) {
                const auto want = kvc_test::oracle_attention(c, keys[l], values[l], first + i + 1,
                                                             data[l].queries.data() + (first + i) * query_heads * dim);
                ASSERT_LT(kvc_test::worst_head_error(c, out.data() + i * query_heads * dim, want), 1e-5)
                    << "layer " << l << " chunk query " << first + i;
            }
        },
        [&](std::size_t l, std::size_t t, const std::vector<float>& out, const std::vector<float>& mass) {
            std::vector<double> want_mass;
            const auto want = kvc_test::oracle_attention(c, keys[l], values[l], t + 1,
                                                         data[l].queries.data() + t * query_heads * dim, &want_mass);
            ASSERT_LT(kvc_test::worst_head_error(c, out.data(), want), 1e-5) << "layer " << l << " token " << t;
            for (std::size_t i = 0; i < mass.size(); ++i) ASSERT_NEAR(mass[i], want_mass[i], 1e-5) << i;
        });
}

TEST(Pca, LatentAttentionIsExactAttentionOverTheProjectedRows) {
    kvc_test::on_every_arch([] { check_latent_attention_on_active_arch(); });
}

// The projection really drops what lies outside the span: the same rows
// through a full cache give a clearly different output (so the check above can fail).
TEST(Pca, RowsOutsideTheSpanAreNotKept) {
    const kvc::project::pca_bases b = random_bases(8, 100);
    pca_cache cache(shape(), {}, {}, {}, kvc::project::pca(b));
    against_full(cache, draw(b, total, 1, false), [](const std::vector<float>& got, const std::vector<float>& want) {
        EXPECT_GT(kvc_test::relative_error(got, want), 0.1);
    });
}

// Rows lying in the span are stored exactly (to rounding): attention equals
// the full cache's, and decode_keys / decode_values give the rows back.
TEST(Pca, RowsInTheSpanAreReproduced) {
    const kvc::project::pca_bases b = random_bases(8, 200);
    const std::vector<layer_data> data = draw(b, total, 2, true);
    pca_cache cache(shape(), {}, {}, {}, kvc::project::pca(b));
    against_full(cache, data, near_full);
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < kv_heads; ++h) {
            const kvc::latent_rows<>& rows = cache.head(l, h);
            ASSERT_EQ(rows.tokens(), total);
            std::vector<float> keys(total * dim), values(total * dim), want_keys(total * dim), want_values(total * dim);
            rows.decode_keys(k, 0, total, keys.data());
            rows.decode_values(k, 0, total, values.data());
            for (std::size_t t = 0; t < total; ++t)
                for (std::size_t d = 0; d < dim; ++d) {
                    want_keys[t * dim + d] = data[l].keys[(t * kv_heads + h) * dim + d];
                    want_values[t * dim + d] = data[l].values[(t * kv_heads + h) * dim + d];
                }
            EXPECT_LT(kvc_test::relative_error(keys, want_keys), 1e-6);
            EXPECT_LT(kvc_test::relative_error(values, want_values), 1e-6);
        }
}

// Rank = head_dim keeps every direction: the output is the full cache's, for any rows.
TEST(Pca, FullRankIsTheFullCache) {
    const kvc::project::pca_bases b = random_bases(dim, 300);
    const std::vector<layer_data> data = draw(b, total, 3, false);
    pca_cache cache(shape(), {}, {}, {}, kvc::project::pca(b));
    against_full(cache, data, near_full);
}

// Calibration: sample rows of each head spanning a 6-dimensional subspace
// (with distinct variances along it) give a rank-6 basis of exactly that
// subspace, energies descending and zero beyond it; the same samples give
// the same bytes; the artifact builds a policy whose cache keeps such rows.
TEST(PcaCalibration, FindsTheSpanDeterministically) {
    constexpr std::size_t span = 6, tokens = 400;
    const kvc::project::pca_bases truth = random_bases(span, 400);
    const kvc::cache_config c = shape();
    std::vector<std::vector<float>> keys(layers), values(layers);
    for (std::size_t l = 0; l < layers; ++l) {
        keys[l] = rows_of(truth, truth.keys, l, tokens, 40 + static_cast<std::uint32_t>(l), true);
        values[l] = rows_of(truth, truth.values, l, tokens, 50 + static_cast<std::uint32_t>(l), true);
    }
    auto calibrate = [&](std::size_t rank) {
        std::vector<view> k, v;
        for (std::size_t l = 0; l < layers; ++l) {
            k.emplace_back(keys[l].data(), tokens, kv_heads, dim);
            v.emplace_back(values[l].data(), tokens, kv_heads, dim);
        }
        return kvc::calibration::calibrate_pca(c, k, v, {rank});
    };
    const kvc::calibration::artifact a = calibrate(span), again = calibrate(span);
    EXPECT_EQ(kvc::calibration::serialize(a), kvc::calibration::serialize(again));
    const kvc::calibration::artifact whole = calibrate(0);
    const auto& energy = whole.get("key_energy", {layers, kv_heads, dim});
    for (std::size_t head = 0; head < layers * kv_heads; ++head) {
        for (std::size_t j = 1; j < dim; ++j)
            EXPECT_LE(energy.values[head * dim + j], energy.values[head * dim + j - 1]) << head << " " << j;
        EXPECT_GT(energy.values[head * dim + span - 1], 0.1);
        EXPECT_LT(energy.values[head * dim + span], 1e-6) << "energy outside the 6-dimensional span";
    }
    // Each true basis vector lies in the calibrated span: U U^T u = u.
    const kvc::project::pca learnt(kvc::calibration::deserialize(kvc::calibration::serialize(a).data(),
                                                                 kvc::calibration::serialize(a).size()));
    EXPECT_EQ(learnt.rank(), span);
    const auto& basis = a.get("key_basis", {layers, kv_heads, dim, span});
    for (std::size_t head = 0; head < layers * kv_heads; ++head)
        for (std::size_t i = 0; i < span; ++i) {
            std::vector<float> u(dim), got(dim);
            for (std::size_t d = 0; d < dim; ++d) u[d] = truth.keys[head * dim * span + d * span + i];
            std::vector<double> coordinates(span, 0.0);
            for (std::size_t d = 0; d < dim; ++d)
                for (std::size_t j = 0; j < span; ++j) coordinates[j] += basis.values[head * dim * span + d * span + j] * u[d];
            for (std::size_t d = 0; d < dim; ++d) {
                double x = 0.0;
                for (std::size_t j = 0; j < span; ++j) x += basis.values[head * dim * span + d * span + j] * coordinates[j];
                got[d] = static_cast<float>(x);
            }
            EXPECT_LT(kvc_test::relative_error(got, u), 1e-5) << "head " << head << " direction " << i;
        }
    // A rank asked beyond what the artifact holds is refused.
    EXPECT_THROW(kvc::project::pca(a, span + 1), kvc::error);
}

// Bad bases never make a policy or a cache: each throws kvc::error naming the problem.
TEST(Pca, BadBasesAreRefused) {
    const kvc::project::pca_bases good = random_bases(4, 500);
    auto with = [&](auto change) {
        kvc::project::pca_bases b = good;
        change(b);
        return kvc_test::error_of([&] { kvc::project::pca p(b); });
    };
    EXPECT_NE(with([](auto& b) { b.keys[0] *= 1.01f; }).find("not orthonormal"), std::string::npos);
    EXPECT_NE(with([](auto& b) { // column 1 of the last head's value basis tilted towards column 0
                  const std::size_t at = (layers * kv_heads - 1) * dim * 4;
                  for (std::size_t d = 0; d < dim; ++d) b.values[at + d * 4 + 1] += 0.01f * b.values[at + d * 4];
              }).find("value basis of layer 1, KV head 1 is not orthonormal"),
              std::string::npos);
    EXPECT_NE(with([](auto& b) { b.values[5] = NAN; }).find("expected finite"), std::string::npos);
    EXPECT_NE(with([](auto& b) { b.keys.pop_back(); }).find("floats of keys and of values"), std::string::npos);
    EXPECT_NE(with([](auto& b) { b.rank = 0; }).find("expected a rank in 1..32"), std::string::npos);
    EXPECT_NE(with([](auto& b) { b.rank = dim + 1; }).find("expected a rank"), std::string::npos);
    // Right bases, wrong cache: layer count, head count, head dim.
    for (auto change : {+[](kvc::cache_config& c) { c.layers = 3; }, +[](kvc::cache_config& c) { c.kv_heads = 1; c.query_heads = 2; },
                        +[](kvc::cache_config& c) { c.head_dim = 64; }}) {
        kvc::cache_config c = shape();
        change(c);
        EXPECT_NE(kvc_test::error_of([&] { pca_cache cache(c, {}, {}, {}, kvc::project::pca(good)); })
                      .find("the bases are for 2 layers x 2 KV heads x head_dim 32"),
                  std::string::npos);
    }
    kvc::calibration::artifact wrong_kind;
    wrong_kind.kind = "cq";
    EXPECT_THROW(kvc::project::pca{wrong_kind}, kvc::error);
}

// bytes() per head is exactly the layout at every rank (latents in the
// codec's element type, fp16 here, and the two fp32 bases), and the cache's
// bytes() is what its memory resource handed out.
TEST(Pca, BytesAreTheLayoutAtEveryRank) {
    using half_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>,
                                             kvc::project::pca>;
    constexpr std::size_t tokens = 100;
    const std::vector<float> keys = random_floats(tokens * kv_heads * dim, 7), values = random_floats(keys.size(), 8);
    for (std::size_t rank = 1; rank <= dim; ++rank) {
        SCOPED_TRACE(rank);
        kvc_test::counting_resource memory;
        half_cache cache(shape(kvc::dtype::f16, &memory), {}, {}, {}, kvc::project::pca(random_bases(rank, 600)));
        for (std::size_t l = 0; l < layers; ++l)
            cache.append(l, view(keys.data(), tokens, kv_heads, dim), view(values.data(), tokens, kv_heads, dim), 0);
        cache.shrink_to_fit();
        for (std::size_t l = 0; l < layers; ++l)
            for (std::size_t h = 0; h < kv_heads; ++h) {
                EXPECT_EQ(cache.head(l, h).bytes(), tokens * 2 * rank * sizeof(kvc::half) + 2 * dim * rank * sizeof(float));
                EXPECT_EQ(cache.head(l, h).bytes_per_token(), 2 * rank * sizeof(kvc::half));
            }
        EXPECT_EQ(cache.bytes(), memory.in_use);
    }
}

// ---------------------------------------------------------------------------
// Latents kept by a codec (Palu's latent quantization)

// Rank 32 of head_dim 32 (the codecs' groups are 32 wide; lower ranks at
// head_dim 64 are in conformance_test and registry_test). Latents in fp8
// blocks (keys scored against the fp32 query, so attention is exact over
// the decoded rows; the integer formats score a query rounded to int8,
// kernels/quant/common.hpp, which an exact oracle would have to copy), KIVI's
// 2 bits with a residual of 32 rows, and q8_0 (an fp16 scale and 32 codes:
// 34 bytes a row) for the layout.
using fp8_latents = kvc::quant::block<kvc::quant::fp8_e4m3, 32>;
using kivi_latents = kvc::quant::kivi<2, 32, 32>;
using int8_latents = kvc::quant::q8_0;
constexpr std::size_t latent_rank = 32;

// What the store decodes (U U^T of its decoded latents), gathered as engine rows [tokens][kv_heads][dim].
template <class Cache>
void decoded_rows(const Cache& cache, std::size_t layer, std::size_t tokens, std::vector<float>& keys,
                  std::vector<float>& values) {
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    keys.assign(tokens * kv_heads * dim, 0.0f);
    values.assign(keys.size(), 0.0f);
    std::vector<float> head(tokens * dim);
    for (std::size_t h = 0; h < kv_heads; ++h)
        for (int which = 0; which < 2; ++which) {
            if (which == 0) cache.head(layer, h).decode_keys(k, 0, tokens, head.data());
            else cache.head(layer, h).decode_values(k, 0, tokens, head.data());
            std::vector<float>& to = which == 0 ? keys : values;
            for (std::size_t t = 0; t < tokens; ++t)
                std::copy(head.data() + t * dim, head.data() + (t + 1) * dim, to.data() + (t * kv_heads + h) * dim);
        }
}

// Decode and prefill over quantized latents are exact attention (in double)
// over the rows the store decodes; and those rows are the projected rows
// with the codec's error, not the projected rows themselves (the codec acts).
template <class Codec>
void check_codec_latents_on_active_arch() {
    const kvc::project::pca_bases b = random_bases(latent_rank, 700);
    const std::vector<layer_data> data = draw(b, total, 3, false);
    const kvc::cache_config c = shape();
    using cache_t = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Codec, kvc::project::pca>;
    cache_t cache(c, {}, {}, {}, kvc::project::pca(b));
    std::vector<float> keys, values;
    run(cache, data, prompt, total,
        [&](std::size_t l, std::size_t first, const std::vector<float>& out) {
            decoded_rows(cache, l, first + chunk, keys, values);
            for (std::size_t i = 0; i < chunk; ++i) {
                const auto want = kvc_test::oracle_attention(c, keys, values, first + i + 1,
                                                             data[l].queries.data() + (first + i) * query_heads * dim);
                ASSERT_LT(kvc_test::worst_head_error(c, out.data() + i * query_heads * dim, want), 1e-5)
                    << "layer " << l << " chunk query " << first + i;
            }
        },
        [&](std::size_t l, std::size_t t, const std::vector<float>& out, const std::vector<float>&) {
            decoded_rows(cache, l, t + 1, keys, values);
            const auto want =
                kvc_test::oracle_attention(c, keys, values, t + 1, data[l].queries.data() + t * query_heads * dim);
            ASSERT_LT(kvc_test::worst_head_error(c, out.data(), want), 1e-5) << "layer " << l << " token " << t;
        });
    const std::vector<float> exact = projected(b, b.keys, 0, data[0].keys);
    decoded_rows(cache, 0, total, keys, values);
    const double error = kvc_test::relative_error(keys, exact);
    EXPECT_GT(error, 1e-4) << "the codec left the latents as they were";
    const double most = std::is_same_v<Codec, fp8_latents> ? 0.1 : 0.6;
    EXPECT_LT(error, most) << "the latents are not the projected rows";
}

TEST(PcaLatents, QuantizedLatentsAttendExactlyOverWhatTheCodecDecodes) {
    kvc_test::on_every_arch([] {
        check_codec_latents_on_active_arch<fp8_latents>();
        check_codec_latents_on_active_arch<kivi_latents>();
    });
}

// bytes() is the codec's layout at width r plus the bases: q8_0 is 34 bytes
// a row, a key and a value row a token.
TEST(PcaLatents, BytesAreTheCodecLayoutAtTheRank) {
    using cache_t = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, int8_latents, kvc::project::pca>;
    constexpr std::size_t tokens = 100;
    const std::vector<float> keys = random_floats(tokens * kv_heads * dim, 7), values = random_floats(keys.size(), 8);
    kvc_test::counting_resource memory;
    cache_t cache(shape(kvc::dtype::f32, &memory), {}, {}, {}, kvc::project::pca(random_bases(latent_rank, 600)));
    for (std::size_t l = 0; l < layers; ++l)
        cache.append(l, view(keys.data(), tokens, kv_heads, dim), view(values.data(), tokens, kv_heads, dim), 0);
    cache.shrink_to_fit();
    const std::size_t bases = 2 * dim * latent_rank * sizeof(float);
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < kv_heads; ++h) {
            EXPECT_EQ(cache.head(l, h).bytes(), tokens * 2 * 34 + bases);
            EXPECT_EQ(cache.head(l, h).stored_bytes(), tokens * 2 * 34 + bases);
        }
    EXPECT_EQ(cache.bytes(), memory.in_use);
}

// A codec whose groups do not divide the rank is refused when the cache is
// built, naming the width: q8_0's blocks of 32 do not take rank 16.
TEST(PcaLatents, ACodecThatCannotTakeTheRankIsRefused) {
    using cache_t = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, int8_latents, kvc::project::pca>;
    const std::string message = kvc_test::error_of([] { cache_t(shape(), {}, {}, {}, kvc::project::pca(random_bases(16, 1))); });
    EXPECT_NE(std::string::npos, message.find("the projection stores 16 channels a row")) << "[" << message << "]";
}

// ---------------------------------------------------------------------------
// P5 CSKV

using cskv_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<float>, kvc::project::cskv>;
constexpr std::size_t cskv_window = 16;

// After the prompt (128 tokens, compressed at the first decode step) the
// oldest 112 tokens are projected and the newest 16 whole; the decode
// tokens stay whole. Decode and prefill outputs and decode's attention mass
// are exact attention (in double) over those rows, on every instruction set.
void check_cskv_on_active_arch() {
    const kvc::project::pca_bases b = random_bases(8, 900);
    const std::vector<layer_data> data = draw(b, total, 5, false);
    const std::size_t moved = prompt - cskv_window;
    std::vector<std::vector<float>> keys(layers), values(layers);
    for (std::size_t l = 0; l < layers; ++l) {
        keys[l] = data[l].keys;
        values[l] = data[l].values;
        const std::vector<float> pk = projected(b, b.keys, l, data[l].keys), pv = projected(b, b.values, l, data[l].values);
        std::copy(pk.begin(), pk.begin() + static_cast<std::ptrdiff_t>(moved * kv_heads * dim), keys[l].begin());
        std::copy(pv.begin(), pv.begin() + static_cast<std::ptrdiff_t>(moved * kv_heads * dim), values[l].begin());
    }
    const kvc::cache_config c = shape();
    cskv_cache cache(c, {}, {}, {}, kvc::project::cskv(kvc::project::pca(b), cskv_window));
    run(cache, data, prompt, total,
        [&](std::size_t l, std::size_t first, const std::vector<float>& out) {
            for (std::size_t i = 0; i < chunk; ++i) { // the prompt: every row whole yet
                const auto want = kvc_test::oracle_attention(c, data[l].keys, data[l].values, first + i + 1,
                                                             data[l].queries.data() + (first + i) * query_heads * dim);
                ASSERT_LT(kvc_test::worst_head_error(c, out.data() + i * query_heads * dim, want), 1e-5)
                    << "layer " << l << " chunk query " << first + i;
            }
        },
        [&](std::size_t l, std::size_t t, const std::vector<float>& out, const std::vector<float>& mass) {
            ASSERT_EQ(cache.head(l, 0).body_tokens(), moved);
            std::vector<double> want_mass;
            const auto want = kvc_test::oracle_attention(c, keys[l], values[l], t + 1,
                                                         data[l].queries.data() + t * query_heads * dim, &want_mass);
            ASSERT_LT(kvc_test::worst_head_error(c, out.data(), want), 1e-5) << "layer " << l << " token " << t;
            for (std::size_t i = 0; i < mass.size(); ++i) ASSERT_NEAR(mass[i], want_mass[i], 1e-5) << i;
        });
    // A prompt chunk after the projection: its rows land in the window and
    // attend causally over both branches (prefill by decode passes).
    cskv_cache more(c, {}, {}, {}, kvc::project::cskv(kvc::project::pca(b), cskv_window));
    const layer_data& x = data[0];
    const std::size_t row = kv_heads * dim, q = query_heads * dim;
    std::vector<float> out(chunk * q);
    more.append(0, view(x.keys.data(), chunk, kv_heads, dim), view(x.values.data(), chunk, kv_heads, dim), 0);
    more.attend_chunk(0, x.queries.data(), chunk, out.data());
    more.compress(0);
    ASSERT_EQ(more.head(0, 0).body_tokens(), chunk - cskv_window);
    more.append(0, view(x.keys.data() + chunk * row, chunk, kv_heads, dim),
                view(x.values.data() + chunk * row, chunk, kv_heads, dim), chunk);
    more.attend_chunk(0, x.queries.data() + chunk * q, chunk, out.data());
    std::vector<float> k0 = x.keys, v0 = x.values;
    const std::vector<float> pk = projected(b, b.keys, 0, x.keys), pv = projected(b, b.values, 0, x.values);
    std::copy(pk.begin(), pk.begin() + static_cast<std::ptrdiff_t>((chunk - cskv_window) * row), k0.begin());
    std::copy(pv.begin(), pv.begin() + static_cast<std::ptrdiff_t>((chunk - cskv_window) * row), v0.begin());
    for (std::size_t i = 0; i < chunk; ++i) {
        const auto want = kvc_test::oracle_attention(c, k0, v0, chunk + i + 1, x.queries.data() + (chunk + i) * q);
        ASSERT_LT(kvc_test::worst_head_error(c, out.data() + i * q, want), 1e-5) << "second chunk query " << i;
    }
}

TEST(Cskv, TheWindowIsExactAndOlderTokensAreProjected) {
    kvc_test::on_every_arch([] { check_cskv_on_active_arch(); });
}

// A window as long as the sequence keeps every row whole: the full cache.
TEST(Cskv, AWindowAsLongAsTheSequenceIsTheFullCache) {
    const kvc::project::pca_bases b = random_bases(4, 910);
    cskv_cache cache(shape(), {}, {}, {}, kvc::project::cskv(kvc::project::pca(b), total));
    against_full(cache, draw(b, total, 6, false), near_full);
}

// bytes(): the body as P1's latents (2 r fp16 a token and the two fp32
// bases), the window as whole fp16 rows.
TEST(Cskv, BytesAreTheTwoBranchesLayout) {
    using half_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>,
                                             kvc::project::cskv>;
    constexpr std::size_t tokens = 100, rank = 8;
    const std::vector<float> keys = random_floats(tokens * kv_heads * dim, 7), values = random_floats(keys.size(), 8);
    kvc_test::counting_resource memory;
    half_cache cache(shape(kvc::dtype::f16, &memory), {}, {}, {},
                     kvc::project::cskv(kvc::project::pca(random_bases(rank, 600)), cskv_window));
    for (std::size_t l = 0; l < layers; ++l)
        cache.append(l, view(keys.data(), tokens, kv_heads, dim), view(values.data(), tokens, kv_heads, dim), 0);
    cache.compress();
    cache.shrink_to_fit();
    const std::size_t body = tokens - cskv_window;
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < kv_heads; ++h) {
            EXPECT_EQ(cache.head(l, h).body_tokens(), body);
            EXPECT_EQ(cache.head(l, h).bytes(), body * 2 * rank * sizeof(kvc::half) + 2 * dim * rank * sizeof(float) +
                                                    cskv_window * 2 * dim * sizeof(kvc::half));
        }
    EXPECT_EQ(cache.bytes(), memory.in_use);
}

// ---------------------------------------------------------------------------
// P4 Loki

// Decode attention in double over, per KV head, the `keep` tokens whose
// estimated score (the largest over the group of scale <U_r^T q, U_r^T k>,
// U the head's key basis, its first `rank` columns) is best, as Loki defines it.
std::vector<double> loki_oracle(const kvc::cache_config& c, const kvc::project::pca_bases& b, std::size_t layer,
                                const layer_data& x, std::size_t tokens, std::size_t t_query, std::size_t rank,
                                std::size_t keep, std::vector<double>& mass) {
    const std::size_t group = c.group();
    const float* queries = x.queries.data() + t_query * query_heads * dim;
    std::vector<double> out(query_heads * dim, 0.0);
    mass.assign(kv_heads * tokens, 0.0);
    auto dot = [](const float* a, const float* b, std::size_t n) {
        double s = 0.0;
        for (std::size_t d = 0; d < n; ++d) s += double{a[d]} * b[d];
        return s;
    };
    for (std::size_t h = 0; h < kv_heads; ++h) {
        const float* u = b.keys.data() + (layer * kv_heads + h) * dim * dim;
        auto coordinates = [&](const float* row) {
            std::vector<double> y(rank, 0.0);
            for (std::size_t d = 0; d < dim; ++d)
                for (std::size_t j = 0; j < rank; ++j) y[j] += double{u[d * dim + j]} * row[d];
            return y;
        };
        std::vector<std::pair<double, std::size_t>> score(tokens);
        for (std::size_t t = 0; t < tokens; ++t) {
            const std::vector<double> k = coordinates(x.keys.data() + (t * kv_heads + h) * dim);
            double best = -INFINITY;
            for (std::size_t g = 0; g < group; ++g) {
                const std::vector<double> q = coordinates(queries + (h * group + g) * dim);
                double s = 0.0;
                for (std::size_t j = 0; j < rank; ++j) s += q[j] * k[j];
                best = std::max(best, s);
            }
            score[t] = {-best, t};
        }
        std::sort(score.begin(), score.end());
        for (std::size_t g = 0; g < group; ++g) {
            const std::size_t j = h * group + g;
            std::vector<double> logits(keep);
            double max = -INFINITY, sum = 0.0;
            for (std::size_t i = 0; i < keep; ++i) {
                logits[i] = dot(queries + j * dim, x.keys.data() + (score[i].second * kv_heads + h) * dim, dim) *
                            c.logit_scale();
                max = std::max(max, logits[i]);
            }
            for (double& l : logits) sum += (l = std::exp(l - max));
            for (std::size_t i = 0; i < keep; ++i) {
                const std::size_t t = score[i].second;
                mass[h * tokens + t] += logits[i] / sum;
                for (std::size_t d = 0; d < dim; ++d)
                    out[j * dim + d] += logits[i] / sum * x.values[(t * kv_heads + h) * dim + d];
            }
        }
    }
    return out;
}

// The promise of Loki: each decode step is exact attention (output and mass)
// over the tokens with the best low-rank estimates, nothing else; the prefill
// is exact attention; the stored keys are a rotation (decoded back exactly).
void check_loki_top_k_on_active_arch() {
    constexpr std::size_t rank = 8;
    const double ratio = 0.125;
    const kvc::project::pca_bases b = random_bases(dim, 700);
    const std::vector<layer_data> data = draw(b, total, 7, false);
    const kvc::cache_config c = shape();
    loki_cache cache(c, {}, {}, {}, kvc::project::loki(kvc::project::pca(b), rank, ratio));
    run(cache, data, prompt, total,
        [&](std::size_t l, std::size_t first, const std::vector<float>& out) {
            for (std::size_t i = 0; i < chunk; ++i) {
                const auto want = kvc_test::oracle_attention(c, data[l].keys, data[l].values, first + i + 1,
                                                             data[l].queries.data() + (first + i) * query_heads * dim);
                ASSERT_LT(kvc_test::worst_head_error(c, out.data() + i * query_heads * dim, want), 1e-5)
                    << "layer " << l << " chunk query " << first + i;
            }
        },
        [&](std::size_t l, std::size_t t, const std::vector<float>& out, const std::vector<float>& mass) {
            const std::size_t keep = static_cast<std::size_t>(std::ceil(ratio * static_cast<double>(t + 1)));
            std::vector<double> want_mass;
            const auto want = loki_oracle(c, b, l, data[l], t + 1, t, rank, keep, want_mass);
            ASSERT_LT(kvc_test::worst_head_error(c, out.data(), want), 1e-5) << "layer " << l << " token " << t;
            std::size_t attended = 0;
            for (std::size_t i = 0; i < mass.size(); ++i) {
                ASSERT_NEAR(mass[i], want_mass[i], 1e-5) << i;
                attended += mass[i] > 0.0f;
            }
            EXPECT_EQ(attended, kv_heads * keep);
        });
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    std::vector<float> keys(total * dim);
    cache.head(1, 1).decode_keys(k, 0, total, keys.data());
    for (std::size_t t = 0; t < total; ++t)
        for (std::size_t d = 0; d < dim; ++d)
            ASSERT_NEAR(keys[t * dim + d], data[1].keys[(t * kv_heads + 1) * dim + d], 1e-5) << t << " " << d;
}

TEST(Loki, AttendsExactlyOverTheTopKOfTheLowRankEstimate) {
    kvc_test::on_every_arch([] { check_loki_top_k_on_active_arch(); });
}

// k = every token: the full cache's attention, decode and prefill.
TEST(Loki, EveryTokenIsFullAttention) {
    const kvc::project::pca_bases b = random_bases(dim, 800);
    const std::vector<layer_data> data = draw(b, total, 8, false);
    loki_cache cache(shape(), {}, {}, {}, kvc::project::loki(kvc::project::pca(b), 4, 1.0));
    against_full(cache, data, near_full);
}

TEST(Loki, BadParametersAreRefused) {
    const kvc::project::pca full_rank(random_bases(dim, 900)), low_rank(random_bases(8, 901));
    EXPECT_THROW(kvc::project::loki(full_rank, 0, 0.1), kvc::error);
    EXPECT_THROW(kvc::project::loki(full_rank, dim + 1, 0.1), kvc::error);
    EXPECT_THROW(kvc::project::loki(full_rank, 8, 0.0), kvc::error);
    EXPECT_THROW(kvc::project::loki(full_rank, 8, 1.5), kvc::error);
    EXPECT_NE(kvc_test::error_of([&] { kvc::project::loki(low_rank, 4, 0.1); }).find("expected full-rank key bases"),
              std::string::npos);
    kvc::cache_config c = shape();
    c.layers = 1;
    EXPECT_THROW(loki_cache(c, {}, {}, {}, kvc::project::loki(full_rank, 8, 0.1)), kvc::error);
}

// bytes(): the whole rows, the keys' 8 leading coordinates again, the basis,
// and decode's scratch sized by the rows
// (group x head_dim rotated queries, group + 2 floats and one index a token).
TEST(Loki, BytesAreTheLayout) {
    constexpr std::size_t tokens = 100, group = query_heads / kv_heads;
    kvc_test::counting_resource memory;
    loki_cache cache(shape(kvc::dtype::f32, &memory), {}, {}, {},
                     kvc::project::loki(kvc::project::pca(random_bases(dim, 950)), 8, 0.25));
    const std::vector<float> keys = random_floats(tokens * kv_heads * dim, 9), values = random_floats(keys.size(), 10);
    for (std::size_t l = 0; l < layers; ++l)
        cache.append(l, view(keys.data(), tokens, kv_heads, dim), view(values.data(), tokens, kv_heads, dim), 0);
    cache.shrink_to_fit();
    const std::size_t f = sizeof(float);
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < kv_heads; ++h)
            EXPECT_EQ(cache.head(l, h).bytes(), tokens * 2 * dim * f + tokens * 8 * f + dim * dim * f +
                                                    (group * dim + tokens * (group + 2)) * f + tokens * sizeof(std::uint32_t));
    EXPECT_EQ(cache.bytes(), memory.in_use);
}

// ---------------------------------------------------------------------------
// Compaction (what eviction does to a head) and copies keep every store's rows.

// The rows of `store` at `kept`, decoded, against the engine rows they came from.
template <class Store>
void expect_rows(const Store& store, const std::vector<float>& keys, const std::vector<float>& values,
                 const std::vector<std::uint32_t>& kept) {
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    ASSERT_EQ(store.tokens(), kept.size());
    std::vector<float> got_keys(kept.size() * dim), got_values(got_keys.size()), want_keys, want_values;
    store.decode_keys(k, 0, kept.size(), got_keys.data());
    store.decode_values(k, 0, kept.size(), got_values.data());
    for (std::uint32_t t : kept) {
        want_keys.insert(want_keys.end(), keys.begin() + t * dim, keys.begin() + (t + 1) * dim);
        want_values.insert(want_values.end(), values.begin() + t * dim, values.begin() + (t + 1) * dim);
    }
    EXPECT_LT(kvc_test::relative_error(got_keys, want_keys), 1e-6);
    EXPECT_LT(kvc_test::relative_error(got_values, want_values), 1e-6);
}

TEST(ProjectedStores, CompactedAndCopiedStoresKeepTheirRows) {
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    constexpr std::size_t tokens = 40;
    const std::vector<std::uint32_t> every = [] {
        std::vector<std::uint32_t> all(tokens);
        for (std::uint32_t t = 0; t < tokens; ++t) all[t] = t;
        return all;
    }();
    const std::vector<std::uint32_t> kept = {0, 1, 2, 7, 19, 20, 39};
    // Full-rank bases: every row is in the span, so both stores give the rows back.
    const kvc::project::pca_bases b = random_bases(dim, 1000);
    const std::vector<float> keys = random_floats(tokens * dim, 11), values = random_floats(tokens * dim, 12);
    kvc::latent_rows<> latent(kvc::dense_rows(kvc::dtype::f32, dim, nullptr), dim, dim, nullptr, b.keys.data(), b.values.data(),
                              dim);
    kvc::loki_rows loki(kvc::dense_rows(kvc::dtype::f32, dim, nullptr), b.keys.data(), 8, 0.5, 2);
    latent.reserve_for_append(tokens);
    loki.reserve_for_append(tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
        latent.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
        loki.push_back(k, kvc::dtype::f32, keys.data() + t * dim, values.data() + t * dim);
    }
    expect_rows(latent.compacted(kept.data(), kept.size()), keys, values, kept);
    expect_rows(loki.compacted(kept.data(), kept.size()), keys, values, kept);
    const kvc::latent_rows<> latent_copy(latent);
    const kvc::loki_rows loki_copy(loki);
    expect_rows(latent_copy, keys, values, every);
    expect_rows(loki_copy, keys, values, every);
    // A compacted Loki store attends over its own rows: its scratch fits them
    // (two query heads, 4 of the 7 tokens chosen; an over-run shows under ASan).
    const kvc::loki_rows small = loki.compacted(kept.data(), kept.size());
    const std::vector<float> q = random_floats(2 * dim, 13);
    float max[2] = {-INFINITY, -INFINITY}, sum[2] = {0.0f, 0.0f};
    std::vector<float> acc(2 * dim, 0.0f);
    kvc::kernels::decode_problem p;
    p.group = 2;
    p.queries = q.data();
    p.query_stride = dim;
    p.dim = dim;
    small.attend(k, p, kvc::kernels::decode_state{max, sum, acc.data()});
    EXPECT_GT(sum[0], 0.0f);
    EXPECT_GT(sum[1], 0.0f);
}

} // namespace
