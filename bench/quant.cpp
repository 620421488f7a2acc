// bench/quant.cpp -- every codec of kvc's registry against fp16 full_cache:
// decode attention, quantize-on-append, and attention-output error.
//
// The codecs are kvc::methods() of the quantization family, each built by
// kvc::make_cache from its spec (its name, at its default parameter, plus a
// few other parameter values listed in codecs()): rows are named by spec, and
// a codec added to the registry is measured here with no edit to this file.
//
// BM_quant_decode: one decode step of one layer (cache.attend for 32 query
// heads over 8 KV heads, GQA 4, head dim 128) at 32K tokens, single thread,
// cold caches as in bench/decode.cpp (enough identical layers for >= 128 MiB,
// visited round robin). The fp16 full_cache of the same shape is kept in the
// same process and measured (>= 0.3 s of calls) right before every row's timed
// loop, and every row reports
//   vs_full_time    its time per call / full_cache fp16 time per call
//   vs_full_bytes   its cache bytes per layer / full_cache fp16 bytes per layer
//   bw_fraction     bytes one call reads (stored_bytes(layer): every key and
//                   value group, scales, codebooks and fp16 rows included)
//                   / time / single-thread read bandwidth
//   bits_per_value  those bytes per key or value element, in bits
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
// and rel_error_max. The KVQuant rows (kvquant@3bit, kvquant@4bit: the spec
// "kvquant" with artifacts learnt at 3 and 4 bits) take the keys as if they
// were pre-RoPE: their fp16 reference holds the keys after RoPE (default
// rope_config) at positions 0.. . scripts/quant_report.py turns all three
// into docs/QUANTIZATION.md.
//
// Q6 (mixed:*) is given its precision from E7 knorm scores of the appended
// keys once a layer is filled, a stand-in for any scorer. Calibrated codecs
// (Q3 KVQuant, Q8 CQ) learn their artifact before a benchmark from a small
// held-out sample of that benchmark's own data distribution (1024 tokens of
// one layer, never the measured tokens); the layers of the decode fixture are
// i.i.d., so one layer's codebooks serve every layer.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/registry.hpp"
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

// A cache of either kind behind one interface: the fp16 full_cache baseline
// or a codec's cache as kvc's registry builds it (kvc::dynamic_cache).
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
    virtual std::size_t stored_bytes(std::size_t layer) const = 0; // what one attend reads
    // Q6 (mixed precision): after a layer's tokens are in, each head's
    // precision is assigned from `scores` (tokens x kv_heads, token-major).
    virtual bool assigns_precision() const { return false; }
    virtual void assign_precision(std::size_t, const std::vector<float>&) {}
};

template <class Cache>
class target_of final : public target {
public:
    explicit target_of(Cache cache) : cache_(std::move(cache)) {}
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
    std::size_t stored_bytes(std::size_t layer) const override { return cache_.stored_bytes(layer); }
    bool assigns_precision() const override {
        if constexpr (std::is_same_v<Cache, kvc::dynamic_cache>)
            return cache_.offers(kvc::store_capability::assign_precision);
        else
            return false;
    }
    void assign_precision(std::size_t layer, const std::vector<float>& scores) override {
        if constexpr (std::is_same_v<Cache, kvc::dynamic_cache>) {
            const std::size_t tokens = scores.size() / kv_heads;
            std::vector<float> head(tokens);
            for (std::size_t h = 0; h < kv_heads; ++h) {
                for (std::size_t t = 0; t < tokens; ++t) head[t] = scores[t * kv_heads + h];
                cache_.assign_precision(layer, h, head.data());
            }
            cache_.shrink_to_fit();
        } else {
            (void)layer, (void)scores;
        }
    }

private:
    Cache cache_;
};

// E7 knorm's score of each appended key (-||k||: low-norm keys draw
// attention), token-major over the KV heads: Q6's stand-in for any scorer.
void append_key_norm_scores(const std::vector<float>& keys, std::vector<float>& scores) {
    const kvc::kernels::kernel_table& k = kvc::kernels::active();
    for (std::size_t row = 0; row < keys.size() / dim; ++row)
        scores.push_back(kvc::evict::score::knorm{}.on_append(k, keys.data() + row * dim, nullptr, dim));
}

