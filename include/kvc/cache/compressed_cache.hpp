// kvc/cache/compressed_cache.hpp -- the composition host of the four policy families.
//
//   kvc::compressed_cache<Eviction, Merging, Quantization, Projection> cache(config);
//
// Each (layer, KV head) owns its own store of encoded rows and their original
// positions, so heads can hold different numbers of tokens once eviction
// frees memory per head (ragged storage). The data flow of one decode step is
//   append(layer, k, v, pos) -> attend(layer, q, out) -> [trigger -> scorer ->
//   selector -> merger] -> codec -> storage
// where the bracketed steps belong to the eviction and merging families.
//
// config.storage is full_cache's; here the codec decides how rows are stored.
// Policies are small value types given to the constructor (default-constructed
// when not given); their running state lives in the cache's per-head storage.
// With every slot `none` the cache runs the same storage and kernels as
// kvc::full_cache and produces bit-identical outputs (tested).
//
// Thread safety and errors as full_cache: different layers may be used
// concurrently; every call checks its arguments before changing anything.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>
#include <utility>
#include <vector>

#include "kvc/cache/config.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/cache/head_attention.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc {

template <class Eviction, class Merging, class Quantization, class Projection>
class compressed_cache {
    static_assert(is_eviction_policy_v<Eviction>,
                  "kvc::compressed_cache: the first parameter must be an eviction policy "
                  "(family kvc::eviction_family, e.g. kvc::evict::none)");
    static_assert(is_merging_policy_v<Merging>,
                  "kvc::compressed_cache: the second parameter must be a merging policy "
                  "(family kvc::merging_family, e.g. kvc::merge::none)");
    static_assert(is_quantization_policy_v<Quantization>,
                  "kvc::compressed_cache: the third parameter must be a quantization policy "
                  "(family kvc::quantization_family, e.g. kvc::quant::none<kvc::half>)");
    static_assert(is_projection_policy_v<Projection>,
                  "kvc::compressed_cache: the fourth parameter must be a projection policy "
                  "(family kvc::projection_family, e.g. kvc::project::none)");

public:
    using eviction_type = Eviction;
    using merging_type = Merging;
    using quantization_type = Quantization;
    using projection_type = Projection;
    using head_storage = typename Quantization::head_storage;

    // What the cache collects for its policies: nothing that none of them asks for.
    static constexpr bool collects_attention_stats = needs_attention_stats_v<Eviction> ||
                                                     needs_attention_stats_v<Merging> ||
                                                     needs_attention_stats_v<Quantization>;
    static constexpr bool collects_queries = needs_queries_v<Eviction> || needs_queries_v<Merging> ||
                                             needs_queries_v<Quantization> || needs_queries_v<Projection>;

    explicit compressed_cache(const cache_config& config, Eviction eviction = {}, Merging merging = {},
                              Quantization quantization = {}, Projection projection = {})
        : config_(checked(config)), eviction_(std::move(eviction)), merging_(std::move(merging)),
          quantization_(std::move(quantization)), projection_(std::move(projection)), heads_(config_.resource),
          positions_(config_.resource), last_position_(config_.layers, -1, config_.resource) {
        const std::size_t count = config_.layers * config_.kv_heads;
        heads_.reserve(count);
        positions_.reserve(count);
        for (std::size_t i = 0; i < count; ++i) {
            heads_.push_back(Quantization::make_head(config_));
            positions_.emplace_back(config_.resource);
        }
    }

    compressed_cache(const compressed_cache& other)
        : config_(other.config_), eviction_(other.eviction_), merging_(other.merging_),
          quantization_(other.quantization_), projection_(other.projection_),
          heads_(other.heads_, other.config_.resource), positions_(other.positions_, other.config_.resource),
          last_position_(other.last_position_, other.config_.resource) {}
    compressed_cache& operator=(const compressed_cache& other) {
        if (this != &other) {
            compressed_cache copy(other);
            *this = std::move(copy);
        }
        return *this;
    }
    compressed_cache(compressed_cache&&) noexcept = default;
    compressed_cache& operator=(compressed_cache&&) noexcept = default;
    ~compressed_cache() = default;

    const cache_config& config() const noexcept { return config_; }
    const Eviction& eviction() const noexcept { return eviction_; }
    const Merging& merging() const noexcept { return merging_; }
    const Quantization& quantization() const noexcept { return quantization_; }
    const Projection& projection() const noexcept { return projection_; }

    // As full_cache::append.
    template <class KeyView, class ValueView>
    void append(std::size_t layer, const KeyView& keys, const ValueView& values, std::int64_t first_position) {
        detail::validate_layer(config_, layer, "compressed_cache::append");
        detail::validate_kv_views(config_, keys, values, "compressed_cache::append");
        const std::size_t count = keys.tokens();
        detail::require(first_position > last_position_[layer], "compressed_cache::append: first_position ",
                        first_position, " must be greater than the last appended position ",
                        last_position_[layer]);
        detail::require(first_position >= 0 && static_cast<std::uint64_t>(first_position) + count <=
                                                    static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()),
                        "compressed_cache::append: expected positions in 0..2^31-1, got first_position ",
                        first_position, " with ", count, " tokens");
        if (count == 0) return;

