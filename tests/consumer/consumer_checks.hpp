// What every consumer project checks, whichever way it got kvc: the umbrella
// header compiles, a kvc::full_cache can be filled and queried, and attention
// gives the values worked out by hand below.
#pragma once

#include <kvc/kvc.hpp>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>

namespace consumer {

inline int failures = 0;

inline void expect_near(const char* what, std::size_t index, float got, float expected, float tolerance) {
    if (!std::isfinite(got) || std::fabs(got - expected) > tolerance) {
        std::printf("FAIL %s[%zu]: expected %.9g, got %.9g\n", what, index, static_cast<double>(expected),
                    static_cast<double>(got));
        ++failures;
    }
}

inline kvc::cache_config tiny_config(std::size_t query_heads, kvc::dtype storage) {
    kvc::cache_config config;
    config.layers = 1;
    config.kv_heads = 1;
    config.query_heads = query_heads;
    config.head_dim = 4;
    config.storage = storage;
    config.scale = 1.0f; // logits are plain dot products
    return config;
}

// One stored token: its softmax weight is exactly 1, so every query head
// reads back the token's value row. The values are exact in fp16 too.
inline void one_token(kvc::dtype storage, const char* what) {
    kvc::full_cache cache(tiny_config(1, storage));
    float key[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    float value[4] = {0.5f, -1.0f, 2.0f, 8.0f};
    cache.append(0, kvc::kv_view<const float>(key, 1, 1, 4), kvc::kv_view<const float>(value, 1, 1, 4), 0);
    const float query[4] = {0.25f, -0.5f, 1.0f, 0.125f};
    float out[4] = {};
    cache.attend(0, query, out);
    for (std::size_t d = 0; d < 4; ++d) expect_near(what, d, out[d], value[d], 1e-6f);
}

// Two tokens, two query heads sharing one KV head (GQA group of 2):
//   keys k0 = (0, 0, 0, 0), k1 = (ln 3, 0, 0, 0); values v0 = (4, 0, 0, 0), v1 = (0, 8, 0, 0).
//   head 0, q = (1, 0, 0, 0): logits (0, ln 3) -> weights (1/4, 3/4) -> out (1, 6, 0, 0).
//   head 1, q = 0:            logits (0, 0)    -> weights (1/2, 1/2) -> out (2, 4, 0, 0).
inline void two_tokens_grouped() {
    kvc::full_cache cache(tiny_config(2, kvc::dtype::f32));
    const float ln3 = static_cast<float>(std::log(3.0));
    float keys[8] = {0.0f, 0.0f, 0.0f, 0.0f, ln3, 0.0f, 0.0f, 0.0f};
    float values[8] = {4.0f, 0.0f, 0.0f, 0.0f, 0.0f, 8.0f, 0.0f, 0.0f};
    cache.append(0, kvc::kv_view<const float>(keys, 2, 1, 4), kvc::kv_view<const float>(values, 2, 1, 4), 0);
    if (cache.tokens(0) != 2) {
        std::printf("FAIL tokens(0): expected 2, got %zu\n", cache.tokens(0));
        ++failures;
    }
    const float queries[8] = {1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    float out[8] = {};
    cache.attend(0, queries, out);
    const float expected[8] = {1.0f, 6.0f, 0.0f, 0.0f, 2.0f, 4.0f, 0.0f, 0.0f};
    for (std::size_t i = 0; i < 8; ++i) expect_near("two_tokens_grouped", i, out[i], expected[i], 1e-5f);
}

// Runs every check; returns the process exit code.
inline int run_all(const char* consumer_name) {
    try {
        one_token(kvc::dtype::f32, "one_token_f32");
        one_token(kvc::dtype::f16, "one_token_f16");
        two_tokens_grouped();
    } catch (const std::exception& e) {
        std::printf("FAIL: unexpected exception: %s\n", e.what());
        ++failures;
    }
    std::printf("%s: kvc %s, kernels on %s: %s\n", consumer_name, KVC_VERSION_STRING, kvc::name_of(kvc::active_arch()),
                failures == 0 ? "all checks passed" : "FAILED");
    return failures == 0 ? 0 : 1;
}

} // namespace consumer
