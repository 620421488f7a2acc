// kvc/storage/latent_rows.hpp -- a head store that keeps each key and value
// as its coordinates in a rank-r orthonormal basis (the store of P1 PCA
// projection, policy/projection/pca.hpp).
//
// Layout:
//   latents   the codec's store (Inner) built for width r: row t holds
//             U_k^T k_t and U_v^T v_t as that codec encodes r-wide rows
//             (dense_rows: as they are in fp32, fp16 or bf16; q8_0, KIVI, ...:
//             quantized, Palu's latent quantization)
//   bases     U_k then U_v, each head_dim x r fp32, row-major (row d holds
//             channel d's coordinates on the r basis vectors); the head's own
//             copy, from the cache's memory resource, so bytes() counts it
// bytes() = the latents' store (dense: 2 r elements a token, capacity) + 2 head_dim r 4.
//
// Rows are projected as they are appended (push_back, on the stack: no
// allocation, so it stays noexcept). Attention never rebuilds a row: with
// P = U U^T, <q, P_k k> = <U_k^T q, U_k^T k>, and sum_t a_t P_v v_t =
// U_v (sum_t a_t U_v^T v_t). So decode projects the group's queries once,
// runs the latents' own attention (for dense latents the plain-row kernel;
// for a codec's store its fused kernel) over the r-wide rows into a fresh running
// state, multiplies its accumulator by U_v once per query head and merges
// it into the caller's state (any number of segments may follow). Prefill
// does the same around the latents' prefill, with the projected
// queries and latent outputs in the caller's workspace
// (prefill_workspace_floats). Logits, bias and attention mass are those of
// the latent attention, indexed by token as usual.
//
// decode_keys / decode_values return U U^T of the appended rows (what the
// logits see), rounded through the latents' encoding. store_row and
// store_key project what they are given, as push_back does, when the
// latents' store has them (offers() says so at run time for any_store).
// release() frees the latents and keeps the bases: a cleared cache appends
// again. A codec that takes positions with its rows (KVQuant: keys before
// RoPE) cannot hold latents, whose coordinates are not RoPE pairs: refused
// at compile time, or at construction for an any_store holding one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/core/error.hpp"
#include "kvc/storage/any_store.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/protocol.hpp"

namespace kvc {

template <class Inner = dense_rows>
class latent_rows {
    static_assert(std::is_same_v<Inner, any_store> || !detail::wants_positions<Inner>::value,
                  "kvc::latent_rows: a codec that takes positions with its rows (KVQuant) cannot store latents");

public:
    // `latents` (built for width `rank`, empty) will hold the coordinates;
    // key_basis and value_basis are head_dim x rank, row d at basis + d *
    // basis_stride (basis_stride >= rank: the first rank columns of a wider
    // basis). Copies them into the store, from `resource`; may throw bad_alloc.
    latent_rows(Inner latents, std::size_t head_dim, std::size_t rank, memory_resource* resource,
                const float* key_basis, const float* value_basis, std::size_t basis_stride)
        : dim_(head_dim), rank_(rank), bases_(resource), latents_(std::move(latents)) {
        if constexpr (std::is_same_v<Inner, any_store>)
            detail::require(!latents_.offers(store_capability::positions),
                            "kvc::latent_rows: expected a codec that stores rows as given, got one that takes "
                            "positions with its rows (KVQuant): latents are not RoPE pairs");
        bases_.reserve(2 * dim_ * rank_);
        bases_.resize_within_capacity(2 * dim_ * rank_);
        for (std::size_t d = 0; d < dim_; ++d) {
            std::memcpy(bases_.data() + d * rank_, key_basis + d * basis_stride, rank_ * sizeof(float));
            std::memcpy(bases_.data() + (dim_ + d) * rank_, value_basis + d * basis_stride, rank_ * sizeof(float));
        }
    }

    std::size_t dim() const noexcept { return dim_; }
    std::size_t rank() const noexcept { return rank_; }
    std::size_t tokens() const noexcept { return latents_.tokens(); }
    const Inner& latents() const noexcept { return latents_; }
    const float* key_basis() const noexcept { return bases_.data(); }
    const float* value_basis() const noexcept { return bases_.data() + dim_ * rank_; }

