// kvc/storage/loki_rows.hpp -- the head store of P4 Loki (policy/projection/loki.hpp):
// keys in the principal basis, decode attention over the top-k tokens of a
// low-rank score estimate.
//
// Layout:
//   rows      a dense_rows of width head_dim: key t is U^T k_t (its coordinates
//             on the full principal basis, leading components first), value t
//             as appended; the codec's element type
//   leading   the first `rank` coordinates of every key again, contiguous
//             ([tokens][rank], same element type): what the estimate reads
//   basis     U, head_dim x head_dim fp32, row-major, the head's own copy
//   scratch   decode's working memory, sized with the rows (reserve_for_append,
//             reserve, compacted): per token group + 2 floats (the estimated
//             logits of each query head of the group, their maximum and a copy
//             for the selection) and one uint32 (the chosen indices), plus
//             group x head_dim floats (the rotated queries)
// bytes() counts all four: Loki saves reading, not holding (the leading
// copy costs rank / (2 head_dim) of the rows: 12.5% at rank d/4). It exists
// because the estimate reading `rank` elements of every head_dim-wide row is
// a strided walk that the hardware prefetchers do not cover: the whole Loki
// decode measured 2.7x full attention's time that way (rank 32 of 128, fp16,
// 32K tokens), memory-latency bound in the estimate.
//
// Decode (attend): the group's queries rotated, q' = U^T q; the plain-row
// kernel over every row with key_dim = rank and dim = 0 (the first `rank`
// coordinates of each key, from the leading copy; no value is read) writes
// the estimated logits;
// per token the largest over the group's query heads is its score; the k
// best scores (k = ceil(ratio x tokens), at least 1; ties to the earliest
// tokens; NaN scores count as +inf, so a NaN row is chosen and shows as in
// full attention) are attended exactly (<q', k'> = <q, k>, U orthonormal),
// their rows gathered on the stack in blocks, in token order, into the
// caller's state. Tokens not chosen get logit -inf in p.logits (no mass).
// With k = every token the gather is skipped: exact attention over all rows.
// Prefill is exact (rotated queries, every row), as in the source, which
// sparsifies decode only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

class loki_rows {
public:
    // `rows` (width head_dim, empty); basis head_dim x head_dim, row d at basis + d * head_dim.
    loki_rows(dense_rows rows, const float* basis, std::size_t rank, double ratio, std::size_t group)
        : dim_(rows.dim()), rank_(rank), group_(group), ratio_(ratio), basis_(rows.resource()),
          scores_(rows.resource()), chosen_(rows.resource()), leading_(rows.resource()), rows_(std::move(rows)) {
        basis_.reserve(dim_ * dim_);
        basis_.resize_within_capacity(dim_ * dim_);
        std::memcpy(basis_.data(), basis, dim_ * dim_ * sizeof(float));
        reserve_scratch(0);
    }

    // Copies get their own scratch, as large as the copied rows' capacity.
    loki_rows(const loki_rows& other) : loki_rows(other.rows_, other) {
        leading_ = other.leading_;
        reserve_scratch(rows_.capacity());
    }
    loki_rows& operator=(const loki_rows& other) {
        if (this != &other) {
            loki_rows copy(other);
            *this = std::move(copy);
        }
        return *this;
    }
    loki_rows(loki_rows&&) noexcept = default;
    loki_rows& operator=(loki_rows&&) noexcept = default;
    ~loki_rows() = default;

    dtype type() const noexcept { return rows_.type(); }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t rank() const noexcept { return rank_; }
    std::size_t tokens() const noexcept { return rows_.tokens(); }
    // Tokens one decode attends exactly: ceil(ratio x tokens), at least 1, at most tokens.
    std::size_t selected(std::size_t n) const noexcept {
        if (n == 0) return 0;
        const double want = std::ceil(ratio_ * static_cast<double>(n));
        return want < 1.0 ? 1 : want >= static_cast<double>(n) ? n : static_cast<std::size_t>(want);
    }

    std::size_t bytes() const noexcept {
        return rows_.bytes() + leading_.bytes() + basis_.bytes() + scores_.bytes() + chosen_.bytes();
    }

    void reserve_for_append(std::size_t extra) {
        rows_.reserve_for_append(extra);
        leading_.reserve_for_append(detail::checked_mul(extra, leading_row_bytes(), "kvc::loki_rows::reserve_for_append",
                                                        "rows", "bytes per row"));
        reserve_scratch(rows_.capacity());
    }
    void reserve(std::size_t rows) {
        rows_.reserve(rows);
        leading_.reserve(detail::checked_mul(rows, leading_row_bytes(), "kvc::loki_rows::reserve", "rows", "bytes per row"));
        reserve_scratch(rows_.capacity());
    }

