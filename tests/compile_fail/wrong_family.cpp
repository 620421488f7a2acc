// Compiled by ctest with -DKVC_SLOT=n and expected to FAIL with a message
// naming the family that slot n of compressed_cache expects.
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"

using E = kvc::evict::none;
using M = kvc::merge::none;
using Q = kvc::quant::none<kvc::half>;
using P = kvc::project::none;

#if KVC_SLOT == 0
using cache = kvc::compressed_cache<M, M, Q, P>; // a merging policy in the eviction slot
#elif KVC_SLOT == 1
using cache = kvc::compressed_cache<E, Q, Q, P>;
#elif KVC_SLOT == 2
using cache = kvc::compressed_cache<E, M, P, P>;
#elif KVC_SLOT == 3
using cache = kvc::compressed_cache<E, M, Q, E>;
#else
using cache = kvc::compressed_cache<E, M, Q, P>; // the control: must compile
#endif

int main() { return sizeof(cache) > 0 ? 0 : 1; }
