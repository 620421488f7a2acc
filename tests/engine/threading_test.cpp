// The threading contract (README, "Threads"): calls on different layers of
// one cache may run concurrently, and so may calls on different caches, also
// when they share a thread-safe memory resource. Checked for every cache the
// engine's registry builds (every codec; every eviction scorer and budget on
// every codec that carries eviction, in sanitized builds on fp16 rows with
// SnapKV on every carrier; decode-time schedules), plus the budgets
// the registry does not spell, and the reproduction of the defect that broke
// the contract (H2O's statistics scratch was one buffer for the whole cache).
// Threaded results must be bit-identical to a single-threaded run. The same
// executable runs under ThreadSanitizer in scripts/test.sh's `tsan` phase.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <kvc/kvc.hpp>

#include "engine/cache_choice.hpp"
#include "engine/engine_test_util.hpp"
#include "engine/synthetic_calibration.hpp"

namespace {

kvc::cache_config threading_shape() {
    kvc::cache_config config;
    config.layers = 4;
    config.kv_heads = 2;
    config.query_heads = 8; // GQA 4
    config.head_dim = 64;   // a multiple of every block codec's group
    return config;
}

// One layer's rows and queries, varied enough that every scorer ranks tokens
// differently from plain recency: [tokens][heads][dim].
struct layer_rows {
    std::vector<float> keys, values, queries;
};

layer_rows make_rows(const kvc::cache_config& shape, std::size_t layer, std::size_t tokens) {
    layer_rows rows;
    const std::size_t kv = tokens * shape.kv_heads * shape.head_dim;
    const std::size_t q = tokens * shape.query_heads * shape.head_dim;
    const double offset = 17.0 * static_cast<double>(layer);
    for (std::size_t i = 0; i < kv; ++i) {
        const double x = static_cast<double>(i) + offset;
        rows.keys.push_back(static_cast<float>(std::sin(0.011 * x) * std::cos(0.37 * x) + 0.2 * std::sin(1.7 * x)));
        rows.values.push_back(static_cast<float>(std::cos(0.013 * x + 0.3 * std::sin(0.05 * x))));
    }
    for (std::size_t i = 0; i < q; ++i) {
        const double x = static_cast<double>(i) + offset;
        rows.queries.push_back(static_cast<float>(std::cos(0.029 * x) + 0.5 * std::sin(0.61 * x)));
    }
    return rows;
}

// What the threads do to a layer: a prompt in chunks (append + attend_chunk),
// then decode steps (append + attend); returns every output in order.
struct workload {
    std::size_t prompt = engine_test::scaled(192, 160), chunk = engine_test::scaled(64, 32),
                decode = engine_test::scaled(24, 12);
    std::size_t tokens() const { return prompt + decode; }
};

using append_fn = std::function<void(std::size_t layer, const kvc::kv_view<const float>& keys,
                                     const kvc::kv_view<const float>& values, std::int64_t first)>;
using attend_chunk_fn = std::function<void(std::size_t layer, const float* q, std::size_t chunk, float* out)>;
using attend_fn = std::function<void(std::size_t layer, const float* q, float* out)>;

std::vector<float> drive_layer(const kvc::cache_config& shape, const workload& work, const layer_rows& rows,
                               std::size_t layer, const append_fn& append, const attend_chunk_fn& attend_chunk,
                               const attend_fn& attend) {
    const std::size_t kv_row = shape.kv_heads * shape.head_dim, q_row = shape.query_heads * shape.head_dim;
    std::vector<float> outputs(work.tokens() * q_row);
    auto view = [&](const std::vector<float>& data, std::size_t first, std::size_t count) {
        return kvc::kv_view<const float>(data.data() + first * kv_row, count, shape.kv_heads, shape.head_dim);
    };
    for (std::size_t t = 0; t < work.prompt; t += work.chunk) {
        append(layer, view(rows.keys, t, work.chunk), view(rows.values, t, work.chunk), static_cast<std::int64_t>(t));
        attend_chunk(layer, rows.queries.data() + t * q_row, work.chunk, outputs.data() + t * q_row);
    }
    for (std::size_t t = work.prompt; t < work.tokens(); ++t) {
        append(layer, view(rows.keys, t, 1), view(rows.values, t, 1), static_cast<std::int64_t>(t));
        attend(layer, rows.queries.data() + t * q_row, outputs.data() + t * q_row);
    }
    return outputs;
}

// Runs `work` on every layer of `caches` (built by `make`), first one cache
// alone on one thread, then every cache with one thread per layer, all at
// once; expects every threaded output bit-identical to the lone run.
template <class Cache>
void expect_threads_match_one_thread(const kvc::cache_config& shape, const workload& work,
                                     const std::function<std::unique_ptr<Cache>(const kvc::cache_config&)>& make) {
    std::vector<layer_rows> rows;
    for (std::size_t l = 0; l < shape.layers; ++l) rows.push_back(make_rows(shape, l, work.tokens()));
    auto drive = [&](Cache& cache, std::size_t layer) {
        return drive_layer(
            shape, work, rows[layer], layer,
            [&](std::size_t l, const kvc::kv_view<const float>& k, const kvc::kv_view<const float>& v,
                std::int64_t first) { cache.append(l, k, v, first); },
            [&](std::size_t l, const float* q, std::size_t chunk, float* out) { cache.attend_chunk(l, q, chunk, out); },
            [&](std::size_t l, const float* q, float* out) { cache.attend(l, q, out); });
    };

    const std::unique_ptr<Cache> alone = make(shape);
    std::vector<std::vector<float>> expected;
    for (std::size_t l = 0; l < shape.layers; ++l) expected.push_back(drive(*alone, l));

    // Two caches share one synchronised resource, each driven by one thread per layer.
    kvc::recycling_resource shared;
    kvc::cache_config on_shared = shape;
    on_shared.resource = &shared;
    std::vector<std::unique_ptr<Cache>> caches;
    caches.push_back(make(on_shared));
    caches.push_back(make(on_shared));
    std::vector<std::vector<std::vector<float>>> got(caches.size(), std::vector<std::vector<float>>(shape.layers));
    std::atomic<std::size_t> ready{0};
    const std::size_t threads = caches.size() * shape.layers;
    std::vector<std::thread> workers;
    for (std::size_t c = 0; c < caches.size(); ++c)
        for (std::size_t l = 0; l < shape.layers; ++l)
            workers.emplace_back([&, c, l] {
                ready.fetch_add(1);
                while (ready.load() < threads) std::this_thread::yield(); // start together
                got[c][l] = drive(*caches[c], l);
            });
    for (std::thread& worker : workers) worker.join();
    for (std::size_t c = 0; c < caches.size(); ++c) {
        for (std::size_t l = 0; l < shape.layers; ++l)
            EXPECT_TRUE(got[c][l] == expected[l]) << "cache " << c << ", layer " << l << " differs from one thread";
        EXPECT_EQ(caches[c]->bytes(), alone->bytes()) << "cache " << c;
    }
}

// Every configuration the registry builds: every codec alone, every eviction
// on every codec that carries eviction (sanitized builds: see below), every
// eviction with a decode-time schedule (compress during decode, every 4
// tokens over budget), and every swept merging and projection.
std::vector<engine::cache_spec> every_registry_configuration() {
    std::vector<engine::cache_spec> specs;
    std::vector<std::string> codecs, carriers, evictions;
    for (const engine::sweep_point& point : engine::sweep_points()) {
        if (point.spec.merge != "none" || point.spec.project != "none") specs.push_back(point.spec);
        else if (point.spec.evict == "none") codecs.push_back(point.spec.cache);
        else if (point.spec.every == 0 && point.spec.cache == "none:f16") evictions.push_back(point.spec.evict);
    }
    for (const std::string& codec : codecs) {
        specs.push_back({codec, "none"});
        bool carries = false;
        try {
            engine::make_cache(threading_shape(), {codec, "snapkv:0.25"}, engine_test::synthetic_calibration(threading_shape()));
            carries = true;
        } catch (const std::invalid_argument&) {
        }
        if (carries) carriers.push_back(codec);
    }
    // One value per eviction name (the sweep lists each at several).
    std::vector<std::string> names;
    for (const std::string& evict : evictions) {
        const std::string name = evict.substr(0, evict.find(':'));
        if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
    }
    // Optimised builds run the product, every eviction on every carrier. The
    // sanitized builds (20x slower here: 513 s of ASan for the product) run
    // the sum, which still puts every scorer and every store under threads:
    // every eviction on fp16 rows and SnapKV's compaction on every carrier.
    // Whatever a scorer shares between threads lives in the host and the
    // scorer, not in the codec's store, and the reverse.
    for (const std::string& carrier : carriers)
        for (const std::string& name : names)
            if (!engine_test::slow_build || carrier == "none:f16" || name == "snapkv")
                specs.push_back({carrier, name + ":0.25"});
    for (const std::string& name : names) specs.push_back({"none:f16", name + ":0.25", 4});
    return specs;
}

} // namespace

