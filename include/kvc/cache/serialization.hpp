// kvc/cache/serialization.hpp -- saves a cache to bytes and loads it back (METHODS.md S9).
//
//   kvc::save_cache(cache, stream);                 // or: std::vector<unsigned char> bytes = kvc::save_cache(cache);
//   kvc::load_cache(other, stream);                 // or: kvc::load_cache(other, bytes.data(), bytes.size());
//   kvc::save_layer(cache, layer, stream);          // one layer, for streaming offload
//   kvc::load_layer(other, layer, stream);
//
// Works for kvc::full_cache and every kvc::compressed_cache<E, M, Q, P>. The
// format is documented byte by byte in docs/SERIALIZATION.md: a magic and a
// format version, then sections (a header naming the kvc version, the
// cache_config shape and the policy composition with its parameters; per
// layer its state and recent queries; per (layer, KV head) its store and
// token columns), each framed by a tag, a length and a CRC-32.
//
// What a load guarantees:
//   - the destination must have the same shape, composition and parameters
//     as the cache that was saved: anything else is refused with a kvc::error
//     naming the first field that differs and both values;
//   - every count and length is checked against the bytes that are actually
//     there before anything is allocated for it (a section claiming 2^60
//     bytes in a 100-byte input fails once the 100 bytes are read);
//   - every section's CRC is checked before it is parsed, and what it holds
//     is checked for consistency (sizes that agree, indices in range) before
//     any kernel could read it;
//   - strong guarantee: the data is loaded into fresh storage, swapped in
//     only when all of it has been read and checked. A load that throws leaves
//     the destination exactly as it was.
// After a load, attention, appends and compressions give bit-identical
// results to the cache that was saved (capacities may differ: the loaded
// storage holds exactly what it needs).
// A save reports every I/O failure (the stream is flushed and checked) as kvc::error.
//
// Each head store takes part through one static member template, transfer,
// which walks its state once for both directions (kvc/core/archive.hpp has
// the archives and what they offer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <ostream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/archive.hpp"
#include "kvc/core/config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/memory.hpp"

namespace kvc {

// The version written in every file; a reader accepts exactly this version
// (docs/SERIALIZATION.md: any change to the bytes increments it).
inline constexpr std::uint32_t cache_format_version = 1;
// Most tokens one head may hold in a file: positions are 0..2^31-1.
inline constexpr std::size_t max_serialized_tokens = std::size_t{1} << 31;

namespace detail {

inline constexpr unsigned char cache_magic[8] = {'K', 'V', 'C', 'C', 'A', 'C', 'H', 'E'};

// Section tags (docs/SERIALIZATION.md).
enum class section_tag : std::uint32_t { header = 1, layer = 2, head = 3, end = 4 };

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the checksum of zlib and PNG.
inline std::uint32_t crc32_update(std::uint32_t crc, const unsigned char* data, std::size_t size) noexcept {
    struct table_t {
        std::uint32_t entry[256];
        table_t() noexcept {
            for (std::uint32_t i = 0; i < 256; ++i) {
                std::uint32_t c = i;
                for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
                entry[i] = c;
            }
        }
    };
    static const table_t table;
    crc = ~crc;
    for (std::size_t i = 0; i < size; ++i) crc = table.entry[(crc ^ data[i]) & 0xffu] ^ (crc >> 8);
    return ~crc;
}

// Where the bytes go: an ostream or a byte vector.
class byte_sink {
public:
    explicit byte_sink(std::ostream& out) noexcept : stream_(&out) {}
    explicit byte_sink(std::vector<unsigned char>& out) noexcept : vector_(&out) {}
    void write(const void* data, std::size_t size, const char* who) {
        if (vector_ != nullptr) {
            const auto* p = static_cast<const unsigned char*>(data);
            vector_->insert(vector_->end(), p, p + size);
            return;
        }
        stream_->write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
        require(static_cast<bool>(*stream_), who, ": writing ", size, " bytes to the stream failed (disk full or I/O error)");
    }
    // The stream's buffer is where a full disk shows: flush and check.
    void finish(const char* who) {
        if (stream_ == nullptr) return;
        stream_->flush();
        require(static_cast<bool>(*stream_), who, ": flushing the stream failed (disk full or I/O error)");
    }

private:
    std::ostream* stream_ = nullptr;
    std::vector<unsigned char>* vector_ = nullptr;
};

// Where the bytes come from: an istream (how much is left is unknown until
// it ends) or a memory block (known).
class byte_source {
public:
    explicit byte_source(std::istream& in) noexcept : stream_(&in) {}
    byte_source(const void* data, std::size_t size) noexcept
        : data_(static_cast<const unsigned char*>(data)), size_(size) {}

