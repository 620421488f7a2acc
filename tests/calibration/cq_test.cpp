// Tests of kvc/calibration/cq.hpp: codebooks of channel-coupled vector
// quantization learnt per (layer, KV head, channel group), the "cq" artifact
// (names, shapes, round trip through the versioned CRC file, corrupt and
// truncated files rejected), determinism for a seed, and bad input.
#include "kvc/calibration/cq.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cache/cache_test_util.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/float16.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

namespace cal = kvc::calibration;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;

cal::cq_options options(std::size_t c, std::size_t bits, std::uint64_t seed = 0) {
    cal::cq_options o;
    o.channels_per_group = c;
    o.bits = bits;
    o.seed = seed;
    o.iterations = 20;
    return o;
}

// Hand-worked: 1 head, dim 4, c = 2, b = 1. Group 0 of every key is one of
// (0, 0) and (10, 10), group 1 one of (-1, 5) and (3, 3), so the two
// centroids of each group are exactly those points; values likewise.
TEST(CalibrateCq, TwoClustersPerGroupAreFoundExactly) {
    std::vector<float> keys, values;
    for (int t = 0; t < 12; ++t) {
        const bool a = t % 3 == 0, b = t % 2 == 0;
        keys.insert(keys.end(), {a ? 0.0f : 10.0f, a ? 0.0f : 10.0f, b ? -1.0f : 3.0f, b ? 5.0f : 3.0f});
        values.insert(values.end(), {b ? 1.0f : 2.0f, b ? 1.0f : 2.0f, a ? 7.0f : -7.0f, 0.5f});
    }
    const auto a = cal::calibrate_cq(token_major(keys.data(), 12, 1, 4), token_major(values.data(), 12, 1, 4),
                                     options(2, 1));
    EXPECT_EQ(a.kind, "cq");
    EXPECT_EQ(a.get("channels_per_group", {1}).values[0], 2.0f);
    EXPECT_EQ(a.get("bits", {1}).values[0], 1.0f);
    const auto& k = a.get("key_codebooks", {1, 1, 2, 2, 2}).values;
    const auto& v = a.get("value_codebooks", {1, 1, 2, 2, 2}).values;
    // Centroids in either order: compare as sorted pairs per group.
    auto pairs = [](const std::vector<float>& book, std::size_t g) {
        std::vector<std::vector<float>> p = {{book[g * 4 + 0], book[g * 4 + 1]}, {book[g * 4 + 2], book[g * 4 + 3]}};
        std::sort(p.begin(), p.end());
        return p;
    };
    EXPECT_EQ(pairs(k, 0), (std::vector<std::vector<float>>{{0, 0}, {10, 10}}));
    EXPECT_EQ(pairs(k, 1), (std::vector<std::vector<float>>{{-1, 5}, {3, 3}}));
    EXPECT_EQ(pairs(v, 0), (std::vector<std::vector<float>>{{1, 1}, {2, 2}}));
    EXPECT_EQ(pairs(v, 1), (std::vector<std::vector<float>>{{-7, 0.5f}, {7, 0.5f}}));
}

// Each (layer, head) gets codebooks learnt from its own rows: heads with
// data far apart get centroids in their own range.
TEST(CalibrateCq, EveryLayerAndHeadHasItsOwnCodebooks) {
    const std::size_t tokens = 64, heads = 3, dim = 8;
    std::vector<std::vector<float>> data;
    std::vector<token_major> keys, values;
    for (std::size_t l = 0; l < 2; ++l) {
        auto x = random_floats(tokens * heads * dim, static_cast<std::uint32_t>(l + 1), 0.1f);
        for (std::size_t t = 0; t < tokens; ++t)
            for (std::size_t h = 0; h < heads; ++h)
                for (std::size_t d = 0; d < dim; ++d) x[(t * heads + h) * dim + d] += 100.0f * l + 10.0f * h;
        data.push_back(std::move(x));
    }
    for (const auto& x : data) {
        keys.emplace_back(x.data(), tokens, heads, dim);
        values.emplace_back(x.data(), tokens, heads, dim);
    }
    const auto a = cal::calibrate_cq(keys, values, options(4, 3));
    const auto& books = a.get("key_codebooks", {2, heads, 2, 8, 4}).values;
    for (std::size_t l = 0; l < 2; ++l)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t i = 0; i < 2 * 8 * 4; ++i)
                EXPECT_NEAR(books[(l * heads + h) * 64 + i], 100.0f * l + 10.0f * h, 0.5f);
}

