// kvc/cache/compressed_cache.hpp -- the composition host of the four policy families.
//
//   kvc::compressed_cache<Eviction, Merging, Quantization, Projection> cache(config, eviction, ...);
//
// Each (layer, KV head) owns its own store of encoded rows, their original
// positions and its policies' running state, so heads hold different numbers
// of tokens once eviction runs, and evicted memory really goes back to the
// memory resource (ragged storage, not masking). One decode step is
//   append(layer, k, v, pos)   -> [schedule: compress(layer)] -> codec -> storage
//   attend(layer, q, out)      -> fused attention over the stored form, emitting
//                                 the statistics the policies asked for
// and compress(layer) is a pipeline: the eviction plan (scorer -> selector),
// the merger's fold of what it drops into what it keeps, compaction, the
// codec re-encoding merged rows, the projection's store, then one swap.
//
// config.storage is full_cache's; here the codec decides how rows are stored.
// Policies are small value types given to the constructor (default-constructed
// when not given). The cache collects exactly what they ask for
// (needs_attention_stats, needs_queries) and nothing when they ask for nothing.
// With every slot `none` the cache runs the same storage and kernels as
// kvc::full_cache and produces bit-identical outputs (tested).
//
// Thread safety as full_cache (see there), and: attend is not const here (it
// records the statistics the policies asked for), but each layer keeps its own
// policy state and working memory, so calls on different layers may still
// run concurrently, compress(layer) and an append that compresses included.
// compress() over all layers is a call that spans every layer.
// Errors: every call checks its arguments (layer and head indices included)
// before changing anything. An append may first run the compression its
// schedule asks for (after the prompt, or during decode, always before the new
// token is stored); an allocation failure after that leaves the new tokens out
// and every stored token intact, and the same append may be retried. compress()
// over all layers is per layer: each layer is compressed completely or not at
// all, in order, so a failure at layer l leaves layers before l compressed and
// the others as they were. A moved-from cache holds no layer: every call that
// names one throws kvc::error until a cache is assigned to it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory_resource>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/cache/full_cache.hpp"
#include "kvc/cache/head_attention.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/merging/protocol.hpp"
#include "kvc/policy/projection/protocol.hpp"
#include "kvc/policy/quantization/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/any_store.hpp"
#include "kvc/storage/protocol.hpp"
#include "kvc/storage/query_ring.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc {

namespace detail {
struct cache_serializer; // cache/serialization.hpp
} // namespace detail

template <class Eviction, class Merging, class Quantization, class Projection>
class compressed_cache {
    friend struct detail::cache_serializer;
    static_assert(is_eviction_policy_v<Eviction>,
                  "kvc::compressed_cache: the first parameter must be an eviction policy "
                  "(family kvc::eviction_family, e.g. kvc::evict::none)");
    static_assert(is_merging_policy_v<Merging>,
                  "kvc::compressed_cache: the second parameter must be a merging policy "
                  "(family kvc::merging_family, e.g. kvc::merge::none)");
    static_assert(is_quantization_policy_v<Quantization>,
                  "kvc::compressed_cache: the third parameter must be a quantization policy "
                  "(family kvc::quantization_family, e.g. kvc::quant::none<kvc::half>)");
    static_assert(is_projection_policy_v<Projection>,
                  "kvc::compressed_cache: the fourth parameter must be a projection policy "
                  "(family kvc::projection_family, e.g. kvc::project::none)");
    static_assert(detail::check_codec<Quantization>());
    static_assert(detail::check_merger<Merging>());
    static_assert(detail::check_projection<Projection, typename Quantization::head_storage>());
    static_assert(!detail::merges_of<Merging>::value ||
                      detail::has_store_row<detail::projected_store_t<Projection, typename Quantization::head_storage>>::value,
                  "kvc::compressed_cache: this merging policy rewrites rows, and the codec's head store cannot "
                  "re-encode a row (no `store_row(kernels, t, key, value)`): pair it with a codec that can "
                  "(quant::none, the block formats, their sinks and Hadamard wrappers)");
    static_assert(!needs_queries_v<Eviction> || query_window_v<Eviction> > 0,
                  "kvc::compressed_cache: the eviction policy sets needs_queries but no `static constexpr "
                  "std::size_t query_window`");
    static_assert(!needs_queries_v<Merging> || query_window_v<Merging> > 0,
                  "kvc::compressed_cache: the merging policy sets needs_queries but no `query_window`");
    static_assert(!needs_queries_v<Quantization> || query_window_v<Quantization> > 0,
                  "kvc::compressed_cache: the quantization policy sets needs_queries but no `query_window`");
    static_assert(!needs_queries_v<Projection> || query_window_v<Projection> > 0,
                  "kvc::compressed_cache: the projection policy sets needs_queries but no `query_window`");

public:
    using eviction_type = Eviction;
    using merging_type = Merging;
    using quantization_type = Quantization;
    using projection_type = Projection;
    // The codec's store, inside the projection's when it projects.
    using head_storage = detail::projected_store_t<Projection, typename Quantization::head_storage>;
    // Per-token state of one (layer, KV head): the host's positions and every
    // column a policy declares (storage/token_columns.hpp), each kept once.
    using columns_type = token_columns<column_union_t<column_list<position_column>, columns_of_t<Eviction>,
                                                      columns_of_t<Merging>, columns_of_t<Quantization>,
                                                      columns_of_t<Projection>>>;

