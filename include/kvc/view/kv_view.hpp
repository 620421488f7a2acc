// kvc/view/kv_view.hpp -- kv_view<T, Layout>: a non-owning [token][head][dim]
// view of the K or V data an inference engine hands to kvc.
//
// What it is for. Engines keep K and V in their own memory and in their own
// arrangement: token major, head major, padded rows, or a paged pool behind a
// block table (vLLM-like). kvc's cache, policies and kernels should not care
// which. A kv_view names one layer's K (or V) as three extents -- tokens, heads,
// dim -- plus a layout that turns (token, head, dim) into an element offset.
// It owns nothing, allocates nothing and is trivially copyable, so it is
// passed by value.
//
// Why it is shaped like std::mdspan. The vocabulary is the standard's (see
// kokkos/mdspan, P0009): an extents type, layout policies with a nested
// `mapping<Extents>` that provides extents(), operator()(i...),
// required_span_size(), stride(r) and the is_unique/is_exhaustive/is_strided
// queries, and an accessor with access()/offset(). The view forwards
// extents(), extent(r), rank(), mapping(), accessor(), data_handle(), size()
// and operator()(t, h, d). Readers who know mdspan can read this file at
// sight, and the contiguous and strided views could later become aliases of
// std::mdspan with layout_right/layout_stride (layout_paged stays a custom
// layout, as mdspan allows).
//
// What kvc adds for kernels. The dim axis is contiguous (stride 1) in every
// layout, and every mapping has row_offset(t, h); the view turns it into
// row(t, h), a pointer to the `dim` contiguous elements of one (token, head)
// row. Kernels and the cache consume rows.
//
// Who checks. Construction checks extents, strides, alignment, span overflow
// and (for paged views) every block-table entry the tokens use, and throws
// kvc::error naming the offending argument. Kernels never check: every row()
// a successfully constructed view can return for t < tokens(), h < heads()
// addresses valid, non-overlapping memory within the span.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"

namespace kvc {

// Marker for an extent not known at compile time (all of kv_view's are).
inline constexpr std::size_t dynamic_extent = std::numeric_limits<std::size_t>::max();

// Axis numbers, for extent(r) and stride(r).
inline constexpr std::size_t token_axis = 0;
inline constexpr std::size_t head_axis = 1;
inline constexpr std::size_t dim_axis = 2;

// ---------------------------------------------------------------------------
// kv_extents: the three run-time extents [tokens][heads][dim]. It plays the
// role of std::dextents<std::size_t, 3>, with named accessors.
// ---------------------------------------------------------------------------
class kv_extents {
public:
    using index_type = std::size_t;
    using size_type = std::size_t;
    using rank_type = std::size_t;

    static constexpr rank_type rank() noexcept { return 3; }
    static constexpr rank_type rank_dynamic() noexcept { return 3; }
    static constexpr std::size_t static_extent(rank_type) noexcept { return dynamic_extent; }

    constexpr kv_extents() noexcept = default;
    constexpr kv_extents(index_type tokens, index_type heads, index_type dim) noexcept
        : extents_{tokens, heads, dim} {}

    constexpr index_type extent(rank_type r) const noexcept { return extents_[r]; }
    constexpr index_type tokens() const noexcept { return extents_[token_axis]; }
    constexpr index_type heads() const noexcept { return extents_[head_axis]; }
    constexpr index_type dim() const noexcept { return extents_[dim_axis]; }

