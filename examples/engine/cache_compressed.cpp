// The engine's compressed_cache types, and make_compressed, which picks one
// for a command line's names (cache_registry.hpp).
#include <optional>

#include "cache_registry.hpp"

namespace engine::registry {

std::unique_ptr<kv_cache> make_compressed(const kvc::cache_config& shape, const cache_spec& spec,
                                          const calibration& calibrated, lookup& found) {
    const std::size_t colon = spec.evict.find(':');
    const std::string evict_name = spec.evict.substr(0, colon);
    const std::string evict_argument = colon == std::string::npos ? "" : spec.evict.substr(colon + 1);
    const calibration_context context{shape, calibrated, spec};

    // The codec, by name: each option once, whatever the eviction.
    std::optional<kvc::quant::any> codec;
    bool codec_with_eviction = false, codec_with_merging = false;
    for_each_option(codec_options(), [&](const auto& option) {
        if (option.name != spec.cache) return;
        found.codec_found = true;
        codec.emplace(make_codec(option, context));
        codec_with_eviction = option.with_eviction;
        codec_with_merging = option.with_merging;
    });
    if (!codec) return nullptr;

    std::unique_ptr<kv_cache> cache;
    if (evict_name == "none") {
        found.eviction_found = true;
        (void)make_eviction(std::get<0>(eviction_options()), evict_argument, context);
        const std::size_t project_colon = spec.project.find(':');
        const std::string project_name = spec.project.substr(0, project_colon);
        const std::string project_argument =
            project_colon == std::string::npos ? "" : spec.project.substr(project_colon + 1);
        for_each_option(project_options(), [&](const auto& project_option) {
            if (project_option.name != project_name) return;
            found.project_found = true;
            auto projection = make_projection(project_option, project_argument, spec);
            using projection_type = std::decay_t<decltype(projection)>;
            if constexpr (std::is_same_v<projection_type, kvc::project::none>) {
                cache = std::make_unique<kvc_cache<codec_alone_cache>>(shape, kvc::evict::none{}, kvc::merge::none{},
                                                                       std::move(*codec), kvc::project::none{});
            } else {
                // A projection runs on the codecs marked with_projection, whose type it needs.
                for_each_option(codec_options(), [&](const auto& codec_option) {
                    if (codec_option.name != spec.cache) return;
                    if constexpr (std::decay_t<decltype(codec_option)>::with_projection) {
                        auto concrete = make_codec(codec_option, context);
                        using cache_type = kvc::compressed_cache<kvc::evict::none, kvc::merge::none,
                                                                 std::decay_t<decltype(concrete)>, projection_type>;
                        cache = std::make_unique<kvc_cache<cache_type>>(shape, kvc::evict::none{}, kvc::merge::none{},
                                                                        std::move(concrete), std::move(projection));
                    } else {
                        found.project_offered = false;
                    }
                });
            }
        });
        return cache;
    }

    // The eviction policy, by name, its scorer and selector held at run time.
    std::optional<kvc::evict::any> eviction;
    bool eviction_with_merging = false;
    for_each_option(eviction_options(), [&](const auto& option) {
        if (option.name != evict_name) return;
        found.eviction_found = true;
        using policy_type = std::decay_t<decltype(make_eviction(option, evict_argument, context))>;
        if constexpr (!std::is_same_v<policy_type, kvc::evict::none>) {
            if (!codec_with_eviction) {
                found.pair_offered = false;
                return;
            }
            eviction.emplace(kvc::evict::to_any(make_eviction(option, evict_argument, context)));
            eviction_with_merging = option.with_merging;
        }
    });
    if (!eviction) return nullptr;

    for_each_option(merge_options(), [&](const auto& merge_option) {
        if (merge_option.name != spec.merge) return;
        found.merge_found = true;
        auto merging = merge_option.make();
        using merging_type = std::decay_t<decltype(merging)>;
        if (!std::is_same_v<merging_type, kvc::merge::none> && !(codec_with_merging && eviction_with_merging)) {
            found.merge_offered = false;
            return;
        }
        cache = std::make_unique<kvc_cache<evicting_cache<merging_type>>>(
            shape, std::move(*eviction), std::move(merging), std::move(*codec), kvc::project::none{});
    });
    return cache;
}

} // namespace engine::registry
