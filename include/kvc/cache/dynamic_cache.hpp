// kvc/cache/dynamic_cache.hpp -- a compressed cache composed at run time.
//
//   kvc::dynamic_cache cache(config, kvc::quant::any(kvc::quant::q4_0{}),
//                            kvc::evict::to_any(kvc::evict::snapkv(kvc::evict::budget::ratio(0.25))));
//   cache.append(layer, keys, values, position);   // the operations of compressed_cache
//
// For research prototypes and tools that pick methods from a config file, a
// sweep or a notebook (kvc/registry.hpp builds one from a spec such as
// "kivi:2 + snapkv:0.25"). Engines that fix their method at compile time keep
// using compressed_cache, the zero-overhead path.
//
// How it is erased. The codec (quant::any) and the eviction's scorer and
// selector (evict::any) are held at run time inside one compressed_cache
// type; the merger and the projection are type parameters of that cache, so
// the dynamic cache holds one of a few compressed_cache types (one per merger;
// per projection, with and without eviction: PCA and CSKV over quant::any,
// ThinK and Loki over each row type), chosen at construction, behind one
// indirect call per operation. Nothing is erased per token or per element,
// and every output is the static composition's bit for bit (tests/cache/
// dynamic_composition_test.cpp). The instantiations are the sum of the family
// lists, not their product.
//
// Views: append takes any kv_view of fp32, fp16 or bf16 rows; contiguous and
// strided views go through layout_strided, paged views as they are.
// Serialization: kvc::save_cache / load_cache / save_layer / load_layer
// (below; the format of cache/serialization.hpp) save what the held cache
// holds. A file's header names the held codec, scorer and selector types,
// so it loads only into a dynamic_cache of the same composition (not into the
// equivalent static compressed_cache, whose columns differ).
// Errors and thread safety are compressed_cache's. A pairing the methods do
// not support is refused at construction with kvc::error: merging without an
// eviction policy (nothing is dropped to fold), a projection with merging
// (not offered yet), ThinK or Loki over a codec that does not store rows as
// they are, PCA over a codec that does not take rows of its rank.
#pragma once

#include <cstddef>
#include <cstdint>
#include <istream>
#include <memory>
#include <ostream>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/serialization.hpp"
#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/any.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/cam.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/merging/similarity.hpp"
#include "kvc/policy/merging/zero_merge.hpp"
#include "kvc/policy/projection/cskv.hpp"
#include "kvc/policy/projection/loki.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/projection/pca.hpp"
#include "kvc/policy/projection/think.hpp"
#include "kvc/policy/quantization/any.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc {

class dynamic_cache;
namespace detail {
struct dynamic_cache_access;
}

// The merging and projection policies a dynamic_cache can hold: adding one
// is a line here.
using any_merger = std::variant<merge::none, merge::compensation, merge::zero_merge, merge::similarity, merge::cam>;
using any_projection = std::variant<project::none, project::think, project::pca, project::loki, project::cskv>;

class dynamic_cache {
public:
    // `eviction` empty: keep every token (evict::none).
    dynamic_cache(const cache_config& config, quant::any codec, std::optional<evict::any> eviction = std::nullopt,
                  any_merger merging = merge::none{}, any_projection projection = project::none{})
        : cache_(build(config, std::move(codec), std::move(eviction), std::move(merging), std::move(projection))) {}

    dynamic_cache(const dynamic_cache& other) : cache_(other.live().clone()) {}
    dynamic_cache& operator=(const dynamic_cache& other) {
        if (this != &other) cache_ = other.live().clone();
        return *this;
    }
    dynamic_cache(dynamic_cache&&) noexcept = default;
    dynamic_cache& operator=(dynamic_cache&&) noexcept = default;
    ~dynamic_cache() = default;

    const cache_config& config() const { return live().config(); }