    std::size_t bytes() const noexcept { return latents_.bytes() + bases_.bytes(); }
    template <class I = Inner, std::enable_if_t<detail::has_bytes_per_token<I>::value, int> = 0>
    std::size_t bytes_per_token() const noexcept {
        return latents_.bytes_per_token();
    }
    // What one attention reads: the latents' stored bytes and both bases.
    std::size_t stored_bytes() const noexcept { return detail::stored_bytes_of(latents_) + bases_.bytes(); }
    // The optional members the latents' store has (any_store: the held one's).
    bool offers(store_capability c) const noexcept {
        switch (c) {
        case store_capability::store_key:
        case store_capability::store_row:
        case store_capability::bytes_per_token: return detail::store_offers(latents_, c);
        case store_capability::assign_precision:
        case store_capability::positions: return false;
        }
        return false;
    }

    void reserve_for_append(std::size_t extra) { latents_.reserve_for_append(extra); }
    void reserve(std::size_t rows) { latents_.reserve(rows); }

    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        alignas(64) float rows[2][max_head_dim];
        detail::convert_row(k, from, key, dtype::f32, rows[0], dim_);
        detail::convert_row(k, from, value, dtype::f32, rows[1], dim_);
        float coordinates[2][max_head_dim];
        project(key_basis(), rows[0], coordinates[0]);
        project(value_basis(), rows[1], coordinates[1]);
        if constexpr (std::is_same_v<Inner, any_store>)
            latents_.push_back(k, dtype::f32, coordinates[0], coordinates[1], 0); // refused position-takers: unused
        else
            latents_.push_back(k, dtype::f32, coordinates[0], coordinates[1]);
    }
    // A merged slot (fp32 rows in the model's space), projected as push_back does.
    template <class I = Inner, std::enable_if_t<detail::has_store_row<I>::value, int> = 0>
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        float coordinates[2][max_head_dim];
        project(key_basis(), key, coordinates[0]);
        project(value_basis(), value, coordinates[1]);
        latents_.store_row(k, t, coordinates[0], coordinates[1]);
    }
    // A rewritten key (re-rotation), projected: a rotated key leaves the span in general.
    template <class I = Inner, std::enable_if_t<detail::has_store_key<I>::value, int> = 0>
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* key) noexcept {
        float coordinates[max_head_dim];
        project(key_basis(), key, coordinates);
        latents_.store_key(k, t, coordinates);
    }

    latent_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        if constexpr (detail::has_compacted<Inner>::value) {
            return latent_rows(latents_.compacted(indices, count), *this);
        } else {
            Inner kept(latents_);
            kept.keep(indices, count);
            kept.shrink_to_fit();
            return latent_rows(std::move(kept), *this);
        }
    }

    // Rows [first, first + count) as U U^T row, fp32 [count][head_dim].
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        decode(k, key_basis(), first, count, out, true);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        decode(k, value_basis(), first, count, out, false);
    }

    void shrink_to_fit() { latents_.shrink_to_fit(); }
    void release() noexcept { latents_.release(); }

    // Decode attention in the latent space, a few query heads at a time (8 KiB stack buffers).
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        constexpr std::size_t budget = 2 * max_head_dim, most_heads = 64;
        alignas(64) float queries[budget];
        alignas(64) float latent_acc[budget];
        alignas(64) float acc[budget];
        float max[most_heads], sum[most_heads];
        const std::size_t heads_per_pass = budget / dim_ < most_heads ? budget / dim_ : most_heads;
        for (std::size_t g0 = 0; g0 < p.group; g0 += heads_per_pass) {
            const std::size_t heads = p.group - g0 < heads_per_pass ? p.group - g0 : heads_per_pass;
            for (std::size_t g = 0; g < heads; ++g)
                project(key_basis(), p.queries + (g0 + g) * p.query_stride, queries + g * rank_);
            kernels::decode_problem q = p;
            q.group = heads;
            q.queries = queries;
            q.query_stride = rank_;
            q.key_dim = 0;
            q.logits = p.logits ? p.logits + g0 * p.logits_stride : nullptr;
            const kernels::decode_state local{max, sum, latent_acc};
            kernels::common::reset_state<kernels::reference_arch>(local, heads, rank_);
            latents_.attend(k, q, local);
            for (std::size_t g = 0; g < heads; ++g) lift(value_basis(), latent_acc + g * rank_, acc + g * dim_);
            const kernels::decode_state into{state.max + g0, state.sum + g0, state.acc + g0 * dim_};
            kernels::common::merge_state_keeping_nan<kernels::reference_arch>(into, {max, sum, acc}, heads, dim_);
        }
    }

    // Workspace of prefill: the chunk's projected queries and latent outputs, then the latents' own.
    std::size_t prefill_workspace_floats(std::size_t group, std::size_t chunk, bool with_mass) const noexcept {
        return 2 * chunk * group * rank_ + detail::prefill_workspace_of(latents_, group, rank_, chunk, with_mass);
    }

    // Causal chunk attention in the latent space: the queries projected into
    // the workspace, the plain-row prefill over the latents into latent
    // outputs there, each output lifted by U_v into p.out.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        const std::size_t rows = p.chunk * p.group;
        float* queries = workspace;
        float* outputs = workspace + rows * rank_;
        for (std::size_t i = 0; i < p.chunk; ++i)
            for (std::size_t g = 0; g < p.group; ++g)
                project(key_basis(), p.queries + i * p.query_token_stride + g * p.query_head_stride,
                        queries + (i * p.group + g) * rank_);
        kernels::prefill_problem q = p;
        q.queries = queries;
        q.query_token_stride = p.group * rank_;
        q.query_head_stride = rank_;
        q.out = outputs;
        q.out_token_stride = p.group * rank_;
        q.out_head_stride = rank_;
        latents_.prefill(k, q, outputs + rows * rank_);
        for (std::size_t i = 0; i < p.chunk; ++i)
            for (std::size_t g = 0; g < p.group; ++g)
                lift(value_basis(), outputs + (i * p.group + g) * rank_,
                     p.out + i * p.out_token_stride + g * p.out_head_stride);
    }

