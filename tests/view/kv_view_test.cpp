// Tests for kvc/view/kv_view.hpp.
//
// The oracle is always computed here, independently of the header: buffers are
// filled so that the element at flat position i carries the key i (or a
// sentinel for padding), and each test states the flat position a layout puts
// (t, h, d) at, or builds the buffer element by element in the layout's order.

#include "kvc/view/kv_view.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using kvc::kv_extents;
using kvc::kv_view;
using kvc::layout_head_major;
using kvc::layout_paged;
using kvc::layout_strided;
using kvc::layout_token_major;

// ---- element keys ----------------------------------------------------------
// A key is a small integer stored exactly in every element type: float holds it
// as a value, half/bfloat16 as raw bits (no arithmetic on them is needed).

constexpr std::uint32_t sentinel_key = 0xFFFF;

template <class T>
T make_value(std::uint32_t key) {
    using V = std::remove_const_t<T>;
    if constexpr (std::is_same_v<V, float>) {
        return static_cast<float>(key);
    } else {
        static_assert(sizeof(V) == 2);
        const auto bits = static_cast<std::uint16_t>(key);
        V value;
        std::memcpy(&value, &bits, sizeof value);
        return value;
    }
}

template <class T>
std::uint32_t key_of(const T& value) {
    if constexpr (std::is_same_v<std::remove_const_t<T>, float>) {
        return static_cast<std::uint32_t>(value);
    } else {
        std::uint16_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        return bits;
    }
}

// n elements, element i carrying key i.
template <class T>
std::vector<T> keyed_buffer(std::size_t n) {
    EXPECT_LT(n, sentinel_key);
    std::vector<T> buffer(n);
    for (std::size_t i = 0; i < n; ++i) buffer[i] = make_value<T>(static_cast<std::uint32_t>(i));
    return buffer;
}

// Checks that view(t, h, d) and view.row(t, h)[d] are base[flat(t, h, d)] for
// every element, that the value there is the key flat(t, h, d) (buffers made by
// keyed_buffer), and that no two (t, h, d) share a position.
template <class View, class Flat>
void expect_addressing(const View& view, const typename View::element_type* base, std::size_t buffer_size,
                       Flat flat) {
    std::vector<int> hits(buffer_size, 0);
    for (std::size_t t = 0; t < view.tokens(); ++t) {
        for (std::size_t h = 0; h < view.heads(); ++h) {
            for (std::size_t d = 0; d < view.dim(); ++d) {
                const std::size_t index = flat(t, h, d);
                ASSERT_LT(index, buffer_size) << "t=" << t << " h=" << h << " d=" << d;
                ASSERT_EQ(&view(t, h, d), base + index) << "t=" << t << " h=" << h << " d=" << d;
                ASSERT_EQ(view.row(t, h) + d, base + index) << "t=" << t << " h=" << h << " d=" << d;
                ASSERT_EQ(view.mapping()(t, h, d), index);
                ASSERT_EQ(key_of(view(t, h, d)), index);
                ASSERT_EQ(key_of(view.row(t, h)[d]), index);
                ++hits[index];
            }
        }
    }
    for (std::size_t i = 0; i < buffer_size; ++i) ASSERT_LE(hits[i], 1) << "position " << i << " aliased";
}

template <class F>
std::string error_message(F&& f) {
    try {
        f();
    } catch (const kvc::error& e) {
        return e.what();
    }
    return "<no kvc::error thrown>";
}

// EXPECT_THROW for the type, then every needle must appear in what().
#define EXPECT_KV_ERROR(statement, ...)                                                                      \
    do {                                                                                                       \
        EXPECT_THROW(statement, kvc::error);                                                                   \
        const std::string kv_message_ = error_message([&] { statement; });                                     \
        for (const char* needle_ : {__VA_ARGS__}) {                                                            \
            EXPECT_NE(kv_message_.find(needle_), std::string::npos)                                            \
                << "message \"" << kv_message_ << "\" does not mention \"" << needle_ << "\"";                \
        }                                                                                                      \
    } while (0)

template <class T>
class KvViewTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, kvc::half, kvc::bfloat16>;
TYPED_TEST_SUITE(KvViewTyped, ElementTypes, );

// ---- compile-time properties ---------------------------------------------

