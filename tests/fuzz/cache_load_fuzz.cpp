// libFuzzer target: bytes -> kvc::load_cache (kvc/cache/serialization.hpp)
// into one of nine small caches, chosen by the first byte's low bits:
// full_cache and compressed caches over the stores the format carries (dense
// rows with the query ring and merging's bias, KIVI with sinks, GEAR, mixed
// precision, sparse rows, ThinK's pruned rows, KVQuant and CQ). The two
// calibrated codecs take a small artifact written out here (fixed ranges and
// codebooks, no k-means: calibration would cost build and start-up time and
// finds nothing a loader could). The first byte's high bit has every section's
// CRC recomputed before the load, so mutations also reach the parsers and
// their consistency checks. The invariants:
//   - a load either succeeds or throws kvc::error; any other exception, a
//     sanitizer report or a trap is a finding;
//   - a refused load leaves the cache as it was (it saves to the same bytes);
//   - an accepted input re-saves to the same bytes (the kvc version fields of
//     the header and the header's CRC aside: a reader accepts other versions'
//     files and writes its own), and the loaded cache can be used: decode and
//     chunk attention, an append and a compression run over the loaded data.
//
// Built with -DKVC_CACHE_LOAD_SEEDS (no libFuzzer) it is a program writing
// the seed corpus, tests/fuzz/corpus/cache_load: one saved cache per kind, as it is and to be resealed:
//   clang++-14 -std=c++17 -O1 -Iinclude -Itests -DKVC_CACHE_LOAD_SEEDS \
//     tests/fuzz/cache_load_fuzz.cpp -o /tmp/seeds && /tmp/seeds tests/fuzz/corpus/cache_load
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/cache/serialization.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/projection/think.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/view/kv_view.hpp"
#include "fuzz/saved_bytes.hpp"

