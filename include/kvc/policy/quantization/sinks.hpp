// kvc/policy/quantization/sinks.hpp -- Q9 sink protection for any codec.
//
// What it is. The first tokens of a sequence (the "attention sinks") draw a
// large share of the attention of every later query, so their quantization
// error weighs on every output. with_sinks keeps the first N tokens appended
// to a head in fp16, exactly as full_cache stores them (dense_rows, the same
// kernels), and hands every later token to the wrapped codec. Source:
// docs/METHODS.md Q9 (the first n tokens, 1 to 5 in the sources, in full precision); the
// block codecs, KIVI and KVQuant have the same rule built in, this wrapper
// gives it to every other codec (sparse, mixed, rotated, cq, ...).
//
//   kvc::quant::with_sinks<kvc::quant::sparse>{kvc::quant::sparse(0.5)}   4 fp16 sinks, then 50% sparse rows
//   kvc::quant::with_sinks<kvc::quant::rotated<kvc::quant::q4_0>, 2>     2 fp16 sinks, then rotated q4_0
//   kvc::quant::with_sinks<kvc::quant::q4_0>{{}, 1}                      the count chosen at run time
//
//   sink (dense_rows, fp16)   inner codec's store
//   t = 0 .. s-1              t = s .. tokens-1        s <= sink_tokens
//
// Choices made where the method leaves room:
// - The count: the template parameter N (>= 1) is the default of the
//   run-time member `sink_tokens`, which validate() and make_head() require
//   to be >= 1 (a policy object reaches make_head, so the count can vary
//   per cache without a new type).
// - The rule (as packed_rows' own sinks): a token goes to the fp16 segment
//   while the inner store is empty and fewer than sink_tokens sinks are held;
//   every later token goes to the inner store. After an eviction that drops
//   sinks while inner tokens remain, new tokens still go to the inner store,
//   so the sequence order is always sinks, then inner rows.
// - Decode attention: the sinks through the fp16 decode partial, then the
//   inner store's attend with the caller's bias and logits offset by the sink
//   count, into the same running softmax state. Over sinks alone it is
//   full_cache's fp16 attention bit for bit.
// - Prefill: one decode pass per query of the chunk
//   (kernels::common::prefill_by_decode), the sinks the query sees through
//   the fp16 partial, then the inner store. Inner stores can only attend all
//   their rows, so the rows after the query (later tokens of the chunk) are
//   masked with a -inf bias (kept in the prefill workspace; the inner kernels
//   add the bias to every logit). A chunk that straddles the sink boundary is
//   exact: queries inside the sink segment see only a prefix of the sinks and
//   skip the inner store. Costs chunk x tokens. With no inner rows yet,
//   prefill is dense_rows' (full_cache's) fused prefill.
// - Eviction: compacted() (kept sinks first, then the inner store's kept
//   rows: through its own compacted() when it has one, else a copy compacted
//   with keep() and shrunk). There is no in-place keep(): the inner store
//   needs the indices shifted by the sink count, which keep (noexcept, never
//   allocating) has no room for; compressed_cache compacts through compacted().
// - Memory: bytes() = the fp16 sink rows' capacity + the inner store's
//   bytes(); nothing else is held. stored_bytes() (what one attention reads)
//   = sinks x 4 x dim + the inner store's stored_bytes(), when it has one.
// - Forwarded when the inner codec has them: validate(config),
//   make_head(config, layer, kv_head), needs_* flags, wants_positions
//   (positions go to the inner store only), assign_precision (the scores of
//   the inner tokens, i.e. offset by the sink count), store_key,
//   bytes_per_token (the inner store's: a token past the sinks costs that).
// - Codecs that take keys before RoPE (KVQuant, wants_positions) would get
//   unrotated fp16 sink keys here; KVQuant has its own sink_tokens and is
//   rejected at compile time.
// - NaN or Inf in a sink row: stored in fp16 as given (as full_cache); the
//   head's attention is NaN while the token is held, no other token changes,
//   and evicting it restores finite outputs. In inner rows: the inner
//   codec's documented behaviour, with one addition: during prefill a
//   non-finite key or value in a later row of the chunk also reaches the
//   chunk's earlier queries of that head (a masked logit of NaN or a zero
//   weight times Inf is NaN); decode and later chunks are unaffected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/policy/quantization/protocol.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/dense_rows.hpp"

