// bench/quant.cpp -- Q1 block codecs against fp16 full_cache: decode attention,
// quantize-on-append, and attention-output error.
//
// BM_quant_decode: one decode step of one layer (cache.attend for 32 query
// heads over 8 KV heads, GQA 4, head dim 128) at 32K tokens, single thread,
// cold caches as in bench/decode.cpp (enough identical layers for >= 128 MiB,
// visited round robin). The fp16 full_cache of the same shape is kept in the
// same process and measured (>= 0.3 s of calls) right before every row's timed
// loop, and every row reports
//   vs_full_time   its time per call / full_cache fp16 time per call
//   vs_full_bytes  its cache bytes per layer / full_cache fp16 bytes per layer
//   bw_fraction    packed bytes read per call (every key and value group of
//                  the layer, scales included) / time / single-thread read bandwidth
// Issue 3's targets: int4 vs_full_time <= 0.35, int8 <= 0.6, bw_fraction >= 0.5.
//
// BM_quant_append: the prefill path. One iteration appends 4096 tokens of
// fp16 keys and values (8 KV heads x 128) to a layer whose storage was
// reserved outside the timed region: conversion to the packed form only.
// bw_fraction counts the fp16 input bytes (target >= 0.25).
//
// BM_quant_fidelity: not a timing. Relative error ||out - out_fp16|| /
// ||out_fp16|| of the attention output against full_cache fp16 over 1024
// tokens with random queries, on Gaussian data and on data with outlier
// channels (a few channels 10x larger, as real keys have). One iteration;
// the numbers are the counters rel_error (mean over query heads and queries)
// and rel_error_max. KVQuant rows (kvquant_3bit, kvquant_4bit) are calibrated
// on held-out tokens of the same data (on uniform noise for decode) and take the
// keys as if they were pre-RoPE: their fp16 reference holds the keys after
// RoPE (default rope_config) at positions 0.. . scripts/quant_report.py turns all three into
// docs/QUANTIZATION.md.
//
// Calibrated codecs (Q8 CQ) learn their codebooks before a benchmark from a
// small held-out sample of that benchmark's own data distribution (1024
// tokens of one layer, never the measured tokens); the layers of the decode
// fixture are i.i.d., so one layer's codebooks are reused for every layer.
// Their bits_per_value counts the codes only (b / c); vs_full_bytes and
// bw_fraction include the codebooks (256 KiB per head for b = 8).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_bench {
namespace {

constexpr std::size_t kv_heads = 8;
constexpr std::size_t group = 4;
constexpr std::size_t dim = 128;
constexpr std::size_t decode_tokens = 32768;
constexpr std::size_t min_working_set_bytes = std::size_t{128} << 20;
constexpr std::size_t fill_chunk = 256;
constexpr std::size_t append_tokens = 4096;
constexpr std::size_t fidelity_tokens = 1024;
constexpr std::size_t calibration_tokens = 1024;

template <class Q>
using cache_of = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Q, kvc::project::none>;

kvc::cache_config config_for(std::size_t layers) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads * group;
    c.head_dim = dim;
    c.storage = kvc::dtype::f16;
    return c;
}

// Cheap deterministic noise in [-1, 1).
class noise {
public:
    explicit noise(std::uint64_t seed) noexcept : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
    float next() noexcept {
        state_ ^= state_ << 13;
        state_ ^= state_ >> 7;
        state_ ^= state_ << 17;
        return static_cast<float>(static_cast<std::int32_t>(state_ >> 32)) * 0x1p-31f;
    }

private:
    std::uint64_t state_;
};

// A cache of either kind behind one interface.
class target {
public:
    virtual ~target() = default;
    virtual void attend(std::size_t layer, const float* q, float* out) = 0;
    virtual void append(std::size_t layer, const kvc::kv_view<const float>& k, const kvc::kv_view<const float>& v,
                        std::int64_t position) = 0;
    virtual void append(std::size_t layer, const kvc::kv_view<const kvc::half>& k,
                        const kvc::kv_view<const kvc::half>& v, std::int64_t position) = 0;
    virtual void reserve(std::size_t tokens) = 0;
    virtual std::size_t bytes() const = 0;
    virtual std::size_t stored_bytes(std::size_t layer) const = 0; // K/V bytes one attend reads
    // Called once after the fixture's tokens are appended (codecs that
    // re-encode by importance assign precision here).
    virtual void finish_fill() {}
};

