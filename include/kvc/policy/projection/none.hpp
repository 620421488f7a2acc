// kvc/policy/projection/none.hpp -- every token keeps all head_dim channels.
#pragma once

#include "kvc/policy/traits.hpp"

namespace kvc::project {

struct none {
    using family = projection_family;
    static constexpr bool projects = false;
};

} // namespace kvc::project
