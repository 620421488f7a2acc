// kvc/calibration/kmeans.hpp -- deterministic weighted k-means, the codebook builder of calibration.
//
// Non-uniform scalar codebooks (KVQuant, Q3: one dimension per channel) and
// channel-coupled vector codebooks (CQ, Q8: a few coupled channels) are both
// k-means over sample points; this is the one implementation they share.
//
// Choices: k-means++ seeding, then Lloyd iterations until no assignment
// changes or `iterations` passes. Randomness comes only from `seed` through
// kvc's own generator (splitmix64), and sums are in double in a fixed order,
// so a given input and seed produce the same codebook on every machine and
// instruction set. A cluster that loses all its points is re-seeded with the
// point currently worst served (largest weighted distance), the usual fix that
// keeps every codeword in use. Fewer distinct points than clusters is allowed:
// the surplus centroids repeat points (a codebook may hold duplicates).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/core/random.hpp"

namespace kvc::calibration {

// splitmix64 lives in core/random.hpp (the Hadamard sign table uses it too).
using kvc::splitmix64;

struct kmeans_options {
    std::size_t clusters = 16;
    std::size_t iterations = 50; // Lloyd passes at most
    std::uint64_t seed = 0;
};

struct kmeans_result {
    std::vector<float> centroids; // [clusters][dim], row-major
    double inertia = 0.0;         // sum of weight * squared distance to the nearest centroid
    std::size_t iterations = 0;   // Lloyd passes run
};

namespace detail {
inline double squared_distance(const float* a, const float* b, std::size_t dim) noexcept {
    double d = 0.0;
    for (std::size_t i = 0; i < dim; ++i) {
        const double x = static_cast<double>(a[i]) - static_cast<double>(b[i]);
        d += x * x;
    }
    return d;
}
} // namespace detail

// Index of the centroid nearest to `point` (ties: the lowest index).
inline std::size_t nearest_centroid(const float* point, const float* centroids, std::size_t clusters,
                                    std::size_t dim) noexcept {
    std::size_t best = 0;
    double best_distance = std::numeric_limits<double>::infinity();
    for (std::size_t c = 0; c < clusters; ++c) {
        const double d = detail::squared_distance(point, centroids + c * dim, dim);
        if (d < best_distance) {
            best_distance = d;
            best = c;
        }
    }
    return best;
}

// k-means of `count` points of `dim` floats ([count][dim], row-major), each
// with weight `weights[i]` (nullptr: all 1). Throws kvc::error for an empty
// input, zero clusters, a negative or non-finite weight, or a non-finite point.
inline kmeans_result kmeans(const float* points, std::size_t count, std::size_t dim, const kmeans_options& options,
                            const float* weights = nullptr) {
    kvc::detail::require(points != nullptr && count > 0 && dim > 0, "kvc::calibration::kmeans: expected at least one ",
                         "point of at least one dimension, got ", count, " points of ", dim);
    kvc::detail::require(options.clusters > 0, "kvc::calibration::kmeans: expected clusters >= 1, got 0");
    for (std::size_t i = 0; i < count * dim; ++i)
        kvc::detail::require(std::isfinite(points[i]), "kvc::calibration::kmeans: expected finite points; element ",
                             i, " is ", points[i]);
    if (weights)
        for (std::size_t i = 0; i < count; ++i)
            kvc::detail::require(std::isfinite(weights[i]) && weights[i] >= 0.0f,
                                 "kvc::calibration::kmeans: expected finite non-negative weights; weight ", i, " is ",
                                 weights[i]);
    const std::size_t k = options.clusters;
    auto weight = [&](std::size_t i) { return weights ? static_cast<double>(weights[i]) : 1.0; };

    kmeans_result result;
    result.centroids.assign(k * dim, 0.0f);
    float* centroids = result.centroids.data();
    splitmix64 random(options.seed);

    // k-means++: the first centroid uniformly by weight, each next one with
    // probability proportional to weight * squared distance to the nearest so far.
    std::vector<double> nearest(count, std::numeric_limits<double>::infinity());
    auto pick = [&](const std::vector<double>& mass) -> std::size_t {
        double total = 0.0;
        for (double m : mass) total += m;
        if (!(total > 0.0)) return count; // nothing left to cover
        const double target = random.uniform() * total;
        double running = 0.0;
        for (std::size_t i = 0; i < count; ++i) {
            running += mass[i];
            if (running > target && mass[i] > 0.0) return i;
        }
        for (std::size_t i = count; i-- > 0;)
            if (mass[i] > 0.0) return i;
        return count;
    };
    std::vector<double> mass(count);
    for (std::size_t i = 0; i < count; ++i) mass[i] = weight(i);
    std::size_t first = pick(mass);
    if (first == count) first = 0; // all weights zero: any point will do
    for (std::size_t d = 0; d < dim; ++d) centroids[d] = points[first * dim + d];
    std::size_t seeded = 1;
    for (; seeded < k; ++seeded) {
        const float* last = centroids + (seeded - 1) * dim;
        for (std::size_t i = 0; i < count; ++i) {
            const double d = detail::squared_distance(points + i * dim, last, dim);
            if (d < nearest[i]) nearest[i] = d;
            mass[i] = weight(i) * nearest[i];
        }
        const std::size_t next = pick(mass);
        if (next == count) break; // every point is already a centroid
        for (std::size_t d = 0; d < dim; ++d) centroids[seeded * dim + d] = points[next * dim + d];
    }
    for (std::size_t c = seeded; c < k; ++c) // fewer distinct points than clusters
        for (std::size_t d = 0; d < dim; ++d) centroids[c * dim + d] = centroids[(c % seeded) * dim + d];

    // Lloyd.
    std::vector<std::size_t> assignment(count, k);
    std::vector<double> sums(k * dim), totals(k);
    for (std::size_t pass = 0; pass < options.iterations; ++pass) {
        bool changed = false;
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t c = nearest_centroid(points + i * dim, centroids, k, dim);
            changed = changed || c != assignment[i];
            assignment[i] = c;
        }
        result.iterations = pass + 1;
        if (!changed) break;
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(totals.begin(), totals.end(), 0.0);
        for (std::size_t i = 0; i < count; ++i) {
            const double w = weight(i);
            totals[assignment[i]] += w;
            for (std::size_t d = 0; d < dim; ++d) sums[assignment[i] * dim + d] += w * points[i * dim + d];
        }
        for (std::size_t c = 0; c < k; ++c) {
            if (totals[c] > 0.0) {
                for (std::size_t d = 0; d < dim; ++d)
                    centroids[c * dim + d] = static_cast<float>(sums[c * dim + d] / totals[c]);
                continue;
            }
            // Empty: move it to the point currently served worst.
            std::size_t worst = 0;
            double worst_cost = -1.0;
            for (std::size_t i = 0; i < count; ++i) {
                const double cost =
                    weight(i) * detail::squared_distance(points + i * dim, centroids + assignment[i] * dim, dim);
                if (cost > worst_cost) {
                    worst_cost = cost;
                    worst = i;
                }
            }
            if (worst_cost > 0.0) {
                for (std::size_t d = 0; d < dim; ++d) centroids[c * dim + d] = points[worst * dim + d];
                assignment[worst] = c;
            }
        }
    }
    result.inertia = 0.0;
    for (std::size_t i = 0; i < count; ++i) {
        const std::size_t c = nearest_centroid(points + i * dim, centroids, k, dim);
        result.inertia += weight(i) * detail::squared_distance(points + i * dim, centroids + c * dim, dim);
    }
    return result;
}

} // namespace kvc::calibration