    // Reads up to `size` bytes; returns how many arrived.
    std::size_t read(void* out, std::size_t size, const char* who) {
        if (stream_ == nullptr) {
            const std::size_t n = size < size_ - offset_ ? size : size_ - offset_;
            if (n != 0) std::memcpy(out, data_ + offset_, n);
            offset_ += n;
            return n;
        }
        stream_->read(static_cast<char*>(out), static_cast<std::streamsize>(size));
        require(!stream_->bad(), who, ": reading the stream failed");
        return static_cast<std::size_t>(stream_->gcount());
    }
    void read_exactly(void* out, std::size_t size, const char* what, const char* who) {
        const std::size_t got = read(out, size, who);
        require(got == size, who, ": ", what, ": expected ", size, " bytes, the input ended after ", got,
                " (truncated data)");
    }
    bool is_memory() const noexcept { return stream_ == nullptr; }
    std::size_t memory_left() const noexcept { return size_ - offset_; }

private:
    std::istream* stream_ = nullptr;
    const unsigned char* data_ = nullptr;
    std::size_t size_ = 0, offset_ = 0;
};

// Section framing: tag u32, payload length u64, payload, CRC-32 u32 of the
// tag, length and payload bytes.
inline void write_section(byte_sink& sink, section_tag tag, const std::vector<unsigned char>& payload,
                          const char* who) {
    std::vector<unsigned char> head;
    put_le(head, static_cast<std::uint32_t>(tag));
    put_le(head, static_cast<std::uint64_t>(payload.size()));
    std::uint32_t crc = crc32_update(0, head.data(), head.size());
    crc = crc32_update(crc, payload.data(), payload.size());
    std::vector<unsigned char> tail;
    put_le(tail, crc);
    sink.write(head.data(), head.size(), who);
    if (!payload.empty()) sink.write(payload.data(), payload.size(), who);
    sink.write(tail.data(), tail.size(), who);
}

inline const char* name_of(section_tag tag) noexcept {
    switch (tag) {
    case section_tag::header: return "header";
    case section_tag::layer: return "layer";
    case section_tag::head: return "head";
    case section_tag::end: return "end";
    }
    return "unknown";
}

// Reads one section of the expected tag into `payload` and checks its CRC.
// The payload grows only as bytes arrive (in pieces of at most 64 KiB from a
// stream; from memory, its length is checked against what is left first), so
// a corrupt length costs no more memory than the input holds.
inline void read_section(byte_source& source, section_tag expected, std::vector<unsigned char>& payload,
                         const char* who) {
    unsigned char head[12];
    source.read_exactly(head, sizeof head, name_of(expected), who);
    const std::uint32_t tag = get_le<std::uint32_t>(head);
    const std::uint64_t length = get_le<std::uint64_t>(head + 4);
    require(tag == static_cast<std::uint32_t>(expected), who, ": expected a ", name_of(expected), " section (tag ",
            static_cast<std::uint32_t>(expected), "), got tag ", tag);
    if (source.is_memory())
        require(length <= source.memory_left(), who, ": the ", name_of(expected), " section claims ", length,
                " bytes, the input has ", source.memory_left(), " left (truncated or corrupt data)");
    payload.clear();
    constexpr std::size_t piece = std::size_t{1} << 16;
    std::uint64_t read = 0;
    while (read < length) {
        const std::size_t want = length - read < piece ? static_cast<std::size_t>(length - read) : piece;
        const std::size_t old = payload.size();
        payload.resize(old + want);
        const std::size_t got = source.read(payload.data() + old, want, who);
        require(got == want, who, ": the ", name_of(expected), " section claims ", length, " bytes, the input ended after ",
                read + got, " (truncated data)");
        read += got;
    }
    unsigned char tail[4];
    source.read_exactly(tail, sizeof tail, "section checksum", who);
    std::uint32_t crc = crc32_update(0, head, sizeof head);
    crc = crc32_update(crc, payload.data(), payload.size());
    const std::uint32_t stored = get_le<std::uint32_t>(tail);
    require(crc == stored, who, ": the ", name_of(expected), " section's checksum is ", stored, ", its bytes give ", crc,
            " (corrupt data)");
}

// A policy's identity: its type's mangled name (the Itanium C++ ABI spells it
// the same in every GCC and Clang build), so a file names the composition it
// was saved from, template arguments included.
// A policy chosen at run time (quant::any, evict::any's scorer and selector)
// has one type whatever it holds: its identity adds the held types' names.
template <class P, class = void>
struct holds_at_run_time : std::false_type {};
template <class P>
struct holds_at_run_time<P, std::void_t<decltype(std::declval<const P&>().held_type())>> : std::true_type {};
template <class P, class = void>
struct has_scorer_and_selector : std::false_type {};
template <class P>
struct has_scorer_and_selector<P, std::void_t<decltype(std::declval<const P&>().scorer),
                                              decltype(std::declval<const P&>().selector)>> : std::true_type {};

template <class P>
std::string held_identity(const P& p) {
    if constexpr (holds_at_run_time<P>::value) return std::string(" holding ") + p.held_type().name();
    else return (void)p, std::string();
}
template <class P>
std::string identity_of(const P& p) {
    std::string out = typeid(P).name() + held_identity(p);
    if constexpr (has_scorer_and_selector<P>::value) out += held_identity(p.scorer) + held_identity(p.selector);
    return out;
}

// Run-time parameters a policy was built with, where kvc can see them: the
// eviction budget, schedule and re-rotation (the parameters of the
// codecs and projections show in their stores' shapes, checked per head).
template <class P, class = void>
struct has_eviction_parameters : std::false_type {};
template <class P>
struct has_eviction_parameters<P, std::void_t<decltype(std::declval<const P&>().keep.keep_ratio),
                                              decltype(std::declval<const P&>().when.interval),
                                              decltype(std::declval<const P&>().rerotate.enabled)>> : std::true_type {};

inline std::uint64_t bits_of(double v) noexcept {
    std::uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    return u;
}

// The parameters as (name, value) pairs, values as 64-bit patterns.
template <class E>
std::vector<std::pair<const char*, std::uint64_t>> eviction_parameters(const E& e) {
    std::vector<std::pair<const char*, std::uint64_t>> out;
    if constexpr (has_eviction_parameters<E>::value) {
        out.emplace_back("keep.keep_ratio", bits_of(e.keep.keep_ratio));
        out.emplace_back("keep.tokens", e.keep.tokens);
        out.emplace_back("keep.bytes", e.keep.bytes);
        out.emplace_back("keep.sinks", e.keep.sinks);
        out.emplace_back("keep.window", e.keep.window);
        out.emplace_back("keep.layers.mode", static_cast<std::uint64_t>(e.keep.layers.mode));
        out.emplace_back("when.after_prefill", e.when.after_prefill ? 1u : 0u);
        out.emplace_back("when.interval", e.when.interval);
        out.emplace_back("rerotate.enabled", e.rerotate.enabled ? 1u : 0u);
        out.emplace_back("rerotate.rope.theta", bits_of(e.rerotate.rope.theta));
        out.emplace_back("rerotate.rope.rotary_dims", e.rerotate.rope.rotary_dims);
        out.emplace_back("rerotate.rope.interleaved", e.rerotate.rope.interleaved ? 1u : 0u);
    } else {
        (void)e;
    }
    return out;
}

template <class Cache>
struct cache_traits;

// What the header holds about a cache beyond its config: kind, policy names, parameters.
struct header_description {
    std::uint32_t kind = 0; // 0 full_cache, 1 compressed_cache
    std::vector<std::pair<const char*, std::string>> identity;
    std::vector<std::pair<const char*, std::uint64_t>> parameters;
};

// One generic friend of both caches: reads and writes their private state.
struct cache_serializer {
    // ---- full_cache ----
    static header_description describe(const full_cache&) { return {}; }