// One benchmarked codec: a registry spec. Calibrated methods learn their
// artifact from a sample of the benchmark's own data (1024 tokens of one
// layer, never the measured tokens; the layers of the decode fixture are
// i.i.d., so one layer's artifact serves every layer).
struct codec {
    codec(std::string row_name, std::string registry_spec) : name(std::move(row_name)), spec(std::move(registry_spec)) {}

    std::string name; // the row's name: the spec, and the calibration when a learner sets more than the spec
    std::string spec;
    // Learns the method's artifact from the sample ([calibration_tokens][kv_heads][dim])
    // for a cache of `config`; empty for uncalibrated methods.
    std::function<kvc::calibration::artifact(const kvc::cache_config&, const std::vector<float>&,
                                              const std::vector<float>&)>
        learn;
    // Keys are appended before RoPE (KVQuant rotates them inside attention):
    // the fp16 reference of the fidelity rows then holds the keys after RoPE.
    bool keys_before_rope = false;
    bool full_cache = false; // the fp16 full_cache baseline, not a registry cache

    kvc::cache_options options; // the learnt artifact once ready()

    std::unique_ptr<target> make(const kvc::cache_config& config) const {
        if (full_cache) return std::make_unique<target_of<kvc::full_cache>>(kvc::full_cache(config));
        return std::make_unique<target_of<kvc::dynamic_cache>>(kvc::make_cache(config, spec, options));
    }
};

// `c` ready to make caches for `config`: calibrated on the sample `draw` produces when it needs one.
template <class Draw>
codec ready(const codec& c, const kvc::cache_config& config, Draw&& draw) {
    if (!c.learn) return c;
    std::vector<float> keys, values;
    draw(keys, values);
    codec out = c;
    const kvc::spec_term method = kvc::parse_spec(c.spec).front();
    out.options.artifacts[method.method->name] = c.learn(config, keys, values);
    return out;
}

// CQ with c channels per group and b bits per code, learnt on one layer and
// the codebooks repeated for every layer of the cache.
codec cq_codec(std::string spec, std::size_t channels, std::size_t bits) {
    codec c(spec, spec);
    c.learn = [channels, bits](const kvc::cache_config& config, const std::vector<float>& keys,
                               const std::vector<float>& values) {
        kvc::calibration::cq_options o;
        o.channels_per_group = channels;
        o.bits = bits;
        o.iterations = 10;
        kvc::calibration::artifact tiled = kvc::calibration::calibrate_cq(
            kvc::kv_view<const float>(keys.data(), calibration_tokens, kv_heads, dim),
            kvc::kv_view<const float>(values.data(), calibration_tokens, kv_heads, dim), o);
        for (kvc::calibration::tensor& t : tiled.tensors) {
            if (t.shape.size() != 5) continue;
            const std::vector<float> layer = t.values;
            t.shape[0] = config.layers;
            t.values.clear();
            for (std::size_t l = 0; l < config.layers; ++l) t.values.insert(t.values.end(), layer.begin(), layer.end());
        }
        return tiled;
    };
    return c;
}

// KVQuant at `bits`, 1% outliers, calibrated on the sample for every layer.
// The bench appends its keys as if they were pre-RoPE keys (the codec
// rotates them inside attention, with the default rope_config).
codec kvquant_codec(unsigned bits) {
    codec c("kvquant@" + std::to_string(bits) + "bit", "kvquant");
    c.keys_before_rope = true;
    c.learn = [bits](const kvc::cache_config& config, const std::vector<float>& keys,
                     const std::vector<float>& values) {
        const std::size_t tokens = keys.size() / (kv_heads * dim);
        std::vector<kvc::kv_view<const float>> k, v;
        for (std::size_t l = 0; l < config.layers; ++l) {
            k.emplace_back(keys.data(), tokens, kv_heads, dim);
            v.emplace_back(values.data(), tokens, kv_heads, dim);
        }
        kvc::calibration::kvquant_options o;
        o.bits = bits;
        o.outlier_fraction = 0.01;
        return kvc::calibration::calibrate_kvquant(config, k, v, o);
    };
    return c;
}

codec full_fp16() {
    codec c("f16_full", "");
    c.full_cache = true;
    return c;
}

