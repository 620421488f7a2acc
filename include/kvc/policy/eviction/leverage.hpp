// kvc/policy/eviction/leverage.hpp -- E12 leverage scores of the keys (Compactor).
//
// Source: Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache
// Compression with Approximate Leverage Scores" (2025, arXiv:2507.08143);
// reference code in kvpress's LeverageScorePress. Keys that stick out of the
// subspace the other keys span are the ones a later query can single out, so
// they are kept. Centre the head's keys (X = K - mean), sketch them from d to
// r = `sketch` (48) columns with a Gaussian matrix, Y = X G, and take each
// token's statistical leverage l_t = y_t (Y^T Y)^-1 y_t^T, computed through
// a Cholesky factor L of Y^T Y (l_t = ||L^-1 y_t||^2); scores are the z-scores
// of l over the head. Query-agnostic: keys only.
//
// Choices where the source leaves room:
// - The sketch matrix is fixed (drawn from `seed`, entries N(0, 1/r), the
//   same for every head and call), so scores repeat exactly; the reference
//   draws a new one per call. When r >= d no sketch is applied: leverage does
//   not change under an invertible right factor, so Y = X is the exact value
//   the sketch approximates.
// - Jitter: `jitter` (1e-6) times the mean diagonal of Y^T Y is added before
//   the factorisation and grown 100x (up to 5 tries) if it fails; relative,
//   so it does not depend on the keys' scale. If every try fails (e.g. NaN
//   keys) or all keys are equal, every token scores 0 and the selector falls
//   back to recency.
// - Gram matrix and factorisation in double; sketch and solve in float.
// - z-scores use the n - 1 standard deviation, floored at 1e-6.
// - Compactor protects the first 8 and last 4 tokens. Here the scorer bumps
//   the first `protect_first` (8) and last `protect_last` (4) held tokens above
//   every other score (max + 1, finite, so top-p and threshold selectors still
//   work); set both to 0 and use budget.sinks / budget.window instead if you
//   prefer the budget to do it (the budget also counts them inside the target).
// - Deviation: Compactor scores pre-RoPE keys; kvc holds keys as the engine
//   appended them (post-RoPE in most engines), so the leverage is of those.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct leverage {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true, needs_values = false;
    std::size_t sketch = 48;                 // sketch columns r
    std::size_t protect_first = 8, protect_last = 4;
    double jitter = 1e-6;                    // relative to the mean diagonal of Y^T Y
    std::uint64_t seed = 0x636f6d7061637472ull;

    void validate() const {
        detail::require(sketch >= 1, "evict::score::leverage: expected sketch >= 1 columns, got ", sketch);
        detail::require(std::isfinite(jitter) && jitter > 0.0, "evict::score::leverage: expected jitter > 0, got ",
                        jitter);
    }

    void score(const head_inputs& in, float* scores) const {
        using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        const Eigen::Index n = static_cast<Eigen::Index>(in.tokens), d = static_cast<Eigen::Index>(in.dim);
        Eigen::Map<Eigen::VectorXf> out(scores, n);
        out.setZero();
        if (n == 0) return;
        const Eigen::Map<const row_matrix> keys(in.keys, n, d);
        const Eigen::RowVectorXf mean = keys.colwise().mean();
        Eigen::MatrixXf y;
        if (static_cast<Eigen::Index>(sketch) < d) {
            const Eigen::Index r = static_cast<Eigen::Index>(sketch);
            Eigen::MatrixXf g(d, r);
            score_detail::gaussian_stream normal(seed);
            const float unit = 1.0f / std::sqrt(static_cast<float>(r));
            for (Eigen::Index j = 0; j < r; ++j)
                for (Eigen::Index i = 0; i < d; ++i) g(i, j) = unit * normal.next();
            y.noalias() = (keys.rowwise() - mean) * g;
        } else {
            y = keys.rowwise() - mean;
        }
        const Eigen::Index r = y.cols();
        Eigen::MatrixXd gram = (y.transpose() * y).cast<double>();
        const double mean_diagonal = gram.trace() / static_cast<double>(r);
        if (!(mean_diagonal > 0.0) || !std::isfinite(mean_diagonal)) return protect(in, scores);
        Eigen::LLT<Eigen::MatrixXd> cholesky;
        double added = jitter * mean_diagonal;
        bool factored = false;
        for (int attempt = 0; attempt < 5 && !factored; ++attempt, added *= 100.0) {
            cholesky.compute(gram + added * Eigen::MatrixXd::Identity(r, r));
            factored = cholesky.info() == Eigen::Success;
        }
        if (!factored) return protect(in, scores);
        const Eigen::MatrixXf lower = cholesky.matrixL().toDenseMatrix().cast<float>();
        const Eigen::MatrixXf solved = lower.triangularView<Eigen::Lower>().solve(y.transpose()); // L^-1 Y^T
        out = solved.colwise().squaredNorm().transpose();
        const float average = out.mean();
        const float spread =
            n > 1 ? std::sqrt((out.array() - average).square().sum() / static_cast<float>(n - 1)) : 0.0f;
        out = (out.array() - average) / std::max(spread, 1e-6f);
        protect(in, scores);
    }

private:
    void protect(const head_inputs& in, float* scores) const noexcept {
        float top = 0.0f;
        for (std::size_t t = 0; t < in.tokens; ++t)
            if (std::isfinite(scores[t])) top = std::max(top, scores[t]);
        top += 1.0f;
        for (std::size_t t = 0; t < std::min(protect_first, in.tokens); ++t) scores[t] = top;
        for (std::size_t i = 0; i < std::min(protect_last, in.tokens); ++i) scores[in.tokens - 1 - i] = top;
    }
};

} // namespace score
using leverage = policy<score::leverage>;
} // namespace kvc::evict
