// kvc/storage/gear_rows.hpp -- one KV head in GEAR form (docs/METHODS.md Q7): X = Q(D) + A B + S.
//
// The storage of kvc::quant::gear (policy/quantization/gear.hpp, which
// documents the method and the choices). Sequence order: compressed tokens,
// then the fp16 segment of the newest tokens.
//
//   compressed (chunks of chunk_tokens, ragged after eviction)     recent (fp16)
//   packed Q(d_t) rows | token records (S_t, A_t) | per chunk B_c  < chunk_tokens rows
//
// Buffers, all from the cache's memory resource:
//   packed_   key and value rows of d_t (x_t with its outliers set to 0) in a Q1 format (packed_rows)
//   records_  per token, uint16 units: key S_t (outliers x (channel, fp16)), value S_t,
//             key A_t (rank fp16), value A_t (rank fp16)
//   counts_   per chunk: its tokens (uint32)
//   factors_  per chunk: key B_c then value B_c, rank x dim fp16 each
//   recent_   the fp16 rows waiting for a chunk (dense_rows), capacity chunk_tokens
// bytes() is their capacity in bytes.
//
// push_back appends to recent_; when it holds chunk_tokens rows they are
// compressed into one chunk (in push_back, noexcept: reserve_for_append made
// room, and the encoder works on the stack). keep() is exact: the per-token
// parts move with their token, a chunk keeps its B_c while any of its tokens
// remain, and nothing is re-encoded.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/gear.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/packed_rows.hpp"

namespace kvc {

struct gear_layout {
    kernels::quant_format format = kernels::quant_format::int4_asym; // Q(d) for keys and values
    std::size_t group_size = 32;
    std::size_t outliers_per_side = 1; // sparse entries per row: this many largest and as many smallest
    std::size_t rank = 2;              // 0 .. 4
    std::size_t chunk_tokens = 64;     // tokens compressed together (n_b)
    std::size_t iterations = 3;        // power iterations per chunk

    constexpr std::size_t outliers() const noexcept { return 2 * outliers_per_side; }
    // uint16 units of a token record (S_t and A_t of key and value).
    constexpr std::size_t record_units() const noexcept {
        return kernels::gear::record_units(outliers(), rank);
    }
    // Bytes per compressed token (packed rows and record) and per chunk (counts and factors).
    constexpr std::size_t compressed_token_bytes(std::size_t dim) const noexcept {
        return 2 * (dim / group_size * kernels::info_of(format).group_bytes(group_size)) + 2 * record_units();
    }
    constexpr std::size_t chunk_bytes(std::size_t dim) const noexcept { return 4 + 2 * 2 * rank * dim; }
};

namespace detail {
inline void validate_gear_layout(const gear_layout& l, std::size_t dim, const char* who) {
    packed_layout packed;
    packed.key_format = packed.value_format = l.format;
    packed.group_size = l.group_size;
    validate_packed_layout(packed, dim, who);
    require(dim <= kernels::gear_max_dim, who, ": expected head_dim <= ", kernels::gear_max_dim, ", got ", dim);
    require(l.rank <= kernels::gear_max_rank, who, ": expected rank 0..", kernels::gear_max_rank, ", got ", l.rank);
    require(l.chunk_tokens >= 4 && l.chunk_tokens <= kernels::gear_max_chunk_tokens, who,
            ": expected chunk_tokens 4..", kernels::gear_max_chunk_tokens, ", got ", l.chunk_tokens);
    require(l.rank <= l.chunk_tokens, who, ": expected rank <= chunk_tokens, got rank ", l.rank, " and chunk_tokens ",
            l.chunk_tokens);
    require(l.outliers_per_side <= kernels::gear_max_outliers_per_side && 4 * l.outliers_per_side <= dim, who,
            ": expected at most min(", kernels::gear_max_outliers_per_side,
            ", head_dim / 4) outliers per side, got ", l.outliers_per_side, " for head_dim ", dim);
    require(l.rank == 0 || (l.iterations >= 1 && l.iterations <= 16), who, ": expected 1..16 power iterations, got ",
            l.iterations);
}
} // namespace detail

class gear_rows {
public:
    // Throws kvc::error for an unsupported layout or head dim (the message starts with `who`).
    gear_rows(const gear_layout& layout, std::size_t dim, memory_resource* resource,
              const char* who = "kvc::gear_rows")
        : layout_((detail::validate_gear_layout(layout, dim, who), layout)), dim_(dim),
          packed_(packed_of(layout), dim, resource, who), records_(resource), counts_(resource),
          factors_(resource), recent_(dtype::f16, dim, resource) {}

