// examples/engine/cache_choice.hpp -- which kvc cache the engine runs, chosen
// on the command line, and the registry of policies the tools can name.
//
// kvc's caches are different types at compile time (kvc::full_cache,
// kvc::compressed_cache<Eviction, Merging, Quantization, Projection>), which
// is what lets the compiler inline every policy into the attention loops. An
// engine that picks its cache at run time needs one small indirection: the
// abstract `kv_cache` below, implemented for any kvc cache type by the
// `kvc_cache<Cache>` adapter. One virtual call per layer and step costs
// nothing next to the attention it dispatches.
//
// Spelling on the command line (kvc_engine and kvc-fidelity):
//   --cache full:f32 | full:f16 | full:bf16   kvc::full_cache storing fp32/fp16/bf16 rows
//   --cache CODEC                             kvc::compressed_cache with that quantization codec
//   --evict NAME[:VALUE]                      ... and that eviction policy (default none)
// Adding a policy is one line in codec_options() or eviction_options().
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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
    // Bytes the cache holds (kvc counts every allocation exactly).
    virtual std::size_t bytes() const = 0;
    // Rows held, summed over layers and KV heads (one row = one token's key and value in one head).
    virtual std::size_t rows() const = 0;
    // Returns spare capacity, so bytes() is what the held rows need.
    virtual void shrink_to_fit() = 0;
};

// The adapter: forwards each call to a kvc cache of type Cache.
template <class Cache>
class kvc_cache final : public kv_cache {
public:
    template <class... Arguments>
    explicit kvc_cache(Arguments&&... arguments) : cache_(std::forward<Arguments>(arguments)...) {}

    void append(std::size_t layer, const view& keys, const view& values, std::int64_t first_position) override {
        cache_.append(layer, keys, values, first_position);
    }
    void attend(std::size_t layer, const float* queries, float* out) override { cache_.attend(layer, queries, out); }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out) override {
        cache_.attend_chunk(layer, queries, chunk, out);
    }
    std::size_t bytes() const override { return cache_.bytes(); }
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
    Cache cache_;
};

// A decorator that measures the time spent inside the cache's attention calls
// (steady_clock around attend/attend_chunk) and appends. kvc-fidelity
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
    std::size_t bytes() const override { return inner_->bytes(); }
    std::size_t rows() const override { return inner_->rows(); }
    void shrink_to_fit() override { inner_->shrink_to_fit(); }

    double attention_seconds() const noexcept { return attention_seconds_; }
    double append_seconds() const noexcept { return append_seconds_; }

private:
    using clock = std::chrono::steady_clock;
    static double seconds_since(clock::time_point start) {
        return std::chrono::duration<double>(clock::now() - start).count();
    }
    std::unique_ptr<kv_cache> inner_;
    double attention_seconds_ = 0.0;
    double append_seconds_ = 0.0;
};

// ---------------------------------------------------------------------------
// Policy options: a name the command line uses and how to build the policy.
// ---------------------------------------------------------------------------

template <class Make>
struct policy_option {
    std::string_view name;      // "none:f16", "kivi:2", "snapkv"
    std::string_view parameter; // what follows "name:" on the command line ("keep_ratio"); empty: nothing
    std::vector<double> sweep;  // parameter values scripts/fidelity.sh measures
    std::string_view summary;   // one line for --list
    Make make;                  // () -> policy, or (double) -> policy when there is a parameter
};

