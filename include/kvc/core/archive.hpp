// kvc/core/archive.hpp -- the two directions of a serialized section's payload.
//
// A store (storage/, policy/quantization/) takes part in cache serialization
// (cache/serialization.hpp, docs/SERIALIZATION.md) through one static member
// template that walks its state for both directions:
//   template <class Self, class Archive> static void transfer(Self& self, Archive& a);
// Self is const when saving. The archive offers:
//   shape(name, value)        a parameter the store was built with: saved; on
//                             load it must equal the destination's
//   identity(name, text)      the same for a name (a held type's): saved; on
//                             load it must equal the destination's
//   count(name, n, most)      a count: on load at most `most`
//   elements(name, buffer, n) the first n elements of an aligned_buffer (n
//                             derived from counts, so sizes always agree)
//   same(name, buffer)        a buffer derived from the parameters (calibrated
//                             tables): on load byte-equal to the destination's
//   check(cond, parts...)     a consistency rule of loaded data
// and `Archive::loading` tells the direction. The archives live here, below
// storage/, so a store erased at run time (storage/any_store.hpp) can name
// them in its table without reaching up into cache/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/checked.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvc/core/archive.hpp: the format stores buffers as little-endian bytes; this host is big-endian"
#endif

namespace kvc::detail {

// Little-endian integers into a byte vector.
template <class T>
void put_le(std::vector<unsigned char>& out, T value) {
    static_assert(std::is_integral_v<T>);
    using U = std::make_unsigned_t<T>;
    U u = static_cast<U>(value);
    for (std::size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<unsigned char>(u >> (8 * i)));
}
template <class T>
T get_le(const unsigned char* in) noexcept {
    using U = std::make_unsigned_t<T>;
    U u = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) u = static_cast<U>(u | (static_cast<U>(in[i]) << (8 * i)));
    return static_cast<T>(u);
}

// Writes one section's payload: the store walks its state into it.
class archive_writer {
public:
    static constexpr bool loading = false;
    explicit archive_writer(std::vector<unsigned char>& out) noexcept : out_(&out) {}

    void u8(std::uint8_t v) { out_->push_back(v); }
    void u32(std::uint32_t v) { put_le(*out_, v); }
    void u64(std::uint64_t v) { put_le(*out_, v); }
    void i64(std::int64_t v) { put_le(*out_, v); }
    void text(const std::string& s) {
        u64(s.size());
        raw(s.data(), s.size());
    }
    void raw(const void* data, std::size_t size) {
        const auto* p = static_cast<const unsigned char*>(data);
        out_->insert(out_->end(), p, p + size);
    }

    void shape(const char*, std::size_t value) { u64(value); }
    void identity(const char*, const std::string& value) { text(value); }
    void count(const char*, std::size_t n, std::size_t) { u64(n); }
    template <class T>
    void elements(const char*, const aligned_buffer<T>& buffer, std::size_t n) {
        if (n != 0) raw(buffer.data(), n * sizeof(T));
    }
    template <class T>
    void same(const char*, const aligned_buffer<T>& buffer) {
        u64(buffer.size());
        if (buffer.size() != 0) raw(buffer.data(), buffer.size() * sizeof(T));
    }
    template <class... Parts>
    void check(bool, Parts&&...) const noexcept {}

private:
    std::vector<unsigned char>* out_;
};

// Reads one section's payload (already in memory, its CRC checked): every
// read is checked against the bytes left before anything is allocated.
class archive_reader {
public:
    static constexpr bool loading = true;
    archive_reader(const unsigned char* data, std::size_t size, std::string where)
        : data_(data), size_(size), where_(std::move(where)) {}

    std::size_t left() const noexcept { return size_ - offset_; }
    const std::string& where() const noexcept { return where_; }

    std::uint8_t u8(const char* what) { return *take(1, what); }
    std::uint32_t u32(const char* what) { return get_le<std::uint32_t>(take(4, what)); }
    std::uint64_t u64(const char* what) { return get_le<std::uint64_t>(take(8, what)); }
    std::int64_t i64(const char* what) { return get_le<std::int64_t>(take(8, what)); }
    std::string text(const char* what, std::size_t most) {
        const std::uint64_t n = u64(what);
        require(n <= most, where_, ": ", what, ": expected at most ", most, " bytes, got a length of ", n);
        const unsigned char* p = take(static_cast<std::size_t>(n), what);
        return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
    }
    const unsigned char* take(std::size_t n, const char* what) {
        require(n <= left(), where_, ": ", what, ": expected ", n, " more bytes, the section has ", left(),
                " left (truncated or corrupt data)");
        const unsigned char* p = data_ + offset_;
        offset_ += n;
        return p;
    }
    void finish() const {
        require(left() == 0, where_, ": expected the section to end, ", left(), " bytes are left over");
    }

    void shape(const char* what, std::size_t expected) {
        const std::uint64_t got = u64(what);
        require(got == expected, where_, ": ", what, ": the data has ", got, ", this cache has ", expected,
                " (saved from a cache of another composition or parameters)");
    }
    void identity(const char* what, const std::string& expected) {
        const std::string got = text(what, 4096);
        require(got == expected, where_, ": ", what, ": the data has '", got, "', this cache has '", expected,
                "' (saved from a cache of another composition)");
    }
    void count(const char* what, std::size_t& n, std::size_t most) {
        const std::uint64_t got = u64(what);
        require(got <= most, where_, ": ", what, ": expected at most ", most, ", got ", got);
        n = static_cast<std::size_t>(got);
    }
    template <class T>
    void elements(const char* what, aligned_buffer<T>& buffer, std::size_t n) {
        const std::size_t bytes = checked_mul(n, sizeof(T), what, "elements", "bytes per element");
        const unsigned char* p = take(bytes, what); // checked before the buffer allocates
        buffer.clear();
        buffer.reserve(n);
        if (n != 0) std::memcpy(buffer.data(), p, bytes);
        buffer.resize_within_capacity(n);
    }
    template <class T>
    void same(const char* what, const aligned_buffer<T>& buffer) {
        const std::uint64_t n = u64(what);
        require(n == buffer.size(), where_, ": ", what, ": the data has ", n, " elements, this cache has ",
                buffer.size(), " (saved from a cache of another calibration or parameters)");
        const std::size_t bytes = buffer.size() * sizeof(T);
        const unsigned char* p = take(bytes, what);
        require(bytes == 0 || std::memcmp(p, buffer.data(), bytes) == 0, where_, ": ", what,
                ": the data differs from this cache's (saved from a cache of another calibration or parameters)");
    }
    template <class... Parts>
    void check(bool condition, Parts&&... parts) const {
        if (!condition) fail(where_, ": ", std::forward<Parts>(parts)..., " (corrupt data)");
    }

private:
    const unsigned char* data_;
    std::size_t size_, offset_ = 0;
    std::string where_;
};

} // namespace kvc::detail
