// The four policy families: traits, concepts (C++20) and what policies publish.
#include <gtest/gtest.h>

#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/traits.hpp"

namespace {

// Static-assert-only checks: a policy belongs to exactly its own family.
static_assert(kvc::is_eviction_policy_v<kvc::evict::none>);
static_assert(!kvc::is_merging_policy_v<kvc::evict::none>);
static_assert(!kvc::is_quantization_policy_v<kvc::evict::none>);
static_assert(!kvc::is_projection_policy_v<kvc::evict::none>);
static_assert(kvc::is_merging_policy_v<kvc::merge::none>);
static_assert(!kvc::is_eviction_policy_v<kvc::merge::none>);
static_assert(kvc::is_quantization_policy_v<kvc::quant::none<kvc::half>>);
static_assert(kvc::is_quantization_policy_v<kvc::quant::none<float>>);
static_assert(kvc::is_quantization_policy_v<kvc::quant::none<kvc::bfloat16>>);
static_assert(!kvc::is_projection_policy_v<kvc::quant::none<kvc::half>>);
static_assert(kvc::is_projection_policy_v<kvc::project::none>);
static_assert(!kvc::is_eviction_policy_v<kvc::project::none>);

// Types that are not policies at all.
struct unrelated {};
struct wrong_tag {
    using family = int;
};
static_assert(!kvc::is_eviction_policy_v<unrelated> && !kvc::is_merging_policy_v<unrelated> &&
              !kvc::is_quantization_policy_v<unrelated> && !kvc::is_projection_policy_v<unrelated>);
static_assert(!kvc::is_eviction_policy_v<wrong_tag>);
static_assert(!kvc::is_eviction_policy_v<int>);

// What policies need: absent means false; the `none` policies need nothing.
struct attention_hungry {
    using family = kvc::eviction_family;
    static constexpr bool needs_attention_stats = true;
    static constexpr bool needs_queries = true;
};
static_assert(kvc::needs_attention_stats_v<attention_hungry> && kvc::needs_queries_v<attention_hungry>);
static_assert(!kvc::needs_calibration_v<attention_hungry>);
static_assert(!kvc::needs_attention_stats_v<kvc::evict::none> && !kvc::needs_queries_v<kvc::evict::none> &&
              !kvc::needs_calibration_v<kvc::evict::none>);

#if KVC_HAS_CONCEPTS
static_assert(kvc::eviction_policy<kvc::evict::none>);
static_assert(!kvc::eviction_policy<kvc::merge::none>);
static_assert(kvc::merging_policy<kvc::merge::none>);
static_assert(kvc::quantization_policy<kvc::quant::none<kvc::half>>);
static_assert(kvc::projection_policy<kvc::project::none>);
static_assert(!kvc::projection_policy<unrelated>);
#endif

TEST(PolicyTraits, FamilyNamesAreReadable) {
    EXPECT_STREQ(kvc::policy_family_t<kvc::evict::none>::name, "eviction");
    EXPECT_STREQ(kvc::policy_family_t<kvc::merge::none>::name, "merging");
    EXPECT_STREQ(kvc::policy_family_t<kvc::quant::none<float>>::name, "quantization");
    EXPECT_STREQ(kvc::policy_family_t<kvc::project::none>::name, "projection");
}

TEST(PolicyTraits, ConceptsFollowTheLanguageStandard) {
#if defined(__cpp_concepts) && __cplusplus >= 202002L
    EXPECT_EQ(KVC_HAS_CONCEPTS, 1);
#else
    EXPECT_EQ(KVC_HAS_CONCEPTS, 0);
#endif
}

} // namespace
