// kvc/policy/quantization/rotated.hpp -- Q4 Hadamard rotation, a wrapper around any codec.
//
// What it is. Keys (and values, with RotateValues) are multiplied by an
// orthonormal matrix H before the inner codec stores them. Attention is
// unchanged in exact arithmetic because <H q, H k> = <q, k>: the queries are
// rotated by the same H, and with rotated values the output sum_t p_t H v_t
// is rotated back by H^T. What changes is what the inner codec sees: a channel
// that is much larger than the rest (the outlier channels of real keys) is
// spread evenly over its Hadamard block, so the per-group scales of a block
// codec no longer have to cover it and the other elements keep their
// resolution. Source: docs/METHODS.md Q4 (QuaRot, QuIP#, and the Hadamard step of
// Palu/KVQuant-style 4-bit caches; reported 4-bit K cache perplexity loss
// +11.30% -> +0.92%).
//
//   kvc::quant::rotated<kvc::quant::q4_0>                   keys and values rotated, then q4_0
//   kvc::quant::rotated<kvc::quant::q4_0, false>            keys only (values stored as given)
//   kvc::quant::rotated<kvc::quant::none<float>>            lossless (up to float rounding)
//   kvc::quant::rotated<kvc::quant::q4_0>{{}, false}        without the random sign diagonal
//
// The transform (kernels/hadamard/common.hpp): H = B D, B block-diagonal with
// normalised Walsh-Hadamard blocks, D a fixed +-1 diagonal.
//
// Choices made where the sources leave room:
// - Head dims that are not a power of two: B has the largest power-of-two
//   blocks that fit, left to right (96 = 64 + 32); each block starts at a
//   multiple of its size, so groups of a block codec stay inside one block
//   when the block is at least the group size. A trailing block of 1 (odd
//   dims) is not mixed with anything.
// - Random signs (on by default, `random_signs = false` for the plain
//   transform): the plain Walsh-Hadamard matrix maps a vector with the same
//   value in every channel (a common offset of all channels, frequent in
//   keys) onto its first coefficient alone, which makes a new outlier; a
//   fixed +-1 diagonal first (QuaRot's randomized Hadamard) breaks that
//   alignment. The diagonal is a compile-time table from splitmix64 with a
//   fixed seed: the same in every build and on every instruction set, and it
//   costs no memory per head.
// - Memory: nothing beyond the inner codec (bytes() is the inner store's).
//   Rows are rotated on a stack copy during push_back (no allocation, so
//   push_back stays noexcept), queries on the stack at decode; prefill keeps
//   the chunk's rotated queries in the caller's workspace, whose size it
//   declares with prefill_workspace_floats() (the caches' attend_chunk
//   allocates that scratch before any noexcept call).
// - Rotated values: the inner attention runs into a fresh running state, its
//   accumulator is rotated back by H^T and merged (kernels::common::merge_state)
//   into the caller's state, so a rotated store can be one segment of a larger
//   attention.
// - decode_keys / decode_values return rows in the original space (H^T of
//   what the inner codec holds), which is what scorers and tools expect.
// - NaN or Inf in an appended row spreads over the Hadamard blocks that hold
//   it (the whole row for power-of-two dims) before the inner codec sees it:
//   that token's row decodes to NaN in those blocks, attention over the head
//   yields NaN (as full_cache would with a NaN key or value), no other token
//   is touched, and evicting the token (keep) restores finite outputs. With a
//   block codec underneath this is wider than the inner codec alone (one
//   group); the rotation cannot be done without mixing the block.
// - Constraints of the inner codec still apply (e.g. head_dim a multiple of
//   the group size for block codecs): make_head forwards to it and it throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/hadamard/common.hpp"
#include "kvc/policy/quantization/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/packed_rows.hpp"

namespace kvc {

static_assert(max_head_dim <= kernels::hadamard_max_dim, "the Hadamard sign table must cover every head dim");

// The head store of quant::rotated: the inner codec's store, holding rotated rows.
template <class Inner, bool RotateValues>
class rotated_rows {
public:
    static constexpr bool rotates_values = RotateValues;
    static constexpr bool wants_positions = detail::wants_positions<Inner>::value;

    rotated_rows(Inner inner, std::size_t dim, bool random_signs)
        : inner_(std::move(inner)), dim_(dim), random_signs_(random_signs) {}

    const Inner& inner() const noexcept { return inner_; }
    std::size_t dim() const noexcept { return dim_; }
    bool random_signs() const noexcept { return random_signs_; }

    std::size_t tokens() const noexcept { return inner_.tokens(); }
    // Exactly the inner store's: the rotation allocates nothing.
    std::size_t bytes() const noexcept { return inner_.bytes(); }
    void reserve_for_append(std::size_t extra) { inner_.reserve_for_append(extra); }
    void reserve(std::size_t rows) { inner_.reserve(rows); }
    void shrink_to_fit() { inner_.shrink_to_fit(); }
    void clear() noexcept { inner_.clear(); }
    void release() noexcept { inner_.release(); }
    void keep(const std::uint32_t* indices, std::size_t count) noexcept { inner_.keep(indices, count); }

