// kvc/storage/kvquant_head.hpp -- one KV head stored the KVQuant (Q3) way.
//
// The storage of kvc::quant::kvquant (policy/quantization/kvquant.hpp, which
// explains the method). Layout of the packed body (details and the exact
// element rules: kernels/quant/kvquant_problem.hpp):
//
//   sink (dense_rows, fp16, *post*-RoPE)   body: per token
//   t = 0 .. s-1, s <= sink_tokens          key codes   dim * bits / 8 bytes (pre-RoPE, stored channel order)
//                                           value codes dim * bits / 8 bytes
//                                           value offset, half-range   2 x fp32
//                                           outlier_end                u32 (CSR)
//                                           position                   i32 (every token, sinks included)
//                                           outliers: u16 channel + fp32 value each
//
// POSITIONS CONTRACT. push_back takes each token's position
// (`wants_positions`): compressed_cache passes it. The keys given to
// push_back must be the keys *before* RoPE: the head rotates them itself, at
// the stored position, inside attention (and when a token becomes a sink,
// once at append). An engine using this codec must therefore append pre-RoPE
// keys while still giving queries *after* RoPE to attend, as it would to any
// other cache.
//
// Sinks: the first `sink_tokens` tokens (while the body is empty) are kept in
// fp16 after rotating them by RoPE at append (one trigonometric evaluation per
// sink token), and are attended by the fp16 decode kernel; later tokens go to
// the packed body, as packed_rows does.
//
// Memory: every buffer below comes from the cache's memory resource and
// bytes() is the sum of their capacities: the per-head parameters (channel
// scales and offsets, both codebooks, RoPE tables, the channel order), the
// codes (plus kvquant_code_slack bytes after the last row of each), value
// parameters, positions, outlier index and list, and the fp16 sink rows.
// reserve(n) is exact for everything but the outlier list, which it sizes
// for the expected count (n * dim * outlier_fraction); appends reserve room
// for max_outliers per token, so push_back never allocates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/kvquant_problem.hpp"
#include "kvc/kernels/reference/kvquant.hpp"
#include "kvc/kernels/rope.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

static_assert(kernels::kvquant_max_dim == max_head_dim, "kvquant kernels size their stack rows by max_head_dim");

namespace detail {

// How a key channel with calibrated range [lower, upper] is normalised to
// [-1, 1]: x -> (x - offset) / scale. A range of zero width (a channel that was
// constant in calibration) gets a tiny scale, so any other value is an outlier.
struct kvquant_normaliser {
    float offset = 0.0f, scale = 1.0f;
};
inline kvquant_normaliser kvquant_channel_normaliser(float lower, float upper) noexcept {
    kvquant_normaliser n;
    n.offset = 0.5f * lower + 0.5f * upper;
    n.scale = 0.5f * upper - 0.5f * lower;
    if (!(n.scale > 0.0f)) n.scale = std::max(std::fabs(n.offset), 1.0f) * 0x1p-20f;
    return n;
}

// Per-token value normalisation: offset the midpoint of the row's range and
// scale its half-width (at least the largest distance from the offset, so
// every element normalises into [-1, 1]). A constant row has scale 0.
inline kvquant_normaliser kvquant_row_normaliser(const float* row, std::size_t n) noexcept {
    float lo = row[0], hi = row[0];
    for (std::size_t i = 1; i < n; ++i) {
        lo = row[i] < lo ? row[i] : lo;
        hi = row[i] > hi ? row[i] : hi;
    }
    kvquant_normaliser r;
    r.offset = 0.5f * lo + 0.5f * hi;
    const float above = hi - r.offset, below = r.offset - lo;
    r.scale = above > below ? above : below;
    return r;
}

// Index of the codebook entry nearest to x in an ascending book of `count`
// (ties to the lower entry); NaN maps to the entry nearest 0.
inline unsigned kvquant_nearest(const float* book, unsigned count, float x) noexcept {
    if (x != x) x = 0.0f;
    unsigned code = 0;
    while (code + 1 < count && x > 0.5f * book[code] + 0.5f * book[code + 1]) ++code;
    return code;
}

} // namespace detail

