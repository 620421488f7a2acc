// kvc/storage/kivi_rows.hpp -- one KV head stored the KIVI way (Q2): per-channel key blocks,
// per-token value rows, and an fp16 residual window of the newest tokens.
//
//   sink (fp16)     key blocks + value rows (packed)     residual (fp16)
//   t < s           G tokens per key block               the newest tokens
//
// Layouts: kernels/quant/kivi_problem.hpp. Every non-sink token is first
// stored in the fp16 residual (exactly as full_cache stores it). When an
// append leaves R + G tokens there, the oldest G are quantized into one key
// block (per-channel scales and minimums over those G tokens) and G packed
// value rows (per token, groups of G channels), and leave the residual. So
// between calls the residual holds at most R + G - 1 tokens, and at least R
// once R + G tokens have been appended; blocks are always full. The sink
// rule is packed_rows's: a token goes to the fp16 sink while every token held
// is a sink and there are fewer than S.
//
// NaN/Inf: a non-finite element stays in the fp16 residual as full_cache
// would hold it. When its token is quantized: a non-finite value element
// turns that value group of that token to NaN (the row rules of
// kernels/quant/common.hpp); a non-finite key element is left out of its
// channel's range (code 0, the channel minimum, stands in for it) and the
// token's whole value row is stored as NaN instead. Either way attention of
// this head returns NaN while the token is held, as with full_cache, and no
// other token's stored key or value changes; evicting the token restores
// finite outputs.
//
// Eviction: compacted() builds a new head from the kept tokens by replaying
// them through the append rule above: kept sinks stay in the sink (exact);
// the other tokens are appended in order, tokens that were in the residual
// as their fp16 rows (exact while they stay in the residual), quantized
// tokens as their dequantized element values (fp32), which the residual
// rounds to fp16 and, where they form a block again, are re-quantized with
// that block's new per-channel ranges (each element within d_c / 2 of its
// fp16 value for the new block's scale d_c). keep() (in place, noexcept) is
// not provided: re-blocking may need more residual room than the head holds,
// so compressed_cache always compacts through compacted().
//
// Memory: five aligned_buffers from the cache's memory resource; bytes() is
// their capacity: sink rows, key blocks (codes, scales, minimums), packed
// value rows (codes, scales, minimums), residual rows. The residual's
// capacity grows geometrically up to R + G rows and no further.
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
#include "kvc/kernels/quant/common.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/kivi_problem.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

// What a KIVI head stores and how.
struct kivi_layout {
    kernels::quant_format format = kernels::quant_format::int4_asym; // int4_asym or int2_asym
    std::size_t group_size = 32;   // tokens per key block, channels per value group: 32, 64 or 128
    std::size_t residual = 128;    // R: fp16 tokens kept after a block is formed
    std::size_t sink_tokens = 0;   // leading tokens kept in fp16

    constexpr std::size_t key_block_bytes(std::size_t dim) const noexcept {
        return kernels::kivi_key_block_bytes(format, dim, group_size);
    }
    constexpr std::size_t value_row_bytes(std::size_t dim) const noexcept {
        return dim / group_size * kernels::info_of(format).group_bytes(group_size);
    }
    // Most tokens the residual holds during an append (R + G).
    constexpr std::size_t residual_capacity() const noexcept { return residual + group_size; }
    // Blocks formed when `extra` tokens are appended to a residual of `held` (< R + G) tokens.
    constexpr std::size_t blocks_formed(std::size_t held, std::size_t extra) const noexcept {
        const std::size_t n = held + extra;
        return n >= residual + group_size ? (n - residual) / group_size : 0;
    }
    static constexpr std::size_t fp16_token_bytes(std::size_t dim) noexcept { return 2 * dim * 2; }
};

namespace detail {
// Throws kvc::error unless `layout` and `dim` are supported; `who` starts the message.
inline void validate_kivi_layout(const kivi_layout& layout, std::size_t dim, const char* who) {
    require(layout.format == kernels::quant_format::int4_asym || layout.format == kernels::quant_format::int2_asym,
            who, ": expected 4 or 2 bits (int4_asym or int2_asym), got format code ", static_cast<int>(layout.format));
    require(layout.group_size == 32 || layout.group_size == 64 || layout.group_size == 128, who,
            ": expected group size 32, 64 or 128, got ", layout.group_size);
    require(dim > 0 && dim <= kernels::kivi_max_dim && dim % layout.group_size == 0, who,
            ": expected head_dim a multiple of the group size ", layout.group_size,
            " (values are grouped along channels) and at most ", kernels::kivi_max_dim, ", got head_dim ", dim);
    checked_add(layout.residual, layout.group_size, who, "residual", "group size"); // the residual's capacity
    require(layout.sink_tokens <= max_sink_tokens, who, ": expected at most ", max_sink_tokens, " sink tokens, got ",
            layout.sink_tokens);
}
} // namespace detail