        for (std::size_t h = 0; h < config_.kv_heads; ++h) {
            mutable_positions(layer, h).reserve_for_append(count);
            mutable_head(layer, h).reserve_for_append(count);
        }
        const kernels::kernel_table& k = kernels::active();
        for (std::size_t t = 0; t < count; ++t)
            for (std::size_t h = 0; h < config_.kv_heads; ++h)
                mutable_head(layer, h).push_back(k, KeyView::element_dtype, keys.row(t, h), values.row(t, h));
        for (std::size_t h = 0; h < config_.kv_heads; ++h) {
            auto& stored = mutable_positions(layer, h);
            const std::size_t old = stored.size();
            stored.resize_within_capacity(old + count);
            for (std::size_t t = 0; t < count; ++t) stored[old + t] = static_cast<std::int32_t>(first_position + t);
        }
        last_position_[layer] = first_position + static_cast<std::int64_t>(count) - 1;
    }

    // As full_cache::attend; mass holds, head after head, tokens(layer, h) floats.
    void attend(std::size_t layer, const float* queries, float* out, float* mass = nullptr) const {
        detail::validate_layer(config_, layer, "compressed_cache::attend");
        detail::require(queries != nullptr && out != nullptr,
                        "compressed_cache::attend: expected non-null queries and out");
        detail::attend_heads(config_, [&](std::size_t h) -> const head_storage& { return head(layer, h); }, queries,
                             out, mass);
    }

    // As full_cache::attend_chunk.
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out,
                      float* mass = nullptr) const {
        detail::validate_layer(config_, layer, "compressed_cache::attend_chunk");
        std::size_t shortest = head(layer, 0).tokens();
        for (std::size_t h = 1; h < config_.kv_heads; ++h)
            shortest = head(layer, h).tokens() < shortest ? head(layer, h).tokens() : shortest;
        detail::require(chunk >= 1 && chunk <= shortest, "compressed_cache::attend_chunk: expected chunk in 1..",
                        shortest, " (the tokens every head holds), got ", chunk);
        detail::require(queries != nullptr && out != nullptr,
                        "compressed_cache::attend_chunk: expected non-null queries and out");
        detail::attend_chunk_heads(config_, [&](std::size_t h) -> const head_storage& { return head(layer, h); },
                                   queries, chunk, out, mass);
    }

    // Tokens held by one KV head (heads may differ once eviction runs).
    std::size_t tokens(std::size_t layer, std::size_t kv_head) const noexcept { return head(layer, kv_head).tokens(); }
    // Tokens held by the layer: the sum over its KV heads.
    std::size_t tokens(std::size_t layer) const noexcept {
        std::size_t total = 0;
        for (std::size_t h = 0; h < config_.kv_heads; ++h) total += tokens(layer, h);
        return total;
    }
    // Original positions of the tokens one KV head holds.
    const std::int32_t* positions(std::size_t layer, std::size_t kv_head) const noexcept {
        return positions_[layer * config_.kv_heads + kv_head].data();
    }

    const head_storage& head(std::size_t layer, std::size_t kv_head) const noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }

    // Every byte taken from the memory resource: encoded rows, positions and bookkeeping.
    std::size_t bytes() const noexcept {
        std::size_t total = heads_.capacity() * sizeof(head_storage) +
                            positions_.capacity() * sizeof(aligned_buffer<std::int32_t>) +
                            last_position_.capacity() * sizeof(std::int64_t);
        for (const head_storage& store : heads_) total += store.bytes();
        for (const auto& stored : positions_) total += stored.bytes();
        return total;
    }

    void reserve(std::size_t tokens) {
        for (std::size_t i = 0; i < heads_.size(); ++i) {
            heads_[i].reserve(tokens);
            positions_[i].reserve(tokens);
        }
    }
    void shrink_to_fit() {
        for (head_storage& store : heads_) store.shrink_to_fit();
        for (auto& stored : positions_) stored.shrink_to_fit();
    }
    void clear() noexcept {
        for (head_storage& store : heads_) store.release();
        for (auto& stored : positions_) stored.release();
        for (auto& last : last_position_) last = -1;
    }

private:
    static cache_config checked(cache_config config) {
        detail::validate(config, "compressed_cache");
        if (config.resource == nullptr) config.resource = default_resource();
        return config;
    }
    head_storage& mutable_head(std::size_t layer, std::size_t kv_head) noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }
    aligned_buffer<std::int32_t>& mutable_positions(std::size_t layer, std::size_t kv_head) noexcept {
        return positions_[layer * config_.kv_heads + kv_head];
    }

    cache_config config_;
    Eviction eviction_;
    Merging merging_;
    Quantization quantization_;
    Projection projection_;
    std::pmr::vector<head_storage> heads_;                     // [layer][kv_head]
    std::pmr::vector<aligned_buffer<std::int32_t>> positions_; // [layer][kv_head]
    std::pmr::vector<std::int64_t> last_position_; // [layer], -1 before the first append
};

} // namespace kvc