// What one head needs from the codec (pointers valid during construction only).
struct kvquant_head_params {
    unsigned bits = 3;                       // 2, 3 or 4
    std::size_t dim = 0;                     // a multiple of 8
    const float* key_lower = nullptr;        // [dim], natural order: calibrated range per channel
    const float* key_upper = nullptr;
    const float* key_codebook = nullptr;     // 2^bits, ascending
    const float* value_codebook = nullptr;   // 2^bits, ascending
    rope_config rope;                        // rotary_dims even, <= dim (0: dim)
    std::size_t sink_tokens = 1;
    std::size_t max_outliers = 0;            // per token, >= 1
    double outlier_fraction = 0.01;          // expected share of outliers (sizes reserve())
};

class kvquant_head {
public:
    // compressed_cache passes each token's position to push_back.
    static constexpr bool wants_positions = true;

    kvquant_head(const kvquant_head_params& p, memory_resource* resource)
        : bits_(p.bits), dim_(p.dim), row_bytes_(p.dim * p.bits / 8), sink_limit_(p.sink_tokens),
          max_outliers_(p.max_outliers), outlier_fraction_(p.outlier_fraction), rope_config_(p.rope),
          params_(resource), rope_(resource), channel_of_(resource), sink_(dtype::f16, p.dim, resource),
          key_codes_(resource), value_codes_(resource), value_params_(resource), positions_(resource),
          outlier_end_(resource), outlier_channel_(resource), outlier_value_(resource) {
        detail::require(p.bits >= 2 && p.bits <= 4, "kvc::kvquant_head: expected 2, 3 or 4 bits, got ", p.bits);
        detail::require(p.dim > 0 && p.dim % 8 == 0 && p.dim <= max_head_dim,
                        "kvc::kvquant_head: expected head_dim a multiple of 8 in 8..", max_head_dim, ", got ", p.dim);
        detail::validate_rope(p.rope, p.dim, "kvc::kvquant_head");
        const std::size_t rotary = p.rope.rotary_dims ? p.rope.rotary_dims : p.dim;
        detail::require(p.sink_tokens <= max_sink_tokens, "kvc::kvquant_head: expected at most ", max_sink_tokens,
                        " sink tokens, got ", p.sink_tokens);
        detail::require(p.outlier_fraction >= 0.0 && p.outlier_fraction < 0.5,
                        "kvc::kvquant_head: expected outlier_fraction in [0, 0.5), got ", p.outlier_fraction);
        detail::require(p.max_outliers >= 1 && p.max_outliers <= p.dim,
                        "kvc::kvquant_head: expected max_outliers in 1..", p.dim, ", got ", p.max_outliers);
        pairs_ = rotary / 2;
        const std::size_t book = std::size_t{1} << p.bits;
        // Channel order: first elements of the pairs, second elements, the rest.
        channel_of_.resize(p.dim);
        for (std::size_t i = 0; i < pairs_; ++i) {
            channel_of_[i] = static_cast<std::uint16_t>(p.rope.interleaved ? 2 * i : i);
            channel_of_[pairs_ + i] = static_cast<std::uint16_t>(p.rope.interleaved ? 2 * i + 1 : i + pairs_);
        }
        for (std::size_t s = rotary; s < p.dim; ++s) channel_of_[s] = static_cast<std::uint16_t>(s);
        params_.resize(2 * p.dim + 2 * kernels::kvquant_codebook_slots);
        for (std::size_t s = 0; s < p.dim; ++s) {
            const std::size_t c = channel_of_[s];
            const detail::kvquant_normaliser n = detail::kvquant_channel_normaliser(p.key_lower[c], p.key_upper[c]);
            params_[s] = n.scale;
            params_[p.dim + s] = n.offset;
        }
        for (std::size_t i = 0; i < kernels::kvquant_codebook_slots; ++i) {
            const std::size_t j = i < book ? i : book - 1;
            params_[2 * p.dim + i] = p.key_codebook[j];
            params_[2 * p.dim + kernels::kvquant_codebook_slots + i] = p.value_codebook[j];
        }
        // Frequencies exactly as kernels::rope_rotate computes them.
        rope_.resize(3 * pairs_);
        for (std::size_t i = 0; i < pairs_; ++i) {
            const double f = std::pow(p.rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary));
            rope_[i] = f;
            rope_[pairs_ + i] = std::cos(f);
            rope_[2 * pairs_ + i] = std::sin(f);
        }
    }

    unsigned bits() const noexcept { return bits_; }
    std::size_t dim() const noexcept { return dim_; }
    std::size_t tokens() const noexcept { return sink_.tokens() + packed_tokens(); }
    std::size_t sink_tokens() const noexcept { return sink_.tokens(); }
    std::size_t packed_tokens() const noexcept { return outlier_end_.size(); }
    std::size_t row_bytes() const noexcept { return row_bytes_; }
    std::size_t max_outliers() const noexcept { return max_outliers_; }
    // Outliers held (sparse entries) over all packed tokens.
    std::size_t outliers() const noexcept { return outlier_channel_.size(); }
    const std::int32_t* positions() const noexcept { return positions_.data(); }

    std::size_t bytes() const noexcept {
        return params_.bytes() + rope_.bytes() + channel_of_.bytes() + sink_.bytes() + key_codes_.bytes() +
               value_codes_.bytes() + value_params_.bytes() + positions_.bytes() + outlier_end_.bytes() +
               outlier_channel_.bytes() + outlier_value_.bytes();
    }
    // Bytes one attention reads: the packed rows, their parameters and outliers, and the sink rows.
    std::size_t stored_bytes() const noexcept {
        const std::size_t packed = packed_tokens();
        return packed * (2 * row_bytes_ + 2 * sizeof(float) + sizeof(std::uint32_t) + sizeof(std::int32_t)) +
               outliers() * (sizeof(std::uint16_t) + sizeof(float)) + sink_.tokens() * 2 * dim_ * 2;
    }

    void reserve_for_append(std::size_t extra) {
        const std::size_t to_sink = sink_share(extra);
        const std::size_t packed = extra - to_sink;
        const body_sizes sizes = body_sizes_for(packed, max_outliers_, "kvc::kvquant_head::reserve_for_append");
        positions_.reserve_for_append(extra);
        if (to_sink) sink_.reserve_for_append(to_sink);
        if (packed == 0) return;
        key_codes_.reserve_for_append(sizes.code_bytes);
        value_codes_.reserve_for_append(sizes.code_bytes);
        value_params_.reserve_for_append(sizes.value_params);
        outlier_end_.reserve_for_append(packed);
        outlier_channel_.reserve_for_append(sizes.outliers);
        outlier_value_.reserve_for_append(sizes.outliers);
    }

    // Capacity for `rows` tokens in total: exact for the rows, the expected
    // count for the outlier list (appends still reserve their worst case).
    void reserve(std::size_t rows) {
        const std::size_t sink_rows = packed_tokens() == 0 && rows > 0 ? std::min(rows, sink_limit_) : sink_.tokens();
        const std::size_t sink_capacity = std::max(sink_rows, sink_.tokens());
        const std::size_t packed = rows > sink_capacity ? rows - sink_capacity : 0;
        // The expected outlier count is below packed * dim / 2 (outlier_fraction < 0.5), so it fits when that does.
        const body_sizes sizes = body_sizes_for(packed, dim_, "kvc::kvquant_head::reserve");
        detail::checked_mul(rows, sizeof(std::int32_t), "kvc::kvquant_head::reserve", "tokens", "position bytes");
        if (sink_capacity) sink_.reserve(sink_capacity);
        positions_.reserve(rows);
        if (packed == 0) return;
        key_codes_.reserve(sizes.code_bytes);
        value_codes_.reserve(sizes.code_bytes);
        value_params_.reserve(sizes.value_params);
        outlier_end_.reserve(packed);
        const auto expected = static_cast<std::size_t>(std::ceil(static_cast<double>(sizes.outliers) * outlier_fraction_));
        outlier_channel_.reserve(expected);
        outlier_value_.reserve(expected);
    }

    // Encodes one token. `key` must be the key BEFORE RoPE; `position` is the
    // token's position (the rotation attention applies). Never allocates.
    // NaN/Inf: a non-finite key element is always an outlier (kept exactly, so
    // that token's logits are what full_cache's would be: NaN, or +-Inf after
    // the rotation mixes it into its pair); a non-finite value
    // element makes that token's value offset and half-range NaN (its whole
    // value row decodes to NaN). No other token is affected; evicting the
    // token (keep) restores finite outputs.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value,
                   std::int32_t position) noexcept {
        float keyf[max_head_dim], valuef[max_head_dim];
        k.to_f32[kernels::index_of(from)](key, keyf, dim_);
        k.to_f32[kernels::index_of(from)](value, valuef, dim_);
        positions_.resize_within_capacity(positions_.size() + 1);
        positions_[positions_.size() - 1] = position;
        if (packed_tokens() == 0 && sink_.tokens() < sink_limit_) {
            kernels::rope_rotate(rope_config_, keyf, dim_, position);
            sink_.push_back(k, dtype::f32, keyf, valuef);
            return;
        }
        const std::size_t t = packed_tokens();
        key_codes_.resize_within_capacity((t + 1) * row_bytes_ + kernels::kvquant_code_slack);
        value_codes_.resize_within_capacity((t + 1) * row_bytes_ + kernels::kvquant_code_slack);
        encode_key(keyf, key_codes_.data() + t * row_bytes_);
        encode_value(valuef, value_codes_.data() + t * row_bytes_);
        outlier_end_.resize_within_capacity(t + 1);
        outlier_end_[t] = static_cast<std::uint32_t>(outlier_channel_.size());
    }

    // Keeps the tokens at `indices` (ascending, each < tokens()), in that order.
    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        const std::size_t sinks = sink_.tokens();
        std::size_t kept_sinks = 0;
        while (kept_sinks < count && indices[kept_sinks] < sinks) ++kept_sinks;
        sink_.keep(indices, kept_sinks);
        for (std::size_t i = 0; i < count; ++i) positions_[i] = positions_[indices[i]];
        positions_.resize_within_capacity(count);
        // Forward compaction: every write lands at or before what is read
        // later, and outlier_end[from - 1] is read before slot from - 1 can be
        // overwritten by a token that moved.
        std::uint32_t written = 0;
        std::uint32_t previous_end = 0; // old outlier_end of the source token before `from`
        std::size_t previous_from = 0;
        bool first = true;
        for (std::size_t i = kept_sinks; i < count; ++i) {
            const std::size_t from = indices[i] - sinks, to = i - kept_sinks;
            const std::uint32_t begin =
                from == 0 ? 0 : (!first && previous_from + 1 == from ? previous_end : outlier_end_[from - 1]);
            const std::uint32_t end = outlier_end_[from];
            first = false;
            previous_from = from;
            previous_end = end;
            if (from != to) {
                std::memmove(key_codes_.data() + to * row_bytes_, key_codes_.data() + from * row_bytes_, row_bytes_);
                std::memmove(value_codes_.data() + to * row_bytes_, value_codes_.data() + from * row_bytes_,
                             row_bytes_);
                value_params_[2 * to] = value_params_[2 * from];
                value_params_[2 * to + 1] = value_params_[2 * from + 1];
            }
            for (std::uint32_t o = begin; o < end; ++o, ++written) {
                outlier_channel_[written] = outlier_channel_[o];
                outlier_value_[written] = outlier_value_[o];
            }
            outlier_end_[to] = written;
        }
        const std::size_t packed = count - kept_sinks;
        key_codes_.resize_within_capacity(packed ? packed * row_bytes_ + kernels::kvquant_code_slack : 0);
        value_codes_.resize_within_capacity(packed ? packed * row_bytes_ + kernels::kvquant_code_slack : 0);
        value_params_.resize_within_capacity(2 * packed);
        outlier_end_.resize_within_capacity(packed);
        outlier_channel_.resize_within_capacity(written);
        outlier_value_.resize_within_capacity(written);
    }

    // Tokens [first, first + count) as attention sees them, fp32 [count][dim]:
    // keys after RoPE at their positions (natural channel order; cos/sin in
    // double per token, the reference's arithmetic), values decoded.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            if (t < sink_.tokens()) sink_.decode_keys(k, t, 1, out + i * dim_);
            else kernels::reference::kvquant_key(rows(), t - sink_.tokens(), dim_, true, out + i * dim_);
        }
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            if (t < sink_.tokens()) sink_.decode_values(k, t, 1, out + i * dim_);
            else kernels::reference::kvquant_value(rows(), t - sink_.tokens(), dim_, out + i * dim_);
        }
    }
    // Keys before RoPE, as stored. Sink tokens are held after RoPE; theirs
    // are rotated back by their position (fp16 rounding included).
    void decode_pre_rope_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                              float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = first + i;
            float* row = out + i * dim_;
            if (t < sink_.tokens()) {
                sink_.decode_keys(k, t, 1, row);
                kernels::rope_rotate(rope_config_, row, dim_, -static_cast<std::int64_t>(positions_[t]));
            } else {
                kernels::reference::kvquant_key(rows(), t - sink_.tokens(), dim_, false, row);
            }
        }
    }

    void shrink_to_fit() {
        sink_.shrink_to_fit();
        key_codes_.shrink_to_fit();
        value_codes_.shrink_to_fit();
        value_params_.shrink_to_fit();
        positions_.shrink_to_fit();
        outlier_end_.shrink_to_fit();
        outlier_channel_.shrink_to_fit();
        outlier_value_.shrink_to_fit();
    }
    void clear() noexcept {
        sink_.clear();
        key_codes_.clear();
        value_codes_.clear();
        value_params_.clear();
        positions_.clear();
        outlier_end_.clear();
        outlier_channel_.clear();
        outlier_value_.clear();
    }
    // Drops the tokens and their memory; the per-head parameters stay.
    void release() noexcept {
        sink_.release();
        key_codes_.release();
        value_codes_.release();
        value_params_.release();
        positions_.release();
        outlier_end_.release();
        outlier_channel_.release();
        outlier_value_.release();
    }

    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        attend_first(k, tokens(), p, state);
    }

    // Causal prefill through the decode partial (kernels::common::prefill_by_decode).
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        kernels::prefill_problem with_dim = p; // the cache leaves dim to the store
        with_dim.dim = dim_;
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            with_dim, tokens(), workspace,
            [&](std::size_t n, const kernels::decode_problem& d, const kernels::decode_state& s) {
                attend_first(k, n, d, s);
            });
    }

    // The packed body as the kernels see it.
    kernels::kvquant_rows rows() const noexcept {
        kernels::kvquant_rows r;
        r.key_codes = key_codes_.data();
        r.value_codes = value_codes_.data();
        r.row_bytes = row_bytes_;
        r.bits = bits_;
        r.value_params = value_params_.data();
        r.positions = positions_.data() + sink_.tokens();
        r.outlier_end = outlier_end_.data();
        r.outlier_channel = outlier_channel_.data();
        r.outlier_value = outlier_value_.data();
        r.key_scale = params_.data();
        r.key_offset = params_.data() + dim_;
        r.key_codebook = params_.data() + 2 * dim_;
        r.value_codebook = params_.data() + 2 * dim_ + kernels::kvquant_codebook_slots;
        r.channel_of = channel_of_.data();
        r.rotary_pairs = pairs_;
        r.rope_frequency = rope_.data();
        r.rope_step = rope_.data() + pairs_;
        return r;
    }

