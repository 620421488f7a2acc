// kvc/storage/token_columns.hpp -- per-token state of one (layer, KV head),
// declared by the policies that need it and kept by the host in one place.
//
// A column is a tag type:
//   struct my_column {
//       using value_type = float;                 // trivially copyable
//       static constexpr value_type initial = 0;  // what a newly appended token starts with
//   };
// A policy lists the columns it needs as `using columns = kvc::column_list<...>;`
// (none: no per-token state). The host takes the union of every slot's list
// (a column two policies declare is kept once) plus its own positions, and
// token_columns holds one buffer per column: every append, compaction, copy
// and byte count is one loop over all of them, so a new column touches the
// policy that declares it and nothing else. Every column holds exactly as
// many elements as the head holds tokens.
//
// A policy chosen at run time (evict::any) declares every column it might
// need; the host then switches off, at construction, the ones the chosen
// method does not use (`active`): they hold nothing, cost nothing, and their
// data() is null. A cache of policy types keeps every column on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kvc/core/memory.hpp"

namespace kvc {

template <class... Columns>
struct column_list {};

// The original position of each held token: the host's own column, always present.
struct position_column {
    using value_type = std::int32_t;
    static constexpr value_type initial = 0; // the host writes the real position in the same append
};

// An additive logit per held token, applied by attention in decode and
// prefill for every codec: a merging policy declares it and keeps log(count)
// of each kept slot in it (a slot that stands for n tokens weighs as n).
// New tokens start at 0: no bias. Declared by no policy, attention takes none.
struct attention_bias_column {
    using value_type = float;
    static constexpr value_type initial = 0.0f;
};

namespace detail {
template <class List, class Column>
struct column_list_has;
template <class... Columns, class Column>
struct column_list_has<column_list<Columns...>, Column> : std::bool_constant<(std::is_same_v<Columns, Column> || ...)> {};

template <class List, class... More>
struct column_union_of;
template <class List>
struct column_union_of<List> {
    using type = List;
};
template <class... Have, class Next, class... Rest, class... MoreLists>
struct column_union_of<column_list<Have...>, column_list<Next, Rest...>, MoreLists...>
    : column_union_of<std::conditional_t<column_list_has<column_list<Have...>, Next>::value, column_list<Have...>,
                                         column_list<Have..., Next>>,
                      column_list<Rest...>, MoreLists...> {};
template <class... Have, class... MoreLists>
struct column_union_of<column_list<Have...>, column_list<>, MoreLists...> : column_union_of<column_list<Have...>, MoreLists...> {};

// A policy's declared columns (none when it declares nothing).
template <class P, class = void>
struct columns_of {
    using type = column_list<>;
};
template <class P>
struct columns_of<P, std::void_t<typename P::columns>> {
    using type = typename P::columns;
};

template <class Column, class = void>
struct is_column : std::false_type {};
template <class Column>
struct is_column<Column, std::void_t<typename Column::value_type, decltype(Column::initial)>>
    : std::bool_constant<std::is_trivially_copyable_v<typename Column::value_type>> {};
} // namespace detail

// Every column of the lists, each once, in first-declared order.
template <class... Lists>
using column_union_t = typename detail::column_union_of<column_list<>, Lists...>::type;
template <class P>
using columns_of_t = typename detail::columns_of<P>::type;

template <class List>
class token_columns;

template <class... Columns>
class token_columns<column_list<Columns...>> {
    static_assert((detail::is_column<Columns>::value && ...),
                  "kvc token column protocol: a column needs `using value_type = T;` (trivially copyable) and "
                  "`static constexpr value_type initial`");

public:
    using list = column_list<Columns...>;
    template <class Column>
    static constexpr bool has = detail::column_list_has<list, Column>::value;
    static_assert(sizeof...(Columns) <= 32, "kvc::token_columns: at most 32 columns");
    // Every column on.
    static constexpr std::uint32_t all = sizeof...(Columns) == 32 ? ~std::uint32_t{0}
                                                                   : (std::uint32_t{1} << sizeof...(Columns)) - 1;
    // The bit of `Column` in an `active` mask.
    template <class Column>
    static constexpr std::uint32_t bit() noexcept {
        return std::uint32_t{1} << index_of<Column>();
    }

    // `active`: the columns kept, one bit each in declaration order (all by default).
    explicit token_columns(memory_resource* resource, std::uint32_t active = all)
        : buffers_(aligned_buffer<typename Columns::value_type>(resource)...), active_(active & all) {}