namespace kvc {

class kvquant_head;

// The head store of quant::with_sinks: fp16 sink rows, then the inner codec's store.
template <class Inner>
class sink_rows {
    static_assert(!std::is_same_v<Inner, kvquant_head>,
                  "kvc::quant::with_sinks: KVQuant stores keys before RoPE; use its own sink_tokens");

public:
    static constexpr bool wants_positions = detail::wants_positions<Inner>::value;
    static constexpr dtype sink_type = dtype::f16;

    sink_rows(Inner inner, std::size_t dim, std::size_t sink_limit, memory_resource* resource)
        : sink_rows(std::move(inner), dense_rows(sink_type, dim, resource), sink_limit) {}

    std::size_t dim() const noexcept { return sink_.dim(); }
    std::size_t sink_limit() const noexcept { return sink_limit_; }
    std::size_t sink_tokens() const noexcept { return sink_.tokens(); }
    std::size_t inner_tokens() const noexcept { return inner_.tokens(); }
    std::size_t tokens() const noexcept { return sink_.tokens() + inner_.tokens(); }
    const dense_rows& sink() const noexcept { return sink_; }
    const Inner& inner() const noexcept { return inner_; }

    // Bytes held: the fp16 sink rows' capacity and the inner store's bytes().
    std::size_t bytes() const noexcept { return sink_.bytes() + inner_.bytes(); }

    template <class S = Inner, std::enable_if_t<detail::has_stored_bytes<S>::value, int> = 0>
    std::size_t stored_bytes() const noexcept {
        return sink_.tokens() * sink_.bytes_per_token() + inner_.stored_bytes();
    }
    template <class S = Inner, std::enable_if_t<detail::has_bytes_per_token<S>::value, int> = 0>
    std::size_t bytes_per_token() const noexcept {
        return inner_.bytes_per_token();
    }

    // Room for `extra` more tokens, split as push_back will place them.
    void reserve_for_append(std::size_t extra) {
        const std::size_t to_sink = sink_share(extra);
        if (to_sink) sink_.reserve_for_append(to_sink);
        if (extra > to_sink) inner_.reserve_for_append(extra - to_sink);
    }
    // Capacity for `rows` tokens in total.
    void reserve(std::size_t rows) {
        const std::size_t sinks = sink_.tokens() + sink_share(rows > tokens() ? rows - tokens() : 0);
        if (sinks) sink_.reserve(sinks);
        if (rows > sinks) inner_.reserve(rows - sinks);
    }

    // Never allocates (capacity reserved), never throws.
    template <class S = Inner, std::enable_if_t<!detail::wants_positions<S>::value, int> = 0>
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value) noexcept {
        if (to_sink()) sink_.push_back(k, from, key, value);
        else inner_.push_back(k, from, key, value);
    }
    template <class S = Inner, std::enable_if_t<detail::wants_positions<S>::value, int> = 0>
    void push_back(const kernels::kernel_table& k, dtype from, const void* key, const void* value,
                   std::int32_t position) noexcept {
        if (to_sink()) sink_.push_back(k, from, key, value);
        else inner_.push_back(k, from, key, value, position);
    }

    // A head holding only the tokens at `indices` (ascending, each < tokens()),
    // in that order: kept sinks, then the kept inner rows. May throw bad_alloc;
    // this store is left untouched.
    sink_rows compacted(const std::uint32_t* indices, std::size_t count) const {
        const std::size_t sinks = sink_.tokens();
        std::size_t kept_sinks = 0;
        while (kept_sinks < count && indices[kept_sinks] < sinks) ++kept_sinks;
        std::vector<std::uint32_t> shifted(indices + kept_sinks, indices + count);
        for (std::uint32_t& i : shifted) i -= static_cast<std::uint32_t>(sinks);
        return sink_rows(compacted_inner(shifted.data(), shifted.size()), sink_.compacted(indices, kept_sinks),
                         sink_limit_);
    }

    // Tokens [first, first + count) widened to fp32: the fp16 sink rows, then
    // the inner store's decoded rows (what attention uses).
    void decode_keys(const kernels::kernel_table& k, std::size_t first, std::size_t count, float* out) const noexcept {
        const std::size_t head = sink_part(first, count);
        if (head) sink_.decode_keys(k, first, head, out);
        if (count > head) inner_.decode_keys(k, first + head - sink_.tokens(), count - head, out + head * dim());
    }
    void decode_values(const kernels::kernel_table& k, std::size_t first, std::size_t count,
                       float* out) const noexcept {
        const std::size_t head = sink_part(first, count);
        if (head) sink_.decode_values(k, first, head, out);
        if (count > head) inner_.decode_values(k, first + head - sink_.tokens(), count - head, out + head * dim());
    }