    const gear_layout& layout() const noexcept { return layout_; }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t tokens() const noexcept { return compressed_tokens() + recent_.tokens(); }
    std::size_t compressed_tokens() const noexcept { return packed_.tokens(); }
    std::size_t recent_tokens() const noexcept { return recent_.tokens(); }
    std::size_t chunks() const noexcept { return counts_.size(); }
    std::size_t chunk_size(std::size_t c) const noexcept { return counts_[c]; }

    // Parts of compressed token t (for tests and tools): the packed rows of
    // d_t, the sparse (channel, fp16 bits) pairs and the fp16 coefficients A_t.
    const packed_rows& packed() const noexcept { return packed_; }
    const std::uint16_t* sparse(std::size_t t, bool keys) const noexcept {
        return record(t) + (keys ? 0 : kernels::gear::value_sparse_offset(layout_.outliers()));
    }
    const std::uint16_t* coefficients(std::size_t t, bool keys) const noexcept {
        return record(t) + (keys ? kernels::gear::key_coefficient_offset(layout_.outliers())
                                 : kernels::gear::value_coefficient_offset(layout_.outliers(), layout_.rank));
    }
    // B_c (rank x dim fp16 bits, row-major) of chunk c.
    const std::uint16_t* factor(std::size_t c, bool keys) const noexcept {
        return factors_.data() + (2 * c + (keys ? 0 : 1)) * layout_.rank * dim_;
    }

    // Bytes held (capacity): packed rows, token records, chunk counts and factors, fp16 segment.
    std::size_t bytes() const noexcept {
        return packed_.bytes() + records_.bytes() + counts_.bytes() + factors_.bytes() + recent_.bytes();
    }
    // Bytes one attention reads (sizes, not capacities).
    std::size_t stored_bytes() const noexcept {
        return compressed_tokens() * layout_.compressed_token_bytes(dim_) + chunks() * layout_.chunk_bytes(dim_) +
               recent_.tokens() * 2 * dim_ * 2;
    }

    // Room for `extra` more tokens (and the chunks they complete); the only step of an append that may throw.
    void reserve_for_append(std::size_t extra) {
        constexpr const char* who = "kvc::gear_rows::reserve_for_append";
        const std::size_t chunks =
            detail::checked_add(recent_.tokens(), extra, who, "recent tokens", "extra tokens") / layout_.chunk_tokens;
        const std::size_t compressed = chunks * layout_.chunk_tokens; // <= recent + extra
        const std::size_t record_units = detail::checked_mul(compressed, layout_.record_units(), who, "tokens", "record units");
        const std::size_t factor_units = detail::checked_mul(chunks, 2 * layout_.rank * dim_, who, "chunks", "factor units");
        recent_.reserve(layout_.chunk_tokens);
        if (chunks == 0) return;
        packed_.reserve_for_append(compressed);
        records_.reserve_for_append(record_units);
        counts_.reserve_for_append(chunks);
        factors_.reserve_for_append(factor_units);
    }
    // Capacity for `rows` tokens in total (exactly): the chunks they fill and a full fp16 segment.
    void reserve(std::size_t rows) {
        recent_.reserve(layout_.chunk_tokens);
        if (rows <= tokens()) return;
        constexpr const char* who = "kvc::gear_rows::reserve";
        // rows > tokens() >= recent tokens, so rows - compressed_tokens() does not wrap.
        const std::size_t chunks = (rows - compressed_tokens()) / layout_.chunk_tokens;
        const std::size_t compressed = compressed_tokens() + chunks * layout_.chunk_tokens; // <= rows
        const std::size_t record_units = detail::checked_mul(compressed, layout_.record_units(), who, "tokens", "record units");
        const std::size_t factor_units =
            detail::checked_mul(counts_.size() + chunks, 2 * layout_.rank * dim_, who, "chunks", "factor units");
        packed_.reserve(compressed);
        records_.reserve(record_units);
        counts_.reserve(counts_.size() + chunks);
        factors_.reserve(factor_units);
    }