    friend constexpr bool operator==(const kv_extents& a, const kv_extents& b) noexcept {
        return a.extents_[0] == b.extents_[0] && a.extents_[1] == b.extents_[1] &&
               a.extents_[2] == b.extents_[2];
    }
    friend constexpr bool operator!=(const kv_extents& a, const kv_extents& b) noexcept { return !(a == b); }

private:
    index_type extents_[3]{};
};

namespace detail {

// Largest element count a view may span: offsets must fit std::ptrdiff_t so
// that pointer arithmetic over the span is defined.
inline constexpr std::size_t max_span_elements =
    static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());

// Checks every layout shares: heads > 0, dim > 0 (tokens == 0 is a valid
// empty view), and heads*dim and tokens*heads*dim fit the addressable range.
inline void check_kv_extents(const kv_extents& e) {
    require(e.heads() > 0, "kv_view: expected heads > 0, got heads = 0");
    require(e.dim() > 0, "kv_view: expected dim > 0, got dim = 0");
    std::size_t row_block = 0;
    std::size_t total = 0;
    require(checked_mul(e.heads(), e.dim(), row_block) && row_block <= max_span_elements &&
                checked_mul(e.tokens(), row_block, total) && total <= max_span_elements,
            "kv_view: size overflow: tokens ", e.tokens(), " x heads ", e.heads(), " x dim ", e.dim(),
            " does not fit in std::ptrdiff_t elements");
}

} // namespace detail

// ---------------------------------------------------------------------------
// default_accessor<T>: plain pointer access, as std::default_accessor.
// ---------------------------------------------------------------------------
template <class T>
struct default_accessor {
    using offset_policy = default_accessor;
    using element_type = T;
    using reference = T&;
    using data_handle_type = T*;

    constexpr default_accessor() noexcept = default;
    // default_accessor<T> -> default_accessor<const T>.
    template <class U, std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>, int> = 0>
    constexpr default_accessor(default_accessor<U>) noexcept {}

    constexpr reference access(data_handle_type p, std::size_t i) const noexcept { return p[i]; }
    constexpr data_handle_type offset(data_handle_type p, std::size_t i) const noexcept { return p + i; }
};

// ---------------------------------------------------------------------------
// Layout policies. Each has a nested mapping<kv_extents>; mapping(t, h, d) is
// the element offset from the data handle, and row_offset(t, h) (a kvc
// extension) is the offset of the row's first element: mapping(t, h, d) ==
// row_offset(t, h) + d in every layout.
// ---------------------------------------------------------------------------

#define KVC_DETAIL_REQUIRE_KV_EXTENTS(Extents)                                                          \
    static_assert(std::is_same_v<Extents, kv_extents>,                                                 \
                  "kvc layouts map kv_extents ([token][head][dim]); use kvc::kv_extents as the extents")

// Contiguous [token][head][dim] (std::layout_right over tokens, heads, dim).
struct layout_token_major {
    template <class Extents>
    class mapping {
        KVC_DETAIL_REQUIRE_KV_EXTENTS(Extents);

    public:
        using extents_type = Extents;
        using index_type = typename Extents::index_type;
        using size_type = typename Extents::size_type;
        using rank_type = typename Extents::rank_type;
        using layout_type = layout_token_major;

        // An empty 0 x 0 x 0 mapping.
        constexpr mapping() noexcept = default;
        // Throws kvc::error if heads or dim is 0 or the size overflows.
        mapping(const extents_type& e) : extents_(e) { detail::check_kv_extents(e); }

        constexpr const extents_type& extents() const noexcept { return extents_; }

        constexpr index_type row_offset(index_type t, index_type h) const noexcept {
            return (t * extents_.heads() + h) * extents_.dim();
        }
        constexpr index_type operator()(index_type t, index_type h, index_type d) const noexcept {
            return row_offset(t, h) + d;
        }
        constexpr index_type required_span_size() const noexcept {
            return extents_.tokens() * extents_.heads() * extents_.dim();
        }
        constexpr index_type stride(rank_type r) const noexcept {
            return r == token_axis ? extents_.heads() * extents_.dim() : r == head_axis ? extents_.dim() : 1;
        }

        static constexpr bool is_always_unique() noexcept { return true; }
        static constexpr bool is_always_exhaustive() noexcept { return true; }
        static constexpr bool is_always_strided() noexcept { return true; }
        static constexpr bool is_unique() noexcept { return true; }
        static constexpr bool is_exhaustive() noexcept { return true; }
        static constexpr bool is_strided() noexcept { return true; }

        friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
            return a.extents_ == b.extents_;
        }
        friend constexpr bool operator!=(const mapping& a, const mapping& b) noexcept { return !(a == b); }