template <class Cache>
class target_of : public target {
public:
    explicit target_of(const kvc::cache_config& c) : cache_(c) {}
    template <class Q>
    target_of(const kvc::cache_config& c, Q quantization) : cache_(c, {}, {}, std::move(quantization)) {}
    void attend(std::size_t layer, const float* q, float* out) override { cache_.attend(layer, q, out); }
    void append(std::size_t layer, const kvc::kv_view<const float>& k, const kvc::kv_view<const float>& v,
                std::int64_t position) override {
        cache_.append(layer, k, v, position);
    }
    void append(std::size_t layer, const kvc::kv_view<const kvc::half>& k, const kvc::kv_view<const kvc::half>& v,
                std::int64_t position) override {
        cache_.append(layer, k, v, position);
    }
    void reserve(std::size_t tokens) override { cache_.reserve(tokens); }
    std::size_t bytes() const override { return cache_.bytes(); }
    std::size_t stored_bytes(std::size_t layer) const override {
        if constexpr (std::is_same_v<Cache, kvc::full_cache>) {
            return cache_.tokens(layer) * kv_heads * dim * 2 * kvc::size_of(cache_.config().storage);
        } else if constexpr (kvc::detail::has_stored_bytes<typename Cache::head_storage>::value) {
            // Head stores other than packed_rows report what one attention reads themselves.
            std::size_t total = 0;
            for (std::size_t h = 0; h < kv_heads; ++h) total += cache_.head(layer, h).stored_bytes();
            return total;
        } else { // packed_rows: the packed rows and the fp16 sinks
            std::size_t total = 0;
            for (std::size_t h = 0; h < kv_heads; ++h) {
                const auto& head = cache_.head(layer, h);
                total += head.packed_tokens() * (head.key_row_bytes() + head.value_row_bytes()) +
                         head.sink_tokens() * kvc::packed_layout::sink_token_bytes(dim);
            }
            return total;
        }
    }

protected:
    Cache& cache() noexcept { return cache_; }

private:
    Cache cache_;
};

struct codec {
    std::string name;
    double bits_per_value; // key and value average, scales included (16 for fp16)
    std::function<std::unique_ptr<target>(const kvc::cache_config&)> make;
    // Calibrated codecs: the codec with codebooks learnt from one layer's
    // sample keys and values ([calibration_tokens][kv_heads][dim]); `make` is
    // unusable before.
    std::function<codec(const std::vector<float>&, const std::vector<float>&)> calibrate;
    // Keys are appended before RoPE (KVQuant rotates them inside attention):
    // the fp16 reference of the fidelity rows then holds the keys after RoPE.
    bool keys_before_rope = false;
};

// `c` ready to make caches: calibrated on the sample `draw` produces when it needs it.
template <class Draw>
codec ready(const codec& c, Draw&& draw) {
    if (!c.calibrate) return c;
    std::vector<float> keys, values;
    draw(keys, values);
    return c.calibrate(keys, values);
}

// CQ with c channels per group and b bits per code, calibrated on one layer
// and the same codebooks used for every layer of the cache.
codec cq_codec(std::string name, std::size_t channels, std::size_t bits) {
    codec c{name, static_cast<double>(bits) / static_cast<double>(channels), nullptr, nullptr};
    c.calibrate = [name, channels, bits](const std::vector<float>& keys, const std::vector<float>& values) {
        kvc::calibration::cq_options o;
        o.channels_per_group = channels;
        o.bits = bits;
        o.iterations = 10;
        const auto one_layer = std::make_shared<const kvc::calibration::artifact>(kvc::calibration::calibrate_cq(
            kvc::kv_view<const float>(keys.data(), calibration_tokens, kv_heads, dim),
            kvc::kv_view<const float>(values.data(), calibration_tokens, kv_heads, dim), o));
        codec out{name, static_cast<double>(bits) / static_cast<double>(channels), nullptr, nullptr};
        out.make = [one_layer](const kvc::cache_config& config) -> std::unique_ptr<target> {
            kvc::calibration::artifact tiled = *one_layer;
            for (kvc::calibration::tensor& t : tiled.tensors) {
                if (t.shape.size() != 5) continue;
                const std::vector<float> layer = t.values;
                t.shape[0] = config.layers;
                t.values.clear();
                for (std::size_t l = 0; l < config.layers; ++l) t.values.insert(t.values.end(), layer.begin(), layer.end());
            }
            using cache = cache_of<kvc::quant::cq>;
            return std::make_unique<target_of<cache>>(config, kvc::quant::cq(tiled));
        };
        return out;
    };
    return c;
}