    // Appends one key and one value row given in `from` format to the fp16
    // segment and compresses it when it holds chunk_tokens rows. Capacity must
    // have been reserved: never allocates, never throws.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        recent_.push_back(k, from, key, value);
        if (recent_.tokens() == layout_.chunk_tokens) compress_recent(k);
    }

    // Keeps the tokens at `indices` (ascending, each < tokens()), in that order. Exact (no re-encoding).
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        const std::size_t compressed = compressed_tokens();
        std::size_t kept = 0;
        while (kept < count && indices[kept] < compressed) ++kept;
        packed_.keep(indices, kept);
        const std::size_t units = layout_.record_units();
        for (std::size_t i = 0; i < kept; ++i)
            if (indices[i] != i)
                std::memmove(records_.data() + i * units, records_.data() + indices[i] * units, units * 2);
        records_.resize_within_capacity(kept * units);
        const std::size_t factor_units = 2 * layout_.rank * dim_;
        std::size_t next = 0, chunks = 0, start = 0;
        for (std::size_t c = 0; c < counts_.size(); ++c) {
            const std::size_t end = start + counts_[c];
            std::size_t in_chunk = 0;
            while (next < kept && indices[next] < end) ++next, ++in_chunk;
            if (in_chunk != 0) {
                if (chunks != c)
                    std::memmove(factors_.data() + chunks * factor_units, factors_.data() + c * factor_units,
                                 factor_units * 2);
                counts_[chunks++] = static_cast<std::uint32_t>(in_chunk);
            }
            start = end;
        }
        counts_.resize_within_capacity(chunks);
        factors_.resize_within_capacity(chunks * factor_units);
        std::uint32_t recent[kernels::gear_max_chunk_tokens];
        for (std::size_t i = kept; i < count; ++i) recent[i - kept] = static_cast<std::uint32_t>(indices[i] - compressed);
        recent_.keep(recent, count - kept);
    }

    // Tokens [first, first + count) widened to fp32, [count][dim]: the values
    // attention uses, Q(d_t) + A_t B_c + S_t (summed in that order in float), or the fp16 rows.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        decode(k, first, count, out, true);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        decode(k, first, count, out, false);
    }

    void shrink_to_fit() {
        packed_.shrink_to_fit();
        records_.shrink_to_fit();
        counts_.shrink_to_fit();
        factors_.shrink_to_fit();
        recent_.shrink_to_fit();
    }
    void clear() noexcept {
        packed_.clear();
        records_.clear();
        counts_.clear();
        factors_.clear();
        recent_.clear();
    }
    void release() noexcept {
        packed_.release();
        records_.release();
        counts_.release();
        factors_.release();
        recent_.release();
    }

    // Folds every token into `state` for the query group described by `p`.
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        k.gear.attend_partial(problem(p, tokens()), state);
    }

    // Causal attention of the last p.chunk tokens' queries over the tokens:
    // one decode partial per query over the prefix it sees.
    void prefill(const kernels::kernel_table& k, kernels::prefill_problem p, float* workspace) const noexcept {
        p.dim = dim_; // the cache leaves it to the store
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, tokens(), workspace,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                k.gear.attend_partial(problem(d, visible), state);
            });
    }

