// kvc/storage/pruned_rows.hpp -- a head store whose older keys keep only some
// of their channels (the store of P3 ThinK, policy/projection/think.hpp).
//
// Layout, in token order:
//   body   tokens 0 .. b-1    keys: the kept channels only (`kept` elements a
//                             row, in the storage format); values: whole rows
//   recent tokens b .. n-1    a dense_rows of whole rows, where appends land
//   channels                  the kept channel indices, ascending (uint16),
//                             fixed by the first pruning and reused by every later one
// pruned(channels, count) moves the oldest `count` recent rows into the body,
// copying the kept key elements as stored (no rounding) and the values whole.
//
// Attention: the kept channels of each query are gathered on the stack and
// the body is attended with key_dim = kept (the plain-row kernels read only
// those key elements), then the recent rows with the whole query, into the
// same running state. Values are whole in both parts, so the output needs no
// transform. Prefill runs one decode pass per chunk query
// (kernels::common::prefill_by_decode): the chunk's rows are always recent.
//
// decode_keys returns body keys with the pruned channels as 0, which is
// exactly what their logits see. Not offered: store_key / store_row (no
// re-rotation or merging into pruned rows), bytes_per_token (byte budgets).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

class pruned_rows {
public:
    explicit pruned_rows(dense_rows recent)
        : type_(recent.type()), dim_(recent.dim()), channels_(recent.resource()),
          body_keys_(recent.resource()), body_values_(recent.resource()), recent_(std::move(recent)) {}

    dtype type() const noexcept { return type_; }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t tokens() const noexcept { return body_tokens() + recent_.tokens(); }
    std::size_t body_tokens() const noexcept { return body_values_.size() / value_row_bytes(); }
    const dense_rows& recent() const noexcept { return recent_; }
    // Kept key channels of the body, ascending (empty until the first pruning).
    const std::uint16_t* channels() const noexcept { return channels_.data(); }
    std::size_t kept_channels() const noexcept { return channels_.size(); }

    // Everything held: body keys and values, the channel list, the recent rows.
    std::size_t bytes() const noexcept {
        return channels_.bytes() + body_keys_.bytes() + body_values_.bytes() + recent_.bytes();
    }

    void reserve_for_append(std::size_t extra) { recent_.reserve_for_append(extra); }
    void reserve(std::size_t rows) { recent_.reserve(rows > body_tokens() ? rows - body_tokens() : 0); }
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        recent_.push_back(k, from, key, value);
    }

    // A store of the tokens at ascending `indices`, in exactly the memory they need.
    pruned_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        const std::size_t body = body_tokens();
        std::size_t in_body = 0;
        while (in_body < count && indices[in_body] < body) ++in_body;
        std::vector<std::uint32_t> recent_indices(indices + in_body, indices + count);
        for (std::uint32_t& t : recent_indices) t -= static_cast<std::uint32_t>(body);
        pruned_rows out(recent_.compacted(recent_indices.data(), recent_indices.size()));
        out.channels_ = channels_;
        out.body_keys_.reserve(in_body * key_row_bytes());
        out.body_values_.reserve(in_body * value_row_bytes());
        detail::gather_rows(out.body_keys_.data(), body_keys_.data(), key_row_bytes(), indices, in_body);
        detail::gather_rows(out.body_values_.data(), body_values_.data(), value_row_bytes(), indices, in_body);
        out.body_keys_.resize_within_capacity(in_body * key_row_bytes());
        out.body_values_.resize_within_capacity(in_body * value_row_bytes());
        return out;
    }

    // A store whose body also holds the oldest `count` recent rows, keys cut
    // to `channels` (ascending, `kept` of them; must equal the body's own once
    // it has any). Old storage untouched; may throw bad_alloc.
    pruned_rows pruned(const std::uint16_t* channels, std::size_t kept, std::size_t count) const {
        const std::size_t body = body_tokens(), es = size_of(type_);
        pruned_rows out(dense_rows(type_, dim_, body_values_.resource()));
        out.channels_.reserve(kept);
        std::memcpy(out.channels_.data(), channels, kept * sizeof(std::uint16_t));
        out.channels_.resize_within_capacity(kept);
        const std::size_t key_bytes = kept * es, value_bytes = value_row_bytes();
        out.body_keys_.reserve((body + count) * key_bytes);
        out.body_values_.reserve((body + count) * value_bytes);
        std::vector<std::uint32_t> rest(recent_.tokens() - count);
        for (std::size_t i = 0; i < rest.size(); ++i) rest[i] = static_cast<std::uint32_t>(count + i);
        out.recent_ = recent_.compacted(rest.data(), rest.size());
        if (body != 0) std::memcpy(out.body_keys_.data(), body_keys_.data(), body * key_bytes);
        if (body != 0) std::memcpy(out.body_values_.data(), body_values_.data(), body * value_bytes);
        for (std::size_t t = 0; t < count; ++t) {
            const auto* key = static_cast<const unsigned char*>(recent_.key_row(t));
            unsigned char* to = out.body_keys_.data() + (body + t) * key_bytes;
            for (std::size_t i = 0; i < kept; ++i) std::memcpy(to + i * es, key + std::size_t{channels[i]} * es, es);
            std::memcpy(out.body_values_.data() + (body + t) * value_bytes, recent_.value_row(t), value_bytes);
        }
        out.body_keys_.resize_within_capacity((body + count) * key_bytes);
        out.body_values_.resize_within_capacity((body + count) * value_bytes);
        return out;
    }

    // Rows [first, first + count) widened to fp32: body keys with their pruned channels 0.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        const std::size_t body = body_tokens(), kept = kept_channels();
        float narrow[max_head_dim];
        std::size_t t = first;
        for (; t < first + count && t < body; ++t) {
            float* row = out + (t - first) * dim_;
            for (std::size_t d = 0; d < dim_; ++d) row[d] = 0.0f;
            k.to_f32[kernels::index_of(type_)](body_keys_.data() + t * key_row_bytes(), narrow, kept);
            for (std::size_t i = 0; i < kept; ++i) row[channels_[i]] = narrow[i];
        }
        if (t < first + count) recent_.decode_keys(k, t - body, first + count - t, out + (t - first) * dim_);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        const std::size_t body = body_tokens();
        std::size_t t = first;
        for (; t < first + count && t < body; ++t)
            k.to_f32[kernels::index_of(type_)](body_values_.data() + t * value_row_bytes(), out + (t - first) * dim_,
                                                dim_);
        if (t < first + count) recent_.decode_values(k, t - body, first + count - t, out + (t - first) * dim_);
    }

    void shrink_to_fit() {
        channels_.shrink_to_fit();
        body_keys_.shrink_to_fit();
        body_values_.shrink_to_fit();
        recent_.shrink_to_fit();
    }
    void release() noexcept {
        channels_.release();
        body_keys_.release();
        body_values_.release();
        recent_.release();
    }

    // Decode attention: the body through its gathered query channels, then the recent rows.
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        attend_body(k, p, state);
        recent_.attend_segment(k, p, state, recent_.tokens(), body_tokens());
    }

    // Causal attention of the last p.chunk rows' queries (all recent) over the rows.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        if (body_tokens() == 0) {
            recent_.prefill(k, p, workspace);
            return;
        }
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, tokens(), workspace,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                attend_body(k, d, state);
                recent_.attend_segment(k, d, state, visible - body_tokens(), body_tokens());
            });
    }

