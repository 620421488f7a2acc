// kvc/calibration/query_filters.hpp -- E10 Q-Filters: one query direction per KV head.
//
// Source: Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV
// Cache Compression" (2025). Queries of a head concentrate around one
// direction; its dominant singular vector f_h estimates which keys will draw
// attention without any attention pass. Computed here as the top eigenvector
// of the uncentred second moment Q^T Q of the sample queries of the head's
// GQA group (the right singular vector of Q, via Eigen's self-adjoint
// solver on a dim x dim matrix), oriented so that the mean query projects
// positively. Deterministic: no random start.
#pragma once

#include <cstdint>
#include <vector>

#include <Eigen/Dense>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"

namespace kvc::calibration {

// queries: per layer, sample queries [samples][query_heads][head_dim] (e.g. a
// forward pass over calibration text). Returns the artifact "qfilter" with
// tensor "filters" of shape [layers][kv_heads][head_dim].
template <class QueryView>
artifact query_filters(const cache_config& config, const std::vector<QueryView>& queries) {
    kvc::detail::require(queries.size() == config.layers, "calibration::query_filters: expected one query view per "
                                                          "layer (", config.layers, "), got ", queries.size());
    const std::size_t dim = config.head_dim, group = config.group();
    tensor filters{"filters", {config.layers, config.kv_heads, dim}, {}};
    filters.values.reserve(config.layers * config.kv_heads * dim);
    for (std::size_t l = 0; l < config.layers; ++l) {
        const QueryView& q = queries[l];
        kvc::detail::require(q.heads() == config.query_heads && q.dim() == dim && q.tokens() > 0,
                             "calibration::query_filters: layer ", l, " queries must be [samples >= 1][",
                             config.query_heads, "][", dim, "], got [", q.tokens(), "][", q.heads(), "][", q.dim(), "]");
        for (std::size_t h = 0; h < config.kv_heads; ++h) {
            Eigen::MatrixXd moment = Eigen::MatrixXd::Zero(static_cast<Eigen::Index>(dim), static_cast<Eigen::Index>(dim));
            Eigen::VectorXd mean = Eigen::VectorXd::Zero(static_cast<Eigen::Index>(dim));
            for (std::size_t s = 0; s < q.tokens(); ++s)
                for (std::size_t g = 0; g < group; ++g) {
                    Eigen::VectorXd row(static_cast<Eigen::Index>(dim));
                    for (std::size_t d = 0; d < dim; ++d) row[static_cast<Eigen::Index>(d)] = static_cast<double>(q(s, h * group + g, d));
                    moment.noalias() += row * row.transpose();
                    mean += row;
                }
            Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(moment);
            Eigen::VectorXd direction = solver.eigenvectors().col(static_cast<Eigen::Index>(dim) - 1);
            if (direction.dot(mean) < 0.0) direction = -direction;
            for (std::size_t d = 0; d < dim; ++d) filters.values.push_back(static_cast<float>(direction[static_cast<Eigen::Index>(d)]));
        }
    }
    artifact out;
    out.kind = "qfilter";
    out.tensors.push_back(std::move(filters));
    return out;
}

} // namespace kvc::calibration
