// kvc/policy/quantization/sparse.hpp -- Q10 unstructured sparsity (Mustafar) as a codec.
//
// What it is. Per token, each key row keeps only its largest-magnitude
// (1 - key_sparsity) fraction of elements and each value row its largest
// (1 - value_sparsity) fraction; a row is stored as a bitmap of dim bits plus
// the kept values in fp16. Attention runs on that sparse form: the logits
// widen each 16-element slice of a key row from its bitmap bits in
// registers, and the weighted value sum places the kept values likewise
// (kernels/sparse/). Source: Mustafar (unstructured per-token magnitude
// pruning of the KV cache, bitmap-based sparse format, attention computed on
// the sparse form; reported 70% sparsity without accuracy loss, 2.23x
// throughput); docs/METHODS.md Q10.
//
//   kvc::quant::sparse codec(0.7);          keys and values 70% sparse
//   kvc::quant::sparse codec(0.5, 0.7);     keys 50%, values 70%
//   compressed_cache<evict::none, merge::none, quant::sparse, project::none> cache(config, {}, {}, codec);
//
// Layout and bytes. kept = ceil((1 - s) * head_dim) elements per row (at
// least 1; computed in double with a 1e-9 allowance so that e.g. s = 0.75,
// dim 128 gives exactly 32), and
//   row bytes = head_dim / 8 + 2 * kept
//   bytes per token and head = key row + value row
// e.g. head_dim 128: s = 0.5 -> 16 + 128 = 144 bytes per row (9 bits/value),
// s = 0.7 -> 16 + 78 = 94 (5.875 bits/value), s = 0 -> 272 (17 bits/value:
// fp16 plus the bitmap). Rows have fixed sizes and fixed offsets.
//
// Choices where the source is silent:
// - Selection is on the row's fp16 values (input rounded to nearest even,
//   exactly as full_cache stores fp16), by magnitude; ties at the threshold
//   go to the lower element index. With s = 0 every element is kept and the
//   stored values are exactly full_cache's fp16 values (tested).
// - head_dim must be a multiple of 16 (the kernels widen 16-element slices).
// - NaN and Inf: magnitude is compared as the fp16 bit pattern without the
//   sign, so NaN ranks above Inf above every number: a row with NaN or Inf
//   always keeps them (up to `kept` of them). A NaN in a key makes that token's
//   logit NaN and the attention output of its KV head's query group NaN, as
//   full_cache's would be; other heads and the other tokens' stored rows are
//   untouched (tested), and evicting the token restores finite outputs.
//   Inputs beyond fp16's range become +-Inf, as in full_cache's fp16.
// - No sink tokens (Q9): every token is sparse. Sinks could be added like
//   packed_rows' fp16 segment; not done yet.
#pragma once

#include <cmath>
#include <cstddef>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/sparse/problem.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/sparse_rows.hpp"

namespace kvc::quant {

struct sparse {
    using family = quantization_family;
    using head_storage = sparse_rows;

    double key_sparsity = 0.5;   // fraction of each key row dropped, in [0, 1)
    double value_sparsity = 0.5; // fraction of each value row dropped, in [0, 1)

    sparse() = default;
    explicit sparse(double sparsity) noexcept : key_sparsity(sparsity), value_sparsity(sparsity) {}
    sparse(double key, double value) noexcept : key_sparsity(key), value_sparsity(value) {}

    // Elements kept per row of `dim` at sparsity s (s in [0, 1)).
    static std::size_t kept_of(double s, std::size_t dim) noexcept {
        const double exact = (1.0 - s) * static_cast<double>(dim);
        std::size_t kept = static_cast<std::size_t>(std::ceil(exact - 1e-9));
        if (kept < 1) kept = 1;
        return kept > dim ? dim : kept;
    }
    std::size_t key_kept(std::size_t dim) const noexcept { return kept_of(key_sparsity, dim); }
    std::size_t value_kept(std::size_t dim) const noexcept { return kept_of(value_sparsity, dim); }

    // Bits per stored element (bitmap included), keys and values.
    double key_bits_per_value(std::size_t dim) const noexcept {
        return 8.0 * static_cast<double>(kernels::sparse_row_bytes(dim, key_kept(dim))) / static_cast<double>(dim);
    }
    double value_bits_per_value(std::size_t dim) const noexcept {
        return 8.0 * static_cast<double>(kernels::sparse_row_bytes(dim, value_kept(dim))) / static_cast<double>(dim);
    }

    // Throws kvc::error for a sparsity outside [0, 1) (or NaN) or a head dim
    // that is not a multiple of 16.
    void validate(const cache_config& config) const {
        detail::require(key_sparsity >= 0.0 && key_sparsity < 1.0, "kvc::quant::sparse: expected key sparsity in [0, 1), got ",
                        key_sparsity);
        detail::require(value_sparsity >= 0.0 && value_sparsity < 1.0,
                        "kvc::quant::sparse: expected value sparsity in [0, 1), got ", value_sparsity);
        detail::require(config.head_dim % kernels::sparse_chunk_elements == 0 && config.head_dim > 0,
                        "kvc::quant::sparse: expected head_dim a multiple of ", kernels::sparse_chunk_elements,
                        ", got head_dim ", config.head_dim);
    }

    head_storage make_head(const cache_config& config) const {
        validate(config);
        return sparse_rows(config.head_dim, key_kept(config.head_dim), value_kept(config.head_dim), config.resource,
                           "kvc::quant::sparse");
    }
};

} // namespace kvc::quant
