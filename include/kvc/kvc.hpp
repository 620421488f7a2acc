// kvc/kvc.hpp -- umbrella header: everything a consumer of kvc needs.
//
//   #include <kvc/kvc.hpp>
//
// Link kvc::kvc (run-time dispatch over the instruction sets the CPU has) or
// kvc::kvc-header-only (kernels compiled inline for the consumer's own flags,
// e.g. -march=native). Finer-grained headers may be included on their own:
// each one is self-contained.
#pragma once

#include "kvc/core/config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/core/recycling_resource.hpp"

#include "kvc/view/kv_view.hpp"

#include "kvc/kernels/dispatch.hpp"

#include "kvc/policy/traits.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/kmeans.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/projection/none.hpp"

#include "kvc/cache/config.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/cache/compressed_cache.hpp"
