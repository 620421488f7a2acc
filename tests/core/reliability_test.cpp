// Sizes from callers' counts, shapes and failed allocations (issue 19): a
// count whose bytes do not fit std::size_t, a model shape whose products do
// not, and an allocation that fails half-way through a head's growth must
// end in kvc::error or std::bad_alloc with nothing written past any block.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory_resource>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/gear_rows.hpp"
#include "kvc/storage/kivi_rows.hpp"
#include "kvc/storage/kvquant_head.hpp"
#include "kvc/storage/mixed_rows.hpp"
#include "kvc/storage/packed_rows.hpp"
#include "kvc/storage/sparse_rows.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::error_of;

constexpr std::size_t huge = (std::size_t{1} << 62) + 1; // x 4 bytes wraps to 4

// Hands out blocks with a guard zone after each, checked for writes, and can
// refuse the Nth allocation from now on (std::bad_alloc), as an engine's
// arena does when it runs dry in the middle of a head's growth.
class guarded_resource : public std::pmr::memory_resource {
public:
    static constexpr std::size_t guard = 4096;
    static constexpr unsigned char pattern = 0xA5;

    std::size_t allocations = 0;
    std::size_t fail_at = 0; // allocation number that fails (0: none)
    bool overrun = false;    // a guard was found written

    ~guarded_resource() override {
        for (auto& [p, bytes] : live_) std::pmr::new_delete_resource()->deallocate(p, bytes + guard, 64);
    }

    // Whether every live block's guard is untouched.
    bool intact() {
        for (auto& [p, bytes] : live_) check(p, bytes);
        return !overrun;
    }

private:
    void check(void* p, std::size_t bytes) {
        const auto* g = static_cast<const unsigned char*>(p) + bytes;
        for (std::size_t i = 0; i < guard; ++i)
            if (g[i] != pattern) {
                overrun = true;
                return;
            }
    }
    void* do_allocate(std::size_t bytes, std::size_t alignment) override {
        if (++allocations == fail_at) throw std::bad_alloc();
        void* p = std::pmr::new_delete_resource()->allocate(bytes + guard, alignment);
        std::memset(static_cast<unsigned char*>(p) + bytes, pattern, guard);
        live_[p] = bytes;
        return p;
    }
    void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
        check(p, bytes);
        live_.erase(p);
        std::pmr::new_delete_resource()->deallocate(p, bytes + guard, alignment);
    }
    bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

    std::map<void*, std::size_t> live_;
};

std::vector<float> rows(std::size_t count, std::size_t dim, float base) {
    std::vector<float> out(count * dim);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = base + 0.01f * static_cast<float>(i % 97);
    return out;
}

// A 2-bit KVQuant head's calibration: every channel in [-1, 1], one book for keys and values.
struct kvquant_tables {
    std::size_t dim;
    std::vector<float> lower, upper, book{-0.75f, -0.25f, 0.25f, 0.75f};
    explicit kvquant_tables(std::size_t d) : dim(d), lower(d, -1.0f), upper(d, 1.0f) {}
    kvc::kvquant_head_params params() const {
        kvc::kvquant_head_params p;
        p.bits = 2;
        p.dim = dim;
        p.key_lower = lower.data();
        p.key_upper = upper.data();
        p.key_codebook = book.data();
        p.value_codebook = book.data();
        p.max_outliers = 2;
        return p;
    }
};

// Reserves room for `count` tokens and stores them (keys = values), as compressed_cache does.
template <class Head>
void append(Head& head, std::size_t count, std::size_t dim, std::int32_t& position) {
    const std::vector<float> data = rows(count, dim, 0.5f);
    head.reserve_for_append(count);
    const auto& k = kvc::kernels::active();
    for (std::size_t t = 0; t < count; ++t) {
        if constexpr (std::is_same_v<Head, kvc::kvquant_head>)
            head.push_back(k, kvc::dtype::f32, data.data() + t * dim, data.data() + t * dim, position++);
        else
            head.push_back(k, kvc::dtype::f32, data.data() + t * dim, data.data() + t * dim);
    }
}

// For every allocation a large growth makes: let exactly that one fail, then
// append in smaller steps. The head must hold every token appended after the
// failure and write inside its blocks only.
template <class Make>
void fail_each_allocation_of_a_growth(const char* name, std::size_t dim, Make make) {
    for (std::size_t n = 1; n <= 12; ++n) {
        guarded_resource resource;
        auto head = make(&resource);
        std::int32_t position = 0;
        append(head, 5, dim, position);
        resource.fail_at = resource.allocations + n;
        bool failed = false;
        try {
            head.reserve_for_append(75);
        } catch (const std::bad_alloc&) {
            failed = true;
        }
        resource.fail_at = 0;
        for (int step = 0; step < 4; ++step) append(head, 23, dim, position);
        EXPECT_EQ(head.tokens(), 5u + 4u * 23u) << name << ", allocation " << n << " failed";
        EXPECT_TRUE(resource.intact()) << name << ": a write past a block after allocation " << n << " failed";
        if (!failed) break; // the growth needed fewer allocations than n
    }
}

