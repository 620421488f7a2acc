// kvc/policy/quantization/cq.hpp -- Q8 channel-coupled vector quantization (CQ).
//
// What it is. Each key and value row of a KV head is split into dim / c
// groups of c adjacent channels; each group is stored as the b-bit index of
// the nearest of 2^b centroids of that (layer, KV head, group)'s codebook,
// learnt offline by k-means (calibration/cq.hpp). Coupling channels lets one
// code capture their joint distribution, so the bits per channel, b / c, can
// go below what per-channel scalar codes reach: c = 8, b = 8 is 1 bit per
// channel. Source: Zhang et al., "KV Cache is 1 Bit Per Channel: Efficient
// Large Language Model Inference with Coupled Quantization" (2024),
// docs/METHODS.md Q8.
//
//   auto artifact = kvc::calibration::calibrate_cq(sample_keys, sample_values, {8, 8});
//   kvc::quant::cq codec(artifact);                 // or from kvc::calibration::load(path)
//   kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::cq, kvc::project::none>
//       cache(config, {}, {}, codec);
//
// Layout per (layer, KV head) (kernels/quant/cq_problem.hpp has the bit order):
//   key codes    tokens x ceil(groups b / 8) bytes    groups = dim / c
//   value codes  tokens x ceil(groups b / 8) bytes
//   codebooks    2 x groups x c x 2^b fp32            keys then values, channel-major per group
// bytes() = 2 * capacity * row_bytes + 8 * dim * 2^b (the codebooks). Each
// head owns a copy of its own codebooks, allocated from the cache's memory
// resource, so the cache's bytes() counts them where they live. The policy
// object keeps the artifact's codebooks (ordinary heap, shared between copies
// of the policy through a shared_ptr to immutable data) to build heads from;
// that copy is not in the cache's bytes(). For dim = 128, b = 8 the codebooks
// are 256 KiB per head: about 4K tokens' worth of fp16 rows, so CQ pays off
// for heads that hold more than a few thousand tokens.
//
// Attention runs on the codes (kernels/quant/cq_simd.hpp): per query head
// and group a 2^b-entry table of <q slice, centroid> makes a logit dim / c
// table lookups; values accumulate softmax weight per (group, code) and are
// multiplied by the centroids once per call. No decoded row is ever written.
//
// Choices where the source is silent:
// - Codebooks per (layer, KV head, group), separately for keys and values
//   (not shared across heads), fp32 centroids; k-means++ seeding + Lloyd.
// - Nearest centroid in squared Euclidean distance, ties to the lowest code.
// - NaN or +-Inf in an appended group (or a group so large that every squared
//   distance overflows float, |x| beyond ~1e19): there is no code for it, the
//   group gets code 0, i.e. it is replaced by the finite centroid 0 of its
//   codebook. So non-finite input does not propagate into attention (unlike
//   full_cache, which would return NaN); other groups of the row and other
//   tokens are untouched (tested). Rejecting it would need a scan in the cache
//   before anything is stored (push_back is noexcept).
// - Keys are stored as given (after RoPE, as the engine passes them).
// - No sink tokens (Q9) yet: every token is coded.
// - attend() needs a per-call workspace of cq_workspace_floats(dim, c, b)
//   floats (~0.5 MiB for dim 128, c 4, b 8): a thread_local buffer, grown on
//   first use per thread and reused, not from the cache's resource and not in
//   bytes() (like attention_scratch's per-call memory).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/quant/cq_problem.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc::quant {

