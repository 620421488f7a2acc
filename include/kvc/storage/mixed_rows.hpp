// kvc/storage/mixed_rows.hpp -- rows of one KV head in two packed block formats, chosen per token by importance (Q6).
//
// The storage of kvc::quant::mixed (policy/quantization/mixed.hpp). Two packed
// bodies in the Q1 block formats (kernels/quant/format.hpp), a high-precision
// one and a low-precision one, each holding its rows in token order, and a map
// from token to (body, row):
//
//   slot[t] = row index | low_flag     one uint32 per token, in token order
//   high body: key rows, value rows    (dim / G) groups of the high format each
//   low body:  key rows, value rows    (dim / G) groups of the low format each
//
// Within a body, rows ascend with token index (appends go to the end of the
// high body; keep() and assign_precision() preserve the order), so the first n
// tokens are the first n_high high rows and the first n_low low rows.
//
// Attention: the packed kernel (kernels.quant.attend_partial) runs over the
// high body, then the low body, through one running softmax state. Logits and
// biases are indexed by token: when the caller asks for either, each body is
// attended in slices of at most 256 rows with the slice's biases gathered and
// its logits scattered through the token map (stack buffers, no allocation).
// The result equals attention in token order up to float rounding (the
// online softmax is order-independent in exact arithmetic).
//
// Memory: the four packed buffers and the token map come from the cache's
// memory resource; bytes() is their capacity in bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/format.hpp"
#include "kvc/kernels/quant/problem.hpp"
#include "kvc/storage/packed_rows.hpp"

namespace kvc {

class mixed_rows {
public:
    static constexpr std::uint32_t low_flag = 0x80000000u;

    // Throws kvc::error for unsupported formats, group size or head dim, or a
    // fraction outside [0, 1] (the message starts with `who`).
    mixed_rows(kernels::quant_format high, kernels::quant_format low, std::size_t group_size, std::size_t dim,
               double high_fraction, memory_resource* resource, const char* who = "kvc::mixed_rows")
        : high_(layout_of(high, group_size)), low_(layout_of(low, group_size)),
          dim_((validate(high_, low_, dim, high_fraction, who), dim)), high_fraction_(high_fraction),
          high_key_bytes_(high_.key_row_bytes(dim)), low_key_bytes_(low_.key_row_bytes(dim)), slot_(resource),
          high_keys_(resource), high_values_(resource), low_keys_(resource), low_values_(resource) {}

    std::size_t dim() const noexcept { return dim_; }
    double high_fraction() const noexcept { return high_fraction_; }
    std::size_t tokens() const noexcept { return slot_.size(); }
    std::size_t high_tokens() const noexcept { return high_keys_.size() / high_key_bytes_; }
    std::size_t low_tokens() const noexcept { return low_keys_.size() / low_key_bytes_; }
    // Whether token t is stored in the high format.
    bool is_high(std::size_t t) const noexcept { return (slot_[t] & low_flag) == 0; }
    // Bytes of one token's key + value rows in each format.
    std::size_t high_token_bytes() const noexcept { return 2 * high_key_bytes_; }
    std::size_t low_token_bytes() const noexcept { return 2 * low_key_bytes_; }

    // Bytes held (capacity): both bodies and the token map.
    std::size_t bytes() const noexcept {
        return slot_.bytes() + high_keys_.bytes() + high_values_.bytes() + low_keys_.bytes() + low_values_.bytes();
    }
    // Bytes one attention reads: every packed row.
    std::size_t stored_bytes() const noexcept {
        return high_tokens() * high_token_bytes() + low_tokens() * low_token_bytes();
    }

    // New tokens arrive in the high format.
    void reserve_for_append(std::size_t extra) {
        const std::size_t bytes =
            detail::checked_mul(extra, high_key_bytes_, "kvc::mixed_rows::reserve_for_append", "rows", "bytes per row");
        slot_.reserve_for_append(extra);
        high_keys_.reserve_for_append(bytes);
        high_values_.reserve_for_append(bytes);
    }
    void reserve(std::size_t rows) {
        const std::size_t high = rows > low_tokens() ? rows - low_tokens() : 0;
        const std::size_t bytes = detail::checked_mul(high, high_key_bytes_, "kvc::mixed_rows::reserve", "rows", "bytes per row");
        slot_.reserve(rows);
        high_keys_.reserve(bytes);
        high_values_.reserve(bytes);
    }

