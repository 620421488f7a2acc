// kvc/policy/quantization/none.hpp -- rows stored as they are, in fp32, fp16 or bf16.
//
// The quantization slot's identity and the codec interface every codec
// follows. A codec provides `head_storage`, the per-(layer, KV head) store of
// its encoded rows, with:
//   tokens(), bytes()                          rows held, bytes allocated
//   reserve_for_append(n)                      the only step of an append that may throw
//   push_back(kernels, from, key, value)       encode one row pair (noexcept, capacity reserved)
//   attend(kernels, problem, state)            fold every row into a running softmax state
//   prefill(kernels, problem, workspace)       causal chunk attention over the rows
//   decode_keys / decode_values(kernels, first, count, out)
//                                              rows widened to fp32 (what scorers and tools read)
//   keep(indices, count)                       compact to the rows at ascending indices (eviction), noexcept
//   reserve(n), shrink_to_fit(), release()
// and a factory `make_head(config)`. `none<T>` stores rows of T with
// dense_rows, the same storage and kernels as full_cache.
#pragma once

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc::quant {

template <class T>
struct none {
    static_assert(is_element_type_v<T>, "kvc::quant::none<T>: T must be float, kvc::half or kvc::bfloat16");
    using family = quantization_family;
    using element_type = T;
    using head_storage = dense_rows;
    static constexpr dtype storage = dtype_of_v<T>;

    static head_storage make_head(const cache_config& config) {
        return dense_rows(storage, config.head_dim, config.resource);
    }
};

} // namespace kvc::quant