TEST(Reserve, AnAlignedBufferRefusesACountWhoseBytesDoNotFit) {
    kvc::aligned_buffer<std::int32_t> buffer(kvc::default_resource());
    buffer.reserve(8);
    const std::string message = error_of([&] { buffer.reserve(huge); });
    EXPECT_NE(message.find("kvc::aligned_buffer::reserve: expected elements x bytes per element to fit in "
                           "std::size_t, got 4611686018427387905 x 4"),
              std::string::npos)
        << message;
    EXPECT_EQ(buffer.capacity(), 8u); // unchanged
    buffer.resize(3);
    EXPECT_THROW(buffer.reserve_for_append(SIZE_MAX - 1), kvc::error);
    EXPECT_EQ(buffer.capacity(), 8u);
}

TEST(Reserve, DenseRowsRefuseARowCountWhoseBytesDoNotFit) {
    kvc::dense_rows head(kvc::dtype::f16, 64, kvc::default_resource()); // 128-byte rows: x 2^62 wraps
    EXPECT_NE(error_of([&] { head.reserve(huge); }).find("rows x bytes per row"), std::string::npos);
    EXPECT_THROW(head.reserve_for_append(huge), kvc::error);
    EXPECT_EQ(head.bytes(), 0u);
}

// Issue 19, defect 1: reserve(2^62 + 1) recorded that capacity over a 4-byte
// block of positions and the next append wrote past it.
TEST(Reserve, FullCacheRefusesATokenCountWhoseBytesDoNotFit) {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 2;
    c.head_dim = 8;
    kvc::full_cache cache(c);
    const std::vector<float> data = rows(2, 8, 1.0f);
    using view = kvc::kv_view<const float, kvc::layout_token_major>;
    cache.append(0, view(data.data(), 1, 2, 8), view(data.data(), 1, 2, 8), 0);
    const std::size_t bytes = cache.bytes();
    EXPECT_THROW(cache.reserve(huge), kvc::error);
    EXPECT_EQ(cache.bytes(), bytes);
    for (std::int64_t p = 1; p < 40; ++p)
        cache.append(0, view(data.data(), 1, 2, 8), view(data.data(), 1, 2, 8), p);
    EXPECT_EQ(cache.tokens(0), 40u);
}

// Issue 19, defect 7: layers x kv_heads wrapped and the constructor threw std::length_error.
TEST(CacheConfig, ShapesWhoseProductsDoNotFitAreRejected) {
    kvc::cache_config c;
    c.layers = std::size_t{1} << 32;
    c.kv_heads = std::size_t{1} << 32;
    c.query_heads = std::size_t{1} << 32;
    c.head_dim = 64;
    const std::string wrapped = error_of([&] { kvc::detail::validate(c, "test"); });
    EXPECT_NE(wrapped.find("test: expected layers x kv_heads to fit in std::size_t, got 4294967296 x 4294967296"),
              std::string::npos)
        << wrapped;
    c.layers = c.kv_heads = c.query_heads = std::size_t{1} << 20; // fits, but no cache holds 2^40 heads
    EXPECT_NE(error_of([&] { kvc::detail::validate(c, "test"); }).find("layers x kv_heads at most"), std::string::npos);
    c.layers = 1;
    c.kv_heads = 1;
    c.query_heads = std::size_t{1} << 60; // x head_dim wraps
    EXPECT_NE(error_of([&] { kvc::detail::validate(c, "test"); }).find("query_heads at most"), std::string::npos);
    c.query_heads = 1;
    EXPECT_NO_THROW(kvc::detail::validate(c, "test"));
}

TEST(CacheConfig, AFullCacheOfAnAbsurdShapeThrowsKvcError) {
    kvc::cache_config c;
    c.layers = std::size_t{1} << 32;
    c.kv_heads = std::size_t{1} << 32;
    c.query_heads = std::size_t{1} << 32;
    c.head_dim = 64;
    EXPECT_THROW(kvc::full_cache cache(c), kvc::error);
}