template <class Q>
codec codec_of(std::string name) {
    return codec{std::move(name), (Q::key_bits_per_value() + Q::value_bits_per_value()) / 2.0,
                 [](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<Q>>>(c);
                 },
                 nullptr};
}

// Q10: run-time sparsity; bits per value from the row layout (bitmap included).
codec sparse_codec(double sparsity) {
    const kvc::quant::sparse q(sparsity);
    return codec{"sparse_s" + std::to_string(static_cast<int>(sparsity * 100 + 0.5)),
                 (q.key_bits_per_value(dim) + q.value_bits_per_value(dim)) / 2.0,
                 [q](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<kvc::quant::sparse>>>(c, q);
                 },
                 nullptr};
}

// Q9 on top of Q10: the first `sinks` tokens in fp16, the rest sparse.
codec sinks_sparse_codec(double sparsity, std::size_t sinks) {
    using Q = kvc::quant::with_sinks<kvc::quant::sparse>;
    const Q q{kvc::quant::sparse(sparsity), sinks};
    return codec{"sink" + std::to_string(sinks) + "_sparse_s" + std::to_string(static_cast<int>(sparsity * 100 + 0.5)),
                 (q.codec.key_bits_per_value(dim) + q.codec.value_bits_per_value(dim)) / 2.0,
                 [q](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<Q>>>(c, q);
                 },
                 nullptr};
}

// Q6: after the tokens are in, every head's precision is assigned from E7
// knorm scores (-||k||, low-norm keys draw attention), a stand-in for any scorer.
template <class Q>
class mixed_target final : public target_of<cache_of<Q>> {
public:
    mixed_target(const kvc::cache_config& c, Q q) : target_of<cache_of<Q>>(c, q) {}
    void finish_fill() override {
        auto& cache = this->cache();
        const kvc::kernels::kernel_table& k = kvc::kernels::active();
        std::vector<float> keys, scores;
        for (std::size_t layer = 0; layer < cache.config().layers; ++layer)
            for (std::size_t h = 0; h < kv_heads; ++h) {
                const std::size_t tokens = cache.tokens(layer, h);
                keys.resize(tokens * dim);
                scores.resize(tokens);
                cache.head(layer, h).decode_keys(k, 0, tokens, keys.data());
                for (std::size_t t = 0; t < tokens; ++t)
                    scores[t] = kvc::evict::score::knorm{}.on_append(k, keys.data() + t * dim, nullptr, dim);
                cache.assign_precision(layer, h, scores.data());
            }
        cache.shrink_to_fit();
    }
};

template <class Q>
codec mixed_codec(std::string name, double high_fraction) {
    const double bits = high_fraction * Q::high_bits_per_value() + (1.0 - high_fraction) * Q::low_bits_per_value() +
                        8.0 * 4.0 / (2.0 * dim); // + the 4-byte token map per token and head
    return codec{std::move(name), bits, [high_fraction](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<mixed_target<Q>>(c, Q(high_fraction));
                 },
                 nullptr};
}

