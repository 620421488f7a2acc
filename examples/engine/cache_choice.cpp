// examples/engine/cache_choice.cpp -- the command line's caches: kvc::full_cache,
// or whatever kvc::make_cache builds from the library's method names.
#include "cache_choice.hpp"

#include <algorithm>
#include <iterator>
#include <optional>
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

// Eviction on a quantized cache: these scorers at keep ratio 0.25 on these
// codecs (any codec pairs with any eviction; these are the pairs measured).
constexpr std::string_view quantized_eviction_sweep[] = {"snapkv", "knorm"};
constexpr std::string_view quantized_eviction_codecs[] = {"q8_0", "q4_0", "kivi:2"};

// Latents kept by a quantizing codec (P1 and P5 store them in the codec's
// store at their rank): these codecs under these projections, at kvref's d/2
// (the codecs' 32-wide groups take no smaller rank of a 64-wide head).
constexpr std::string_view latent_codecs[] = {"q8_0", "q4_0"};
constexpr std::string_view latent_projections[] = {"pca:32", "cskv:32:32"};

template <class Range>
bool contains(const Range& range, std::string_view name) {
    return std::find(std::begin(range), std::end(range), name) != std::end(range);
}

// A method as the command line writes it with `value` ("snapkv:0.25"; "q4_0").
std::string written(const kvc::method_info& method, const std::string& value) {
    return method.parameter.empty() ? method.name : method.name + ":" + value;
}

// The evictions whose value is the share of the cache they keep, swept at keep_ratio_sweep.
bool keeps_a_share(const kvc::method_info& method) {
    return method.family == kvc::method_family::eviction &&
           (method.parameter == "keep_ratio" || method.parameter == "retrieval_share");
}

// The sweep's spellings of a codec: once, or at each value of codec_sweeps() (default: the method's default).
std::vector<std::string> codec_spellings(const kvc::method_info& codec) {
    if (codec.parameter.empty() && codec.name != "kvquant") return {codec.name};
    for (const registry::sweep_values& sweep : registry::codec_sweeps())
        if (sweep.method == codec.name) {
            std::vector<std::string> spellings;
            for (const std::string& value : sweep.values) spellings.push_back(codec.name + ":" + value);
            return spellings;
        }
    return {written(codec, codec.default_value)};
}

// One flag's spelling, parsed by the library: the term it names, which must
// be of `family`. The library's errors (unknown names with their close
// matches, missing values) come back as std::invalid_argument naming the flag.
kvc::spec_term term_of(const std::string& flag, const std::string& spelled, kvc::method_family family) {
    std::vector<kvc::spec_term> terms;
    try {
        terms = kvc::parse_spec(spelled);
    } catch (const kvc::error& e) {
        throw std::invalid_argument(flag + " " + spelled + ": " + e.what());
    }
    if (terms.size() != 1 || terms[0].method->family != family) {
        std::string got;
        for (const kvc::spec_term& term : terms)
            got += (got.empty() ? "" : ", ") + term.method->name + " (" + kvc::name_of(term.method->family) + ")";
        throw std::invalid_argument(flag + " " + spelled + ": expected one " + kvc::name_of(family) +
                                    " method of kvc::methods(), got " + (got.empty() ? "none" : got));
    }
    return terms[0];
}

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

