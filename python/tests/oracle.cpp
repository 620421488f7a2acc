// The C++ side of python/tests/test_kvc.py's bit-for-bit tests: runs one
// scenario on kvc::make_cache(spec) directly, without the binding, and writes
// what the Python side computes through it.
//
//   kvc_python_oracle SPEC LAYERS KV_HEADS QUERY_HEADS HEAD_DIM PROMPT DECODE EVICT_EVERY IN OUT
//
// IN (float32, native order): per layer, the prompt's keys and values
// [PROMPT][KV_HEADS][HEAD_DIM] and queries [PROMPT][QUERY_HEADS][HEAD_DIM];
// then per decode step, per layer, one token's key, value and query.
// Scenario: per layer, append the prompt at position 0 and attend_chunk it;
// then per step, per layer, append the token and attend. OUT: every
// attention output (float32, in that order), then int64 tokens(layer, head)
// for every layer and head, then int64 bytes().
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "kvc/registry.hpp"

namespace {

std::size_t number(const char* text) { return static_cast<std::size_t>(std::strtoull(text, nullptr, 10)); }

std::vector<float> take(std::ifstream& in, std::size_t count) {
    std::vector<float> values(count);
    in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!in) throw std::runtime_error("kvc_python_oracle: input shorter than the scenario");
    return values;
}

} // namespace

int main(int argc, char** argv) try {
    if (argc != 11) {
        std::cerr << "usage: kvc_python_oracle SPEC LAYERS KV_HEADS QUERY_HEADS HEAD_DIM PROMPT DECODE EVICT_EVERY IN OUT\n";
        return 2;
    }
    kvc::cache_config config;
    config.layers = number(argv[2]);
    config.kv_heads = number(argv[3]);
    config.query_heads = number(argv[4]);
    config.head_dim = number(argv[5]);
    const std::size_t prompt = number(argv[6]), decode = number(argv[7]);
    kvc::cache_options options;
    options.evict_every = number(argv[8]);
    kvc::dynamic_cache cache = kvc::make_cache(config, argv[1], options);

    std::ifstream in(argv[9], std::ios::binary);
    std::ofstream out(argv[10], std::ios::binary);
    const std::size_t kv = config.kv_heads * config.head_dim, q = config.query_heads * config.head_dim;
    const auto write = [&](const void* data, std::size_t bytes) {
        out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
    };
    for (std::size_t l = 0; l < config.layers; ++l) {
        const std::vector<float> keys = take(in, prompt * kv), values = take(in, prompt * kv),
                                 queries = take(in, prompt * q);
        cache.append(l, kvc::kv_view(keys.data(), prompt, config.kv_heads, config.head_dim),
                     kvc::kv_view(values.data(), prompt, config.kv_heads, config.head_dim), 0);
        std::vector<float> attended(prompt * q);
        cache.attend_chunk(l, queries.data(), prompt, attended.data());
        write(attended.data(), attended.size() * sizeof(float));
    }
    for (std::size_t step = 0; step < decode; ++step)
        for (std::size_t l = 0; l < config.layers; ++l) {
            const std::vector<float> key = take(in, kv), value = take(in, kv), query = take(in, q);
            cache.append(l, kvc::kv_view(key.data(), 1, config.kv_heads, config.head_dim),
                         kvc::kv_view(value.data(), 1, config.kv_heads, config.head_dim),
                         static_cast<std::int64_t>(prompt + step));
            std::vector<float> attended(q);
            cache.attend(l, query.data(), attended.data());
            write(attended.data(), attended.size() * sizeof(float));
        }
    for (std::size_t l = 0; l < config.layers; ++l)
        for (std::size_t h = 0; h < config.kv_heads; ++h) {
            const auto tokens = static_cast<std::int64_t>(cache.tokens(l, h));
            write(&tokens, sizeof tokens);
        }
    const auto bytes = static_cast<std::int64_t>(cache.bytes());
    write(&bytes, sizeof bytes);
    return out ? 0 : 1;
} catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
}