static_assert(kv_view<float>::rank() == 3);
static_assert(kv_view<float, layout_paged>::rank_dynamic() == 3);
static_assert(std::is_same_v<kv_view<float>::layout_type, layout_token_major>);
static_assert(kv_view<float>::element_dtype == kvc::dtype::f32);
static_assert(kv_view<const kvc::half, layout_strided>::element_dtype == kvc::dtype::f16);
static_assert(kv_view<kvc::bfloat16, layout_paged>::element_dtype == kvc::dtype::bf16);
static_assert(std::is_same_v<kv_view<const kvc::half>::value_type, kvc::half>);
static_assert(std::is_same_v<decltype(std::declval<kv_view<const float>>()(0, 0, 0)), const float&>);
static_assert(std::is_same_v<decltype(std::declval<kv_view<float, layout_paged>>().row(0, 0)), float*>);
static_assert(std::is_trivially_copyable_v<kv_view<float>>);
static_assert(std::is_trivially_copyable_v<kv_view<const kvc::half, layout_strided>>);
static_assert(std::is_trivially_copyable_v<kv_view<kvc::bfloat16, layout_paged>>);
static_assert(kvc::is_kv_view_v<kv_view<float, layout_paged>> && !kvc::is_kv_view_v<float*>);

// Non-const -> const converts implicitly, never the reverse; no dtype changes.
template <class L>
constexpr bool const_conversion_ok =
    std::is_convertible_v<kv_view<float, L>, kv_view<const float, L>> &&
    std::is_convertible_v<kv_view<kvc::half, L>, kv_view<const kvc::half, L>> &&
    std::is_convertible_v<kv_view<kvc::bfloat16, L>, kv_view<const kvc::bfloat16, L>> &&
    !std::is_convertible_v<kv_view<const float, L>, kv_view<float, L>> &&
    !std::is_constructible_v<kv_view<float, L>, kv_view<const float, L>> &&
    !std::is_convertible_v<kv_view<float, L>, kv_view<kvc::half, L>> &&
    !std::is_convertible_v<kv_view<kvc::half, L>, kv_view<const kvc::bfloat16, L>>;
static_assert(const_conversion_ok<layout_token_major>);
static_assert(const_conversion_ok<layout_head_major>);
static_assert(const_conversion_ok<layout_strided>);
static_assert(const_conversion_ok<layout_paged>);

// Contiguous -> strided converts (like layout_right -> layout_stride); nothing else.
static_assert(std::is_convertible_v<kv_view<float, layout_token_major>, kv_view<const float, layout_strided>>);
static_assert(std::is_convertible_v<kv_view<float, layout_head_major>, kv_view<float, layout_strided>>);
static_assert(!std::is_constructible_v<kv_view<float, layout_token_major>, kv_view<float, layout_head_major>>);
static_assert(!std::is_constructible_v<kv_view<float, layout_token_major>, kv_view<float, layout_strided>>);
static_assert(!std::is_constructible_v<kv_view<float, layout_strided>, kv_view<float, layout_paged>>);

// Layout policies have an mdspan-style nested mapping.
static_assert(std::is_same_v<layout_strided::mapping<kv_extents>::layout_type, layout_strided>);
static_assert(layout_token_major::mapping<kv_extents>::is_always_exhaustive());
static_assert(!layout_strided::mapping<kv_extents>::is_always_exhaustive());
static_assert(!layout_paged::mapping<kv_extents>::is_always_strided());

// ---- addressing per layout, all element types ------------------------------

TYPED_TEST(KvViewTyped, TokenMajorAddressesTokenHeadDim) {
    using T = TypeParam;
    const std::size_t tokens = 5, heads = 3, dim = 4;
    auto buffer = keyed_buffer<T>(tokens * heads * dim);
    kv_view<T, layout_token_major> view(buffer.data(), tokens, heads, dim);

    EXPECT_EQ(view.tokens(), tokens);
    EXPECT_EQ(view.heads(), heads);
    EXPECT_EQ(view.dim(), dim);
    EXPECT_EQ(view.extent(kvc::token_axis), tokens);
    EXPECT_EQ(view.extent(kvc::head_axis), heads);
    EXPECT_EQ(view.extent(kvc::dim_axis), dim);
    EXPECT_EQ(view.extents(), kv_extents(tokens, heads, dim));
    EXPECT_EQ(view.size(), tokens * heads * dim);
    EXPECT_EQ(view.required_span_size(), tokens * heads * dim);
    EXPECT_EQ(view.data_handle(), buffer.data());
    EXPECT_EQ(view.stride(0), heads * dim);
    EXPECT_EQ(view.stride(1), dim);
    EXPECT_EQ(view.stride(2), 1u);
    EXPECT_TRUE(view.is_exhaustive());
    expect_addressing(view, buffer.data(), buffer.size(),
                      [&](std::size_t t, std::size_t h, std::size_t d) { return (t * heads + h) * dim + d; });
}