    // The key rotated; the value through fp32, which every storage format survives unchanged.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        alignas(64) float rows[2][max_head_dim], rotated[max_head_dim];
        detail::convert_row(k, from, key, dtype::f32, rows[0], dim_);
        detail::convert_row(k, from, value, dtype::f32, rows[1], dim_);
        rotate(rows[0], rotated);
        const std::size_t t = rows_.tokens();
        rows_.push_back(k, dtype::f32, rotated, rows[1]);
        leading_.resize_within_capacity(leading_.size() + leading_row_bytes());
        store_leading(k, t, rotated);
    }
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        alignas(64) float rotated[max_head_dim];
        rotate(key, rotated);
        rows_.store_row(k, t, rotated, value);
        store_leading(k, t, rotated);
    }
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* key) noexcept {
        alignas(64) float rotated[max_head_dim];
        rotate(key, rotated);
        rows_.store_key(k, t, rotated);
        store_leading(k, t, rotated);
    }

    loki_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        loki_rows out(rows_.compacted(indices, count), *this);
        out.leading_.reserve(count * leading_row_bytes());
        detail::gather_rows(out.leading_.data(), leading_.data(), leading_row_bytes(), indices, count);
        out.leading_.resize_within_capacity(count * leading_row_bytes());
        out.reserve_scratch(count);
        return out;
    }

    // Keys back in the model's space (U k'), values as stored.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        alignas(64) float rotated[max_head_dim];
        for (std::size_t t = 0; t < count; ++t) {
            k.to_f32[kernels::index_of(type())](rows_.key_row(first + t), rotated, dim_);
            float* row = out + t * dim_;
            for (std::size_t d = 0; d < dim_; ++d) {
                float x = 0.0f;
                for (std::size_t j = 0; j < dim_; ++j) x += basis_[d * dim_ + j] * rotated[j];
                row[d] = x;
            }
        }
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        rows_.decode_values(k, first, count, out);
    }

    void shrink_to_fit() {
        rows_.shrink_to_fit();
        leading_.shrink_to_fit();
        aligned_buffer<float> scores(scores_.resource());
        aligned_buffer<std::uint32_t> chosen(chosen_.resource());
        scores.reserve(scratch_floats(rows_.tokens()));
        chosen.reserve(rows_.tokens());
        scores_.swap(scores);
        chosen_.swap(chosen);
    }
    void release() noexcept {
        rows_.release();
        leading_.release();
        scores_.release();
        chosen_.release();
    }

    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        const std::size_t n = tokens(), keep = selected(n);
        if (n == 0) return;
        float* queries = scores_.data();
        for (std::size_t g = 0; g < p.group; ++g) rotate(p.queries + g * p.query_stride, queries + g * dim_);
        kernels::decode_problem exact = p;
        exact.queries = queries;
        exact.query_stride = dim_;
        exact.key_dim = 0;
        exact.dim = dim_;
        if (keep == n) {
            rows_.attend(k, exact, state);
            return;
        }
        choose(k, p, queries, n, keep);
        if (p.logits)
            for (std::size_t g = 0; g < p.group; ++g)
                std::fill(p.logits + g * p.logits_stride, p.logits + g * p.logits_stride + n,
                          -std::numeric_limits<float>::infinity());
        attend_chosen(k, exact, state, keep);
    }

    std::size_t prefill_workspace_floats(std::size_t group, std::size_t chunk, bool with_mass) const noexcept {
        return chunk * group * dim_ + kernels::prefill_workspace_floats(group, dim_, tokens(), with_mass);
    }
    // Exact causal attention: the chunk's queries rotated into the workspace, then the plain-row prefill.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        for (std::size_t i = 0; i < p.chunk; ++i)
            for (std::size_t g = 0; g < p.group; ++g)
                rotate(p.queries + i * p.query_token_stride + g * p.query_head_stride,
                       workspace + (i * p.group + g) * dim_);
        kernels::prefill_problem q = p;
        q.queries = workspace;
        q.query_token_stride = p.group * dim_;
        q.query_head_stride = dim_;
        rows_.prefill(k, q, workspace + p.chunk * p.group * dim_);
    }

    // Serialization (kvc/core/archive.hpp): dim, rank, group and ratio as
    // shapes, the basis as the policy's (calibrated: equal on load), then the
    // rows. The leading copy is not written: it is the first `rank` elements
    // of each stored key, rebuilt on load (with the decode scratch), so a
    // file cannot make the two disagree.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("loki_rows head_dim", self.dim_);
        a.shape("loki_rows rank", self.rank_);
        a.shape("loki_rows group", self.group_);
        std::uint64_t ratio_bits = 0;
        std::memcpy(&ratio_bits, &self.ratio_, sizeof ratio_bits);
        a.shape("loki_rows ratio (double bits)", static_cast<std::size_t>(ratio_bits));
        a.same("loki_rows basis", self.basis_);
        dense_rows::transfer(self.rows_, a);
        if constexpr (Archive::loading) self.rebuild_leading();
    }

