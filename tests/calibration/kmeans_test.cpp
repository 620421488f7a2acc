// Tests of kvc/calibration/kmeans.hpp against hand-worked clusterings.
#include "kvc/calibration/kmeans.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "kvc/core/error.hpp"

namespace {

using kvc::calibration::kmeans;
using kvc::calibration::kmeans_options;

std::vector<float> sorted_1d(std::vector<float> c) {
    std::sort(c.begin(), c.end());
    return c;
}

TEST(KMeans, TwoObviousClustersIn1D) {
    const std::vector<float> points = {-0.5f, 0.5f, 0.0f, 9.0f, 11.0f, 10.0f};
    kmeans_options o;
    o.clusters = 2;
    const auto r = kmeans(points.data(), points.size(), 1, o);
    EXPECT_EQ(sorted_1d(r.centroids), (std::vector<float>{0.0f, 10.0f}));
    EXPECT_DOUBLE_EQ(r.inertia, 0.25 + 0.25 + 0.0 + 1.0 + 1.0 + 0.0);
}

TEST(KMeans, WeightsPullTheCentroid) {
    const std::vector<float> points = {0.0f, 1.0f};
    const std::vector<float> weights = {3.0f, 1.0f};
    kmeans_options o;
    o.clusters = 1;
    const auto r = kmeans(points.data(), 2, 1, o, weights.data());
    EXPECT_FLOAT_EQ(r.centroids[0], 0.25f);
    EXPECT_DOUBLE_EQ(r.inertia, 3 * 0.0625 + 0.5625);
}

TEST(KMeans, FourCornersIn2D) {
    std::vector<float> points;
    const float corners[4][2] = {{0, 0}, {0, 8}, {8, 0}, {8, 8}};
    for (const auto& c : corners)
        for (float dx : {-1.0f, 1.0f}) {
            points.push_back(c[0] + dx);
            points.push_back(c[1]);
        }
    kmeans_options o;
    o.clusters = 4;
    o.seed = 7;
    const auto r = kmeans(points.data(), 8, 2, o);
    std::vector<std::pair<float, float>> got;
    for (int c = 0; c < 4; ++c) got.emplace_back(r.centroids[2 * c], r.centroids[2 * c + 1]);
    std::sort(got.begin(), got.end());
    EXPECT_EQ(got, (std::vector<std::pair<float, float>>{{0, 0}, {0, 8}, {8, 0}, {8, 8}}));
    EXPECT_DOUBLE_EQ(r.inertia, 8.0);
}

TEST(KMeans, SameSeedSameCodebookAndInertiaIsExact) {
    std::mt19937 gen(3);
    std::normal_distribution<float> normal;
    std::vector<float> points(500 * 3);
    for (float& x : points) x = normal(gen);
    kmeans_options o;
    o.clusters = 8;
    o.seed = 42;
    const auto a = kmeans(points.data(), 500, 3, o);
    const auto b = kmeans(points.data(), 500, 3, o);
    EXPECT_EQ(a.centroids, b.centroids);
    // The reported inertia is the brute-force nearest-centroid cost.
    double inertia = 0.0;
    for (std::size_t i = 0; i < 500; ++i) {
        double best = 1e300;
        for (std::size_t c = 0; c < 8; ++c) {
            double d = 0.0;
            for (std::size_t j = 0; j < 3; ++j) {
                const double x = double(points[i * 3 + j]) - a.centroids[c * 3 + j];
                d += x * x;
            }
            best = std::min(best, d);
        }
        inertia += best;
    }
    EXPECT_NEAR(a.inertia, inertia, 1e-9 * inertia);
    // More clusters never fit worse (Lloyd from k-means++ on well-spread data).
    o.clusters = 32;
    EXPECT_LT(kmeans(points.data(), 500, 3, o).inertia, a.inertia);
}

TEST(KMeans, FewerPointsThanClustersRepeatsPoints) {
    const std::vector<float> points = {1.0f, 5.0f};
    kmeans_options o;
    o.clusters = 4;
    const auto r = kmeans(points.data(), 2, 1, o);
    ASSERT_EQ(r.centroids.size(), 4u);
    for (float c : r.centroids) EXPECT_TRUE(c == 1.0f || c == 5.0f) << c;
    EXPECT_DOUBLE_EQ(r.inertia, 0.0);
}

TEST(KMeans, BadInputThrows) {
    const std::vector<float> points = {1.0f, std::numeric_limits<float>::quiet_NaN()};
    kmeans_options o;
    o.clusters = 2;
    EXPECT_THROW(kmeans(points.data(), 2, 1, o), kvc::error);
    EXPECT_THROW(kmeans(points.data(), 0, 1, o), kvc::error);
    o.clusters = 0;
    EXPECT_THROW(kmeans(points.data(), 1, 1, o), kvc::error);
    o.clusters = 1;
    const float negative = -1.0f;
    EXPECT_THROW(kmeans(points.data(), 1, 1, o, &negative), kvc::error);
}

} // namespace
