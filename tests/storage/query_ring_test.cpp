// query_ring: the newest `window` query rows, stored in the cache's element
// type, read back widened. Hand-worked: which rows survive, in which order,
// which slice of each row; values as fp16 rounds them; bytes as laid out.
#include <gtest/gtest.h>

#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/query_ring.hpp"

namespace {

// Row r of a test stream: [r + 0.1, r + 0.2, ..., r + 0.6] (6 floats).
std::vector<float> rows(std::size_t first, std::size_t count) {
    std::vector<float> out;
    for (std::size_t r = first; r < first + count; ++r)
        for (int d = 1; d <= 6; ++d) out.push_back(static_cast<float>(r) + 0.1f * static_cast<float>(d));
    return out;
}

TEST(QueryRing, KeepsTheNewestRowsOldestFirst) {
    kvc_test::counting_resource counting;
    kvc::query_ring ring(&counting);
    const auto& k = kvc::kernels::active();
    const auto first = rows(0, 2), more = rows(2, 3);
    ring.push(k, kvc::dtype::f32, 3, 6, first.data(), 2);
    ring.push(k, kvc::dtype::f32, 3, 6, more.data(), 3); // rows 0..4 seen; 2, 3, 4 remain
    EXPECT_EQ(ring.count(), 3u);
    EXPECT_EQ(ring.bytes(), 3u * 6 * sizeof(float));
    EXPECT_EQ(counting.in_use, ring.bytes());
    std::vector<float> out;
    ASSERT_EQ(ring.gather(k, 10, 0, 6, out), 3u);
    EXPECT_EQ(out, rows(2, 3));
    // The newest two, columns 2..4 of each.
    ASSERT_EQ(ring.gather(k, 2, 2, 3, out), 2u);
    const std::vector<float> expected = {3.3f, 3.4f, 3.5f, 4.3f, 4.4f, 4.5f};
    EXPECT_EQ(out, expected);
    // A push longer than the window keeps only its own newest rows.
    const auto burst = rows(10, 5);
    ring.push(k, kvc::dtype::f32, 3, 6, burst.data(), 5);
    ASSERT_EQ(ring.gather(k, 3, 0, 6, out), 3u);
    EXPECT_EQ(out, rows(12, 3));
    ring.release();
    EXPECT_EQ(ring.count(), 0u);
    EXPECT_EQ(counting.in_use, 0u);
}

TEST(QueryRing, StoresInTheCachesElementType) {
    for (const kvc::dtype type : {kvc::dtype::f16, kvc::dtype::bf16}) {
        kvc::query_ring ring(nullptr);
        const auto& k = kvc::kernels::active();
        const auto in = rows(7, 2);
        ring.push(k, type, 4, 6, in.data(), 2);
        EXPECT_EQ(ring.bytes(), 4u * 6 * 2) << "two bytes per element";
        std::vector<float> out;
        ASSERT_EQ(ring.gather(k, 4, 0, 6, out), 2u);
        for (std::size_t i = 0; i < in.size(); ++i)
            EXPECT_EQ(out[i], static_cast<float>(kvc_test::stored_value(in[i], type))) << i;
    }
}

} // namespace
