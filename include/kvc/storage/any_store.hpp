// kvc/storage/any_store.hpp -- a head store whose codec is chosen at run time.
//
// any_store holds one head store of any type S (storage/protocol.hpp) and
// forwards every member of the protocol to it through a table of functions
// made once per S. It is what quant::any (policy/quantization/any.hpp) gives a
// cache, so one compressed_cache type runs every codec: the host is compiled
// once, each codec's store once, and nothing per pair.
//
// Cost. One indirect call per store call: per (layer, KV head) for attention
// (the kernels inside run as they do for S), per block of rows for an append
// (push_back_rows), per row for push_back. The outputs are S's, bit for bit.
// Memory. S lives in a block taken from the cache's memory resource, and
// bytes() counts that block with S's own bytes: what the cache holds.
// Capabilities. The optional members (store_key, store_row, assign_precision,
// bytes_per_token, stored_bytes) are declared here whatever S offers; offers()
// says at run time which S has, and a host checks it where it would have
// checked the member at compile time (detail::store_offers below). Calling
// one S lacks is a programming error: it throws kvc::error where it may
// throw, and is never reached from a host that checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "kvc/core/archive.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/storage/protocol.hpp"

namespace kvc {

// The optional store members a host may need to know about at run time, and
// `positions`: the store encodes each row with its position (wants_positions:
// KVQuant takes keys before RoPE and rotates them inside attention).
enum class store_capability : unsigned {
    store_key = 1,
    store_row = 2,
    assign_precision = 4,
    bytes_per_token = 8,
    positions = 16
};

namespace detail {

// The table of S's members any_store calls through.
struct store_table {
    const std::type_info* type;
    std::size_t size, align;
    unsigned capabilities;
    void (*destroy)(void*) noexcept;
    void* (*clone)(const void*, void* at);
    void* (*move_to)(void*, void* at) noexcept;
    std::size_t (*tokens)(const void*) noexcept;
    std::size_t (*bytes)(const void*) noexcept;
    std::size_t (*bytes_per_token)(const void*) noexcept;
    std::size_t (*stored_bytes)(const void*) noexcept;
    void (*reserve_for_append)(void*, std::size_t);
    void (*push_back)(void*, const kernels::kernel_table&, dtype, const void*, const void*, std::int32_t) noexcept;
    void (*push_back_rows)(void*, const kernels::kernel_table&, dtype, const void* const*, const void* const*,
                           std::size_t, std::int32_t) noexcept;
    void (*attend)(const void*, const kernels::kernel_table&, const kernels::decode_problem&,
                   const kernels::decode_state&) noexcept;
    void (*prefill)(const void*, const kernels::kernel_table&, const kernels::prefill_problem&, float*) noexcept;
    std::size_t (*prefill_workspace)(const void*, std::size_t group, std::size_t dim, std::size_t chunk,
                                     bool with_mass) noexcept;
    void (*decode_keys)(const void*, const kernels::kernel_table&, std::size_t, std::size_t, float*) noexcept;
    void (*decode_values)(const void*, const kernels::kernel_table&, std::size_t, std::size_t, float*) noexcept;
    void* (*compacted)(const void*, const std::uint32_t*, std::size_t, void* at);
    void (*reserve)(void*, std::size_t);
    void (*shrink_to_fit)(void*);
    void (*release)(void*) noexcept;
    void (*store_key)(void*, const kernels::kernel_table&, std::size_t, const float*) noexcept;
    void (*store_row)(void*, const kernels::kernel_table&, std::size_t, const float*, const float*) noexcept;
    void (*assign_precision)(void*, const kernels::kernel_table&, const float*);
    void (*save)(const void*, archive_writer&);
    void (*load)(void*, archive_reader&);
};

template <class S>
S& as(void* p) noexcept {
    return *static_cast<S*>(p);
}
template <class S>
const S& as(const void* p) noexcept {
    return *static_cast<const S*>(p);
}

[[noreturn]] inline void no_serialized_form() {
    fail("any_store: expected a store with a serialized form (a static transfer member), got one without");
}

template <class S>
constexpr unsigned capabilities_of() noexcept {
    return (has_store_key<S>::value ? unsigned(store_capability::store_key) : 0u) |
           (has_store_row<S>::value ? unsigned(store_capability::store_row) : 0u) |
           (has_assign_precision<S>::value ? unsigned(store_capability::assign_precision) : 0u) |
           (has_bytes_per_token<S>::value ? unsigned(store_capability::bytes_per_token) : 0u) |
           (wants_positions<S>::value ? unsigned(store_capability::positions) : 0u);
}

template <class S>
const store_table& table_of() noexcept {
    static_assert(check_store<S>());
    static constexpr store_table table{
        &typeid(S),
        sizeof(S),
        alignof(S),
        capabilities_of<S>(),
        [](void* s) noexcept { as<S>(s).~S(); },
        [](const void* s, void* at) -> void* { return new (at) S(as<S>(s)); },
        [](void* s, void* at) noexcept -> void* { return new (at) S(std::move(as<S>(s))); },
        [](const void* s) noexcept { return as<S>(s).tokens(); },
        [](const void* s) noexcept { return as<S>(s).bytes(); },
        [](const void* s) noexcept -> std::size_t {
            if constexpr (has_bytes_per_token<S>::value) return as<S>(s).bytes_per_token();
            else return (void)s, 0;
        },
        [](const void* s) noexcept { return stored_bytes_of(as<S>(s)); },
        [](void* s, std::size_t n) { as<S>(s).reserve_for_append(n); },
        [](void* s, const kernels::kernel_table& k, dtype from, const void* key, const void* value,
           std::int32_t position) noexcept {
            if constexpr (wants_positions<S>::value) as<S>(s).push_back(k, from, key, value, position);
            else (void)position, as<S>(s).push_back(k, from, key, value);
        },
        [](void* s, const kernels::kernel_table& k, dtype from, const void* const* keys, const void* const* values,
           std::size_t count, std::int32_t first_position) noexcept {
            S& store = as<S>(s);
            for (std::size_t t = 0; t < count; ++t) {
                if constexpr (wants_positions<S>::value)
                    store.push_back(k, from, keys[t], values[t], first_position + static_cast<std::int32_t>(t));
                else
                    store.push_back(k, from, keys[t], values[t]);
            }
            (void)first_position;
        },
        [](const void* s, const kernels::kernel_table& k, const kernels::decode_problem& p,
           const kernels::decode_state& state) noexcept { as<S>(s).attend(k, p, state); },
        [](const void* s, const kernels::kernel_table& k, const kernels::prefill_problem& p, float* w) noexcept {
            as<S>(s).prefill(k, p, w);
        },
        [](const void* s, std::size_t group, std::size_t dim, std::size_t chunk, bool with_mass) noexcept {
            return prefill_workspace_of(as<S>(s), group, dim, chunk, with_mass);
        },
        [](const void* s, const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) noexcept {
            as<S>(s).decode_keys(k, first, count, out);
        },
        [](const void* s, const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) noexcept {
            as<S>(s).decode_values(k, first, count, out);
        },
        [](const void* s, const std::uint32_t* at, std::size_t count, void* where) -> void* {
            if constexpr (has_compacted<S>::value) {
                return new (where) S(as<S>(s).compacted(at, count));
            } else { // as the host does for stores without compacted(): copy, keep, give back the rest
                S copy(as<S>(s));
                copy.keep(at, count);
                copy.shrink_to_fit();
                return new (where) S(std::move(copy));
            }
        },
        [](void* s, std::size_t n) { as<S>(s).reserve(n); },
        [](void* s) { as<S>(s).shrink_to_fit(); },
        [](void* s) noexcept { as<S>(s).release(); },
        [](void* s, const kernels::kernel_table& k, std::size_t t, const float* row) noexcept {
            if constexpr (has_store_key<S>::value) as<S>(s).store_key(k, t, row);
            else (void)s, (void)k, (void)t, (void)row;
        },
        [](void* s, const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
            if constexpr (has_store_row<S>::value) as<S>(s).store_row(k, t, key, value);
            else (void)s, (void)k, (void)t, (void)key, (void)value;
        },
        [](void* s, const kernels::kernel_table& k, const float* scores) {
            if constexpr (has_assign_precision<S>::value) as<S>(s).assign_precision(k, scores);
            else (void)s, (void)k, (void)scores;
        },
        [](const void* s, archive_writer& a) {
            if constexpr (has_transfer<S>::value) S::transfer(as<S>(s), a);
            else (void)s, (void)a, no_serialized_form();
        },
        [](void* s, archive_reader& a) {
            if constexpr (has_transfer<S>::value) S::transfer(as<S>(s), a);
            else (void)s, (void)a, no_serialized_form();
        },
    };
    return table;
}

} // namespace detail

class any_store {
public:
    // push_back takes each row's position; the held store gets it when it wants it.
    static constexpr bool wants_positions = true;