    // Layer section of a full_cache: its positions (one per token every head holds).
    static void save_layer_state(archive_writer& a, const full_cache& c, std::size_t layer) {
        const auto& positions = c.positions_[layer];
        a.count("positions", positions.size(), max_serialized_tokens);
        a.elements("positions", positions, positions.size());
    }
    struct full_layer {
        aligned_buffer<std::int32_t> positions;
        std::vector<dense_rows> heads;
    };
    static full_layer fresh_layer(const full_cache& c, std::size_t) {
        full_layer out{aligned_buffer<std::int32_t>(c.config_.resource), {}};
        out.heads.reserve(c.config_.kv_heads);
        for (std::size_t h = 0; h < c.config_.kv_heads; ++h)
            out.heads.emplace_back(c.config_.storage, c.config_.head_dim, c.config_.resource);
        return out;
    }
    static void load_layer_state(archive_reader& a, const full_cache&, std::size_t, full_layer& into) {
        std::size_t n = 0;
        a.count("positions", n, max_serialized_tokens);
        a.elements("positions", into.positions, n);
        for (std::size_t t = 0; t < n; ++t)
            a.check(into.positions[t] >= 0 && (t == 0 || into.positions[t] > into.positions[t - 1]),
                    "expected positions >= 0 in ascending order, got ", into.positions[t], " at token ", t);
    }
    static void save_head(archive_writer& a, const full_cache& c, std::size_t layer, std::size_t h) {
        dense_rows::transfer(c.heads_[layer * c.config_.kv_heads + h], a);
    }
    static void load_head(archive_reader& a, const full_cache&, std::size_t, std::size_t h, full_layer& into) {
        dense_rows::transfer(into.heads[h], a);
        a.check(into.heads[h].tokens() == into.positions.size(), "expected ", into.positions.size(),
                " tokens (one per position), got ", into.heads[h].tokens());
    }
    static void install(full_cache& c, std::size_t layer, full_layer& from) noexcept {
        c.positions_[layer].swap(from.positions);
        for (std::size_t h = 0; h < c.config_.kv_heads; ++h) {
            using std::swap;
            swap(c.heads_[layer * c.config_.kv_heads + h], from.heads[h]);
        }
    }
    static std::size_t layers_held(const full_cache& c) noexcept { return c.positions_.size(); }
    static full_cache fresh_like(const full_cache& c) { return full_cache(c.config_); }

