// kvc/cache/full_cache.hpp -- the uncompressed KV cache: kvc's baseline and oracle.
//
// Plain storage of every key and value row, per layer and KV head, in fp32,
// fp16 or bf16, and plain (fused, SIMD) attention over it. Every compressed
// configuration is measured against it for memory, latency and output error.
//
// Data flow per decode step, as an engine drives it:
//   cache.append(layer, k, v, position);   // k, v: kv_view over the engine's new rows
//   cache.attend(layer, q, out);           // q, out: [query_heads][head_dim] floats
//
// Thread safety (tested in tests/engine/threading_test.cpp, also under TSan):
// - May run concurrently: calls on different layers (append, attend,
//   attend_chunk, and the per-layer reads: tokens(layer), positions, head);
//   any const calls together (attend is const here: it keeps its state in the
//   call); calls on different caches (one per sequence of a batch).
// - May not: two calls on the same layer when either changes it, and any call
//   together with one that spans every layer (reserve, shrink_to_fit, clear,
//   copy, move, assignment, bytes()): synchronise those as for a std::vector.
// - A memory resource shared by caches or layers used on several threads must
//   be thread-safe (std::pmr::new_delete_resource, kvc's default, and
//   kvc::recycling_resource are; std::pmr::unsynchronized_pool_resource is not).
//
// Errors: every public call checks its arguments first and throws kvc::error
// before touching the cache; an append that fails to allocate leaves the token
// count and contents as they were (strong guarantee).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>
#include <utility>
#include <vector>

#include "kvc/cache/head_attention.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

namespace detail {

// Checks that a pair of K/V views fits a cache of this shape.
template <class KeyView, class ValueView>
void validate_kv_views(const cache_config& c, const KeyView& keys, const ValueView& values, const char* who) {
    require(keys.heads() == c.kv_heads, who, ": keys view has ", keys.heads(), " heads, expected kv_heads = ",
            c.kv_heads);
    require(values.heads() == c.kv_heads, who, ": values view has ", values.heads(),
            " heads, expected kv_heads = ", c.kv_heads);
    require(keys.dim() == c.head_dim, who, ": keys view has dim ", keys.dim(), ", expected head_dim = ", c.head_dim);
    require(values.dim() == c.head_dim, who, ": values view has dim ", values.dim(), ", expected head_dim = ",
            c.head_dim);
    require(keys.tokens() == values.tokens(), who, ": keys view has ", keys.tokens(),
            " tokens but values view has ", values.tokens(), "; expected the same count");
    require(KeyView::element_dtype == ValueView::element_dtype, who, ": keys are ", name_of(KeyView::element_dtype),
            " but values are ", name_of(ValueView::element_dtype), "; expected one element type");
}

// `layers_held`: how many layers the cache still holds (config.layers, or 0
// once it has been moved from).
inline void validate_held(const cache_config& c, std::size_t layers_held, const char* who) {
    require(layers_held == c.layers, who, ": this cache has been moved from; expected a cache that holds its ",
            c.layers, " layers (assign one to it first)");
}
inline void validate_layer(const cache_config& c, std::size_t layers_held, std::size_t layer, const char* who) {
    validate_held(c, layers_held, who);
    require(layer < c.layers, who, ": layer ", layer, " out of range, expected < ", c.layers);
}
inline void validate_head(const cache_config& c, std::size_t layers_held, std::size_t layer, std::size_t kv_head,
                          const char* who) {
    validate_layer(c, layers_held, layer, who);
    require(kv_head < c.kv_heads, who, ": KV head ", kv_head, " out of range, expected < ", c.kv_heads);
}

// A std::pmr::vector that a move always leaves empty. A moved-from
// std::pmr::vector whose resource differs from the target's keeps its
// (moved-from) elements; the caches keep their per-layer storage in this so
// that a moved-from cache holds no layer at all, and every call that names a
// layer rejects it (validate_layer) instead of reading moved-from storage.
template <class T>
class emptied_by_move : public std::pmr::vector<T> {
    using base = std::pmr::vector<T>;

public:
    explicit emptied_by_move(memory_resource* resource) : base(resource) {}
    emptied_by_move(const emptied_by_move& other, memory_resource* resource) : base(other, resource) {}
    emptied_by_move(emptied_by_move&& other) noexcept : base(std::move(other)) { other.clear(); }
    emptied_by_move& operator=(emptied_by_move&& other) {
        base::operator=(std::move(other));
        other.clear();
        return *this;
    }
    emptied_by_move(const emptied_by_move&) = delete;
    emptied_by_move& operator=(const emptied_by_move&) = delete;
    ~emptied_by_move() = default;
};

struct cache_serializer; // cache/serialization.hpp
} // namespace detail