    // Encodes one token in the high format (capacity reserved; never throws).
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        const std::size_t row = high_tokens();
        const int source = kernels::index_of(from);
        const auto& quantize = k.quant.quantize_row[kernels::index_of(high_.key_format)][source];
        high_keys_.resize_within_capacity(high_keys_.size() + high_key_bytes_);
        high_values_.resize_within_capacity(high_values_.size() + high_key_bytes_);
        quantize(key, high_keys_.data() + row * high_key_bytes_, dim_, high_.group_size);
        quantize(value, high_values_.data() + row * high_key_bytes_, dim_, high_.group_size);
        slot_.resize_within_capacity(slot_.size() + 1);
        slot_[slot_.size() - 1] = static_cast<std::uint32_t>(row);
    }

    // Keeps the tokens at `indices` (ascending, each < tokens()), in that order.
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        std::size_t high = 0, low = 0;
        for (std::size_t i = 0; i < count; ++i) {
            const std::uint32_t from = slot_[indices[i]];
            if (from & low_flag) {
                move_row(low_keys_, low_values_, low_key_bytes_, from & ~low_flag, low);
                slot_[i] = static_cast<std::uint32_t>(low++) | low_flag;
            } else {
                move_row(high_keys_, high_values_, high_key_bytes_, from, high);
                slot_[i] = static_cast<std::uint32_t>(high++);
            }
        }
        slot_.resize_within_capacity(count);
        high_keys_.resize_within_capacity(high * high_key_bytes_);
        high_values_.resize_within_capacity(high * high_key_bytes_);
        low_keys_.resize_within_capacity(low * low_key_bytes_);
        low_values_.resize_within_capacity(low * low_key_bytes_);
    }

    // Re-encodes the head: the ceil(high_fraction * tokens) tokens with the
    // highest scores in the high format, the rest in the low format (ties go
    // to the more recent token). Rows already in their target format keep
    // their bytes; a moved row is re-quantized from its current values (a
    // demoted token promoted later does not regain what the low format lost).
    // Throws kvc::error for NaN scores or null scores with tokens held;
    // builds the new form first, so any failure leaves the head unchanged.
    void assign_precision(const kernels::kernel_table& k, const float* scores) {
        const std::size_t n = tokens();
        if (n == 0) return;
        detail::require(scores != nullptr, "kvc::quant::mixed: expected ", n, " scores, got a null pointer");
        for (std::size_t t = 0; t < n; ++t)
            detail::require(!std::isnan(scores[t]), "kvc::quant::mixed: expected scores that are not NaN, got NaN for token ", t);
        const std::size_t high_count = high_count_of(n);
        std::vector<std::uint32_t> order(n);
        std::iota(order.begin(), order.end(), 0u);
        const auto more_important = [scores](std::uint32_t a, std::uint32_t b) {
            return scores[a] != scores[b] ? scores[a] > scores[b] : a > b;
        };
        if (high_count < n) std::nth_element(order.begin(), order.begin() + high_count, order.end(), more_important);
        std::vector<bool> want_high(n, false);
        for (std::size_t i = 0; i < high_count; ++i) want_high[order[i]] = true;

        mixed_rows fresh(*this, empty_tag{});
        fresh.slot_.reserve(n);
        fresh.high_keys_.reserve(high_count * high_key_bytes_);
        fresh.high_values_.reserve(high_count * high_key_bytes_);
        fresh.low_keys_.reserve((n - high_count) * low_key_bytes_);
        fresh.low_values_.reserve((n - high_count) * low_key_bytes_);
        float row[max_head_dim];
        for (std::size_t t = 0; t < n; ++t) {
            const bool high = want_high[t];
            const std::uint32_t from = slot_[t];
            const bool was_high = (from & low_flag) == 0;
            aligned_buffer<unsigned char>& keys = high ? fresh.high_keys_ : fresh.low_keys_;
            aligned_buffer<unsigned char>& values = high ? fresh.high_values_ : fresh.low_values_;
            const std::size_t bytes = high ? high_key_bytes_ : low_key_bytes_;
            const std::size_t target_row = keys.size() / bytes;
            keys.resize_within_capacity(keys.size() + bytes);
            values.resize_within_capacity(values.size() + bytes);
            if (high == was_high) {
                std::memcpy(keys.data() + target_row * bytes, key_row(from), bytes);
                std::memcpy(values.data() + target_row * bytes, value_row(from), bytes);
            } else {
                const packed_layout& to = high ? high_ : low_;
                const auto& quantize = k.quant.quantize_row[kernels::index_of(to.key_format)][kernels::index_of(dtype::f32)];
                decode_row(k, from, true, row);
                quantize(row, keys.data() + target_row * bytes, dim_, to.group_size);
                decode_row(k, from, false, row);
                quantize(row, values.data() + target_row * bytes, dim_, to.group_size);
            }
            fresh.slot_.resize_within_capacity(t + 1);
            fresh.slot_[t] = static_cast<std::uint32_t>(target_row) | (high ? 0u : low_flag);
        }
        swap(fresh);
    }

    // Tokens [first, first + count) widened to fp32, [count][dim]: the values attention uses.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) decode_row(k, slot_[first + i], true, out + i * dim_);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) decode_row(k, slot_[first + i], false, out + i * dim_);
    }

    void shrink_to_fit() {
        slot_.shrink_to_fit();
        high_keys_.shrink_to_fit();
        high_values_.shrink_to_fit();
        low_keys_.shrink_to_fit();
        low_values_.shrink_to_fit();
    }
    void clear() noexcept {
        slot_.clear();
        high_keys_.clear();
        high_values_.clear();
        low_keys_.clear();
        low_values_.clear();
    }
    void release() noexcept {
        slot_.release();
        high_keys_.release();
        high_values_.release();
        low_keys_.release();
        low_values_.release();
    }

    // Folds every token into `state` (bias and logits indexed by token).
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

    // Tokens held high after an assignment over n tokens.
    std::size_t high_count_of(std::size_t n) const noexcept {
        const std::size_t count = static_cast<std::size_t>(std::ceil(high_fraction_ * static_cast<double>(n) - 1e-9));
        return count > n ? n : count;
    }