    // Holds `store`, in a block of `resource` (the cache's), for heads of `dim` channels.
    template <class S, class = std::enable_if_t<!std::is_same_v<S, any_store>>>
    any_store(S store, std::size_t dim, memory_resource* resource)
        : table_(&detail::table_of<S>()), resource_(resource ? resource : default_resource()), dim_(dim) {
        void* block = allocate();
        object_ = table_->move_to(&store, block);
    }

    any_store(const any_store& other) : table_(other.table_), resource_(other.resource_), dim_(other.dim_) {
        void* block = allocate();
        try {
            object_ = table_->clone(other.object_, block);
        } catch (...) {
            deallocate(block);
            throw;
        }
    }
    any_store(any_store&& other) noexcept
        : table_(other.table_), resource_(other.resource_), dim_(other.dim_),
          object_(std::exchange(other.object_, nullptr)) {}
    any_store& operator=(const any_store& other) {
        if (this != &other) {
            any_store copy(other);
            swap(*this, copy);
        }
        return *this;
    }
    any_store& operator=(any_store&& other) noexcept {
        any_store moved(std::move(other));
        swap(*this, moved);
        return *this;
    }
    ~any_store() { reset(); }
    friend void swap(any_store& a, any_store& b) noexcept {
        std::swap(a.table_, b.table_);
        std::swap(a.resource_, b.resource_);
        std::swap(a.dim_, b.dim_);
        std::swap(a.object_, b.object_);
    }

