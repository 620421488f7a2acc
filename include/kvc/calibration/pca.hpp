// kvc/calibration/pca.hpp -- principal bases of keys and values for P1 PCA
// projection (policy/projection/pca.hpp).
//
// Input: sample keys and values, one [tokens][kv_heads][head_dim] kv_view of
// each per layer (any element type and layout), as the engine sees them
// (keys after RoPE: the cache projects what append() is given). Output: the
// artifact (calibration/artifact.hpp) of kind "pca" with tensors
//
//   "key_basis"     [layers][kv_heads][head_dim][rank]  column j: the j-th principal direction
//   "value_basis"   [layers][kv_heads][head_dim][rank]
//   "key_energy"    [layers][kv_heads][rank]            its eigenvalue: mean of <u_j, k>^2 over the sample
//   "value_energy"  [layers][kv_heads][rank]
//
// Method: per (layer, KV head) the uncentred second moment C = (1/T) sum_t
// x_t x_t^T, accumulated in double, and its eigendecomposition (Eigen's
// SelfAdjointEigenSolver); the `rank` eigenvectors of the largest eigenvalues,
// in descending order, are the basis. A projection of rank r <= rank takes
// the first r columns, which is then the best rank-r subspace for the sample
// in mean squared error. Uncentred because the cache stores U U^T x, not
// mu + U U^T (x - mu) (see pca.hpp's choices).
// Determinism: no randomness. Each eigenvector's sign is fixed so that its
// largest-magnitude element (the first of equal ones) is positive, so the
// same samples give the same artifact bytes on a given build.
// Needs Eigen: include it through <kvc/all.hpp>, not <kvc/kvc.hpp>.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Dense>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"

namespace kvc::calibration {

inline constexpr const char* pca_kind = "pca";

struct pca_options {
    std::size_t rank = 0; // components kept per head, 1..head_dim; 0 keeps head_dim
};

namespace detail {

// The leading `rank` eigenvectors (descending eigenvalue) of the symmetric
// `moment` into basis [dim][rank] and their eigenvalues into energy [rank].
inline void principal_directions(const Eigen::MatrixXd& moment, std::size_t rank, float* basis, float* energy) {
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(moment);
    kvc::detail::require(solver.info() == Eigen::Success, "calibration::calibrate_pca: the eigensolver did not converge");
    const auto dim = static_cast<std::size_t>(moment.rows());
    for (std::size_t j = 0; j < rank; ++j) {
        const Eigen::Index column = static_cast<Eigen::Index>(dim - 1 - j); // ascending order in Eigen
        const Eigen::VectorXd u = solver.eigenvectors().col(column);
        Eigen::Index largest = 0;
        for (Eigen::Index d = 1; d < u.size(); ++d)
            if (std::fabs(u(d)) > std::fabs(u(largest))) largest = d;
        const double sign = u(largest) < 0.0 ? -1.0 : 1.0;
        for (std::size_t d = 0; d < dim; ++d)
            basis[d * rank + j] = static_cast<float>(sign * u(static_cast<Eigen::Index>(d)));
        const double lambda = solver.eigenvalues()(column);
        energy[j] = static_cast<float>(lambda > 0.0 ? lambda : 0.0); // rounding can leave -1e-17
    }
}

} // namespace detail

// Throws kvc::error for a rank outside 0..head_dim, a layer count or view
// shape that does not match `config`, no tokens, or a non-finite sample
// element (naming layer, token, head and channel).
template <class KeyView, class ValueView>
artifact calibrate_pca(const cache_config& config, const std::vector<KeyView>& keys,
                       const std::vector<ValueView>& values, const pca_options& options = {}) {
    const char* who = "calibration::calibrate_pca";
    const std::size_t layers = config.layers, heads = config.kv_heads, dim = config.head_dim;
    const std::size_t rank = options.rank == 0 ? dim : options.rank;
    kvc::detail::require(rank <= dim, who, ": expected rank 0..", dim, " (head_dim), got ", options.rank);
    kvc::detail::require(keys.size() == layers && values.size() == layers, who, ": expected one key and one value view per layer (",
                         layers, "), got ", keys.size(), " and ", values.size());
    tensor key_basis{"key_basis", {layers, heads, dim, rank}, {}}, value_basis{"value_basis", {layers, heads, dim, rank}, {}};
    tensor key_energy{"key_energy", {layers, heads, rank}, {}}, value_energy{"value_energy", {layers, heads, rank}, {}};
    key_basis.values.resize(layers * heads * dim * rank);
    value_basis.values.resize(key_basis.values.size());
    key_energy.values.resize(layers * heads * rank);
    value_energy.values.resize(key_energy.values.size());
    for (std::size_t l = 0; l < layers; ++l) {
        const KeyView& k = keys[l];
        const ValueView& v = values[l];
        kvc::detail::require(k.heads() == heads && k.dim() == dim && v.heads() == heads && v.dim() == dim &&
                                 k.tokens() == v.tokens() && k.tokens() >= 1,
                             who, ": layer ", l, " expects keys and values [T][", heads, "][", dim,
                             "] with the same T >= 1, got keys [", k.tokens(), "][", k.heads(), "][", k.dim(),
                             "] and values [", v.tokens(), "][", v.heads(), "][", v.dim(), "]");
        const std::size_t tokens = k.tokens();
        for (std::size_t h = 0; h < heads; ++h) {
            Eigen::MatrixXd key_moment = Eigen::MatrixXd::Zero(static_cast<Eigen::Index>(dim), static_cast<Eigen::Index>(dim));
            Eigen::MatrixXd value_moment = key_moment;
            Eigen::VectorXd key_row(static_cast<Eigen::Index>(dim)), value_row(static_cast<Eigen::Index>(dim));
            for (std::size_t t = 0; t < tokens; ++t) {
                for (std::size_t c = 0; c < dim; ++c) {
                    const double x = static_cast<double>(static_cast<float>(k(t, h, c)));
                    const double y = static_cast<double>(static_cast<float>(v(t, h, c)));
                    kvc::detail::require(std::isfinite(x) && std::isfinite(y), who, ": layer ", l, " token ", t,
                                         ", head ", h, ", channel ", c, ": expected finite keys and values, got ", x,
                                         " and ", y);
                    key_row(static_cast<Eigen::Index>(c)) = x;
                    value_row(static_cast<Eigen::Index>(c)) = y;
                }
                key_moment.selfadjointView<Eigen::Lower>().rankUpdate(key_row);
                value_moment.selfadjointView<Eigen::Lower>().rankUpdate(value_row);
            }
            const double inverse = 1.0 / static_cast<double>(tokens);
            const Eigen::MatrixXd key_full = key_moment.selfadjointView<Eigen::Lower>().toDenseMatrix() * inverse;
            const Eigen::MatrixXd value_full = value_moment.selfadjointView<Eigen::Lower>().toDenseMatrix() * inverse;
            const std::size_t head = l * heads + h;
            detail::principal_directions(key_full, rank, key_basis.values.data() + head * dim * rank,
                                         key_energy.values.data() + head * rank);
            detail::principal_directions(value_full, rank, value_basis.values.data() + head * dim * rank,
                                         value_energy.values.data() + head * rank);
        }
    }
    artifact a;
    a.kind = pca_kind;
    a.tensors = {key_basis, value_basis, key_energy, value_energy};
    return a;
}

} // namespace kvc::calibration