// The codes and codebooks of one KV head.
class cq_head {
public:
    // key_books and value_books: this head's codebooks in artifact order,
    // [groups][2^bits][channels]. Throws kvc::error for an unsupported shape.
    cq_head(std::size_t dim, std::size_t channels, std::size_t bits, const float* key_books, const float* value_books,
            memory_resource* resource)
        : dim_((calibration::detail::validate_cq_shape(channels, bits, dim, "kvc::quant::cq_head"), dim)),
          channels_(channels), bits_(bits), groups_(dim / channels), clusters_(std::size_t{1} << bits),
          row_bytes_(kernels::cq_row_bytes(dim / channels, bits)), codebooks_(resource), keys_(resource),
          values_(resource) {
        const std::size_t book = groups_ * channels_ * clusters_;
        codebooks_.resize(2 * book);
        // Artifact order [g][k][j] -> channel-major [g][j][k], what the kernels read.
        for (int which = 0; which < 2; ++which) {
            const float* from = which == 0 ? key_books : value_books;
            float* to = codebooks_.data() + which * book;
            for (std::size_t g = 0; g < groups_; ++g)
                for (std::size_t k = 0; k < clusters_; ++k)
                    for (std::size_t j = 0; j < channels_; ++j)
                        to[(g * channels_ + j) * clusters_ + k] = from[(g * clusters_ + k) * channels_ + j];
        }
    }

    std::size_t dim() const noexcept { return dim_; }
    std::size_t channels() const noexcept { return channels_; }
    std::size_t bits() const noexcept { return bits_; }
    std::size_t tokens() const noexcept { return keys_.size() / row_bytes_; }
    std::size_t row_bytes() const noexcept { return row_bytes_; }
    // Bytes of both codebooks, and of one token's key and value codes.
    std::size_t codebook_bytes() const noexcept { return codebooks_.bytes(); }
    std::size_t bytes_per_token() const noexcept { return 2 * row_bytes_; }
    // Bytes one attention call reads: every code and both codebooks.
    std::size_t stored_bytes() const noexcept { return tokens() * bytes_per_token() + codebook_bytes(); }
    // Channel-major codebooks ([groups][channels][2^bits]) and the packed codes.
    const float* key_codebook() const noexcept { return codebooks_.data(); }
    const float* value_codebook() const noexcept { return codebooks_.data() + groups_ * channels_ * clusters_; }
    const unsigned char* key_codes(std::size_t t) const noexcept { return keys_.data() + t * row_bytes_; }
    const unsigned char* value_codes(std::size_t t) const noexcept { return values_.data() + t * row_bytes_; }

    // Everything held from the memory resource: codes (capacity) and codebooks.
    std::size_t bytes() const noexcept { return keys_.bytes() + values_.bytes() + codebooks_.bytes(); }

    void reserve_for_append(std::size_t extra) {
        const std::size_t bytes =
            detail::checked_mul(extra, row_bytes_, "kvc::quant::cq::reserve_for_append", "rows", "bytes per row");
        keys_.reserve_for_append(bytes);
        values_.reserve_for_append(bytes);
    }
    void reserve(std::size_t rows) {
        const std::size_t bytes = detail::checked_mul(rows, row_bytes_, "kvc::quant::cq::reserve", "rows", "bytes per row");
        keys_.reserve(bytes);
        values_.reserve(bytes);
    }