    private:
        extents_type extents_{};
    };
};

// Contiguous [head][token][dim].
struct layout_head_major {
    template <class Extents>
    class mapping {
        KVC_DETAIL_REQUIRE_KV_EXTENTS(Extents);

    public:
        using extents_type = Extents;
        using index_type = typename Extents::index_type;
        using size_type = typename Extents::size_type;
        using rank_type = typename Extents::rank_type;
        using layout_type = layout_head_major;

        constexpr mapping() noexcept = default;
        mapping(const extents_type& e) : extents_(e) { detail::check_kv_extents(e); }

        constexpr const extents_type& extents() const noexcept { return extents_; }

        constexpr index_type row_offset(index_type t, index_type h) const noexcept {
            return (h * extents_.tokens() + t) * extents_.dim();
        }
        constexpr index_type operator()(index_type t, index_type h, index_type d) const noexcept {
            return row_offset(t, h) + d;
        }
        constexpr index_type required_span_size() const noexcept {
            return extents_.tokens() * extents_.heads() * extents_.dim();
        }
        constexpr index_type stride(rank_type r) const noexcept {
            return r == token_axis ? extents_.dim() : r == head_axis ? extents_.tokens() * extents_.dim() : 1;
        }

        static constexpr bool is_always_unique() noexcept { return true; }
        static constexpr bool is_always_exhaustive() noexcept { return true; }
        static constexpr bool is_always_strided() noexcept { return true; }
        static constexpr bool is_unique() noexcept { return true; }
        static constexpr bool is_exhaustive() noexcept { return true; }
        static constexpr bool is_strided() noexcept { return true; }

        friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
            return a.extents_ == b.extents_;
        }
        friend constexpr bool operator!=(const mapping& a, const mapping& b) noexcept { return !(a == b); }

    private:
        extents_type extents_{};
    };
};

// Any token stride and head stride (in elements), dim contiguous: engine
// buffers with padding between heads or between tokens. Offset of (t, h, d) is
// t * token_stride + h * head_stride + d.
//
// Accepted strides are those of a nested arrangement, so rows never overlap:
//   heads inside tokens:  head_stride >= dim and token_stride >= (heads-1)*head_stride + dim, or
//   tokens inside heads:  token_stride >= dim and head_stride >= (tokens-1)*token_stride + dim.
// A stride is only constrained when its axis has more than one entry (a
// single-token view may have any token_stride, a single-head view any
// head_stride). Exotic interleavings that happen not to overlap without being
// nested are rejected. Negative strides are not supported (the type is
// unsigned).
struct layout_strided {
    template <class Extents>
    class mapping {
        KVC_DETAIL_REQUIRE_KV_EXTENTS(Extents);

    public:
        using extents_type = Extents;
        using index_type = typename Extents::index_type;
        using size_type = typename Extents::size_type;
        using rank_type = typename Extents::rank_type;
        using layout_type = layout_strided;

        constexpr mapping() noexcept = default;

        // Throws kvc::error when rows would overlap or the span overflows.
        mapping(const extents_type& e, index_type token_stride, index_type head_stride)
            : extents_(e), token_stride_(token_stride), head_stride_(head_stride) {
            detail::check_kv_extents(e);
            check_strides();
        }

        // Implicit from the contiguous layouts (as std::layout_stride from
        // layout_right): those mappings were checked and are nested.
        template <class Other,
                  std::enable_if_t<std::is_same_v<Other, layout_token_major::mapping<kv_extents>> ||
                                       std::is_same_v<Other, layout_head_major::mapping<kv_extents>>,
                                   int> = 0>
        constexpr mapping(const Other& other) noexcept
            : extents_(other.extents()), token_stride_(other.stride(token_axis)),
              head_stride_(other.stride(head_axis)), span_(other.required_span_size()) {}

        constexpr const extents_type& extents() const noexcept { return extents_; }
        constexpr index_type token_stride() const noexcept { return token_stride_; }
        constexpr index_type head_stride() const noexcept { return head_stride_; }

