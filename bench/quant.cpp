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
// and rel_error_max. scripts/quant_report.py turns all three into
// docs/QUANTIZATION.md.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/config.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/gear.hpp"
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
};

// Head stores that are not packed_rows report what one attention reads.
template <class S, class = void>
struct has_stored_bytes : std::false_type {};
template <class S>
struct has_stored_bytes<S, std::void_t<decltype(std::declval<const S&>().stored_bytes())>> : std::true_type {};

template <class Cache>
class target_of final : public target {
public:
    template <class... Policies>
    explicit target_of(const kvc::cache_config& c, Policies&&... policies)
        : cache_(c, std::forward<Policies>(policies)...) {}
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
        } else {
            std::size_t total = 0;
            for (std::size_t h = 0; h < kv_heads; ++h) {
                const auto& head = cache_.head(layer, h);
                if constexpr (has_stored_bytes<std::decay_t<decltype(head)>>::value) {
                    total += head.stored_bytes();
                } else {
                    total += head.packed_tokens() * (head.key_row_bytes() + head.value_row_bytes()) +
                             head.sink_tokens() * kvc::packed_layout::sink_token_bytes(dim);
                }
            }
            return total;
        }
    }

private:
    Cache cache_;
};

struct codec {
    std::string name;
    double bits_per_value; // key and value average, scales included (16 for fp16)
    std::function<std::unique_ptr<target>(const kvc::cache_config&)> make;
};

template <class Q>
codec codec_of(std::string name) {
    return codec{std::move(name), (Q::key_bits_per_value() + Q::value_bits_per_value()) / 2.0,
                 [](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<Q>>>(c);
                 }};
}

// A codec whose policy carries run-time parameters (kvc::quant::gear).
template <class Q>
codec codec_with(std::string name, const Q& policy, double bits_per_value) {
    return codec{std::move(name), bits_per_value, [policy](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<cache_of<Q>>>(c, kvc::evict::none{}, kvc::merge::none{}, policy);
                 }};
}

kvc::quant::gear gear_bits(unsigned bits) {
    kvc::quant::gear g;
    g.bits = bits;
    return g;
}

codec full_fp16() {
    return codec{"f16_full", 16.0, [](const kvc::cache_config& c) -> std::unique_ptr<target> {
                     return std::make_unique<target_of<kvc::full_cache>>(c);
                 }};
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

std::unique_ptr<decode_fixture> build_decode_fixture(const codec& c) {
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

void BM_quant_append(benchmark::State& state, codec c) {
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

void BM_quant_fidelity(benchmark::State& state, codec c, std::size_t outliers) {
    const kvc::cache_config config = config_for(1);
    const auto keys = synthetic(fidelity_tokens, 11, outliers);
    const auto values = synthetic(fidelity_tokens, 12, outliers);
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
        full->append(0, key_view, value_view, 0);
        packed->append(0, key_view, value_view, 0);
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