class full_cache {
    friend struct detail::cache_serializer;

public:
    explicit full_cache(const cache_config& config)
        : config_(checked(config)), heads_(config_.resource), positions_(config_.resource) {
        heads_.reserve(config_.layers * config_.kv_heads);
        for (std::size_t i = 0; i < config_.layers * config_.kv_heads; ++i)
            heads_.emplace_back(config_.storage, config_.head_dim, config_.resource);
        positions_.reserve(config_.layers);
        for (std::size_t l = 0; l < config_.layers; ++l) positions_.emplace_back(config_.resource);
    }

    // Copies (e.g. to fork a sequence) allocate from the same resource.
    full_cache(const full_cache& other)
        : config_(other.config_), heads_(other.heads_, other.config_.resource),
          positions_(other.positions_, other.config_.resource) {}
    full_cache& operator=(const full_cache& other) {
        if (this != &other) {
            full_cache copy(other);
            *this = std::move(copy);
        }
        return *this;
    }
    full_cache(full_cache&&) noexcept = default;
    full_cache& operator=(full_cache&&) noexcept = default;
    ~full_cache() = default;

    const cache_config& config() const noexcept { return config_; }

    // Appends keys.tokens() tokens to `layer` at positions first_position,
    // first_position + 1, ...; positions must increase along the sequence.
    template <class KeyView, class ValueView>
    void append(std::size_t layer, const KeyView& keys, const ValueView& values, std::int64_t first_position) {
        check_layer(layer, "full_cache::append");
        detail::validate_kv_views(config_, keys, values, "full_cache::append");
        const std::size_t count = keys.tokens();
        auto& positions = positions_[layer];
        const std::int64_t last = positions.empty() ? -1 : positions[positions.size() - 1];
        detail::require(first_position > last, "full_cache::append: first_position ", first_position,
                        " must be greater than the last stored position ", last);
        detail::require(first_position >= 0 && static_cast<std::uint64_t>(first_position) + count <=
                                                    static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()),
                        "full_cache::append: expected positions in 0..2^31-1, got first_position ", first_position,
                        " with ", count, " tokens");
        if (count == 0) return;

        // Allocate everything first: only this part can throw.
        positions.reserve_for_append(count);
        for (std::size_t h = 0; h < config_.kv_heads; ++h) mutable_head(layer, h).reserve_for_append(count);

