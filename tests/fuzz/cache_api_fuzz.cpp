// libFuzzer target: a random sequence of API calls on two caches --
// kvc::full_cache and a compressed_cache with H2O eviction (attention
// statistics, compression on a schedule) -- checking the documented invariants
// after every call:
//   - bytes() equals what the counting memory resource holds for the cache;
//   - tokens: full_cache holds every appended token; the compressed cache has
//     seen every appended token (tokens_seen) and holds at most that many per
//     head, and positions within a head ascend;
//   - strong guarantee: a call that throws kvc::error leaves tokens, bytes,
//     positions and attention output (attend on copies taken before and
//     after) unchanged.
// Any other exception, a sanitizer report or a trap is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cache/cache_test_util.hpp" // kvc_test::counting_resource
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::counting_resource;

constexpr std::size_t layers = 2, kv_heads = 2, query_heads = 4, dim = 8;
using rows = kvc::kv_view<const float, kvc::layout_token_major>;
using evicting = kvc::compressed_cache<kvc::evict::h2o, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::none>;

void check(bool condition) {
    if (!condition) __builtin_trap();
}

class input {
public:
    input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
    bool empty() const noexcept { return offset_ >= size_; }
    std::uint8_t byte() noexcept { return offset_ < size_ ? data_[offset_++] : 0; }
    float value() noexcept { return (static_cast<float>(byte()) - 128.0f) / 32.0f; }

private:
    const std::uint8_t* data_;
    std::size_t size_, offset_ = 0;
};

// What a cache holds, per layer and head: token counts and positions.
struct snapshot {
    std::vector<std::vector<std::int32_t>> positions; // [layer * kv_heads + head] (full_cache: one per layer)
    std::size_t bytes = 0;
    bool operator==(const snapshot& o) const { return positions == o.positions && bytes == o.bytes; }
};

snapshot take(const kvc::full_cache& c) {
    snapshot s;
    for (std::size_t l = 0; l < layers; ++l) s.positions.emplace_back(c.positions(l), c.positions(l) + c.tokens(l));
    s.bytes = c.bytes();
    return s;
}
snapshot take(const evicting& c) {
    snapshot s;
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < kv_heads; ++h)
            s.positions.emplace_back(c.positions(l, h), c.positions(l, h) + c.tokens(l, h));
    s.bytes = c.bytes();
    return s;
}

std::size_t held_by_head(const kvc::full_cache& c, std::size_t l, std::size_t) { return c.tokens(l); }
std::size_t held_by_head(const evicting& c, std::size_t l, std::size_t h) { return c.tokens(l, h); }

// Attention output of every layer that holds tokens, for one fixed query.
template <class Cache>
std::vector<float> outputs(Cache copy) {
    std::vector<float> query(query_heads * dim), out;
    for (std::size_t i = 0; i < query.size(); ++i) query[i] = 0.125f * static_cast<float>(i % 7) - 0.25f;
    for (std::size_t l = 0; l < layers; ++l) {
        if (held_by_head(copy, l, 0) == 0) continue;
        std::vector<float> o(query_heads * dim);
        copy.attend(l, query.data(), o.data());
        out.insert(out.end(), o.begin(), o.end());
    }
    return out;
}

template <class Cache>
struct harness {
    counting_resource& counter;
    Cache& cache;
    std::vector<std::int64_t> last; // last appended position per layer (-1: none)
    std::vector<std::size_t> appended;
    bool full;

    void invariants() {
        check(cache.bytes() == counter.in_use);
        for (std::size_t l = 0; l < layers; ++l)
            for (std::size_t h = 0; h < (full ? 1 : kv_heads); ++h) {
                const std::size_t held = held_by_head(cache, l, h);
                if (full) check(held == appended[l]);
                else check(held <= appended[l]);
            }
        const snapshot s = take(cache);
        for (const auto& p : s.positions)
            for (std::size_t i = 1; i < p.size(); ++i) check(p[i - 1] < p[i]);
    }