public:
    // Serialization (kvc/core/archive.hpp): dim and rank as shapes, the
    // bases as the policy's (calibrated: on load they must equal the
    // destination's, so a file from another calibration is refused), then
    // the latents.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("latent_rows head_dim", self.dim_);
        a.shape("latent_rows rank", self.rank_);
        a.same("latent_rows bases", self.bases_);
        Inner::transfer(self.latents_, a);
    }

private:
    latent_rows(Inner latents, const latent_rows& bases_of)
        : dim_(bases_of.dim_), rank_(bases_of.rank_), bases_(bases_of.bases_), latents_(std::move(latents)) {}

    // out[j] = sum_d row[d] U[d][j]: the coordinates of `row` (head_dim) on the r basis vectors.
    void project(const float* basis, const float* row, float* out) const noexcept {
        for (std::size_t j = 0; j < rank_; ++j) out[j] = 0.0f;
        for (std::size_t d = 0; d < dim_; ++d) {
            const float x = row[d];
            const float* u = basis + d * rank_;
            for (std::size_t j = 0; j < rank_; ++j) out[j] += x * u[j];
        }
    }
    // out[d] = sum_j U[d][j] coordinates[j]: back to head_dim.
    void lift(const float* basis, const float* coordinates, float* out) const noexcept {
        for (std::size_t d = 0; d < dim_; ++d) {
            const float* u = basis + d * rank_;
            float x = 0.0f;
            for (std::size_t j = 0; j < rank_; ++j) x += u[j] * coordinates[j];
            out[d] = x;
        }
    }
    void decode(const kernels::kernel_table& k, const float* basis, std::size_t first, std::size_t count, float* out,
                bool keys) const noexcept {
        // The latents' own decode, a block of rows at a time (8 KiB on the stack).
        constexpr std::size_t budget = 2048;
        alignas(64) float coordinates[budget];
        const std::size_t block = budget / rank_;
        for (std::size_t t0 = 0; t0 < count; t0 += block) {
            const std::size_t n = count - t0 < block ? count - t0 : block;
            if (keys) latents_.decode_keys(k, first + t0, n, coordinates);
            else latents_.decode_values(k, first + t0, n, coordinates);
            for (std::size_t t = 0; t < n; ++t) lift(basis, coordinates + t * rank_, out + (t0 + t) * dim_);
        }
    }

    std::size_t dim_, rank_;
    aligned_buffer<float> bases_; // [2][head_dim][rank]: U_k, U_v
    Inner latents_;
};

} // namespace kvc