        const kernels::kernel_table& k = kernels::active();
        for (std::size_t t = 0; t < count; ++t)
            for (std::size_t h = 0; h < config_.kv_heads; ++h)
                mutable_head(layer, h).push_back(k, KeyView::element_dtype, keys.row(t, h), values.row(t, h));
        const std::size_t old = positions.size();
        positions.resize_within_capacity(old + count);
        for (std::size_t t = 0; t < count; ++t) positions[old + t] = static_cast<std::int32_t>(first_position + t);
    }

    // Decode attention of one new query per query head.
    //   queries: [query_heads][head_dim] floats; out: [query_heads][head_dim] floats.
    //   mass (optional): [kv_heads][tokens(layer)] floats, receives for every
    //   token the attention probability summed over the KV head's query group.
    void attend(std::size_t layer, const float* queries, float* out, float* mass = nullptr) const {
        check_layer(layer, "full_cache::attend");
        detail::require(queries != nullptr && out != nullptr, "full_cache::attend: expected non-null queries and out");
        detail::attend_heads(config_, [&](std::size_t h) -> const dense_rows& { return head_at(layer, h); },
                             queries, out, mass);
    }

    // Causal attention of the last `chunk` appended tokens (chunked prefill):
    // query i of the chunk sees every token up to and including its own.
    //   queries, out: [chunk][query_heads][head_dim] floats.
    //   mass (optional): [kv_heads][tokens(layer)], summed over the chunk's queries and each group.
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out,
                      float* mass = nullptr) const {
        check_layer(layer, "full_cache::attend_chunk");
        const std::size_t tokens = positions_[layer].size();
        detail::require(chunk >= 1 && chunk <= tokens, "full_cache::attend_chunk: expected chunk in 1..", tokens,
                        " (the tokens appended so far), got ", chunk);
        detail::require(queries != nullptr && out != nullptr,
                        "full_cache::attend_chunk: expected non-null queries and out");
        detail::attend_chunk_heads(config_, [&](std::size_t h) -> const dense_rows& { return head_at(layer, h); },
                                   queries, chunk, out, mass);
    }

    // The reads check their indices like every other call (kvc::error when out of range).
    std::size_t tokens(std::size_t layer) const {
        check_layer(layer, "full_cache::tokens");
        return positions_[layer].size();
    }
    const std::int32_t* positions(std::size_t layer) const {
        check_layer(layer, "full_cache::positions");
        return positions_[layer].data();
    }

    // Stored rows, for tests, tools and policies that read the cache.
    const dense_rows& head(std::size_t layer, std::size_t kv_head) const {
        detail::validate_head(config_, positions_.size(), layer, kv_head, "full_cache::head");
        return head_at(layer, kv_head);
    }

    // The bytes one attention over `layer` reads: every head's key and value rows.
    std::size_t stored_bytes(std::size_t layer) const {
        check_layer(layer, "full_cache::stored_bytes");
        std::size_t total = 0;
        for (std::size_t h = 0; h < config_.kv_heads; ++h) total += head_at(layer, h).stored_bytes();
        return total;
    }

    // Every byte the cache holds, exactly what it took from its memory
    // resource: key and value rows, positions, and the per-head bookkeeping.
    std::size_t bytes() const noexcept {
        std::size_t total = heads_.capacity() * sizeof(dense_rows) +
                            positions_.capacity() * sizeof(aligned_buffer<std::int32_t>);
        for (const dense_rows& rows : heads_) total += rows.bytes();
        for (const auto& positions : positions_) total += positions.bytes();
        return total;
    }

    // Pre-allocates room for `tokens` tokens per layer (engines that know their context length).
    void reserve(std::size_t tokens) {
        detail::validate_held(config_, positions_.size(), "full_cache::reserve");
        for (std::size_t l = 0; l < config_.layers; ++l) {
            positions_[l].reserve(tokens);
            for (std::size_t h = 0; h < config_.kv_heads; ++h) heads_[l * config_.kv_heads + h].reserve(tokens);
        }
    }

    // Returns unused capacity to the memory resource.
    void shrink_to_fit() {
        for (dense_rows& rows : heads_) rows.shrink_to_fit();
        for (auto& positions : positions_) positions.shrink_to_fit();
    }

    // Forgets every token and returns all storage to the memory resource.
    void clear() noexcept {
        for (dense_rows& rows : heads_) rows.release();
        for (auto& positions : positions_) positions.release();
    }

private:
    static cache_config checked(cache_config config) {
        detail::validate(config, "full_cache");
        if (config.resource == nullptr) config.resource = default_resource();
        return config;
    }

    void check_layer(std::size_t layer, const char* who) const {
        detail::validate_layer(config_, positions_.size(), layer, who);
    }
    const dense_rows& head_at(std::size_t layer, std::size_t kv_head) const noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }
    dense_rows& mutable_head(std::size_t layer, std::size_t kv_head) noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }

    cache_config config_;
    detail::emptied_by_move<dense_rows> heads_;                      // [layer][kv_head]
    detail::emptied_by_move<aligned_buffer<std::int32_t>> positions_; // [layer]
};

} // namespace kvc
