// kvc_demo: what a full KV cache costs as the context grows.
//
// For one transformer layer shaped like a mid-size production model (8 KV
// heads, 32 query heads, head dim 128), fills a kvc::full_cache with N tokens
// and reports the bytes it holds and the time of one decode-attention step,
// for fp32, fp16 and bf16 storage. This is the baseline that every compressed
// configuration of kvc is measured against.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include <kvc/kvc.hpp>

namespace {

double median_attend_seconds(const kvc::full_cache& cache, const std::vector<float>& queries, int repeats) {
    std::vector<float> out(queries.size());
    std::vector<double> seconds;
    for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        cache.attend(0, queries.data(), out.data());
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::nth_element(seconds.begin(), seconds.begin() + repeats / 2, seconds.end());
    return seconds[repeats / 2];
}

} // namespace

int main() {
    kvc::cache_config config;
    config.layers = 1;
    config.kv_heads = 8;
    config.query_heads = 32;
    config.head_dim = 128;

    std::mt19937 rng(2024);
    std::normal_distribution<float> normal;
    const std::size_t chunk = 1024, row = config.kv_heads * config.head_dim;
    std::vector<float> keys(chunk * row), values(chunk * row), queries(config.query_heads * config.head_dim);
    for (float& x : keys) x = normal(rng);
    for (float& x : values) x = normal(rng);
    for (float& x : queries) x = normal(rng);

    std::printf("kvc %s full_cache, one layer: %zu KV heads, %zu query heads, head dim %zu, kernels: %s\n\n",
                KVC_VERSION_STRING, config.kv_heads, config.query_heads, config.head_dim,
                kvc::name_of(kvc::active_arch()));
    std::printf("%8s | %12s %12s %12s | %12s %12s %12s\n", "tokens", "fp32 MiB", "fp16 MiB", "bf16 MiB",
                "fp32 us/step", "fp16 us/step", "bf16 us/step");
    std::printf("---------+----------------------------------------+---------------------------------------\n");
    for (std::size_t tokens : {1024u, 4096u, 16384u, 65536u}) {
        double mib[3], micros[3];
        int column = 0;
        for (kvc::dtype storage : {kvc::dtype::f32, kvc::dtype::f16, kvc::dtype::bf16}) {
            config.storage = storage;
            kvc::full_cache cache(config);
            cache.reserve(tokens);
            using view = kvc::kv_view<const float, kvc::layout_token_major>;
            for (std::size_t t = 0; t < tokens; t += chunk)
                cache.append(0, view(keys.data(), chunk, config.kv_heads, config.head_dim),
                             view(values.data(), chunk, config.kv_heads, config.head_dim),
                             static_cast<std::int64_t>(t));
            mib[column] = static_cast<double>(cache.bytes()) / (1024.0 * 1024.0);
            micros[column] = 1e6 * median_attend_seconds(cache, queries, tokens >= 16384 ? 9 : 31);
            ++column;
        }
        std::printf("%8zu | %12.2f %12.2f %12.2f | %12.1f %12.1f %12.1f\n", tokens, mib[0], mib[1], mib[2],
                    micros[0], micros[1], micros[2]);
    }
    std::printf("\nCompressed caches (quantization, eviction, ...) are measured against these numbers.\n");
    return 0;
}