private:
    struct empty_tag {};
    // An empty head with the same layout and resource.
    mixed_rows(const mixed_rows& other, empty_tag) noexcept
        : high_(other.high_), low_(other.low_), dim_(other.dim_), high_fraction_(other.high_fraction_),
          high_key_bytes_(other.high_key_bytes_), low_key_bytes_(other.low_key_bytes_), slot_(other.slot_.resource()),
          high_keys_(other.high_keys_.resource()), high_values_(other.high_values_.resource()),
          low_keys_(other.low_keys_.resource()), low_values_(other.low_values_.resource()) {}

    void swap(mixed_rows& other) noexcept {
        slot_.swap(other.slot_);
        high_keys_.swap(other.high_keys_);
        high_values_.swap(other.high_values_);
        low_keys_.swap(other.low_keys_);
        low_values_.swap(other.low_values_);
    }

    static packed_layout layout_of(kernels::quant_format format, std::size_t group_size) noexcept {
        packed_layout l;
        l.key_format = format;
        l.value_format = format;
        l.group_size = group_size;
        return l;
    }
    static void validate(const packed_layout& high, const packed_layout& low, std::size_t dim, double fraction,
                         const char* who) {
        detail::validate_packed_layout(high, dim, who);
        detail::validate_packed_layout(low, dim, who);
        detail::require(dim <= max_head_dim, who, ": expected head_dim up to ", max_head_dim,
                        ", got ", dim);
        detail::require(fraction >= 0.0 && fraction <= 1.0, who, ": expected a high-precision fraction in [0, 1], got ",
                        fraction);
    }

    static void move_row(aligned_buffer<unsigned char>& keys, aligned_buffer<unsigned char>& values, std::size_t bytes,
                         std::size_t from, std::size_t to) noexcept {
        if (from == to) return;
        std::memmove(keys.data() + to * bytes, keys.data() + from * bytes, bytes);
        std::memmove(values.data() + to * bytes, values.data() + from * bytes, bytes);
    }

    const unsigned char* key_row(std::uint32_t slot) const noexcept {
        return (slot & low_flag) ? low_keys_.data() + (slot & ~low_flag) * low_key_bytes_
                                 : high_keys_.data() + slot * high_key_bytes_;
    }
    const unsigned char* value_row(std::uint32_t slot) const noexcept {
        return (slot & low_flag) ? low_values_.data() + (slot & ~low_flag) * low_key_bytes_
                                 : high_values_.data() + slot * high_key_bytes_;
    }
    void decode_row(const kernels::kernel_table& k, std::uint32_t slot, bool keys, float* out) const noexcept {
        const packed_layout& l = (slot & low_flag) ? low_ : high_;
        k.quant.dequantize_row[kernels::index_of(l.key_format)](keys ? key_row(slot) : value_row(slot), out, dim_,
                                                                l.group_size);
    }

    // Folds the first `count` tokens into `state`: high rows then low rows.
    void attend_prefix(const kernels::kernel_table& k, std::size_t count, const kernels::decode_problem& p,
                       const kernels::decode_state& state) const noexcept {
        std::size_t high = 0;
        if (count == tokens()) {
            high = high_tokens();
        } else {
            for (std::size_t t = 0; t < count; ++t) high += (slot_[t] & low_flag) == 0;
        }
        attend_body(k, p, state, false, high);
        attend_body(k, p, state, true, count - high);
    }

    void attend_body(const kernels::kernel_table& k, const kernels::decode_problem& p, const kernels::decode_state& state,
                     bool low, std::size_t rows) const noexcept {
        if (rows == 0) return;
        const packed_layout& l = low ? low_ : high_;
        const std::size_t bytes = low ? low_key_bytes_ : high_key_bytes_;
        kernels::quant_decode_problem q;
        q.rows.keys = low ? low_keys_.data() : high_keys_.data();
        q.rows.values = low ? low_values_.data() : high_values_.data();
        q.rows.key_row_bytes = q.rows.value_row_bytes = bytes;
        q.rows.key_format = q.rows.value_format = l.key_format;
        q.rows.group_size = l.group_size;
        kernels::queries_of(q) = p;
        q.dim = dim_;
        if (p.logits == nullptr && p.bias == nullptr) {
            q.tokens = rows;
            k.quant.attend_partial(q, state);
            return;
        }
        // Slices of rows whose logits fit a stack buffer for the whole group.
        constexpr std::size_t buffer_floats = 4096, max_slice = 256;
        std::size_t slice = buffer_floats / (p.group ? p.group : 1);
        slice = slice > max_slice ? max_slice : (slice == 0 ? 1 : slice);
        float logits[buffer_floats > max_slice ? buffer_floats : max_slice];
        float bias[max_slice];
        std::uint32_t token_of[max_slice];
        std::size_t cursor = 0; // next token to look at for this body's rows
        const std::uint32_t wanted = low ? low_flag : 0u;
        for (std::size_t r0 = 0; r0 < rows; r0 += slice) {
            const std::size_t n = rows - r0 < slice ? rows - r0 : slice;
            for (std::size_t i = 0; i < n; ++i) {
                while ((slot_[cursor] & low_flag) != wanted) ++cursor;
                token_of[i] = static_cast<std::uint32_t>(cursor++);
                if (p.bias) bias[i] = p.bias[token_of[i]];
            }
            q.rows.keys = static_cast<const unsigned char*>(low ? low_keys_.data() : high_keys_.data()) + r0 * bytes;
            q.rows.values = static_cast<const unsigned char*>(low ? low_values_.data() : high_values_.data()) + r0 * bytes;
            q.tokens = n;
            q.bias = p.bias ? bias : nullptr;
            q.logits = p.logits ? logits : nullptr;
            q.logits_stride = n;
            k.quant.attend_partial(q, state);
            if (p.logits)
                for (std::size_t g = 0; g < p.group; ++g)
                    for (std::size_t i = 0; i < n; ++i) p.logits[g * p.logits_stride + token_of[i]] = logits[g * n + i];
        }
    }

