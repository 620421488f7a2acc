// examples/engine/cache_choice.hpp -- which kvc cache the engine runs, chosen
// on the command line.
//
// kvc's caches are different types at compile time (kvc::full_cache,
// kvc::compressed_cache<Eviction, Merging, Quantization, Projection>), which
// is what lets the compiler inline every policy into the attention loops. An
// engine that picks its cache at run time needs one small indirection: the
// abstract `kv_cache` below, implemented for any kvc cache type by the
// `kvc_cache<Cache>` adapter. One virtual call per layer and step costs
// nothing next to the attention it dispatches.
//
// Spelling on the command line (kvc_engine, kvc-fidelity, kvc-attention-error):
//   --cache full:f32 | full:f16 | full:bf16   kvc::full_cache storing fp32/fp16/bf16 rows
//   --cache CODEC                             a compressed cache with that quantization codec,
//                                             named as kvc::methods() names it (kvc/registry.hpp);
//                                             calibrated codecs (cq:*, kvquant) learn from the
//                                             model's rows over calibration text: `calibration`.
//                                             kvquant:BITS (2, 3, 4) is the library's kvquant
//                                             learnt at BITS bits (plain kvquant: 3)
//   --evict NAME[:VALUE]                      ... and that eviction policy (default none; qfilter
//                                             and head_roles learn from calibration text too)
//   --evict-every N                           ... compressing during decode too, whenever a
//                                             head is N tokens over its budget (B9)
//   --merge NAME                              ... folding what it evicts into what it keeps
//                                             (default none; e.g. compensation, M5)
//   --project NAME:VALUE                      ... storing fewer numbers per token (default none;
//                                             e.g. think:0.4, P3; pca:32, P1; cskv:32:32, P5;
//                                             pca, loki and cskv learn from calibration text)
// kvc::make_cache builds every compressed cache (a kvc::dynamic_cache, one
// type whatever the methods, compiled once in kvc's library); any codec pairs
// with any eviction and merging, and the library refuses, naming the close
// matches, what it does not know or offer. What the engine adds, learning
// calibrated methods' artifacts and the fidelity sweep's values, is in
// cache_registry.hpp, which only cache_choice.cpp includes.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/cache/dynamic_cache.hpp>
#include <kvc/kvc.hpp>

namespace engine {

// What the model needs from a KV cache, whatever its compile-time type.
class kv_cache {
public:
    // The engine's new keys or values, [tokens][kv_heads][head_dim] fp32 in its own buffer.
    using view = kvc::kv_view<const float>;

    virtual ~kv_cache() = default;
    virtual void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) = 0;
    // queries, out: [query_heads][head_dim] (one decode token).
    virtual void attend(std::size_t layer, const float* queries, float* out) = 0;
    // queries, out: [chunk][query_heads][head_dim], the last `chunk` appended tokens, causal.
    virtual void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) = 0;
    // The prompt of `layer` is complete (its last chunk attended): compress it
    // now. An evicting cache would otherwise do it inside the next one-token
    // append, so the first decode step would wait for it; the result is the
    // same either way. A cache that never evicts has nothing to do, hence the
    // default; a wrapper forwards it, else the compression only moves back
    // into that append.
    virtual void compress(std::size_t layer) { (void)layer; }
    // Bytes the cache holds (kvc counts every allocation exactly).
    virtual std::size_t bytes() const = 0;
    // The part of bytes() that holds recent queries for query-driven scorers
    // (SnapKV's window and its kin); with the after-prefill schedule it is
    // freed by the compression after the prompt.
    virtual std::size_t query_window_bytes() const { return 0; }
    // Rows held, summed over layers and KV heads (one row = one token's key and value in one head).
    virtual std::size_t rows() const = 0;
    // Returns spare capacity, so bytes() is what the held rows need.
    virtual void shrink_to_fit() = 0;
    // True when the cache rotates keys itself (KVQuant, Q3: it quantizes them
    // before RoPE and applies RoPE inside attention): the model then appends
    // its keys BEFORE RoPE. Queries are always given after RoPE.
    virtual bool wants_keys_before_rope() const { return false; }
};