    template <class T, class Layout>
    void append(std::size_t layer, const kv_view<T, Layout>& keys, const kv_view<T, Layout>& values,
                std::int64_t first_position) {
        using element = std::remove_const_t<T>;
        static_assert(std::is_same_v<element, float> || std::is_same_v<element, half> ||
                          std::is_same_v<element, bfloat16>,
                      "kvc::dynamic_cache::append: rows of float, kvc::half or kvc::bfloat16");
        if constexpr (std::is_same_v<Layout, layout_paged>)
            live().append(layer, kv_view<const element, layout_paged>(keys), kv_view<const element, layout_paged>(values),
                          first_position);
        else
            live().append(layer, kv_view<const element, layout_strided>(keys),
                          kv_view<const element, layout_strided>(values), first_position);
    }
    void attend(std::size_t layer, const float* queries, float* out, float* mass = nullptr) {
        live().attend(layer, queries, out, mass);
    }
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out, float* mass = nullptr) {
        live().attend_chunk(layer, queries, chunk, out, mass);
    }
    void compress(std::size_t layer) { live().compress(layer); }
    void compress() { live().compress_all(); }

    std::int64_t next_position(std::size_t layer) const { return live().next_position(layer); }
    std::size_t tokens(std::size_t layer, std::size_t kv_head) const { return live().tokens(layer, kv_head); }
    std::size_t tokens(std::size_t layer) const { return live().tokens(layer); }
    std::size_t tokens_seen(std::size_t layer) const { return live().tokens_seen(layer); }
    const std::int32_t* positions(std::size_t layer, std::size_t kv_head) const {
        return live().positions(layer, kv_head);
    }
    const float* attention_statistic(std::size_t layer, std::size_t kv_head) const {
        return live().attention_statistic(layer, kv_head);
    }
    float* external_scores(std::size_t layer, std::size_t kv_head) { return live().external_scores(layer, kv_head); }
    void assign_precision(std::size_t layer, std::size_t kv_head, const float* scores) {
        live().assign_precision(layer, kv_head, scores);
    }
    bool offers(store_capability c) const { return live().offers(c); }

    std::size_t bytes() const noexcept { return cache_ ? cache_->bytes() : 0; }
    // What one attention over `layer` reads (compressed_cache::stored_bytes).
    std::size_t stored_bytes(std::size_t layer) const { return live().stored_bytes(layer); }
    std::size_t query_window_bytes() const noexcept { return cache_ ? cache_->query_window_bytes() : 0; }
    void reserve(std::size_t tokens) { live().reserve(tokens); }
    void shrink_to_fit() { live().shrink_to_fit(); }
    void clear() noexcept {
        if (cache_) cache_->clear();
    }

    // The compressed_cache inside, when it is a Cache (tools and tests); nullptr otherwise.
    template <class Cache>
    const Cache* target() const noexcept {
        auto* held = dynamic_cast<const model<Cache>*>(cache_.get());
        return held ? &held->cache : nullptr;
    }

