// kvc/all.hpp -- everything kvc has: <kvc/kvc.hpp> plus the eviction scorers
// built on Eigen and the calibration routines that learn artifacts.
//
//   #include <kvc/all.hpp>
//
// For tools, research code and tests that want every method behind one
// include. An engine that uses a few methods includes <kvc/kvc.hpp> (no
// Eigen) and, if it needs one of these, that one header: docs/ENGINE.md has
// what each costs to compile.
#pragma once

#include "kvc/kvc.hpp"

#include "kvc/policy/eviction/all.hpp" // adds expected_attention, leverage, value_weighted, hash_evict (Eigen)

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/calibration/head_roles.hpp"
#include "kvc/calibration/kmeans.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/calibration/pca.hpp" // Eigen
#include "kvc/calibration/query_filters.hpp" // Eigen