private:
    static packed_layout packed_of(const gear_layout& l) noexcept {
        packed_layout p;
        p.key_format = p.value_format = l.format;
        p.group_size = l.group_size;
        return p;
    }

    const std::uint16_t* record(std::size_t t) const noexcept { return records_.data() + t * layout_.record_units(); }
    std::uint16_t* record(std::size_t t) noexcept { return records_.data() + t * layout_.record_units(); }
    std::uint16_t* coefficients_of(std::size_t t, bool keys) noexcept {
        return record(t) + (keys ? kernels::gear::key_coefficient_offset(layout_.outliers())
                                 : kernels::gear::value_coefficient_offset(layout_.outliers(), layout_.rank));
    }

    // The kernel problem over the first `visible` tokens.
    kernels::gear_decode_problem problem(const kernels::decode_problem& p, std::size_t visible) const noexcept {
        kernels::gear_decode_problem g;
        g.rows.keys = packed_.tokens() ? packed_.packed_key_row(0) : nullptr;
        g.rows.values = packed_.tokens() ? packed_.packed_value_row(0) : nullptr;
        g.rows.key_row_bytes = packed_.key_row_bytes();
        g.rows.value_row_bytes = packed_.value_row_bytes();
        g.rows.key_format = g.rows.value_format = layout_.format;
        g.rows.group_size = layout_.group_size;
        const std::size_t compressed = compressed_tokens();
        g.tokens = visible < compressed ? visible : compressed;
        g.extras = records_.data();
        g.extras_stride = layout_.record_units();
        g.outliers = layout_.outliers();
        g.rank = layout_.rank;
        g.chunk_tokens = counts_.data();
        g.chunks = counts_.size();
        // A head with no chunk yet holds no factors: null then, not an offset from null.
        g.key_factors = factors_.data();
        g.value_factors = counts_.size() != 0 ? factors_.data() + layout_.rank * dim_ : nullptr;
        g.factor_stride = 2 * layout_.rank * dim_;
        g.recent.keys = recent_.key_row(0);
        g.recent.values = recent_.value_row(0);
        g.recent.stride = dim_;
        g.recent.tokens = visible > compressed ? visible - compressed : 0;
        kernels::queries_of(g) = p;
        g.dim = dim_;
        return g;
    }

    // Compresses the chunk_tokens rows of recent_ into one chunk.
    void compress_recent(const kernels::kernel_table& k) noexcept {
        using kernels::reference_arch;
        namespace kc = kernels::common;
        const std::size_t n = recent_.tokens(), dim = dim_, rank = layout_.rank;
        const std::size_t outliers = layout_.outliers(), units = layout_.record_units();
        const std::size_t first = compressed_tokens();
        bool finite[2][kernels::gear_max_chunk_tokens];
        records_.resize_within_capacity((first + n) * units);
        float rows[2][kernels::gear_max_dim];
        for (std::size_t t = 0; t < n; ++t) {
            std::uint16_t* rec = record(first + t);
            for (int side = 0; side < 2; ++side) {
                float* row = rows[side];
                k.to_f32[kernels::index_of(dtype::f16)](side == 0 ? recent_.key_row(t) : recent_.value_row(t), row,
                                                        dim);
                bool ok = true;
                for (std::size_t d = 0; d < dim; ++d) ok = ok && std::isfinite(row[d]);
                finite[side][t] = ok;
                std::uint16_t* sparse = rec + (side == 0 ? 0 : kernels::gear::value_sparse_offset(outliers));
                std::uint16_t channels[2 * kernels::gear_max_outliers_per_side];
                if (ok) kernels::gear::select_outliers<reference_arch>(row, dim, layout_.outliers_per_side, channels);
                for (std::size_t j = 0; j < outliers; ++j) {
                    // A non-finite row keeps its values in Q (its groups turn NaN there) and stores empty pairs.
                    sparse[2 * j] = ok ? channels[j] : 0;
                    sparse[2 * j + 1] = ok ? kc::float_to_half_bits<reference_arch>(row[channels[j]]) : 0;
                }
                if (ok)
                    for (std::size_t j = 0; j < outliers; ++j) row[channels[j]] = 0.0f;
            }
            packed_.push_back(k, dtype::f32, rows[0], rows[1]);
        }
        counts_.resize_within_capacity(counts_.size() + 1);
        counts_[counts_.size() - 1] = static_cast<std::uint32_t>(n);
        factors_.resize_within_capacity(factors_.size() + 2 * rank * dim);
        if (rank != 0)
            for (int side = 0; side < 2; ++side) low_rank(k, side == 0, first, n, finite[side]);
        recent_.clear();
    }

    // A_t and B_c of one side of the chunk starting at compressed token `first`.
    void low_rank(const kernels::kernel_table& k, bool keys, std::size_t first, std::size_t n,
                  const bool* finite) noexcept {
        using kernels::reference_arch;
        namespace kc = kernels::common;
        const std::size_t dim = dim_, rank = layout_.rank;
        const int format = kernels::index_of(layout_.format);
        // R_t = d_t - Q(d_t), zero for a non-finite row (it must not spread to the chunk).
        const auto residual = [&](std::size_t t, float* row) {
            if (!finite[t]) {
                for (std::size_t d = 0; d < dim; ++d) row[d] = 0.0f;
                return;
            }
            float quantized[kernels::gear_max_dim];
            k.to_f32[kernels::index_of(dtype::f16)](keys ? recent_.key_row(t) : recent_.value_row(t), row, dim);
            const std::uint16_t* sparse = this->sparse(first + t, keys);
            for (std::size_t j = 0; j < layout_.outliers(); ++j) row[sparse[2 * j]] = 0.0f;
            k.quant.dequantize_row[format](keys ? packed_.packed_key_row(first + t) : packed_.packed_value_row(first + t),
                                           quantized, dim, layout_.group_size);
            for (std::size_t d = 0; d < dim; ++d) row[d] -= quantized[d];
        };
        double p[kernels::gear_max_rank * kernels::gear_max_chunk_tokens];
        double q[kernels::gear_max_rank * kernels::gear_max_dim];
        kernels::gear::power_iteration<reference_arch>(residual, n, dim, rank, layout_.iterations, p, q);
        std::uint16_t* b = factors_.data() + (2 * (chunks() - 1) + (keys ? 0 : 1)) * rank * dim;
        for (std::size_t i = 0; i < rank; ++i) {
            // Balance the magnitudes of A and B (sqrt of the component's norm on
            // each side) so neither leaves fp16's normal range early.
            double norm = 0.0;
            for (std::size_t d = 0; d < dim; ++d) norm += q[i * dim + d] * q[i * dim + d];
            norm = std::sqrt(norm);
            const double root = std::sqrt(norm);
            bool ok = root > 0.0 && std::isfinite(root);
            for (std::size_t d = 0; ok && d < dim; ++d) {
                b[i * dim + d] = kc::float_to_half_bits<reference_arch>(static_cast<float>(q[i * dim + d] / root));
                ok = (b[i * dim + d] & 0x7c00u) != 0x7c00u;
            }
            for (std::size_t t = 0; ok && t < n; ++t) {
                std::uint16_t* a = coefficients_of(first + t, keys) + i;
                *a = kc::float_to_half_bits<reference_arch>(static_cast<float>(p[i * n + t] * root));
                ok = (*a & 0x7c00u) != 0x7c00u;
            }
            if (!ok) { // a component fp16 cannot hold (or none at all): drop it
                for (std::size_t d = 0; d < dim; ++d) b[i * dim + d] = 0;
                for (std::size_t t = 0; t < n; ++t)
                    coefficients_of(first + t, keys)[i] = 0;
            }
        }
    }

    void decode(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out,
                bool keys) const noexcept {
        using kernels::reference_arch;
        const std::size_t compressed = compressed_tokens();
        std::size_t chunk = 0, chunk_end = counts_.size() ? counts_[0] : 0;
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            float* row = out + i * dim_;
            if (t >= compressed) {
                if (keys) recent_.decode_keys(k, t - compressed, 1, row);
                else recent_.decode_values(k, t - compressed, 1, row);
                continue;
            }
            while (t >= chunk_end) chunk_end += counts_[++chunk];
            k.quant.dequantize_row[kernels::index_of(layout_.format)](
                keys ? packed_.packed_key_row(t) : packed_.packed_value_row(t), row, dim_, layout_.group_size);
            const std::uint16_t* a = coefficients(t, keys);
            for (std::size_t r = 0; r < layout_.rank; ++r)
                k.axpy[kernels::index_of(dtype::f16)](kernels::common::half_bits_to_float<reference_arch>(a[r]),
                                                      factor(chunk, keys) + r * dim_, row, dim_);
            const std::uint16_t* s = sparse(t, keys);
            for (std::size_t j = 0; j < layout_.outliers(); ++j)
                row[s[2 * j]] += kernels::common::half_bits_to_float<reference_arch>(s[2 * j + 1]);
        }
    }

