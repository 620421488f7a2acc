// kvc/storage/sparse_rows.hpp -- key and value rows of one KV head as bitmap + kept fp16 values (Q10).
//
// The storage of kvc::quant::sparse (policy/quantization/sparse.hpp). Every
// key row keeps key_kept of its dim elements and every value row value_kept,
// so rows have fixed sizes (kernels/sparse/problem.hpp has the layout):
//
//   key row:   dim / 8 bitmap bytes + 2 * key_kept bytes of fp16
//   value row: dim / 8 bitmap bytes + 2 * value_kept bytes of fp16
//
// Attention runs the sparse kernels directly on these rows (no dense copy);
// prefill is one decode partial per query over the visible prefix
// (kernels::common::prefill_by_decode).
//
// Memory: keys and values are aligned_buffers from the cache's memory
// resource; bytes() is their capacity in bytes, nothing else is held.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/sparse/common.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace kvc {

class sparse_rows {
public:
    // Throws kvc::error unless dim is a multiple of 16 (at most 1024) and
    // 1 <= key_kept, value_kept <= dim; the message starts with `who`.
    sparse_rows(std::size_t dim, std::size_t key_kept, std::size_t value_kept, memory_resource* resource,
                const char* who = "kvc::sparse_rows")
        : dim_((validate(dim, key_kept, value_kept, who), dim)), key_kept_(key_kept), value_kept_(value_kept),
          key_row_bytes_(kernels::sparse_row_bytes(dim, key_kept)),
          value_row_bytes_(kernels::sparse_row_bytes(dim, value_kept)), keys_(resource), values_(resource) {}

    std::size_t dim() const noexcept { return dim_; }
    std::size_t key_kept() const noexcept { return key_kept_; }
    std::size_t value_kept() const noexcept { return value_kept_; }
    std::size_t key_row_bytes() const noexcept { return key_row_bytes_; }
    std::size_t value_row_bytes() const noexcept { return value_row_bytes_; }
    std::size_t tokens() const noexcept { return keys_.size() / key_row_bytes_; }
    const unsigned char* key_row(std::size_t t) const noexcept { return keys_.data() + t * key_row_bytes_; }
    const unsigned char* value_row(std::size_t t) const noexcept { return values_.data() + t * value_row_bytes_; }

    // Bytes held (capacity) and bytes per token (what one more token costs, for byte budgets).
    std::size_t bytes() const noexcept { return keys_.bytes() + values_.bytes(); }
    std::size_t bytes_per_token() const noexcept { return key_row_bytes_ + value_row_bytes_; }
    // Bytes one attention reads: every stored row.
    std::size_t stored_bytes() const noexcept { return tokens() * bytes_per_token(); }

    void reserve_for_append(std::size_t extra) { grow(extra, false); }
    void reserve(std::size_t rows) { grow(rows, true); }

    // Encodes one key and one value row given in `from` format (capacity reserved:
    // never allocates, never throws). Which elements are kept, NaN and Inf: kernels/sparse/common.hpp.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        const std::size_t t = tokens();
        keys_.resize_within_capacity(keys_.size() + key_row_bytes_);
        values_.resize_within_capacity(values_.size() + value_row_bytes_);
        const int source = kernels::index_of(from);
        k.sparse.encode_row[source](key, keys_.data() + t * key_row_bytes_, dim_, key_kept_);
        k.sparse.encode_row[source](value, values_.data() + t * value_row_bytes_, dim_, value_kept_);
    }

    // Keeps the tokens at `indices` (ascending, each < tokens()), in that order.
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t from = indices[i];
            if (from == i) continue;
            std::memmove(keys_.data() + i * key_row_bytes_, keys_.data() + from * key_row_bytes_, key_row_bytes_);
            std::memmove(values_.data() + i * value_row_bytes_, values_.data() + from * value_row_bytes_,
                         value_row_bytes_);
        }
        keys_.resize_within_capacity(count * key_row_bytes_);
        values_.resize_within_capacity(count * value_row_bytes_);
    }

    // Tokens [first, first + count) widened to fp32, [count][dim]: kept values, zeros elsewhere.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) k.sparse.decode_row(key_row(first + i), out + i * dim_, dim_);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) k.sparse.decode_row(value_row(first + i), out + i * dim_, dim_);
    }

    void shrink_to_fit() {
        keys_.shrink_to_fit();
        values_.shrink_to_fit();
    }
    void clear() noexcept {
        keys_.clear();
        values_.clear();
    }
    void release() noexcept {
        keys_.release();
        values_.release();
    }

    // Folds every token into `state` for the query group of `p` (queries,
    // group, scale, optional bias and logits over the tokens).
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        attend_prefix(k, tokens(), p, state);
    }

    // Causal attention of the last p.chunk tokens' queries over the tokens.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& problem,
                 float* workspace) const noexcept {
        kernels::prefill_problem p = problem;
        p.dim = dim_; // callers describe queries and outputs; the head dim is the store's
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, tokens(), workspace,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                attend_prefix(k, visible, d, state);
            });
    }

