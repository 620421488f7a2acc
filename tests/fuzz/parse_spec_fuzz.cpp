// libFuzzer target: bytes -> kvc::parse_spec and kvc::make_cache (kvc/registry.hpp),
// the spec a tool, a config file or a notebook passes in ("kivi:2 + snapkv:0.25").
// The registry (src/registry.cpp) is compiled into this target, instrumented.
// The invariants:
//   - parsing and building either succeed or throw kvc::error; any other
//     exception, a sanitizer report or a trap is a finding;
//   - accepted terms name known methods, at most one per family, with a value
//     exactly when the method takes one; printed back as a spec ("name" or
//     "name:value" joined by " + "), they parse to the same terms;
//   - a method learnt from the model (method_info::calibrated) is refused with
//     kvc::error, since no calibration artifact is given;
//   - a cache built from an accepted spec (1 layer, 2 KV heads, 4 query heads,
//     head_dim 64; decode-time eviction every 2 tokens for odd-sized inputs)
//     takes a prompt, chunk attention, decode steps and a compression, and
//     afterwards holds bytes, no head more tokens than were appended, a layer
//     count that is the sum of its heads', and positions ascending below the
//     next one.
//   - the run-time cache's serialization (dynamic_cache, whatever the spec
//     composes): the exercised cache saved and loaded into a fresh cache of
//     the spec saves to the same bytes; and an input "SPEC\0BYTES" has BYTES
//     loaded into a fresh cache of SPEC: refused with kvc::error and the cache
//     unchanged, or accepted, re-saved to the same bytes (the kvc version
//     aside) and used (attention, an append, a compression).
// Seeds: tests/fuzz/corpus/parse_spec, written by make_seeds.py (specs) and
// by this file built with -DKVC_PARSE_SPEC_SEEDS (specs with a saved cache:
// a program linked with kvc's library, which holds the registry):
//   g++ -std=c++17 -O1 -Iinclude -Itests -DKVC_PARSE_SPEC_SEEDS tests/fuzz/parse_spec_fuzz.cpp \
//     build/dev/libkvc_dispatch.a -o /tmp/spec_seeds && /tmp/spec_seeds tests/fuzz/corpus/parse_spec
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/registry.hpp"
#include "kvc/view/kv_view.hpp"
#include "fuzz/saved_bytes.hpp"

