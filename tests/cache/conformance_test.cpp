// The conformance suite every composition passes, driven by the registry:
// every codec with every eviction policy, and the mergers and projections
// over the codecs and evictions they pair with, each built from its name at
// run time (one cache type for all of them: this file instantiates nothing
// per method). Each composition must
//   - count exactly the bytes it took from the memory resource;
//   - refuse bad calls with kvc::error and stay as it was (tokens, bytes,
//     positions, and the outputs of the steps after, against a fork taken before);
//   - fork: the copy continues bit for bit as the original;
//   - keep a NaN in one KV head's rows out of the other heads' outputs.
// What each method computes is tested against its oracle in its own suite;
// dynamic_composition_test checks the run-time caches equal the static types.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/all.hpp"
#include "kvc/registry.hpp"
#include "learnt_artifacts.hpp"

namespace {

using rows = kvc::kv_view<const float, kvc::layout_token_major>;

kvc::cache_config shape(kvc::memory_resource* resource = nullptr) {
    return kvc_test::shape_of(2, 2, 4, 64, kvc::dtype::f16, resource);
}

std::vector<std::string> names_of(kvc::method_family family) {
    std::vector<std::string> names;
    for (const kvc::method_info& m : kvc::methods())
        if (m.family == family && !m.calibrated) names.push_back(m.name);
    return names;
}

// One decode step (append + attend on every layer) with rows from `seed`; the outputs.
std::vector<float> step(kvc::dynamic_cache& cache, std::int64_t position, std::uint32_t seed) {
    const kvc::cache_config c = shape();
    const std::vector<float> k = kvc_test::random_floats(c.kv_heads * c.head_dim, seed);
    const std::vector<float> v = kvc_test::random_floats(c.kv_heads * c.head_dim, seed + 1);
    const std::vector<float> q = kvc_test::random_floats(c.query_heads * c.head_dim, seed + 2);
    std::vector<float> out(q.size()), all;
    for (std::size_t l = 0; l < c.layers; ++l) {
        cache.append(l, rows(k.data(), 1, c.kv_heads, c.head_dim), rows(v.data(), 1, c.kv_heads, c.head_dim), position);
        cache.attend(l, q.data(), out.data());
        all.insert(all.end(), out.begin(), out.end());
    }
    return all;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The suite's checks on one composition.
void conforms(const std::string& spec, const kvc::cache_options& options = {}) {
    SCOPED_TRACE(spec);
    kvc_test::counting_resource memory;
    kvc::dynamic_cache cache = kvc::make_cache(shape(&memory), spec, options);
    const std::vector<float> prompt = kvc_test::prompt_then_decode(cache, shape(), 96, 48, 8, 41);
    for (float x : prompt) ASSERT_TRUE(std::isfinite(x)) << "finite rows gave a non-finite output";
    EXPECT_EQ(cache.bytes(), memory.in_use) << "bytes() must be every byte taken from the resource";

    // Bad calls: each throws kvc::error and changes nothing.
    const kvc::cache_config c = shape();
    const std::vector<float> row = kvc_test::random_floats(c.kv_heads * c.head_dim, 5);
    const std::vector<float> q = kvc_test::random_floats(c.query_heads * c.head_dim, 6);
    std::vector<float> out(q.size());
    kvc::dynamic_cache before = cache;
    const std::size_t bytes = cache.bytes(), held = cache.tokens(0);
    const std::vector<std::int32_t> positions(cache.positions(0, 0), cache.positions(0, 0) + cache.tokens(0, 0));
    const std::string messages[] = {
        kvc_test::error_of([&] { cache.append(0, rows(row.data(), 1, c.kv_heads, c.head_dim),
                                              rows(row.data(), 1, c.kv_heads, c.head_dim), 3); }),
        kvc_test::error_of([&] { cache.append(0, rows(row.data(), 1, 1, c.head_dim),
                                              rows(row.data(), 1, 1, c.head_dim), 1000); }),
        kvc_test::error_of([&] { cache.append(c.layers, rows(row.data(), 1, c.kv_heads, c.head_dim),
                                              rows(row.data(), 1, c.kv_heads, c.head_dim), 1000); }),
        kvc_test::error_of([&] { cache.attend(0, nullptr, out.data()); }),
        kvc_test::error_of([&] { cache.attend_chunk(0, q.data(), 100000, out.data()); }),
        kvc_test::error_of([&] { (void)cache.positions(0, c.kv_heads); }),
    };
    for (const std::string& m : messages) EXPECT_NE(m, "(no kvc::error)");
    EXPECT_EQ(cache.bytes(), bytes);
    EXPECT_EQ(cache.tokens(0), held);
    EXPECT_EQ(positions, std::vector<std::int32_t>(cache.positions(0, 0), cache.positions(0, 0) + cache.tokens(0, 0)));

    // The cache after the failures and the fork taken before them continue alike.
    kvc::dynamic_cache fork = cache;
    for (std::int64_t p = 104; p < 108; ++p) {
        const std::vector<float> a = step(cache, p, static_cast<std::uint32_t>(p)),
                                 b = step(before, p, static_cast<std::uint32_t>(p)),
                                 f = step(fork, p, static_cast<std::uint32_t>(p));
        ASSERT_TRUE(same_bits(a, b)) << "the failed calls changed what the cache computes";
        ASSERT_TRUE(same_bits(a, f)) << "a fork does not continue as its original";
    }

    // A NaN in KV head 0's newest key and value reaches no output of head 1's group.
    std::vector<float> poisoned = kvc_test::random_floats(c.kv_heads * c.head_dim, 7);
    poisoned[3] = NAN;
    for (std::size_t l = 0; l < c.layers; ++l) {
        cache.append(l, rows(poisoned.data(), 1, c.kv_heads, c.head_dim),
                     rows(poisoned.data(), 1, c.kv_heads, c.head_dim), 108);
        cache.attend(l, q.data(), out.data());
        const std::size_t group = c.query_heads / c.kv_heads;
        for (std::size_t i = group * c.head_dim; i < out.size(); ++i)
            ASSERT_TRUE(std::isfinite(out[i])) << "layer " << l << ": a NaN in KV head 0 reached query head "
                                               << i / c.head_dim;
    }
}

TEST(Conformance, EveryCodecWithEveryEviction) {
    for (const std::string& codec : names_of(kvc::method_family::quantization))
        for (const std::string& eviction : names_of(kvc::method_family::eviction)) conforms(codec + " + " + eviction);
}

TEST(Conformance, EveryMergerOverTheCodecsThatReencodeRows) {
    for (const std::string& merger : names_of(kvc::method_family::merging)) {
        if (merger == "merge:none") continue;
        for (const char* codec : {"none:f32", "none:f16", "q8_0", "q4_0", "k4v2", "q4_0+sinks", "hadamard:q4_0"})
            for (const char* eviction : {"streaming:0.3", "h2o:0.3", "snapkv:0.3", "knorm:0.3"})
                conforms(std::string(codec) + " + " + eviction + " + " + merger);
    }
}

TEST(Conformance, EveryUncalibratedProjectionOverRowsAsTheyAre) {
    for (const std::string& projection : names_of(kvc::method_family::projection))
        for (const char* codec : {"none:f32", "none:f16", "none:bf16"})
            conforms(std::string(codec) + " + " + projection + ":0.4");
}

// The methods learnt from the model, with artifacts learnt from random
// sample rows (256 tokens a layer): every calibrated name of the registry.
TEST(Conformance, EveryCalibratedMethod) {
    kvc::cache_options options;
    options.artifacts = kvc_test::learnt_artifacts(shape(), 51);
    std::size_t covered = 0;
    for (const kvc::method_info& m : kvc::methods()) {
        if (!m.calibrated) continue;
        ++covered;
        if (m.family == kvc::method_family::quantization) {
            conforms(m.name + " + none", options);
            conforms(m.name + " + snapkv:0.3", options);
        } else if (m.family == kvc::method_family::eviction) {
            conforms("none:f16 + " + m.name, options);
            conforms("q4_0 + " + m.name, options);
        } else {
            const std::string value = m.name == "loki" ? ":16:0.25" : m.name == "cskv" ? ":16:8" : ":16";
            conforms("none:f16 + " + m.name + value, options);
            conforms("h2o:0.4 + " + m.name + value, options);
            if (m.name == "pca" || m.name == "cskv") { // latents in a quantizing codec
                conforms("q8_0 + " + m.name + (m.name == "cskv" ? ":32:8" : ":32"), options);
                conforms("kivi:2 + snapkv:0.3 + " + m.name + (m.name == "cskv" ? ":32:8" : ":32"), options);
            }
        }
    }
    EXPECT_EQ(covered, options.artifacts.size()) << "a calibrated method without an artifact here";
}

} // namespace
