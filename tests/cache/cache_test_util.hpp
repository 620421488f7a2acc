// Shared pieces of the cache tests: random engine data, a double-precision
// attention oracle over what a cache stores, and a memory resource that counts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_test {

inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float stddev = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, stddev);
    std::vector<float> out(n);
    for (float& x : out) x = normal(rng);
    return out;
}

// The value a row element has once stored in `type` (what the oracle must use).
inline double stored_value(float x, kvc::dtype type) {
    switch (type) {
    case kvc::dtype::f32: return x;
    case kvc::dtype::f16: return static_cast<double>(kvc::to_float(kvc::to_half(x)));
    case kvc::dtype::bf16: return static_cast<double>(kvc::to_float(kvc::to_bfloat16(x)));
    }
    return x;
}

// Decode attention in double for a cache shaped by `c` whose layer holds the
// token-major engine rows keys/values [tokens][kv_heads][head_dim] (first
// `tokens` of them): query head j reads KV head j / group.
inline std::vector<double> oracle_attention(const kvc::cache_config& c, const std::vector<float>& keys,
                                            const std::vector<float>& values, std::size_t tokens,
                                            const float* queries, std::vector<double>* mass = nullptr) {
    const std::size_t dim = c.head_dim, group = c.group();
    std::vector<double> out(c.query_heads * dim, 0.0);
    if (mass) mass->assign(c.kv_heads * tokens, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        const std::size_t h = j / group;
        std::vector<double> logits(tokens);
        double max = -INFINITY;
        for (std::size_t t = 0; t < tokens; ++t) {
            double dot = 0.0;
            for (std::size_t d = 0; d < dim; ++d)
                dot += static_cast<double>(queries[j * dim + d]) *
                       stored_value(keys[(t * c.kv_heads + h) * dim + d], c.storage);
            logits[t] = dot * static_cast<double>(c.logit_scale());
            max = std::max(max, logits[t]);
        }
        double sum = 0.0;
        for (double& l : logits) sum += (l = std::exp(l - max));
        for (std::size_t t = 0; t < tokens; ++t) {
            const double p = logits[t] / sum;
            if (mass) (*mass)[h * tokens + t] += p;
            for (std::size_t d = 0; d < dim; ++d)
                out[j * dim + d] += p * stored_value(values[(t * c.kv_heads + h) * dim + d], c.storage);
        }
    }
    return out;
}

// ||a - b|| / ||b||
template <class A, class B>
double relative_error(const A& a, const B& b) {
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < b.size(); ++i) {
        diff += (static_cast<double>(a[i]) - static_cast<double>(b[i])) * (static_cast<double>(a[i]) - static_cast<double>(b[i]));
        norm += static_cast<double>(b[i]) * static_cast<double>(b[i]);
    }
    return std::sqrt(diff / norm);
}

// Worst norm-relative error over query heads of `got` ([query_heads][head_dim])
// against the double oracle `want`: the measure every codec's attention test bounds.
inline double worst_head_error(const kvc::cache_config& c, const float* got, const std::vector<double>& want) {
    double worst = 0.0;
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        double diff = 0.0, norm = 0.0;
        for (std::size_t d = 0; d < c.head_dim; ++d) {
            const double w = want[j * c.head_dim + d];
            diff += (got[j * c.head_dim + d] - w) * (got[j * c.head_dim + d] - w);
            norm += w * w;
        }
        worst = std::max(worst, std::sqrt(diff / norm));
    }
    return worst;
}

// The message of the kvc::error f() throws, or "(no kvc::error)".
template <class F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const kvc::error& e) {
        return e.what();
    }
    return "(no kvc::error)";
}

// Counts the bytes outstanding; optionally refuses allocations past a limit
// of bytes, or every allocation once `fail_after` have succeeded.
class counting_resource : public std::pmr::memory_resource {
public:
    std::size_t in_use = 0;
    std::size_t allocations = 0;
    std::size_t limit = SIZE_MAX;
    std::size_t fail_after = SIZE_MAX;

private:
    void* do_allocate(std::size_t bytes, std::size_t alignment) override {
        if (in_use + bytes > limit || allocations >= fail_after) throw std::bad_alloc();
        void* p = std::pmr::new_delete_resource()->allocate(bytes, alignment);
        in_use += bytes;
        ++allocations;
        return p;
    }
    void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
        in_use -= bytes;
        std::pmr::new_delete_resource()->deallocate(p, bytes, alignment);
    }
    bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }
};

