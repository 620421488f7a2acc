// kvc/core/cache_config.hpp -- the shape of a model's KV cache, shared by every cache type and policy.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"

namespace kvc {

struct cache_config {
    std::size_t layers = 0;
    std::size_t kv_heads = 0;
    std::size_t query_heads = 0;  // a multiple of kv_heads (GQA group = query_heads / kv_heads)
    std::size_t head_dim = 0;
    dtype storage = dtype::f16;   // element type of stored rows (full_cache, quant::none)
    float scale = 0.0f;           // attention logit scale; 0 means 1 / sqrt(head_dim)
    memory_resource* resource = nullptr; // allocator for all memory the cache owns; nullptr: kvc::default_resource()

    std::size_t group() const noexcept { return kv_heads ? query_heads / kv_heads : 0; }
    float logit_scale() const noexcept {
        return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
    }
};

// Largest head dim kvc accepts; the kernels keep per-head state on the stack up to this.
inline constexpr std::size_t max_head_dim = 1024;

// Most (layer, KV head) pairs, and most query heads, a cache accepts. Caches
// keep a table of per-head state (a few hundred bytes a head) and size rows
// by query_heads x head_dim: under this bound every such product fits
// std::size_t many times over, so an absurd shape is a kvc::error at
// construction, never a wrapped size or std::length_error. Real models have
// a few thousand (layer, KV head) pairs.
inline constexpr std::size_t max_heads = std::size_t{1} << 24;


namespace detail {
inline void validate(const cache_config& c, const char* who) {
    require(c.layers > 0, who, ": expected layers >= 1, got ", c.layers);
    require(c.kv_heads > 0, who, ": expected kv_heads >= 1, got ", c.kv_heads);
    require(c.query_heads > 0 && c.query_heads % c.kv_heads == 0, who,
            ": expected query_heads a positive multiple of kv_heads (", c.kv_heads, "), got ", c.query_heads);
    const std::size_t heads = checked_mul(c.layers, c.kv_heads, who, "layers", "kv_heads");
    require(heads <= max_heads, who, ": expected layers x kv_heads at most ", max_heads, ", got ", c.layers, " x ",
            c.kv_heads, " = ", heads);
    require(c.query_heads <= max_heads, who, ": expected query_heads at most ", max_heads, ", got ", c.query_heads);
    require(c.head_dim > 0 && c.head_dim <= max_head_dim, who, ": expected head_dim in 1..", max_head_dim, ", got ",
            c.head_dim);
    require(std::isfinite(c.scale) && c.scale >= 0.0f, who, ": expected scale >= 0 (0 = 1/sqrt(head_dim)), got ",
            c.scale);
    require(c.storage == dtype::f32 || c.storage == dtype::f16 || c.storage == dtype::bf16, who,
            ": expected storage f32, f16 or bf16");
}
} // namespace detail

} // namespace kvc