// Issue 19, defect 13: after the keys buffer of KIVI's fp16 residual grew and
// the values buffer failed, the residual's room was taken from both buffers'
// bytes together, so the retried append wrote value rows past their block.
TEST(FailedAllocation, AKiviHeadDoesNotWritePastItsResidualAfterAFailedGrowth) {
    kvc::kivi_layout layout;
    layout.group_size = 32;
    layout.residual = 32;
    guarded_resource resource;
    kvc::kivi_rows head(layout, 32, &resource);
    std::int32_t position = 0;
    append(head, 5, 32, position);                          // residual: 5 rows of keys and of values
    resource.fail_at = resource.allocations + 2;            // keys grow to 64 rows, values fail
    EXPECT_THROW(head.reserve_for_append(70), std::bad_alloc);
    resource.fail_at = 0;
    append(head, 23, 32, position); // 28 rows: more than the 5 the values hold
    EXPECT_TRUE(resource.intact());
    EXPECT_EQ(head.tokens(), 28u);
    // The rows are the ones appended (fp16 residual: exact for these values up to fp16 rounding).
    std::vector<float> out(28 * 32);
    head.decode_values(kvc::kernels::active(), 0, 28, out.data());
    const std::vector<float> first = rows(5, 32, 0.5f), later = rows(23, 32, 0.5f);
    for (std::size_t d = 0; d < 32; ++d) {
        EXPECT_NEAR(out[4 * 32 + d], first[4 * 32 + d], 1e-3f);
        EXPECT_NEAR(out[27 * 32 + d], later[22 * 32 + d], 1e-3f);
    }
}

// The same failure at every allocation of a growth, for every storage with more than one buffer.
TEST(FailedAllocation, EveryMultiBufferStorageStaysInsideItsBlocks) {
    const std::size_t dim = 32;
    fail_each_allocation_of_a_growth("dense_rows", dim, [&](kvc::memory_resource* r) {
        return kvc::dense_rows(kvc::dtype::f16, dim, r);
    });
    fail_each_allocation_of_a_growth("packed_rows", dim, [&](kvc::memory_resource* r) {
        kvc::packed_layout l;
        l.key_format = kvc::kernels::quant_format::int4_sym;
        l.value_format = kvc::kernels::quant_format::int8_sym;
        l.sink_tokens = 2;
        return kvc::packed_rows(l, dim, r);
    });
    fail_each_allocation_of_a_growth("kivi_rows", dim, [&](kvc::memory_resource* r) {
        kvc::kivi_layout l;
        l.residual = 32;
        l.sink_tokens = 2;
        return kvc::kivi_rows(l, dim, r);
    });
    fail_each_allocation_of_a_growth("gear_rows", dim, [&](kvc::memory_resource* r) {
        kvc::gear_layout l;
        l.chunk_tokens = 16;
        return kvc::gear_rows(l, dim, r);
    });
    fail_each_allocation_of_a_growth("mixed_rows", dim, [&](kvc::memory_resource* r) {
        return kvc::mixed_rows(kvc::kernels::quant_format::int8_sym, kvc::kernels::quant_format::int2_asym, 32, dim,
                               0.5, r);
    });
    fail_each_allocation_of_a_growth("sparse_rows", dim,
                                     [&](kvc::memory_resource* r) { return kvc::sparse_rows(dim, 8, 16, r); });
    const kvquant_tables tables(dim);
    fail_each_allocation_of_a_growth("kvquant_head", dim, [&](kvc::memory_resource* r) {
        kvc::kvquant_head_params p = tables.params();
        p.sink_tokens = 2;
        return kvc::kvquant_head(p, r);
    });
}

// Issue 19, defect 6: attention over a GEAR head holding no chunk yet computed
// the value factors as nullptr + rank * dim (undefined behaviour).
TEST(NullOffsets, AGearHeadWithoutChunksPassesNoPointerOffsetFromNull) {
    static const void* value_factors = reinterpret_cast<const void*>(1);
    static bool called = false;
    kvc::kernels::kernel_table k = kvc::kernels::active();
    k.gear.attend_partial = [](const kvc::kernels::gear_decode_problem& p, const kvc::kernels::decode_state&) noexcept {
        value_factors = p.value_factors;
        called = true;
    };
    kvc::gear_layout layout; // rank 2
    kvc::gear_rows head(layout, 32, kvc::default_resource());
    std::int32_t position = 0;
    append(head, 3, 32, position); // fp16 segment only: no chunk, no factors
    ASSERT_EQ(head.chunks(), 0u);
    head.attend(k, kvc::kernels::decode_problem{}, kvc::kernels::decode_state{});
    ASSERT_TRUE(called);
    EXPECT_EQ(value_factors, nullptr);
}

// Issue 19, defect 16 at the storage level: a KVQuant head built from its
// parameters checks the sink count and RoPE's theta as the codec does.
TEST(KVQuantHead, SinkCountAndRopeAreValidated) {
    const kvquant_tables tables(8);
    kvc::kvquant_head_params p = tables.params();
    p.sink_tokens = std::size_t{1} << 40;
    EXPECT_NE(error_of([&] { kvc::kvquant_head head(p, kvc::default_resource()); }).find("sink tokens"),
              std::string::npos);
    p.sink_tokens = 1;
    p.rope.theta = -1.0;
    EXPECT_NE(error_of([&] { kvc::kvquant_head head(p, kvc::default_resource()); }).find("theta"), std::string::npos);
    p.rope.theta = 10000.0;
    EXPECT_NO_THROW(kvc::kvquant_head head(p, kvc::default_resource()));
}

} // namespace
