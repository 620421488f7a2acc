// A deliberate layering violation: tests/cmake/layering.cmake must reject this tree (ctest headers.layering_control).
#pragma once
#include "kvc/cache/compressed_cache.hpp"