class kivi_rows {
public:
    // Throws kvc::error for an unsupported layout or head dim (the message starts with `who`).
    kivi_rows(const kivi_layout& layout, std::size_t dim, memory_resource* resource, const char* who = "kvc::kivi_rows")
        : layout_((detail::validate_kivi_layout(layout, dim, who), layout)), dim_(dim),
          block_bytes_(layout.key_block_bytes(dim)), value_row_bytes_(layout.value_row_bytes(dim)),
          sink_(dtype::f16, dim, resource), residual_(dtype::f16, dim, resource), keys_(resource),
          values_(resource) {}

    const kivi_layout& layout() const noexcept { return layout_; }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t tokens() const noexcept { return sink_.tokens() + quantized_tokens() + residual_.tokens(); }
    std::size_t sink_tokens() const noexcept { return sink_.tokens(); }
    std::size_t quantized_tokens() const noexcept { return values_.size() / value_row_bytes_; }
    std::size_t residual_tokens() const noexcept { return residual_.tokens(); }
    std::size_t blocks() const noexcept { return keys_.size() / block_bytes_; }
    std::size_t key_block_bytes() const noexcept { return block_bytes_; }
    std::size_t value_row_bytes() const noexcept { return value_row_bytes_; }
    const unsigned char* key_block(std::size_t b) const noexcept { return keys_.data() + b * block_bytes_; }
    const unsigned char* value_row(std::size_t t) const noexcept { return values_.data() + t * value_row_bytes_; }
    const dense_rows& sink() const noexcept { return sink_; }
    const dense_rows& residual() const noexcept { return residual_; }

    // Bytes held (capacity): sink rows, key blocks, value rows, residual rows.
    std::size_t bytes() const noexcept { return sink_.bytes() + keys_.bytes() + values_.bytes() + residual_.bytes(); }
    // Bytes one attention call reads: every stored row, block header and code.
    std::size_t stored_bytes() const noexcept {
        return (sink_.tokens() + residual_.tokens()) * kivi_layout::fp16_token_bytes(dim_) + keys_.size() +
               values_.size();
    }
    // Bytes a quantized token costs in steady state (its share of a key block and its value row).
    std::size_t bytes_per_token() const noexcept { return block_bytes_ / layout_.group_size + value_row_bytes_; }

    // Room for `extra` more tokens; the only step of an append that may throw.
    void reserve_for_append(std::size_t extra) { grow(extra, false); }
    // Capacity for `rows` tokens in total (exact: no growth factor).
    void reserve(std::size_t rows) {
        if (rows > tokens()) grow(rows - tokens(), true);
    }

    // Stores one key and one value row given in `from` format, quantizing the
    // oldest G residual tokens when the residual reaches R + G. Capacity must
    // have been reserved: never allocates, never throws.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        if (quantized_tokens() + residual_.tokens() == 0 && sink_.tokens() < layout_.sink_tokens) {
            sink_.push_back(k, from, key, value);
            return;
        }
        push_body(k, from, key, value);
    }

    // A head holding only the tokens at `indices` (ascending, each < tokens()),
    // built by replaying them (see the header comment). May throw bad_alloc;
    // this head is untouched.
    kivi_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        const kernels::kernel_table& k = kernels::active();
        kivi_rows out(layout_, dim_, keys_.resource());
        const std::size_t sinks = sink_.tokens();
        std::size_t kept_sinks = 0;
        while (kept_sinks < count && indices[kept_sinks] < sinks) ++kept_sinks;
        if (kept_sinks) out.sink_.reserve(kept_sinks);
        out.grow_body(count - kept_sinks, true);
        for (std::size_t i = 0; i < kept_sinks; ++i)
            out.sink_.push_back(k, dtype::f16, sink_.key_row(indices[i]), sink_.value_row(indices[i]));
        const std::size_t quantized = quantized_tokens();
        float key[kernels::kivi_max_dim], value[kernels::kivi_max_dim];
        for (std::size_t i = kept_sinks; i < count; ++i) {
            const std::size_t t = indices[i] - sinks;
            if (t < quantized) {
                decode_quantized(k, t, key, value);
                out.push_body(k, dtype::f32, key, value);
            } else {
                out.push_body(k, dtype::f16, residual_.key_row(t - quantized), residual_.value_row(t - quantized));
            }
        }
        return out;
    }

    // Tokens [first, first + count) widened to fp32, [count][dim]: exactly the
    // values attention uses (fp16 rows, or the packed elements' values).
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
        residual_.shrink_to_fit();
    }
    void clear() noexcept {
        sink_.clear();
        keys_.clear();
        values_.clear();
        residual_.clear();
    }
    void release() noexcept {
        sink_.release();
        keys_.release();
        values_.release();
        residual_.release();
    }

    // Folds every token into `state` for the query group described by `p`.
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        k.kivi.attend_partial(problem(p, tokens()), state);
    }

    // Causal attention of the last p.chunk tokens' queries: one decode pass
    // over the visible prefix per query (kernels::common::prefill_by_decode).
    void prefill(const kernels::kernel_table& k, kernels::prefill_problem p, float* workspace) const noexcept {
        p.dim = dim_;
        p.tokens = tokens();
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, tokens(), workspace,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                k.kivi.attend_partial(problem(d, visible), state);
            });
    }

