// kvc/core/config.hpp -- version macros and the few compiler switches kvc relies on.
#pragma once

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0
#define KVC_VERSION_STRING "0.1.0"

// Concepts are used when the consumer compiles as C++20; C++17 builds get the
// same checks through traits and static_assert.
#if defined(__cpp_concepts) && __cpp_concepts >= 201907L && __cplusplus >= 202002L
#define KVC_HAS_CONCEPTS 1
#else
#define KVC_HAS_CONCEPTS 0
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define KVC_X86_64 1
#else
#define KVC_X86_64 0
#endif

#if defined(__aarch64__) || defined(_M_ARM64)
#define KVC_AARCH64 1
#else
#define KVC_AARCH64 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define KVC_RESTRICT __restrict__
#define KVC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define KVC_RESTRICT
#define KVC_ALWAYS_INLINE inline
#endif

namespace kvc {
struct version_info {
    int major, minor, patch;
};
inline constexpr version_info version{KVC_VERSION_MAJOR, KVC_VERSION_MINOR, KVC_VERSION_PATCH};
} // namespace kvc