    template <class S = Inner, std::enable_if_t<detail::has_store_key<S>::value, int> = 0>
    void store_key(const kernels::kernel_table& k, std::size_t t, const float* row) noexcept {
        if (t < sink_.tokens()) sink_.store_key(k, t, row);
        else inner_.store_key(k, t - sink_.tokens(), row);
    }

    template <class S = Inner, std::enable_if_t<detail::has_store_row<S>::value, int> = 0>
    void store_row(const kernels::kernel_table& k, std::size_t t, const float* key, const float* value) noexcept {
        if (t < sink_.tokens()) sink_.store_row(k, t, key, value);
        else inner_.store_row(k, t - sink_.tokens(), key, value);
    }

    // `scores` has one entry per token of the head; the inner store gets its own tokens'.
    template <class S = Inner, std::enable_if_t<detail::has_assign_precision<S>::value, int> = 0>
    void assign_precision(const kernels::kernel_table& k, const float* scores) {
        inner_.assign_precision(k, scores + sink_.tokens());
    }

    void shrink_to_fit() {
        sink_.shrink_to_fit();
        inner_.shrink_to_fit();
    }
    void clear() noexcept {
        sink_.clear();
        inner_.clear();
    }
    void release() noexcept {
        sink_.release();
        inner_.release();
    }

    // Folds every token into `state`: the sinks, then the inner rows (bias and
    // logits, when given, indexed by token over both).
    void attend(const kernels::kernel_table& k, const kernels::decode_problem& p,
                const kernels::decode_state& state) const noexcept {
        attend_sinks(k, p, state, sink_.tokens());
        if (inner_.tokens() == 0) return;
        kernels::decode_problem q = p;
        q.bias = p.bias ? p.bias + sink_.tokens() : nullptr;
        q.logits = p.logits ? p.logits + sink_.tokens() : nullptr;
        inner_.attend(k, q, state);
    }

    // Prefill workspace: the running state and logits over every token, and
    // the inner rows' mask.
    std::size_t prefill_workspace_floats(std::size_t group, std::size_t chunk, bool with_mass) const noexcept {
        (void)chunk;
        return kernels::prefill_workspace_floats(group, dim(), tokens(), with_mass) + inner_.tokens();
    }

    // Causal attention of the last p.chunk tokens' queries over the tokens.
    void prefill(const kernels::kernel_table& k, const kernels::prefill_problem& p, float* workspace) const noexcept {
        if (inner_.tokens() == 0) {
            sink_.prefill(k, p, workspace);
            return;
        }
        const std::size_t sinks = sink_.tokens(), inner = inner_.tokens(), total = sinks + inner;
        float* mask = workspace + kernels::prefill_workspace_floats(p.group, p.dim, total, p.mass != nullptr);
        for (std::size_t t = 0; t < inner; ++t) mask[t] = -std::numeric_limits<float>::infinity();
        std::size_t opened = 0; // inner rows unmasked so far
        kernels::common::prefill_by_decode<kernels::reference_arch>(
            p, total, workspace,
            [&](std::size_t visible, kernels::decode_problem d, const kernels::decode_state& state) {
                attend_sinks(k, d, state, visible < sinks ? visible : sinks);
                if (visible <= sinks) return;
                // The mask hides the inner rows this query must not see yet; the
                // ones it sees carry the caller's bias (or none).
                for (; opened < visible - sinks; ++opened) mask[opened] = p.bias ? p.bias[sinks + opened] : 0.0f;
                d.bias = opened < inner ? mask : p.bias ? p.bias + sinks : nullptr;
                d.logits = d.logits ? d.logits + sinks : nullptr;
                inner_.attend(k, d, state);
            });
    }

private:
    sink_rows(Inner inner, dense_rows sink, std::size_t sink_limit)
        : sink_(std::move(sink)), inner_(std::move(inner)), sink_limit_(sink_limit) {}

    bool to_sink() const noexcept { return inner_.tokens() == 0 && sink_.tokens() < sink_limit_; }