private:
    // Capacity for `extra` more tokens (sink share first), exactly or with growth.
    void grow(std::size_t extra, bool exact) {
        std::size_t to_sink = 0;
        if (quantized_tokens() + residual_.tokens() == 0 && sink_.tokens() < layout_.sink_tokens) {
            const std::size_t room = layout_.sink_tokens - sink_.tokens();
            to_sink = extra < room ? extra : room;
        }
        if (to_sink) {
            if (exact) sink_.reserve(sink_.tokens() + to_sink);
            else sink_.reserve_for_append(to_sink);
        }
        grow_body(extra - to_sink, exact);
    }

    // Capacity for `extra` more tokens past the sink.
    void grow_body(std::size_t extra, bool exact) {
        constexpr const char* who = "kvc::kivi_rows::reserve";
        const std::size_t held = residual_.tokens();
        detail::checked_add(held, extra, who, "residual tokens", "extra tokens"); // blocks_formed adds them
        const std::size_t blocks = layout_.blocks_formed(held, extra);
        const std::size_t cap = layout_.residual_capacity();
        const std::size_t peak = held + extra < cap ? held + extra : cap;
        // Both residual buffers' room (after a failed growth the keys may have more than the values).
        const std::size_t capacity = residual_.capacity();
        if (peak > capacity) {
            std::size_t target = exact ? peak : capacity + capacity / 2;
            target = target < peak ? peak : (target > cap ? cap : target);
            residual_.reserve(target);
        }
        const std::size_t key_bytes = detail::checked_mul(blocks, block_bytes_, who, "key blocks", "bytes per block");
        const std::size_t value_bytes = detail::checked_mul(
            detail::checked_mul(blocks, layout_.group_size, who, "key blocks", "tokens per block"), value_row_bytes_,
            who, "value rows", "bytes per row");
        if (exact) {
            keys_.reserve(detail::checked_add(keys_.size(), key_bytes, who, "bytes held", "bytes needed"));
            values_.reserve(detail::checked_add(values_.size(), value_bytes, who, "bytes held", "bytes needed"));
        } else {
            keys_.reserve_for_append(key_bytes);
            values_.reserve_for_append(value_bytes);
        }
    }

    void push_body(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        residual_.push_back(k, from, key, value);
        if (residual_.tokens() == layout_.residual_capacity()) form_block(k);
    }

    // The oldest G residual tokens -> one key block and G value rows.
    void form_block(const kernels::kernel_table& k) noexcept {
        const std::size_t group = layout_.group_size;
        const std::size_t t = quantized_tokens();
        keys_.resize_within_capacity(keys_.size() + block_bytes_);
        values_.resize_within_capacity(values_.size() + group * value_row_bytes_);
        unsigned char* block = keys_.data() + keys_.size() - block_bytes_;
        unsigned char non_finite[128];
        k.kivi.quantize_key_block[kernels::kivi_slot(layout_.format)](
            static_cast<const std::uint16_t*>(residual_.key_row(0)), dim_, dim_, group, block, non_finite);
        const auto quantize_row = k.quant.quantize_row[kernels::index_of(layout_.format)][kernels::index_of(dtype::f16)];
        for (std::size_t i = 0; i < group; ++i) {
            unsigned char* row = values_.data() + (t + i) * value_row_bytes_;
            quantize_row(residual_.value_row(i), row, dim_, group);
            if (non_finite[i]) poison_value_row(row);
        }
        // Drop the G oldest rows: the rest move to the front.
        const std::size_t rest = residual_.tokens() - group;
        const std::size_t row_bytes = residual_.row_bytes();
        std::memmove(residual_.key_row(0), residual_.key_row(group), rest * row_bytes);
        std::memmove(residual_.value_row(0), residual_.value_row(group), rest * row_bytes);
        residual_.truncate(rest);
    }

    // Every group of a packed value row decodes to NaN (NaN scale and minimum, codes 0).
    void poison_value_row(unsigned char* row) const noexcept {
        const std::size_t group_bytes = kernels::info_of(layout_.format).group_bytes(layout_.group_size);
        for (std::size_t g = 0; g < dim_ / layout_.group_size; ++g) {
            unsigned char* group = row + g * group_bytes;
            std::memset(group, 0, group_bytes);
            kernels::quant_common::store_u16<kernels::reference_arch>(group, kernels::quant_common::half_nan_bits);
            kernels::quant_common::store_u16<kernels::reference_arch>(group + 2, kernels::quant_common::half_nan_bits);
        }
    }

    // Quantized token t's key and value element values.
    void decode_quantized(const kernels::kernel_table& k, std::size_t t, float* key, float* value) const noexcept {
        if (key)
            k.kivi.dequantize_key[kernels::kivi_slot(layout_.format)](key_block(t / layout_.group_size), dim_,
                                                                      t % layout_.group_size, key);
        if (value)
            k.quant.dequantize_row[kernels::index_of(layout_.format)](value_row(t), value, dim_, layout_.group_size);
    }

    void decode(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out,
                bool keys) const noexcept {
        const std::size_t sinks = sink_.tokens(), quantized = quantized_tokens();
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            float* row = out + i * dim_;
            if (t < sinks) {
                if (keys) sink_.decode_keys(k, t, 1, row);
                else sink_.decode_values(k, t, 1, row);
            } else if (t - sinks < quantized) {
                decode_quantized(k, t - sinks, keys ? row : nullptr, keys ? nullptr : row);
            } else if (keys) {
                residual_.decode_keys(k, t - sinks - quantized, 1, row);
            } else {
                residual_.decode_values(k, t - sinks - quantized, 1, row);
            }
        }
    }

    static kernels::dense_segment segment(const dense_rows& rows, std::size_t tokens) noexcept {
        kernels::dense_segment s;
        s.keys = rows.key_row(0);
        s.values = rows.value_row(0);
        s.stride = rows.dim();
        s.tokens = tokens;
        return s;
    }

    // The kernel problem over the first `visible` tokens for the query group of `p`.
    kernels::kivi_decode_problem problem(const kernels::decode_problem& p, std::size_t visible) const noexcept {
        const std::size_t sinks = visible < sink_.tokens() ? visible : sink_.tokens();
        const std::size_t after_sinks = visible - sinks;
        const std::size_t quantized = after_sinks < quantized_tokens() ? after_sinks : quantized_tokens();
        kernels::kivi_decode_problem q;
        q.sink = segment(sink_, sinks);
        q.key_blocks = keys_.data();
        q.key_block_bytes = block_bytes_;
        q.values = values_.data();
        q.value_row_bytes = value_row_bytes_;
        q.quantized = quantized;
        q.format = layout_.format;
        q.group_size = layout_.group_size;
        q.residual = segment(residual_, after_sinks - quantized);
        kernels::queries_of(q) = p;
        q.dim = dim_;
        return q;
    }

