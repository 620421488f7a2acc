// kvc/policy/eviction/any.hpp -- an eviction policy whose scorer and selector are chosen at run time.
//
//   kvc::evict::any policy(kvc::evict::budget::ratio(0.25), {}, kvc::evict::score::any(kvc::evict::score::snapkv{}));
//
// score::any holds any scorer (protocol.hpp) and select::any any selector;
// evict::any = evict::policy<score::any, select::any>. The policy's code is
// the one every eviction runs: it asks the held scorer what it needs
// (needs_of) and collects exactly that, so one compressed_cache type serves
// every scorer with the outputs of the scorer's own type, bit for bit.
//
// Choices: score::any declares every request a scorer may make (statistics,
// queries, keys, values, external and append scores) so the policy and the
// host compile every path once; needs() says which the held scorer takes,
// and the host switches the other columns off (they hold no memory). The
// held scorer and selector are immutable and shared between copies (they are
// parameters; the cache holds the state). Cost: one indirect call per head
// and compression for score(), per attention call for observe(), per append
// for on_append_rows, and per block of appended rows for the token-by-token
// append scorers (knorm, CUR: on_append_block, 4096 / head_dim rows a call).
#pragma once

#include <cstddef>
#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/eviction/protocol.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc::evict {
namespace score {

class any {
public:
    // Every request is possible; needs() says which the held scorer makes.
    static constexpr bool needs_attention_stats = true;
    static constexpr std::size_t query_window = 1; // nonzero: queries may be kept; needs().query_window is the window
    static constexpr bool needs_keys = true, needs_values = true;
    static constexpr bool needs_external_scores = true;
    static constexpr bool scores_on_append = true;

    template <class Scorer, class = std::enable_if_t<!std::is_same_v<Scorer, any>>>
    explicit any(Scorer scorer)
        : model_(std::make_shared<const model<Scorer>>(std::move(scorer))), needs_(needs_of(model_of<Scorer>().scorer)) {
        static_assert(check_scorer<Scorer>());
    }

    scorer_needs needs() const noexcept { return needs_; }
    void score(const head_inputs& in, float* scores) const { model_->score(in, scores); }
    void observe(float* state, const float* mass, std::size_t tokens, std::size_t queries) const noexcept {
        model_->observe(state, mass, tokens, queries);
    }
    float on_append(const kernels::kernel_table& k, const float* key, const float* value,
                    std::size_t dim) const noexcept {
        return model_->on_append(k, key, value, dim);
    }
    // The token-by-token scorers' scores of `count` rows in one indirect call.
    void on_append_block(const kernels::kernel_table& k, const float* keys, const float* values, std::size_t count,
                         std::size_t dim, float* scores) const noexcept {
        model_->on_append_block(k, keys, values, count, dim, scores);
    }
    std::size_t append_scratch(std::size_t dim) const noexcept { return model_->append_scratch(dim); }
    void on_append_rows(const append_inputs& in, float* scores) const noexcept { model_->on_append_rows(in, scores); }
    void validate(const cache_config& config) const { model_->validate(config); }