    // Of `extra` tokens about to be appended, how many land in the sink segment.
    std::size_t sink_share(std::size_t extra) const noexcept {
        if (inner_.tokens() != 0 || sink_.tokens() >= sink_limit_) return 0;
        const std::size_t room = sink_limit_ - sink_.tokens();
        return extra < room ? extra : room;
    }

    // Of tokens [first, first + count), how many are sinks.
    std::size_t sink_part(std::size_t first, std::size_t count) const noexcept {
        const std::size_t sinks = sink_.tokens();
        if (first >= sinks) return 0;
        return sinks - first < count ? sinks - first : count;
    }

    // The first n sink rows through full_cache's fp16 decode partial.
    void attend_sinks(const kernels::kernel_table& k, kernels::decode_problem p, const kernels::decode_state& state,
                      std::size_t n) const noexcept {
        if (n == 0) return;
        p.keys = sink_.key_row(0);
        p.values = sink_.value_row(0);
        p.key_stride = p.value_stride = sink_.dim();
        p.tokens = n;
        p.dim = sink_.dim();
        k.attend_partial[kernels::index_of(sink_type)](p, state);
    }

    Inner compacted_inner(const std::uint32_t* indices, std::size_t count) const {
        if constexpr (detail::has_compacted<Inner>::value) {
            return inner_.compacted(indices, count);
        } else {
            Inner out = inner_;
            out.keep(indices, count);
            out.shrink_to_fit();
            return out;
        }
    }

public:
    // Serialization (cache/serialization.hpp): the sink limit, the fp16 sink rows, the inner store.
    template <class Self, class Archive>
    static void transfer(Self& self, Archive& a) {
        a.shape("with_sinks sink tokens", self.sink_limit_);
        dense_rows::transfer(self.sink_, a);
        a.check(self.sink_.tokens() <= self.sink_limit_, "with_sinks holds ", self.sink_.tokens(),
                " sink tokens, expected at most ", self.sink_limit_);
        Inner::transfer(self.inner_, a);
    }

private:
    dense_rows sink_;
    Inner inner_;
    std::size_t sink_limit_;
};

namespace quant {

template <class Codec, std::size_t N = 4>
struct with_sinks {
    static_assert(is_quantization_policy_v<Codec>,
                  "kvc::quant::with_sinks<Codec, N>: Codec must be a quantization policy (e.g. kvc::quant::q4_0)");
    static_assert(N > 0, "kvc::quant::with_sinks<Codec, N>: N (the default sink count) must be at least 1");

    using family = quantization_family;
    using codec_type = Codec;
    using head_storage = sink_rows<typename Codec::head_storage>;
    static constexpr std::size_t default_sink_tokens = N;
    static constexpr bool needs_attention_stats = needs_attention_stats_v<Codec>;
    static constexpr bool needs_queries = needs_queries_v<Codec>;
    static constexpr std::size_t query_window = query_window_v<Codec>;
    static constexpr bool needs_calibration = detail::needs_calibration_of<Codec>::value;

    Codec codec{};
    std::size_t sink_tokens = N; // leading tokens of every head kept in fp16

    // Throws kvc::error for sink_tokens == 0 or whatever the inner codec rejects.
    void validate(const cache_config& config) const {
        require_sinks();
        detail::validate_part(codec, config);
    }

    template <class C = Codec, std::enable_if_t<!detail::has_indexed_make_head<C>::value, int> = 0>
    head_storage make_head(const cache_config& config) const {
        require_sinks();
        return head_storage(codec.make_head(config), config.head_dim, sink_tokens, config.resource);
    }
    template <class C = Codec, std::enable_if_t<detail::has_indexed_make_head<C>::value, int> = 0>
    head_storage make_head(const cache_config& config, std::size_t layer, std::size_t kv_head) const {
        require_sinks();
        return head_storage(codec.make_head(config, layer, kv_head), config.head_dim, sink_tokens, config.resource);
    }

private:
    void require_sinks() const {
        detail::require(sink_tokens >= 1, "kvc::quant::with_sinks: expected sink_tokens >= 1, got ", sink_tokens);
        detail::require(sink_tokens <= max_sink_tokens, "kvc::quant::with_sinks: expected sink_tokens at most ",
                        max_sink_tokens, ", got ", sink_tokens);
    }
};

} // namespace quant
} // namespace kvc
