// examples/engine/cache_choice.cpp -- the command line's cache spellings, read from the registry.
#include "cache_choice.hpp"

#include <algorithm>
#include <iterator>
#include <sstream>
#include <stdexcept>

#include "cache_registry.hpp"

namespace engine {

namespace {

// --cache full:TYPE: the baseline, kvc::full_cache.
struct full_option {
    std::string_view name;
    kvc::dtype storage;
};
constexpr full_option full_options[] = {
    {"full:f32", kvc::dtype::f32}, {"full:f16", kvc::dtype::f16}, {"full:bf16", kvc::dtype::bf16}};

// Decode-time schedules the fidelity sweep measures: these scorers at keep
// ratio 0.25, compressing whenever a head is 16 tokens over its budget.
constexpr std::string_view decode_time_sweep[] = {"streaming", "h2o", "tova", "snapkv", "knorm"};
constexpr double decode_time_ratio = 0.25;
constexpr std::size_t decode_time_every = 16;
// Evictions FIDELITY.md also measures with each merging policy, at every keep ratio of their sweep.
constexpr std::string_view merged_eviction_sweep[] = {"streaming", "h2o", "snapkv"};

// Eviction on a quantized cache: these scorers at keep ratio 0.25 on each
// codec that runs with eviction (besides the fp16 sweep codec).
constexpr std::string_view quantized_eviction_sweep[] = {"snapkv", "knorm"};

} // namespace

std::string format_number(double value) {
    std::ostringstream out;
    out << value;
    return out.str();
}

bool cache_spec::is_full() const {
    for (const full_option& option : full_options)
        if (cache == option.name) return true;
    return false;
}

std::string cache_spec::label() const {
    std::string text = evict == "none" ? cache : cache + " + " + evict;
    if (every != 0) text += " every " + std::to_string(every);
    if (merge != "none") text += " + " + merge;
    if (project != "none") text += " + " + project;
    return text;
}

std::string cache_spec::method() const {
    if (is_full()) return "full_cache";
    const std::string codec_method = cache.substr(0, cache.find(':'));
    if (project != "none") {
        const std::string project_method = project.substr(0, project.find(':'));
        return cache == registry::eviction_sweep_codec ? project_method : project_method + "+" + codec_method;
    }
    if (evict == "none") return codec_method;
    std::string evict_method = evict.substr(0, evict.find(':'));
    if (merge != "none") evict_method += "+" + merge;
    if (every != 0) evict_method += " (decode)";
    return cache == registry::eviction_sweep_codec ? evict_method : evict_method + "+" + codec_method;
}

std::string cache_names() {
    std::string names;
    for (const full_option& option : full_options) names.append(option.name).append(" ");
    registry::for_each_option(registry::codec_options(),
                              [&](const auto& option) { names.append(registry::spelling(option)).append(" "); });
    names.pop_back();
    return names;
}

// Where --merge runs: "with --evict streaming|h2o|... on --cache none:f16".
std::string merging_pairs() {
    std::string evictions, codecs;
    registry::for_each_option(registry::eviction_options(), [&](const auto& option) {
        if (std::decay_t<decltype(option)>::with_merging) evictions.append(evictions.empty() ? "" : "|").append(option.name);
    });
    registry::for_each_option(registry::codec_options(), [&](const auto& option) {
        if (std::decay_t<decltype(option)>::with_merging) codecs.append(codecs.empty() ? "" : "|").append(option.name);
    });
    return "with --evict " + evictions + " on --cache " + codecs;
}

std::string eviction_names() {
    std::string names;
    registry::for_each_option(registry::eviction_options(),
                              [&](const auto& option) { names.append(registry::spelling(option)).append(" "); });
    names.pop_back();
    return names;
}

std::string describe_options() {
    std::string text;
    auto line = [&text](const std::string& name, const std::string& summary) {
        text.append("  ").append(name).append(name.size() < 22 ? 22 - name.size() : 1, ' ').append(summary).append("\n");
    };
    text += "--cache (KV cache type and storage):\n";
    for (const full_option& option : full_options)
        line(std::string(option.name),
             std::string("kvc::full_cache, rows stored in ") + kvc::name_of(option.storage) + " (the baseline)");
    std::string with_eviction;
    registry::for_each_option(registry::codec_options(), [&](const auto& option) {
        line(registry::spelling(option), std::string(option.summary));
        if (std::decay_t<decltype(option)>::with_eviction) with_eviction.append(" ").append(option.name);
    });
    text += "--evict (eviction policy of a compressed cache; with --cache" + with_eviction + "):\n";
    registry::for_each_option(registry::eviction_options(), [&](const auto& option) {
        line(registry::spelling(option), std::string(option.summary));
    });
    text += "--evict-every N: also compress during decode, whenever a head holds N tokens over its budget\n";
    text += "--merge (what folds the evicted tokens into the kept ones; " + merging_pairs() + "):\n";
    registry::for_each_option(registry::merge_options(), [&](const auto& option) {
        line(registry::spelling(option), std::string(option.summary));
    });
    std::string with_projection;
    registry::for_each_option(registry::codec_options(), [&](const auto& option) {
        if (std::decay_t<decltype(option)>::with_projection) with_projection.append(" ").append(option.name);
    });
    text += "--project (fewer stored channels per token; with --evict none and --cache" + with_projection + "):\n";
    registry::for_each_option(registry::project_options(), [&](const auto& option) {
        line(registry::spelling(option), std::string(option.summary));
    });
    return text;
}

std::unique_ptr<kv_cache> make_cache(const kvc::cache_config& shape, const cache_spec& spec,
                                     const calibration& calibrated) {
    for (const full_option& option : full_options) {
        if (spec.cache != option.name) continue;
        if (spec.evict != "none")
            throw std::invalid_argument("--cache " + spec.cache +
                                        " is kvc::full_cache, which keeps every token; to evict, use a compressed "
                                        "cache such as --cache none:f16 --evict " + spec.evict);
        if (spec.every != 0) throw std::invalid_argument("--evict-every needs a compressed cache and --evict");
        if (spec.merge != "none") throw std::invalid_argument("--merge needs a compressed cache and --evict");
        if (spec.project != "none") throw std::invalid_argument("--project needs a compressed cache");
        kvc::cache_config config = shape;
        config.storage = option.storage;
        return std::make_unique<kvc_cache<kvc::full_cache>>(config);
    }
    if (spec.merge != "none" && spec.evict == "none")
        throw std::invalid_argument("--merge " + spec.merge + " folds what eviction drops: it needs --evict");
    if (spec.project != "none" && spec.evict != "none")
        throw std::invalid_argument("--project " + spec.project + " runs with --evict none in this engine (each "
                                    "eviction pair is another cache type; add the pair in "
                                    "examples/engine/cache_registry.hpp)");
    registry::lookup found;
    std::unique_ptr<kv_cache> cache;
    cache = registry::make_compressed(shape, spec, calibrated, found);
    if (!found.codec_found)
        throw std::invalid_argument("unknown cache '" + spec.cache + "'; expected one of: " + cache_names());
    if (!found.eviction_found)
        throw std::invalid_argument("unknown --evict '" + spec.evict + "'; expected one of: " + eviction_names());
    if (!found.project_found && spec.evict == "none") {
        std::string names;
        registry::for_each_option(registry::project_options(),
                                  [&](const auto& option) { names.append(" ").append(registry::spelling(option)); });
        throw std::invalid_argument("unknown --project '" + spec.project + "'; expected one of:" + names);
    }
    if (!found.project_offered) {
        std::string carriers;
        registry::for_each_option(registry::codec_options(), [&](const auto& option) {
            if (std::decay_t<decltype(option)>::with_projection) carriers.append(" ").append(option.name);
        });
        throw std::invalid_argument("--project " + spec.project + " runs on --cache" + carriers +
                                    " in this engine, not " + spec.cache);
    }
    if (!found.merge_found && found.pair_offered && spec.evict != "none") {
        std::string names;
        registry::for_each_option(registry::merge_options(),
                                  [&](const auto& option) { names.append(" ").append(option.name); });
        throw std::invalid_argument("unknown --merge '" + spec.merge + "'; expected one of:" + names);
    }
    if (!found.pair_offered) {
        std::string carriers;
        registry::for_each_option(registry::codec_options(), [&](const auto& option) {
            if (std::decay_t<decltype(option)>::with_eviction) carriers.append(" ").append(option.name);
        });
        throw std::invalid_argument("--cache " + spec.cache + " runs without eviction in this engine; evicting "
                                    "caches are built with --cache" + carriers +
                                    " (one flag in examples/engine/cache_registry.hpp adds more)");
    }
    if (!found.merge_offered)
        throw std::invalid_argument("--merge " + spec.merge + " runs " + merging_pairs() + " in this engine, not --cache " +
                                    spec.cache + " --evict " + spec.evict +
                                    " (a flag in examples/engine/cache_registry.hpp adds a codec or an eviction)");
    return cache;
}

std::vector<sweep_point> sweep_points() {
    std::vector<sweep_point> points;
    auto add = [&](cache_spec spec) { points.push_back({spec.method(), std::move(spec)}); };
    for (const full_option& option : full_options) add({std::string(option.name), "none"});
    registry::for_each_option(registry::codec_options(),
                              [&](const auto& option) { add({std::string(option.name), "none"}); });
    registry::for_each_option(registry::eviction_options(), [&](const auto& option) {
        for (double value : option.sweep)
            add({std::string(registry::eviction_sweep_codec), std::string(option.name) + ":" + format_number(value)});
    });
    registry::for_each_option(registry::eviction_options(), [&](const auto& option) {
        if (std::find(std::begin(merged_eviction_sweep), std::end(merged_eviction_sweep), option.name) ==
            std::end(merged_eviction_sweep))
            return;
        registry::for_each_option(registry::merge_options(), [&](const auto& merge_option) {
            if (merge_option.name == "none") return;
            for (double value : option.sweep)
                add({std::string(registry::eviction_sweep_codec), std::string(option.name) + ":" + format_number(value),
                     0, std::string(merge_option.name)});
        });
    });
    registry::for_each_option(registry::project_options(), [&](const auto& option) {
        for (double value : option.sweep) {
            cache_spec spec{std::string(registry::eviction_sweep_codec), "none"};
            spec.project = std::string(option.name) + ":" + format_number(value);
            add(spec);
        }
    });
    for (std::string_view name : decode_time_sweep)
        add({std::string(registry::eviction_sweep_codec), std::string(name) + ":" + format_number(decode_time_ratio),
             decode_time_every});
    registry::for_each_option(registry::codec_options(), [&](const auto& option) {
        if (!std::decay_t<decltype(option)>::with_eviction || option.name == registry::eviction_sweep_codec ||
            option.name == "none:f32")
            return;
        for (std::string_view name : quantized_eviction_sweep)
            add({std::string(option.name), std::string(name) + ":" + format_number(decode_time_ratio)});
    });
    return points;
}

std::vector<std::string> cache_share_evictions() {
    std::vector<std::string> names;
    registry::for_each_option(registry::eviction_options(), [&](const auto& option) {
        if (option.parameter == "keep_ratio" || option.parameter == "retrieval_share") names.emplace_back(option.name);
    });
    return names;
}

} // namespace engine