        constexpr index_type row_offset(index_type t, index_type h) const noexcept {
            return t * token_stride_ + h * head_stride_;
        }
        constexpr index_type operator()(index_type t, index_type h, index_type d) const noexcept {
            return row_offset(t, h) + d;
        }
        // (tokens-1)*token_stride + (heads-1)*head_stride + dim; 0 when empty.
        constexpr index_type required_span_size() const noexcept { return span_; }
        constexpr index_type stride(rank_type r) const noexcept {
            return r == token_axis ? token_stride_ : r == head_axis ? head_stride_ : 1;
        }

        static constexpr bool is_always_unique() noexcept { return true; }
        static constexpr bool is_always_exhaustive() noexcept { return false; }
        static constexpr bool is_always_strided() noexcept { return true; }
        static constexpr bool is_unique() noexcept { return true; }
        constexpr bool is_exhaustive() const noexcept {
            return span_ == extents_.tokens() * extents_.heads() * extents_.dim();
        }
        static constexpr bool is_strided() noexcept { return true; }

        friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
            return a.extents_ == b.extents_ && a.token_stride_ == b.token_stride_ &&
                   a.head_stride_ == b.head_stride_;
        }
        friend constexpr bool operator!=(const mapping& a, const mapping& b) noexcept { return !(a == b); }

    private:
        void check_strides() {
            const index_type tokens = extents_.tokens();
            const index_type heads = extents_.heads();
            const index_type dim = extents_.dim();
            if (heads > 1) {
                detail::require(head_stride_ >= dim, "kv_view: head_stride ", head_stride_,
                                " is smaller than dim ", dim, " (rows would overlap); expected head_stride >= ",
                                dim);
            }
            if (tokens > 1) {
                detail::require(token_stride_ >= dim, "kv_view: token_stride ", token_stride_,
                                " is smaller than dim ", dim, " (rows would overlap); expected token_stride >= ",
                                dim);
            }
            if (tokens > 1 && heads > 1) {
                // Tokens inside heads: head_stride must clear a head's whole token run.
                index_type need_head_stride = 0;
                const bool head_bound_fits = detail::checked_mul(tokens - 1, token_stride_, need_head_stride) &&
                                             detail::checked_add(need_head_stride, dim, need_head_stride);
                // Heads inside tokens: token_stride must clear a token's whole head run.
                index_type need_token_stride = 0;
                const bool token_bound_fits = detail::checked_mul(heads - 1, head_stride_, need_token_stride) &&
                                              detail::checked_add(need_token_stride, dim, need_token_stride);
                const bool tokens_inside_heads = head_bound_fits && head_stride_ >= need_head_stride;
                const bool heads_inside_tokens = token_bound_fits && token_stride_ >= need_token_stride;
                if (!tokens_inside_heads && !heads_inside_tokens) {
                    detail::fail("kv_view: token_stride ", token_stride_, " and head_stride ", head_stride_,
                                 " make rows overlap for tokens ", tokens, ", heads ", heads, ", dim ", dim,
                                 "; expected token_stride >= (heads-1)*head_stride + dim",
                                 token_bound_fits ? " = " : " (overflows)",
                                 token_bound_fits ? need_token_stride : index_type{0},
                                 " or head_stride >= (tokens-1)*token_stride + dim",
                                 head_bound_fits ? " = " : " (overflows)",
                                 head_bound_fits ? need_head_stride : index_type{0});
                }
            }
            if (tokens == 0) {
                span_ = 0;
                return;
            }
            // Rows are nested and non-overlapping, so the span is at least
            // tokens*heads*dim; it may still overflow with large strides.
            index_type token_part = 0;
            index_type head_part = 0;
            index_type span = 0;
            const bool fits = detail::checked_mul(tokens - 1, token_stride_, token_part) &&
                              detail::checked_mul(heads - 1, head_stride_, head_part) &&
                              detail::checked_add(token_part, head_part, span) &&
                              detail::checked_add(span, dim, span) && span <= detail::max_span_elements;
            detail::require(fits, "kv_view: size overflow: span (tokens-1)*token_stride + (heads-1)*head_stride + dim",
                            " with tokens ", tokens, ", heads ", heads, ", dim ", dim, ", token_stride ",
                            token_stride_, ", head_stride ", head_stride_,
                            " does not fit in std::ptrdiff_t elements");
            span_ = span;
        }