    // The held scorer, when it is a Scorer (tools and tests); nullptr otherwise.
    template <class Scorer>
    const Scorer* target() const noexcept {
        return model_->type() == typeid(Scorer) ? &model_of<Scorer>().scorer : nullptr;
    }
    // The held scorer's type (cache serialization names it in a file's header).
    const std::type_info& held_type() const noexcept { return model_->type(); }

private:
    struct model_base {
        virtual ~model_base() = default;
        virtual void score(const head_inputs&, float*) const = 0;
        virtual void observe(float*, const float*, std::size_t, std::size_t) const noexcept = 0;
        virtual float on_append(const kernels::kernel_table&, const float*, const float*, std::size_t) const noexcept = 0;
        virtual void on_append_block(const kernels::kernel_table&, const float*, const float*, std::size_t,
                                     std::size_t, float*) const noexcept = 0;
        virtual std::size_t append_scratch(std::size_t) const noexcept = 0;
        virtual void on_append_rows(const append_inputs&, float*) const noexcept = 0;
        virtual void validate(const cache_config&) const = 0;
        virtual const std::type_info& type() const noexcept = 0;
    };
    template <class Scorer>
    struct model final : model_base {
        Scorer scorer;
        explicit model(Scorer s) : scorer(std::move(s)) {}
        void score(const head_inputs& in, float* scores) const override { scorer.score(in, scores); }
        void observe(float* state, const float* mass, std::size_t tokens, std::size_t queries) const noexcept override {
            if constexpr (Scorer::needs_attention_stats) scorer.observe(state, mass, tokens, queries);
            else (void)state, (void)mass, (void)tokens, (void)queries;
        }
        float on_append(const kernels::kernel_table& k, const float* key, const float* value,
                        std::size_t dim) const noexcept override {
            if constexpr (scores_each_append_of<Scorer>::value) return scorer.on_append(k, key, value, dim);
            else return (void)k, (void)key, (void)value, (void)dim, 0.0f;
        }
        void on_append_block(const kernels::kernel_table& k, const float* keys, const float* values,
                             std::size_t count, std::size_t dim, float* scores) const noexcept override {
            if constexpr (scores_each_append_of<Scorer>::value)
                for (std::size_t t = 0; t < count; ++t)
                    scores[t] = scorer.on_append(k, keys + t * dim, values + t * dim, dim);
            else
                (void)k, (void)keys, (void)values, (void)count, (void)dim, (void)scores;
        }
        std::size_t append_scratch(std::size_t dim) const noexcept override {
            if constexpr (scores_append_rows_of<Scorer>::value) return scorer.append_scratch(dim);
            else return (void)dim, 0;
        }
        void on_append_rows(const append_inputs& in, float* scores) const noexcept override {
            if constexpr (scores_append_rows_of<Scorer>::value) scorer.on_append_rows(in, scores);
            else (void)in, (void)scores;
        }
        void validate(const cache_config& config) const override { detail::validate_part(scorer, config); }
        const std::type_info& type() const noexcept override { return typeid(Scorer); }
    };
    template <class Scorer>
    const model<Scorer>& model_of() const noexcept {
        return static_cast<const model<Scorer>&>(*model_);
    }

    std::shared_ptr<const model_base> model_;
    scorer_needs needs_;
};

} // namespace score

namespace select {

class any {
public:
    static constexpr bool uses_target = true; // may; targets() says whether the held selector does

    any() : any(per_head_topk{}) {}
    template <class Selector, class = std::enable_if_t<!std::is_same_v<Selector, any>>>
    explicit any(Selector selector)
        : model_(std::make_shared<const model<Selector>>(std::move(selector))), targets_(Selector::uses_target),
          equal_lengths_(keeps_equal_lengths(static_cast<const model<Selector>&>(*model_).selector)) {
        static_assert(check_selector<Selector>());
    }

    // The held selector, when it is a Selector (tools and tests); nullptr otherwise.
    template <class Selector>
    const Selector* target() const noexcept {
        return model_->type() == typeid(Selector) ? &static_cast<const model<Selector>&>(*model_).selector : nullptr;
    }
    // The held selector's type (cache serialization names it in a file's header).
    const std::type_info& held_type() const noexcept { return model_->type(); }
    bool targets() const noexcept { return targets_; }
    bool equal_lengths() const noexcept { return equal_lengths_; }
    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        model_->select(layer, keep);
    }
    void validate(const cache_config& config) const { model_->validate(config); }

private:
    struct model_base {
        virtual ~model_base() = default;
        virtual void select(const layer_candidates&, std::vector<std::vector<std::uint32_t>>&) const = 0;
        virtual void validate(const cache_config&) const = 0;
        virtual const std::type_info& type() const noexcept = 0;
    };
    template <class Selector>
    struct model final : model_base {
        Selector selector;
        explicit model(Selector s) : selector(std::move(s)) {}
        void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const override {
            selector.select(layer, keep);
        }
        void validate(const cache_config& config) const override { detail::validate_part(selector, config); }
        const std::type_info& type() const noexcept override { return typeid(Selector); }
    };

    std::shared_ptr<const model_base> model_;
    bool targets_, equal_lengths_;
};

} // namespace select

// An eviction policy whose scorer and selector are chosen at run time.
using any = policy<score::any, select::any>;

// The same policy (budget, schedule, re-rotation) with its scorer and selector held at run time.
template <class Scorer, class Selector>
any to_any(const policy<Scorer, Selector>& fixed) {
    any chosen(fixed.keep, fixed.when, score::any(fixed.scorer), select::any(fixed.selector));
    chosen.rerotate = fixed.rerotate;
    return chosen;
}

} // namespace kvc::evict
