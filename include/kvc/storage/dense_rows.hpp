// kvc/storage/dense_rows.hpp -- uncompressed key and value rows of one KV head.
//
// The storage full_cache and the `none` codec share, so that a compressed
// cache with every policy set to `none` is the same code as the baseline and
// gives bit-identical results. Rows are `dim` elements of fp32, fp16 or bf16,
// packed one after another; a head grows by appending rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/dispatch.hpp"

namespace kvc {

// Most leading tokens a codec keeps in fp16, as dense rows in front of its
// packed body (Q9 sinks, KVQuant's sinks). The methods keep a handful
// (docs/METHODS.md Q9: 1-5); a count in the thousands stores the whole prompt
// uncompressed and is taken for a mistake.
inline constexpr std::size_t max_sink_tokens = 1024;

namespace detail {

// Copies `n` elements from a row of `from` to a row of `to`, converting
// through the active kernels (round to nearest even when narrowing).
inline void convert_row(const kernels::kernel_table& k, dtype from, const void* src, dtype to, void* dst,
                        std::size_t n) noexcept {
    if (from == to) {
        std::memcpy(dst, src, n * size_of(from));
    } else if (from == dtype::f32) {
        k.from_f32[kernels::index_of(to)](static_cast<const float*>(src), dst, n);
    } else if (to == dtype::f32) {
        k.to_f32[kernels::index_of(from)](src, static_cast<float*>(dst), n);
    } else { // fp16 <-> bf16 through fp32, in pieces that fit the stack
        constexpr std::size_t piece = 256;
        float buffer[piece];
        const auto* in = static_cast<const unsigned char*>(src);
        auto* out = static_cast<unsigned char*>(dst);
        for (std::size_t i = 0; i < n; i += piece) {
            const std::size_t count = n - i < piece ? n - i : piece;
            k.to_f32[kernels::index_of(from)](in + i * 2, buffer, count);
            k.from_f32[kernels::index_of(to)](buffer, out + i * 2, count);
        }
    }
}

// Copies the rows at ascending `indices` of `src` (rows of `row_bytes`; index
// i is row i - first) to consecutive rows of `dst`: the copy step of compaction. A run of
// consecutive indices goes as one memcpy (a streaming window is two copies,
// not thousands of row copies), and the rows a few indices ahead are
// prefetched while one is copied, since the kept rows of a scored head are
// scattered and each would otherwise wait for memory.
inline void gather_rows(unsigned char* dst, const unsigned char* src, std::size_t row_bytes,
                        const std::uint32_t* indices, std::size_t count, std::size_t first = 0) noexcept {
    constexpr std::size_t ahead = 8;
    std::size_t i = 0;
    while (i < count) {
        std::size_t run = 1;
        while (i + run < count && indices[i + run] == indices[i] + run) ++run;
#if defined(__GNUC__) || defined(__clang__)
        if (i + ahead < count) {
            const unsigned char* next = src + (indices[i + ahead] - first) * row_bytes;
            for (std::size_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(next + line);
        }
#endif
        std::memcpy(dst + i * row_bytes, src + (indices[i] - first) * row_bytes, run * row_bytes);
        i += run;
    }
}

} // namespace detail

class dense_rows {
public:
    dense_rows(dtype type, std::size_t dim, memory_resource* resource) noexcept
        : type_(type), dim_(dim), keys_(resource), values_(resource) {}

    dtype type() const noexcept { return type_; }
    std::size_t dim() const noexcept { return dim_; }
    memory_resource* resource() const noexcept { return keys_.resource(); }
    std::size_t tokens() const noexcept { return keys_.size() / row_bytes(); }
    std::size_t row_bytes() const noexcept { return dim_ * size_of(type_); }

    const void* key_row(std::size_t t) const noexcept { return keys_.data() + t * row_bytes(); }
    const void* value_row(std::size_t t) const noexcept { return values_.data() + t * row_bytes(); }
    void* key_row(std::size_t t) noexcept { return keys_.data() + t * row_bytes(); }
    void* value_row(std::size_t t) noexcept { return values_.data() + t * row_bytes(); }

    // Bytes one more token costs: its key and value rows.
    std::size_t bytes_per_token() const noexcept { return 2 * row_bytes(); }

    // Bytes held (allocated), keys and values.
    std::size_t bytes() const noexcept { return keys_.bytes() + values_.bytes(); }
    // Bytes one attention call reads: every stored key and value row.
    std::size_t stored_bytes() const noexcept { return tokens() * bytes_per_token(); }

    // Rows both buffers can hold without allocating. The two grow one after
    // the other, so after a failed allocation the keys may hold more than the
    // values: the smaller is the room (bytes() / (2 * row_bytes()) would
    // overstate it).
    std::size_t capacity() const noexcept {
        const std::size_t keys = keys_.capacity(), values = values_.capacity();
        return (keys < values ? keys : values) / row_bytes();
    }

    // Room for `extra` more rows; the only step of an append that can throw
    // (std::bad_alloc, or kvc::error when the bytes do not fit std::size_t).
    void reserve_for_append(std::size_t extra) {
        const std::size_t bytes =
            detail::checked_mul(extra, row_bytes(), "kvc::dense_rows::reserve_for_append", "rows", "bytes per row");
        keys_.reserve_for_append(bytes);
        values_.reserve_for_append(bytes);
    }
    void reserve(std::size_t rows) {
        const std::size_t bytes = detail::checked_mul(rows, row_bytes(), "kvc::dense_rows::reserve", "rows", "bytes per row");
        keys_.reserve(bytes);
        values_.reserve(bytes);
    }

