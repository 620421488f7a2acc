// kvc/storage/packed_rows.hpp -- key and value rows of one KV head in a packed block format.
//
// The storage of the Q1 block codecs (policy/quantization/block.hpp) and the
// one later codecs reuse: rows of `dim` elements quantized per token in groups
// of G along the head dim (kernels/quant/format.hpp has the byte layouts),
// keys and values each in their own format (Q5), optionally preceded by the
// first `sink_tokens` tokens kept in fp16 (Q9 sink protection).
//
//   sink (dense_rows, fp16)   body (packed)
//   t = 0 .. s-1              t = s .. tokens-1      s <= sink_tokens
//
// A token goes to the fp16 segment while every token held so far is there and
// there are fewer than sink_tokens of them; all later tokens are packed. After
// an eviction (keep) that removes sink tokens, later tokens still go to the
// packed body, so the sequence order is always sink rows then packed rows.
// Attention runs the fp16 rows and then the packed rows through one running
// softmax state (the decode partials chain), in one kernel call.
//
// Memory: keys, values and the sink segment are aligned_buffers from the
// cache's memory resource, and bytes() is their capacity in bytes: packed
// payload, scales and minimums (all inside the groups), and the fp16 sink rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

// What a packed head stores and how.
struct packed_layout {
    kernels::quant_format key_format = kernels::quant_format::int8_sym;
    kernels::quant_format value_format = kernels::quant_format::int8_sym;
    std::size_t group_size = 32;  // 32, 64 or 128 elements per scale
    std::size_t sink_tokens = 0;  // leading tokens kept in fp16

    // Bytes of one packed key (value) row of `dim` elements.
    constexpr std::size_t key_row_bytes(std::size_t dim) const noexcept {
        return dim / group_size * kernels::info_of(key_format).group_bytes(group_size);
    }
    constexpr std::size_t value_row_bytes(std::size_t dim) const noexcept {
        return dim / group_size * kernels::info_of(value_format).group_bytes(group_size);
    }
    // Bytes per token of a packed head (key and value rows) and of a sink token.
    constexpr std::size_t packed_token_bytes(std::size_t dim) const noexcept {
        return key_row_bytes(dim) + value_row_bytes(dim);
    }
    static constexpr std::size_t sink_token_bytes(std::size_t dim) noexcept { return 2 * dim * 2; }
};

namespace detail {
// Throws kvc::error unless `layout` and `dim` are supported; `who` starts the message.
inline void validate_packed_layout(const packed_layout& layout, std::size_t dim, const char* who) {
    require(kernels::is_valid(layout.key_format) && kernels::is_valid(layout.value_format), who,
            ": expected key and value formats int8_sym, int4_sym, int4_asym, int2_asym, fp8_e4m3 or fp8_e5m2, got codes ",
            static_cast<int>(layout.key_format), " and ", static_cast<int>(layout.value_format));
    require(layout.group_size == 32 || layout.group_size == 64 || layout.group_size == 128, who,
            ": expected group size 32, 64 or 128, got ", layout.group_size);
    require(dim > 0 && dim % layout.group_size == 0, who, ": expected head_dim a multiple of the group size ",
            layout.group_size, ", got head_dim ", dim);
    // The attention kernels quantize the query into fixed buffers (kernels/quant/common.hpp).
    require(dim <= kernels::quant_common::query_max_dim, who, ": expected head_dim at most ",
            kernels::quant_common::query_max_dim, ", got ", dim);
    require(layout.sink_tokens <= max_sink_tokens, who, ": expected at most ", max_sink_tokens, " sink tokens, got ",
            layout.sink_tokens);
}
} // namespace detail