    // Codes of one key and value row given in `from` format (capacity reserved;
    // never allocates or throws). NaN/Inf: see the header comment.
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        float row[max_head_dim];
        const std::size_t t = tokens();
        keys_.resize_within_capacity(keys_.size() + row_bytes_);
        values_.resize_within_capacity(values_.size() + row_bytes_);
        k.to_f32[kernels::index_of(from)](key, row, dim_);
        k.cq.encode_row(row, key_codebook(), dim_, channels_, bits_, keys_.data() + t * row_bytes_);
        k.to_f32[kernels::index_of(from)](value, row, dim_);
        k.cq.encode_row(row, value_codebook(), dim_, channels_, bits_, values_.data() + t * row_bytes_);
    }

    void keep(const std::uint32_t* indices, std::size_t count) noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            if (indices[i] == i) continue;
            std::memmove(keys_.data() + i * row_bytes_, keys_.data() + indices[i] * row_bytes_, row_bytes_);
            std::memmove(values_.data() + i * row_bytes_, values_.data() + indices[i] * row_bytes_, row_bytes_);
        }
        keys_.resize_within_capacity(count * row_bytes_);
        values_.resize_within_capacity(count * row_bytes_);
    }

    // Tokens [first, first + count) as the centroid values attention uses, [count][dim].
    void decode_keys(const kernels::kernel_table&, std::size_t first, std::size_t count, float* out) const noexcept {
        decode(key_codebook(), keys_.data(), first, count, out);
    }
    void decode_values(const kernels::kernel_table&, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        decode(value_codebook(), values_.data(), first, count, out);
    }

    void shrink_to_fit() {
        keys_.shrink_to_fit();
        values_.shrink_to_fit();
    }
    // clear() and release() drop the codes; the codebooks stay (the head stays usable).
    void clear() noexcept {
        keys_.clear();
        values_.clear();
    }
    void release() noexcept {
        keys_.release();
        values_.release();
    }

    // Folds every token into `state` (throws std::bad_alloc only when this
    // thread's workspace must grow and cannot).
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const {
        attend_prefix(k, p, state, tokens(), workspace());
    }

    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* scratch) const {
        float* lookup = workspace();
        kernels::prefill_problem shaped = p; // the cache leaves the store's own extents unset
        shaped.dim = dim_;
        shaped.tokens = tokens();
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            shaped, tokens(), scratch,
            [&](std::size_t visible, const kernels::decode_problem& d, const kernels::decode_state& state) {
                attend_prefix(k, d, state, visible, lookup);
            });
    }

private:
    float* workspace() const {
        thread_local std::vector<float> buffer;
        const std::size_t floats = kernels::cq_workspace_floats(dim_, channels_, bits_);
        if (buffer.size() < floats) buffer.resize(floats);
        return buffer.data();
    }

    void attend_prefix(const kernels::kernel_table& k, const kernels::decode_problem& p,
                       const kernels::decode_state& state, std::size_t count, float* lookup) const noexcept {
        kernels::cq_decode_problem q;
        q.rows.keys = keys_.data();
        q.rows.values = values_.data();
        q.rows.row_bytes = row_bytes_;
        q.rows.key_codebook = key_codebook();
        q.rows.value_codebook = value_codebook();
        q.rows.channels = channels_;
        q.rows.bits = bits_;
        q.tokens = count;
        kernels::queries_of(q) = p;
        q.workspace = lookup;
        q.dim = dim_;
        k.cq.attend_partial(q, state);
    }

    void decode(const float* book, const unsigned char* codes, std::size_t first, std::size_t count,
                float* out) const noexcept {
        for (std::size_t i = 0; i < count; ++i) {
            const unsigned char* row = codes + (first + i) * row_bytes_;
            for (std::size_t g = 0; g < groups_; ++g) {
                const unsigned code = kernels::cq_common::code_at<kernels::reference_arch>(row, g, bits_);
                for (std::size_t j = 0; j < channels_; ++j)
                    out[i * dim_ + g * channels_ + j] = book[(g * channels_ + j) * clusters_ + code];
            }
        }
    }

public:
    // Serialization (cache/serialization.hpp): the shape, the codebooks as a
    // must-match buffer (they come from the calibration), then the codes.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("cq_head head_dim", self.dim_);
        a.shape("cq_head channels", self.channels_);
        a.shape("cq_head bits", self.bits_);
        a.same("cq_head codebooks", self.codebooks_);
        std::size_t tokens = self.tokens();
        a.count("cq_head tokens", tokens, std::size_t{1} << 31);
        a.elements("cq_head keys", self.keys_, tokens * self.row_bytes_);
        a.elements("cq_head values", self.values_, tokens * self.row_bytes_);
    }

private:
    std::size_t dim_, channels_, bits_, groups_, clusters_, row_bytes_;
    aligned_buffer<float> codebooks_;          // [2][groups][channels][2^bits]
    aligned_buffer<unsigned char> keys_, values_;
};

// The codec: the codebooks of every (layer, KV head) from a "cq" artifact.
class cq {
public:
    using family = quantization_family;
    using head_storage = cq_head;