        extents_type extents_{};
        index_type token_stride_ = 0;
        index_type head_stride_ = 0;
        index_type span_ = 0;
    };
};

// A block table over fixed-size token blocks, as paging engines hold their
// caches. The data handle is the pool; physical block b starts at element
// b * block_tokens * heads * dim and is laid out [block_tokens][heads][dim].
// Token t of the view is the sequence's token first_token + t (0 unless the
// view starts mid-sequence, as a decode step's new row does when it lands in
// the middle of a block); sequence token s lives in logical block
// s / block_tokens, at offset s % block_tokens within physical block
// block_table[s / block_tokens].
//
// The block table is borrowed, like the pool: it must outlive the view and not
// change while the view is used (construction checked the entries then).
// Duplicate table entries are not rejected (rows would alias), so is_unique()
// answers false.
struct layout_paged {
    template <class Extents>
    class mapping {
        KVC_DETAIL_REQUIRE_KV_EXTENTS(Extents);

    public:
        using extents_type = Extents;
        using index_type = typename Extents::index_type;
        using size_type = typename Extents::size_type;
        using rank_type = typename Extents::rank_type;
        using layout_type = layout_paged;

        constexpr mapping() noexcept = default;

        // Throws kvc::error when block_tokens is 0, the table is missing or too
        // short for the tokens, a used entry is outside [0, pool_blocks), or
        // the pool size overflows.
        mapping(const extents_type& e, const std::int32_t* block_table, index_type table_entries,
                index_type pool_blocks, index_type block_tokens, index_type first_token = 0)
            : extents_(e), block_table_(block_table), table_entries_(table_entries), pool_blocks_(pool_blocks),
              block_tokens_(block_tokens), first_token_(first_token) {
            detail::check_kv_extents(e);
            check();
        }

        constexpr const extents_type& extents() const noexcept { return extents_; }
        constexpr const std::int32_t* block_table() const noexcept { return block_table_; }
        constexpr index_type table_entries() const noexcept { return table_entries_; }
        constexpr index_type pool_blocks() const noexcept { return pool_blocks_; }
        constexpr index_type block_tokens() const noexcept { return block_tokens_; }
        // The sequence token the view's token 0 is.
        constexpr index_type first_token() const noexcept { return first_token_; }
        // Elements in one physical block: block_tokens * heads * dim.
        constexpr index_type block_elements() const noexcept { return block_elements_; }
        // Logical blocks up to the last one the tokens use (the table needs
        // that many entries): ceil((first_token + tokens) / block_tokens).
        constexpr index_type used_blocks() const noexcept {
            return extents_.tokens() == 0 ? 0 : (first_token_ + extents_.tokens() - 1) / block_tokens_ + 1;
        }

        index_type row_offset(index_type t, index_type h) const noexcept {
            const index_type s = first_token_ + t;
            const auto physical = static_cast<index_type>(block_table_[s / block_tokens_]);
            return physical * block_elements_ + (s % block_tokens_) * token_elements_ + h * extents_.dim();
        }
        index_type operator()(index_type t, index_type h, index_type d) const noexcept {
            return row_offset(t, h) + d;
        }
        // The whole pool: pool_blocks * block_tokens * heads * dim.
        constexpr index_type required_span_size() const noexcept { return pool_blocks_ * block_elements_; }

        static constexpr bool is_always_unique() noexcept { return false; }
        static constexpr bool is_always_exhaustive() noexcept { return false; }
        static constexpr bool is_always_strided() noexcept { return false; }
        static constexpr bool is_unique() noexcept { return false; }
        static constexpr bool is_exhaustive() noexcept { return false; }
        static constexpr bool is_strided() noexcept { return false; }