namespace {

namespace e = kvc::evict;
namespace m = kvc::merge;
namespace q = kvc::quant;
namespace p = kvc::project;
using bytes = std::vector<unsigned char>;
using view = kvc::kv_view<const float, kvc::layout_token_major>;

void check(bool condition) {
    if (!condition) __builtin_trap();
}

kvc::cache_config shape() {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 32;
    c.storage = kvc::dtype::f16;
    return c;
}

template <class E>
E budgeted() {
    E policy;
    policy.keep = e::budget::absolute(8, 1, 4);
    policy.when.interval = 2;
    return policy;
}

q::gear small_gear() {
    q::gear g;
    g.chunk_tokens = 8;
    return g;
}

using dense_cache = kvc::compressed_cache<e::snapkv, m::compensation, q::none<kvc::half>, p::none>;
using kivi_cache = kvc::compressed_cache<e::h2o, m::none, q::kivi<4, 32, 8, 2>, p::none>;
using gear_cache = kvc::compressed_cache<e::knorm, m::none, q::gear, p::none>;
using mixed_cache = kvc::compressed_cache<e::none, m::none, q::mixed<q::int8_sym, q::int2_asym>, p::none>;
using sparse_cache = kvc::compressed_cache<e::knorm, m::none, q::sparse, p::none>;
using think_cache = kvc::compressed_cache<e::none, m::none, q::none<kvc::half>, p::think>;
using kvquant_cache = kvc::compressed_cache<e::knorm, m::none, q::kvquant, p::none>;
using cq_cache = kvc::compressed_cache<e::none, m::none, q::cq, p::none>;
constexpr unsigned kinds = 9;

// Rows for `tokens` tokens, deterministic in `seed`.
std::vector<float> rows_of(std::size_t count, unsigned seed) {
    std::vector<float> out(count);
    for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<float>(((i + seed) * 2654435761u) % 1000) / 250.0f - 2.0f;
    return out;
}

// The calibrated codecs for shape(), from artifacts written out here (what
// calibration would learn, in shape: per-channel key ranges and ascending
// scalar codebooks for KVQuant at 3 bits, 2-channel codebooks of 16 centroids for CQ).
q::kvquant small_kvquant() {
    const kvc::cache_config c = shape();
    const std::uint64_t layers = c.layers, heads = c.kv_heads, dim = c.head_dim;
    kvc::calibration::artifact a;
    a.kind = "kvquant";
    std::vector<float> lower(layers * heads * dim), upper(lower.size()), book;
    for (std::size_t i = 0; i < lower.size(); ++i) {
        lower[i] = -1.5f - 0.01f * static_cast<float>(i % 7);
        upper[i] = 1.5f + 0.01f * static_cast<float>(i % 5);
    }
    for (std::size_t l = 0; l < layers; ++l)
        for (int i = 0; i < 8; ++i) book.push_back(-1.0f + 2.0f * static_cast<float>(i) / 7.0f);
    a.tensors = {{"bits", {1}, {3.0f}},
                 {"outlier_fraction", {1}, {0.02f}},
                 {"key_lower", {layers, heads, dim}, lower},
                 {"key_upper", {layers, heads, dim}, upper},
                 {"key_codebook", {layers, 8}, book},
                 {"value_codebook", {layers, 8}, book}};
    return q::kvquant(a);
}

q::cq small_cq() {
    const kvc::cache_config c = shape();
    const std::uint64_t layers = c.layers, heads = c.kv_heads, groups = c.head_dim / 2;
    kvc::calibration::artifact a;
    a.kind = "cq";
    const std::vector<float> keys = rows_of(layers * heads * groups * 16 * 2, 11),
                             values = rows_of(layers * heads * groups * 16 * 2, 13);
    a.tensors = {{"channels_per_group", {1}, {2.0f}},
                 {"bits", {1}, {4.0f}},
                 {"key_codebooks", {layers, heads, groups, 16, 2}, keys},
                 {"value_codebooks", {layers, heads, groups, 16, 2}, values}};
    return q::cq(a);
}

// Uses a loaded cache the ways an engine would, through every kernel that
// reads the loaded data: decode and chunk attention, an append, a compression.
template <class Cache>
void exercise(Cache& cache) {
    const kvc::cache_config c = cache.config();
    const std::vector<float> queries = rows_of(c.query_heads * c.head_dim, 3);
    std::vector<float> out(c.query_heads * c.head_dim);
    for (std::size_t l = 0; l < c.layers; ++l) {
        cache.attend(l, queries.data(), out.data());
        if (cache.tokens(l) != 0) {
            bool every_head = true;
            if constexpr (!std::is_same_v<Cache, kvc::full_cache>)
                for (std::size_t h = 0; h < c.kv_heads; ++h) every_head = every_head && cache.tokens(l, h) != 0;
            if (every_head) cache.attend_chunk(l, queries.data(), 1, out.data());
        }
        std::int64_t next = 0;
        if constexpr (std::is_same_v<Cache, kvc::full_cache>)
            next = cache.tokens(l) ? cache.positions(l)[cache.tokens(l) - 1] + 1 : 0;
        else
            next = cache.next_position(l);
        if (next >= std::numeric_limits<std::int32_t>::max()) continue;
        const std::vector<float> k = rows_of(c.kv_heads * c.head_dim, 5), v = rows_of(c.kv_heads * c.head_dim, 7);
        cache.append(l, view(k.data(), 1, c.kv_heads, c.head_dim), view(v.data(), 1, c.kv_heads, c.head_dim), next);
        cache.attend(l, queries.data(), out.data());
        if constexpr (!std::is_same_v<Cache, kvc::full_cache>) cache.compress(l);
    }
}

using kvc_fuzz::same_but_version;

template <class Cache>
void run(Cache cache, const std::uint8_t* data, std::size_t size) {
    const bytes before = kvc::save_cache(cache);
    try {
        kvc::load_cache(cache, data, size);
    } catch (const kvc::error&) {
        check(kvc::save_cache(cache) == before);
        return;
    }
    check(same_but_version(kvc::save_cache(cache), bytes(data, data + size)));
    exercise(cache);
}

template <class F>
void with_cache(unsigned kind, F&& f) {
    const kvc::cache_config c = shape();
    switch (kind % kinds) {
    case 0: f(kvc::full_cache(c)); break;
    case 1: {
        e::snapkv s = budgeted<e::snapkv>();
        f(dense_cache(c, s));
        break;
    }
    case 2: f(kivi_cache(c, budgeted<e::h2o>())); break;
    case 3: f(gear_cache(c, budgeted<e::knorm>(), {}, small_gear())); break;
    case 4: f(mixed_cache(c, {}, {}, q::mixed<q::int8_sym, q::int2_asym>(0.5))); break;
    case 5: f(sparse_cache(c, budgeted<e::knorm>())); break;
    case 6: f(think_cache(c, {}, {}, {}, p::think(0.5, 4))); break;
    case 7: {
        static const q::kvquant codec = small_kvquant();
        f(kvquant_cache(c, budgeted<e::knorm>(), {}, codec));
        break;
    }
    default: {
        static const q::cq codec = small_cq();
        f(cq_cache(c, {}, {}, codec));
        break;
    }
    }
}

} // namespace