class packed_rows {
public:
    // Throws kvc::error for an unsupported layout or head dim (the message starts with `who`).
    packed_rows(const packed_layout& layout, std::size_t dim, memory_resource* resource,
                const char* who = "kvc::packed_rows")
        : layout_((detail::validate_packed_layout(layout, dim, who), layout)), dim_(dim),
          key_row_bytes_(layout.key_row_bytes(dim)), value_row_bytes_(layout.value_row_bytes(dim)),
          sink_(dtype::f16, dim, resource), keys_(resource), values_(resource) {}

    const packed_layout& layout() const noexcept { return layout_; }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t tokens() const noexcept { return sink_.tokens() + packed_tokens(); }
    std::size_t sink_tokens() const noexcept { return sink_.tokens(); }
    std::size_t packed_tokens() const noexcept { return keys_.size() / key_row_bytes_; }
    std::size_t key_row_bytes() const noexcept { return key_row_bytes_; }
    std::size_t value_row_bytes() const noexcept { return value_row_bytes_; }
    const dense_rows& sink() const noexcept { return sink_; }
    const unsigned char* packed_key_row(std::size_t t) const noexcept { return keys_.data() + t * key_row_bytes_; }
    const unsigned char* packed_value_row(std::size_t t) const noexcept {
        return values_.data() + t * value_row_bytes_;
    }

    // Bytes held (capacity): packed rows with their scales and minimums, and the fp16 sink rows.
    std::size_t bytes() const noexcept { return keys_.bytes() + values_.bytes() + sink_.bytes(); }
    // Bytes one attention call reads: the packed rows (scales included) and the fp16 sink rows.
    std::size_t stored_bytes() const noexcept {
        return packed_tokens() * (key_row_bytes_ + value_row_bytes_) + sink_.stored_bytes();
    }

    // Room for `extra` more tokens; the only step of an append that may throw.
    void reserve_for_append(std::size_t extra) {
        constexpr const char* who = "kvc::packed_rows::reserve_for_append";
        const std::size_t to_sink = sink_share(extra);
        const std::size_t key_bytes = detail::checked_mul(extra - to_sink, key_row_bytes_, who, "rows", "key row bytes");
        const std::size_t value_bytes =
            detail::checked_mul(extra - to_sink, value_row_bytes_, who, "rows", "value row bytes");
        if (to_sink) sink_.reserve_for_append(to_sink);
        keys_.reserve_for_append(key_bytes);
        values_.reserve_for_append(value_bytes);
    }
    // Capacity for `rows` tokens in total (exactly: no growth factor).
    void reserve(std::size_t rows) {
        const std::size_t sink_rows = packed_tokens() == 0 && rows > 0
                                          ? (rows < layout_.sink_tokens ? rows : layout_.sink_tokens)
                                          : sink_.tokens();
        const std::size_t sink_capacity = sink_rows > sink_.tokens() ? sink_rows : sink_.tokens();
        const std::size_t packed = rows > sink_capacity ? rows - sink_capacity : 0;
        constexpr const char* who = "kvc::packed_rows::reserve";
        const std::size_t key_bytes = detail::checked_mul(packed, key_row_bytes_, who, "rows", "key row bytes");
        const std::size_t value_bytes = detail::checked_mul(packed, value_row_bytes_, who, "rows", "value row bytes");
        if (sink_capacity) sink_.reserve(sink_capacity);
        keys_.reserve(key_bytes);
        values_.reserve(value_bytes);
    }