    template <class S = Inner, std::enable_if_t<detail::has_compacted<S>::value, int> = 0>
    rotated_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        return rotated_rows(inner_.compacted(indices, count), dim_, random_signs_);
    }
    template <class S = Inner, std::enable_if_t<detail::has_bytes_per_token<S>::value, int> = 0>
    std::size_t bytes_per_token() const noexcept {
        return inner_.bytes_per_token();
    }
    template <class S = Inner, std::enable_if_t<detail::has_assign_precision<S>::value, int> = 0>
    void assign_precision(const kernels::kernel_table& k, const float* scores) {
        inner_.assign_precision(k, scores);
    }
    // Bytes of stored rows one attention reads: the inner store's.
    template <class S = Inner, std::enable_if_t<detail::has_stored_bytes<S>::value, int> = 0>
    std::size_t stored_bytes() const noexcept {
        return inner_.stored_bytes();
    }

    // Rotates the key (and value) row on the stack, then hands both to the
    // inner codec as fp32 (f16/bf16 widen exactly). Never allocates.
    template <class S = Inner, std::enable_if_t<!detail::wants_positions<S>::value, int> = 0>
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        alignas(64) float rows[2][max_head_dim];
        rotate_in(k, from, key, value, rows);
        inner_.push_back(k, dtype::f32, rows[0], rows[1]);
    }
    template <class S = Inner, std::enable_if_t<detail::wants_positions<S>::value, int> = 0>
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value,
                   std::int32_t position) noexcept {
        alignas(64) float rows[2][max_head_dim];
        rotate_in(k, from, key, value, rows);
        inner_.push_back(k, dtype::f32, rows[0], rows[1], position);
    }

    // B10 key re-rotation: `row` is in the original space.
    template <class S = Inner, std::enable_if_t<detail::has_store_key<S>::value, int> = 0>
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* row) noexcept {
        alignas(64) float rotated[max_head_dim];
        std::memcpy(rotated, row, dim_ * sizeof(float));
        k.hadamard.rotate(rotated, 1, dim_, dim_, random_signs_, kernels::hadamard_direction::forward);
        inner_.store_key(k, t, rotated);
    }

    // A merged slot: `key` and `value` are in the original space, rotated here as push_back rotates.
    template <class S = Inner, std::enable_if_t<detail::has_store_row<S>::value, int> = 0>
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        alignas(64) float rows[2][max_head_dim];
        rotate_in(k, dtype::f32, key, value, rows);
        inner_.store_row(k, t, rows[0], rows[1]);
    }

    // Rows in the original space: H^T of what the inner codec decodes.
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        inner_.decode_keys(k, first, count, out);
        k.hadamard.rotate(out, count, dim_, dim_, random_signs_, kernels::hadamard_direction::inverse);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        inner_.decode_values(k, first, count, out);
        if constexpr (RotateValues)
            k.hadamard.rotate(out, count, dim_, dim_, random_signs_, kernels::hadamard_direction::inverse);
    }

    // Decode attention: the group's queries rotated on the stack (a few query
    // heads at a time when group x dim is large); with rotated values through
    // a fresh state rotated back and merged into `state`.
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        constexpr std::size_t budget = 2 * max_head_dim, most_heads = 64; // 8 KiB of queries (and of acc)
        alignas(64) float queries[budget];
        alignas(64) float local_acc[RotateValues ? budget : 1];
        float local_max[most_heads], local_sum[most_heads];
        const std::size_t heads_per_pass = budget / dim_ < most_heads ? budget / dim_ : most_heads;
        for (std::size_t g0 = 0; g0 < p.group; g0 += heads_per_pass) {
            const std::size_t heads = p.group - g0 < heads_per_pass ? p.group - g0 : heads_per_pass;
            for (std::size_t g = 0; g < heads; ++g)
                std::memcpy(queries + g * dim_, p.queries + (g0 + g) * p.query_stride, dim_ * sizeof(float));
            k.hadamard.rotate(queries, heads, dim_, dim_, random_signs_, kernels::hadamard_direction::forward);
            kernels::decode_problem q = p;
            q.group = heads;
            q.queries = queries;
            q.query_stride = dim_;
            q.logits = p.logits ? p.logits + g0 * p.logits_stride : nullptr;
            const kernels::decode_state into{state.max + g0, state.sum + g0, state.acc + g0 * dim_};
            if constexpr (RotateValues) {
                const kernels::decode_state local{local_max, local_sum, local_acc};
                kernels::common::reset_state<kernels::reference_arch>(local, heads, dim_);
                inner_.attend(k, q, local);
                k.hadamard.rotate(local_acc, heads, dim_, dim_, random_signs_, kernels::hadamard_direction::inverse);
                kernels::common::merge_state_keeping_nan<kernels::reference_arch>(into, local, heads, dim_);
            } else {
                inner_.attend(k, q, into);
            }
        }
    }

    // Workspace prefill needs: the chunk's rotated queries, then the inner store's.
    std::size_t prefill_workspace_floats(std::size_t group, std::size_t chunk, bool with_mass) const noexcept {
        return chunk * group * dim_ + detail::prefill_workspace_of(inner_, group, dim_, chunk, with_mass);
    }

    // Causal chunk attention: the queries rotated into the workspace
    // (prefill_workspace_floats(group, chunk, mass != nullptr) floats), the
    // inner prefill, then (rotated values) every output row rotated back.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        const std::size_t rows = p.chunk * p.group;
        float* queries = workspace;
        for (std::size_t i = 0; i < p.chunk; ++i)
            for (std::size_t g = 0; g < p.group; ++g)
                std::memcpy(queries + (i * p.group + g) * dim_,
                            p.queries + i * p.query_token_stride + g * p.query_head_stride, dim_ * sizeof(float));
        k.hadamard.rotate(queries, rows, dim_, dim_, random_signs_, kernels::hadamard_direction::forward);
        kernels::prefill_problem q = p;
        q.queries = queries;
        q.query_token_stride = p.group * dim_;
        q.query_head_stride = dim_;
        inner_.prefill(k, q, workspace + rows * dim_);
        if constexpr (RotateValues)
            for (std::size_t i = 0; i < p.chunk; ++i)
                k.hadamard.rotate(p.out + i * p.out_token_stride, p.group, p.out_head_stride, dim_, random_signs_,
                                  kernels::hadamard_direction::inverse);
    }