TYPED_TEST(KvViewTyped, HeadMajorAddressesHeadTokenDim) {
    using T = TypeParam;
    const std::size_t tokens = 6, heads = 2, dim = 5;
    auto buffer = keyed_buffer<T>(tokens * heads * dim);
    kv_view<T, layout_head_major> view(buffer.data(), tokens, heads, dim);

    EXPECT_EQ(view.size(), tokens * heads * dim);
    EXPECT_EQ(view.required_span_size(), tokens * heads * dim);
    EXPECT_EQ(view.stride(0), dim);
    EXPECT_EQ(view.stride(1), tokens * dim);
    expect_addressing(view, buffer.data(), buffer.size(),
                      [&](std::size_t t, std::size_t h, std::size_t d) { return (h * tokens + t) * dim + d; });
}

TYPED_TEST(KvViewTyped, StridedAddressesTokenStrideTimesTokenPlusHeadStrideTimesHead) {
    using T = TypeParam;
    struct config {
        std::size_t tokens, heads, dim, token_stride, head_stride;
    };
    const config configs[] = {
        {4, 3, 4, 3 * 6 + 5, 6},   // heads inside tokens, padding after each head and each token
        {4, 3, 4, 5, 4 * 5 + 7},   // tokens inside heads (head major), padding both levels
        {5, 2, 3, 2 * 3, 3},       // packed token major expressed as strides
        {5, 2, 3, 3, 5 * 3},       // packed head major expressed as strides
        {3, 3, 4, 3 * 6 + 4, 6},   // heads inside tokens, token_stride exactly at its bound
        {3, 3, 4, 5, 2 * 5 + 4},   // tokens inside heads, head_stride exactly at its bound
        {1, 3, 4, 0, 7},           // a single token: token_stride is irrelevant
        {4, 1, 4, 9, 0},           // a single head: head_stride is irrelevant
    };
    for (const config& c : configs) {
        SCOPED_TRACE(::testing::Message() << "tokens " << c.tokens << " heads " << c.heads << " dim " << c.dim
                                          << " token_stride " << c.token_stride << " head_stride "
                                          << c.head_stride);
        const std::size_t span = (c.tokens - 1) * c.token_stride + (c.heads - 1) * c.head_stride + c.dim;
        auto buffer = keyed_buffer<T>(span + 3);
        kv_view<T, layout_strided> view(buffer.data(), c.tokens, c.heads, c.dim, c.token_stride, c.head_stride);
        EXPECT_EQ(view.required_span_size(), span);
        EXPECT_EQ(view.stride(kvc::token_axis), c.token_stride);
        EXPECT_EQ(view.stride(kvc::head_axis), c.head_stride);
        EXPECT_EQ(view.stride(kvc::dim_axis), 1u);
        EXPECT_EQ(view.mapping().token_stride(), c.token_stride);
        EXPECT_EQ(view.mapping().head_stride(), c.head_stride);
        expect_addressing(view, buffer.data(), buffer.size(), [&](std::size_t t, std::size_t h, std::size_t d) {
            return t * c.token_stride + h * c.head_stride + d;
        });
    }
}

TYPED_TEST(KvViewTyped, PagedAddressesThroughTheBlockTable) {
    using T = TypeParam;
    const std::size_t tokens = 10, heads = 2, dim = 3, block_tokens = 4, pool_blocks = 5;
    const std::vector<std::int32_t> table = {3, 0, 4, -7 /* unused: tokens need 3 blocks */};
    const std::size_t block_elements = block_tokens * heads * dim;
    auto pool = keyed_buffer<T>(pool_blocks * block_elements);
    kv_view<T, layout_paged> view(pool.data(), table.data(), table.size(), pool_blocks, block_tokens, tokens, heads,
                                  dim);

    EXPECT_EQ(view.tokens(), tokens);
    EXPECT_EQ(view.size(), tokens * heads * dim);
    EXPECT_EQ(view.required_span_size(), pool_blocks * block_elements);
    EXPECT_EQ(view.data_handle(), pool.data());
    EXPECT_EQ(view.mapping().block_tokens(), block_tokens);
    EXPECT_EQ(view.mapping().pool_blocks(), pool_blocks);
    EXPECT_EQ(view.mapping().table_entries(), table.size());
    EXPECT_EQ(view.mapping().block_table(), table.data());
    EXPECT_EQ(view.mapping().used_blocks(), 3u);
    expect_addressing(view, pool.data(), pool.size(), [&](std::size_t t, std::size_t h, std::size_t d) {
        const auto physical = static_cast<std::size_t>(table[t / block_tokens]);
        return physical * block_elements + (t % block_tokens) * heads * dim + h * dim + d;
    });
}

