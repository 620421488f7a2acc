// kvc/policy/quantization/none.hpp -- rows stored as they are, in fp32, fp16 or bf16.
//
// The quantization slot's identity. The codec protocol it follows is written
// in policy/quantization/protocol.hpp, its head store's in storage/protocol.hpp.
// `none<T>` stores rows of T with dense_rows, the same storage and kernels as
// full_cache.
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
