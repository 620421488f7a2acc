// bench/eviction.cpp -- what eviction costs and what it buys at decode time.
//
// Every cache but full_cache and the static side of BM_run_time_decode and
// BM_bias_decode is built from its spec by kvc's registry (kvc::make_cache:
// "knorm:0.25", "q4_0 + snapkv:0.25"), the scorer erased inside the cache:
// one indirect call per head and compression, per attention call for the
// statistics, and per appended token for the token-by-token append scorers
// (knorm, CUR).
//
// BM_evict_compress/<scorer>/<resource>: one layer of 32K tokens, 8 KV heads,
// head dim 128, fp16 rows; one iteration = cache.compress(layer) down to keep
// ratio 0.25 (scoring every head, selecting, compacting, returning the
// memory). Each iteration starts from a fresh copy of the full layer, made
// with the timer paused. `vs_attention` = compress time / the time of one
// full decode attention pass over the same uncompressed layer (GQA 4, 32
// query heads), measured in the same process before the timed loop (fastest
// of 5 calls). <resource> is where the cache's memory comes from:
// new_delete (operator new: the compacted buffers are fresh pages, faulted
// in and zeroed by the kernel as they are written, and the freed ones go back
// to the OS) or pool (kvc::recycling_resource, warmed by one untimed
// compression: what an engine serving many sequences sees).
//
// BM_evict_append/<scorer>: what scoring at append costs (knorm, CUR and
// LagKV score there so that compression need not read the rows): appending
// one 32K-token layer (8 KV heads, dim 128, fp16, 1K-token appends) to a
// cache with the scorer, against the same appends to fp16 full_cache,
// alternating in one process; vs_plain_time = the scorer cache's total / full_cache's.
//
// BM_attention_stats/h2o: the overhead of collecting per-token attention
// statistics in the fused attention (see the function).
//
// BM_prompt_compression/q4_0+snapkv: where the engine pays for compressing
// its prompt. Four layers (8 KV heads, 32 query heads, head dim 128) of a
// q4_0 + SnapKV (keep ratio 0.25, after-prefill schedule) cache, prefilled
// once with a 2048-token random prompt in 64-token chunks (append +
// attend_chunk, as an engine does, so SnapKV's window holds the last
// queries). Each iteration takes two fresh copies of it (timer paused) and
// times, on one, (a) the first decode step, append + attend for every layer,
// whose appends compress the prompt inside themselves (`inside_ms`, also
// the row's time); on the other, (b) compress(layer) for every layer
// (`compress_ms`) and then (c) the same first decode step (`after_ms`).
// Which copy goes first alternates. `inside_vs_after` = a / c: how much
// longer the first step takes when it compresses.
//
// BM_evict_decode/<scorer>: decode attention after eviction to 0.25, four
// layers visited round robin (so the 4 x 32 MiB working set is not served by a
// 32 MiB L3), against fp16 full_cache on the same shape, both attended in
// every iteration, which one first alternating, so both see the same machine state:
// `vs_full_time` = its total attend time / full_cache's, `vs_full_bytes` = its
// bytes / full_cache's bytes for the same layers. (It used to divide a mean
// by full_cache's fastest of 8 calls, which favoured full_cache.)
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/recycling_resource.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/registry.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_bench {
namespace {

constexpr std::size_t evict_tokens = 32768, evict_heads = 8, evict_dim = 128, evict_group = 4;
constexpr double evict_ratio = 0.25;

kvc::cache_config evict_shape(std::size_t layers) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = evict_heads;
    c.query_heads = evict_heads * evict_group;
    c.head_dim = evict_dim;
    c.storage = kvc::dtype::f16;
    return c;
}

// Fills every layer with `tokens` random rows (a 1K-token random block repeated
// with a per-block offset, so norms and directions differ along the sequence).
template <class Cache>
void fill(Cache& cache, std::size_t layers, std::size_t tokens) {
    constexpr std::size_t chunk = 1024;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    std::vector<float> keys(chunk * evict_heads * evict_dim), values(keys.size());
    for (float& x : keys) x = normal(rng);
    for (float& x : values) x = normal(rng);
    cache.reserve(tokens);
    for (std::size_t t = 0; t < tokens; t += chunk) {
        for (std::size_t i = 0; i < keys.size(); i += 97) keys[i] += 0.01f * static_cast<float>(t / chunk);
        const kvc::kv_view<const float> k(keys.data(), chunk, evict_heads, evict_dim);
        const kvc::kv_view<const float> v(values.data(), chunk, evict_heads, evict_dim);
        for (std::size_t l = 0; l < layers; ++l) cache.append(l, k, v, static_cast<std::int64_t>(t));
    }
}

std::vector<float> queries() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal;
    std::vector<float> q(evict_heads * evict_group * evict_dim);
    for (float& x : q) x = normal(rng);
    return q;
}

