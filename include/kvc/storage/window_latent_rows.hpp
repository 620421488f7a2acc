// kvc/storage/window_latent_rows.hpp -- a head store whose older tokens are
// rank-r latents and whose newest tokens are whole rows (the store of P5
// CSKV's bi-branch cache, policy/projection/cskv.hpp).
//
// Layout, in token order:
//   body     tokens 0 .. b-1   a latent_rows<Inner>: each key and value as its
//                              coordinates in the head's rank-r bases, kept by
//                              the codec's store built at width r
//   window   tokens b .. n-1   a dense_rows of whole rows in the cache's
//                              storage type, where appends land
// moved(count) returns a store whose body also holds the oldest `count`
// window rows, projected from the rows as the window stored them.
//
// Attention: the body in the latent space (latent_rows), then the window rows
// with the plain-row kernel, into the same running state: one softmax over
// both branches. Prefill runs one decode pass per chunk query
// (kernels::common::prefill_by_decode) once the body holds tokens: a chunk's
// rows are always in the window (the projection stage moves rows only when
// the cache compresses).
//
// decode_keys / decode_values: U U^T of the body's decoded latents, then the
// window rows. store_row / store_key go to the branch holding the token
// (the body's only when its codec has them); bytes_per_token is not offered
// (two branches of different cost).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/storage/any_store.hpp"
#include "kvc/storage/dense_rows.hpp"
#include "kvc/storage/latent_rows.hpp"
#include "kvc/storage/protocol.hpp"

namespace kvc {

template <class Inner = dense_rows>
class window_latent_rows {
public:
    using body_type = latent_rows<Inner>;

    // `body` and `window` empty; the window's width is the model's head_dim.
    window_latent_rows(body_type body, dense_rows window) : body_(std::move(body)), window_(std::move(window)) {}

    std::size_t dim() const noexcept { return window_.dim(); }
    std::size_t tokens() const noexcept { return body_tokens() + window_.tokens(); }
    std::size_t body_tokens() const noexcept { return body_.tokens(); }
    const body_type& body() const noexcept { return body_; }
    const dense_rows& window() const noexcept { return window_; }

    std::size_t bytes() const noexcept { return body_.bytes() + window_.bytes(); }
    std::size_t stored_bytes() const noexcept { return body_.stored_bytes() + window_.stored_bytes(); }
    bool offers(store_capability c) const noexcept {
        switch (c) {
        case store_capability::store_key:
        case store_capability::store_row: return detail::store_offers(body_, c);
        case store_capability::bytes_per_token:
        case store_capability::assign_precision:
        case store_capability::positions: return false;
        }
        return false;
    }

    void reserve_for_append(std::size_t extra) { window_.reserve_for_append(extra); }
    void reserve(std::size_t rows) { window_.reserve(rows > body_tokens() ? rows - body_tokens() : 0); }
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        window_.push_back(k, from, key, value);
    }

    template <class B = body_type, std::enable_if_t<detail::has_store_row<B>::value, int> = 0>
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        if (t < body_tokens()) body_.store_row(k, t, key, value);
        else window_.store_row(k, t - body_tokens(), key, value);
    }
    template <class B = body_type, std::enable_if_t<detail::has_store_key<B>::value, int> = 0>
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* key) noexcept {
        if (t < body_tokens()) body_.store_key(k, t, key);
        else window_.store_key(k, t - body_tokens(), key);
    }

    // A store of the tokens at ascending `indices`, in exactly the memory they need.
    window_latent_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        const std::size_t body = body_tokens();
        std::size_t in_body = 0;
        while (in_body < count && indices[in_body] < body) ++in_body;
        std::vector<std::uint32_t> in_window(indices + in_body, indices + count);
        for (std::uint32_t& t : in_window) t -= static_cast<std::uint32_t>(body);
        return window_latent_rows(body_.compacted(indices, in_body),
                                  window_.compacted(in_window.data(), in_window.size()));
    }

    // A store whose body also holds the oldest `count` window rows (projected
    // from the window's rows), the rest of the window after them. Old storage
    // untouched; may throw bad_alloc.
    window_latent_rows moved(const kernels::kernel_table& k, std::size_t count) const {
        body_type body(body_);
        body.reserve_for_append(count);
        for (std::size_t t = 0; t < count; ++t) body.push_back(k, window_.type(), window_.key_row(t), window_.value_row(t));
        std::vector<std::uint32_t> rest(window_.tokens() - count);
        for (std::size_t i = 0; i < rest.size(); ++i) rest[i] = static_cast<std::uint32_t>(count + i);
        return window_latent_rows(std::move(body), window_.compacted(rest.data(), rest.size()));
    }

    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        decode(k, first, count, out, true);
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        decode(k, first, count, out, false);
    }

    void shrink_to_fit() {
        body_.shrink_to_fit();
        window_.shrink_to_fit();
    }
    void release() noexcept {
        body_.release();
        window_.release();
    }

    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        if (body_tokens() != 0) body_.attend(k, p, state);
        window_.attend_segment(k, p, state, window_.tokens(), body_tokens());
    }

    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        if (body_tokens() == 0) {
            window_.prefill(k, p, workspace);
            return;
        }
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, tokens(), workspace,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                body_.attend(k, d, state);
                window_.attend_segment(k, d, state, visible - body_tokens(), body_tokens());
            });
    }

    // Serialization (kvc/core/archive.hpp): the body, then the window.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        body_type::transfer(self.body_, a);
        dense_rows::transfer(self.window_, a);
    }

private:
    void decode(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out,
                bool keys) const noexcept {
        const std::size_t body = body_tokens(), d = window_.dim();
        const std::size_t in_body = first >= body ? 0 : (first + count < body ? count : body - first);
        if (in_body != 0) {
            if (keys) body_.decode_keys(k, first, in_body, out);
            else body_.decode_values(k, first, in_body, out);
        }
        if (in_body == count) return;
        const std::size_t from = first + in_body - body;
        if (keys) window_.decode_keys(k, from, count - in_body, out + in_body * d);
        else window_.decode_values(k, from, count - in_body, out + in_body * d);
    }

    body_type body_;
    dense_rows window_;
};

} // namespace kvc