    static constexpr bool evicts = Eviction::evicts;
    static constexpr bool merges = detail::merges_of<Merging>::value;
    static constexpr bool projects = detail::projects_of<Projection>::value;
    // Whether compress has a stage to run: eviction (with merging inside it) or projection.
    static constexpr bool compresses = evicts || projects;
    // What the cache may collect for its policies: nothing that none of them
    // may ask for. (What it does collect is what they ask for at run time,
    // requests_of: the same for policy types, the held method's for the
    // run-time wrappers evict::any and quant::any.)
    static constexpr bool collects_attention_stats = needs_attention_stats_v<Eviction> ||
                                                     needs_attention_stats_v<Merging> ||
                                                     needs_attention_stats_v<Quantization>;
    static constexpr bool collects_queries = needs_queries_v<Eviction> || needs_queries_v<Merging> ||
                                             needs_queries_v<Quantization> || needs_queries_v<Projection>;
    static constexpr bool collects_external = columns_type::template has<evict::column::external_score>;

    explicit compressed_cache(const cache_config& config, Eviction eviction = {}, Merging merging = {},
                              Quantization quantization = {}, Projection projection = {})
        : config_(checked(config)), eviction_(validated(std::move(eviction))), merging_(validated(std::move(merging))),
          quantization_(validated(std::move(quantization))), projection_(validated(std::move(projection))),
          codec_config_(codec_config()), heads_(config_.resource), layers_(config_.resource) {
        const policy_requests asked[] = {requests_of(eviction_), requests_of(merging_), requests_of(quantization_),
                                         requests_of(projection_)};
        stats_wanted_ = collects_attention_stats &&
                        (asked[0].attention_stats || asked[1].attention_stats || asked[2].attention_stats);
        if constexpr (collects_queries)
            for (const policy_requests& r : asked) query_window_ = std::max(query_window_, r.query_window);
        const std::uint32_t columns = column_mask();
        heads_.reserve(config_.layers * config_.kv_heads);
        for (std::size_t l = 0; l < config_.layers; ++l)
            for (std::size_t h = 0; h < config_.kv_heads; ++h) {
                heads_.push_back(head_slot{make_head(l, h), config_.resource, columns});
            }
        layers_.reserve(config_.layers);
        for (std::size_t l = 0; l < config_.layers; ++l) layers_.emplace_back(config_.resource);
        byte_budget_tokens_ = tokens_for_bytes();
        detail::require(!merges || offers(store_capability::store_row),
                        "compressed_cache: this merging policy rewrites rows, and the codec's head store cannot "
                        "re-encode a row (store_row): pair it with a codec that can (quant::none, the block "
                        "formats, their sinks and Hadamard wrappers)");
        if constexpr (evicts) {
            detail::require(!eviction_.rerotate.enabled || offers(store_capability::store_key),
                            "compressed_cache: key re-rotation needs a codec that can rewrite stored keys "
                            "(quant::none); this codec cannot");
            detail::require(eviction_.keep.bytes == 0 || offers(store_capability::bytes_per_token),
                            "compressed_cache: a byte budget needs a codec that reports bytes_per_token()");
            detail::require(eviction_.keep.bytes == 0 ||
                                byte_budget_tokens_ >= eviction_.keep.protected_tokens(),
                            "compressed_cache: byte budget ", eviction_.keep.bytes,
                            " buys fewer tokens per head than sinks + window (", eviction_.keep.protected_tokens(),
                            ")");
        }
    }

    compressed_cache(const compressed_cache& other)
        : config_(other.config_), eviction_(other.eviction_), merging_(other.merging_),
          quantization_(other.quantization_), projection_(other.projection_),
          heads_(other.heads_, other.config_.resource), layers_(other.layers_, other.config_.resource),
          byte_budget_tokens_(other.byte_budget_tokens_), stats_wanted_(other.stats_wanted_),
          query_window_(other.query_window_) {}
    compressed_cache& operator=(const compressed_cache& other) {
        if (this != &other) {
            compressed_cache copy(other);
            *this = std::move(copy);
        }
        return *this;
    }
    compressed_cache(compressed_cache&&) noexcept = default;
    compressed_cache& operator=(compressed_cache&&) noexcept = default;
    ~compressed_cache() = default;

    const cache_config& config() const noexcept { return config_; }
    const Eviction& eviction() const noexcept { return eviction_; }
    const Merging& merging() const noexcept { return merging_; }
    const Quantization& quantization() const noexcept { return quantization_; }
    const Projection& projection() const noexcept { return projection_; }

    // As full_cache::append. With an evicting policy, the schedule may first
    // compress the layer (after prefill, or when a head is `interval` over budget).
    template <class KeyView, class ValueView>
    void append(std::size_t layer, const KeyView& keys, const ValueView& values, std::int64_t first_position) {
        check_layer(layer, "compressed_cache::append");
        detail::validate_kv_views(config_, keys, values, "compressed_cache::append");
        const std::size_t count = keys.tokens();
        layer_state& state = layers_[layer];
        detail::require(first_position > state.last_position, "compressed_cache::append: first_position ",
                        first_position, " must be greater than the last appended position ", state.last_position);
        detail::require(first_position >= 0 && static_cast<std::uint64_t>(first_position) + count <=
                                                    static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()),
                        "compressed_cache::append: expected positions in 0..2^31-1, got first_position ",
                        first_position, " with ", count, " tokens");
        if (count == 0) return;
        bool compressed_for_decode = false;
        if constexpr (compresses) {
            // The prompt is complete once decoding starts: compress it first.
            if (compresses_after_prefill() && state.prefill_pending && count == 1) compress_layer(layer, 0);
        }
        if constexpr (evicts) {
            // Decode-time compression runs on decode appends (one token): a
            // prefill chunk must stay whole until attend_chunk has attended it.
            // It runs before the token is stored, making room for it (the
            // budget as it will be with the token, less the token), so that
            // a failure leaves the new token out and the cache as it was,
            // and a retry of the same append is accepted.
            if (eviction_.when.interval != 0 && count == 1 && !state.prefill_pending &&
                over_budget_after(layer, count)) {
                compress_layer(layer, count);
                compressed_for_decode = true;
            }
        }