private:
    // Room for `rows` more rows (append) or in total (exact).
    void grow(std::size_t rows, bool exact) {
        constexpr const char* who = "kvc::sparse_rows::reserve";
        const std::size_t key_bytes = detail::checked_mul(rows, key_row_bytes_, who, "rows", "key row bytes");
        const std::size_t value_bytes = detail::checked_mul(rows, value_row_bytes_, who, "rows", "value row bytes");
        if (exact) {
            keys_.reserve(key_bytes);
            values_.reserve(value_bytes);
        } else {
            keys_.reserve_for_append(key_bytes);
            values_.reserve_for_append(value_bytes);
        }
    }

    static void validate(std::size_t dim, std::size_t key_kept, std::size_t value_kept, const char* who) {
        detail::require(dim > 0 && dim % kernels::sparse_chunk_elements == 0 && dim <= kernels::sparse_common::max_dim,
                        who, ": expected head_dim a multiple of ", kernels::sparse_chunk_elements, " up to ",
                        kernels::sparse_common::max_dim, ", got head_dim ", dim);
        detail::require(key_kept >= 1 && key_kept <= dim && value_kept >= 1 && value_kept <= dim, who,
                        ": expected 1..", dim, " kept elements per row, got ", key_kept, " (keys) and ", value_kept,
                        " (values)");
    }

    void attend_prefix(const kernels::kernel_table& k, std::size_t count, const kernels::decode_problem& p,
                       const kernels::decode_state& state) const noexcept {
        kernels::sparse_decode_problem s;
        s.rows.keys = keys_.data();
        s.rows.values = values_.data();
        s.rows.key_row_bytes = key_row_bytes_;
        s.rows.value_row_bytes = value_row_bytes_;
        s.tokens = count;
        kernels::queries_of(s) = p;
        s.dim = dim_;
        k.sparse.attend_partial(s, state);
    }

public:
    // Serialization (cache/serialization.hpp): dim and kept counts as shapes,
    // then the rows; on load every row's bitmap must keep exactly its kept
    // count (the kernels read as many values as the bitmap names).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("sparse_rows head_dim", self.dim_);
        a.shape("sparse_rows key kept", self.key_kept_);
        a.shape("sparse_rows value kept", self.value_kept_);
        std::size_t tokens = self.tokens();
        a.count("sparse_rows tokens", tokens, std::size_t{1} << 31);
        a.elements("sparse_rows keys", self.keys_, tokens * self.key_row_bytes_);
        a.elements("sparse_rows values", self.values_, tokens * self.value_row_bytes_);
        if constexpr (Archive::loading) {
            for (std::size_t t = 0; t < tokens; ++t)
                for (int keys = 0; keys < 2; ++keys) {
                    const unsigned char* row = keys ? self.key_row(t) : self.value_row(t);
                    std::size_t set = 0;
                    for (std::size_t i = 0; i < self.dim_ / 8; ++i)
                        for (unsigned bit = 0; bit < 8; ++bit) set += (row[i] >> bit) & 1u;
                    const std::size_t kept = keys ? self.key_kept_ : self.value_kept_;
                    a.check(set == kept, "sparse_rows token ", t, keys ? " key" : " value", " row keeps ", set,
                            " elements, expected ", kept);
                }
        }
    }

private:
    std::size_t dim_;
    std::size_t key_kept_, value_kept_;
    std::size_t key_row_bytes_, value_row_bytes_;
    aligned_buffer<unsigned char> keys_;
    aligned_buffer<unsigned char> values_;
};

} // namespace kvc