// Every codec of kvc's registry (kvc::methods(), family quantization) by its
// name at its default parameter, plus the parameter values below; the
// calibrated ones with the learner this file has for them. A codec added to
// the registry is benchmarked without touching this file, unless it is
// calibrated (then its learner goes in learners()).
std::vector<codec> codecs() {
    const std::vector<std::string> more_values = {"kivi:4", "sparse:0.7"};
    std::vector<codec> list;
    for (const kvc::method_info& m : kvc::methods()) {
        if (m.family != kvc::method_family::quantization) continue;
        if (m.name == "kvquant") {
            list.push_back(kvquant_codec(3));
            list.push_back(kvquant_codec(4));
        } else if (m.name == "cq:c4b8") {
            list.push_back(cq_codec(m.name, 4, 8));
        } else if (m.name == "cq:c8b8") {
            list.push_back(cq_codec(m.name, 8, 8));
        } else if (m.calibrated) {
            throw std::runtime_error("bench/quant.cpp: no learner for the calibrated codec " + m.name);
        } else {
            list.emplace_back(m.name, m.name);
        }
    }
    for (const std::string& spec : more_values) list.emplace_back(spec, spec);
    return list;
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

// Appends `tokens` of noise to `layer` in chunks; Q6 codecs then get
// their precision assigned from the keys' knorm scores.
void fill_layer(target& cache, std::size_t layer, std::size_t tokens, noise& rng) {
    std::vector<float> keys(fill_chunk * kv_heads * dim), values(keys.size()), scores;
    for (std::size_t t0 = 0; t0 < tokens; t0 += fill_chunk) {
        for (std::size_t i = 0; i < keys.size(); ++i) {
            keys[i] = rng.next();
            values[i] = rng.next();
        }
        cache.append(layer, kvc::kv_view<const float>(keys.data(), fill_chunk, kv_heads, dim),
                     kvc::kv_view<const float>(values.data(), fill_chunk, kv_heads, dim), static_cast<std::int64_t>(t0));
        if (cache.assigns_precision()) append_key_norm_scores(keys, scores);
    }
    if (cache.assigns_precision()) cache.assign_precision(layer, scores);
}

std::unique_ptr<decode_fixture> build_decode_fixture(const codec& uncalibrated) {
    // Layer size from a one-layer probe: its bytes empty and after
    // probe_tokens, extrapolated to decode_tokens (codebooks and other
    // per-head parts counted once).
    constexpr std::size_t probe_tokens = 4 * fill_chunk;
    double layer_bytes = 0.0;
    {
        const codec probe_codec = ready(uncalibrated, config_for(1), draw_noise);
        const std::unique_ptr<target> probe = probe_codec.make(config_for(1));
        probe->reserve(probe_tokens);
        const double empty = static_cast<double>(probe->stored_bytes(0));
        noise rng(17);
        fill_layer(*probe, 0, probe_tokens, rng);
        const double per_token = (static_cast<double>(probe->stored_bytes(0)) - empty) / probe_tokens;
        layer_bytes = empty + per_token * decode_tokens;
    }
    std::size_t layers = std::max<std::size_t>(2, static_cast<std::size_t>(std::ceil(min_working_set_bytes / layer_bytes)));
    layers += layers % 2;
    const codec c = ready(uncalibrated, config_for(layers), draw_noise);
    auto fixture = std::make_unique<decode_fixture>();
    fixture->codec = c.name;
    fixture->layers = layers;
    fixture->cache = c.make(config_for(layers));
    fixture->cache->reserve(decode_tokens);
    noise rng(decode_tokens * 131 + dim * 7 + group);
    for (std::size_t layer = 0; layer < layers; ++layer) fill_layer(*fixture->cache, layer, decode_tokens, rng);
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
    // What one attention reads per key or value element: scales, codebooks,
    // fp16 sinks and residual rows included.
    state.counters["bits_per_value"] = 8.0 * static_cast<double>(fixture->read_bytes_per_call) /
                                       static_cast<double>(decode_tokens * kv_heads * dim * 2);
    state.counters["kv_bytes"] = benchmark::Counter(static_cast<double>(fixture->bytes_per_layer),
                                                    benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
    state.counters["layers"] = static_cast<double>(fixture->layers);
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

// ---------------------------------------------------------------------------
// Quantize on append (prefill path).

void BM_quant_append(benchmark::State& state, codec uncalibrated) {
    const kvc::cache_config config = config_for(1);
    const codec c = ready(uncalibrated, config, draw_noise);
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
    const codec c = ready(uncalibrated, config, [&](std::vector<float>& k, std::vector<float>& v) {
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
        if (packed->assigns_precision()) {
            std::vector<float> scores;
            append_key_norm_scores(keys, scores);
            packed->assign_precision(0, scores);
        }
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