    // The held store, when it is an S (tools and tests); nullptr otherwise.
    template <class S>
    const S* target() const noexcept {
        return object_ && *table_->type == typeid(S) ? static_cast<const S*>(object_) : nullptr;
    }
    // Whether the held store has an optional member.
    bool offers(store_capability c) const noexcept { return (table_->capabilities & unsigned(c)) != 0; }

    std::size_t tokens() const noexcept { return object_ ? table_->tokens(object_) : 0; }
    // The held store's bytes and the block it lives in.
    std::size_t bytes() const noexcept { return object_ ? table_->bytes(object_) + table_->size : 0; }
    std::size_t bytes_per_token() const noexcept { return table_->bytes_per_token(object_); }
    std::size_t stored_bytes() const noexcept { return table_->stored_bytes(object_); }

    void reserve_for_append(std::size_t count) { table_->reserve_for_append(live(), count); }
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value,
                   std::int32_t position) noexcept {
        table_->push_back(object_, k, from, key, value, position);
    }
    void push_back_rows(const kernels::kernel_table& k, dtype from, const void* const* keys, const void* const* values,
                        std::size_t count, std::int32_t first_position) noexcept {
        table_->push_back_rows(object_, k, from, keys, values, count, first_position);
    }
    void attend(const kernels::kernel_table& k, kernels::decode_problem p,
                const kernels::decode_state& state) const noexcept {
        table_->attend(object_, k, p, state);
    }
    void prefill(const kernels::kernel_table& k, kernels::prefill_problem p, float* workspace) const noexcept {
        table_->prefill(object_, k, p, workspace);
    }
    std::size_t prefill_workspace_floats(std::size_t group, std::size_t chunk, bool with_mass) const noexcept {
        return table_->prefill_workspace(object_, group, dim_, chunk, with_mass);
    }
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        table_->decode_keys(object_, k, first, count, out);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        table_->decode_values(object_, k, first, count, out);
    }
    any_store compacted(const std::uint32_t* indices, std::size_t count) const {
        any_store out(table_, resource_, dim_);
        void* block = out.allocate();
        try {
            out.object_ = table_->compacted(object_, indices, count, block);
        } catch (...) {
            out.deallocate(block);
            throw;
        }
        return out;
    }
    void reserve(std::size_t tokens) { table_->reserve(live(), tokens); }
    void shrink_to_fit() { table_->shrink_to_fit(live()); }
    void release() noexcept {
        if (object_) table_->release(object_);
    }

    void store_key(const kernels::kernel_table& k, std::size_t t, const float* row) noexcept {
        table_->store_key(object_, k, t, row);
    }
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        table_->store_row(object_, k, t, key, value);
    }
    void assign_precision(const kernels::kernel_table& k, const float* scores) {
        detail::require(offers(store_capability::assign_precision),
                        "any_store::assign_precision: expected a codec that re-encodes by importance (Q6), got one "
                        "that does not");
        table_->assign_precision(object_, k, scores);
    }

    // Serialization (kvc/core/archive.hpp): the held store's type, which a
    // load requires to be the destination's (every quant::any cache has
    // one type, so this is where a file from another codec is refused),
    // then the held store's own form.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.identity("any_store held store type", self.table_->type->name());
        if constexpr (Archive::loading) self.table_->load(self.live(), a);
        else self.table_->save(self.live(), a);
    }