    // Encodes one key and one value row given in `from` format. Capacity must
    // have been reserved: never allocates, never throws. NaN/Inf: see
    // kernels/quant/common.hpp (only the affected group of this row turns NaN).
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        if (packed_tokens() == 0 && sink_.tokens() < layout_.sink_tokens) {
            sink_.push_back(k, from, key, value);
            return;
        }
        const std::size_t t = packed_tokens();
        keys_.resize_within_capacity(keys_.size() + key_row_bytes_);
        values_.resize_within_capacity(values_.size() + value_row_bytes_);
        const int source = kernels::index_of(from);
        k.quant.quantize_row[kernels::index_of(layout_.key_format)][source](key, keys_.data() + t * key_row_bytes_,
                                                                          dim_, layout_.group_size);
        k.quant.quantize_row[kernels::index_of(layout_.value_format)][source](
            value, values_.data() + t * value_row_bytes_, dim_, layout_.group_size);
    }

    // Re-encodes token t from fp32 rows (a merged slot): an fp16 sink row, or
    // a packed row quantized exactly as push_back would have.
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        if (t < sink_.tokens()) {
            sink_.store_row(k, t, key, value);
            return;
        }
        const std::size_t r = t - sink_.tokens();
        const int source = kernels::index_of(dtype::f32);
        k.quant.quantize_row[kernels::index_of(layout_.key_format)][source](key, keys_.data() + r * key_row_bytes_,
                                                                          dim_, layout_.group_size);
        k.quant.quantize_row[kernels::index_of(layout_.value_format)][source](
            value, values_.data() + r * value_row_bytes_, dim_, layout_.group_size);
    }

    // A copy holding only the tokens at `indices` (ascending), in exactly the
    // memory they need; the rows' bytes are copied as they are (eviction never
    // re-quantizes). Old storage untouched; may throw bad_alloc.
    packed_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        packed_rows out(layout_, dim_, keys_.resource());
        const std::size_t sinks = sink_.tokens();
        std::size_t kept_sinks = 0;
        while (kept_sinks < count && indices[kept_sinks] < sinks) ++kept_sinks;
        if (kept_sinks != 0) out.sink_ = sink_.compacted(indices, kept_sinks);
        const std::size_t packed = count - kept_sinks;
        out.keys_.reserve(packed * key_row_bytes_);
        out.values_.reserve(packed * value_row_bytes_);
        // Packed row r holds token sinks + r.
        detail::gather_rows(out.keys_.data(), keys_.data(), key_row_bytes_, indices + kept_sinks, packed, sinks);
        detail::gather_rows(out.values_.data(), values_.data(), value_row_bytes_, indices + kept_sinks, packed, sinks);
        out.keys_.resize_within_capacity(packed * key_row_bytes_);
        out.values_.resize_within_capacity(packed * value_row_bytes_);
        return out;
    }

    // Keeps the tokens at `indices` (ascending, each < tokens()), in that order.
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        const std::size_t sinks = sink_.tokens();
        std::size_t kept_sinks = 0;
        while (kept_sinks < count && indices[kept_sinks] < sinks) ++kept_sinks;
        sink_.keep(indices, kept_sinks);
        for (std::size_t i = kept_sinks; i < count; ++i) {
            const std::size_t from = indices[i] - sinks, to = i - kept_sinks;
            if (from == to) continue;
            std::memmove(keys_.data() + to * key_row_bytes_, keys_.data() + from * key_row_bytes_, key_row_bytes_);
            std::memmove(values_.data() + to * value_row_bytes_, values_.data() + from * value_row_bytes_,
                         value_row_bytes_);
        }
        keys_.resize_within_capacity((count - kept_sinks) * key_row_bytes_);
        values_.resize_within_capacity((count - kept_sinks) * value_row_bytes_);
    }

    // Tokens [first, first + count) widened to fp32, [count][dim]: exactly the
    // values attention uses (fp16 rows, or the packed rows' element values).
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        decode(k, first, count, out, true);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        decode(k, first, count, out, false);
    }

    void shrink_to_fit() {
        sink_.shrink_to_fit();
        keys_.shrink_to_fit();
        values_.shrink_to_fit();
    }
    void clear() noexcept {
        sink_.clear();
        keys_.clear();
        values_.clear();
    }
    void release() noexcept {
        sink_.release();
        keys_.release();
        values_.release();
    }

    // Folds every token into `state` for the query group described by `p`
    // (queries, group, scale, optional bias and logits over all tokens).
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        kernels::quant_decode_problem q;
        q.sink = sink_segment();
        q.rows = rows();
        q.tokens = packed_tokens();
        kernels::queries_of(q) = p;
        q.dim = dim_;
        k.quant.attend_partial(q, state);
    }

    // Causal attention of the last p.chunk tokens' queries over the tokens.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        kernels::quant_prefill_problem q;
        q.sink = sink_segment();
        q.rows = rows();
        q.tokens = packed_tokens();
        q.chunk = p.chunk;
        q.dim = dim_;
        q.group = p.group;
        q.queries = p.queries;
        q.query_token_stride = p.query_token_stride;
        q.query_head_stride = p.query_head_stride;
        q.out = p.out;
        q.out_token_stride = p.out_token_stride;
        q.out_head_stride = p.out_head_stride;
        q.scale = p.scale;
        q.mass = p.mass;
        q.bias = p.bias;
        k.quant.prefill(q, workspace);
    }