// Runs cache.compress() with `memory` refusing its allocations at every
// successive point (the first, the second, ...) until a compression succeeds
// or `attempts` have failed; after each failure, with allocations allowed
// again, calls unchanged(attempt) (which asserts what must not have changed).
// Returns the number of failures; `compressed` says whether one succeeded.
template <class Cache, class Unchanged>
std::size_t compress_through_failures(Cache& cache, counting_resource& memory, Unchanged&& unchanged, bool& compressed,
                                      std::size_t attempts = 64) {
    compressed = false;
    std::size_t failures = 0;
    for (std::size_t allowed = 0; !compressed && allowed < attempts; ++allowed) {
        memory.fail_after = memory.allocations + allowed;
        try {
            cache.compress();
            compressed = true;
        } catch (const std::bad_alloc&) {
            ++failures;
            memory.fail_after = SIZE_MAX;
            unchanged(allowed);
        }
        memory.fail_after = SIZE_MAX;
    }
    return failures;
}

// Runs check() with each instruction set this CPU and build support made
// the active one (named in any failure), then restores the active set.
template <class Check>
void on_every_arch(Check&& check) {
    kvc::arch_id archs[kvc::arch_count];
    const int count = kvc::kernels::available_archs(archs);
    const kvc::arch_id original = kvc::active_arch();
    for (int a = 0; a < count; ++a) {
        SCOPED_TRACE(kvc::name_of(archs[a]));
        kvc::set_active_arch(archs[a]);
        check();
    }
    kvc::set_active_arch(original);
}

// A model shape for tests: the one cache_config builder they share.
inline kvc::cache_config shape_of(std::size_t layers, std::size_t kv_heads, std::size_t query_heads,
                                  std::size_t head_dim, kvc::dtype storage = kvc::dtype::f16,
                                  kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = head_dim;
    c.storage = storage;
    c.resource = resource;
    return c;
}

// Drives a cache the way an engine does: a prompt of `prompt` tokens in
// chunks of `chunk` (append then attend_chunk, layer by layer), then `steps`
// decode steps (append then attend), with random rows from `seed`. Returns
// every attention output in order (the chunks' whole, the steps' one row).
template <class Cache>
std::vector<float> prompt_then_decode(Cache& cache, const kvc::cache_config& c, std::size_t prompt, std::size_t chunk,
                                      std::size_t steps, std::uint32_t seed) {
    using rows = kvc::kv_view<const float, kvc::layout_token_major>;
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const std::vector<float> keys = random_floats((prompt + steps) * row, seed);
    const std::vector<float> values = random_floats((prompt + steps) * row, seed + 1);
    const std::vector<float> queries = random_floats((prompt + steps) * qrow, seed + 2);
    std::vector<float> all, out(chunk * qrow);
    for (std::size_t first = 0; first < prompt; first += chunk)
        for (std::size_t l = 0; l < c.layers; ++l) {
            cache.append(l, rows(keys.data() + first * row, chunk, c.kv_heads, c.head_dim),
                         rows(values.data() + first * row, chunk, c.kv_heads, c.head_dim),
                         static_cast<std::int64_t>(first));
            cache.attend_chunk(l, queries.data() + first * qrow, chunk, out.data());
            all.insert(all.end(), out.begin(), out.end());
        }
    for (std::size_t t = prompt; t < prompt + steps; ++t)
        for (std::size_t l = 0; l < c.layers; ++l) {
            cache.append(l, rows(keys.data() + t * row, 1, c.kv_heads, c.head_dim),
                         rows(values.data() + t * row, 1, c.kv_heads, c.head_dim), static_cast<std::int64_t>(t));
            cache.attend(l, queries.data() + t * qrow, out.data());
            all.insert(all.end(), out.begin(), out.begin() + static_cast<std::ptrdiff_t>(qrow));
        }
    return all;
}

} // namespace kvc_test