private:
    void rotate_in(const kernels::kernel_table& k, dtype from, const void* key, const void* value,
                   float (&rows)[2][max_head_dim]) const noexcept {
        detail::convert_row(k, from, key, dtype::f32, rows[0], dim_);
        detail::convert_row(k, from, value, dtype::f32, rows[1], dim_);
        k.hadamard.rotate(rows[0], RotateValues ? 2 : 1, max_head_dim, dim_, random_signs_,
                          kernels::hadamard_direction::forward);
    }

public:
    // Serialization (cache/serialization.hpp): the rotation's parameters as shapes, then the inner store
    // (which holds the rotated rows as they are).
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("rotated head_dim", self.dim_);
        a.shape("rotated random signs", self.random_signs_ ? 1 : 0);
        Inner::transfer(self.inner_, a);
    }

private:
    Inner inner_;
    std::size_t dim_;
    bool random_signs_;
};

namespace quant {

template <class Codec, bool RotateValues = true>
struct rotated {
    static_assert(is_quantization_policy_v<Codec>,
                  "kvc::quant::rotated<Codec>: Codec must be a quantization policy (e.g. kvc::quant::q4_0)");

    using family = quantization_family;
    using codec_type = Codec;
    using head_storage = rotated_rows<typename Codec::head_storage, RotateValues>;
    static constexpr bool rotates_values = RotateValues;
    static constexpr bool needs_attention_stats = needs_attention_stats_v<Codec>;
    static constexpr bool needs_queries = needs_queries_v<Codec>;
    static constexpr std::size_t query_window = query_window_v<Codec>;

    Codec codec{};
    bool random_signs = true; // the fixed +-1 diagonal before the Walsh-Hadamard blocks

    // Bits per stored element: the inner codec's (the rotation stores nothing).
    template <class C = Codec, std::enable_if_t<detail::has_bits_per_value<C>::value, int> = 0>
    static constexpr double key_bits_per_value() noexcept {
        return C::key_bits_per_value();
    }
    template <class C = Codec, std::enable_if_t<detail::has_bits_per_value<C>::value, int> = 0>
    static constexpr double value_bits_per_value() noexcept {
        return C::value_bits_per_value();
    }

    void validate(const cache_config& config) const {
        detail::validate_part(codec, config);
    }

    // Throws kvc::error for a head dim the rotation (1..max_head_dim) or the
    // inner codec (its own make_head) does not support.
    template <class C = Codec, std::enable_if_t<!detail::has_indexed_make_head<C>::value, int> = 0>
    head_storage make_head(const cache_config& config) const {
        require_dim(config);
        return head_storage(codec.make_head(config), config.head_dim, random_signs);
    }
    template <class C = Codec, std::enable_if_t<detail::has_indexed_make_head<C>::value, int> = 0>
    head_storage make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        require_dim(config);
        return head_storage(codec.make_head(config, layer, kv_head), config.head_dim, random_signs);
    }

private:
    static void require_dim(const cache_config& config) {
        detail::require(config.head_dim >= 1 && config.head_dim <= max_head_dim,
                        "kvc::quant::rotated: expected head_dim in 1..", max_head_dim, ", got ", config.head_dim);
    }
};

} // namespace quant
} // namespace kvc