// A view that starts mid-block (a decode step's row, a chunk after a partial
// block): token t is sequence token first + t, through the same table.
TYPED_TEST(KvViewTyped, PagedViewsStartMidBlock) {
    using T = TypeParam;
    const std::size_t heads = 2, dim = 3, block_tokens = 4, pool_blocks = 5, first = 6, tokens = 5;
    const std::vector<std::int32_t> table = {-1 /* block 0 not used by tokens 6..10 */, 3, 0, -9};
    const std::size_t block_elements = block_tokens * heads * dim;
    auto pool = keyed_buffer<T>(pool_blocks * block_elements);
    kv_view view(pool.data(), table.data(), table.size(), pool_blocks, block_tokens, first, tokens, heads, dim);
    static_assert(std::is_same_v<decltype(view), kv_view<T, layout_paged>>);
    EXPECT_EQ(view.tokens(), tokens);
    EXPECT_EQ(view.mapping().first_token(), first);
    EXPECT_EQ(view.mapping().used_blocks(), 3u); // sequence tokens 6..10 end in logical block 2
    expect_addressing(view, pool.data(), pool.size(), [&](std::size_t t, std::size_t h, std::size_t d) {
        const std::size_t s = first + t; // hand-worked: t = 0 is block 1 (physical 3), offset 2
        const auto physical = static_cast<std::size_t>(table[s / block_tokens]);
        return physical * block_elements + (s % block_tokens) * heads * dim + h * dim + d;
    });
    EXPECT_EQ(view.row(0, 1), pool.data() + 3 * block_elements + 2 * heads * dim + dim);
    // The same rows as a view from token 0 over the whole sequence.
    const std::vector<std::int32_t> full_table = {1, 3, 0};
    kv_view<T, layout_paged> whole(pool.data(), full_table.data(), full_table.size(), pool_blocks, block_tokens,
                                   first + tokens, heads, dim);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h) EXPECT_EQ(view.row(t, h), whole.row(first + t, h));
    // The table must reach the last token's block; only the blocks used are checked.
    EXPECT_THROW((kv_view<T, layout_paged>(pool.data(), table.data(), 2, pool_blocks, block_tokens, first, tokens,
                                           heads, dim)),
                 kvc::error);
    EXPECT_THROW((kv_view<T, layout_paged>(pool.data(), table.data(), table.size(), pool_blocks, block_tokens, 13, 1,
                                           heads, dim)),
                 kvc::error); // sequence token 13 is in block 3, whose entry -9 is out of range
    EXPECT_THROW((kv_view<T, layout_paged>(pool.data(), table.data(), table.size(), pool_blocks, block_tokens,
                                           SIZE_MAX, 2, heads, dim)),
                 kvc::error); // first + tokens overflows
}

// ---- layouts agree with each other ----------------------------------------

TYPED_TEST(KvViewTyped, HeadMajorOfTransposedCopyEqualsTokenMajor) {
    using T = TypeParam;
    const std::size_t tokens = 7, heads = 3, dim = 8;
    auto token_major = keyed_buffer<T>(tokens * heads * dim);
    std::vector<T> head_major(token_major.size());
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t d = 0; d < dim; ++d)
                head_major[(h * tokens + t) * dim + d] = token_major[(t * heads + h) * dim + d];

    kv_view<const T, layout_token_major> a(token_major.data(), tokens, heads, dim);
    kv_view<const T, layout_head_major> b(head_major.data(), tokens, heads, dim);
    for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t h = 0; h < heads; ++h) {
            EXPECT_EQ(std::memcmp(a.row(t, h), b.row(t, h), dim * sizeof(T)), 0) << "t=" << t << " h=" << h;
            for (std::size_t d = 0; d < dim; ++d) ASSERT_EQ(key_of(a(t, h, d)), key_of(b(t, h, d)));
        }
    }
}

// Strided views over padded engine buffers: the buffer is built element by
// element in the engine's order, padding filled with a sentinel. No row may
// reach the padding, every payload element is reached exactly once, and writes
// through the view leave the padding untouched.
template <class T>
void check_padded(std::vector<T>& buffer, const std::vector<std::size_t>& position_of, std::size_t tokens,
                  std::size_t heads, std::size_t dim, std::size_t token_stride, std::size_t head_stride) {
    kv_view<T, layout_strided> view(buffer.data(), tokens, heads, dim, token_stride, head_stride);
    std::vector<int> hits(buffer.size(), 0);
    for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t h = 0; h < heads; ++h) {
            const T* row = view.row(t, h);
            ASSERT_GE(row, buffer.data());
            ASSERT_LE(row + dim, buffer.data() + buffer.size());
            for (std::size_t d = 0; d < dim; ++d) {
                const std::size_t position = static_cast<std::size_t>(row + d - buffer.data());
                ASSERT_NE(key_of(row[d]), sentinel_key) << "row (" << t << ", " << h << ") reaches padding";
                ASSERT_EQ(position, position_of[(t * heads + h) * dim + d]);
                ++hits[position];
            }
        }
    }
    for (std::size_t i = 0; i < buffer.size(); ++i) {
        const bool payload = key_of(buffer[i]) != sentinel_key;
        EXPECT_EQ(hits[i], payload ? 1 : 0) << "position " << i;
    }
    // Write through the view; padding must survive.
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t d = 0; d < dim; ++d) view(t, h, d) = make_value<T>(42);
    std::size_t padding = 0;
    for (std::size_t i = 0; i < buffer.size(); ++i) {
        if (hits[i] == 1) {
            EXPECT_EQ(key_of(buffer[i]), 42u) << "position " << i;
        } else {
            EXPECT_EQ(key_of(buffer[i]), sentinel_key) << "padding at " << i << " was written";
            ++padding;
        }
    }
    EXPECT_GT(padding, 0u);
}