private:
    loki_rows(dense_rows rows, const loki_rows& other)
        : dim_(other.dim_), rank_(other.rank_), group_(other.group_), ratio_(other.ratio_), basis_(other.basis_),
          scores_(other.scores_.resource()), chosen_(other.chosen_.resource()), leading_(other.leading_.resource()),
          rows_(std::move(rows)) {}

    std::size_t leading_row_bytes() const noexcept { return rank_ * size_of(type()); }
    // The leading copy from the stored keys (a load: the rows are all there is).
    void rebuild_leading() {
        const std::size_t n = rows_.tokens(), lrb = leading_row_bytes();
        leading_.clear();
        leading_.reserve(detail::checked_mul(n, lrb, "kvc::loki_rows", "rows", "bytes per leading row"));
        for (std::size_t t = 0; t < n; ++t)
            std::memcpy(leading_.data() + t * lrb, rows_.key_row(t), lrb);
        leading_.resize_within_capacity(n * lrb);
        reserve_scratch(rows_.capacity());
    }
    void store_leading(const kernels::kernel_table& k, std::size_t t, const float* rotated) noexcept {
        detail::convert_row(k, dtype::f32, rotated, type(), leading_.data() + t * leading_row_bytes(), rank_);
    }

    std::size_t scratch_floats(std::size_t rows) const noexcept { return group_ * dim_ + rows * (group_ + 2); }
    void reserve_scratch(std::size_t rows) {
        scores_.reserve(scratch_floats(rows));
        chosen_.reserve(rows);
    }

    // out = U^T row: the coordinates of `row` on the basis vectors.
    void rotate(const float* row, float* out) const noexcept {
        for (std::size_t j = 0; j < dim_; ++j) out[j] = 0.0f;
        for (std::size_t d = 0; d < dim_; ++d) {
            const float x = row[d];
            const float* u = basis_.data() + d * dim_;
            for (std::size_t j = 0; j < dim_; ++j) out[j] += x * u[j];
        }
    }

    // Writes the `keep` tokens with the best estimated scores, ascending, to chosen_.
    void choose(const kernels::kernel_table& k, const kernels::decode_problem& p, const float* queries, std::size_t n,
                std::size_t keep) const noexcept {
        float* logits = scores_.data() + group_ * dim_; // [group][n]
        float* best = logits + p.group * n;              // [n]
        float* order = best + n;                         // [n]
        float max[64], sum[64], unused = 0.0f;
        kernels::decode_problem estimate = p;
        estimate.queries = queries;
        estimate.query_stride = dim_;
        estimate.key_dim = rank_;
        estimate.dim = 0; // logits only: no value is read or accumulated
        estimate.keys = estimate.values = leading_.data();
        estimate.key_stride = estimate.value_stride = rank_;
        estimate.tokens = n;
        estimate.logits = logits;
        estimate.logits_stride = n;
        for (std::size_t g0 = 0; g0 < p.group; g0 += 64) {
            kernels::decode_problem part = estimate;
            part.group = p.group - g0 < 64 ? p.group - g0 : 64;
            part.queries = queries + g0 * dim_;
            part.logits = logits + g0 * n;
            for (std::size_t g = 0; g < part.group; ++g) max[g] = -std::numeric_limits<float>::infinity(), sum[g] = 0.0f;
            k.attend_partial[kernels::index_of(type())](part, kernels::decode_state{max, sum, &unused});
        }
        // Group maximum, head by head over contiguous logits (vectorisable);
        // a NaN, once in, stays (x > NaN is false) and becomes +inf below.
        std::memcpy(best, logits, n * sizeof(float));
        for (std::size_t g = 1; g < p.group; ++g) {
            const float* row = logits + g * n;
            for (std::size_t t = 0; t < n; ++t) best[t] = row[t] > best[t] || row[t] != row[t] ? row[t] : best[t];
        }
        for (std::size_t t = 0; t < n; ++t) {
            if (best[t] != best[t]) best[t] = std::numeric_limits<float>::infinity();
            order[t] = best[t];
        }
        std::nth_element(order, order + (keep - 1), order + n, [](float a, float b) { return a > b; });
        const float threshold = order[keep - 1];
        std::size_t above = 0;
        for (std::size_t t = 0; t < n; ++t) above += best[t] > threshold;
        std::size_t ties = keep - above, count = 0; // tokens scoring exactly the threshold still to take
        std::uint32_t* chosen = chosen_.data();
        for (std::size_t t = 0; t < n && count < keep; ++t) {
            bool take = best[t] > threshold;
            if (!take && best[t] == threshold && ties != 0) {
                take = true;
                --ties;
            }
            if (take) chosen[count++] = static_cast<std::uint32_t>(t);
        }
    }

    // Exact attention over the chosen tokens, gathered a block at a time (64 KiB of stack: keys,
    // values, their bias and logits).
    void attend_chosen(const kernels::kernel_table& k, kernels::decode_problem p, const kernels::decode_state& state,
                       std::size_t keep) const noexcept {
        constexpr std::size_t block_floats = 4096;
        alignas(64) float keys[block_floats], values[block_floats], bias[block_floats], logits[block_floats];
        std::size_t block = block_floats / dim_;
        if (p.logits && block_floats / p.group < block) block = block_floats / p.group;
        if (block == 0) block = 1; // dim_ <= max_head_dim <= block_floats, group <= block_floats
        const float* all_bias = p.bias;
        float* all_logits = p.logits;
        const std::size_t logits_stride = p.logits_stride;
        const std::uint32_t* chosen = chosen_.data();
        p.keys = keys;
        p.values = values;
        p.key_stride = p.value_stride = dim_;
        p.bias = all_bias ? bias : nullptr;
        p.logits = all_logits ? logits : nullptr;
        p.logits_stride = block;
        for (std::size_t i0 = 0; i0 < keep; i0 += block) {
            const std::size_t count = keep - i0 < block ? keep - i0 : block;
            gather(chosen, i0, count, keep, keys, values);
            if (all_bias)
                for (std::size_t i = 0; i < count; ++i) bias[i] = all_bias[chosen[i0 + i]];
            p.tokens = count;
            k.attend_partial[kernels::index_of(type())](p, state);
            if (all_logits)
                for (std::size_t g = 0; g < p.group; ++g)
                    for (std::size_t i = 0; i < count; ++i)
                        all_logits[g * logits_stride + chosen[i0 + i]] = logits[g * block + i];
        }
    }

    // Rows chosen[i0 .. i0 + count) into keys and values, key and value of a
    // token together, the rows `ahead` tokens on requested meanwhile (the
    // chosen rows are scattered: each is a wait for memory unless asked early).
    void gather(const std::uint32_t* chosen, std::size_t i0, std::size_t count, std::size_t keep, float* keys,
                float* values) const noexcept {
        constexpr std::size_t ahead = 16;
        const std::size_t row_bytes = rows_.row_bytes();
        const auto* all_keys = static_cast<const unsigned char*>(rows_.key_row(0));
        const auto* all_values = static_cast<const unsigned char*>(rows_.value_row(0));
        for (std::size_t i = 0; i < count; ++i) {
#if defined(__GNUC__) || defined(__clang__)
            if (i0 + i + ahead < keep)
                for (std::size_t line = 0; line < row_bytes; line += 64) {
                    __builtin_prefetch(all_keys + std::size_t{chosen[i0 + i + ahead]} * row_bytes + line);
                    __builtin_prefetch(all_values + std::size_t{chosen[i0 + i + ahead]} * row_bytes + line);
                }
#endif
            std::memcpy(reinterpret_cast<unsigned char*>(keys) + i * row_bytes,
                        all_keys + std::size_t{chosen[i0 + i]} * row_bytes, row_bytes);
            std::memcpy(reinterpret_cast<unsigned char*>(values) + i * row_bytes,
                        all_values + std::size_t{chosen[i0 + i]} * row_bytes, row_bytes);
        }
    }

    std::size_t dim_, rank_, group_;
    double ratio_;
    aligned_buffer<float> basis_;                   // [head_dim][head_dim]
    mutable aligned_buffer<float> scores_;          // decode scratch (see the layout above)
    mutable aligned_buffer<std::uint32_t> chosen_;  // decode scratch: the chosen tokens
    aligned_buffer<unsigned char> leading_;         // [tokens][rank]: the keys' leading coordinates
    dense_rows rows_;
};

} // namespace kvc