    // Whether the column is kept (a switched-off column holds nothing, its data() is null).
    template <class Column>
    bool active() const noexcept {
        return (active_ & bit<Column>()) != 0;
    }
    // Bytes one token costs across the kept columns (byte budgets count it).
    std::size_t bytes_per_token() const noexcept {
        std::size_t total = 0;
        std::size_t i = 0;
        ((total += (active_ >> i++ & 1u) ? sizeof(typename Columns::value_type) : 0), ...);
        return total;
    }

    // The column's elements, one per held token. A column the lists do not
    // declare is a compile error, not a null pointer.
    template <class Column>
    typename Column::value_type* data() noexcept {
        return std::get<index_of<Column>()>(buffers_).data();
    }
    template <class Column>
    const typename Column::value_type* data() const noexcept {
        return std::get<index_of<Column>()>(buffers_).data();
    }

    // Room for `count` more tokens in every column: the only step of an append that may throw.
    void reserve_for_append(std::size_t count) {
        for_each([&](auto& buffer) { buffer.reserve_for_append(count); });
    }
    // `count` new tokens with each column's initial value (capacity reserved).
    void append_initial(std::size_t count) noexcept {
        (append_initial_to<Columns>(count), ...);
    }
    // Columns holding only the tokens at ascending `indices`, in exactly the memory they need.
    token_columns gathered(const std::uint32_t* indices, std::size_t count) const {
        token_columns out(*this, empty_like{});
        gather_into(out, indices, count, std::index_sequence_for<Columns...>{});
        return out;
    }
    // In-place compaction to the tokens at ascending `indices` (capacity kept).
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        for_each([&](auto& buffer) {
            for (std::size_t i = 0; i < count; ++i) buffer[i] = buffer[indices[i]];
            buffer.resize_within_capacity(count);
        });
    }

    // The column's buffer itself (serialization reads and writes it whole).
    template <class Column>
    aligned_buffer<typename Column::value_type>& buffer() noexcept {
        return std::get<index_of<Column>()>(buffers_);
    }
    template <class Column>
    const aligned_buffer<typename Column::value_type>& buffer() const noexcept {
        return std::get<index_of<Column>()>(buffers_);
    }

    std::size_t bytes() const noexcept {
        return (std::size_t{0} + ... + std::get<index_of<Columns>()>(buffers_).bytes());
    }
    void reserve(std::size_t tokens) {
        for_each([&](auto& buffer) { buffer.reserve(tokens); });
    }
    void shrink_to_fit() {
        for_each([](auto& buffer) { buffer.shrink_to_fit(); });
    }
    void release() noexcept {
        for_each([](auto& buffer) { buffer.release(); });
    }

private:
    struct empty_like {};
    token_columns(const token_columns& shape, empty_like)
        : buffers_(aligned_buffer<typename Columns::value_type>(
              std::get<index_of<Columns>()>(shape.buffers_).resource())...),
          active_(shape.active_) {}

    template <class Column>
    static constexpr std::size_t index_of() noexcept {
        static_assert(has<Column>, "kvc::token_columns: this column is not declared by any policy of the cache");
        constexpr bool matches[] = {std::is_same_v<Column, Columns>..., false};
        std::size_t i = 0;
        while (i < sizeof...(Columns) && !matches[i]) ++i;
        return i < sizeof...(Columns) ? i : 0; // 0 only after the static_assert above has failed
    }
    // f(buffer) for every kept column.
    template <class F>
    void for_each(F&& f) {
        std::size_t i = 0;
        std::apply([&](auto&... buffer) { ((active_ >> i++ & 1u ? f(buffer) : void()), ...); }, buffers_);
    }
    template <class Column>
    void append_initial_to(std::size_t count) noexcept {
        if (!active<Column>()) return;
        auto& buffer = std::get<index_of<Column>()>(buffers_);
        const std::size_t old = buffer.size();
        buffer.resize_within_capacity(old + count);
        for (std::size_t t = 0; t < count; ++t) buffer[old + t] = Column::initial;
    }
    template <std::size_t... I>
    void gather_into(token_columns& out, const std::uint32_t* indices, std::size_t count,
                     std::index_sequence<I...>) const {
        ((active_ >> I & 1u ? gather_one(std::get<I>(buffers_), std::get<I>(out.buffers_), indices, count) : void()),
         ...);
    }
    template <class T>
    static void gather_one(const aligned_buffer<T>& from, aligned_buffer<T>& to, const std::uint32_t* indices,
                           std::size_t count) {
        if (count == 0) return;
        to.reserve(count);
        for (std::size_t i = 0; i < count; ++i) to.data()[i] = from[indices[i]];
        to.resize_within_capacity(count);
    }

    std::tuple<aligned_buffer<typename Columns::value_type>...> buffers_;
    std::uint32_t active_ = all;
};

} // namespace kvc