TYPED_TEST(KvViewTyped, StridedTokenMajorWithPaddingNeverTouchesPadding) {
    using T = TypeParam;
    const std::size_t tokens = 4, heads = 3, dim = 5, head_pad = 3, token_pad = 2;
    std::vector<T> buffer;
    std::vector<std::size_t> position_of(tokens * heads * dim);
    std::uint32_t key = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t h = 0; h < heads; ++h) {
            for (std::size_t d = 0; d < dim; ++d) {
                position_of[(t * heads + h) * dim + d] = buffer.size();
                buffer.push_back(make_value<T>(key++));
            }
            for (std::size_t p = 0; p < head_pad; ++p) buffer.push_back(make_value<T>(sentinel_key));
        }
        for (std::size_t p = 0; p < token_pad; ++p) buffer.push_back(make_value<T>(sentinel_key));
    }
    check_padded(buffer, position_of, tokens, heads, dim, heads * (dim + head_pad) + token_pad, dim + head_pad);
}

TYPED_TEST(KvViewTyped, StridedHeadMajorWithPaddingNeverTouchesPadding) {
    using T = TypeParam;
    const std::size_t tokens = 5, heads = 2, dim = 4, token_pad = 1, head_pad = 6;
    std::vector<T> buffer;
    std::vector<std::size_t> position_of(tokens * heads * dim);
    std::uint32_t key = 0;
    for (std::size_t h = 0; h < heads; ++h) {
        for (std::size_t t = 0; t < tokens; ++t) {
            for (std::size_t d = 0; d < dim; ++d) {
                position_of[(t * heads + h) * dim + d] = buffer.size();
                buffer.push_back(make_value<T>(key++));
            }
            for (std::size_t p = 0; p < token_pad; ++p) buffer.push_back(make_value<T>(sentinel_key));
        }
        for (std::size_t p = 0; p < head_pad; ++p) buffer.push_back(make_value<T>(sentinel_key));
    }
    check_padded(buffer, position_of, tokens, heads, dim, dim + token_pad, tokens * (dim + token_pad) + head_pad);
}

// A paged pool whose blocks were placed by a shuffled block table reads back
// exactly as the token-major data it was scattered from.
TYPED_TEST(KvViewTyped, PagedOverShuffledTableEqualsTokenMajor) {
    using T = TypeParam;
    const std::size_t heads = 3, dim = 4, block_tokens = 4, pool_blocks = 9;
    const std::size_t token_elements = heads * dim;
    for (const std::size_t tokens : {std::size_t{13}, std::size_t{16}, std::size_t{1}}) {
        SCOPED_TRACE(::testing::Message() << "tokens " << tokens);
        const std::size_t logical_blocks = (tokens + block_tokens - 1) / block_tokens;
        auto reference = keyed_buffer<T>(tokens * token_elements);

        std::vector<std::int32_t> physical(pool_blocks);
        for (std::size_t i = 0; i < pool_blocks; ++i) physical[i] = static_cast<std::int32_t>(i);
        std::mt19937 rng(static_cast<std::uint32_t>(tokens));
        std::shuffle(physical.begin(), physical.end(), rng);
        const std::vector<std::int32_t> table(physical.begin(),
                                              physical.begin() + static_cast<std::ptrdiff_t>(logical_blocks));

        std::vector<T> pool(pool_blocks * block_tokens * token_elements, make_value<T>(sentinel_key));
        for (std::size_t block = 0; block < logical_blocks; ++block) {
            for (std::size_t slot = 0; slot < block_tokens; ++slot) {
                const std::size_t t = block * block_tokens + slot;
                if (t >= tokens) break;
                std::copy_n(reference.begin() + static_cast<std::ptrdiff_t>(t * token_elements), token_elements,
                            pool.begin() + static_cast<std::ptrdiff_t>(
                                               (static_cast<std::size_t>(table[block]) * block_tokens + slot) *
                                               token_elements));
            }
        }

        kv_view<const T, layout_token_major> expected(reference.data(), tokens, heads, dim);
        kv_view<const T, layout_paged> paged(pool.data(), table.data(), table.size(), pool_blocks, block_tokens,
                                             tokens, heads, dim);
        for (std::size_t t = 0; t < tokens; ++t) {
            for (std::size_t h = 0; h < heads; ++h) {
                EXPECT_EQ(std::memcmp(paged.row(t, h), expected.row(t, h), dim * sizeof(T)), 0)
                    << "t=" << t << " h=" << h;
                for (std::size_t d = 0; d < dim; ++d) ASSERT_EQ(key_of(paged(t, h, d)), key_of(expected(t, h, d)));
            }
        }
    }
}