        friend constexpr bool operator==(const mapping& a, const mapping& b) noexcept {
            return a.extents_ == b.extents_ && a.block_table_ == b.block_table_ &&
                   a.table_entries_ == b.table_entries_ && a.pool_blocks_ == b.pool_blocks_ &&
                   a.block_tokens_ == b.block_tokens_ && a.first_token_ == b.first_token_;
        }
        friend constexpr bool operator!=(const mapping& a, const mapping& b) noexcept { return !(a == b); }

    private:
        void check() {
            const index_type tokens = extents_.tokens();
            detail::require(block_tokens_ > 0, "kv_view: expected block_tokens > 0, got block_tokens = 0");
            token_elements_ = extents_.heads() * extents_.dim(); // checked by check_kv_extents
            index_type pool_elements = 0;
            detail::require(detail::checked_mul(block_tokens_, token_elements_, block_elements_) &&
                                detail::checked_mul(pool_blocks_, block_elements_, pool_elements) &&
                                pool_elements <= detail::max_span_elements,
                            "kv_view: size overflow: pool_blocks ", pool_blocks_, " x block_tokens ", block_tokens_,
                            " x heads ", extents_.heads(), " x dim ", extents_.dim(),
                            " does not fit in std::ptrdiff_t elements");
            index_type end = 0;
            detail::require(detail::checked_add(first_token_, tokens, end) && end <= detail::max_span_elements,
                            "kv_view: first_token ", first_token_, " + tokens ", tokens,
                            " overflows; expected a token range inside the block table");
            if (tokens == 0) return;
            const index_type needed = used_blocks();
            detail::require(block_table_ != nullptr, "kv_view: block_table is null but tokens = ", tokens,
                            "; expected a block table with at least ", needed, " entries");
            detail::require(table_entries_ >= needed, "kv_view: table_entries ", table_entries_,
                            " is too small for tokens ", first_token_, "..", end - 1, " with block_tokens ",
                            block_tokens_, "; expected table_entries >= ceil((first_token + tokens) / block_tokens) = ",
                            needed);
            for (index_type i = first_token_ / block_tokens_; i < needed; ++i) {
                const std::int32_t block = block_table_[i];
                detail::require(block >= 0 && static_cast<index_type>(block) < pool_blocks_, "kv_view: block_table[",
                                i, "] = ", block, " is out of range; expected 0 <= block_table[", i,
                                "] < pool_blocks = ", pool_blocks_);
            }
        }

        extents_type extents_{};
        const std::int32_t* block_table_ = nullptr;
        index_type table_entries_ = 0;
        index_type pool_blocks_ = 0;
        index_type block_tokens_ = 1;
        index_type first_token_ = 0;
        index_type token_elements_ = 0;
        index_type block_elements_ = 0;
    };
};

#undef KVC_DETAIL_REQUIRE_KV_EXTENTS

template <class T, class Layout>
class kv_view;

template <class V>
struct is_kv_view : std::false_type {};
template <class T, class Layout>
struct is_kv_view<kv_view<T, Layout>> : std::true_type {};
template <class V>
inline constexpr bool is_kv_view_v = is_kv_view<std::remove_cv_t<V>>::value;

// ---------------------------------------------------------------------------
// kv_view<T, Layout>: T is float, kvc::half or kvc::bfloat16, possibly const
// (kv_view<const half> is read-only input). kv_view<T> converts implicitly to
// kv_view<const T>, and contiguous views convert to layout_strided views.
// ---------------------------------------------------------------------------
template <class T, class Layout = layout_token_major>
class kv_view {
    static_assert(is_element_type_v<T>,
                  "kvc::kv_view: element type must be float, kvc::half or kvc::bfloat16 (optionally const)");
    static_assert(!std::is_volatile_v<T>, "kvc::kv_view: volatile element types are not supported");

public:
    using extents_type = kv_extents;
    using layout_type = Layout;
    using mapping_type = typename Layout::template mapping<kv_extents>;
    using accessor_type = default_accessor<T>;
    using element_type = T;
    using value_type = std::remove_cv_t<T>;
    using index_type = kv_extents::index_type;
    using size_type = kv_extents::size_type;
    using rank_type = kv_extents::rank_type;
    using data_handle_type = T*;
    using reference = T&;