    // ---- compressed_cache ----
    template <class E, class M, class Q, class P>
    static header_description describe(const compressed_cache<E, M, Q, P>& c) {
        header_description d;
        d.kind = 1;
        d.identity = {{"eviction", identity_of(c.eviction_)},
                      {"merging", identity_of(c.merging_)},
                      {"quantization", identity_of(c.quantization_)},
                      {"projection", identity_of(c.projection_)}};
        d.parameters = eviction_parameters(c.eviction_);
        return d;
    }
    template <class E, class M, class Q, class P>
    static void save_layer_state(archive_writer& a, const compressed_cache<E, M, Q, P>& c, std::size_t layer) {
        const auto& s = c.layers_[layer];
        a.i64(s.last_position);
        a.i64(s.first_position);
        a.u64(s.seen);
        a.u8(s.prefill_pending ? 1 : 0);
        query_ring::transfer(s.queries, a, c.query_dtype(), c.query_window_, c.config_.query_heads * c.config_.head_dim);
    }
    template <class E, class M, class Q, class P>
    struct compressed_layer {
        using cache = compressed_cache<E, M, Q, P>;
        typename cache::layer_state state;
        std::vector<typename cache::head_slot> heads;
    };
    template <class E, class M, class Q, class P>
    static compressed_layer<E, M, Q, P> fresh_layer(const compressed_cache<E, M, Q, P>& c, std::size_t layer) {
        compressed_layer<E, M, Q, P> out{typename compressed_cache<E, M, Q, P>::layer_state(c.config_.resource), {}};
        out.heads.reserve(c.config_.kv_heads);
        for (std::size_t h = 0; h < c.config_.kv_heads; ++h) out.heads.emplace_back(c.make_head(layer, h), c.config_.resource, c.column_mask());
        return out;
    }
    template <class E, class M, class Q, class P>
    static void load_layer_state(archive_reader& a, const compressed_cache<E, M, Q, P>& c, std::size_t,
                                 compressed_layer<E, M, Q, P>& into) {
        auto& s = into.state;
        s.last_position = a.i64("last_position");
        s.first_position = a.i64("first_position");
        std::size_t seen = 0;
        a.count("seen", seen, max_serialized_tokens);
        s.seen = seen;
        const std::uint8_t pending = a.u8("prefill_pending");
        a.check(pending <= 1, "expected prefill_pending 0 or 1, got ", static_cast<unsigned>(pending));
        s.prefill_pending = pending == 1;
        constexpr std::int64_t top = std::numeric_limits<std::int32_t>::max();
        a.check(s.last_position >= -1 && s.last_position < top, "expected last_position in -1..2^31-2, got ",
                s.last_position);
        a.check(s.first_position >= 0 && s.first_position <= top, "expected first_position in 0..2^31-1, got ",
                s.first_position);
        a.check((s.last_position < 0) == (s.seen == 0), "expected last_position -1 exactly when no token was seen, got ",
                s.last_position, " with ", s.seen, " seen");
        query_ring::transfer(s.queries, a, c.query_dtype(), c.query_window_, c.config_.query_heads * c.config_.head_dim);
    }
    template <class E, class M, class Q, class P>
    static void save_head(archive_writer& a, const compressed_cache<E, M, Q, P>& c, std::size_t layer, std::size_t h) {
        const auto& slot = c.head_slot_at(layer, h);
        using store = typename compressed_cache<E, M, Q, P>::head_storage;
        store::transfer(slot.rows, a);
        columns(a, slot.columns, slot.rows.tokens());
    }
    template <class E, class M, class Q, class P>
    static void load_head(archive_reader& a, const compressed_cache<E, M, Q, P>&, std::size_t, std::size_t h,
                          compressed_layer<E, M, Q, P>& into) {
        auto& slot = into.heads[h];
        using store = typename compressed_cache<E, M, Q, P>::head_storage;
        store::transfer(slot.rows, a);
        const std::size_t tokens = slot.rows.tokens();
        columns(a, slot.columns, tokens);
        const auto& s = into.state;
        a.check(tokens <= s.seen, "the head holds ", tokens, " tokens, expected at most the ", s.seen,
                " the layer has seen");
        const std::int32_t* positions = slot.columns.template data<position_column>();
        for (std::size_t t = 0; t < tokens; ++t)
            a.check(positions[t] >= s.first_position && (t == 0 || positions[t] > positions[t - 1]),
                    "expected positions ascending from first_position ", s.first_position, ", got ", positions[t],
                    " at token ", t);
    }
    template <class E, class M, class Q, class P>
    static void install(compressed_cache<E, M, Q, P>& c, std::size_t layer, compressed_layer<E, M, Q, P>& from) noexcept {
        using std::swap;
        auto& s = c.layers_[layer];
        s.last_position = from.state.last_position;
        s.first_position = from.state.first_position;
        s.seen = from.state.seen;
        s.prefill_pending = from.state.prefill_pending;
        swap(s.queries, from.state.queries);
        for (std::size_t h = 0; h < c.config_.kv_heads; ++h) swap(c.mutable_head(layer, h), from.heads[h]);
    }
    template <class E, class M, class Q, class P>
    static std::size_t layers_held(const compressed_cache<E, M, Q, P>& c) noexcept {
        return c.layers_.size();
    }
    template <class E, class M, class Q, class P>
    static compressed_cache<E, M, Q, P> fresh_like(const compressed_cache<E, M, Q, P>& c) {
        return compressed_cache<E, M, Q, P>(c.config_, c.eviction_, c.merging_, c.quantization_, c.projection_);
    }

