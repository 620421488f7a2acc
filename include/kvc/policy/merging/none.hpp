// kvc/policy/merging/none.hpp -- evicted tokens are dropped, nothing is folded.
#pragma once

#include "kvc/policy/traits.hpp"

namespace kvc::merge {

struct none {
    using family = merging_family;
    static constexpr bool merges = false;
};

} // namespace kvc::merge
