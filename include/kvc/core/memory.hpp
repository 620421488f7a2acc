// kvc/core/memory.hpp -- where kvc's own memory comes from.
//
// Every byte a kvc cache owns is allocated through a std::pmr::memory_resource,
// so an engine can hand kvc its arena, its pinned pool or a counting resource.
// The resource is chosen per cache (config field) and defaults to
// kvc::default_resource(), which the engine may replace process-wide.
// Buffers are 64-byte aligned: one cache line, and one AVX-512 register, so
// kernels may use aligned loads on the start of every row block.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstring>
#include <memory_resource>
#include <new>
#include <type_traits>
#include <utility>

#include "kvc/core/checked.hpp"
#include "kvc/core/error.hpp"

namespace kvc {

using memory_resource = std::pmr::memory_resource;

inline constexpr std::size_t buffer_alignment = 64;

namespace detail {
inline std::atomic<memory_resource*>& default_resource_slot() noexcept {
    static std::atomic<memory_resource*> slot{std::pmr::new_delete_resource()};
    return slot;
}
} // namespace detail

// The resource caches use when their config names none.
inline memory_resource* default_resource() noexcept { return detail::default_resource_slot().load(); }

// Replaces the default resource for caches created afterwards; returns the old
// one. Existing caches keep the resource they were created with. nullptr
// restores operator new/delete.
inline memory_resource* set_default_resource(memory_resource* resource) noexcept {
    if (resource == nullptr) resource = std::pmr::new_delete_resource();
    return detail::default_resource_slot().exchange(resource);
}

// A growable, 64-byte aligned array of trivially copyable T whose storage comes
// from a memory_resource. It is deliberately small: the cache decides when to
// grow (and so when it may throw), and bytes() reports exactly what is held.
template <class T>
class aligned_buffer {
    static_assert(std::is_trivially_copyable_v<T>, "aligned_buffer holds trivially copyable types only");

public:
    aligned_buffer() noexcept = default;
    explicit aligned_buffer(memory_resource* resource) noexcept : resource_(resource ? resource : default_resource()) {}

    aligned_buffer(const aligned_buffer& other) : resource_(other.resource_) {
        reserve(other.size_);
        if (other.size_ != 0) std::memcpy(data_, other.data_, other.size_ * sizeof(T));
        size_ = other.size_;
    }
    aligned_buffer& operator=(const aligned_buffer& other) {
        if (this != &other) {
            aligned_buffer copy(other);
            swap(copy);
        }
        return *this;
    }
    aligned_buffer(aligned_buffer&& other) noexcept { swap(other); }
    aligned_buffer& operator=(aligned_buffer&& other) noexcept {
        if (this != &other) {
            release();
            swap(other);
        }
        return *this;
    }
    ~aligned_buffer() { release(); }

    void swap(aligned_buffer& other) noexcept {
        std::swap(resource_, other.resource_);
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        std::swap(capacity_, other.capacity_);
    }

    T* data() noexcept { return data_; }
    const T* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    std::size_t capacity() const noexcept { return capacity_; }
    bool empty() const noexcept { return size_ == 0; }
    T& operator[](std::size_t i) noexcept { return data_[i]; }
    const T& operator[](std::size_t i) const noexcept { return data_[i]; }
    memory_resource* resource() const noexcept { return resource_; }

    // Bytes of storage this buffer holds (its capacity, not its size): what the
    // process pays for it.
    std::size_t bytes() const noexcept { return capacity_ * sizeof(T); }

    // Ensures capacity for n elements; keeps the contents. May throw
    // std::bad_alloc (from the resource), or kvc::error when n elements'
    // bytes do not fit std::size_t; in either case nothing changed.
    void reserve(std::size_t n) {
        if (n <= capacity_) return;
        const std::size_t bytes =
            detail::checked_mul(n, sizeof(T), "kvc::aligned_buffer::reserve", "elements", "bytes per element");
        T* fresh = static_cast<T*>(resource_->allocate(bytes, buffer_alignment));
        if (size_ != 0) std::memcpy(fresh, data_, size_ * sizeof(T));
        if (data_ != nullptr) resource_->deallocate(data_, capacity_ * sizeof(T), buffer_alignment);
        data_ = fresh;
        capacity_ = n;
    }

    // Capacity for size() + extra with geometric growth, so appending one token
    // at a time costs amortised O(1).
    void reserve_for_append(std::size_t extra) {
        const std::size_t needed =
            detail::checked_add(size_, extra, "kvc::aligned_buffer::reserve_for_append", "size", "extra elements");
        if (needed <= capacity_) return;
        const std::size_t grown = detail::saturating_add(capacity_, capacity_ / 2);
        reserve(grown > needed ? grown : needed);
    }

    // Size changes within capacity never allocate and never throw.
    void resize_within_capacity(std::size_t n) noexcept { size_ = n <= capacity_ ? n : capacity_; }

    // Resizes, allocating when needed; new elements are uninitialised.
    void resize(std::size_t n) {
        reserve(n);
        size_ = n;
    }

    // Releases the storage down to exactly size() elements (after eviction).
    void shrink_to_fit() {
        if (capacity_ == size_) return;
        if (size_ == 0) {
            release();
            return;
        }
        aligned_buffer copy(resource_);
        copy.reserve(size_);
        std::memcpy(copy.data_, data_, size_ * sizeof(T));
        copy.size_ = size_;
        swap(copy);
    }

    void clear() noexcept { size_ = 0; }

    // Returns the storage to the resource.
    void release() noexcept {
        if (data_ != nullptr) resource_->deallocate(data_, capacity_ * sizeof(T), buffer_alignment);
        data_ = nullptr;
        size_ = 0;
        capacity_ = 0;
    }

private:
    memory_resource* resource_ = default_resource();
    T* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

} // namespace kvc