// The defect as reported: H2O (statistics collected on every attend), one
// thread per layer, 512-token prompt in chunks of 128, then 64 decode steps.
// Before the fix: "double free or corruption" or different outputs.
TEST(Threading, H2OLayersOnTwoThreadsMatchOneThread) {
    kvc::cache_config shape;
    shape.layers = 2;
    shape.kv_heads = 8;
    shape.query_heads = 32;
    shape.head_dim = 128;
    using cache = kvc::compressed_cache<kvc::evict::h2o, kvc::merge::none, kvc::quant::none<kvc::half>,
                                        kvc::project::none>;
    workload work;
    work.prompt = engine_test::scaled(512, 256);
    work.chunk = 128;
    work.decode = engine_test::scaled(64, 16);
    for (int round = 0; round < 3; ++round)
        expect_threads_match_one_thread<cache>(shape, work, [](const kvc::cache_config& c) {
            return std::make_unique<cache>(c, kvc::evict::h2o(kvc::evict::budget::ratio(0.25)));
        });
}

TEST(Threading, EveryRegistryConfigurationMatchesOneThread) {
    const kvc::cache_config shape = threading_shape();
    const engine::calibration calibrated = engine_test::synthetic_calibration(shape);
    const std::vector<engine::cache_spec> specs = every_registry_configuration();
    EXPECT_GT(specs.size(), engine_test::slow_build ? 60u : 150u); // every codec, and evictions on carriers
    std::printf("%zu configurations\n", specs.size());
    workload work;
    for (const engine::cache_spec& spec : specs) {
        SCOPED_TRACE(spec.label());
        expect_threads_match_one_thread<engine::kv_cache>(shape, work, [&](const kvc::cache_config& c) {
            return engine::make_cache(c, spec, calibrated);
        });
    }
}

