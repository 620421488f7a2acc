// kvc/policy/quantization/any.hpp -- a codec chosen at run time.
//
//   kvc::quant::any codec(kvc::quant::q4_0{});            // or any other codec value
//   kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::any, kvc::project::none> cache(...);
//
// quant::any holds any codec (policy/quantization/protocol.hpp) and makes
// its head stores as any_store (storage/any_store.hpp): one cache type then
// serves every codec, which is how run-time composition stays one
// instantiation per method rather than one per combination. Outputs are the
// held codec's bit for bit; the cost is one indirect call per store call and
// one small block per (layer, KV head) (counted in bytes()).
//
// Choices: the held codec is immutable and shared between copies (a codec is
// parameters; its stores hold the state). Codecs that ask the host to collect
// something (attention statistics, queries, columns) are refused at compile
// time: no codec does today, and forwarding those requests is the eviction
// wrapper's business (evict::any), not a codec's.
#pragma once

#include <cstddef>
#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/policy/quantization/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/any_store.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc::quant {

class any {
public:
    using family = quantization_family;
    using head_storage = any_store;

    template <class Codec, class = std::enable_if_t<!std::is_same_v<Codec, any>>>
    explicit any(Codec codec) : model_(std::make_shared<const model<Codec>>(std::move(codec))) {
        static_assert(detail::check_codec<Codec>());
        static_assert(!needs_attention_stats_v<Codec> && !needs_queries_v<Codec> &&
                          std::is_same_v<columns_of_t<Codec>, column_list<>>,
                      "kvc::quant::any: this codec asks the host for statistics, queries or columns, which "
                      "quant::any does not forward");
    }

    any_store make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        return model_->make_head(config, layer, kv_head);
    }
    void validate(const cache_config& config) const { model_->validate(config); }
    // The element type rows are kept in when the codec stores them as they
    // are (quant::none<T>), else `otherwise` (see compressed_cache's query window).
    dtype storage_or(dtype otherwise) const noexcept { return model_->storage_or(otherwise); }

    // The held codec, when it is a Codec (tools and tests); nullptr otherwise.
    template <class Codec>
    const Codec* target() const noexcept {
        return model_->type() == typeid(Codec) ? &static_cast<const model<Codec>&>(*model_).codec : nullptr;
    }
    // The held codec's type (cache serialization names it in a file's header).
    const std::type_info& held_type() const noexcept { return model_->type(); }

private:
    struct model_base {
        virtual ~model_base() = default;
        virtual any_store make_head(const cache_config&, std::size_t layer, std::size_t kv_head) const = 0;
        virtual void validate(const cache_config&) const = 0;
        virtual dtype storage_or(dtype otherwise) const noexcept = 0;
        virtual const std::type_info& type() const noexcept = 0;
    };
    template <class Codec>
    struct model final : model_base {
        Codec codec;
        explicit model(Codec c) : codec(std::move(c)) {}
        any_store make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const override {
            return any_store(detail::make_head_of(codec, config, layer, kv_head), config.head_dim, config.resource);
        }
        void validate(const cache_config& config) const override { detail::validate_part(codec, config); }
        dtype storage_or(dtype otherwise) const noexcept override {
            if constexpr (detail::declares_storage_dtype<Codec>::value) return (void)otherwise, Codec::storage;
            else return otherwise;
        }
        const std::type_info& type() const noexcept override { return typeid(Codec); }
    };

    std::shared_ptr<const model_base> model_;
};

} // namespace kvc::quant