private:
    any_store(const detail::store_table* table, memory_resource* resource, std::size_t dim) noexcept
        : table_(table), resource_(resource), dim_(dim) {}
    void* allocate() { return resource_->allocate(table_->size, table_->align); }
    void deallocate(void* block) noexcept { resource_->deallocate(block, table_->size, table_->align); }
    void reset() noexcept {
        if (!object_) return;
        table_->destroy(object_);
        deallocate(object_);
        object_ = nullptr;
    }
    // A moved-from any_store holds nothing; calls that could allocate refuse it.
    void* live() const {
        detail::require(object_ != nullptr, "any_store: expected a store, got a moved-from any_store");
        return object_;
    }

    const detail::store_table* table_;
    memory_resource* resource_;
    std::size_t dim_; // the heads' channels (the default prefill workspace depends on it)
    void* object_ = nullptr;
};

namespace detail {

// Whether a store offers an optional member: its type says so at compile
// time, or, for a store chosen at run time (any_store, or one around it that
// says so through offers(): latent_rows), the store at run time.
template <class S, class = void>
struct answers_offers : std::false_type {};
template <class S>
struct answers_offers<S, std::void_t<decltype(bool{std::declval<const S&>().offers(store_capability::store_row)})>>
    : std::true_type {};

template <class S>
bool store_offers(const S& store, store_capability c) noexcept {
    if constexpr (answers_offers<S>::value) {
        return store.offers(c);
    } else {
        (void)store;
        switch (c) {
        case store_capability::store_key: return has_store_key<S>::value;
        case store_capability::store_row: return has_store_row<S>::value;
        case store_capability::assign_precision: return has_assign_precision<S>::value;
        case store_capability::bytes_per_token: return has_bytes_per_token<S>::value;
        case store_capability::positions: return wants_positions<S>::value;
        }
        return false;
    }
}

} // namespace detail
} // namespace kvc