public:
    // Serialization (cache/serialization.hpp): the layout as shapes, the
    // packed rows, the token records, the chunks (counts and factors), the
    // fp16 segment; on load the outlier channels, chunk counts and segment
    // length are checked (the kernels index by them).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        const gear_layout& l = self.layout_;
        a.shape("gear_rows format", static_cast<std::size_t>(l.format));
        a.shape("gear_rows group size", l.group_size);
        a.shape("gear_rows outliers per side", l.outliers_per_side);
        a.shape("gear_rows rank", l.rank);
        a.shape("gear_rows chunk tokens", l.chunk_tokens);
        a.shape("gear_rows iterations", l.iterations);
        a.shape("gear_rows head_dim", self.dim_);
        packed_rows::transfer(self.packed_, a);
        const std::size_t compressed = self.packed_.tokens();
        a.elements("gear_rows records", self.records_, compressed * l.record_units());
        std::size_t chunks = self.counts_.size();
        a.count("gear_rows chunks", chunks, compressed);
        a.elements("gear_rows chunk counts", self.counts_, chunks);
        a.elements("gear_rows factors", self.factors_, chunks * 2 * l.rank * self.dim_);
        dense_rows::transfer(self.recent_, a);
        if constexpr (Archive::loading) {
            std::size_t sum = 0;
            for (std::size_t c = 0; c < chunks; ++c) {
                a.check(self.counts_[c] >= 1 && self.counts_[c] <= l.chunk_tokens, "gear_rows chunk ", c, " holds ",
                        self.counts_[c], " tokens, expected 1..", l.chunk_tokens);
                sum += self.counts_[c];
            }
            a.check(sum == compressed, "gear_rows chunks hold ", sum, " tokens, expected the ", compressed,
                    " compressed tokens");
            a.check(self.recent_.tokens() < l.chunk_tokens, "gear_rows holds ", self.recent_.tokens(),
                    " fp16 tokens, expected fewer than ", l.chunk_tokens);
            for (std::size_t t = 0; t < compressed; ++t)
                for (int keys = 0; keys < 2; ++keys) {
                    const std::uint16_t* s = self.sparse(t, keys == 1);
                    for (std::size_t j = 0; j < l.outliers(); ++j)
                        a.check(s[2 * j] < self.dim_, "gear_rows token ", t, " has an outlier at channel ", s[2 * j],
                                ", expected < ", self.dim_);
                }
        }
    }

private:
    gear_layout layout_;
    std::size_t dim_;
    packed_rows packed_;
    aligned_buffer<std::uint16_t> records_;
    aligned_buffer<std::uint32_t> counts_;
    aligned_buffer<std::uint16_t> factors_;
    dense_rows recent_;
};

} // namespace kvc