// ---- conversions and construction forms ------------------------------------

template <class T, class L>
std::uint32_t first_key(kv_view<const T, L> view) {
    return key_of(view(0, 0, 0));
}

TYPED_TEST(KvViewTyped, NonConstViewConvertsToConstView) {
    using T = TypeParam;
    auto buffer = keyed_buffer<T>(2 * 3 * 4);
    kv_view<T, layout_strided> writable(buffer.data(), 2, 3, 4, 12, 4);
    kv_view<const T, layout_strided> readable = writable;
    EXPECT_EQ(readable.data_handle(), writable.data_handle());
    EXPECT_EQ(readable.extents(), writable.extents());
    EXPECT_TRUE(readable.mapping() == writable.mapping());
    writable(1, 2, 3) = make_value<T>(777);
    EXPECT_EQ(key_of(readable(1, 2, 3)), 777u);
    EXPECT_EQ(readable.row(1, 2), writable.row(1, 2));
    // Implicit at a call boundary, as kernels take kv_view<const T, L>.
    EXPECT_EQ((first_key<T, layout_strided>(writable)), 0u);

    const std::int32_t table[] = {1, 0};
    std::vector<T> pool(2 * 2 * 3 * 4, make_value<T>(5));
    kv_view<T, layout_paged> paged(pool.data(), table, 2, 2, 2, 3, 3, 4);
    kv_view<const T, layout_paged> paged_const = paged;
    EXPECT_EQ(paged_const.row(2, 1), paged.row(2, 1));
    EXPECT_EQ((first_key<T, layout_paged>(paged)), 5u);
}

TEST(KvView, ContiguousViewConvertsToStridedView) {
    auto buffer = keyed_buffer<float>(4 * 3 * 2);
    kv_view<float, layout_token_major> token_major(buffer.data(), 4, 3, 2);
    kv_view<const float, layout_strided> from_token_major = token_major;
    EXPECT_EQ(from_token_major.stride(0), 6u);
    EXPECT_EQ(from_token_major.stride(1), 2u);
    EXPECT_EQ(from_token_major.required_span_size(), 24u);
    EXPECT_TRUE(from_token_major.is_exhaustive());

    kv_view<float, layout_head_major> head_major(buffer.data(), 4, 3, 2);
    kv_view<float, layout_strided> from_head_major = head_major;
    EXPECT_EQ(from_head_major.stride(0), 2u);
    EXPECT_EQ(from_head_major.stride(1), 8u);
    for (std::size_t t = 0; t < 4; ++t) {
        for (std::size_t h = 0; h < 3; ++h) {
            EXPECT_EQ(from_token_major.row(t, h), token_major.row(t, h));
            EXPECT_EQ(from_head_major.row(t, h), head_major.row(t, h));
        }
    }
}

TEST(KvView, ConstructsFromDataAndMapping) {
    auto buffer = keyed_buffer<float>(64);
    const layout_strided::mapping<kv_extents> strided(kv_extents(2, 3, 4), 20, 5);
    kv_view<float, layout_strided> a(buffer.data(), strided);
    EXPECT_EQ(&a(1, 2, 3), buffer.data() + 1 * 20 + 2 * 5 + 3);
    EXPECT_EQ(a.mapping(), strided);
    EXPECT_FALSE(a.is_exhaustive());

    const layout_token_major::mapping<kv_extents> packed(kv_extents(2, 3, 4));
    kv_view<float> b(buffer.data(), packed);
    EXPECT_EQ(&b(1, 2, 3), buffer.data() + (1 * 3 + 2) * 4 + 3);
    EXPECT_EQ(b.accessor().access(b.data_handle(), 5), buffer[5]);

    const std::int32_t table[] = {1};
    const layout_paged::mapping<kv_extents> paged(kv_extents(2, 1, 4), table, 1, 2, 2);
    kv_view<float, layout_paged> c(buffer.data(), paged);
    EXPECT_EQ(c.row(1, 0), buffer.data() + 1 * 2 * 4 + 1 * 4);
}

