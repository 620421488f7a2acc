// calibration::calibrate_kvquant: tensor names and shapes, hand-checked
// quantile ranges, codebooks recovered from data with few distinct levels,
// determinism for a seed, the artifact file round trip, corrupt and
// truncated files, bad options and inputs.
#include <gtest/gtest.h>

#include <cstddef>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using view = kvc::kv_view<const float>;
namespace cal = kvc::calibration;

kvc::cache_config shape(std::size_t layers, std::size_t heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = heads;
    c.query_heads = heads;
    c.head_dim = dim;
    return c;
}

using kvc_test::error_of;

struct sample {
    std::vector<float> keys, values;
    std::vector<view> key_views, value_views;
};

sample random_sample(const kvc::cache_config& c, std::size_t tokens, std::uint32_t seed) {
    sample s;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const std::size_t n = tokens * c.kv_heads * c.head_dim;
    s.keys.resize(c.layers * n);
    s.values.resize(c.layers * n);
    for (float& x : s.keys) x = normal(rng);
    for (float& x : s.values) x = normal(rng);
    for (std::size_t l = 0; l < c.layers; ++l) {
        s.key_views.emplace_back(s.keys.data() + l * n, tokens, c.kv_heads, c.head_dim);
        s.value_views.emplace_back(s.values.data() + l * n, tokens, c.kv_heads, c.head_dim);
    }
    return s;
}

TEST(CalibrateKVQuant, TensorsQuantilesAndCodebooks) {
    // One layer, one head, 8 channels; 101 tokens. Channel c's keys are the
    // integers 0..100 (shuffled) times (c + 1): the 1% / 99% quantiles of
    // 0..100 by linear interpolation are exactly 1 and 99.
    const kvc::cache_config c = shape(1, 1, 8);
    const std::size_t tokens = 101;
    std::vector<float> keys(tokens * 8), values(tokens * 8);
    std::mt19937 rng(3);
    std::vector<int> order(tokens);
    for (std::size_t t = 0; t < tokens; ++t) order[t] = static_cast<int>(t);
    std::shuffle(order.begin(), order.end(), rng);
    // Values: every row is {-1, -1/3, 1/3, 1} repeated: normalised levels are exactly those four.
    const float levels[4] = {-1.0f, -1.0f / 3.0f, 1.0f / 3.0f, 1.0f};
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t ch = 0; ch < 8; ++ch) {
            keys[t * 8 + ch] = static_cast<float>(order[t]) * static_cast<float>(ch + 1);
            values[t * 8 + ch] = levels[(ch + t) % 4];
        }
    cal::kvquant_options o;
    o.bits = 2;
    o.outlier_fraction = 0.02;
    const cal::artifact a = cal::calibrate_kvquant(c, std::vector<view>{view(keys.data(), tokens, 1, 8)},
                                                   std::vector<view>{view(values.data(), tokens, 1, 8)}, o);
    EXPECT_EQ(a.kind, "kvquant");
    EXPECT_EQ(a.get("bits", {1}).values[0], 2.0f);
    EXPECT_FLOAT_EQ(a.get("outlier_fraction", {1}).values[0], 0.02f);
    const auto& lower = a.get("key_lower", {1, 1, 8}).values;
    const auto& upper = a.get("key_upper", {1, 1, 8}).values;
    for (std::size_t ch = 0; ch < 8; ++ch) {
        EXPECT_FLOAT_EQ(lower[ch], 1.0f * static_cast<float>(ch + 1)) << ch;
        EXPECT_FLOAT_EQ(upper[ch], 99.0f * static_cast<float>(ch + 1)) << ch;
    }
    // Value codebook: k-means with 4 clusters on 4 distinct levels finds them.
    const auto& vb = a.get("value_codebook", {1, 4}).values;
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(vb[static_cast<std::size_t>(i)], levels[i], 1e-6f) << i;
    // Key codebook: the normalised in-range keys are (x - 50) / 49 for
    // x = 1..99 (every channel alike). Lloyd's fixed point: each ascending
    // centroid is the mean of the points nearest to it.
    const auto& kb = a.get("key_codebook", {1, 4}).values;
    for (int i = 0; i + 1 < 4; ++i) EXPECT_LT(kb[static_cast<std::size_t>(i)], kb[static_cast<std::size_t>(i) + 1]);
    // A point equidistant from two centroids may belong to either (k-means
    // breaks ties by its internal order): every such assignment is allowed.
    for (std::size_t j = 0; j < 4; ++j) {
        double sum = 0.0;
        int count = 0;
        std::vector<double> ties;
        for (int x = 1; x <= 99; ++x) {
            const double n = (x - 50) / 49.0;
            double best = INFINITY;
            for (std::size_t m = 0; m < 4; ++m) best = std::min(best, std::fabs(n - kb[m]));
            const double mine = std::fabs(n - kb[j]);
            if (mine > best + 1e-6) continue;
            bool tied = false;
            for (std::size_t m = 0; m < 4; ++m) tied = tied || (m != j && std::fabs(std::fabs(n - kb[m]) - mine) <= 1e-6);
            if (tied) ties.push_back(n);
            else sum += n, ++count;
        }
        ASSERT_LE(ties.size(), 2u) << j;
        bool matches = false;
        for (unsigned subset = 0; subset < (1u << ties.size()); ++subset) {
            double s2 = sum;
            int c2 = count;
            for (std::size_t i = 0; i < ties.size(); ++i)
                if (subset & (1u << i)) s2 += ties[i], ++c2;
            matches = matches || (c2 > 0 && std::fabs(kb[j] - s2 / c2) <= 1e-5);
        }
        EXPECT_TRUE(matches) << "centroid " << j << " = " << kb[j] << " is not the mean of its cell";
    }
    // The codec accepts it.
    EXPECT_NO_THROW(kvc::quant::kvquant q(a));
}