namespace {

using view = kvc::kv_view<const float, kvc::layout_token_major>;

void check(bool condition) {
    if (!condition) __builtin_trap();
}

// Rows for `count` floats, deterministic in `seed`.
std::vector<float> rows_of(std::size_t count, unsigned seed) {
    std::vector<float> out(count);
    for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<float>(((i + seed) * 2654435761u) % 1000) / 250.0f - 2.0f;
    return out;
}

std::string printed(const std::vector<kvc::spec_term>& terms) {
    std::string spec;
    for (const kvc::spec_term& term : terms) {
        if (!spec.empty()) spec += " + ";
        spec += term.method->name;
        if (!term.value.empty()) spec += ":" + term.value;
    }
    return spec;
}

void check_terms(const std::vector<kvc::spec_term>& terms) {
    const std::vector<kvc::method_info>& all = kvc::methods();
    bool family_seen[4] = {false, false, false, false};
    for (const kvc::spec_term& term : terms) {
        check(term.method >= all.data() && term.method < all.data() + all.size());
        const auto family = static_cast<std::size_t>(term.method->family);
        check(family < 4 && !family_seen[family]);
        family_seen[family] = true;
        check(term.value.empty() == term.method->parameter.empty());
    }
}

// The cache in use: a prompt long enough that eviction (sinks 4 + window 16
// kept) and KIVI's fp16 residual (128 tokens) have something to do, chunk
// attention of its last queries, decode steps, a compression; then its counts.
void exercise(kvc::dynamic_cache& cache) {
    const kvc::cache_config c = cache.config();
    const std::size_t prompt = 136, chunk = 8, steps = 4;
    const std::vector<float> k = rows_of(prompt * c.kv_heads * c.head_dim, 1),
                             v = rows_of(prompt * c.kv_heads * c.head_dim, 2),
                             queries = rows_of(chunk * c.query_heads * c.head_dim, 3);
    std::vector<float> out(queries.size());
    cache.append(0, view(k.data(), prompt, c.kv_heads, c.head_dim), view(v.data(), prompt, c.kv_heads, c.head_dim), 0);
    cache.attend_chunk(0, queries.data(), chunk, out.data());
    for (std::size_t step = 0; step < steps; ++step) {
        const std::vector<float> ks = rows_of(c.kv_heads * c.head_dim, 10 + static_cast<unsigned>(step)),
                                 vs = rows_of(c.kv_heads * c.head_dim, 20 + static_cast<unsigned>(step));
        cache.append(0, view(ks.data(), 1, c.kv_heads, c.head_dim), view(vs.data(), 1, c.kv_heads, c.head_dim),
                     static_cast<std::int64_t>(prompt + step));
        cache.attend(0, queries.data(), out.data());
    }
    cache.compress(0);
    cache.attend(0, queries.data(), out.data());

    const std::size_t appended = prompt + steps;
    check(cache.bytes() > 0);
    check(cache.tokens_seen(0) == appended);
    check(cache.next_position(0) == static_cast<std::int64_t>(appended));
    std::size_t sum = 0;
    for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const std::size_t held = cache.tokens(0, h);
        check(held >= 1 && held <= appended);
        const std::int32_t* positions = cache.positions(0, h);
        for (std::size_t i = 0; i < held; ++i) {
            check(positions[i] >= 0 && positions[i] < static_cast<std::int32_t>(appended));
            check(i == 0 || positions[i - 1] < positions[i]);
        }
        sum += held;
    }
    check(cache.tokens(0) == sum);
    for (std::size_t i = 0; i < c.query_heads * c.head_dim; ++i) check(out[i] == out[i]); // finite rows in, no NaN out
}

using bytes = std::vector<unsigned char>;

kvc::cache_config fuzz_shape() {
    kvc::cache_config config;
    config.layers = 1;
    config.kv_heads = 2;
    config.query_heads = 4;
    config.head_dim = 64;
    return config;
}

using kvc_fuzz::same_but_version;

#ifdef KVC_PARSE_SPEC_SEEDS
// A short sequence (24 prompt tokens in one chunk, 2 decode steps, a
// compression): the cache the seeds save, small enough for the fuzzer.
void short_sequence(kvc::dynamic_cache& cache) {
    const kvc::cache_config c = cache.config();
    const std::size_t prompt = 24;
    const std::vector<float> k = rows_of(prompt * c.kv_heads * c.head_dim, 4),
                             v = rows_of(prompt * c.kv_heads * c.head_dim, 5),
                             queries = rows_of(prompt * c.query_heads * c.head_dim, 6);
    std::vector<float> out(queries.size());
    cache.append(0, view(k.data(), prompt, c.kv_heads, c.head_dim), view(v.data(), prompt, c.kv_heads, c.head_dim), 0);
    cache.attend_chunk(0, queries.data(), prompt, out.data());
    for (std::size_t step = 0; step < 2; ++step) {
        cache.append(0, view(k.data(), 1, c.kv_heads, c.head_dim), view(v.data(), 1, c.kv_heads, c.head_dim),
                     static_cast<std::int64_t>(prompt + step));
        cache.attend(0, queries.data(), out.data());
    }
    cache.compress(0);
}
#endif

