// kvc/core/dtype.hpp -- the element types kvc stores and views: fp32, fp16, bf16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvc/core/float16.hpp"

namespace kvc {

enum class dtype : std::uint8_t { f32, f16, bf16 };

constexpr std::size_t size_of(dtype type) noexcept { return type == dtype::f32 ? 4 : 2; }

constexpr const char* name_of(dtype type) noexcept {
    switch (type) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
    }
    return "?";
}

template <class T>
struct dtype_of {
    static_assert(sizeof(T) == 0, "kvc: element type must be float, kvc::half or kvc::bfloat16");
};
template <>
struct dtype_of<float> : std::integral_constant<dtype, dtype::f32> {};
template <>
struct dtype_of<half> : std::integral_constant<dtype, dtype::f16> {};
template <>
struct dtype_of<bfloat16> : std::integral_constant<dtype, dtype::bf16> {};
template <class T>
struct dtype_of<const T> : dtype_of<T> {};

template <class T>
inline constexpr dtype dtype_of_v = dtype_of<T>::value;

template <class T>
inline constexpr bool is_element_type_v =
    std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, half> ||
    std::is_same_v<std::remove_const_t<T>, bfloat16>;

} // namespace kvc