private:
    friend struct detail::dynamic_cache_access;

    template <class T>
    using strided = kv_view<const T, layout_strided>;
    template <class T>
    using paged = kv_view<const T, layout_paged>;

    struct interface {
        virtual ~interface() = default;
        virtual std::unique_ptr<interface> clone() const = 0;
        virtual const cache_config& config() const noexcept = 0;
        virtual void append(std::size_t, const strided<float>&, const strided<float>&, std::int64_t) = 0;
        virtual void append(std::size_t, const strided<half>&, const strided<half>&, std::int64_t) = 0;
        virtual void append(std::size_t, const strided<bfloat16>&, const strided<bfloat16>&, std::int64_t) = 0;
        virtual void append(std::size_t, const paged<float>&, const paged<float>&, std::int64_t) = 0;
        virtual void append(std::size_t, const paged<half>&, const paged<half>&, std::int64_t) = 0;
        virtual void append(std::size_t, const paged<bfloat16>&, const paged<bfloat16>&, std::int64_t) = 0;
        virtual void attend(std::size_t, const float*, float*, float*) = 0;
        virtual void attend_chunk(std::size_t, const float*, std::size_t, float*, float*) = 0;
        virtual void compress(std::size_t) = 0;
        virtual void compress_all() = 0;
        virtual std::int64_t next_position(std::size_t) const = 0;
        virtual std::size_t tokens(std::size_t, std::size_t) const = 0;
        virtual std::size_t tokens(std::size_t) const = 0;
        virtual std::size_t tokens_seen(std::size_t) const = 0;
        virtual const std::int32_t* positions(std::size_t, std::size_t) const = 0;
        virtual const float* attention_statistic(std::size_t, std::size_t) const = 0;
        virtual float* external_scores(std::size_t, std::size_t) = 0;
        virtual void assign_precision(std::size_t, std::size_t, const float*) = 0;
        virtual bool offers(store_capability) const noexcept = 0;
        virtual std::size_t bytes() const noexcept = 0;
        virtual std::size_t stored_bytes(std::size_t) const = 0;
        virtual std::size_t query_window_bytes() const noexcept = 0;
        virtual void reserve(std::size_t) = 0;
        virtual void shrink_to_fit() = 0;
        virtual void clear() noexcept = 0;
        virtual void save(detail::byte_sink&, const char* who) const = 0;
        virtual void save_layer(detail::byte_sink&, std::size_t, const char* who) const = 0;
        virtual void load(detail::byte_source&, const char* who) = 0;
        virtual void load_layer(detail::byte_source&, std::size_t, const char* who) = 0;
    };

    template <class Cache>
    struct model final : interface {
        Cache cache;
        template <class... Arguments>
        explicit model(Arguments&&... arguments) : cache(std::forward<Arguments>(arguments)...) {}
        std::unique_ptr<interface> clone() const override { return std::make_unique<model>(*this); }
        const cache_config& config() const noexcept override { return cache.config(); }
        void append(std::size_t l, const strided<float>& k, const strided<float>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void append(std::size_t l, const strided<half>& k, const strided<half>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void append(std::size_t l, const strided<bfloat16>& k, const strided<bfloat16>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void append(std::size_t l, const paged<float>& k, const paged<float>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void append(std::size_t l, const paged<half>& k, const paged<half>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void append(std::size_t l, const paged<bfloat16>& k, const paged<bfloat16>& v, std::int64_t p) override {
            cache.append(l, k, v, p);
        }
        void attend(std::size_t l, const float* q, float* out, float* mass) override { cache.attend(l, q, out, mass); }
        void attend_chunk(std::size_t l, const float* q, std::size_t chunk, float* out, float* mass) override {
            cache.attend_chunk(l, q, chunk, out, mass);
        }
        void compress(std::size_t l) override { cache.compress(l); }
        void compress_all() override { cache.compress(); }
        std::int64_t next_position(std::size_t l) const override { return cache.next_position(l); }
        std::size_t tokens(std::size_t l, std::size_t h) const override { return cache.tokens(l, h); }
        std::size_t tokens(std::size_t l) const override { return cache.tokens(l); }
        std::size_t tokens_seen(std::size_t l) const override { return cache.tokens_seen(l); }
        const std::int32_t* positions(std::size_t l, std::size_t h) const override { return cache.positions(l, h); }
        const float* attention_statistic(std::size_t l, std::size_t h) const override {
            return cache.attention_statistic(l, h);
        }
        float* external_scores(std::size_t l, std::size_t h) override { return cache.external_scores(l, h); }
        void assign_precision(std::size_t l, std::size_t h, const float* scores) override {
            if constexpr (detail::has_assign_precision<typename Cache::head_storage>::value)
                cache.assign_precision(l, h, scores);
            else
                detail::require(false, "dynamic_cache::assign_precision: expected a codec that re-encodes by "
                                       "importance (Q6), got one that does not");
        }
        bool offers(store_capability c) const noexcept override { return cache.offers(c); }
        std::size_t bytes() const noexcept override { return cache.bytes(); }
        std::size_t stored_bytes(std::size_t l) const override { return cache.stored_bytes(l); }
        std::size_t query_window_bytes() const noexcept override { return cache.query_window_bytes(); }
        void reserve(std::size_t tokens) override { cache.reserve(tokens); }
        void shrink_to_fit() override { cache.shrink_to_fit(); }
        void clear() noexcept override { cache.clear(); }
        void save(detail::byte_sink& sink, const char* who) const override { detail::save_to(sink, cache, who); }
        void save_layer(detail::byte_sink& sink, std::size_t l, const char* who) const override {
            detail::save_layer_to(sink, cache, l, who);
        }
        void load(detail::byte_source& source, const char* who) override { detail::load_from(source, cache, who); }
        void load_layer(detail::byte_source& source, std::size_t l, const char* who) override {
            detail::load_layer_from(source, cache, l, who);
        }
    };

    // The compressed_cache type for the choices, built.
    static std::unique_ptr<interface> build(const cache_config& config, quant::any codec,
                                            std::optional<evict::any> eviction, any_merger merging,
                                            any_projection projection) {
        if (!std::holds_alternative<project::none>(projection))
            return std::visit([&](auto& p) { return projected(config, codec, eviction, merging, std::move(p)); },
                              projection);
        if (!eviction) {
            detail::require(std::holds_alternative<merge::none>(merging),
                            "dynamic_cache: a merging policy folds what eviction drops; expected an eviction policy, "
                            "got none");
            return std::make_unique<model<compressed_cache<evict::none, merge::none, quant::any, project::none>>>(
                config, evict::none{}, merge::none{}, std::move(codec), project::none{});
        }
        return std::visit(
            [&](auto& m) -> std::unique_ptr<interface> {
                using merger = std::decay_t<decltype(m)>;
                return std::make_unique<model<compressed_cache<evict::any, merger, quant::any, project::none>>>(
                    config, std::move(*eviction), std::move(m), std::move(codec), project::none{});
            },
            merging);
    }

    // A projection with or without eviction (not with merging yet). PCA and
    // CSKV keep their latents in any codec that takes rows of their rank (the
    // codec held at run time, built at that width); ThinK and Loki rebuild
    // rows as they are, over the codecs that store them so.
    template <class Projection>
    static std::unique_ptr<interface> projected(const cache_config& config, const quant::any& codec,
                                                const std::optional<evict::any>& eviction, const any_merger& merging,
                                                Projection projection) {
        if constexpr (std::is_same_v<Projection, project::none>) {
            return nullptr; // not reached: build() handles project::none
        } else {
            detail::require(std::holds_alternative<merge::none>(merging),
                            "dynamic_cache: a projection composes with eviction but not with merging yet; expected "
                            "merge none with it");
            if constexpr (detail::has_stored_width<Projection>::value) { // latents: PCA, CSKV
                return over(config, codec, eviction, std::move(projection));
            } else {
                if (codec.target<quant::none<float>>()) return over(config, quant::none<float>{}, eviction, std::move(projection));
                if (codec.target<quant::none<half>>()) return over(config, quant::none<half>{}, eviction, std::move(projection));
                if (codec.target<quant::none<bfloat16>>())
                    return over(config, quant::none<bfloat16>{}, eviction, std::move(projection));
                detail::require(false, "dynamic_cache: this projection works on rows stored as they are; expected the "
                                       "codec none:f32, none:f16 or none:bf16, got another codec (pca takes any "
                                       "codec for its latents)");
                return nullptr;
            }
        }
    }
    template <class Codec, class Projection>
    static std::unique_ptr<interface> over(const cache_config& config, Codec codec,
                                           const std::optional<evict::any>& eviction, Projection projection) {
        if (!eviction)
            return std::make_unique<model<compressed_cache<evict::none, merge::none, Codec, Projection>>>(
                config, evict::none{}, merge::none{}, std::move(codec), std::move(projection));
        return std::make_unique<model<compressed_cache<evict::any, merge::none, Codec, Projection>>>(
            config, *eviction, merge::none{}, std::move(codec), std::move(projection));
    }

    interface& live() {
        detail::require(cache_ != nullptr, "dynamic_cache: expected a cache, got a moved-from dynamic_cache");
        return *cache_;
    }
    const interface& live() const {
        detail::require(cache_ != nullptr, "dynamic_cache: expected a cache, got a moved-from dynamic_cache");
        return *cache_;
    }

    std::unique_ptr<interface> cache_;
};

namespace detail {
// The serialization overloads below reach the held cache through this.
struct dynamic_cache_access {
    static const auto& held(const dynamic_cache& c) { return c.live(); }
    static auto& held(dynamic_cache& c) { return c.live(); }
};
} // namespace detail

// Serialization of a dynamic_cache (cache/serialization.hpp's functions,
// which these overloads take the place of): the held cache's bytes.
inline void save_cache(const dynamic_cache& cache, std::ostream& out) {
    detail::byte_sink sink(out);
    detail::dynamic_cache_access::held(cache).save(sink, "kvc::save_cache");
}
inline std::vector<unsigned char> save_cache(const dynamic_cache& cache) {
    std::vector<unsigned char> out;
    detail::byte_sink sink(out);
    detail::dynamic_cache_access::held(cache).save(sink, "kvc::save_cache");
    return out;
}
inline void load_cache(dynamic_cache& cache, std::istream& in) {
    detail::byte_source source(in);
    detail::dynamic_cache_access::held(cache).load(source, "kvc::load_cache");
}
inline void load_cache(dynamic_cache& cache, const void* data, std::size_t size) {
    detail::require(data != nullptr || size == 0, "kvc::load_cache: expected non-null data");
    detail::byte_source source(data, size);
    detail::dynamic_cache_access::held(cache).load(source, "kvc::load_cache");
}
inline void save_layer(const dynamic_cache& cache, std::size_t layer, std::ostream& out) {
    detail::byte_sink sink(out);
    detail::dynamic_cache_access::held(cache).save_layer(sink, layer, "kvc::save_layer");
}
inline std::vector<unsigned char> save_layer(const dynamic_cache& cache, std::size_t layer) {
    std::vector<unsigned char> out;
    detail::byte_sink sink(out);
    detail::dynamic_cache_access::held(cache).save_layer(sink, layer, "kvc::save_layer");
    return out;
}
inline void load_layer(dynamic_cache& cache, std::size_t layer, std::istream& in) {
    detail::byte_source source(in);
    detail::dynamic_cache_access::held(cache).load_layer(source, layer, "kvc::load_layer");
}
inline void load_layer(dynamic_cache& cache, std::size_t layer, const void* data, std::size_t size) {
    detail::require(data != nullptr || size == 0, "kvc::load_layer: expected non-null data");
    detail::byte_source source(data, size);
    detail::dynamic_cache_access::held(cache).load_layer(source, layer, "kvc::load_layer");
}

} // namespace kvc