TEST(CalibrateCq, DeterministicForASeedAndHalfInputWorks) {
    const std::size_t tokens = 200, heads = 2, dim = 16;
    const auto k = random_floats(tokens * heads * dim, 5), v = random_floats(tokens * heads * dim, 6);
    const token_major kv(k.data(), tokens, heads, dim), vv(v.data(), tokens, heads, dim);
    const auto first = cal::serialize(cal::calibrate_cq(kv, vv, options(4, 4, 7)));
    const auto again = cal::serialize(cal::calibrate_cq(kv, vv, options(4, 4, 7)));
    const auto other = cal::serialize(cal::calibrate_cq(kv, vv, options(4, 4, 8)));
    EXPECT_EQ(first, again);
    EXPECT_NE(first, other);
    // fp16 samples are widened exactly: the same artifact as their fp32 values.
    std::vector<kvc::half> kh(k.size()), vh(v.size());
    std::vector<float> kr(k.size()), vr(v.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
        kh[i] = kvc::to_half(k[i]);
        vh[i] = kvc::to_half(v[i]);
        kr[i] = kvc::to_float(kh[i]);
        vr[i] = kvc::to_float(vh[i]);
    }
    EXPECT_EQ(cal::serialize(cal::calibrate_cq(kvc::kv_view<const kvc::half>(kh.data(), tokens, heads, dim),
                                               kvc::kv_view<const kvc::half>(vh.data(), tokens, heads, dim),
                                               options(4, 4, 7))),
              cal::serialize(cal::calibrate_cq(token_major(kr.data(), tokens, heads, dim),
                                               token_major(vr.data(), tokens, heads, dim), options(4, 4, 7))));
}

TEST(CalibrateCq, ArtifactRoundTripsAndCorruptOrTruncatedFilesAreRejected) {
    const std::size_t tokens = 100, heads = 2, dim = 16;
    const auto k = random_floats(tokens * heads * dim, 8), v = random_floats(tokens * heads * dim, 9);
    const auto a = cal::calibrate_cq(token_major(k.data(), tokens, heads, dim), token_major(v.data(), tokens, heads, dim),
                                     options(8, 5));
    const std::string path = ::testing::TempDir() + "kvc_cq_artifact.bin";
    cal::save(a, path);
    const auto loaded = cal::load(path);
    EXPECT_EQ(cal::serialize(loaded), cal::serialize(a));
    const kvc::quant::cq codec(loaded);
    EXPECT_EQ(codec.layers(), 1u);
    EXPECT_EQ(codec.kv_heads(), heads);
    EXPECT_EQ(codec.head_dim(), dim);
    EXPECT_EQ(codec.channels_per_group(), 8u);
    EXPECT_EQ(codec.bits(), 5u);
    auto bytes = cal::serialize(a);
    auto flipped = bytes;
    flipped[bytes.size() / 2] ^= 0x10; // a centroid bit
    EXPECT_THROW(cal::deserialize(flipped.data(), flipped.size()), kvc::error);
    for (std::size_t cut : {bytes.size() - 1, bytes.size() / 2, std::size_t{20}, std::size_t{3}})
        EXPECT_THROW(cal::deserialize(bytes.data(), cut), kvc::error) << cut;
    // A truncated file on disk.
    {
        std::FILE* f = std::fopen(path.c_str(), "wb");
        ASSERT_NE(f, nullptr);
        std::fwrite(bytes.data(), 1, bytes.size() - 7, f);
        std::fclose(f);
    }
    EXPECT_THROW(cal::load(path), kvc::error);
    std::remove(path.c_str());
}

TEST(CalibrateCq, BadInputThrowsKvcError) {
    const auto x = random_floats(10 * 2 * 12, 10);
    const token_major view(x.data(), 10, 2, 12);
    auto message = [&](auto&& f) -> std::string {
        try {
            f();
        } catch (const kvc::error& e) {
            return e.what();
        }
        return "(no kvc::error)";
    };
    EXPECT_NE(message([&] { cal::calibrate_cq(view, view, options(8, 4)); }).find("head_dim a multiple of 8"),
              std::string::npos);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, view, options(3, 4)); }).find("1, 2, 4 or 8"), std::string::npos);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, view, options(4, 0)); }).find("1..8 bits"), std::string::npos);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, view, options(4, 9)); }).find("1..8 bits"), std::string::npos);
    const token_major fewer(x.data(), 5, 2, 12), other_heads(x.data(), 10, 1, 12), empty(x.data(), 0, 2, 12);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, fewer, options(4, 2)); }).find("10 keys and 5 values"),
              std::string::npos);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, other_heads, options(4, 2)); }).find("2 heads x 12 dims"),
              std::string::npos);
    EXPECT_NE(message([&] { cal::calibrate_cq(empty, empty, options(4, 2)); }).find("(>= 1)"), std::string::npos);
    auto bad = x;
    bad[3 * 24 + 12 + 7] = std::nanf(""); // token 3, head 1, channel 7
    const token_major with_nan(bad.data(), 10, 2, 12);
    EXPECT_NE(message([&] { cal::calibrate_cq(view, with_nan, options(4, 2)); }).find("value of layer 0 token 3 head 1 channel 7"),
              std::string::npos);
    const std::vector<token_major> one = {view}, none;
    EXPECT_NE(message([&] { cal::calibrate_cq(one, none, options(4, 2)); }).find("got 1 and 0"), std::string::npos);
}

} // namespace