namespace detail {
// kvc's positions contract: a head storage that declares `wants_positions`
// receives each token's position so that it can rotate keys given before RoPE.
template <class Storage, class = void>
struct rotates_keys : std::false_type {};
template <class Storage>
struct rotates_keys<Storage, std::void_t<decltype(Storage::wants_positions)>>
    : std::bool_constant<Storage::wants_positions> {};

template <class Cache, class = void>
struct keys_before_rope : std::false_type {};
template <class Cache>
struct keys_before_rope<Cache, std::void_t<typename Cache::head_storage>>
    : rotates_keys<typename Cache::head_storage> {};

// A cache that says at run time what its codec's stores offer (compressed_cache and dynamic_cache:
// offers(), which answers for the codec quant::any holds: mixed precision, keys before RoPE).
template <class Cache, class = void>
struct reports_offers : std::false_type {};
template <class Cache>
struct reports_offers<Cache, std::void_t<decltype(std::declval<const Cache&>().offers(kvc::store_capability{}))>>
    : std::true_type {};
template <class Cache>
bool offers(const Cache& cache, kvc::store_capability c, bool otherwise) {
    if constexpr (reports_offers<Cache>::value) return (void)otherwise, cache.offers(c);
    else return (void)cache, (void)c, otherwise;
}

// Caches whose codec may store each token at a precision its importance calls for (Q6).
template <class Cache, class = void>
struct assigns_precision : std::false_type {};
template <class Cache>
struct assigns_precision<Cache, std::void_t<decltype(std::declval<Cache&>().assign_precision(
                                    std::size_t{}, std::size_t{}, std::declval<const float*>()))>>
    : std::true_type {};
} // namespace detail

// The adapter: forwards each call to a kvc cache of type Cache.
//
// Mixed precision (Q6): a codec that stores tokens at the precision their
// importance calls for gets its scores here. The importance of a token is the
// attention mass it received from the queries of the prompt's last prefill
// chunk (SnapKV's observation window, E5, unpooled: the chunk is 64 queries
// with the tools' default --chunk), summed over the query heads of its KV
// head, as the cache returns it from attend_chunk. It is assigned once per
// layer, when the first decode token arrives (the moment evicting policies
// compress, B9), or when the engine calls compress(layer) before that;
// tokens decoded later arrive at high precision and stay there.
// Measured on kvref (kvc-fidelity, 4 windows, mixed:int8/int2:0.2), mean KL:
// last chunk 1.7e-3; mass from every prompt query (H2O, E2) 9.1e-3; that
// mass per query that saw the token 2.0e-3.
template <class Cache>
class kvc_cache final : public kv_cache {
public:
    template <class... Arguments>
    explicit kvc_cache(Arguments&&... arguments) : cache_(std::forward<Arguments>(arguments)...) {
        assigns_precision_ = detail::assigns_precision<Cache>::value &&
                             detail::offers(cache_, kvc::store_capability::assign_precision, true);
        if (assigns_precision_) prompt_mass_.resize(cache_.config().layers);
    }

    void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) override {
        if (keys.tokens() == 1) assign_prompt_precision(layer); // the prompt of this layer is complete
        cache_.append(layer, keys, values, first_position);
    }
    // What the first decode append would have done first, in the same order:
    // precisions from the prompt's mass, then the schedule's compression
    // (which compressed_cache::compress marks done, so that append skips it).
    void compress(std::size_t layer) override {
        assign_prompt_precision(layer);
        if constexpr (!std::is_same_v<Cache, kvc::full_cache>) cache_.compress(layer);
    }
    void attend(std::size_t layer, const float* queries, float* out) override { cache_.attend(layer, queries, out); }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        if constexpr (detail::assigns_precision<Cache>::value) {
            if (!assigns_precision_) return cache_.attend_chunk(layer, queries, chunk, out);
            // mass: [kv_heads][tokens held] (no eviction: every head holds the same tokens).
            std::vector<float>& mass = prompt_mass_[layer];
            mass.assign(cache_.config().kv_heads * cache_.tokens(layer, 0), 0.0f);
            cache_.attend_chunk(layer, queries, chunk, out, mass.data());
        } else {
            cache_.attend_chunk(layer, queries, chunk, out);
        }
    }
    bool wants_keys_before_rope() const override {
        return detail::offers(cache_, kvc::store_capability::positions, detail::keys_before_rope<Cache>::value);
    }
    std::size_t bytes() const override { return cache_.bytes(); }
    std::size_t query_window_bytes() const override {
        if constexpr (std::is_same_v<Cache, kvc::full_cache>) return 0;
        else return cache_.query_window_bytes();
    }
    std::size_t rows() const override {
        std::size_t total = 0;
        for (std::size_t layer = 0; layer < cache_.config().layers; ++layer) {
            if constexpr (std::is_same_v<Cache, kvc::full_cache>)
                total += cache_.tokens(layer) * cache_.config().kv_heads; // every head holds every token
            else
                total += cache_.tokens(layer); // compressed_cache: already summed over its (ragged) heads
        }
        return total;
    }
    void shrink_to_fit() override { cache_.shrink_to_fit(); }

    Cache& get() noexcept { return cache_; }

