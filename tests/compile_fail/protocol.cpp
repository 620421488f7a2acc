// Compiled by ctest with -DKVC_CASE=n; every case but the control must FAIL
// with the protocol's message naming the family and the missing member
// (tests/compile_fail/compile_fail.cmake lists the expected messages).
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/storage/dense_rows.hpp"

using M = kvc::merge::none;
using P = kvc::project::none;
using Q = kvc::quant::none<kvc::half>;

// A store with every required member but compaction (neither keep nor compacted).
struct store_without_keep {
    kvc::dense_rows rows;
    std::size_t tokens() const noexcept { return rows.tokens(); }
    std::size_t bytes() const noexcept { return rows.bytes(); }
    void reserve_for_append(std::size_t n) { rows.reserve_for_append(n); }
    void push_back(const kvc::kernels::kernel_table& k, kvc::dtype from, const void* key, const void* value) noexcept {
        rows.push_back(k, from, key, value);
    }
    void attend(const kvc::kernels::kernel_table& k, kvc::kernels::decode_problem p,
                kvc::kernels::decode_state& s) const noexcept {
        rows.attend(k, p, s);
    }
    void prefill(const kvc::kernels::kernel_table& k, kvc::kernels::prefill_problem p, float* w) const noexcept {
        rows.prefill(k, p, w);
    }
    void decode_keys(const kvc::kernels::kernel_table& k, std::size_t f, std::size_t n, float* o) const noexcept {
        rows.decode_keys(k, f, n, o);
    }
    void decode_values(const kvc::kernels::kernel_table& k, std::size_t f, std::size_t n, float* o) const noexcept {
        rows.decode_values(k, f, n, o);
    }
    void reserve(std::size_t n) { rows.reserve(n); }
    void shrink_to_fit() { rows.shrink_to_fit(); }
    void release() noexcept { rows.release(); }
};
struct codec_without_keep {
    using family = kvc::quantization_family;
    using head_storage = store_without_keep;
    head_storage make_head(const kvc::cache_config& c) const { return {kvc::dense_rows(kvc::dtype::f16, c.head_dim, c.resource)}; }
};
struct codec_without_make_head {
    using family = kvc::quantization_family;
    using head_storage = kvc::dense_rows;
};

struct scorer_without_score {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
};
struct scorer_without_observe {
    static constexpr bool needs_attention_stats = true;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    void score(const kvc::evict::head_inputs&, float*) const noexcept {}
};
struct selector_without_select {
    static constexpr bool uses_target = true;
};

struct merger_without_fold {
    using family = kvc::merging_family;
    static constexpr bool merges = true;
    template <class Columns>
    void settle(const kvc::merge::merge_plan&, Columns&) const noexcept {}
};

struct projection_without_project {
    using family = kvc::projection_family;
    static constexpr bool projects = true;
    template <class Inner>
    using head_storage = Inner;
    template <class Inner>
    Inner make_head(Inner inner, const kvc::cache_config&, std::size_t, std::size_t) const { return inner; }
};

struct undeclared_column {
    using value_type = float;
    static constexpr float initial = 0.0f;
};

#if KVC_CASE == 0
using cache = kvc::compressed_cache<kvc::evict::none, M, codec_without_keep, P>;
#elif KVC_CASE == 1
using cache = kvc::compressed_cache<kvc::evict::none, M, codec_without_make_head, P>;
#elif KVC_CASE == 2
using cache = kvc::compressed_cache<kvc::evict::policy<scorer_without_score>, M, Q, P>;
#elif KVC_CASE == 3
using cache = kvc::compressed_cache<kvc::evict::policy<scorer_without_observe>, M, Q, P>;
#elif KVC_CASE == 4
using cache = kvc::compressed_cache<kvc::evict::policy<kvc::evict::score::h2o, selector_without_select>, M, Q, P>;
#elif KVC_CASE == 5
using cache = kvc::compressed_cache<kvc::evict::none, M, Q, P>;
inline float* read_undeclared(kvc::token_columns<kvc::column_list<kvc::position_column>>& c) {
    return c.data<undeclared_column>();
}
#elif KVC_CASE == 6
using cache = kvc::compressed_cache<kvc::evict::h2o, merger_without_fold, Q, P>;
#elif KVC_CASE == 7
using cache = kvc::compressed_cache<kvc::evict::h2o, kvc::merge::compensation, kvc::quant::kivi<2>, P>;
#elif KVC_CASE == 8
using cache = kvc::compressed_cache<kvc::evict::none, M, Q, projection_without_project>;
#else
using cache = kvc::compressed_cache<kvc::evict::none, M, Q, P>; // the controls: must compile
using merged = kvc::compressed_cache<kvc::evict::h2o, kvc::merge::compensation, Q, P>;
static_assert(sizeof(merged) > 0);
#endif

int main() { return sizeof(cache) > 0 ? 0 : 1; }