std::string describe_options() {
    std::string text;
    auto line = [&text](const std::string& name, const std::string& summary) {
        text.append("  ").append(name).append(name.size() < 30 ? 30 - name.size() : 1, ' ').append(summary).append("\n");
    };
    const char* headings[] = {
        "--cache (KV cache codec; any codec pairs with any --evict):\n",
        "--evict (eviction policy; NAME:VALUE, VALUE defaulting as shown):\n",
        "--merge (what folds the evicted tokens into the kept ones; needs --evict):\n",
        "--project (fewer stored numbers per token; think and loki on none:f32|none:f16|none:bf16, pca and cskv on any codec of their rank; with or without --evict, not with --merge):\n"};
    for (auto family : {kvc::method_family::quantization, kvc::method_family::eviction, kvc::method_family::merging,
                        kvc::method_family::projection}) {
        text += headings[static_cast<std::size_t>(family)];
        if (family == kvc::method_family::quantization)
            for (const full_option& option : full_options)
                line(std::string(option.name),
                     std::string("kvc::full_cache, rows stored in ") + kvc::name_of(option.storage) + " (the baseline)");
        if (family == kvc::method_family::merging) line("none", "what eviction drops is gone (the default)");
        for (const kvc::method_info& method : kvc::methods()) {
            if (method.family != family || method.name == "merge:none") continue;
            std::string summary = (method.id.empty() ? "" : method.id + " ") + method.summary;
            if (!method.default_value.empty()) summary += " (default " + method.default_value + ")";
            if (!registry::learnable(method)) summary += " [its artifact is not learnt by this engine]";
            else if (method.calibrated) summary += " [learnt on calibration text]";
            if (method.name == "kvquant") summary += "; kvquant:BITS (2, 3 or 4) learns at BITS, plain kvquant at 3";
            if (family == kvc::method_family::quantization) {
                const std::vector<std::string> spellings = codec_spellings(method);
                if (spellings != std::vector<std::string>{method.name}) {
                    summary += "; swept:";
                    for (const std::string& spelled : spellings) summary += " " + spelled;
                }
            }
            line(method.parameter.empty() ? method.name : method.name + ":" + method.parameter, summary);
        }
        if (family == kvc::method_family::eviction)
            text += "--evict-every N: also compress during decode, whenever a head holds N tokens over its budget\n";
    }
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
    if (spec.cache.rfind("full:", 0) == 0)
        throw std::invalid_argument("unknown cache '" + spec.cache +
                                    "'; kvc::full_cache is spelled full:f32, full:f16 or full:bf16");

    // Each flag names one method of its family, by the library's names; the
    // engine's kvquant:BITS is the library's kvquant learnt at BITS.
    std::vector<kvc::spec_term> terms;
    terms.push_back(term_of("--cache", registry::kvquant_spelling(spec.cache) ? "kvquant" : spec.cache,
                            kvc::method_family::quantization));
    const kvc::spec_term eviction = term_of("--evict", spec.evict, kvc::method_family::eviction);
    const bool evicts = eviction.method->name != "none";
    if (evicts) terms.push_back(eviction);
    if (spec.every != 0 && !evicts)
        throw std::invalid_argument("--evict-every needs an evicting policy, not --evict " + spec.evict);
    if (spec.merge != "none") terms.push_back(term_of("--merge", spec.merge, kvc::method_family::merging));
    if (spec.project != "none") terms.push_back(term_of("--project", spec.project, kvc::method_family::projection));

    kvc::cache_options options;
    options.rope = calibrated.rope;
    options.evict_every = spec.every;
    std::string library_spec;
    const registry::calibration_context context{shape, calibrated, spec};
    for (const kvc::spec_term& term : terms) {
        library_spec += (library_spec.empty() ? "" : " + ") + written(*term.method, term.value);
        if (term.method->calibrated) options.artifacts[term.method->name] = registry::learn(context, *term.method);
    }
    try {
        return std::make_unique<kvc_cache<kvc::dynamic_cache>>(kvc::make_cache(shape, library_spec, options));
    } catch (const kvc::error& e) { // a value out of range, a pairing not offered: the spelling's fault
        throw std::invalid_argument(spec.label() + ": " + e.what());
    }
}

const evicting_cache<kvc::merge::none>* evicting_cache_inside(kv_cache& cache) {
    const kvc::dynamic_cache* inside = kvc_cache_inside<kvc::dynamic_cache>(cache);
    return inside != nullptr ? inside->target<evicting_cache<kvc::merge::none>>() : nullptr;
}

std::vector<sweep_point> sweep_points() {
    std::vector<sweep_point> points;
    auto add = [&](cache_spec spec) { points.push_back({spec.method(), std::move(spec)}); };
    auto swept = [](const kvc::method_info& method, kvc::method_family family) {
        return method.family == family && registry::learnable(method) && !registry::never_swept(method);
    };
    const std::string codec(registry::eviction_sweep_codec);
    for (const full_option& option : full_options) add({std::string(option.name), "none"});
    for (const kvc::method_info& method : kvc::methods())
        if (swept(method, kvc::method_family::quantization))
            for (const std::string& spelled : codec_spellings(method)) add({spelled, "none"});
    for (const kvc::method_info& method : kvc::methods())
        if (swept(method, kvc::method_family::eviction) && keeps_a_share(method))
            for (const std::string& value : registry::keep_ratio_sweep) add({codec, written(method, value)});
    for (const kvc::method_info& method : kvc::methods()) {
        if (!swept(method, kvc::method_family::eviction) || !contains(merged_eviction_sweep, method.name)) continue;
        for (const kvc::method_info& merging : kvc::methods())
            if (swept(merging, kvc::method_family::merging) && merging.name != "merge:none")
                for (const std::string& value : registry::keep_ratio_sweep)
                    add({codec, written(method, value), 0, merging.name});
    }
    for (const registry::sweep_values& projection : registry::projection_sweeps())
        for (const std::string& value : projection.values) {
            cache_spec spec{codec, "none"};
            spec.project = std::string(projection.method) + ":" + value;
            add(spec);
        }
    for (std::string_view carrier : latent_codecs)
        for (std::string_view projection : latent_projections) {
            cache_spec spec{std::string(carrier), "none"};
            spec.project = std::string(projection);
            add(spec);
        }
    for (std::string_view name : decode_time_sweep)
        add({codec, std::string(name) + ":" + format_number(decode_time_ratio), decode_time_every});
    for (std::string_view carrier : quantized_eviction_codecs)
        for (std::string_view name : quantized_eviction_sweep)
            add({std::string(carrier), std::string(name) + ":" + format_number(decode_time_ratio)});
    return points;
}

std::vector<std::string> cache_share_evictions() {
    std::vector<std::string> names;
    for (const kvc::method_info& method : kvc::methods())
        if (keeps_a_share(method) && registry::learnable(method) && !registry::never_swept(method))
            names.push_back(method.name);
    return names;
}

} // namespace engine