// KVQuant at `bits`: 1% outliers, one fp16 sink, default RoPE, calibrated on
// the sample for every layer. The bench appends its keys as if they were
// pre-RoPE keys (the codec rotates them inside attention).
codec kvquant_codec(std::string name, unsigned bits) {
    // Average over K and V of the packed body at dim 128: codes b bits, 8 bytes
    // of value parameters, 8 bytes of outlier end and position, ~1.28 outliers x 6 bytes.
    const double bits_per_value = bits + (8.0 + 8.0 + 1.28 * 6.0) * 8.0 / (2.0 * dim);
    codec c{name, bits_per_value, nullptr, nullptr};
    c.keys_before_rope = true;
    c.calibrate = [name, bits, bits_per_value](const std::vector<float>& keys, const std::vector<float>& values) {
        codec out{name, bits_per_value, nullptr, nullptr};
        out.keys_before_rope = true;
        out.make = [bits, keys, values](const kvc::cache_config& config) -> std::unique_ptr<target> {
            const std::size_t tokens = keys.size() / (kv_heads * dim);
            std::vector<kvc::kv_view<const float>> k, v;
            for (std::size_t l = 0; l < config.layers; ++l) {
                k.emplace_back(keys.data(), tokens, kv_heads, dim);
                v.emplace_back(values.data(), tokens, kv_heads, dim);
            }
            kvc::calibration::kvquant_options o;
            o.bits = bits;
            o.outlier_fraction = 0.01;
            const auto artifact = kvc::calibration::calibrate_kvquant(config, k, v, o);
            return std::make_unique<target_of<cache_of<kvc::quant::kvquant>>>(
                config, kvc::quant::kvquant(artifact, kvc::rope_config{}, 1));
        };
        return out;
    };
    return c;
}

codec full_fp16() {
    return codec{"f16_full", 16.0,
                 [](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<kvc::full_cache>>(c);
                 },
                 nullptr};
}

// A codec whose policy carries run-time parameters (kvc::quant::gear).
template <class Q>
codec codec_with(std::string name, const Q& policy, double bits_per_value) {
    return codec{std::move(name), bits_per_value,
                 [policy](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<Q>>>(c, policy);
                 },
                 nullptr};
}

kvc::quant::gear gear_bits(unsigned bits) {
    kvc::quant::gear g;
    g.bits = bits;
    return g;
}

std::vector<codec> codecs() {
    namespace q = kvc::quant;
    return {
        codec_of<q::q8_0>("q8_0"),
        codec_of<q::q4_0>("q4_0"),
        codec_of<q::q4_1>("q4_1"),
        codec_of<q::block<q::int2_asym, 32>>("int2_asym_g32"),
        codec_of<q::block<q::fp8_e4m3, 32>>("fp8_e4m3_g32"),
        codec_of<q::block<q::fp8_e5m2, 32>>("fp8_e5m2_g32"),
        codec_of<q::block<q::int8_sym, 128>>("int8_sym_g128"),
        codec_of<q::block<q::int4_sym, 128>>("int4_sym_g128"),
        codec_of<q::block<q::int4_asym, 128>>("int4_asym_g128"),
        codec_of<q::block<q::int2_asym, 128>>("int2_asym_g128"),
        codec_of<q::block_kv<q::int4_sym, q::int2_asym, 32>>("k_int4_v_int2_g32"),
        codec_of<q::block_kv<q::int8_sym, q::int4_sym, 32>>("k_int8_v_int4_g32"),
        codec_of<q::block<q::int4_sym, 32, 4>>("q4_0_sink4"),
        codec_of<q::rotated<q::q4_0>>("rot_q4_0"),
        codec_of<q::rotated<q::block<q::int4_sym, 128>>>("rot_int4_sym_g128"),
        sparse_codec(0.5),
        sparse_codec(0.7),
        sinks_sparse_codec(0.5, 4),
        mixed_codec<q::mixed<q::int8_sym, q::int2_asym, 32>>("mixed_int8_20pct_int2", 0.2),
        mixed_codec<q::mixed<q::int8_sym, q::int4_sym, 32>>("mixed_int8_20pct_int4", 0.2),
        codec_of<q::kivi<4>>("kivi4_g32_r128"),
        codec_of<q::kivi<2>>("kivi2_g32_r128"),
        cq_codec("cq_c4_b8", 4, 8),
        cq_codec("cq_c8_b8", 8, 8),
        kvquant_codec("kvquant_3bit", 3),
        kvquant_codec("kvquant_4bit", 4),
        // GEAR (Q7): int4_asym / int2_asym G = 32 (as q4_1, int2_asym_g32) + 2% outliers + rank 2, n_b = 64.
        codec_with("gear_4bit", gear_bits(4), gear_bits(4).bits_per_value(dim)),
        codec_with("gear_2bit", gear_bits(2), gear_bits(2).bits_per_value(dim)),
    };
}

