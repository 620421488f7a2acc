// One slice of the engine's compressed_cache instantiations (cache_registry.hpp).
#include "cache_registry.hpp"

namespace engine::registry {
std::unique_ptr<kv_cache> make_compressed_part1(const kvc::cache_config& shape, const cache_spec& spec,
                                                const calibration& calibrated, lookup& found) {
    return make_compressed<part_bounds[1], part_bounds[2]>(shape, spec, calibrated, found);
}
} // namespace engine::registry