// A loaded cache in use: attention, an append at its next position, a compression.
void use_loaded(kvc::dynamic_cache& cache) {
    const kvc::cache_config c = cache.config();
    const std::vector<float> queries = rows_of(c.query_heads * c.head_dim, 7), row = rows_of(c.kv_heads * c.head_dim, 8);
    std::vector<float> out(queries.size());
    cache.attend(0, queries.data(), out.data());
    const std::int64_t next = cache.next_position(0);
    if (next >= std::numeric_limits<std::int32_t>::max()) return;
    cache.append(0, view(row.data(), 1, c.kv_heads, c.head_dim), view(row.data(), 1, c.kv_heads, c.head_dim), next);
    cache.attend(0, queries.data(), out.data());
    cache.compress(0);
}

} // namespace

#ifndef KVC_PARSE_SPEC_SEEDS
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
    const std::size_t spec_size = nul ? static_cast<std::size_t>(nul - data) : size;
    const std::string_view spec(reinterpret_cast<const char*>(data), spec_size);
    std::vector<kvc::spec_term> terms;
    try {
        terms = kvc::parse_spec(spec);
    } catch (const kvc::error&) {
        return 0;
    }
    check_terms(terms);
    const std::vector<kvc::spec_term> again = kvc::parse_spec(printed(terms));
    check(again.size() == terms.size());
    for (std::size_t i = 0; i < terms.size(); ++i)
        check(again[i].method == terms[i].method && again[i].value == terms[i].value);

    bool calibrated = false;
    for (const kvc::spec_term& term : terms) calibrated = calibrated || term.method->calibrated;
    const kvc::cache_config config = fuzz_shape();
    kvc::cache_options options;
    options.evict_every = size % 2 ? 2 : 0;
    std::optional<kvc::dynamic_cache> cache;
    try {
        cache.emplace(kvc::make_cache(config, spec, options));
    } catch (const kvc::error&) {
        return 0;
    }
    check(!calibrated);
    exercise(*cache); // a cache once built takes every call: a kvc::error here escapes, a finding

    // Its bytes load into a fresh cache of the spec, which saves them again.
    const bytes saved = kvc::save_cache(*cache);
    kvc::dynamic_cache twin = kvc::make_cache(config, spec, options);
    kvc::load_cache(twin, saved.data(), saved.size());
    check(kvc::save_cache(twin) == saved);

    if (nul == nullptr) return 0;
    kvc::dynamic_cache loaded = kvc::make_cache(config, spec, options);
    const bytes before = kvc::save_cache(loaded);
    const bytes input(nul + 1, data + size);
    try {
        kvc::load_cache(loaded, input.data(), input.size());
    } catch (const kvc::error&) {
        check(kvc::save_cache(loaded) == before);
        return 0;
    }
    check(same_but_version(kvc::save_cache(loaded), input));
    use_loaded(loaded);
    return 0;
}
#else
// Seeds: a spec of each store and policy the run-time cache holds, NUL, and
// the bytes of its cache after short_sequence().
int main(int argc, char** argv) {
    if (argc != 2) return 2;
    const char* seeded[] = {"none:f16",          "q4_0 + snapkv:0.25",  "kivi:2 + h2o:0.5",     "gear + knorm:0.4",
                            "mixed:int8/int2",   "sparse:0.5 + tova:0.5", "hadamard:q4_0 + streaming:0.5 + compensation",
                            "think:0.5 + h2o:0.5", "k8v4 + adakv:0.3 + cam", "q4_0+sinks + pyramidkv:0.5"};
    for (const char* spec : seeded) {
        kvc::dynamic_cache cache = kvc::make_cache(fuzz_shape(), spec);
        short_sequence(cache);
        bytes file(spec, spec + std::strlen(spec));
        file.push_back(0);
        const bytes saved = kvc::save_cache(cache);
        file.insert(file.end(), saved.begin(), saved.end());
        std::string name = std::string("loaded_") + spec;
        for (char& ch : name)
            if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_')) ch = '_';
        std::ofstream(std::string(argv[1]) + "/" + name + ".bin", std::ios::binary)
            .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
    }
    return 0;
}
#endif