#ifndef KVC_CACHE_LOAD_SEEDS
// With the first byte's high bit set, every section's CRC is recomputed
// first, so that mutations reach the parsers and their consistency checks
// (as fuzz_artifact does); otherwise the bytes go in as they are.
bytes resealed(const std::uint8_t* data, std::size_t size) {
    bytes out(data, data + size);
    std::size_t at = 12;
    while (at + 12 <= out.size()) {
        std::uint64_t length = 0;
        for (int i = 7; i >= 0; --i) length = (length << 8) | out[at + 4 + static_cast<std::size_t>(i)];
        if (length > out.size() - at - 12 || out.size() - at - 12 - length < 4) break;
        const std::size_t end = at + 12 + static_cast<std::size_t>(length);
        const std::uint32_t crc = kvc::detail::crc32_update(0, out.data() + at, end - at);
        for (int i = 0; i < 4; ++i) out[end + static_cast<std::size_t>(i)] = static_cast<unsigned char>(crc >> (8 * i));
        at = end + 4;
    }
    return out;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    const bytes input = (data[0] & 0x80) ? resealed(data + 1, size - 1) : bytes(data + 1, data + size);
    with_cache(data[0] & 0x7f, [&](auto cache) { run(std::move(cache), input.data(), input.size()); });
    return 0;
}
#else
// Seeds: each kind of cache after a prompt, decode steps and a compression
// (its mixed heads assigned), saved after its kind byte.
int main(int argc, char** argv) {
    if (argc != 2) return 2;
    for (unsigned kind = 0; kind < kinds; ++kind)
        with_cache(kind, [&](auto cache) {
            const kvc::cache_config c = cache.config();
            const std::size_t prompt = 10;
            const std::vector<float> k = rows_of(prompt * c.kv_heads * c.head_dim, kind),
                                     v = rows_of(prompt * c.kv_heads * c.head_dim, kind + 1),
                                     queries = rows_of(prompt * c.query_heads * c.head_dim, kind + 2);
            std::vector<float> out(queries.size());
            cache.append(0, view(k.data(), prompt, c.kv_heads, c.head_dim),
                         view(v.data(), prompt, c.kv_heads, c.head_dim), 0);
            cache.attend_chunk(0, queries.data(), prompt, out.data());
            for (int step = 0; step < 4; ++step) exercise(cache);
            if constexpr (std::is_same_v<decltype(cache), mixed_cache>) {
                const std::vector<float> scores = rows_of(cache.tokens(0, 0), 9);
                for (std::size_t h = 0; h < c.kv_heads; ++h) cache.assign_precision(0, h, scores.data());
            }
            bytes file = kvc::save_cache(cache);
            file.insert(file.begin(), static_cast<unsigned char>(kind));
            std::ofstream(std::string(argv[1]) + "/kind" + std::to_string(kind) + ".bin", std::ios::binary)
                .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
            file[0] = static_cast<unsigned char>(kind | 0x80); // the same file, its CRCs recomputed after mutation
            std::ofstream(std::string(argv[1]) + "/kind" + std::to_string(kind) + "_resealed.bin", std::ios::binary)
                .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
        });
    return 0;
}
#endif