private:
    // Element counts of the body buffers for `packed` tokens with up to `outliers_per_token` outliers each.
    struct body_sizes {
        std::size_t code_bytes, value_params, outliers;
    };
    body_sizes body_sizes_for(std::size_t packed, std::size_t outliers_per_token, const char* who) const {
        body_sizes s;
        s.code_bytes = detail::checked_add(detail::checked_mul(packed, row_bytes_, who, "tokens", "code bytes per row"),
                                           kernels::kvquant_code_slack, who, "code bytes", "slack bytes");
        s.value_params = detail::checked_mul(packed, 2, who, "tokens", "value parameters per token");
        s.outliers = detail::checked_mul(packed, outliers_per_token, who, "tokens", "outliers per token");
        return s;
    }

    std::size_t sink_share(std::size_t extra) const noexcept {
        if (packed_tokens() != 0 || sink_.tokens() >= sink_limit_) return 0;
        return std::min(extra, sink_limit_ - sink_.tokens());
    }

    // Folds the first n tokens (sinks first) into `state`.
    void attend_first(const kernels::kernel_table& k, std::size_t n, const kernels::decode_problem& p,
                      const kernels::decode_state& state) const noexcept {
        const std::size_t sinks = std::min(n, sink_.tokens());
        if (sinks) {
            kernels::decode_problem d = p;
            d.keys = sink_.key_row(0);
            d.values = sink_.value_row(0);
            d.key_stride = dim_;
            d.value_stride = dim_;
            d.tokens = sinks;
            d.dim = dim_;
            k.attend_partial[kernels::index_of(dtype::f16)](d, state);
        }
        if (n == sinks) return;
        kernels::kvquant_decode_problem q;
        q.rows = rows();
        q.tokens = n - sinks;
        kernels::queries_of(q) = p;
        q.dim = dim_;
        q.bias = p.bias ? p.bias + sinks : nullptr;
        q.logits = p.logits ? p.logits + sinks : nullptr;
        k.kvquant.attend_partial(q, state);
    }

    void encode_key(const float* key, unsigned char* row) noexcept {
        const unsigned book_size = 1u << bits_;
        const float* scale = params_.data();
        const float* offset = params_.data() + dim_;
        const float* book = params_.data() + 2 * dim_;
        std::memset(row, 0, row_bytes_);
        // Candidates: elements outside the calibrated range (or not finite), by excess.
        std::uint16_t candidate[max_head_dim];
        float excess[max_head_dim];
        std::size_t candidates = 0;
        for (std::size_t s = 0; s < dim_; ++s) {
            const float x = key[channel_of_[s]];
            const float normalised = (x - offset[s]) / scale[s];
            const float magnitude = std::fabs(normalised);
            if (!(magnitude <= 1.0f)) {
                candidate[candidates] = static_cast<std::uint16_t>(s);
                excess[s] = magnitude == magnitude ? magnitude : std::numeric_limits<float>::infinity();
                ++candidates;
            }
            const float clamped = normalised > 1.0f ? 1.0f : (normalised < -1.0f ? -1.0f : normalised);
            put_code(row, s, detail::kvquant_nearest(book, book_size, clamped));
        }
        if (candidates > max_outliers_) { // keep the largest excesses; the rest stay clamped in the dense code
            std::partial_sort(candidate, candidate + max_outliers_, candidate + candidates,
                              [&](std::uint16_t a, std::uint16_t b) {
                                  return excess[a] > excess[b] || (excess[a] == excess[b] && a < b);
                              });
            candidates = max_outliers_;
            std::sort(candidate, candidate + candidates);
        }
        const std::size_t base = outlier_channel_.size();
        outlier_channel_.resize_within_capacity(base + candidates);
        outlier_value_.resize_within_capacity(base + candidates);
        for (std::size_t i = 0; i < candidates; ++i) {
            outlier_channel_[base + i] = candidate[i];
            outlier_value_[base + i] = key[channel_of_[candidate[i]]];
        }
    }

    void encode_value(const float* value, unsigned char* row) noexcept {
        const unsigned book_size = 1u << bits_;
        const float* book = params_.data() + 2 * dim_ + kernels::kvquant_codebook_slots;
        std::memset(row, 0, row_bytes_);
        const std::size_t t = value_params_.size() / 2;
        value_params_.resize_within_capacity(2 * t + 2);
        bool finite = true;
        for (std::size_t d = 0; d < dim_; ++d) finite = finite && std::isfinite(value[d]);
        if (!finite) {
            value_params_[2 * t] = value_params_[2 * t + 1] = std::numeric_limits<float>::quiet_NaN();
            return;
        }
        const detail::kvquant_normaliser n = detail::kvquant_row_normaliser(value, dim_);
        value_params_[2 * t] = n.offset;
        value_params_[2 * t + 1] = n.scale;
        for (std::size_t d = 0; d < dim_; ++d) {
            float normalised = n.scale > 0.0f ? (value[d] - n.offset) / n.scale : 0.0f;
            normalised = normalised > 1.0f ? 1.0f : (normalised < -1.0f ? -1.0f : normalised);
            put_code(row, d, detail::kvquant_nearest(book, book_size, normalised));
        }
    }

    void put_code(unsigned char* row, std::size_t s, unsigned code) const noexcept {
        const std::size_t bit = (s / 8) * bits_ * 8 + (s % 8) * bits_;
        for (unsigned b = 0; b < bits_; ++b)
            if (code & (1u << b)) row[(bit + b) / 8] = static_cast<unsigned char>(row[(bit + b) / 8] | (1u << ((bit + b) % 8)));
    }