// Budgets and selectors the registry does not spell, each with a decode-time
// schedule: a byte budget, per-layer weights, top-p, a threshold over
// engine-supplied scores (all 0 here: the threshold keeps sinks and window),
// and key re-rotation.
TEST(Threading, BudgetsOutsideTheRegistryMatchOneThread) {
    namespace e = kvc::evict;
    const kvc::cache_config shape = threading_shape();
    using f16 = kvc::quant::none<kvc::half>;
    workload work;
    {
        using cache = kvc::compressed_cache<e::h2o, kvc::merge::none, f16, kvc::project::none>;
        e::budget weighted = e::budget::ratio(0.25);
        weighted.layers = e::layer_allocation::pyramid();
        for (const e::budget& keep : {e::budget::in_bytes(48 * 1024), weighted})
            expect_threads_match_one_thread<cache>(shape, work, [&](const kvc::cache_config& c) {
                return std::make_unique<cache>(c, e::h2o(keep, e::schedule{true, 4}));
            });
    }
    {
        using cache = kvc::compressed_cache<e::policy<e::score::h2o, e::top_p>, kvc::merge::none, f16,
                                            kvc::project::none>;
        expect_threads_match_one_thread<cache>(shape, work, [](const kvc::cache_config& c) {
            e::top_p select;
            select.p = 0.8;
            return std::make_unique<cache>(c, e::policy<e::score::h2o, e::top_p>(e::budget::ratio(0.25),
                                                                                 e::schedule{true, 4}, {}, select));
        });
    }
    {
        using cache = kvc::compressed_cache<e::policy<e::score::external, e::threshold>, kvc::merge::none, f16,
                                            kvc::project::none>;
        expect_threads_match_one_thread<cache>(shape, work, [](const kvc::cache_config& c) {
            e::threshold select;
            select.tau = 0.5f;
            return std::make_unique<cache>(c, e::policy<e::score::external, e::threshold>(
                                                  e::budget::ratio(0.25), e::schedule{true, 4}, {}, select));
        });
    }
    {
        using cache = kvc::compressed_cache<e::streaming, kvc::merge::none, kvc::quant::none<float>,
                                            kvc::project::none>;
        expect_threads_match_one_thread<cache>(shape, work, [](const kvc::cache_config& c) {
            e::streaming policy(e::budget::ratio(0.25), e::schedule{true, 4});
            policy.rerotate.enabled = true;
            return std::make_unique<cache>(c, policy);
        });
    }
}