    static constexpr dtype element_dtype = dtype_of_v<T>;

    // An empty 0 x 0 x 0 view with no data.
    constexpr kv_view() noexcept = default;

    // From a data handle and a (checked) mapping. Throws kvc::error if data is
    // null while the mapping spans elements, misaligned for T, or the span in
    // bytes overflows.
    kv_view(data_handle_type data, const mapping_type& m) : data_(data), mapping_(m) { check_data(); }

    // Contiguous layouts: data holds tokens*heads*dim elements.
    template <class L = Layout,
              std::enable_if_t<std::is_same_v<L, layout_token_major> || std::is_same_v<L, layout_head_major>, int> = 0>
    kv_view(data_handle_type data, index_type tokens, index_type heads, index_type dim)
        : kv_view(data, mapping_type(kv_extents(tokens, heads, dim))) {}

    // Strided layout: element (t, h, d) at data[t*token_stride + h*head_stride + d].
    template <class L = Layout, std::enable_if_t<std::is_same_v<L, layout_strided>, int> = 0>
    kv_view(data_handle_type data, index_type tokens, index_type heads, index_type dim, index_type token_stride,
            index_type head_stride)
        : kv_view(data, mapping_type(kv_extents(tokens, heads, dim), token_stride, head_stride)) {}

    // Paged layout: pool of pool_blocks blocks of [block_tokens][heads][dim];
    // block_table[i] is the physical block of logical block i.
    template <class L = Layout, std::enable_if_t<std::is_same_v<L, layout_paged>, int> = 0>
    kv_view(data_handle_type pool, const std::int32_t* block_table, index_type table_entries, index_type pool_blocks,
            index_type block_tokens, index_type tokens, index_type heads, index_type dim)
        : kv_view(pool, mapping_type(kv_extents(tokens, heads, dim), block_table, table_entries, pool_blocks,
                                     block_tokens)) {}
    // Paged, starting at sequence token first_token (mid-block is fine): the
    // view's tokens are the sequence's first_token .. first_token + tokens - 1.
    // A decode step's new row is kv_view(pool, table, entries, pool_blocks,
    // block_tokens, position, 1, heads, dim).
    template <class L = Layout, std::enable_if_t<std::is_same_v<L, layout_paged>, int> = 0>
    kv_view(data_handle_type pool, const std::int32_t* block_table, index_type table_entries, index_type pool_blocks,
            index_type block_tokens, index_type first_token, index_type tokens, index_type heads, index_type dim)
        : kv_view(pool, mapping_type(kv_extents(tokens, heads, dim), block_table, table_entries, pool_blocks,
                                     block_tokens, first_token)) {}

    // kv_view<U, L2> -> kv_view<T, Layout> when U* -> T* only adds const and
    // L2's mapping converts to Layout's (same layout, or contiguous -> strided).
    template <class U, class OtherLayout,
              std::enable_if_t<!(std::is_same_v<U, T> && std::is_same_v<OtherLayout, Layout>) &&
                                   std::is_convertible_v<U (*)[], T (*)[]> &&
                                   std::is_convertible_v<const typename OtherLayout::template mapping<kv_extents>&,
                                                         mapping_type>,
                               int> = 0>
    constexpr kv_view(const kv_view<U, OtherLayout>& other) noexcept
        : data_(other.data_handle()), mapping_(other.mapping()) {}