public:
    // Serialization (cache/serialization.hpp): the parameters as shapes and
    // the calibrated tables as must-match buffers, then the sink rows, each
    // token's position, the packed codes, value parameters and outliers; on
    // load the outlier lists are checked (the kernels index by them).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("kvquant_head bits", self.bits_);
        a.shape("kvquant_head head_dim", self.dim_);
        a.shape("kvquant_head sink tokens", self.sink_limit_);
        a.shape("kvquant_head max outliers", self.max_outliers_);
        a.shape("kvquant_head rotary dims", self.rope_config_.rotary_dims);
        a.shape("kvquant_head rope interleaved", self.rope_config_.interleaved ? 1 : 0);
        a.same("kvquant_head calibrated parameters", self.params_);
        a.same("kvquant_head rope frequencies", self.rope_);
        a.same("kvquant_head channel order", self.channel_of_);
        dense_rows::transfer(self.sink_, a);
        a.check(self.sink_.tokens() <= self.sink_limit_, "kvquant_head holds ", self.sink_.tokens(),
                " sink tokens, expected at most ", self.sink_limit_);
        std::size_t packed = self.packed_tokens();
        a.count("kvquant_head packed tokens", packed, std::size_t{1} << 31);
        a.elements("kvquant_head positions", self.positions_, self.sink_.tokens() + packed);
        // The codes without the kernels' slack (never read for a value, and
        // not kept deterministic by compaction): a load zeroes it.
        const std::size_t code_bytes = packed * self.row_bytes_;
        a.elements("kvquant_head key codes", self.key_codes_, code_bytes);
        a.elements("kvquant_head value codes", self.value_codes_, code_bytes);
        if constexpr (Archive::loading)
            if (packed != 0)
                for (auto* codes : {&self.key_codes_, &self.value_codes_}) {
                    codes->reserve(code_bytes + kernels::kvquant_code_slack);
                    std::memset(codes->data() + code_bytes, 0, kernels::kvquant_code_slack);
                    codes->resize_within_capacity(code_bytes + kernels::kvquant_code_slack);
                }
        a.elements("kvquant_head value parameters", self.value_params_, 2 * packed);
        a.elements("kvquant_head outlier ends", self.outlier_end_, packed);
        std::size_t outliers = self.outlier_channel_.size();
        a.count("kvquant_head outliers", outliers, packed * self.max_outliers_);
        a.elements("kvquant_head outlier channels", self.outlier_channel_, outliers);
        a.elements("kvquant_head outlier values", self.outlier_value_, outliers);
        if constexpr (Archive::loading) {
            std::uint32_t begin = 0;
            for (std::size_t t = 0; t < packed; ++t) {
                const std::uint32_t end = self.outlier_end_[t];
                a.check(end >= begin && end - begin <= self.max_outliers_ && end <= outliers, "kvquant_head token ", t,
                        " ends its outliers at ", end, ", expected ", begin, "..", begin + self.max_outliers_,
                        " within ", outliers);
                begin = end;
            }
            a.check(begin == outliers, "kvquant_head tokens hold ", begin, " outliers, expected ", outliers);
            for (std::size_t o = 0; o < outliers; ++o)
                a.check(self.outlier_channel_[o] < self.dim_, "kvquant_head outlier ", o, " is at channel ",
                        self.outlier_channel_[o], ", expected < ", self.dim_);
        }
    }

private:
    unsigned bits_;
    std::size_t dim_, row_bytes_, sink_limit_, max_outliers_;
    double outlier_fraction_;
    rope_config rope_config_;
    std::size_t pairs_ = 0;
    aligned_buffer<float> params_;           // key scale [dim], key offset [dim], key book [16], value book [16]
    aligned_buffer<double> rope_;            // frequency, cos(frequency), sin(frequency): [3][pairs]
    aligned_buffer<std::uint16_t> channel_of_;
    dense_rows sink_;
    aligned_buffer<unsigned char> key_codes_, value_codes_;
    aligned_buffer<float> value_params_;
    aligned_buffer<std::int32_t> positions_;
    aligned_buffer<std::uint32_t> outlier_end_;
    aligned_buffer<std::uint16_t> outlier_channel_;
    aligned_buffer<float> outlier_value_;
};

} // namespace kvc