// ---------------------------------------------------------------------------
// Decode.

struct decode_fixture {
    std::string codec;
    std::size_t layers = 0;
    std::unique_ptr<target> cache;
    std::vector<float> queries;
    std::size_t bytes_per_layer = 0, read_bytes_per_call = 0;
};

// Uniform noise in [-1, 1), the decode and append benchmarks' data.
void draw_noise(std::vector<float>& keys, std::vector<float>& values) {
    noise rng(99991);
    keys.resize(calibration_tokens * kv_heads * dim);
    values.resize(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
        keys[i] = rng.next();
        values[i] = rng.next();
    }
}

std::unique_ptr<decode_fixture> build_decode_fixture(const codec& uncalibrated) {
    const codec c = ready(uncalibrated, draw_noise);
    // Layer size from a one-layer probe of the layout (cheap: no tokens).
    const double bytes_per_token = c.bits_per_value / 8.0 * dim * 2 * kv_heads;
    const double layer_bytes = bytes_per_token * decode_tokens;
    std::size_t layers = std::max<std::size_t>(2, static_cast<std::size_t>(std::ceil(min_working_set_bytes / layer_bytes)));
    layers += layers % 2;
    auto fixture = std::make_unique<decode_fixture>();
    fixture->codec = c.name;
    fixture->layers = layers;
    fixture->cache = c.make(config_for(layers));
    fixture->cache->reserve(decode_tokens);
    noise rng(decode_tokens * 131 + dim * 7 + group);
    std::vector<float> keys(fill_chunk * kv_heads * dim), values(keys.size());
    for (std::size_t layer = 0; layer < layers; ++layer)
        for (std::size_t t0 = 0; t0 < decode_tokens; t0 += fill_chunk) {
            for (std::size_t i = 0; i < keys.size(); ++i) {
                keys[i] = rng.next();
                values[i] = rng.next();
            }
            fixture->cache->append(layer, kvc::kv_view<const float>(keys.data(), fill_chunk, kv_heads, dim),
                                   kvc::kv_view<const float>(values.data(), fill_chunk, kv_heads, dim),
                                   static_cast<std::int64_t>(t0));
        }
    fixture->cache->finish_fill();
    fixture->queries.resize(kv_heads * group * dim);
    for (float& q : fixture->queries) q = rng.next();
    fixture->bytes_per_layer = fixture->cache->bytes() / layers;
    fixture->read_bytes_per_call = fixture->cache->stored_bytes(0);
    return fixture;
}

std::shared_ptr<decode_fixture> decode_fixture_for(const codec& c) {
    static std::mutex mutex;
    static std::shared_ptr<decode_fixture> last;
    std::lock_guard<std::mutex> lock(mutex);
    if (last && last->codec == c.name) return last;
    last.reset();
    last = build_decode_fixture(c);
    return last;
}