template <class Cache>
double fastest_attend_seconds(Cache& cache, std::size_t layers, int calls) {
    const auto q = queries();
    std::vector<float> out(q.size());
    double best = 1e30;
    for (int i = 0; i < calls; ++i) {
        const auto start = std::chrono::steady_clock::now();
        cache.attend(static_cast<std::size_t>(i) % layers, q.data(), out.data());
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
}

// The caches here are built from their spec by kvc's registry (a
// kvc::dynamic_cache), as a run-time user builds them: `scorer` at the
// benchmark's keep ratio over fp16 rows.
kvc::dynamic_cache evicting(const kvc::cache_config& c, const std::string& scorer) {
    return kvc::make_cache(c, scorer + ":" + std::to_string(evict_ratio));
}

void BM_evict_compress(benchmark::State& state, const std::string& scorer) {
    const bool pooled = state.range(0) != 0;
    kvc::recycling_resource pool;
    kvc::cache_config c = evict_shape(1);
    if (pooled) c.resource = &pool;
    kvc::dynamic_cache full = evicting(c, scorer);
    fill(full, 1, evict_tokens);
    const double attention = fastest_attend_seconds(full, 1, 5);
    if (pooled) { // one compression, so the pool holds blocks of the compacted sizes
        kvc::dynamic_cache warm = full;
        warm.compress(0);
    }
    double total = 0.0;
    for (auto _ : state) {
        state.PauseTiming();
        kvc::dynamic_cache copy = full;
        state.ResumeTiming();
        const auto start = std::chrono::steady_clock::now();
        copy.compress(0);
        total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        benchmark::DoNotOptimize(copy.tokens(0));
        state.PauseTiming();
        { kvc::dynamic_cache release = std::move(copy); }
        state.ResumeTiming();
    }
    state.counters["vs_attention"] = total / static_cast<double>(state.iterations()) / attention;
    state.counters["attention_ms"] = attention * 1e3;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

void BM_evict_append(benchmark::State& state, const std::string& scorer) {
    const kvc::cache_config c = evict_shape(1);
    double with_scores = 0.0, plain = 0.0;
    for (auto _ : state) {
        {
            kvc::dynamic_cache cache = evicting(c, scorer);
            const auto start = std::chrono::steady_clock::now();
            fill(cache, 1, evict_tokens);
            with_scores += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            benchmark::DoNotOptimize(cache.tokens(0));
        }
        {
            kvc::full_cache cache(c);
            const auto start = std::chrono::steady_clock::now();
            fill(cache, 1, evict_tokens);
            plain += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            benchmark::DoNotOptimize(cache.tokens(0));
        }
    }
    state.counters["vs_plain_time"] = with_scores / plain;
    state.counters["append_ms"] = with_scores / static_cast<double>(state.iterations()) * 1e3;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

std::vector<float> normal_floats(std::size_t count, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<float> values(count);
    for (float& x : values) x = normal(rng);
    return values;
}

void BM_prompt_compression(benchmark::State& state) {
    constexpr std::size_t layers = 4, prompt = 2048, chunk = 64;
    using cache_type = kvc::dynamic_cache;
    const kvc::cache_config c = evict_shape(layers);
    const std::size_t kv_row = evict_heads * evict_dim, q_row = c.query_heads * evict_dim;
    cache_type prefilled = kvc::make_cache(c, "q4_0 + snapkv:" + std::to_string(evict_ratio));
    {
        const std::vector<float> keys = normal_floats(prompt * kv_row, 1), values = normal_floats(prompt * kv_row, 2);
        const std::vector<float> q = normal_floats(prompt * q_row, 3);
        std::vector<float> out(chunk * q_row);
        for (std::size_t first = 0; first < prompt; first += chunk)
            for (std::size_t l = 0; l < layers; ++l) {
                prefilled.append(l, kvc::kv_view<const float>(keys.data() + first * kv_row, chunk, evict_heads, evict_dim),
                                 kvc::kv_view<const float>(values.data() + first * kv_row, chunk, evict_heads, evict_dim),
                                 static_cast<std::int64_t>(first));
                prefilled.attend_chunk(l, q.data() + first * q_row, chunk, out.data());
            }
    }
    const std::vector<float> key = normal_floats(kv_row, 4), value = normal_floats(kv_row, 5), q = normal_floats(q_row, 6);
    std::vector<float> out_inside(q.size()), out_after(q.size());
    const kvc::kv_view<const float> k1(key.data(), 1, evict_heads, evict_dim), v1(value.data(), 1, evict_heads, evict_dim);
    auto seconds_of = [](auto&& work) {
        const auto start = std::chrono::steady_clock::now();
        work();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    auto first_decode_step = [&](cache_type& cache, std::vector<float>& out) {
        for (std::size_t l = 0; l < layers; ++l) {
            cache.append(l, k1, v1, static_cast<std::int64_t>(prompt));
            cache.attend(l, q.data(), out.data());
        }
        benchmark::DoNotOptimize(out.data());
    };
    double inside = 0.0, compress = 0.0, after = 0.0;
    bool inside_first = true;
    for (auto _ : state) {
        cache_type compressing = prefilled, explicit_first = prefilled;
        double this_inside = 0.0;
        for (int i = 0; i < 2; ++i) {
            if ((i == 0) == inside_first) {
                this_inside = seconds_of([&] { first_decode_step(compressing, out_inside); });
            } else {
                compress += seconds_of([&] { explicit_first.compress(); });
                after += seconds_of([&] { first_decode_step(explicit_first, out_after); });
            }
        }
        // The same compression either way: the same tokens kept, the same attention output.
        if (compressing.tokens(0) != explicit_first.tokens(0) || out_inside != out_after) {
            state.SkipWithError("compressing inside the append and explicitly gave different caches");
            break;
        }
        inside += this_inside;
        state.SetIterationTime(this_inside);
        inside_first = !inside_first;
    }
    const double iterations = static_cast<double>(state.iterations());
    state.counters["inside_ms"] = inside / iterations * 1e3;
    state.counters["compress_ms"] = compress / iterations * 1e3;
    state.counters["after_ms"] = after / iterations * 1e3;
    state.counters["inside_vs_after"] = inside / after;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

void BM_evict_decode(benchmark::State& state, const std::string& scorer) {
    constexpr std::size_t layers = 4;
    const kvc::cache_config c = evict_shape(layers);
    kvc::full_cache full(c);
    fill(full, layers, evict_tokens);
    kvc::dynamic_cache cache = evicting(c, scorer);
    fill(cache, layers, evict_tokens);
    cache.compress();
    const auto q = queries();
    std::vector<float> out(q.size());
    std::size_t layer = 0;
    double evicted_seconds = 0.0, full_seconds = 0.0;
    bool evicted_first = true;
    for (auto _ : state) {
        for (int i = 0; i < 2; ++i) {
            const bool evicted = (i == 0) == evicted_first;
            const auto start = std::chrono::steady_clock::now();
            if (evicted) cache.attend(layer, q.data(), out.data());
            else full.attend(layer, q.data(), out.data());
            (evicted ? evicted_seconds : full_seconds) +=
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            benchmark::DoNotOptimize(out.data());
        }
        layer = (layer + 1) % layers;
        evicted_first = !evicted_first;
    }
    const double per_call = evicted_seconds / static_cast<double>(state.iterations());
    const double read = static_cast<double>(cache.tokens(0)) * evict_dim * 2 * 2;
    state.counters["vs_full_time"] = evicted_seconds / full_seconds;
    state.counters["vs_full_bytes"] = static_cast<double>(cache.bytes()) / static_cast<double>(full.bytes());
    state.counters["evicted_ms"] = per_call * 1e3;
    state.counters["full_ms"] = full_seconds / static_cast<double>(state.iterations()) * 1e3;
    state.counters["bw_fraction"] = read / per_call / single_thread_read_bandwidth().bytes_per_second;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

// Issue 12 item 4: a merging policy's per-token logit bias (log counts) in
// decode attention. A cache whose policy declares the bias column with every
// count 1 (bias 0) against the same storage without the column: the same
// outputs, and with_bias_vs_none is what reading one float per token more costs.
struct zero_bias {
    using family = kvc::merging_family;
    static constexpr bool merges = false;
    using columns = kvc::column_list<kvc::attention_bias_column>; // starts at 0 for every token
};

void BM_bias_decode(benchmark::State& state) {
    constexpr std::size_t layers = 4;
    const kvc::cache_config c = evict_shape(layers);
    using plain_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>,
                                              kvc::project::none>;
    using biased_cache = kvc::compressed_cache<kvc::evict::none, zero_bias, kvc::quant::none<kvc::half>,
                                               kvc::project::none>;
    plain_cache plain(c);
    biased_cache biased(c);
    fill(plain, layers, evict_tokens);
    fill(biased, layers, evict_tokens);
    const auto q = queries();
    std::vector<float> out(q.size()), check(q.size());
    std::size_t layer = 0;
    double biased_seconds = 0.0, plain_seconds = 0.0;
    bool biased_first = true;
    for (auto _ : state) {
        for (int i = 0; i < 2; ++i) {
            const bool with_bias = (i == 0) == biased_first;
            const auto start = std::chrono::steady_clock::now();
            if (with_bias) biased.attend(layer, q.data(), out.data());
            else plain.attend(layer, q.data(), check.data());
            (with_bias ? biased_seconds : plain_seconds) +=
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
        if (out != check) {
            state.SkipWithError("a zero bias changed the attention output");
            break;
        }
        layer = (layer + 1) % layers;
        biased_first = !biased_first;
    }
    const double iterations = static_cast<double>(state.iterations());
    state.counters["with_bias_ms"] = biased_seconds / iterations * 1e3;
    state.counters["no_bias_ms"] = plain_seconds / iterations * 1e3;
    state.counters["with_bias_vs_none"] = biased_seconds / plain_seconds;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

// The cost of the statistics attention-based scorers consume (issue 4: below
// 10% of attention time). Four 32K-token layers, GQA 4, fp16, visited round
// robin. Each iteration times one decode attend of an H2O cache (the fused
// kernel writes every logit, they become per-token attention mass, folded
// into H2O's running statistic), one of a compressed_cache whose policy needs
// no statistics (streaming: the same storage and kernels without them) and
// one of fp16 full_cache, on the same rows, in an order that rotates every
// iteration (whichever ran first was measurably favoured).
// vs_plain_time = H2O's total / the statistics-free cache's; vs_full_time = H2O's / full_cache's.
void BM_attention_stats(benchmark::State& state) {
    constexpr std::size_t layers = 4;
    const kvc::cache_config c = evict_shape(layers);
    kvc::full_cache full(c);
    fill(full, layers, evict_tokens);
    kvc::dynamic_cache plain = evicting(c, "streaming");
    fill(plain, layers, evict_tokens);
    kvc::dynamic_cache stats = evicting(c, "h2o");
    fill(stats, layers, evict_tokens); // appends only: no prefill, so nothing is evicted
    const auto q = queries();
    std::vector<float> out(q.size());
    double seconds[3] = {0.0, 0.0, 0.0}; // H2O, statistics-free, full_cache
    std::size_t layer = 0, turn = 0;
    for (auto _ : state) {
        for (std::size_t i = 0; i < 3; ++i) {
            const std::size_t which = (turn + i) % 3;
            const auto start = std::chrono::steady_clock::now();
            if (which == 0) stats.attend(layer, q.data(), out.data());
            else if (which == 1) plain.attend(layer, q.data(), out.data());
            else full.attend(layer, q.data(), out.data());
            seconds[which] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            benchmark::DoNotOptimize(out.data());
        }
        layer = (layer + 1) % layers;
        turn = (turn + 1) % 3;
    }
    const double calls = static_cast<double>(state.iterations());
    state.counters["vs_plain_time"] = seconds[0] / seconds[1];
    state.counters["vs_full_time"] = seconds[0] / seconds[2];
    state.counters["stats_ms"] = seconds[0] / calls * 1e3;
    state.counters["plain_ms"] = seconds[1] / calls * 1e3;
    state.counters["full_ms"] = seconds[2] / calls * 1e3;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

} // namespace

// Issue 13: a cache composed at run time (kvc::make_cache's dynamic_cache:
// one virtual call into compressed_cache<evict::any, merge::none, quant::any>,
// the codec and the scorer erased inside) against the statically composed type,
// at 32K tokens per head (four layers, visited round robin, the order of the
// two rotating every iteration). Target: run_time_vs_static <= 1.03. The
// outputs must be identical (checked every iteration).
template <class StaticCache, class RunTimeCache>
void time_run_time_against_static(benchmark::State& state, StaticCache& fixed, RunTimeCache& chosen) {
    constexpr std::size_t layers = 4;
    const auto q = queries();
    std::vector<float> out(q.size()), check(q.size());
    std::size_t layer = 0;
    double chosen_seconds = 0.0, fixed_seconds = 0.0;
    bool chosen_first = true;
    for (auto _ : state) {
        for (int i = 0; i < 2; ++i) {
            const bool run_time = (i == 0) == chosen_first;
            const auto start = std::chrono::steady_clock::now();
            if (run_time) chosen.attend(layer, q.data(), out.data());
            else fixed.attend(layer, q.data(), check.data());
            (run_time ? chosen_seconds : fixed_seconds) +=
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
        if (out != check) {
            state.SkipWithError("the run-time cache's output differs from the static cache's");
            break;
        }
        layer = (layer + 1) % layers;
        chosen_first = !chosen_first;
    }
    const double iterations = static_cast<double>(state.iterations());
    state.counters["run_time_ms"] = chosen_seconds / iterations * 1e3;
    state.counters["static_ms"] = fixed_seconds / iterations * 1e3;
    state.counters["run_time_vs_static"] = chosen_seconds / fixed_seconds;
    state.counters["tokens_per_head"] = static_cast<double>(chosen.tokens(0, 0));
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

void BM_run_time_decode_f16(benchmark::State& state) {
    constexpr std::size_t layers = 4;
    const kvc::cache_config c = evict_shape(layers);
    kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::none> fixed(c);
    kvc::dynamic_cache chosen = kvc::make_cache(c, "none:f16");
    fill(fixed, layers, evict_tokens);
    fill(chosen, layers, evict_tokens);
    time_run_time_against_static(state, fixed, chosen);
}

void BM_run_time_decode_q4_0_snapkv(benchmark::State& state) {
    constexpr std::size_t layers = 4;
    const kvc::cache_config c = evict_shape(layers);
    const kvc::evict::snapkv policy(kvc::evict::budget::ratio(evict_ratio));
    kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::q4_0, kvc::project::none> fixed(c, policy);
    kvc::dynamic_cache chosen = kvc::make_cache(c, "q4_0 + snapkv:" + std::to_string(evict_ratio));
    // 4 x 32K tokens, compressed to a quarter: what the cache attends over at 32K of context.
    fill(fixed, layers, evict_tokens);
    fill(chosen, layers, evict_tokens);
    fixed.compress();
    chosen.compress();
    time_run_time_against_static(state, fixed, chosen);
}

void register_eviction_benchmarks() {
    // The score-only policies of issue 4's cost target: E1, E7, E8, E11, E13.
    const auto compress = [](const char* name, auto function) {
        for (const char* resource : {"new_delete", "pool"})
            benchmark::RegisterBenchmark((std::string("BM_evict_compress/") + name + "/" + resource).c_str(), function)
                ->Arg(std::string(resource) == "pool" ? 1 : 0)
                ->Unit(benchmark::kMillisecond)
                ->Iterations(4);
    };
    for (const char* scorer : {"streaming", "knorm", "keydiff", "lagkv", "cur"})
        compress(scorer, [scorer](benchmark::State& state) { BM_evict_compress(state, scorer); });
    for (const char* scorer : {"streaming", "knorm", "cur", "lagkv"})
        benchmark::RegisterBenchmark((std::string("BM_evict_append/") + scorer).c_str(),
                                     [scorer](benchmark::State& state) { BM_evict_append(state, scorer); })
            ->Unit(benchmark::kMillisecond)
            ->Iterations(3);
    benchmark::RegisterBenchmark("BM_prompt_compression/q4_0+snapkv", BM_prompt_compression)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(10);
    benchmark::RegisterBenchmark("BM_evict_decode/knorm", [](benchmark::State& state) { BM_evict_decode(state, "knorm"); })
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.5);
    benchmark::RegisterBenchmark("BM_bias_decode/f16", BM_bias_decode)->Unit(benchmark::kMillisecond)->MinTime(0.5);
    benchmark::RegisterBenchmark("BM_run_time_decode/f16", BM_run_time_decode_f16)
        ->Unit(benchmark::kMillisecond)
        ->MinTime(1.0);
    benchmark::RegisterBenchmark("BM_run_time_decode/q4_0+snapkv", BM_run_time_decode_q4_0_snapkv)
        ->Unit(benchmark::kMillisecond)
        ->MinTime(1.0);
    benchmark::RegisterBenchmark("BM_attention_stats/h2o", BM_attention_stats)->Unit(benchmark::kMillisecond)->MinTime(3.0);
}

} // namespace kvc_bench