// A quantization codec (the compressed_cache's third slot). Codecs whose
// parameter is a template argument (bits) get one line per value: "kivi:2", "kivi:4".
template <class Make>
policy_option<Make> codec(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// An eviction policy without a parameter.
template <class Make>
policy_option<Make> eviction(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// An eviction policy taking one number ("snapkv:0.25"), swept over `sweep`.
template <class Make>
policy_option<Make> eviction(std::string_view name, std::string_view parameter, std::vector<double> sweep,
                             std::string_view summary, Make make) {
    return {name, parameter, std::move(sweep), summary, std::move(make)};
}

// ===========================================================================
// The registry: one line per policy, by its METHODS.md name.
// ===========================================================================

// --cache CODEC: a kvc::compressed_cache with this quantization codec.
inline auto codec_options() {
    return std::make_tuple(
        codec("none:f32", "compressed_cache, rows as they are in fp32 (bit-identical to full:f32)",
              [] { return kvc::quant::none<float>{}; }),
        codec("none:f16", "compressed_cache, rows as they are in fp16", [] { return kvc::quant::none<kvc::half>{}; }),
        codec("none:bf16", "compressed_cache, rows as they are in bf16",
              [] { return kvc::quant::none<kvc::bfloat16>{}; })
        // e.g. codec("kivi:2", "KIVI (Q2), 2-bit keys per channel, values per token",
        //            [] { return kvc::quant::kivi<2>{}; }),
    );
}

// Eviction from the command line: `--evict NAME:KEEP_RATIO` keeps that
// fraction of the prompt's tokens in each KV head (the first 4, the attention
// sinks, and the newest 16 always among them: kvc's budget defaults),
// compressing once after the prompt (B9); decoded tokens are all kept.
// Decode-time compression (interval > 0) is left off for now: with it,
// compressed_cache also compresses the first prefill chunk before
// attend_chunk has seen it, and attend_chunk then rejects the chunk.
inline constexpr kvc::evict::schedule eviction_schedule{true, 0};

// An eviction policy (kvc::evict::policy<Scorer>) taking a keep ratio, swept over four budgets.
template <class Policy>
auto keep_ratio_eviction(std::string_view name, std::string_view summary) {
    return eviction(name, "keep_ratio", {0.75, 0.5, 0.25, 0.125}, summary, [](double keep_ratio) {
        return Policy(kvc::evict::budget::ratio(keep_ratio), eviction_schedule);
    });
}

// --evict NAME[:VALUE]: the compressed_cache's eviction policy.
inline auto eviction_options() {
    return std::make_tuple(
        eviction("none", "keep every token", [] { return kvc::evict::none{}; }),
        keep_ratio_eviction<kvc::evict::streaming>("streaming", "StreamingLLM (E1): attention sinks + newest tokens"),
        keep_ratio_eviction<kvc::evict::h2o>("h2o", "H2O (E2): attention accumulated over all queries"),
        keep_ratio_eviction<kvc::evict::a2sf>("a2sf", "A2SF (E3): accumulated attention with a forgetting factor"),
        keep_ratio_eviction<kvc::evict::snapkv>("snapkv", "SnapKV (E5): attention of the last 64 queries, pooled"),
        keep_ratio_eviction<kvc::evict::tova>("tova", "TOVA (E6): attention of the newest query"),
        keep_ratio_eviction<kvc::evict::knorm>("knorm", "K-norm (E7): keep low-norm keys"),
        keep_ratio_eviction<kvc::evict::keydiff>("keydiff", "KeyDiff (E8): keep keys unlike the mean key"),
        keep_ratio_eviction<kvc::evict::cur>("cur", "CUR (E13): key norm x value norm, windowed"),
        keep_ratio_eviction<kvc::evict::random>("random", "random (E17): the baseline every scorer must beat"));
}

// The codec eviction sweeps store their kept rows with (fp16, the usual engine cache).
inline constexpr std::string_view eviction_sweep_codec = "none:f16";

// --cache full:TYPE: the baseline, kvc::full_cache.
struct full_option {
    std::string_view name;
    kvc::dtype storage;
};
inline constexpr full_option full_options[] = {
    {"full:f32", kvc::dtype::f32}, {"full:f16", kvc::dtype::f16}, {"full:bf16", kvc::dtype::bf16}};

// ---------------------------------------------------------------------------
// Building a cache from its spelling.
// ---------------------------------------------------------------------------

// A cache configuration as the command line spells it.
struct cache_spec {
    std::string cache = "full:f32";
    std::string evict = "none";

    bool is_full() const {
        for (const full_option& option : full_options)
            if (cache == option.name) return true;
        return false;
    }
    // "full:f16", "none:f16", "none:f16 + snapkv:0.25".
    std::string label() const { return evict == "none" ? cache : cache + " + " + evict; }
    // The curve a configuration belongs to in docs/FIDELITY.md: full_cache,
    // the eviction method, or the codec's method (the spelling before ':').
    std::string method() const {
        if (is_full()) return "full_cache";
        const std::string codec_method = cache.substr(0, cache.find(':'));
        if (evict == "none") return codec_method;
        const std::string evict_method = evict.substr(0, evict.find(':'));
        return cache == eviction_sweep_codec ? evict_method : evict_method + "+" + codec_method;
    }
};

template <class Tuple, class Visit>
void for_each_option(const Tuple& options, Visit&& visit) {
    std::apply([&](const auto&... option) { (visit(option), ...); }, options);
}

namespace detail {

inline std::string format_number(double value) {
    std::ostringstream out;
    out << value;
    return out.str();
}

// The policy an option builds from the argument after ':' ("" when absent).
template <class Make>
auto make_policy(const policy_option<Make>& option, const std::string& argument, const std::string& spelled) {
    if constexpr (std::is_invocable_v<const Make&>) {
        if (!argument.empty())
            throw std::invalid_argument("--evict " + spelled + ": '" + std::string(option.name) +
                                        "' takes no value; write --evict " + std::string(option.name));
        return option.make();
    } else {
        std::size_t used = 0;
        double value = 0.0;
        try {
            value = std::stod(argument, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (argument.empty() || used != argument.size())
            throw std::invalid_argument("--evict " + spelled + ": expected " + std::string(option.name) + ":" +
                                        std::string(option.parameter) + " with a number, e.g. " +
                                        std::string(option.name) + ":0.25");
        return option.make(value);
    }
}

} // namespace detail

// How the command line writes an option: "none:f16", "snapkv:keep_ratio".
template <class Make>
std::string spelling(const policy_option<Make>& option) {
    std::string text(option.name);
    if (!option.parameter.empty()) {
        text += ':';
        text += option.parameter;
    }
    return text;
}

// Every --cache spelling, for messages and --list.
inline std::string cache_names() {
    std::string names;
    for (const full_option& option : full_options) names.append(option.name).append(" ");
    for_each_option(codec_options(), [&](const auto& option) { names.append(spelling(option)).append(" "); });
    names.pop_back();
    return names;
}
inline std::string eviction_names() {
    std::string names;
    for_each_option(eviction_options(), [&](const auto& option) { names.append(spelling(option)).append(" "); });
    names.pop_back();
    return names;
}

// Human-readable list of every option, for --list.
inline std::string describe_options() {
    std::string text;
    auto line = [&text](const std::string& name, const std::string& summary) {
        text.append("  ").append(name).append(name.size() < 14 ? 14 - name.size() : 1, ' ').append(summary).append("\n");
    };
    text += "--cache (KV cache type and storage):\n";
    for (const full_option& option : full_options)
        line(std::string(option.name),
             std::string("kvc::full_cache, rows stored in ") + kvc::name_of(option.storage) + " (the baseline)");
    for_each_option(codec_options(), [&](const auto& option) { line(spelling(option), std::string(option.summary)); });
    text += "--evict (eviction policy of a compressed cache):\n";
    for_each_option(eviction_options(), [&](const auto& option) { line(spelling(option), std::string(option.summary)); });
    return text;
}

// Builds the cache `spec` names for a model of shape `shape`. Throws
// std::invalid_argument naming the valid spellings when `spec` is not one;
// kvc::error when kvc rejects the configuration.
inline std::unique_ptr<kv_cache> make_cache(const kvc::cache_config& shape, const cache_spec& spec) {
    for (const full_option& option : full_options) {
        if (spec.cache != option.name) continue;
        if (spec.evict != "none")
            throw std::invalid_argument("--cache " + spec.cache +
                                        " is kvc::full_cache, which keeps every token; to evict, use a compressed "
                                        "cache such as --cache none:f16 --evict " + spec.evict);
        kvc::cache_config config = shape;
        config.storage = option.storage;
        return std::make_unique<kvc_cache<kvc::full_cache>>(config);
    }

    const std::size_t colon = spec.evict.find(':');
    const std::string evict_name = spec.evict.substr(0, colon);
    const std::string evict_argument = colon == std::string::npos ? "" : spec.evict.substr(colon + 1);
    std::unique_ptr<kv_cache> cache;
    bool codec_found = false, eviction_found = false;
    // Every (codec, eviction) pair is instantiated here; the loops pick the one named.
    for_each_option(codec_options(), [&](const auto& codec_option) {
        if (codec_option.name != spec.cache) return;
        codec_found = true;
        for_each_option(eviction_options(), [&](const auto& eviction_option) {
            if (eviction_option.name != evict_name) return;
            eviction_found = true;
            auto eviction = detail::make_policy(eviction_option, evict_argument, spec.evict);
            auto quantization = codec_option.make();
            using cache_type = kvc::compressed_cache<decltype(eviction), kvc::merge::none, decltype(quantization),
                                                     kvc::project::none>;
            cache = std::make_unique<kvc_cache<cache_type>>(shape, std::move(eviction), kvc::merge::none{},
                                                            std::move(quantization), kvc::project::none{});
        });
    });
    if (!codec_found)
        throw std::invalid_argument("unknown cache '" + spec.cache + "'; expected one of: " + cache_names());
    if (!eviction_found)
        throw std::invalid_argument("unknown --evict '" + spec.evict + "'; expected one of: " + eviction_names());
    return cache;
}

// One configuration of the fidelity sweep and the curve it belongs to.
struct sweep_point {
    std::string method;
    cache_spec spec;
};

// Everything scripts/fidelity.sh measures, read from the registry above: the
// full_cache storage types, every codec, and every eviction policy over its
// sweep values (on eviction_sweep_codec).
inline std::vector<sweep_point> sweep_points() {
    std::vector<sweep_point> points;
    auto add = [&](cache_spec spec) { points.push_back({spec.method(), std::move(spec)}); };
    for (const full_option& option : full_options) add({std::string(option.name), "none"});
    for_each_option(codec_options(), [&](const auto& option) { add({std::string(option.name), "none"}); });
    for_each_option(eviction_options(), [&](const auto& option) {
        for (double value : option.sweep)
            add({std::string(eviction_sweep_codec), std::string(option.name) + ":" + detail::format_number(value)});
    });
    return points;
}

} // namespace engine