    // Every token column of a head, in declaration order: each holds `tokens` elements.
    template <class Archive, class Columns>
    static void columns(Archive& a, Columns& columns, std::size_t tokens) {
        columns_of(a, columns, tokens, typename std::remove_const_t<Columns>::list{});
    }
    template <class Archive, class Columns, class... C>
    static void columns_of(Archive& a, Columns& columns, std::size_t tokens, column_list<C...>) {
        (a.shape("column element bytes", sizeof(typename C::value_type)), ...);
        // A column the cache switched off (a run-time policy's unused one) holds nothing.
        (a.elements("token column", columns.template buffer<C>(), columns.template active<C>() ? tokens : 0), ...);
    }
};

// What a file holds: a whole cache or one layer.
enum class file_content : std::uint32_t { cache = 0, layer = 1 };

template <class Cache>
std::vector<unsigned char> header_payload(const Cache& cache, file_content content) {
    const cache_config& c = cache.config();
    const header_description d = cache_serializer::describe(cache);
    std::vector<unsigned char> payload;
    archive_writer a(payload);
    a.u32(KVC_VERSION_MAJOR);
    a.u32(KVC_VERSION_MINOR);
    a.u32(KVC_VERSION_PATCH);
    a.u32(d.kind);
    a.u32(static_cast<std::uint32_t>(content));
    a.u64(c.layers);
    a.u64(c.kv_heads);
    a.u64(c.query_heads);
    a.u64(c.head_dim);
    a.u32(static_cast<std::uint32_t>(c.storage));
    std::uint32_t scale = 0;
    std::memcpy(&scale, &c.scale, sizeof scale);
    a.u32(scale);
    a.u64(d.identity.size());
    for (const auto& [name, value] : d.identity) {
        a.text(name);
        a.text(value);
    }
    a.u64(d.parameters.size());
    for (const auto& [name, value] : d.parameters) {
        a.text(name);
        a.u64(value);
    }
    return payload;
}

// Checks a header against the destination: the same bytes as the header the
// destination would write, apart from the kvc version (informational). The
// first field that differs is named with both values.
template <class Cache>
void check_header(const std::vector<unsigned char>& payload, const Cache& cache, file_content content,
                  const char* who) {
    const std::vector<unsigned char> mine = header_payload(cache, content);
    archive_reader theirs(payload.data(), payload.size(), std::string(who) + ": header");
    archive_reader ours(mine.data(), mine.size(), "kvc::header");
    theirs.u32("kvc version"), theirs.u32("kvc version"), theirs.u32("kvc version");
    ours.u32(""), ours.u32(""), ours.u32("");
    const auto same_u32 = [&](const char* what) {
        const std::uint32_t got = theirs.u32(what), want = ours.u32(what);
        require(got == want, who, ": ", what, ": the data has ", got, ", this cache has ", want);
    };
    const auto same_u64 = [&](const char* what) {
        const std::uint64_t got = theirs.u64(what), want = ours.u64(what);
        require(got == want, who, ": ", what, ": the data has ", got, ", this cache has ", want);
    };
    same_u32("cache kind (0 full_cache, 1 compressed_cache)");
    same_u32("content (0 a whole cache, 1 one layer)");
    same_u64("config.layers");
    same_u64("config.kv_heads");
    same_u64("config.query_heads");
    same_u64("config.head_dim");
    same_u32("config.storage (dtype code)");
    same_u32("config.scale (float bits)");
    const std::uint64_t policies = theirs.u64("policy count"), our_policies = ours.u64("");
    require(policies == our_policies, who, ": policy count: the data has ", policies, ", this cache has ", our_policies);
    for (std::uint64_t i = 0; i < policies; ++i) {
        const std::string family = ours.text("", mine.size());
        const std::string want = ours.text("", mine.size());
        const std::string got_family = theirs.text("policy family", 64);
        const std::string got = theirs.text("policy identity", 4096);
        require(got_family == family && got == want, who, ": ", family, " policy: the data was saved with '", got,
                "', this cache has '", want, "' (a cache of another composition)");
    }
    const std::uint64_t parameters = theirs.u64("parameter count"), our_parameters = ours.u64("");
    require(parameters == our_parameters, who, ": parameter count: the data has ", parameters, ", this cache has ",
            our_parameters);
    for (std::uint64_t i = 0; i < parameters; ++i) {
        const std::string name = ours.text("", mine.size());
        const std::uint64_t want = ours.u64("");
        const std::string got_name = theirs.text("parameter name", 64);
        const std::uint64_t got = theirs.u64("parameter value");
        require(got_name == name, who, ": expected parameter '", name, "', got '", got_name, "'");
        require(got == want, who, ": eviction parameter ", name, ": the data has ", got, ", this cache has ", want,
                " (64-bit patterns; a cache of other parameters)");
    }
    theirs.finish();
}

template <class Cache>
void write_layer(byte_sink& sink, const Cache& cache, std::size_t layer, const char* who) {
    std::vector<unsigned char> payload;
    {
        archive_writer a(payload);
        a.u64(layer);
        cache_serializer::save_layer_state(a, cache, layer);
    }
    write_section(sink, section_tag::layer, payload, who);
    for (std::size_t h = 0; h < cache.config().kv_heads; ++h) {
        payload.clear();
        archive_writer a(payload);
        a.u64(layer);
        a.u64(h);
        cache_serializer::save_head(a, cache, layer, h);
        write_section(sink, section_tag::head, payload, who);
    }
}

template <class Cache>
void write_file_start(byte_sink& sink, const Cache& cache, file_content content, const char* who) {
    std::vector<unsigned char> start(cache_magic, cache_magic + sizeof cache_magic);
    put_le(start, cache_format_version);
    sink.write(start.data(), start.size(), who);
    write_section(sink, section_tag::header, header_payload(cache, content), who);
}

inline void read_file_start(byte_source& source, const char* who) {
    unsigned char start[12];
    source.read_exactly(start, sizeof start, "magic and format version", who);
    require(std::memcmp(start, cache_magic, sizeof cache_magic) == 0, who,
            ": expected the magic 'KVCCACHE' (a kvc cache file), got other bytes");
    const std::uint32_t version = get_le<std::uint32_t>(start + 8);
    require(version == cache_format_version, who, ": expected format version ", cache_format_version, ", got ",
            version);
}

template <class Cache>
void save_to(byte_sink& sink, const Cache& cache, const char* who) {
    detail::validate_held(cache.config(), cache_serializer::layers_held(cache), who);
    write_file_start(sink, cache, file_content::cache, who);
    for (std::size_t l = 0; l < cache.config().layers; ++l) write_layer(sink, cache, l, who);
    write_section(sink, section_tag::end, {}, who);
    sink.finish(who);
}

template <class Cache>
void save_layer_to(byte_sink& sink, const Cache& cache, std::size_t layer, const char* who) {
    detail::validate_layer(cache.config(), cache_serializer::layers_held(cache), layer, who);
    write_file_start(sink, cache, file_content::layer, who);
    write_layer(sink, cache, layer, who);
    write_section(sink, section_tag::end, {}, who);
    sink.finish(who);
}

// Reads one layer's sections into fresh storage (nothing of `cache` changes).
template <class Cache>
auto read_layer(byte_source& source, const Cache& cache, std::size_t layer, const char* who) {
    auto fresh = cache_serializer::fresh_layer(cache, layer);
    std::vector<unsigned char> payload;
    read_section(source, section_tag::layer, payload, who);
    {
        archive_reader a(payload.data(), payload.size(), std::string(who) + ": layer " + std::to_string(layer));
        const std::uint64_t index = a.u64("layer index");
        require(index == layer, who, ": expected the section of layer ", layer, ", got layer ", index);
        cache_serializer::load_layer_state(a, cache, layer, fresh);
        a.finish();
    }
    for (std::size_t h = 0; h < cache.config().kv_heads; ++h) {
        read_section(source, section_tag::head, payload, who);
        archive_reader a(payload.data(), payload.size(),
                         std::string(who) + ": layer " + std::to_string(layer) + " head " + std::to_string(h));
        const std::uint64_t index = a.u64("layer index");
        const std::uint64_t head = a.u64("head index");
        require(index == layer && head == h, who, ": expected the section of layer ", layer, " head ", h,
                ", got layer ", index, " head ", head);
        cache_serializer::load_head(a, cache, layer, h, fresh);
        a.finish();
    }
    return fresh;
}

template <class Cache>
void read_file_header(byte_source& source, const Cache& cache, file_content content, const char* who) {
    read_file_start(source, who);
    std::vector<unsigned char> payload;
    read_section(source, section_tag::header, payload, who);
    check_header(payload, cache, content, who);
}

template <class Cache>
void read_end(byte_source& source, const char* who) {
    std::vector<unsigned char> payload;
    read_section(source, section_tag::end, payload, who);
    require(payload.empty(), who, ": expected an empty end section, got ", payload.size(), " bytes");
    if (source.is_memory())
        require(source.memory_left() == 0, who, ": expected the input to end after the end section, ",
                source.memory_left(), " bytes follow");
}

template <class Cache>
void load_from(byte_source& source, Cache& cache, const char* who) {
    detail::validate_held(cache.config(), cache_serializer::layers_held(cache), who);
    read_file_header(source, cache, file_content::cache, who);
    Cache fresh = cache_serializer::fresh_like(cache);
    for (std::size_t l = 0; l < cache.config().layers; ++l) {
        auto layer = read_layer(source, fresh, l, who);
        cache_serializer::install(fresh, l, layer);
    }
    read_end<Cache>(source, who);
    cache = std::move(fresh);
}

template <class Cache>
void load_layer_from(byte_source& source, Cache& cache, std::size_t layer, const char* who) {
    detail::validate_layer(cache.config(), cache_serializer::layers_held(cache), layer, who);
    read_file_header(source, cache, file_content::layer, who);
    auto fresh = read_layer(source, cache, layer, who);
    read_end<Cache>(source, who);
    cache_serializer::install(cache, layer, fresh);
}

} // namespace detail

// Writes `cache` to `out` (docs/SERIALIZATION.md); kvc::error when a write or the final flush fails.
template <class Cache>
void save_cache(const Cache& cache, std::ostream& out) {
    detail::byte_sink sink(out);
    detail::save_to(sink, cache, "kvc::save_cache");
}
// The same bytes in memory.
template <class Cache>
std::vector<unsigned char> save_cache(const Cache& cache) {
    std::vector<unsigned char> out;
    detail::byte_sink sink(out);
    detail::save_to(sink, cache, "kvc::save_cache");
    return out;
}

// Replaces the content of `cache` with what `in` holds; the cache must have
// the shape, composition and parameters it was saved with. kvc::error, and
// `cache` unchanged, on any mismatch or bad data. The stream form stops after
// the end section (more data may follow); the memory form requires the block
// to end there.
template <class Cache>
void load_cache(Cache& cache, std::istream& in) {
    detail::byte_source source(in);
    detail::load_from(source, cache, "kvc::load_cache");
}
template <class Cache>
void load_cache(Cache& cache, const void* data, std::size_t size) {
    detail::require(data != nullptr || size == 0, "kvc::load_cache: expected non-null data");
    detail::byte_source source(data, size);
    detail::load_from(source, cache, "kvc::load_cache");
}

// One layer: its state, its recent queries and its heads, for streaming
// offload. load_layer puts it back into the same layer of a cache of the same
// shape, composition and parameters; the other layers are untouched.
template <class Cache>
void save_layer(const Cache& cache, std::size_t layer, std::ostream& out) {
    detail::byte_sink sink(out);
    detail::save_layer_to(sink, cache, layer, "kvc::save_layer");
}
template <class Cache>
std::vector<unsigned char> save_layer(const Cache& cache, std::size_t layer) {
    std::vector<unsigned char> out;
    detail::byte_sink sink(out);
    detail::save_layer_to(sink, cache, layer, "kvc::save_layer");
    return out;
}
template <class Cache>
void load_layer(Cache& cache, std::size_t layer, std::istream& in) {
    detail::byte_source source(in);
    detail::load_layer_from(source, cache, layer, "kvc::load_layer");
}
template <class Cache>
void load_layer(Cache& cache, std::size_t layer, const void* data, std::size_t size) {
    detail::require(data != nullptr || size == 0, "kvc::load_layer: expected non-null data");
    detail::byte_source source(data, size);
    detail::load_layer_from(source, cache, layer, "kvc::load_layer");
}

} // namespace kvc