private:
    // Of `extra` tokens about to be appended, how many land in the fp16 segment.
    std::size_t sink_share(std::size_t extra) const noexcept {
        if (packed_tokens() != 0 || sink_.tokens() >= layout_.sink_tokens) return 0;
        const std::size_t room = layout_.sink_tokens - sink_.tokens();
        return extra < room ? extra : room;
    }

    kernels::dense_segment sink_segment() const noexcept {
        kernels::dense_segment s;
        s.keys = sink_.key_row(0);
        s.values = sink_.value_row(0);
        s.stride = dim_;
        s.tokens = sink_.tokens();
        return s;
    }

    kernels::quant_rows rows() const noexcept {
        kernels::quant_rows r;
        r.keys = keys_.data();
        r.values = values_.data();
        r.key_row_bytes = key_row_bytes_;
        r.value_row_bytes = value_row_bytes_;
        r.key_format = layout_.key_format;
        r.value_format = layout_.value_format;
        r.group_size = layout_.group_size;
        return r;
    }

    void decode(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out,
                bool keys) const noexcept {
        const std::size_t sinks = sink_.tokens();
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            float* row = out + i * dim_;
            if (t < sinks) {
                if (keys) sink_.decode_keys(k, t, 1, row);
                else sink_.decode_values(k, t, 1, row);
            } else if (keys) {
                k.quant.dequantize_row[kernels::index_of(layout_.key_format)](packed_key_row(t - sinks), row, dim_,
                                                                              layout_.group_size);
            } else {
                k.quant.dequantize_row[kernels::index_of(layout_.value_format)](packed_value_row(t - sinks), row, dim_,
                                                                                layout_.group_size);
            }
        }
    }

public:
    // Serialization (cache/serialization.hpp): the layout as shapes, the fp16
    // sink rows, then the packed rows.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("packed_rows key format", static_cast<std::size_t>(self.layout_.key_format));
        a.shape("packed_rows value format", static_cast<std::size_t>(self.layout_.value_format));
        a.shape("packed_rows group size", self.layout_.group_size);
        a.shape("packed_rows sink tokens", self.layout_.sink_tokens);
        a.shape("packed_rows head_dim", self.dim_);
        dense_rows::transfer(self.sink_, a);
        a.check(self.sink_.tokens() <= self.layout_.sink_tokens, "packed_rows holds ", self.sink_.tokens(),
                " sink tokens, expected at most ", self.layout_.sink_tokens);
        std::size_t packed = self.packed_tokens();
        a.count("packed_rows tokens", packed, std::size_t{1} << 31);
        a.elements("packed_rows keys", self.keys_, packed * self.key_row_bytes_);
        a.elements("packed_rows values", self.values_, packed * self.value_row_bytes_);
    }

private:
    packed_layout layout_;
    std::size_t dim_;
    std::size_t key_row_bytes_, value_row_bytes_;
    dense_rows sink_;
    aligned_buffer<unsigned char> keys_;
    aligned_buffer<unsigned char> values_;
};

} // namespace kvc
