// kvc/cache/head_attention.hpp -- the per-KV-head attention loops every cache shares.
//
// A cache hands these its head stores (anything with tokens(), attend() and
// prefill(), see storage/protocol.hpp); they split the query heads
// into GQA groups, run the kernels once per (layer, KV head) and finalize.
// full_cache and compressed_cache both use them, so a compressed cache with
// `none` policies runs exactly the baseline's arithmetic.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "kvc/cache/attention_scratch.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/protocol.hpp"

namespace kvc::detail {

// The longest head of a layer, in tokens.
template <class HeadAt>
std::size_t longest_head(const cache_config& config, HeadAt&& head_at) noexcept {
    std::size_t longest = 0;
    for (std::size_t h = 0; h < config.kv_heads; ++h)
        longest = head_at(h).tokens() > longest ? head_at(h).tokens() : longest;
    return longest;
}

// Floats of logits workspace a decode attend with statistics needs: the
// logits of one GQA group over the longest head.
inline std::size_t decode_logits_floats(const cache_config& config, std::size_t longest) noexcept {
    return config.group() * longest;
}

// Attention with no per-token bias (the default of the loops below).
struct no_bias {
    constexpr const float* operator()(std::size_t) const noexcept { return nullptr; }
};

// Decode: queries and out are [query_heads][head_dim]; mass (optional) gets,
// head after head, tokens(h) floats of attention probability summed over the group.
// Statistics need the logits kept: in `logits_workspace` when the caller lends
// decode_logits_floats() of them (a cache that decodes with statistics every
// step: no allocation per step), else in memory taken for the call.
// bias_at(h) is KV head h's additive logit per held token, or nullptr.
template <class HeadAt, class BiasAt = no_bias>
void attend_heads(const cache_config& config, HeadAt&& head_at, const float* queries, float* out, float* mass,
                  float* logits_workspace = nullptr, BiasAt&& bias_at = {}) {
    const kernels::kernel_table& k = kernels::active();
    const std::size_t group = config.group(), dim = config.head_dim;
    const bool own_logits = mass != nullptr && logits_workspace == nullptr;
    attention_scratch scratch(group * (dim + 2) +
                              (own_logits ? decode_logits_floats(config, longest_head(config, head_at)) : 0));
    const kernels::decode_state state = scratch.state(group);
    float* logits = !mass ? nullptr : own_logits ? scratch.data() + group * (dim + 2) : logits_workspace;
    for (std::size_t h = 0; h < config.kv_heads; ++h) {
        const auto& store = head_at(h);
        const std::size_t tokens = store.tokens();
        kernels::decode_problem p;
        p.group = group;
        p.queries = queries + h * group * dim;
        p.query_stride = dim;
        p.scale = config.logit_scale();
        p.bias = bias_at(h);
        p.logits = logits;
        p.logits_stride = tokens;
        kernels::common::reset_state<kernels::reference_arch>(state, group, dim);
        store.attend(k, p, state);
        kernels::common::finalize_state<kernels::reference_arch>(state, group, dim, out + h * group * dim, dim);
        if (mass) {
            for (std::size_t t = 0; t < tokens; ++t) mass[t] = 0.0f;
            k.accumulate_mass(logits, tokens, group, tokens, state.max, state.sum, mass);
            mass += tokens;
        }
    }
}

// Chunked prefill: queries and out are [chunk][query_heads][head_dim]; every
// head must hold at least `chunk` rows, the chunk being the last ones.
template <class HeadAt, class BiasAt = no_bias>
void attend_chunk_heads(const cache_config& config, HeadAt&& head_at, const float* queries, std::size_t chunk,
                        float* out, float* mass, BiasAt&& bias_at = {}) {
    const kernels::kernel_table& k = kernels::active();
    const std::size_t group = config.group(), dim = config.head_dim;
    std::size_t workspace = 0;
    for (std::size_t h = 0; h < config.kv_heads; ++h) {
        const std::size_t need = prefill_workspace_of(head_at(h), group, dim, chunk, mass != nullptr);
        workspace = need > workspace ? need : workspace;
    }
    attention_scratch scratch(workspace);
    for (std::size_t h = 0; h < config.kv_heads; ++h) {
        const auto& store = head_at(h);
        const std::size_t tokens = store.tokens();
        kernels::prefill_problem p;
        p.chunk = chunk;
        p.dim = dim;
        p.group = group;
        p.queries = queries + h * group * dim;
        p.query_token_stride = config.query_heads * dim;
        p.query_head_stride = dim;
        p.out = out + h * group * dim;
        p.out_token_stride = config.query_heads * dim;
        p.out_head_stride = dim;
        p.scale = config.logit_scale();
        p.mass = mass;
        p.bias = bias_at(h);
        if (mass) {
            for (std::size_t t = 0; t < tokens; ++t) mass[t] = 0.0f;
            mass += tokens;
        }
        store.prefill(k, p, scratch.data());
    }
}

} // namespace kvc::detail
