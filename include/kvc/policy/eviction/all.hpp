// kvc/policy/eviction/all.hpp -- every eviction policy kvc has.
#pragma once

#include "kvc/policy/eviction/cur.hpp"
#include "kvc/policy/eviction/external.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/head_roles.hpp"
#include "kvc/policy/eviction/keydiff.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/eviction/qfilter.hpp"
#include "kvc/policy/eviction/random.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/eviction/streaming.hpp"