TEST(CalibrateKVQuant, DeterministicForASeedAndFileRoundTrip) {
    const kvc::cache_config c = shape(2, 2, 16);
    const sample s = random_sample(c, 300, 9);
    cal::kvquant_options o;
    o.bits = 3;
    o.seed = 17;
    o.max_kmeans_points = 1000; // exercises the subsampling
    const auto first = cal::serialize(cal::calibrate_kvquant(c, s.key_views, s.value_views, o));
    const auto second = cal::serialize(cal::calibrate_kvquant(c, s.key_views, s.value_views, o));
    EXPECT_EQ(first, second);
    const std::string path = ::testing::TempDir() + "kvquant_artifact.bin";
    const cal::artifact a = cal::calibrate_kvquant(c, s.key_views, s.value_views, o);
    cal::save(a, path);
    const cal::artifact loaded = cal::load(path);
    EXPECT_EQ(cal::serialize(loaded), first);
    // Corrupt one byte of tensor data, then truncate: both are kvc::error.
    std::vector<unsigned char> bytes = first;
    bytes[bytes.size() / 2] ^= 0x40;
    EXPECT_NE(error_of([&] { cal::deserialize(bytes.data(), bytes.size()); }).find("checksum"), std::string::npos);
    EXPECT_NE(error_of([&] { cal::deserialize(first.data(), first.size() - 9); }), "(no kvc::error)");
    std::remove(path.c_str());
}

TEST(CalibrateKVQuant, BadOptionsAndInputs) {
    const kvc::cache_config c = shape(1, 1, 8);
    const sample s = random_sample(c, 10, 1);
    cal::kvquant_options o;
    o.bits = 5;
    EXPECT_NE(error_of([&] { cal::calibrate_kvquant(c, s.key_views, s.value_views, o); }).find("bits"),
              std::string::npos);
    o.bits = 3;
    o.outlier_fraction = 0.6;
    EXPECT_NE(error_of([&] { cal::calibrate_kvquant(c, s.key_views, s.value_views, o); }).find("outlier_fraction"),
              std::string::npos);
    o.outlier_fraction = 0.01;
    EXPECT_NE(error_of([&] { cal::calibrate_kvquant(shape(2, 1, 8), s.key_views, s.value_views, o); })
                  .find("one key and one value view per layer"),
              std::string::npos);
    EXPECT_NE(error_of([&] { cal::calibrate_kvquant(shape(1, 1, 16), s.key_views, s.value_views, o); }).find("layer 0"),
              std::string::npos);
    std::vector<float> bad = s.keys;
    bad[3] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_NE(error_of([&] {
                  cal::calibrate_kvquant(c, std::vector<view>{view(bad.data(), 10, 1, 8)}, s.value_views, o);
              }).find("not finite"),
              std::string::npos);
}

} // namespace