TEST(KvView, DeductionGuidesPickTheLayout) {
    auto buffer = keyed_buffer<float>(64);
    const float* readonly = buffer.data();
    kvc::kv_view a(buffer.data(), 2, 3, 4);
    static_assert(std::is_same_v<decltype(a), kv_view<float, layout_token_major>>);
    kvc::kv_view b(readonly, 2, 3, 4, 12, 4);
    static_assert(std::is_same_v<decltype(b), kv_view<const float, layout_strided>>);
    const std::int32_t table[] = {0, 1};
    kvc::kv_view c(buffer.data(), table, 2, 2, 2, 3, 2, 4);
    static_assert(std::is_same_v<decltype(c), kv_view<float, layout_paged>>);
    kvc::kv_view d(buffer.data(), layout_head_major::mapping<kv_extents>(kv_extents(2, 3, 4)));
    static_assert(std::is_same_v<decltype(d), kv_view<float, layout_head_major>>);
    EXPECT_EQ(a.size(), 24u);
    EXPECT_EQ(b.size(), 24u);
    EXPECT_EQ(c.size(), 24u);
    EXPECT_EQ(d.size(), 24u);
}

// ---- empty views -------------------------------------------------------------

TYPED_TEST(KvViewTyped, EmptyViewsAreValid) {
    using T = TypeParam;
    kv_view<T, layout_token_major> token_major(nullptr, 0, 8, 64);
    kv_view<T, layout_head_major> head_major(nullptr, 0, 8, 64);
    kv_view<T, layout_strided> strided(nullptr, 0, 8, 64, 1024, 64);
    kv_view<T, layout_paged> paged(nullptr, nullptr, 0, 0, 16, 0, 8, 64);
    for (std::size_t size : {token_major.size(), head_major.size(), strided.size(), paged.size()})
        EXPECT_EQ(size, 0u);
    EXPECT_TRUE(token_major.empty());
    EXPECT_EQ(token_major.tokens(), 0u);
    EXPECT_EQ(token_major.heads(), 8u);
    EXPECT_EQ(token_major.dim(), 64u);
    EXPECT_EQ(token_major.required_span_size(), 0u);
    EXPECT_EQ(strided.required_span_size(), 0u);
    EXPECT_EQ(paged.required_span_size(), 0u);

    // Non-null data with zero tokens is fine too, and so is a paged view with a
    // pool but no table while no token is used.
    std::vector<T> pool(2 * 16 * 8 * 64);
    kv_view<T, layout_paged> paged_no_tokens(pool.data(), nullptr, 0, 2, 16, 0, 8, 64);
    EXPECT_TRUE(paged_no_tokens.empty());
    EXPECT_EQ(paged_no_tokens.required_span_size(), pool.size());

    kv_view<T> defaulted;
    EXPECT_EQ(defaulted.size(), 0u);
    EXPECT_EQ(defaulted.data_handle(), nullptr);
    kv_view<const T> defaulted_const = defaulted;
    EXPECT_TRUE(defaulted_const.empty());
}

// ---- construction errors -------------------------------------------------

TEST(KvViewErrors, NullDataWithElements) {
    EXPECT_KV_ERROR((kv_view<float, layout_token_major>(nullptr, 2, 3, 4)), "data", "null");
    EXPECT_KV_ERROR((kv_view<float, layout_head_major>(nullptr, 1, 1, 1)), "data", "null");
    EXPECT_KV_ERROR((kv_view<const kvc::half, layout_strided>(nullptr, 2, 3, 4, 12, 4)), "data", "null");
    const std::int32_t table[] = {0};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(nullptr, table, 1, 1, 4, 3, 2, 4)), "pool", "null");
}

TEST(KvViewErrors, ZeroHeadsOrDim) {
    float buffer[16] = {};
    EXPECT_KV_ERROR((kv_view<float>(buffer, 2, 0, 4)), "heads");
    EXPECT_KV_ERROR((kv_view<float>(buffer, 2, 4, 0)), "dim");
    EXPECT_KV_ERROR((kv_view<float, layout_head_major>(buffer, 0, 0, 4)), "heads");
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer, 2, 2, 0, 4, 1)), "dim");
    const std::int32_t table[] = {0};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(buffer, table, 1, 1, 2, 2, 0, 4)), "heads");
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(buffer, table, 1, 1, 2, 2, 4, 0)), "dim");
}