private:
    std::size_t key_row_bytes() const noexcept { return kept_channels() * size_of(type_); }
    std::size_t value_row_bytes() const noexcept { return dim_ * size_of(type_); }

    // The body rows, a few query heads at a time: each head's kept channels
    // gathered on the stack (8 KiB), attended with key_dim = kept.
    void attend_body(const kernels::kernel_table& k, const kernels::decode_problem& p,
                     const kernels::decode_state& state) const noexcept {
        const std::size_t body = body_tokens(), kept = kept_channels();
        if (body == 0) return;
        constexpr std::size_t budget = 2 * max_head_dim;
        alignas(64) float queries[budget];
        const std::size_t heads_per_pass = budget / kept;
        for (std::size_t g0 = 0; g0 < p.group; g0 += heads_per_pass) {
            const std::size_t heads = p.group - g0 < heads_per_pass ? p.group - g0 : heads_per_pass;
            for (std::size_t g = 0; g < heads; ++g)
                for (std::size_t i = 0; i < kept; ++i)
                    queries[g * kept + i] = p.queries[(g0 + g) * p.query_stride + channels_[i]];
            kernels::decode_problem q = p;
            q.group = heads;
            q.queries = queries;
            q.query_stride = kept;
            q.key_dim = kept;
            q.dim = dim_;
            q.keys = body_keys_.data();
            q.values = body_values_.data();
            q.key_stride = kept;
            q.value_stride = dim_;
            q.tokens = body;
            q.logits = p.logits ? p.logits + g0 * p.logits_stride : nullptr;
            const kernels::decode_state into{state.max + g0, state.sum + g0, state.acc + g0 * dim_};
            k.attend_partial[kernels::index_of(type_)](q, into);
        }
    }


public:
    // Serialization (cache/serialization.hpp): element type and dim as
    // shapes, the kept channels, the body rows, the recent rows; on load the
    // channels must ascend below dim (attention gathers queries by them).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("pruned_rows element type", static_cast<std::size_t>(self.type_));
        a.shape("pruned_rows head_dim", self.dim_);
        std::size_t kept = self.channels_.size(), body = self.body_tokens();
        a.count("pruned_rows kept channels", kept, self.dim_);
        a.elements("pruned_rows channels", self.channels_, kept);
        a.count("pruned_rows body tokens", body, kept == 0 ? 0 : std::size_t{1} << 31);
        a.elements("pruned_rows body keys", self.body_keys_, body * kept * size_of(self.type_));
        a.elements("pruned_rows body values", self.body_values_, body * self.value_row_bytes());
        dense_rows::transfer(self.recent_, a);
        if constexpr (Archive::loading)
            for (std::size_t i = 0; i < kept; ++i)
                a.check(self.channels_[i] < self.dim_ && (i == 0 || self.channels_[i] > self.channels_[i - 1]),
                        "pruned_rows channel ", i, " is ", self.channels_[i], ", expected ascending channels below ",
                        self.dim_);
    }

private:
    dtype type_;
    std::size_t dim_;
    aligned_buffer<std::uint16_t> channels_;
    aligned_buffer<unsigned char> body_keys_;
    aligned_buffer<unsigned char> body_values_;
    dense_rows recent_;
};

} // namespace kvc
