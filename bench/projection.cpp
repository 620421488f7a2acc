// bench/projection.cpp -- P1 PCA projection against fp16 full_cache at decode.
//
// BM_project_decode/method:pca/rank:R: one decode step of one layer
// (cache.attend for 32 query heads over 8 KV heads, GQA 4, head dim 128) at
// 32K tokens, fp16 storage (latents fp16 for PCA), one thread; the row's
// time is the PCA cache's attend alone. The PCA cache
// and an fp16 full_cache of the same shape live in the same process; each
// iteration attends one layer of each, which one first alternating, so both
// see the same machine state; each has enough layers, visited round robin,
// for a working set >= 128 MiB (caches cold as in bench/decode.cpp).
//   vs_full_time   PCA attend time / full_cache attend time (sums over the iterations)
//   vs_full_bytes  PCA cache bytes per layer / full_cache bytes per layer
//                  (the latents and each head's two fp32 bases)
//   bw_fraction    bytes one PCA attend reads (latents and bases) / its time /
//                  the single-thread read bandwidth measured at start-up
// Issue 15's target: rank d/4 (32) vs_full_time <= 0.3.
// The bases are the first R coordinate axes (orthonormal, and the time does
// not depend on which orthonormal basis it is); rows are uniform noise.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_bench {
namespace {

constexpr std::size_t kv_heads = 8, group = 4, dim = 128, tokens = 32768, fill_chunk = 1024;
constexpr std::size_t min_working_set_bytes = std::size_t{128} << 20;

using pca_cache = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>,
                                        kvc::project::pca>;

kvc::cache_config shape(std::size_t layers) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads * group;
    c.head_dim = dim;
    c.storage = kvc::dtype::f16;
    return c;
}

// Layers for a working set of at least min_working_set_bytes at `bytes_per_token` a token of one KV head.
std::size_t layers_for(std::size_t bytes_per_token) {
    const double layer = static_cast<double>(bytes_per_token * kv_heads * tokens);
    return std::max<std::size_t>(2, static_cast<std::size_t>(std::ceil(min_working_set_bytes / layer)));
}

kvc::project::pca axes(std::size_t layers, std::size_t rank) {
    kvc::project::pca_bases b{layers, kv_heads, dim, rank, {}, {}};
    b.keys.assign(layers * kv_heads * dim * rank, 0.0f);
    for (std::size_t head = 0; head < layers * kv_heads; ++head)
        for (std::size_t j = 0; j < rank; ++j) b.keys[head * dim * rank + j * rank + j] = 1.0f;
    b.values = b.keys;
    return kvc::project::pca(std::move(b));
}

// Every layer filled with `tokens` rows of deterministic noise in [-1, 1), in chunks.
template <class Cache>
void fill(Cache& cache, std::size_t layers) {
    std::uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&state] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return static_cast<float>(static_cast<std::int32_t>(state >> 32)) * 0x1p-31f;
    };
    std::vector<kvc::half> keys(fill_chunk * kv_heads * dim), values(keys.size());
    cache.reserve(tokens);
    for (std::size_t layer = 0; layer < layers; ++layer)
        for (std::size_t t0 = 0; t0 < tokens; t0 += fill_chunk) {
            for (std::size_t i = 0; i < keys.size(); ++i) {
                keys[i] = kvc::to_half(next());
                values[i] = kvc::to_half(next());
            }
            cache.append(layer, kvc::kv_view<const kvc::half>(keys.data(), fill_chunk, kv_heads, dim),
                         kvc::kv_view<const kvc::half>(values.data(), fill_chunk, kv_heads, dim),
                         static_cast<std::int64_t>(t0));
        }
}

void BM_project_decode(benchmark::State& state, std::size_t rank) {
    const std::size_t full_layers = layers_for(2 * dim * 2), pca_layers = layers_for(2 * rank * 2);
    kvc::full_cache full(shape(full_layers));
    fill(full, full_layers);
    pca_cache cache(shape(pca_layers), {}, {}, {}, axes(pca_layers, rank));
    fill(cache, pca_layers);
    std::vector<float> queries(kv_heads * group * dim), out(queries.size());
    for (std::size_t i = 0; i < queries.size(); ++i) queries[i] = static_cast<float>((i * 7919) % 2001) / 1000.0f - 1.0f;
    double pca_seconds = 0.0, full_seconds = 0.0;
    std::size_t pca_layer = 0, full_layer = 0;
    bool pca_first = true;
    for (auto _ : state) {
        double this_pca = 0.0;
        for (int i = 0; i < 2; ++i) {
            const bool projected = (i == 0) == pca_first;
            const auto start = std::chrono::steady_clock::now();
            if (projected) cache.attend(pca_layer, queries.data(), out.data());
            else full.attend(full_layer, queries.data(), out.data());
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            (projected ? this_pca : full_seconds) += seconds;
            benchmark::DoNotOptimize(out.data());
            benchmark::ClobberMemory();
        }
        pca_seconds += this_pca;
        state.SetIterationTime(this_pca);
        pca_layer = (pca_layer + 1) % pca_layers;
        full_layer = (full_layer + 1) % full_layers;
        pca_first = !pca_first;
    }
    const double iterations = static_cast<double>(state.iterations());
    std::size_t read = 0;
    for (std::size_t h = 0; h < kv_heads; ++h) read += cache.head(0, h).stored_bytes();
    state.counters["vs_full_time"] = pca_seconds / full_seconds;
    state.counters["vs_full_bytes"] = (static_cast<double>(cache.bytes()) / static_cast<double>(pca_layers)) /
                                      (static_cast<double>(full.bytes()) / static_cast<double>(full_layers));
    state.counters["pca_us"] = pca_seconds / iterations * 1e6;
    state.counters["full_us"] = full_seconds / iterations * 1e6;
    state.counters["bw_fraction"] =
        static_cast<double>(read) / (pca_seconds / iterations) / single_thread_read_bandwidth().bytes_per_second;
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

struct registrar {
    registrar() {
        for (std::size_t rank : {dim / 2, dim / 4, dim / 8})
            benchmark::RegisterBenchmark(("BM_project_decode/method:pca/rank:" + std::to_string(rank) + "/tokens:" +
                                          std::to_string(tokens) + "/dim:" + std::to_string(dim) + "/group:" +
                                          std::to_string(group))
                                             .c_str(),
                                         &BM_project_decode, rank)
                ->UseManualTime()
                ->Unit(benchmark::kMicrosecond)
                ->MinTime(0.5);
    }
};

// Registered at static initialisation, like bench/quant.cpp's rows.
const registrar registered;

} // namespace
} // namespace kvc_bench
