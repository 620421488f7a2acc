// kvc/kvc.hpp -- the engine's umbrella header: core, views, kernel dispatch,
// both caches, every codec and every eviction policy that needs no linear
// algebra library.
//
//   #include <kvc/kvc.hpp>
//
// It does not pull in Eigen (a test checks): the four scorers built on Eigen
// (E9 expected_attention, E12 leverage, E14 value_weighted, E15 hash_evict)
// and the calibration routines that learn artifacts (query filters, head
// roles; CQ and KVQuant codebooks) cost seconds and hundreds of MB of compiler
// memory per translation unit. Include <kvc/all.hpp> for everything, or the
// one header you use (kvc/policy/eviction/leverage.hpp, ...).
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

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/kmeans.hpp"
#include "kvc/policy/eviction/any.hpp"
#include "kvc/policy/eviction/cur.hpp"
#include "kvc/policy/eviction/external.hpp"
#include "kvc/policy/eviction/global_local.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/head_roles.hpp"
#include "kvc/policy/eviction/keydiff.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/lagkv.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/eviction/qfilter.hpp"
#include "kvc/policy/eviction/random.hpp"
#include "kvc/policy/eviction/scissorhands.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/eviction/streaming.hpp"
#include "kvc/policy/merging/cam.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/merging/similarity.hpp"
#include "kvc/policy/merging/zero_merge.hpp"
#include "kvc/policy/projection/cskv.hpp"
#include "kvc/policy/projection/loki.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/projection/think.hpp"
#include "kvc/policy/quantization/any.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/policy/traits.hpp"

#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/cache_config.hpp"