public:
    // Serialization (cache/serialization.hpp): formats as shapes, the token
    // map, then both bodies; on load the map is checked to name each body's
    // rows in order (attention walks the bodies by it).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("mixed_rows high format", static_cast<std::size_t>(self.high_.key_format));
        a.shape("mixed_rows low format", static_cast<std::size_t>(self.low_.key_format));
        a.shape("mixed_rows group size", self.high_.group_size);
        a.shape("mixed_rows head_dim", self.dim_);
        std::uint64_t fraction_bits = 0;
        std::memcpy(&fraction_bits, &self.high_fraction_, sizeof fraction_bits);
        a.shape("mixed_rows high fraction (double bits)", fraction_bits);
        std::size_t tokens = self.tokens(), high = self.high_tokens();
        a.count("mixed_rows tokens", tokens, std::size_t{1} << 31);
        a.count("mixed_rows high tokens", high, tokens);
        a.elements("mixed_rows token map", self.slot_, tokens);
        a.elements("mixed_rows high keys", self.high_keys_, high * self.high_key_bytes_);
        a.elements("mixed_rows high values", self.high_values_, high * self.high_key_bytes_);
        a.elements("mixed_rows low keys", self.low_keys_, (tokens - high) * self.low_key_bytes_);
        a.elements("mixed_rows low values", self.low_values_, (tokens - high) * self.low_key_bytes_);
        if constexpr (Archive::loading) {
            std::size_t next_high = 0, next_low = 0;
            for (std::size_t t = 0; t < tokens; ++t) {
                const std::uint32_t s = self.slot_[t];
                const bool low = (s & low_flag) != 0;
                const std::size_t row = s & ~low_flag;
                a.check(row == (low ? next_low : next_high), "mixed_rows token ", t, " maps to ",
                        low ? "low" : "high", " row ", row, ", expected ", low ? next_low : next_high);
                ++(low ? next_low : next_high);
            }
            a.check(next_high == high, "mixed_rows maps ", next_high, " tokens to the high body, expected ", high);
        }
    }

private:
    packed_layout high_, low_;
    std::size_t dim_;
    double high_fraction_;
    std::size_t high_key_bytes_, low_key_bytes_; // key and value rows of a format have the same size
    aligned_buffer<std::uint32_t> slot_;
    aligned_buffer<unsigned char> high_keys_, high_values_, low_keys_, low_values_;
};

} // namespace kvc