    // mdspan vocabulary.
    static constexpr rank_type rank() noexcept { return 3; }
    static constexpr rank_type rank_dynamic() noexcept { return 3; }
    static constexpr std::size_t static_extent(rank_type) noexcept { return dynamic_extent; }
    constexpr const extents_type& extents() const noexcept { return mapping_.extents(); }
    constexpr index_type extent(rank_type r) const noexcept { return mapping_.extents().extent(r); }
    constexpr const mapping_type& mapping() const noexcept { return mapping_; }
    constexpr accessor_type accessor() const noexcept { return accessor_type{}; }
    // The first element (contiguous, strided) or the pool (paged).
    constexpr data_handle_type data_handle() const noexcept { return data_; }
    // Number of elements viewed: tokens * heads * dim.
    constexpr size_type size() const noexcept { return extents().tokens() * extents().heads() * extents().dim(); }
    constexpr bool empty() const noexcept { return size() == 0; }
    // Elements the data handle must make accessible (the pool, for paged views).
    constexpr index_type required_span_size() const noexcept { return mapping_.required_span_size(); }

    // Element (t, h, d). Unchecked: t < tokens(), h < heads(), d < dim().
    constexpr reference operator()(index_type t, index_type h, index_type d) const noexcept {
        return accessor_type{}.access(data_, mapping_(t, h, d));
    }

    // The dim() contiguous elements of row (t, h). Unchecked: t < tokens(), h < heads().
    constexpr T* row(index_type t, index_type h) const noexcept { return data_ + mapping_.row_offset(t, h); }

    constexpr index_type tokens() const noexcept { return extents().tokens(); }
    constexpr index_type heads() const noexcept { return extents().heads(); }
    constexpr index_type dim() const noexcept { return extents().dim(); }

    // Strided layouts only (token_major, head_major, strided). A member
    // template so that explicitly instantiating a paged view still compiles.
    template <class M = mapping_type>
    constexpr index_type stride(rank_type r) const noexcept {
        static_assert(M::is_always_strided(), "kvc::kv_view::stride: layout_paged is not strided; use row(t, h)");
        return mapping_.stride(r);
    }

    static constexpr bool is_always_unique() noexcept { return mapping_type::is_always_unique(); }
    static constexpr bool is_always_exhaustive() noexcept { return mapping_type::is_always_exhaustive(); }
    static constexpr bool is_always_strided() noexcept { return mapping_type::is_always_strided(); }
    constexpr bool is_unique() const noexcept { return mapping_.is_unique(); }
    constexpr bool is_exhaustive() const noexcept { return mapping_.is_exhaustive(); }
    constexpr bool is_strided() const noexcept { return mapping_.is_strided(); }

private:
    void check_data() const {
        constexpr const char* name = std::is_same_v<Layout, layout_paged> ? "pool" : "data";
        const index_type span = mapping_.required_span_size();
        detail::require(data_ != nullptr || span == 0, "kv_view: ", name, " is null but the layout spans ", span,
                        " elements; expected a non-null ", name, " pointer");
        const auto address = reinterpret_cast<std::uintptr_t>(data_);
        detail::require(address % alignof(T) == 0, "kv_view: ", name, " pointer ", static_cast<const void*>(data_),
                        " is not aligned; expected a multiple of alignof(", name_of(element_dtype), ") = ", alignof(T));
        detail::require(span <= detail::max_span_elements / sizeof(T), "kv_view: size overflow: span of ", span,
                        " elements of ", sizeof(T), " bytes does not fit in std::ptrdiff_t bytes");
        detail::require(address <= std::numeric_limits<std::uintptr_t>::max() - span * sizeof(T), "kv_view: ",
                        name, " + ", span, " elements wraps around the address space");
    }

    data_handle_type data_ = nullptr;
    mapping_type mapping_{};
};

// Class template argument deduction: kv_view v(ptr, tokens, heads, dim) is
// token major; with two strides it is strided; with a block table it is paged.
template <class T>
kv_view(T*, std::size_t, std::size_t, std::size_t) -> kv_view<T, layout_token_major>;
template <class T>
kv_view(T*, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t) -> kv_view<T, layout_strided>;
template <class T>
kv_view(T*, const std::int32_t*, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t)
    -> kv_view<T, layout_paged>;
template <class T>
kv_view(T*, const std::int32_t*, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t, std::size_t,
        std::size_t) -> kv_view<T, layout_paged>;
template <class T, class Mapping>
kv_view(T*, const Mapping&) -> kv_view<T, typename Mapping::layout_type>;

} // namespace kvc