private:
    // Mixed precision: once per layer, after its last prefill chunk.
    void assign_prompt_precision(std::size_t layer) {
        if constexpr (detail::assigns_precision<Cache>::value) {
            if (!assigns_precision_) return;
            std::vector<float>& mass = prompt_mass_[layer];
            if (mass.empty()) return;
            const std::size_t held = cache_.tokens(layer, 0);
            for (std::size_t h = 0; h < cache_.config().kv_heads; ++h)
                cache_.assign_precision(layer, h, mass.data() + h * held);
            mass.clear();
            mass.shrink_to_fit();
        } else {
            (void)layer;
        }
    }

    Cache cache_;
    bool assigns_precision_ = false; // the codec re-encodes by importance (Q6)
    // Mixed precision only: per layer, the last prefill chunk's attention mass ([kv_heads][tokens]).
    std::vector<std::vector<float>> prompt_mass_;
};

// What a kvc::dynamic_cache holds for an evicting composition without
// merging or projection: the codec (quant::any) and the eviction's scorer and
// selector (evict::any) are chosen at run time inside this one type.
template <class Merging>
using evicting_cache = kvc::compressed_cache<kvc::evict::any, Merging, kvc::quant::any, kvc::project::none>;

// The kvc cache behind `cache` when `cache` is a kvc_cache<Cache>, else null:
// what a policy kept, per head, for tests and tools that inspect it.
template <class Cache>
Cache* kvc_cache_inside(kv_cache& cache) {
    auto* adapter = dynamic_cast<kvc_cache<Cache>*>(&cache);
    return adapter != nullptr ? &adapter->get() : nullptr;
}

// The evicting cache (no merging) behind a compressed `cache` that evicts,
// else null: what its policy kept, per head, for tests and tools that inspect it.
const evicting_cache<kvc::merge::none>* evicting_cache_inside(kv_cache& cache);

// A decorator that measures the time spent inside the cache's attention calls
// (steady_clock around attend/attend_chunk), appends and compress calls. kvc-fidelity
// reports the attention time of a compressed cache relative to full_cache.
class timed_cache final : public kv_cache {
public:
    explicit timed_cache(std::unique_ptr<kv_cache> inner) : inner_(std::move(inner)) {}

    void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) override {
        const auto start = clock::now();
        inner_->append(layer, keys, values, first_position);
        append_seconds_ += seconds_since(start);
    }
    void attend(std::size_t layer, const float* queries, float* out) override {
        const auto start = clock::now();
        inner_->attend(layer, queries, out);
        attention_seconds_ += seconds_since(start);
    }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        const auto start = clock::now();
        inner_->attend_chunk(layer, queries, chunk, out);
        attention_seconds_ += seconds_since(start);
    }
    void compress(std::size_t layer) override {
        const auto start = clock::now();
        inner_->compress(layer);
        compress_seconds_ += seconds_since(start);
    }
    std::size_t bytes() const override { return inner_->bytes(); }
    std::size_t query_window_bytes() const override { return inner_->query_window_bytes(); }
    std::size_t rows() const override { return inner_->rows(); }
    void shrink_to_fit() override { inner_->shrink_to_fit(); }
    bool wants_keys_before_rope() const override { return inner_->wants_keys_before_rope(); }

    double attention_seconds() const noexcept { return attention_seconds_; }
    double append_seconds() const noexcept { return append_seconds_; }
    // Explicit compress() calls only (a compression inside append counts as append time).
    double compress_seconds() const noexcept { return compress_seconds_; }

private:
    using clock = std::chrono::steady_clock;
    static double seconds_since(clock::time_point start) {
        return std::chrono::duration<double>(clock::now() - start).count();
    }
    std::unique_ptr<kv_cache> inner_;
    double attention_seconds_ = 0.0;
    double append_seconds_ = 0.0;
    double compress_seconds_ = 0.0;
};

// ---------------------------------------------------------------------------
// Choosing a cache.
// ---------------------------------------------------------------------------

