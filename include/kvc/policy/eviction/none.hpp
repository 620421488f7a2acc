// kvc/policy/eviction/none.hpp -- keep every token.
//
// The eviction slot's identity: no scorer runs, no budget applies, the cache
// never triggers compaction. With every slot at `none` a compressed_cache is
// the full cache (tested bit for bit against kvc::full_cache).
#pragma once

#include "kvc/policy/traits.hpp"

namespace kvc::evict {

struct none {
    using family = eviction_family;
    static constexpr bool evicts = false;
};

} // namespace kvc::evict