    // Appends one key and one value row given in `from` format. Capacity must
    // have been reserved: this never allocates and never throws.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        const std::size_t t = tokens();
        keys_.resize_within_capacity(keys_.size() + row_bytes());
        values_.resize_within_capacity(values_.size() + row_bytes());
        detail::convert_row(k, from, key, type_, key_row(t), dim_);
        detail::convert_row(k, from, value, type_, value_row(t), dim_);
    }

    // Keeps only the rows at `indices` (ascending, each < tokens()), moved to
    // the front in that order: the compaction step of eviction. Memory is
    // returned by a following shrink_to_fit().
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        const std::size_t bytes = row_bytes();
        for (std::size_t i = 0; i < count; ++i) {
            if (indices[i] == i) continue;
            std::memmove(key_row(i), key_row(indices[i]), bytes);
            std::memmove(value_row(i), value_row(indices[i]), bytes);
        }
        truncate(count);
    }

    // A copy holding only the rows at `indices` (ascending), in exactly the
    // memory they need: compaction in one pass, old storage untouched (so the
    // cache can prepare every head before changing any). May throw bad_alloc.
    dense_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        dense_rows out(type_, dim_, keys_.resource());
        out.reserve(count);
        const std::size_t bytes = row_bytes();
        detail::gather_rows(out.keys_.data(), keys_.data(), bytes, indices, count);
        detail::gather_rows(out.values_.data(), values_.data(), bytes, indices, count);
        out.keys_.resize_within_capacity(count * bytes);
        out.values_.resize_within_capacity(count * bytes);
        return out;
    }

    // Rows [first, first + count) widened to fp32, [count][dim]: what scorers read.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        for (std::size_t t = 0; t < count; ++t) k.to_f32[kernels::index_of(type_)](key_row(first + t), out + t * dim_, dim_);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        for (std::size_t t = 0; t < count; ++t)
            k.to_f32[kernels::index_of(type_)](value_row(first + t), out + t * dim_, dim_);
    }

    // Overwrites key row t with `row` (fp32, rounded to the storage format).
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* row) noexcept {
        detail::convert_row(k, dtype::f32, row, type_, key_row(t), dim_);
    }
    // Overwrites token t's key and value (fp32, rounded to the storage format): a merged slot.
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        detail::convert_row(k, dtype::f32, key, type_, key_row(t), dim_);
        detail::convert_row(k, dtype::f32, value, type_, value_row(t), dim_);
    }

    // Keeps the first `rows` rows.
    void truncate(std::size_t rows) noexcept {
        if (rows < tokens()) {
            keys_.resize_within_capacity(rows * row_bytes());
            values_.resize_within_capacity(rows * row_bytes());
        }
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

    // Folds every row into `state` for the query group described by `p`
    // (queries, group, scale, optional logits); fills in keys and values.
    void attend(const kernels::kernel_table& k, kernels::decode_problem p,
                const kernels::decode_state& state) const noexcept {
        p.keys = keys_.data();
        p.values = values_.data();
        p.key_stride = p.value_stride = dim_;
        p.tokens = tokens();
        p.dim = dim_;
        k.attend_partial[kernels::index_of(type_)](p, state);
    }

    // The first n rows as one segment of a store made of several: token t
    // here is token offset + t of the store in p.bias and p.logits, keys
    // whole (key_dim = dim). Nothing to do for n = 0.
    void attend_segment(const kernels::kernel_table& k, kernels::decode_problem p, const kernels::decode_state& state,
                        std::size_t n, std::size_t offset) const noexcept {
        if (n == 0) return;
        p.keys = keys_.data();
        p.values = values_.data();
        p.key_stride = p.value_stride = dim_;
        p.key_dim = 0;
        p.dim = dim_;
        p.tokens = n;
        p.bias = p.bias ? p.bias + offset : nullptr;
        p.logits = p.logits ? p.logits + offset : nullptr;
        k.attend_partial[kernels::index_of(type_)](p, state);
    }

    // Causal attention of the last p.chunk rows' queries over the rows.
    void prefill(const kernels::kernel_table& k, kernels::prefill_problem p, float* workspace) const noexcept {
        p.keys = keys_.data();
        p.values = values_.data();
        p.key_stride = p.value_stride = dim_;
        p.tokens = tokens();
        p.dim = dim_;
        k.prefill[kernels::index_of(type_)](p, workspace);
    }

    // Serialization (cache/serialization.hpp): the element type and dim as
    // shapes, the token count, then the key and value rows.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("dense_rows element type", static_cast<std::size_t>(self.type_));
        a.shape("dense_rows head_dim", self.dim_);
        std::size_t tokens = self.tokens();
        a.count("dense_rows tokens", tokens, std::size_t{1} << 31);
        const std::size_t bytes = detail::checked_mul(tokens, self.row_bytes(), "kvc::dense_rows", "rows", "bytes per row");
        a.elements("dense_rows keys", self.keys_, bytes);
        a.elements("dense_rows values", self.values_, bytes);
    }

private:
    dtype type_;
    std::size_t dim_;
    aligned_buffer<unsigned char> keys_;
    aligned_buffer<unsigned char> values_;
};

} // namespace kvc