// A cache configuration as the command line spells it.
struct cache_spec {
    std::string cache = "full:f32";
    std::string evict = "none";
    std::size_t every = 0; // --evict-every: decode-time compression interval (0: after the prompt only)
    std::string merge = "none"; // --merge: what folds the evicted tokens into the kept ones
    std::string project = "none"; // --project: fewer stored channels per key ("think:0.4")

    bool is_full() const;
    // "full:f16", "none:f16", "none:f16 + snapkv:0.25", "q4_0 + h2o:0.25 every 32",
    // "none:f16 + streaming:0.25 + compensation".
    std::string label() const;
    // The curve a configuration belongs to in docs/FIDELITY.md: full_cache,
    // the eviction method, or the codec's method (the spelling before ':').
    std::string method() const;
};

// Rows a model produced, per layer: keys (after RoPE, as caches receive
// them), the same keys before RoPE (when recorded, else empty) and values,
// [tokens][kv_heads][head_dim]; queries [tokens][query_heads][head_dim].
// The rows may concatenate several sequences, each run from position 0:
// `sequences` holds their lengths in tokens, in order (they sum to the rows'
// tokens). What looks across tokens (attention of a query over the keys
// before it) must stay inside one sequence.
struct recorded_rows {
    std::vector<std::vector<float>> keys, keys_before_rope, values, queries;
    std::vector<std::size_t> sequences;
};

// What calibrated policies learn from (codecs cq:*, kvquant:*; eviction
// qfilter, head_roles; projection pca, loki): the model's RoPE and its rows over calibration text,
// which must be disjoint from any text the cache is scored on. `rows` runs
// the model on first call and is called only for a calibrated policy;
// artifacts learnt from the rows are kept in `artifacts`, so a sweep building
// many caches learns each once. Keys: a codec's spelling ("cq:c4b8"),
// eviction_artifact_key() of an eviction policy, or projection_artifact_key()
// of a projection.
struct calibration {
    kvc::rope_config rope;
    std::function<const recorded_rows&()> rows; // empty: no calibration text (calibrated codecs are errors)
    std::string text;                           // where the rows come from, for reports
    std::shared_ptr<std::map<std::string, kvc::calibration::artifact>> artifacts =
        std::make_shared<std::map<std::string, kvc::calibration::artifact>>();
};

// Where calibration::artifacts keeps what the eviction policy `evict`
// ("qfilter:0.25") learns: one artifact per policy, whatever its value.
inline std::string eviction_artifact_key(const std::string& evict) {
    return "--evict " + evict.substr(0, evict.find(':'));
}
// Where calibration::artifacts keeps what the projection `project`
// ("pca:32", "loki:16:0.125") learns: one artifact per method, whatever its value.
inline std::string projection_artifact_key(const std::string& project) {
    return "--project " + project.substr(0, project.find(':'));
}
// True when building `spec` learnt (or reused) an artifact from `calibrated`.
inline bool learnt_from(const calibration& calibrated, const cache_spec& spec) {
    return calibrated.artifacts->count(spec.cache) != 0 ||
           calibrated.artifacts->count(eviction_artifact_key(spec.evict)) != 0 ||
           calibrated.artifacts->count(projection_artifact_key(spec.project)) != 0;
}

// Builds the cache `spec` names for a model of shape `shape`: kvc::full_cache,
// or kvc::make_cache's dynamic_cache. Throws std::invalid_argument when a
// flag does not name a method of its family (the library's message, naming
// the close matches), when a calibrated method is named without
// `calibrated.rows`, or when kvc refuses the configuration (a value out of
// range, a pairing it does not offer, a head dim the codec does not support):
// kvc's message, after the spelling.
std::unique_ptr<kv_cache> make_cache(const kvc::cache_config& shape, const cache_spec& spec,
                                     const calibration& calibrated = {});

// Human-readable list of every option, for --list.
std::string describe_options();

// One configuration of the fidelity sweep and the curve it belongs to.
struct sweep_point {
    std::string method;
    cache_spec spec;
};
// Everything scripts/fidelity.sh measures, read from the registry.
std::vector<sweep_point> sweep_points();
// The eviction policies whose value is the share of the cache they keep, in
// registry order: a keep ratio ("snapkv", ...) or head_roles' share of
// retrieval heads. kvc-attention-error --eviction-sweep runs each at 0.5, 0.25, 0.125.
std::vector<std::string> cache_share_evictions();

// A number as the command line and the reports write it ("0.25").
std::string format_number(double value);

} // namespace engine