TYPED_TEST(KvViewTyped, MisalignedDataIsRejected) {
    using T = TypeParam;
    std::vector<T> buffer(64);
    T* misaligned = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(buffer.data()) + 1);
    EXPECT_KV_ERROR((kv_view<T>(misaligned, 2, 2, 4)), "data", "align");
    EXPECT_KV_ERROR((kv_view<const T, layout_strided>(misaligned, 2, 2, 4, 8, 4)), "data", "align");
    const std::int32_t table[] = {0};
    EXPECT_KV_ERROR((kv_view<T, layout_paged>(misaligned, table, 1, 1, 2, 2, 2, 4)), "pool", "align");
}

TEST(KvViewErrors, StridesSmallerThanDim) {
    std::vector<float> buffer(1024);
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 2, 2, 64, 256, 32)), "head_stride 32", "dim 64");
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 2, 2, 64, 63, 256)), "token_stride 63",
                    "dim 64");
}

TEST(KvViewErrors, StridePairsWhoseRowsOverlap) {
    std::vector<float> buffer(1024);
    // Each stride clears dim, but token 1 of head 0 (offset 8) lands inside
    // head 1 of token 0 (offset 6 .. 9).
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 3, 3, 4, 8, 6)), "token_stride 8",
                    "head_stride 6", "overlap");
    // One short of either nesting bound.
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 3, 3, 4, 2 * 6 + 3, 6)), "token_stride",
                    "head_stride");
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 3, 3, 4, 5, 2 * 5 + 3)), "token_stride",
                    "head_stride");
    // A non-nested interleaving is rejected even though it does not overlap
    // (the view accepts nested arrangements only; see layout_strided).
    EXPECT_THROW((kv_view<float, layout_strided>(buffer.data(), 3, 3, 4, 12, 8)), kvc::error);
}

TEST(KvViewErrors, SizeOverflow) {
    std::vector<float> buffer(16);
    const std::size_t huge = std::numeric_limits<std::size_t>::max() / 2;
    EXPECT_KV_ERROR((kv_view<float>(buffer.data(), huge, 4, 4)), "overflow", "tokens");
    EXPECT_KV_ERROR((kv_view<float>(buffer.data(), 0, huge, 4)), "overflow", "heads");
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 3, 1, 4, huge, 0)), "overflow", "token_stride");
    EXPECT_KV_ERROR((kv_view<float, layout_strided>(buffer.data(), 2, 2, 4, huge, 4)), "token_stride",
                    "head_stride");
    // Fits std::ptrdiff_t in elements but not in bytes.
    const std::size_t elements = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) / 2;
    EXPECT_KV_ERROR((kv_view<float>(buffer.data(), elements, 1, 1)), "overflow", "bytes");
    const std::int32_t table[] = {0};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(buffer.data(), table, 1, huge, 2, 2, 2, 4)), "overflow",
                    "pool_blocks");
}

TEST(KvViewErrors, PagedBlockTokensAndTable) {
    std::vector<float> pool(4 * 2 * 2 * 4);
    const std::int32_t table[] = {0, 1, 2, 3};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), table, 4, 4, 0, 5, 2, 4)), "block_tokens");
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), nullptr, 4, 4, 2, 5, 2, 4)), "block_table",
                    "null");
    // 5 tokens in blocks of 2 need 3 table entries.
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), table, 2, 4, 2, 5, 2, 4)), "table_entries 2",
                    "3");
    EXPECT_NO_THROW((kv_view<float, layout_paged>(pool.data(), table, 3, 4, 2, 5, 2, 4)));
    EXPECT_NO_THROW((kv_view<float, layout_paged>(pool.data(), table, 2, 4, 2, 4, 2, 4)));
}

TEST(KvViewErrors, PagedBlockTableEntriesOutOfRange) {
    std::vector<float> pool(3 * 2 * 2 * 4);
    const std::int32_t negative[] = {0, -1, 2};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), negative, 3, 3, 2, 6, 2, 4)), "block_table[1]",
                    "-1");
    const std::int32_t too_large[] = {0, 1, 3};
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), too_large, 3, 3, 2, 6, 2, 4)), "block_table[2]",
                    "pool_blocks = 3");
    // The last used entry is checked even when its block is only partly used.
    EXPECT_KV_ERROR((kv_view<float, layout_paged>(pool.data(), too_large, 3, 3, 2, 5, 2, 4)), "block_table[2]");
    // Entries past the tokens are not used, so not checked.
    EXPECT_NO_THROW((kv_view<float, layout_paged>(pool.data(), too_large, 3, 3, 2, 4, 2, 4)));
    EXPECT_NO_THROW((kv_view<float, layout_paged>(pool.data(), negative, 3, 3, 2, 2, 2, 4)));
}

} // namespace