    // Throws kvc::error unless `a` is a well-formed "cq" artifact
    // (calibration/cq.hpp): kind, tensors, shapes, supported c and b, finite centroids.
    explicit cq(const calibration::artifact& a) {
        const char* who = "kvc::quant::cq";
        kvc::detail::require(a.kind == calibration::cq_kind, who, ": expected a calibration artifact of kind 'cq', got '",
                             a.kind, "'");
        const float c = a.get("channels_per_group", {1}).values[0], b = a.get("bits", {1}).values[0];
        kvc::detail::require(c == 1.0f || c == 2.0f || c == 4.0f || c == 8.0f, who,
                             ": expected channels_per_group 1, 2, 4 or 8 in the artifact, got ", c);
        kvc::detail::require(b >= 1.0f && b <= 8.0f && b == std::floor(b), who,
                             ": expected bits 1..8 in the artifact, got ", b);
        channels_ = static_cast<std::size_t>(c);
        bits_ = static_cast<std::size_t>(b);
        const calibration::tensor* keys = nullptr;
        for (const calibration::tensor& t : a.tensors)
            if (t.name == "key_codebooks") keys = &t;
        kvc::detail::require(keys != nullptr, who, ": the artifact has no tensor 'key_codebooks'");
        kvc::detail::require(keys->shape.size() == 5 && keys->shape[0] > 0 && keys->shape[1] > 0 &&
                                 keys->shape[2] > 0 && keys->shape[3] == (std::uint64_t{1} << bits_) &&
                                 keys->shape[4] == channels_,
                             who, ": expected key_codebooks of shape [layers][kv_heads][groups][", 1u << bits_, "][",
                             channels_, "], got rank ", keys->shape.size());
        layers_ = static_cast<std::size_t>(keys->shape[0]);
        kv_heads_ = static_cast<std::size_t>(keys->shape[1]);
        head_dim_ = static_cast<std::size_t>(keys->shape[2]) * channels_;
        const calibration::tensor& values = a.get("value_codebooks", keys->shape);
        for (const calibration::tensor* t : {keys, &values})
            for (float x : t->values)
                kvc::detail::require(std::isfinite(x), who, ": expected finite centroids, '", t->name, "' holds ", x);
        keys_ = std::make_shared<const std::vector<float>>(keys->values);
        values_ = std::make_shared<const std::vector<float>>(values.values);
    }

    std::size_t channels_per_group() const noexcept { return channels_; }
    std::size_t bits() const noexcept { return bits_; }
    double bits_per_channel() const noexcept { return static_cast<double>(bits_) / static_cast<double>(channels_); }
    std::size_t layers() const noexcept { return layers_; }
    std::size_t kv_heads() const noexcept { return kv_heads_; }
    std::size_t head_dim() const noexcept { return head_dim_; }

    // compressed_cache calls this first: the artifact must be for this cache's shape.
    void validate(const cache_config& config) const {
        kvc::detail::require(config.layers == layers_ && config.kv_heads == kv_heads_ && config.head_dim == head_dim_,
                             "kvc::quant::cq: the codebooks are for ", layers_, " layers x ", kv_heads_,
                             " KV heads x head_dim ", head_dim_, ", the cache has ", config.layers, " x ",
                             config.kv_heads, " x ", config.head_dim);
    }

    head_storage make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        validate(config);
        kvc::detail::require(layer < layers_ && kv_head < kv_heads_, "kvc::quant::cq::make_head: expected layer < ",
                             layers_, " and kv_head < ", kv_heads_, ", got ", layer, " and ", kv_head);
        const std::size_t per_head = head_dim_ * (std::size_t{1} << bits_); // groups x 2^b x c
        const std::size_t offset = (layer * kv_heads_ + kv_head) * per_head;
        return cq_head(head_dim_, channels_, bits_, keys_->data() + offset, values_->data() + offset, config.resource);
    }

private:
    std::size_t channels_ = 0, bits_ = 0, layers_ = 0, kv_heads_ = 0, head_dim_ = 0;
    std::shared_ptr<const std::vector<float>> keys_, values_; // artifact order, all heads
};

} // namespace kvc::quant