        for (std::size_t h = 0; h < config_.kv_heads; ++h) {
            head_slot& slot = mutable_head(layer, h);
            slot.columns.reserve_for_append(count);
            slot.rows.reserve_for_append(count);
        }
        state.scratch.reserve(std::max({append_scratch_of(eviction_), append_scratch_of(merging_),
                                         append_scratch_of(quantization_), append_scratch_of(projection_)}));
        const kernels::kernel_table& k = kernels::active();
        if constexpr (detail::has_push_back_rows<head_storage>::value) {
            // A store chosen at run time (any_store): one call a block of a head's rows.
            constexpr std::size_t block = 64;
            const void* key_rows[block];
            const void* value_rows[block];
            for (std::size_t h = 0; h < config_.kv_heads; ++h)
                for (std::size_t t0 = 0; t0 < count; t0 += block) {
                    const std::size_t n = std::min(block, count - t0);
                    for (std::size_t i = 0; i < n; ++i) {
                        key_rows[i] = keys.row(t0 + i, h);
                        value_rows[i] = values.row(t0 + i, h);
                    }
                    mutable_head(layer, h).rows.push_back_rows(
                        k, KeyView::element_dtype, key_rows, value_rows, n,
                        static_cast<std::int32_t>(first_position + static_cast<std::int64_t>(t0)));
                }
        } else {
            for (std::size_t t = 0; t < count; ++t)
                for (std::size_t h = 0; h < config_.kv_heads; ++h) {
                    const std::int32_t position = static_cast<std::int32_t>(first_position + static_cast<std::int64_t>(t));
                    if constexpr (detail::wants_positions<head_storage>::value)
                        mutable_head(layer, h).rows.push_back(k, KeyView::element_dtype, keys.row(t, h),
                                                              values.row(t, h), position);
                    else
                        (void)position, mutable_head(layer, h).rows.push_back(k, KeyView::element_dtype,
                                                                              keys.row(t, h), values.row(t, h));
                }
        }
        for (std::size_t h = 0; h < config_.kv_heads; ++h) {
            head_slot& slot = mutable_head(layer, h);
            const std::size_t old = slot.rows.tokens() - count;
            slot.columns.append_initial(count);
            std::int32_t* positions = slot.columns.template data<position_column>();
            for (std::size_t t = 0; t < count; ++t)
                positions[old + t] = static_cast<std::int32_t>(first_position + static_cast<std::int64_t>(t));
        }
        if (state.last_position < 0) state.first_position = first_position;
        state.last_position = first_position + static_cast<std::int64_t>(count) - 1;
        state.seen += count;
        const layer_access view = access(layer);
        on_append_with(eviction_, view, count, keys, values);
        on_append_with(merging_, view, count, keys, values);
        on_append_with(quantization_, view, count, keys, values);
        on_append_with(projection_, view, count, keys, values);
        if constexpr (evicts) {
            if (compressed_for_decode && eviction_.rerotate.enabled) {
                // The kept keys moved to contiguous positions; the new one joins them.
                for (std::size_t h = 0; h < config_.kv_heads; ++h)
                    rerotate(k, mutable_head(layer, h), state.first_position);
                state.last_position = state.first_position + static_cast<std::int64_t>(rows_at(layer, 0).tokens()) - 1;
            }
        }
    }

    // As full_cache::attend; mass (optional) holds, head after head, tokens(layer, h) floats.
    // Records the statistics and queries the policies asked for.
    void attend(std::size_t layer, const float* queries, float* out, float* mass = nullptr) {
        check_layer(layer, "compressed_cache::attend");
        detail::require(queries != nullptr && out != nullptr,
                        "compressed_cache::attend: expected non-null queries and out");
        const statistics_space statistics = statistics_buffer(layer, mass, true);
        detail::attend_heads(config_, [&](std::size_t h) -> const head_storage& { return rows_at(layer, h); },
                             queries, out, statistics.mass, statistics.logits, bias_of(layer));
        observe(layer, statistics.mass, queries, 1, true);
    }

    // As full_cache::attend_chunk. Marks the layer as prefilled: with
    // schedule::after_prefill, the next single-token append compresses it.
    void attend_chunk(std::size_t layer, const float* queries, std::size_t chunk, float* out,
                      float* mass = nullptr) {
        check_layer(layer, "compressed_cache::attend_chunk");
        std::size_t shortest = rows_at(layer, 0).tokens();
        for (std::size_t h = 1; h < config_.kv_heads; ++h)
            shortest = rows_at(layer, h).tokens() < shortest ? rows_at(layer, h).tokens() : shortest;
        detail::require(chunk >= 1 && chunk <= shortest, "compressed_cache::attend_chunk: expected chunk in 1..",
                        shortest, " (the tokens every head holds), got ", chunk);
        detail::require(queries != nullptr && out != nullptr,
                        "compressed_cache::attend_chunk: expected non-null queries and out");
        const statistics_space statistics = statistics_buffer(layer, mass, false);
        detail::attend_chunk_heads(config_, [&](std::size_t h) -> const head_storage& { return rows_at(layer, h); },
                                   queries, chunk, out, statistics.mass, bias_of(layer));
        observe(layer, statistics.mass, queries, chunk, false);
        layers_[layer].prefill_pending = true;
    }

    // Runs the compress pipeline on `layer` now: the eviction policy scores
    // every KV head and selects what the budget keeps, the merger folds what
    // it drops into what it keeps, compaction returns the freed memory, and
    // the projection (if any) builds its store. Every step that allocates
    // finishes for every head before any head changes, so a failure leaves
    // the layer as it was.
    void compress(std::size_t layer) {
        check_layer(layer, "compressed_cache::compress");
        compress_layer(layer, 0);
    }

    // The position the engine gives the next token of `layer`: one past the
    // last appended, or, after key re-rotation, one past the contiguous kept positions.
    std::int64_t next_position(std::size_t layer) const {
        check_layer(layer, "compressed_cache::next_position");
        return layers_[layer].last_position + 1;
    }
    // compress(layer) for every layer in order (see Errors above: per layer, not all-or-nothing).
    void compress() {
        for (std::size_t l = 0; l < config_.layers; ++l) compress(l);
    }

    // Tokens held by one KV head (heads may differ once eviction runs).
    // Every read checks its layer and head like the other calls (kvc::error when out of range).
    std::size_t tokens(std::size_t layer, std::size_t kv_head) const { return head(layer, kv_head).tokens(); }
    // Tokens held by the layer: the sum over its KV heads.
    std::size_t tokens(std::size_t layer) const {
        check_layer(layer, "compressed_cache::tokens");
        return held_tokens(layer);
    }
    // Tokens appended to the layer so far, evicted or not.
    std::size_t tokens_seen(std::size_t layer) const {
        check_layer(layer, "compressed_cache::tokens_seen");
        return layers_[layer].seen;
    }
    // Original positions of the tokens one KV head holds.
    const std::int32_t* positions(std::size_t layer, std::size_t kv_head) const {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::positions");
        return head_slot_at(layer, kv_head).columns.template data<position_column>();
    }
    // One head's elements of a column its policies declared (storage/token_columns.hpp),
    // one per held token in the order of positions(): e.g. a merger's log counts
    // (attention_bias_column). A column no policy declares does not compile.
    template <class Column>
    const typename Column::value_type* column(std::size_t layer, std::size_t kv_head) const {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::column");
        return head_slot_at(layer, kv_head).columns.template data<Column>();
    }
    // E18: scores the engine computes itself (a reconstruction pass, a draft
    // model's attention), one float per token the head holds, in the order of
    // positions(layer, h); the `external` scorer ranks by them. New tokens start at 0.
    float* external_scores(std::size_t layer, std::size_t kv_head) {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::external_scores");
        if constexpr (collects_external)
            return mutable_head(layer, kv_head).columns.template data<evict::column::external_score>(); // null when off
        else
            return nullptr;
    }

    // The running attention statistic of one head (empty unless a policy asked for it).
    const float* attention_statistic(std::size_t layer, std::size_t kv_head) const {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::attention_statistic");
        if constexpr (columns_type::template has<evict::column::attention_state>)
            return head_slot_at(layer, kv_head).columns.template data<evict::column::attention_state>();
        else
            return nullptr;
    }

    const head_storage& head(std::size_t layer, std::size_t kv_head) const {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::head");
        return rows_at(layer, kv_head);
    }

    // Q6 and other importance-driven codecs: re-encodes the rows of one head
    // with the precision its per-token `scores` call for (tokens(layer, kv_head)
    // floats in the order of positions(); higher = more important). Any
    // scorer's output fits, or an engine's own numbers. Throws kvc::error (and
    // changes nothing) for bad arguments; an allocation failure leaves the head
    // as it was.
    template <class S = head_storage, std::enable_if_t<detail::has_assign_precision<S>::value, int> = 0>
    void assign_precision(std::size_t layer, std::size_t kv_head, const float* scores) {
        detail::validate_head(config_, layers_.size(), layer, kv_head, "compressed_cache::assign_precision");
        detail::require(scores != nullptr || head_slot_at(layer, kv_head).rows.tokens() == 0,
                        "compressed_cache::assign_precision: expected non-null scores");
        mutable_head(layer, kv_head).rows.assign_precision(kernels::active(), scores);
    }

    // Whether the codec's head stores have an optional member (storage/any_store.hpp):
    // what the codec type says, or, for quant::any, the codec it holds.
    bool offers(store_capability c) const noexcept {
        return heads_.empty() || detail::store_offers(heads_[0].rows, c);
    }

    // The part of bytes() that holds recent queries for query-driven scorers
    // (SnapKV's window and its kin): with an after-prefill schedule only, it
    // is held from the prompt's chunks until the compression after them.
    std::size_t query_window_bytes() const noexcept {
        std::size_t total = 0;
        for (const layer_state& state : layers_) total += state.queries.bytes();
        return total;
    }

    // The bytes one attention over `layer` reads, every head's rows with
    // their scales and codebooks (stores without stored_bytes(): all they
    // hold). What a decode step's memory traffic is measured against.
    std::size_t stored_bytes(std::size_t layer) const {
        detail::validate_layer(config_, layers_.size(), layer, "compressed_cache::stored_bytes");
        std::size_t total = 0;
        for (std::size_t h = 0; h < config_.kv_heads; ++h) total += detail::stored_bytes_of(rows_at(layer, h));
        return total;
    }

    // Every byte taken from the memory resource: encoded rows, positions,
    // policy state, recent queries, the statistics scratch and bookkeeping.
    std::size_t bytes() const noexcept {
        std::size_t total = heads_.capacity() * sizeof(head_slot) + layers_.capacity() * sizeof(layer_state);
        for (const head_slot& slot : heads_) total += slot.rows.bytes() + slot.columns.bytes();
        for (const layer_state& state : layers_) total += state.queries.bytes() + state.scratch.bytes();
        return total;
    }

    void reserve(std::size_t tokens) {
        detail::validate_held(config_, layers_.size(), "compressed_cache::reserve");
        for (head_slot& slot : heads_) {
            slot.rows.reserve(tokens);
            slot.columns.reserve(tokens);
        }
    }
    void shrink_to_fit() {
        for (head_slot& slot : heads_) {
            slot.rows.shrink_to_fit();
            slot.columns.shrink_to_fit();
        }
        for (layer_state& state : layers_) state.scratch.release();
    }
    void clear() noexcept {
        for (head_slot& slot : heads_) {
            slot.rows.release();
            slot.columns.release();
        }
        for (layer_state& state : layers_) {
            state.queries.release();
            state.scratch.release();
            state.last_position = -1;
            state.first_position = 0;
            state.seen = 0;
            state.prefill_pending = false;
        }
    }