public:
    // Serialization (cache/serialization.hpp): the layout as shapes, the sink
    // rows, the quantized blocks (keys per block, values per token), the residual.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("kivi_rows format", static_cast<std::size_t>(self.layout_.format));
        a.shape("kivi_rows group size", self.layout_.group_size);
        a.shape("kivi_rows residual", self.layout_.residual);
        a.shape("kivi_rows sink tokens", self.layout_.sink_tokens);
        a.shape("kivi_rows head_dim", self.dim_);
        dense_rows::transfer(self.sink_, a);
        a.check(self.sink_.tokens() <= self.layout_.sink_tokens, "kivi_rows holds ", self.sink_.tokens(),
                " sink tokens, expected at most ", self.layout_.sink_tokens);
        std::size_t blocks = self.blocks();
        a.count("kivi_rows blocks", blocks, (std::size_t{1} << 31) / self.layout_.group_size);
        a.elements("kivi_rows key blocks", self.keys_, blocks * self.block_bytes_);
        a.elements("kivi_rows values", self.values_, blocks * self.layout_.group_size * self.value_row_bytes_);
        dense_rows::transfer(self.residual_, a);
        a.check(self.residual_.tokens() < self.layout_.residual_capacity(), "kivi_rows holds ",
                self.residual_.tokens(), " residual tokens, expected fewer than ", self.layout_.residual_capacity());
    }

private:
    kivi_layout layout_;
    std::size_t dim_;
    std::size_t block_bytes_, value_row_bytes_;
    dense_rows sink_;
    dense_rows residual_;
    aligned_buffer<unsigned char> keys_;
    aligned_buffer<unsigned char> values_;
};

} // namespace kvc