double seconds_per_call(decode_fixture& f, double at_least_seconds) {
    std::vector<float> out(kv_heads * group * dim);
    f.cache->attend(0, f.queries.data(), out.data()); // warm-up
    std::size_t calls = 0, layer = 0;
    double elapsed = 0.0;
    const auto start = std::chrono::steady_clock::now();
    while (calls < 3 || elapsed < at_least_seconds) {
        f.cache->attend(layer, f.queries.data(), out.data());
        benchmark::DoNotOptimize(out.data());
        layer = layer + 1 == f.layers ? 0 : layer + 1;
        ++calls;
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return elapsed / static_cast<double>(calls);
}

// The fp16 full_cache of the same shape, built once and kept for the process.
decode_fixture& full_fixture() {
    static std::mutex mutex;
    static std::unique_ptr<decode_fixture> fixture;
    std::lock_guard<std::mutex> lock(mutex);
    if (!fixture) fixture = build_decode_fixture(full_fp16());
    return *fixture;
}

void BM_quant_decode(benchmark::State& state, codec c) {
    decode_fixture& full = full_fixture();
    const std::shared_ptr<decode_fixture> fixture = decode_fixture_for(c);
    // The baseline is measured right before this codec (>= 0.3 s of calls, the
    // same layers round robin), so both see the same machine state; on a shared
    // machine a baseline taken once at start-up drifts by tens of percent.
    const double full_seconds = seconds_per_call(full, 0.3);
    std::vector<float> out(kv_heads * group * dim);
    std::size_t layer = 0;
    const auto start = std::chrono::steady_clock::now();
    for (auto _ : state) {
        fixture->cache->attend(layer, fixture->queries.data(), out.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
        layer = layer + 1 == fixture->layers ? 0 : layer + 1;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double per_call = seconds / static_cast<double>(state.iterations());
    const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(fixture->read_bytes_per_call);
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    state.counters["bw_fraction"] =
        benchmark::Counter(bytes / single_thread_read_bandwidth().bytes_per_second, benchmark::Counter::kIsRate);
    state.counters["vs_full_time"] = per_call / full_seconds;
    state.counters["vs_full_bytes"] =
        static_cast<double>(fixture->bytes_per_layer) / static_cast<double>(full.bytes_per_layer);
    state.counters["full_us"] = full_seconds * 1e6;
    state.counters["bits_per_value"] = c.bits_per_value;
    state.counters["kv_bytes"] = benchmark::Counter(static_cast<double>(fixture->bytes_per_layer),
                                                    benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
    state.counters["layers"] = static_cast<double>(fixture->layers);
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

// ---------------------------------------------------------------------------
// Quantize on append (prefill path).

void BM_quant_append(benchmark::State& state, codec uncalibrated) {
    const codec c = ready(uncalibrated, draw_noise);
    const kvc::cache_config config = config_for(1);
    noise rng(7);
    std::vector<kvc::half> keys(append_tokens * kv_heads * dim), values(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
        keys[i] = kvc::to_half(rng.next());
        values[i] = kvc::to_half(rng.next());
    }
    const kvc::kv_view<const kvc::half> key_view(keys.data(), append_tokens, kv_heads, dim);
    const kvc::kv_view<const kvc::half> value_view(values.data(), append_tokens, kv_heads, dim);
    std::unique_ptr<target> cache = c.make(config);
    cache->reserve(append_tokens);
    for (auto _ : state) {
        state.PauseTiming();
        cache = c.make(config); // fresh storage, reserved outside the timed region
        cache->reserve(append_tokens);
        state.ResumeTiming();
        cache->append(0, key_view, value_view, 0);
        benchmark::ClobberMemory();
    }
    const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(keys.size() * 2 * 2);
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    state.counters["bw_fraction"] =
        benchmark::Counter(bytes / single_thread_read_bandwidth().bytes_per_second, benchmark::Counter::kIsRate);
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

// ---------------------------------------------------------------------------
// Fidelity.

// Keys and values ~ N(0, 1), with `outliers` channels per head scaled by 10
// (the same channels in every token, as in real keys).
std::vector<float> synthetic(std::size_t tokens, std::uint32_t seed, std::size_t outliers) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(tokens * kv_heads * dim);
    std::vector<float> channel_scale(kv_heads * dim, 1.0f);
    std::uniform_int_distribution<std::size_t> pick(0, dim - 1);
    for (std::size_t h = 0; h < kv_heads; ++h)
        for (std::size_t i = 0; i < outliers; ++i) channel_scale[h * dim + pick(rng)] = 10.0f;
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t j = 0; j < kv_heads * dim; ++j) x[t * kv_heads * dim + j] = normal(rng) * channel_scale[j];
    return x;
}

void BM_quant_fidelity(benchmark::State& state, codec uncalibrated, std::size_t outliers) {
    const kvc::cache_config config = config_for(1);
    // Held-out sample: the tokens after the measured ones (same outlier channels).
    const codec c = ready(uncalibrated, [&](std::vector<float>& k, std::vector<float>& v) {
        const std::size_t skip = fidelity_tokens * kv_heads * dim;
        k = synthetic(fidelity_tokens + calibration_tokens, 11, outliers);
        v = synthetic(fidelity_tokens + calibration_tokens, 12, outliers);
        k.erase(k.begin(), k.begin() + static_cast<std::ptrdiff_t>(skip));
        v.erase(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(skip));
    });
    const auto keys = synthetic(fidelity_tokens, 11, outliers);
    const auto values = synthetic(fidelity_tokens, 12, outliers);
    // The fp16 reference holds keys after RoPE when the codec takes them before.
    std::vector<float> reference_keys = keys;
    if (c.keys_before_rope)
        for (std::size_t t = 0; t < fidelity_tokens; ++t)
            for (std::size_t h = 0; h < kv_heads; ++h)
                kvc::kernels::rope_rotate(kvc::rope_config{}, reference_keys.data() + (t * kv_heads + h) * dim, dim,
                                          static_cast<std::int64_t>(t));
    const kvc::kv_view<const float> reference_key_view(reference_keys.data(), fidelity_tokens, kv_heads, dim);
    const kvc::kv_view<const float> key_view(keys.data(), fidelity_tokens, kv_heads, dim);
    const kvc::kv_view<const float> value_view(values.data(), fidelity_tokens, kv_heads, dim);
    constexpr std::size_t queries = 16;
    std::mt19937 rng(13);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(queries * kv_heads * group * dim);
    for (float& x : q) x = normal(rng); // logits of standard deviation ~1 (~2 with outlier channels)
    double mean = 0.0, worst = 0.0;
    for (auto _ : state) {
        const auto full = full_fp16().make(config);
        const auto packed = c.make(config);
        full->append(0, reference_key_view, value_view, 0);
        packed->append(0, key_view, value_view, 0);
        packed->finish_fill();
        std::vector<float> want(kv_heads * group * dim), got(want.size());
        double total = 0.0;
        std::size_t count = 0;
        for (std::size_t i = 0; i < queries; ++i) {
            full->attend(0, q.data() + i * want.size(), want.data());
            packed->attend(0, q.data() + i * want.size(), got.data());
            for (std::size_t h = 0; h < kv_heads * group; ++h) {
                double diff = 0.0, norm = 0.0;
                for (std::size_t d = 0; d < dim; ++d) {
                    const double w = want[h * dim + d], g = got[h * dim + d];
                    diff += (g - w) * (g - w);
                    norm += w * w;
                }
                const double relative = std::sqrt(diff / norm);
                total += relative;
                worst = std::max(worst, relative);
                ++count;
            }
        }
        mean = total / static_cast<double>(count);
    }
    state.counters["rel_error"] = mean;
    state.counters["rel_error_max"] = worst;
    state.counters["bits_per_value"] = c.bits_per_value;
}

// ---------------------------------------------------------------------------

struct registrar {
    registrar() {
        const std::string shape = "/tokens:" + std::to_string(decode_tokens) + "/dim:" + std::to_string(dim) +
                                  "/group:" + std::to_string(group);
        benchmark::RegisterBenchmark(("BM_quant_decode/codec:f16_full" + shape).c_str(), &BM_quant_decode,
                                     full_fp16())
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        for (const codec& c : codecs())
            benchmark::RegisterBenchmark(("BM_quant_decode/codec:" + c.name + shape).c_str(), &BM_quant_decode, c)
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
        for (const codec& c : codecs())
            benchmark::RegisterBenchmark(
                ("BM_quant_append/codec:" + c.name + "/tokens:" + std::to_string(append_tokens) + "/from:f16").c_str(),
                &BM_quant_append, c)
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
        for (std::size_t outliers : {std::size_t{0}, std::size_t{4}})
            for (const codec& c : codecs())
                benchmark::RegisterBenchmark(("BM_quant_fidelity/codec:" + c.name + "/data:" +
                                              (outliers ? "outlier_channels" : "gaussian"))
                                                 .c_str(),
                                             &BM_quant_fidelity, c, outliers)
                    ->Iterations(1);
    }
};

// Registered at static initialisation (kvc_bench's main registers its own
// benchmarks later, so these run first; the read bandwidth they divide by is
// measured in main() before any benchmark runs).
const registrar registered;

} // namespace
} // namespace kvc_bench