    // One call chosen by the input. Returns normally or throws kvc::error.
    void call(input& in) {
        const std::uint8_t op = in.byte() % 8;
        const std::size_t layer = in.byte() % (layers + 1); // layers: out of range
        switch (op) {
        case 0:
        case 1: { // append: most often valid, sometimes wrong heads, dims or positions
            const std::size_t count = in.byte() % 6;
            const std::uint8_t shape = in.byte();
            const std::size_t heads = shape % 11 == 0 ? 1 : kv_heads;
            const std::size_t d = shape % 13 == 0 ? dim / 2 : dim;
            std::vector<float> k(count * heads * d), v(count * heads * d);
            for (float& x : k) x = in.value();
            for (float& x : v) x = in.value();
            const std::uint8_t where = in.byte();
            const std::int64_t next = layer < layers ? last[layer] + 1 : 0;
            std::int64_t position = next + (where % 4);
            if (where % 17 == 0) position = next - 1;                 // not after the last one
            if (where % 19 == 0) position = -static_cast<std::int64_t>(where); // negative
            if (where % 23 == 0) position = (std::int64_t{1} << 31) - 2;       // runs past 2^31 - 1 with count > 1
            cache.append(layer, rows(k.data(), count, heads, d), rows(v.data(), count, heads, d), position);
            if (count > 0) {
                last[layer] = position + static_cast<std::int64_t>(count) - 1;
                appended[layer] += count;
            }
            break;
        }
        case 2: { // attend, with or without mass
            std::vector<float> q(query_heads * dim), out(query_heads * dim);
            for (float& x : q) x = in.value();
            std::vector<float> mass(layer < layers ? kv_heads * (held_by_head(cache, layer, 0) + 1) * 2 : 1);
            cache.attend(layer, q.data(), out.data(), in.byte() % 2 ? mass.data() : nullptr);
            break;
        }
        case 3: { // attend_chunk
            const std::size_t chunk = in.byte() % 5;
            std::vector<float> q(chunk * query_heads * dim + 1), out(chunk * query_heads * dim + 1);
            for (float& x : q) x = in.value();
            cache.attend_chunk(layer, q.data(), chunk, out.data());
            break;
        }
        case 4:
            if constexpr (!std::is_same_v<Cache, kvc::full_cache>) cache.compress(layer);
            break;
        case 5:
            cache.reserve(in.byte() % 64);
            break;
        case 6:
            if (in.byte() % 2) cache.shrink_to_fit();
            else {
                cache.clear();
                for (std::size_t l = 0; l < layers; ++l) last[l] = -1, appended[l] = 0;
            }
            break;
        case 7: { // a copy holds the same and attends the same
            Cache copy(cache);
            check(take(copy).positions == take(cache).positions);
            break;
        }
        }
    }

    void step(input& in) {
        invariants();
        const snapshot before = take(cache);
        const std::vector<float> before_out = outputs(cache);
        const std::vector<std::int64_t> last_before = last;
        const std::vector<std::size_t> appended_before = appended;
        try {
            call(in);
        } catch (const kvc::error&) {
            // Strong guarantee.
            check(take(cache) == before);
            const std::vector<float> after_out = outputs(cache);
            check(after_out.size() == before_out.size() &&
                  (after_out.empty() ||
                   std::memcmp(after_out.data(), before_out.data(), after_out.size() * sizeof(float)) == 0));
            last = last_before;
            appended = appended_before;
        }
        invariants();
    }
};

kvc::cache_config config_for(counting_resource& counter) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.resource = &counter;
    return c;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    input in(data, size);
    const std::uint8_t which = in.byte();
    counting_resource counter;
    if (which % 2 == 0) {
        kvc::full_cache cache(config_for(counter));
        harness<kvc::full_cache> h{counter, cache, std::vector<std::int64_t>(layers, -1),
                                   std::vector<std::size_t>(layers, 0), true};
        for (int calls = 0; !in.empty() && calls < 64; ++calls) h.step(in);
    } else {
        // Budget: 2 sinks + 4 recent + 0..7 more; compress after the prompt,
        // and during decode every 0 (never), 1 or 2 tokens over budget.
        const std::uint8_t b = in.byte();
        kvc::evict::schedule when;
        when.interval = (b / 8) % 3;
        evicting cache(config_for(counter),
                       kvc::evict::h2o(kvc::evict::budget::absolute(6 + b % 8, 2, 4), when));
        harness<evicting> h{counter, cache, std::vector<std::int64_t>(layers, -1),
                            std::vector<std::size_t>(layers, 0), false};
        for (int calls = 0; !in.empty() && calls < 64; ++calls) h.step(in);
    }
    check(counter.in_use == 0);
    return 0;
}