private:
    // Everything one (layer, KV head) owns.
    struct head_slot {
        head_storage rows;
        columns_type columns;
        head_slot(head_storage rows_, memory_resource* resource, std::uint32_t active)
            : rows(std::move(rows_)), columns(resource, active) {}
        head_slot(head_storage rows_, columns_type columns_) : rows(std::move(rows_)), columns(std::move(columns_)) {}
    };
    // Everything one layer owns besides its heads.
    struct layer_state {
        std::int64_t last_position = -1;
        std::int64_t first_position = 0;
        std::size_t seen = 0;
        bool prefill_pending = false;
        query_ring queries; // the most recent queries, [window][query_heads][dim], at the cache's precision
        // Working memory of one call on this layer: the attention statistics
        // (when the caller passes no buffer) and the kernels' logits, or an
        // append-time scorer's rows. Per layer, not per cache, because calls on
        // different layers may run concurrently; reused from call to call so
        // decoding does not allocate. Not copied: a copy starts with none.
        aligned_buffer<float> scratch;
        explicit layer_state(memory_resource* resource) : queries(resource), scratch(resource) {}
        layer_state(const layer_state& other)
            : last_position(other.last_position), first_position(other.first_position), seen(other.seen),
              prefill_pending(other.prefill_pending), queries(other.queries), scratch(other.scratch.resource()) {}
        layer_state(layer_state&&) noexcept = default;
        layer_state& operator=(const layer_state&) = delete;
        layer_state& operator=(layer_state&&) noexcept = default;
    };

    // What the host lends a policy's stage for one layer (see policy/traits.hpp):
    // read access to every head's rows, positions and declared columns, the
    // recent queries, and write access to the columns for observe().
    class layer_access {
    public:
        layer_access(const compressed_cache& cache, std::size_t layer) noexcept : cache_(&cache), layer_(layer) {}
        std::size_t index() const noexcept { return layer_; }
        const cache_config& config() const noexcept { return cache_->config_; }
        const kernels::kernel_table& kernels() const noexcept { return kernels::active(); }
        std::int64_t first_position() const noexcept { return state().first_position; }
        std::int64_t last_position() const noexcept { return state().last_position; }
        std::size_t seen() const noexcept { return state().seen; }
        std::size_t byte_budget_tokens() const noexcept { return cache_->byte_budget_tokens_; }
        std::size_t held(std::size_t h) const noexcept { return rows(h).tokens(); }
        const head_storage& rows(std::size_t h) const noexcept { return slot(h).rows; }
        const std::int32_t* positions(std::size_t h) const noexcept { return column<position_column>(h); }
        template <class Column>
        const typename Column::value_type* column(std::size_t h) const noexcept {
            return slot(h).columns.template data<Column>();
        }
        // Columns are the policies' running state: observe() updates them
        // through the const view the host lends (the host owns them and is
        // inside a non-const call whenever it lends this).
        template <class Column>
        typename Column::value_type* mutable_column(std::size_t h) const noexcept {
            return const_cast<typename Column::value_type*>(column<Column>(h));
        }
        std::size_t queries(std::size_t h, std::size_t most, std::vector<float>& out) const {
            return cache_->gather_queries(state(), h, most, out);
        }

    private:
        const layer_state& state() const noexcept { return cache_->layers_[layer_]; }
        const head_slot& slot(std::size_t h) const noexcept { return cache_->head_slot_at(layer_, h); }
        const compressed_cache* cache_;
        std::size_t layer_;
    };
    layer_access access(std::size_t layer) const noexcept { return layer_access(*this, layer); }

    // Each head's additive logits when a policy declared the bias column
    // (merging's log counts), else no bias: attention then runs as before.
    auto bias_of(std::size_t layer) const noexcept {
        if constexpr (columns_type::template has<attention_bias_column>)
            return [this, layer](std::size_t h) noexcept -> const float* {
                return head_slot_at(layer, h).columns.template data<attention_bias_column>();
            };
        else
            return (void)layer, detail::no_bias{};
    }

    // One head's store: the codec's, wrapped by the projection when it projects.
    head_storage make_head(std::size_t layer, std::size_t kv_head) const {
        if constexpr (projects)
            return projection_.make_head(codec_store(layer, kv_head), config_, layer,
                                         kv_head);
        else
            return detail::make_head_of(quantization_, config_, layer, kv_head);
    }

    // Whether the first single-token append after attend_chunk compresses the
    // prompt: the eviction schedule decides when there is one; a projection
    // alone always projects the prompt.
    bool compresses_after_prefill() const noexcept {
        if constexpr (evicts) return eviction_.when.after_prefill;
        else return true;
    }

    // The element type of the query ring: the codec's element type when it
    // stores rows as they are (quant::none<T>), else config.storage (fp16 by
    // default; quantized codecs keep keys coarser still). No cache keeps its
    // queries more precisely than its keys, and an fp32 cache keeps them exact.
    dtype query_dtype() const noexcept { return detail::storage_dtype_or(quantization_, config_.storage); }


    // The columns the heads keep: positions, and each other column some
    // family both declares and uses (a family chosen at run time declares
    // every column it might use).
    std::uint32_t column_mask() const noexcept {
        return column_bits(typename columns_type::list{});
    }
    template <class... Columns>
    std::uint32_t column_bits(column_list<Columns...>) const noexcept {
        return (std::uint32_t{0} | ... | (column_used<Columns>() ? columns_type::template bit<Columns>() : 0u));
    }
    template <class Column>
    bool column_used() const noexcept {
        return std::is_same_v<Column, position_column> || declares_and_keeps<Column>(eviction_) ||
               declares_and_keeps<Column>(merging_) || declares_and_keeps<Column>(quantization_) ||
               declares_and_keeps<Column>(projection_);
    }
    template <class Column, class P>
    static bool declares_and_keeps(const P& policy) noexcept {
        if constexpr (detail::column_list_has<columns_of_t<P>, Column>::value) return keeps_column_of<Column>(policy);
        else return (void)policy, false;
    }

    static cache_config checked(cache_config config) {
        detail::validate(config, "compressed_cache");
        if (config.resource == nullptr) config.resource = default_resource();
        return config;
    }
    template <class P>
    P validated(P policy) const {
        detail::validate_part(policy, config_);
        return policy;
    }

    // What the codec's store is built for: config_, narrowed to the
    // projection's stored width when it keeps fewer channels a row (PCA's
    // latents), the codec checked against that width too.
    cache_config codec_config() const {
        const cache_config narrow = detail::inner_config_of(projection_, config_);
        if (narrow.head_dim != config_.head_dim) {
            try {
                detail::validate_part(quantization_, narrow);
            } catch (const error& e) {
                narrower_than_codec(narrow, e);
            }
        }
        return narrow;
    }
    // The codec's store for the projection to wrap (codecs that check the
    // width in make_head refuse a narrow one here).
    typename Quantization::head_storage codec_store(std::size_t layer, std::size_t kv_head) const {
        if (codec_config_.head_dim == config_.head_dim)
            return detail::make_head_of(quantization_, codec_config_, layer, kv_head);
        try {
            return detail::make_head_of(quantization_, codec_config_, layer, kv_head);
        } catch (const error& e) {
            narrower_than_codec(codec_config_, e);
        }
    }
    [[noreturn]] void narrower_than_codec(const cache_config& narrow, const error& e) const {
        detail::fail("compressed_cache: the projection stores ", narrow.head_dim,
                     " channels a row, which the codec does not take: ", e.what());
    }

    // The budget's tokens for one head of `layer` holding `held` tokens, the layer having seen `seen`.
    std::size_t target_of(std::size_t layer, std::size_t held, std::size_t seen) const noexcept {
        if constexpr (evicts) {
            return eviction_.target_of(access(layer), held, seen);
        } else {
            (void)layer, (void)seen;
            return held;
        }
    }

    // B8: tokens per head a byte budget buys, with everything a token costs
    // here: the codec's rows, its position, and the policy state kept for it.
    // Computed once, at construction, into byte_budget_tokens_: reading a
    // head's storage here would race with a compaction of that head's layer.
    std::size_t tokens_for_bytes() const noexcept {
        if constexpr (evicts && detail::has_bytes_per_token<head_storage>::value) {
            if (eviction_.keep.bytes == 0) return 0;
            const std::size_t per_token = heads_.empty() ? 1
                                          : heads_[0].rows.bytes_per_token() + heads_[0].columns.bytes_per_token();
            return eviction_.keep.tokens_for_bytes(config_.layers * config_.kv_heads, per_token);
        } else {
            return 0;
        }
    }

    // Where one attention call's statistics go (both null when nobody wants
    // them): the mass in the caller's buffer, or in the cache's scratch when
    // only a policy wants it; for a decode call, the kernels' logits in the
    // scratch too. The scratch grows geometrically with the layer's tokens, so
    // decoding with statistics does not allocate on every step.
    struct statistics_space {
        float* mass = nullptr;
        float* logits = nullptr;
    };
    statistics_space statistics_buffer(std::size_t layer, float* caller_mass, bool decode) {
        if (!stats_wanted_ && caller_mass == nullptr) return {};
        const std::size_t mass_floats = caller_mass ? 0 : held_tokens(layer);
        const std::size_t logits_floats =
            decode ? detail::decode_logits_floats(
                         config_, detail::longest_head(config_, [&](std::size_t h) -> const head_storage& {
                             return rows_at(layer, h);
                         }))
                   : 0;
        aligned_buffer<float>& scratch = layers_[layer].scratch;
        scratch.clear();
        scratch.reserve_for_append(mass_floats + logits_floats);
        scratch.resize_within_capacity(mass_floats + logits_floats);
        return {caller_mass ? caller_mass : scratch.data(), decode ? scratch.data() + mass_floats : nullptr};
    }

    // compress(layer), making room for `incoming` tokens about to be appended
    // (0 for compress()): each head keeps what the budget allows once they are
    // in, less them, with the recent window shortened by as many (they will
    // be its newest tokens). Then the projection's stage, on every head.
    void compress_layer(std::size_t layer, std::size_t incoming) {
        if constexpr (compresses) {
            layer_state& state = layers_[layer];
            const kernels::kernel_table& k = kernels::active();
            const std::size_t heads = config_.kv_heads;
            const layer_access view = access(layer);
            std::vector<std::vector<std::uint32_t>> keep;
            bool planned = false;
            if constexpr (evicts) planned = eviction_.plan(view, incoming, keep);
            if (!planned && !projects) {
                finish_compression(state);
                return;
            }
            // Build every new head first (merging, compaction and projection
            // are the steps that allocate), then swap them in: a failure
            // leaves the layer as it was.
            std::vector<std::size_t> changed;
            std::vector<head_slot> built;
            for (std::size_t h = 0; h < heads; ++h) {
                const bool drops = planned && keep[h].size() != rows_at(layer, h).tokens();
                if (drops) {
                    merge::merge_plan merged(keep[h]);
                    if constexpr (merges) merging_.fold(view, h, merged);
                    changed.push_back(h);
                    built.push_back(compact(head_slot_at(layer, h), keep[h]));
                    if constexpr (merges) settle_merge(k, built.back(), merged);
                }
                if constexpr (projects) {
                    std::optional<head_storage> projected =
                        projection_.project(view, h, drops ? built.back().rows : rows_at(layer, h));
                    if (projected && drops) {
                        built.back().rows = std::move(*projected);
                    } else if (projected) {
                        built.emplace_back(std::move(*projected), head_slot_at(layer, h).columns);
                        changed.push_back(h);
                    }
                }
            }
            for (std::size_t i = 0; i < changed.size(); ++i) {
                head_slot& slot = mutable_head(layer, changed[i]);
                using std::swap;
                swap(slot, built[i]);
                if constexpr (evicts)
                    if (eviction_.rerotate.enabled) rerotate(k, slot, state.first_position);
            }
            if constexpr (evicts)
                if (eviction_.rerotate.enabled && heads != 0)
                    state.last_position =
                        state.first_position + static_cast<std::int64_t>(rows_at(layer, 0).tokens()) - 1;
            finish_compression(state);
        } else {
            (void)layer, (void)incoming;
        }
    }

    // After a compression of the layer: the prompt is done, and the window of
    // queries goes unless a later compression may still read it.
    void finish_compression(layer_state& state) noexcept {
        state.prefill_pending = false;
        if (!query_window_outlives_prompt()) release_query_window(state);
    }

    // Writes a merger's folded rows into a compacted head (the codec encodes
    // them) and lets it write its columns there; the head is not yet in the cache.
    void settle_merge(const kernels::kernel_table& k, head_slot& slot, const merge::merge_plan& merged) const noexcept {
        const std::size_t dim = config_.head_dim;
        for (std::size_t i = 0; i < merged.rewritten.size(); ++i)
            slot.rows.store_row(k, merged.rewritten[i], merged.keys.data() + i * dim, merged.values.data() + i * dim);
        merging_.settle(merged, slot.columns);
    }

    static void release_query_window(layer_state& state) noexcept {
        state.queries.release();
    }

    // Whether appending `incoming` tokens to `layer` puts a head more than the
    // schedule's interval over its budget (computed without overflow: an
    // interval of SIZE_MAX never compresses).
    bool over_budget_after(std::size_t layer, std::size_t incoming) const noexcept {
        const std::size_t seen = layers_[layer].seen + incoming;
        for (std::size_t h = 0; h < config_.kv_heads; ++h) {
            const std::size_t held = rows_at(layer, h).tokens() + incoming;
            if (eviction_.when.due(held, target_of(layer, held, seen))) return true;
        }
        return false;
    }

    // Whether the window of recent queries may still serve a compression once
    // the prompt's has run: only with a decode-time schedule, or when
    // compression is the engine's call alone (no after-prefill schedule).
    // Otherwise the window lives from the prompt's chunks to the compression
    // after them, and decode steps neither keep nor write it.
    bool query_window_outlives_prompt() const noexcept {
        if constexpr (evicts) return eviction_.when.interval != 0 || !eviction_.when.after_prefill;
        else return true;
    }

    // Feeds one attention call's statistics and queries to the policies' state.
    void observe(std::size_t layer, const float* mass, const float* queries, std::size_t query_tokens, bool decode) {
        // Each family that asked for attention statistics gets them (a
        // family that did not is never called: evict::none has no scorer).
        if constexpr (collects_attention_stats) {
            if (stats_wanted_) {
                const layer_access view = access(layer);
                observe_with(eviction_, view, mass, query_tokens);
                observe_with(merging_, view, mass, query_tokens);
                observe_with(quantization_, view, mass, query_tokens);
                observe_with(projection_, view, mass, query_tokens);
            }
        } else {
            (void)mass;
        }
        if constexpr (collects_queries) {
            if (query_window_ == 0 || (decode && !query_window_outlives_prompt())) return;
            layers_[layer].queries.push(kernels::active(), query_dtype(), query_window_,
                                        config_.query_heads * config_.head_dim, queries, query_tokens);
        } else {
            (void)layer, (void)queries, (void)query_tokens, (void)decode;
        }
    }

    template <class P>
    static void observe_with(const P& policy, const layer_access& view, const float* mass,
                             std::size_t query_tokens) noexcept {
        if constexpr (needs_attention_stats_v<P>) policy.observe(view, mass, query_tokens);
        else (void)policy, (void)view, (void)mass, (void)query_tokens;
    }

    // The newest (at most `most`) recorded queries of KV head h's group, oldest first: [count][group][dim].
    std::size_t gather_queries(const layer_state& state, std::size_t h, std::size_t most, std::vector<float>& out) const {
        const std::size_t width = config_.group() * config_.head_dim;
        return state.queries.gather(kernels::active(), most, h * width, width, out);
    }

    // Families that keep state per appended token (observes_append) update it
    // once the rows and columns are stored; they need no allocation.
    template <class P>
    static constexpr bool observes_append_v = detail::observes_append_of<P>::value;
    template <class P>
    std::size_t append_scratch_of(const P& policy) const noexcept {
        if constexpr (observes_append_v<P>) return policy.append_scratch_floats(config_.head_dim);
        else return (void)policy, 0;
    }
    template <class P, class KeyView, class ValueView>
    void on_append_with(const P& policy, const layer_access& view, std::size_t count, const KeyView& keys,
                        const ValueView& values) noexcept {
        if constexpr (observes_append_v<P>)
            policy.on_append(view, count, keys, values, layers_[view.index()].scratch.data());
        else
            (void)policy, (void)view, (void)count, (void)keys, (void)values;
    }

    // B10: moves kept token i of a head to position first + i, rotating its key by the difference.
    void rerotate(const kernels::kernel_table& k, head_slot& slot, std::int64_t first) noexcept {
        if constexpr (detail::has_store_key<head_storage>::value) {
            float row[max_head_dim];
            std::int32_t* positions = slot.columns.template data<position_column>();
            for (std::size_t i = 0; i < slot.rows.tokens(); ++i) {
                const std::int64_t target = first + static_cast<std::int64_t>(i);
                const std::int64_t delta = target - positions[i];
                if (delta == 0) continue;
                slot.rows.decode_keys(k, i, 1, row);
                kernels::rope_rotate(eviction_.rerotate.rope, row, config_.head_dim, delta);
                slot.rows.store_key(k, i, row);
                positions[i] = static_cast<std::int32_t>(target);
            }
        } else {
            (void)k, (void)slot, (void)first;
        }
    }

    // A head holding only the tokens at `indices`, in exactly the memory they need.
    head_slot compact(const head_slot& slot, const std::vector<std::uint32_t>& indices) const {
        const std::uint32_t* at = indices.data();
        const std::size_t count = indices.size();
        if constexpr (detail::has_compacted<head_storage>::value) {
            return head_slot(slot.rows.compacted(at, count), slot.columns.gathered(at, count));
        } else { // codecs without compacted(): copy, compact in place, return the spare capacity
            head_slot out = slot;
            out.rows.keep(at, count);
            out.columns.keep(at, count);
            out.rows.shrink_to_fit();
            out.columns.shrink_to_fit();
            return out;
        }
    }

    void check_layer(std::size_t layer, const char* who) const {
        detail::validate_layer(config_, layers_.size(), layer, who);
    }
    std::size_t held_tokens(std::size_t layer) const noexcept {
        std::size_t total = 0;
        for (std::size_t h = 0; h < config_.kv_heads; ++h) total += rows_at(layer, h).tokens();
        return total;
    }
    const head_storage& rows_at(std::size_t layer, std::size_t kv_head) const noexcept {
        return head_slot_at(layer, kv_head).rows;
    }
    const head_slot& head_slot_at(std::size_t layer, std::size_t kv_head) const noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }
    head_slot& mutable_head(std::size_t layer, std::size_t kv_head) noexcept {
        return heads_[layer * config_.kv_heads + kv_head];
    }

    cache_config config_;
    Eviction eviction_;
    Merging merging_;
    Quantization quantization_;
    Projection projection_;
    cache_config codec_config_; // what the codec's stores are built for (codec_config())
    detail::emptied_by_move<head_slot> heads_;    // [layer][kv_head]
    detail::emptied_by_move<layer_state> layers_; // [layer]; empty once moved from
    std::size_t byte_budget_tokens_ = 0;   // tokens_for_bytes(), fixed by the codec and the budget
    bool stats_wanted_ = false;            // some family asks for attention statistics (requests_of)
    std::size_t query_window_ = 0;         // the longest window of recent queries a family asks for
};

} // namespace kvc
