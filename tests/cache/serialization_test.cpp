// Cache serialization (kvc/cache/serialization.hpp, docs/SERIALIZATION.md):
//   - round trip over every codec family and a few evictions, mergers and a
//     projection: a loaded cache re-saves to the same bytes, attends (decode
//     and chunk) bit for bit as the original, and keeps doing so while both
//     go on appending and compressing; layer by layer gives the same cache;
//   - the documented layout, checked byte by byte on a tiny full_cache;
//   - every kind of bad input (truncated, each byte corrupted, wrong format
//     version, wrong config, policy or parameters, sizes far beyond the data)
//     throws kvc::error naming what differs and leaves the destination as it was;
//   - a save to /dev/full throws kvc::error.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/cache/serialization.hpp"
#include "kvc/calibration/cq.hpp"
#include "kvc/calibration/kvquant.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/eviction/streaming.hpp"
#include "kvc/policy/merging/cam.hpp"
#include "kvc/policy/merging/compensation.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/projection/think.hpp"
#include "kvc/policy/quantization/block.hpp"
#include "kvc/policy/quantization/cq.hpp"
#include "kvc/policy/quantization/gear.hpp"
#include "kvc/policy/quantization/kivi.hpp"
#include "kvc/policy/quantization/kvquant.hpp"
#include "kvc/policy/quantization/mixed.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/policy/quantization/rotated.hpp"
#include "kvc/policy/quantization/sinks.hpp"
#include "kvc/policy/quantization/sparse.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

namespace e = kvc::evict;
namespace m = kvc::merge;
namespace q = kvc::quant;
namespace p = kvc::project;
using kvc_test::error_of;
using bytes = std::vector<unsigned char>;
using view = kvc::kv_view<const float, kvc::layout_token_major>;

constexpr std::size_t dim = 64;

kvc::cache_config shape(kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = dim;
    c.storage = kvc::dtype::f16;
    c.resource = resource;
    return c;
}

// An evicting policy with a small budget, compressing during decode too.
template <class E>
E budgeted(std::size_t tokens = 40, std::size_t interval = 4) {
    E policy;
    policy.keep = e::budget::absolute(tokens, 2, 8);
    policy.when.interval = interval;
    return policy;
}

// Calibration for the calibrated codecs (KVQuant, CQ), computed once from random rows.
struct calibration_rows {
    std::vector<std::vector<float>> keys, values;
    std::vector<view> key_views, value_views;
    calibration_rows() {
        const kvc::cache_config c = shape();
        for (std::size_t l = 0; l < c.layers; ++l) {
            keys.push_back(kvc_test::random_floats(128 * c.kv_heads * dim, 900 + static_cast<std::uint32_t>(l)));
            values.push_back(kvc_test::random_floats(128 * c.kv_heads * dim, 950 + static_cast<std::uint32_t>(l)));
        }
        for (std::size_t l = 0; l < c.layers; ++l) {
            key_views.emplace_back(keys[l].data(), 128, c.kv_heads, dim);
            value_views.emplace_back(values[l].data(), 128, c.kv_heads, dim);
        }
    }
};
const calibration_rows& rows() {
    static const calibration_rows r;
    return r;
}
q::kvquant kvquant_codec(double outlier_fraction = 0.02) {
    kvc::calibration::kvquant_options o;
    o.bits = 3;
    o.outlier_fraction = outlier_fraction;
    o.kmeans_iterations = 8;
    static const kvc::calibration::artifact a = kvc::calibration::calibrate_kvquant(shape(), rows().key_views,
                                                                                    rows().value_views, o);
    return q::kvquant(a);
}
q::cq cq_codec() {
    kvc::calibration::cq_options o;
    o.channels_per_group = 2;
    o.bits = 4;
    o.iterations = 5;
    static const kvc::calibration::artifact a =
        kvc::calibration::calibrate_cq(rows().key_views, rows().value_views, o);
    return q::cq(a);
}

// One composition of the typed suite: the cache type and how to build it.
template <class E, class M, class Q, class P = p::none>
struct plain {
    using cache = kvc::compressed_cache<E, M, Q, P>;
    static cache make(const kvc::cache_config& c) { return cache(c); }
};
template <class E, class M, class Q, class P = p::none>
struct evicting {
    using cache = kvc::compressed_cache<E, M, Q, P>;
    static cache make(const kvc::cache_config& c) { return cache(c, budgeted<E>()); }
};
struct rerotating {
    using cache = kvc::compressed_cache<e::h2o, m::none, q::none<float>, p::none>;
    static cache make(const kvc::cache_config& c) {
        e::h2o policy = budgeted<e::h2o>();
        policy.rerotate.enabled = true;
        return cache(c, policy);
    }
};
struct cam_merging {
    using cache = kvc::compressed_cache<e::streaming, m::cam, q::none<kvc::half>, p::none>;
    static cache make(const kvc::cache_config& c) { return cache(c, budgeted<e::streaming>(), m::cam(4)); }
};
struct projecting {
    using cache = kvc::compressed_cache<e::knorm, m::none, q::none<kvc::half>, p::think>;
    static cache make(const kvc::cache_config& c) { return cache(c, budgeted<e::knorm>(60), {}, {}, p::think(0.5, 16)); }
};
struct kvquant_case {
    using cache = kvc::compressed_cache<e::knorm, m::none, q::kvquant, p::none>;
    static cache make(const kvc::cache_config& c) { return cache(c, budgeted<e::knorm>(), {}, kvquant_codec()); }
};
struct cq_case {
    using cache = kvc::compressed_cache<e::none, m::none, q::cq, p::none>;
    static cache make(const kvc::cache_config& c) { return cache(c, {}, {}, cq_codec()); }
};
struct gear_case {
    using cache = kvc::compressed_cache<e::knorm, m::none, q::gear, p::none>;
    static cache make(const kvc::cache_config& c) {
        q::gear g;
        g.chunk_tokens = 16;
        return cache(c, budgeted<e::knorm>(), {}, g);
    }
};
struct mixed_case {
    using cache = kvc::compressed_cache<e::none, m::none, q::mixed<q::int8_sym, q::int2_asym>, p::none>;
    static cache make(const kvc::cache_config& c) { return cache(c, {}, {}, q::mixed<q::int8_sym, q::int2_asym>(0.3)); }
};

using compositions = ::testing::Types<
    plain<e::none, m::none, q::none<kvc::half>>,                    // dense rows, as full_cache
    evicting<e::h2o, m::none, q::none<kvc::half>>,                  // attention statistics column
    evicting<e::snapkv, m::none, q::none<float>>,                   // the query ring
    rerotating,                                                     // key re-rotation rewrites positions
    evicting<e::streaming, m::compensation, q::none<kvc::half>>,    // merging: the bias column
    cam_merging,                                                    // a merger's own column
    projecting,                                                     // ThinK: pruned_rows
    evicting<e::knorm, m::none, q::q8_0>,                           // packed_rows
    plain<e::none, m::none, q::block<q::int4_asym, 32, 3>>,         // packed_rows with its fp16 sinks
    evicting<e::h2o, m::compensation, q::q4_0>,                     // merging re-encodes packed rows
    evicting<e::knorm, m::none, q::kivi<4, 32, 32, 2>>,             // kivi_rows with sinks
    plain<e::none, m::none, q::kivi<2, 32, 32>>,                    // kivi_rows, 2 bits
    gear_case,                                                      // gear_rows
    mixed_case,                                                     // mixed_rows (assign_precision)
    evicting<e::knorm, m::none, q::sparse>,                         // sparse_rows
    plain<e::none, m::none, q::with_sinks<q::q4_0, 4>>,             // sink_rows wrapper
    evicting<e::knorm, m::none, q::rotated<q::kivi<4, 32, 32>>>,    // rotated_rows wrapper
    kvquant_case,                                                   // kvquant_head (calibrated)
    cq_case>;                                                       // cq_head (calibrated)

template <class T>
class serialization_round_trip : public ::testing::Test {};
TYPED_TEST_SUITE(serialization_round_trip, compositions);

// Engine data for `tokens` tokens from `first`, deterministic in the position.
struct step_data {
    std::vector<float> keys, values, queries;
    step_data(const kvc::cache_config& c, std::size_t first, std::size_t tokens) {
        const auto seed = static_cast<std::uint32_t>(first * 7 + tokens);
        keys = kvc_test::random_floats(tokens * c.kv_heads * c.head_dim, seed);
        values = kvc_test::random_floats(tokens * c.kv_heads * c.head_dim, seed + 1);
        queries = kvc_test::random_floats(tokens * c.query_heads * c.head_dim, seed + 2);
    }
};

template <class Cache>
void append(Cache& cache, std::size_t layer, const step_data& d, std::size_t first, std::size_t tokens) {
    const kvc::cache_config& c = cache.config();
    cache.append(layer, view(d.keys.data(), tokens, c.kv_heads, c.head_dim),
                 view(d.values.data(), tokens, c.kv_heads, c.head_dim), static_cast<std::int64_t>(first));
}

// One decode step on every layer (append at the cache's next position, then
// attend); returns the outputs of all layers.
template <class Cache>
std::vector<float> decode_step(Cache& cache, std::size_t step) {
    const kvc::cache_config& c = cache.config();
    std::vector<float> out(c.layers * c.query_heads * c.head_dim);
    for (std::size_t l = 0; l < c.layers; ++l) {
        const auto position = static_cast<std::size_t>(cache.next_position(l));
        const step_data d(c, step * 131 + l, 1);
        append(cache, l, d, position, 1);
        cache.attend(l, d.queries.data(), out.data() + l * c.query_heads * c.head_dim);
    }
    return out;
}

// A cache in the middle of a sequence: a prompt attended in one chunk, then
// decode steps with compressions (the schedule's and explicit ones), and
// for codecs that re-encode by importance, an assignment.
template <class Case>
typename Case::cache filled(const kvc::cache_config& c) {
    typename Case::cache cache = Case::make(c);
    constexpr std::size_t prompt = 48;
    for (std::size_t l = 0; l < c.layers; ++l) {
        const step_data d(c, 1000 + l, prompt);
        append(cache, l, d, 0, prompt);
        std::vector<float> out(prompt * c.query_heads * c.head_dim);
        cache.attend_chunk(l, d.queries.data(), prompt, out.data());
    }
    for (std::size_t step = 0; step < 40; ++step) {
        decode_step(cache, step);
        if (step % 16 == 15) cache.compress();
        if constexpr (kvc::detail::has_assign_precision<typename Case::cache::head_storage>::value)
            if (step == 20)
                for (std::size_t l = 0; l < c.layers; ++l)
                    for (std::size_t h = 0; h < c.kv_heads; ++h) {
                        const std::vector<float> scores = kvc_test::random_floats(cache.tokens(l, h), 77);
                        cache.assign_precision(l, h, scores.data());
                    }
    }
    return cache;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TYPED_TEST(serialization_round_trip, loaded_cache_is_the_same_cache_bit_for_bit) {
    const kvc::cache_config c = shape();
    auto original = filled<TypeParam>(c);
    const bytes saved = kvc::save_cache(original);

    // The stream form writes the same bytes.
    std::ostringstream stream;
    kvc::save_cache(original, stream);
    ASSERT_EQ(stream.str(), std::string(saved.begin(), saved.end()));

    auto loaded = TypeParam::make(c);
    kvc::load_cache(loaded, saved.data(), saved.size());
    EXPECT_EQ(kvc::save_cache(loaded), saved) << "a loaded cache re-saves to the same bytes";
    for (std::size_t l = 0; l < c.layers; ++l) {
        EXPECT_EQ(loaded.tokens_seen(l), original.tokens_seen(l));
        EXPECT_EQ(loaded.next_position(l), original.next_position(l));
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            ASSERT_EQ(loaded.tokens(l, h), original.tokens(l, h));
            EXPECT_EQ(std::memcmp(loaded.positions(l, h), original.positions(l, h),
                                  original.tokens(l, h) * sizeof(std::int32_t)),
                      0);
        }
    }

    // Decode steps straight after the load, then chunk attention over the
    // last tokens (the fewest any head holds), which marks a prompt again.
    for (std::size_t step = 90; step < 93; ++step)
        ASSERT_TRUE(same_bits(decode_step(original, step), decode_step(loaded, step))) << "decode step " << step;
    for (std::size_t l = 0; l < c.layers; ++l) {
        std::size_t chunk = original.tokens(l, 0);
        for (std::size_t h = 1; h < c.kv_heads; ++h) chunk = std::min(chunk, original.tokens(l, h));
        chunk = std::min<std::size_t>(chunk, 4);
        const step_data d(c, 5000 + l, chunk);
        std::vector<float> a(chunk * c.query_heads * c.head_dim), b(a.size());
        original.attend_chunk(l, d.queries.data(), chunk, a.data());
        loaded.attend_chunk(l, d.queries.data(), chunk, b.data());
        EXPECT_TRUE(same_bits(a, b)) << "attend_chunk, layer " << l;
    }
    // Both go on decoding (their schedules compressing, explicit compressions
    // too): every output stays bit-identical, and so does the final state.
    for (std::size_t step = 100; step < 136; ++step) {
        const std::vector<float> a = decode_step(original, step), b = decode_step(loaded, step);
        ASSERT_TRUE(same_bits(a, b)) << "decode step " << step;
        if (step % 9 == 8) {
            original.compress();
            loaded.compress();
        }
    }
    EXPECT_EQ(kvc::save_cache(loaded), kvc::save_cache(original));
}

// Saved between the prompt and the first decode step (the prompt's
// compression still pending, the query window full): the loaded cache runs
// that compression as the original does.
TYPED_TEST(serialization_round_trip, a_cache_saved_before_its_prompt_compression_compresses_alike) {
    const kvc::cache_config c = shape();
    auto original = TypeParam::make(c);
    for (std::size_t l = 0; l < c.layers; ++l) {
        const step_data d(c, 1000 + l, 60);
        append(original, l, d, 0, 60);
        std::vector<float> out(60 * c.query_heads * c.head_dim);
        original.attend_chunk(l, d.queries.data(), 60, out.data());
    }
    const bytes saved = kvc::save_cache(original);
    auto loaded = TypeParam::make(c);
    kvc::load_cache(loaded, saved.data(), saved.size());
    for (std::size_t step = 0; step < 6; ++step)
        ASSERT_TRUE(same_bits(decode_step(original, step), decode_step(loaded, step))) << "decode step " << step;
    for (std::size_t l = 0; l < c.layers; ++l)
        for (std::size_t h = 0; h < c.kv_heads; ++h) EXPECT_EQ(loaded.tokens(l, h), original.tokens(l, h));
    EXPECT_EQ(kvc::save_cache(loaded), kvc::save_cache(original));
}

TYPED_TEST(serialization_round_trip, layer_by_layer_gives_the_same_cache) {
    const kvc::cache_config c = shape();
    const auto original = filled<TypeParam>(c);
    auto rebuilt = TypeParam::make(c);
    for (std::size_t l = 0; l < c.layers; ++l) {
        std::stringstream stream;
        kvc::save_layer(original, l, stream);
        kvc::load_layer(rebuilt, l, stream);
    }
    EXPECT_EQ(kvc::save_cache(rebuilt), kvc::save_cache(original));
}

// ---- full_cache ------------------------------------------------------------

kvc::full_cache filled_full(const kvc::cache_config& c) {
    kvc::full_cache cache(c);
    for (std::size_t l = 0; l < c.layers; ++l) {
        const step_data d(c, 40 + l, 30);
        append(cache, l, d, 3, 30);
    }
    return cache;
}

TEST(serialization_full_cache, round_trip_is_bit_exact_and_continues_alike) {
    const kvc::cache_config c = shape();
    kvc::full_cache original = filled_full(c), loaded(c);
    const bytes saved = kvc::save_cache(original);
    kvc::load_cache(loaded, saved.data(), saved.size());
    EXPECT_EQ(kvc::save_cache(loaded), saved);
    for (std::size_t step = 0; step < 8; ++step)
        for (std::size_t l = 0; l < c.layers; ++l) {
            const step_data d(c, 7000 + step, 1);
            append(original, l, d, 33 + step, 1);
            append(loaded, l, d, 33 + step, 1);
            std::vector<float> a(c.query_heads * dim), b(a.size());
            original.attend(l, d.queries.data(), a.data());
            loaded.attend(l, d.queries.data(), b.data());
            ASSERT_TRUE(same_bits(a, b));
            std::vector<float> ca(2 * c.query_heads * dim), cb(ca.size());
            const step_data chunk(c, 8000 + step, 2);
            original.attend_chunk(l, chunk.queries.data(), 2, ca.data());
            loaded.attend_chunk(l, chunk.queries.data(), 2, cb.data());
            ASSERT_TRUE(same_bits(ca, cb));
        }
}

// A full_cache of one layer, one head of dim 2 in fp32 holding one token at position 5.
kvc::cache_config tiny_shape(kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = 1, c.kv_heads = 1, c.query_heads = 1, c.head_dim = 2, c.storage = kvc::dtype::f32;
    c.resource = resource;
    return c;
}
bytes tiny_file() {
    kvc::full_cache cache(tiny_shape());
    const float key[2] = {1.0f, 2.0f}, value[2] = {3.0f, -0.5f};
    cache.append(0, view(key, 1, 1, 2), view(value, 1, 1, 2), 5);
    return kvc::save_cache(cache);
}
// The layout of docs/SERIALIZATION.md, byte by byte, for a full_cache of one
// layer, one head of dim 2 in fp32 holding one token at position 5.
TEST(serialization_format, tiny_full_cache_has_the_documented_bytes) {
    const bytes saved = tiny_file();

    bytes want;
    const auto u8 = [&](unsigned v) { want.push_back(static_cast<unsigned char>(v)); };
    const auto u32 = [&](std::uint32_t v) {
        for (int i = 0; i < 4; ++i) u8((v >> (8 * i)) & 0xffu);
    };
    const auto u64 = [&](std::uint64_t v) {
        for (int i = 0; i < 8; ++i) u8(static_cast<unsigned>((v >> (8 * i)) & 0xffu));
    };
    const auto f32 = [&](float v) {
        std::uint32_t b;
        std::memcpy(&b, &v, 4);
        u32(b);
    };
    // A section's CRC-32 covers its tag, length and payload (checked below
    // against the standard check value, so this is no self-reference).
    const auto section = [&](std::size_t begin) {
        u32(kvc::detail::crc32_update(0, want.data() + begin, want.size() - begin));
    };
    for (char ch : std::string("KVCCACHE")) u8(static_cast<unsigned char>(ch));
    u32(1); // format version
    std::size_t begin = want.size();
    u32(1), u64(76);                                     // header section: tag, payload bytes
    u32(KVC_VERSION_MAJOR), u32(KVC_VERSION_MINOR), u32(KVC_VERSION_PATCH);
    u32(0), u32(0);                                      // full_cache, a whole cache
    u64(1), u64(1), u64(1), u64(2);                      // layers, kv_heads, query_heads, head_dim
    u32(static_cast<std::uint32_t>(kvc::dtype::f32)), u32(0); // storage, scale (0.0f)
    u64(0), u64(0);                                      // no policies, no parameters
    section(begin);
    begin = want.size();
    u32(2), u64(8 + 8 + 4);                              // layer section
    u64(0);                                              // layer 0
    u64(1), u32(5);                                      // one position: 5
    section(begin);
    begin = want.size();
    u32(3), u64(8 + 8 + 8 + 8 + 8 + 16);                 // head section
    u64(0), u64(0);                                      // layer 0, head 0
    u64(static_cast<std::uint32_t>(kvc::dtype::f32)), u64(2), u64(1); // dense_rows: type, dim, tokens
    f32(1.0f), f32(2.0f), f32(3.0f), f32(-0.5f);         // keys, values
    section(begin);
    begin = want.size();
    u32(4), u64(0);                                      // end section
    section(begin);
    EXPECT_EQ(saved, want);

    // CRC-32's check value: the CRC of "123456789" is 0xCBF43926.
    const char* check = "123456789";
    EXPECT_EQ(kvc::detail::crc32_update(0, reinterpret_cast<const unsigned char*>(check), 9), 0xCBF43926u);
}

// ---- bad input ---------------------------------------------------------------

using checked_type = kvc::compressed_cache<e::h2o, m::none, q::kivi<4, 32, 32, 2>, p::none>;
struct checked_case {
    using cache = checked_type;
    static cache make(const kvc::cache_config& c) { return cache(c, budgeted<e::h2o>()); }
};

// Loading `data` throws kvc::error, and `cache` saves to the same bytes as before.
template <class Cache>
std::string refused(Cache& cache, const bytes& data) {
    const bytes before = kvc::save_cache(cache);
    const std::string message = error_of([&] { kvc::load_cache(cache, data.data(), data.size()); });
    EXPECT_EQ(kvc::save_cache(cache), before) << "a refused load changed the cache: " << message;
    return message;
}

// A destination that holds something else than the file.
checked_type other_destination(const kvc::cache_config& c) {
    checked_type cache = checked_case::make(c);
    for (std::size_t l = 0; l < c.layers; ++l) {
        const step_data d(c, 3000 + l, 12);
        append(cache, l, d, 0, 12);
    }
    return cache;
}

TEST(serialization_errors, truncated_input_is_refused_and_changes_nothing) {
    const kvc::cache_config c = shape();
    const bytes saved = kvc::save_cache(filled<checked_case>(c));
    checked_type destination = other_destination(c);
    for (std::size_t n = 0; n < saved.size(); n += n < 300 ? 1 : 97) {
        const bytes cut(saved.begin(), saved.begin() + static_cast<std::ptrdiff_t>(n));
        const std::string message = refused(destination, cut);
        ASSERT_NE(message, "(no kvc::error)") << "a prefix of " << n << " bytes was accepted";
        if (n >= 12) {
            EXPECT_NE(message.find("truncated"), std::string::npos) << n << ": " << message;
        }
    }
    // The stream form too.
    std::istringstream in(std::string(saved.begin(), saved.end() - 1));
    EXPECT_NE(error_of([&] { kvc::load_cache(destination, in); }).find("truncated"), std::string::npos);
    // Trailing bytes after the end section: the memory form must end there.
    bytes longer = saved;
    longer.push_back(0);
    EXPECT_NE(refused(destination, longer).find("1 bytes follow"), std::string::npos);
}

TEST(serialization_errors, each_corrupted_byte_is_refused_and_changes_nothing) {
    const kvc::cache_config c = shape();
    const bytes saved = kvc::save_cache(filled<checked_case>(c));
    checked_type destination = other_destination(c);
    for (std::size_t i = 0; i < saved.size(); i += i < 400 ? 1 : 53) {
        bytes corrupt = saved;
        corrupt[i] ^= static_cast<unsigned char>(1u << (i % 8));
        ASSERT_NE(refused(destination, corrupt), "(no kvc::error)") << "a flipped bit in byte " << i << " was accepted";
    }
    bytes corrupt = saved;
    corrupt[saved.size() / 2] ^= 0x40;
    EXPECT_NE(refused(destination, corrupt).find("checksum"), std::string::npos);
}

TEST(serialization_errors, wrong_magic_or_version_is_refused) {
    const kvc::cache_config c = shape();
    const bytes saved = kvc::save_cache(filled<checked_case>(c));
    checked_type destination = other_destination(c);
    bytes newer = saved;
    newer[8] = 2;
    EXPECT_NE(refused(destination, newer).find("expected format version 1, got 2"), std::string::npos);
    bytes other = saved;
    other[0] = 'X';
    EXPECT_NE(refused(destination, other).find("magic"), std::string::npos);
}

TEST(serialization_errors, another_shape_composition_or_parameters_is_refused_naming_what_differs) {
    const kvc::cache_config c = shape();
    const bytes saved = kvc::save_cache(filled<checked_case>(c));

    kvc::cache_config narrow = c;
    narrow.head_dim = 32;
    checked_type narrow_cache(narrow, budgeted<e::h2o>());
    EXPECT_NE(refused(narrow_cache, saved).find("config.head_dim: the data has 64, this cache has 32"),
              std::string::npos);
    kvc::cache_config deeper = c;
    deeper.layers = 3;
    checked_type deeper_cache(deeper, budgeted<e::h2o>());
    EXPECT_NE(refused(deeper_cache, saved).find("config.layers: the data has 2, this cache has 3"), std::string::npos);

    kvc::compressed_cache<e::knorm, m::none, q::kivi<4, 32, 32, 2>, p::none> knorm(c, budgeted<e::knorm>());
    EXPECT_NE(refused(knorm, saved).find("eviction policy: the data was saved with"), std::string::npos);
    kvc::compressed_cache<e::h2o, m::none, q::kivi<4, 32, 64, 2>, p::none> longer_residual(c, budgeted<e::h2o>());
    EXPECT_NE(refused(longer_residual, saved).find("quantization policy"), std::string::npos);
    checked_type bigger_budget(c, budgeted<e::h2o>(50));
    EXPECT_NE(refused(bigger_budget, saved).find("keep.tokens: the data has 40, this cache has 50"), std::string::npos);
    kvc::full_cache full(c);
    EXPECT_NE(refused(full, saved).find("cache kind"), std::string::npos);

    // A codec parameter outside the type shows in the store's shape.
    const bytes gear_saved = kvc::save_cache(filled<gear_case>(c));
    q::gear longer_chunks;
    longer_chunks.chunk_tokens = 32;
    gear_case::cache gear_other(c, budgeted<e::knorm>(), {}, longer_chunks);
    EXPECT_NE(refused(gear_other, gear_saved).find("gear_rows chunk tokens: the data has 16, this cache has 32"),
              std::string::npos);
    // A calibrated codec with another calibration: its tables differ.
    const bytes kvquant_saved = kvc::save_cache(filled<kvquant_case>(c));
    kvquant_case::cache recalibrated(c, budgeted<e::knorm>(), {}, [] {
        kvc::calibration::kvquant_options o;
        o.bits = 3;
        o.outlier_fraction = 0.02;
        o.kmeans_iterations = 8;
        // The same options on other rows (keys and values swapped): other ranges and codebooks.
        return q::kvquant(kvc::calibration::calibrate_kvquant(shape(), rows().value_views, rows().key_views, o));
    }());
    const std::string recalibrated_message = refused(recalibrated, kvquant_saved);
    EXPECT_NE(recalibrated_message.find("kvquant_head calibrated parameters"), std::string::npos) << recalibrated_message;
}

// The tiny full_cache of tiny_full_cache_has_the_documented_bytes, with its
// counts patched (and the section's CRC made right again, so that only the
// size checks stand between the count and an allocation).
void put_u64(bytes& b, std::size_t at, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) b[at + static_cast<std::size_t>(i)] = static_cast<unsigned char>(v >> (8 * i));
}
void reseal(bytes& b, std::size_t section) {
    std::uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = (length << 8) | b[section + 4 + static_cast<std::size_t>(i)];
    const std::size_t end = section + 12 + static_cast<std::size_t>(length);
    const std::uint32_t crc = kvc::detail::crc32_update(0, b.data() + section, end - section);
    for (int i = 0; i < 4; ++i) b[end + static_cast<std::size_t>(i)] = static_cast<unsigned char>(crc >> (8 * i));
}
constexpr std::size_t layer_section = 104, head_section = 140; // offsets in tiny_file()

TEST(serialization_errors, sizes_beyond_the_data_fail_before_allocating) {
    kvc_test::counting_resource memory;
    memory.limit = std::size_t{1} << 16; // a big allocation throws std::bad_alloc, which fails this test
    kvc::full_cache destination(tiny_shape(&memory));
    ASSERT_EQ(tiny_file().size(), 228u);

    bytes tokens = tiny_file();
    put_u64(tokens, head_section + 12 + 32, std::uint64_t{1} << 60); // dense_rows tokens
    reseal(tokens, head_section);
    EXPECT_NE(refused(destination, tokens).find("dense_rows tokens: expected at most 2147483648, got 1152921504606846976"),
              std::string::npos);
    put_u64(tokens, head_section + 12 + 32, (std::uint64_t{1} << 31) - 1); // allowed count, 16 GiB of rows
    reseal(tokens, head_section);
    EXPECT_NE(refused(destination, tokens).find("dense_rows keys: expected 17179869176 more bytes"), std::string::npos);

    bytes positions = tiny_file();
    put_u64(positions, layer_section + 12 + 8, std::uint64_t{1} << 60);
    reseal(positions, layer_section);
    EXPECT_NE(refused(destination, positions).find("positions: expected at most"), std::string::npos);

    bytes section = tiny_file();
    put_u64(section, layer_section + 4, std::uint64_t{1} << 60); // the section's own length
    EXPECT_NE(refused(destination, section).find("claims 1152921504606846976 bytes, the input has"),
              std::string::npos);
    std::istringstream in(std::string(section.begin(), section.end()));
    EXPECT_NE(error_of([&] { kvc::load_cache(destination, in); }).find("truncated"), std::string::npos);
    EXPECT_EQ(destination.tokens(0), 0u);
}

TEST(serialization_errors, inconsistent_data_with_a_valid_checksum_is_refused) {
    kvc::full_cache destination(tiny_shape());
    bytes descending = tiny_file();
    descending[layer_section + 12 + 16 + 3] = 0x80; // position 5 -> negative
    reseal(descending, layer_section);
    EXPECT_NE(refused(destination, descending).find("expected positions >= 0"), std::string::npos);
    bytes wrong_head = tiny_file();
    put_u64(wrong_head, head_section + 12 + 8, 1); // head index 1 of a one-head cache
    reseal(wrong_head, head_section);
    EXPECT_NE(refused(destination, wrong_head).find("expected the section of layer 0 head 0, got layer 0 head 1"),
              std::string::npos);
}

TEST(serialization_errors, save_reports_a_full_disk) {
    const kvc::cache_config c = shape();
    const checked_type cache = filled<checked_case>(c);
    std::ofstream full("/dev/full", std::ios::binary);
    ASSERT_TRUE(full.is_open()) << "/dev/full is missing";
    EXPECT_NE(error_of([&] { kvc::save_cache(cache, full); }).find("disk full or I/O error"), std::string::npos);
    std::ofstream full_again("/dev/full", std::ios::binary);
    EXPECT_NE(error_of([&] { kvc::save_layer(cache, 1, full_again); }).find("disk full or I/O error"),
              std::string::npos);
}

TEST(serialization_layers, a_layer_goes_back_only_where_it_came_from_and_the_others_stay) {
    const kvc::cache_config c = shape();
    const checked_type source = filled<checked_case>(c);
    checked_type destination = other_destination(c);
    const bytes layer1 = kvc::save_layer(source, 1);
    EXPECT_NE(error_of([&] { kvc::load_layer(destination, 0, layer1.data(), layer1.size()); })
                  .find("expected the section of layer 0, got layer 1"),
              std::string::npos);
    const bytes whole = kvc::save_cache(source);
    EXPECT_NE(error_of([&] { kvc::load_layer(destination, 0, whole.data(), whole.size()); }).find("content"),
              std::string::npos);
    EXPECT_NE(refused(destination, layer1).find("content"), std::string::npos);

    const bytes layer0_before = kvc::save_layer(destination, 0);
    kvc::load_layer(destination, 1, layer1.data(), layer1.size());
    EXPECT_EQ(kvc::save_layer(destination, 0), layer0_before);
    EXPECT_EQ(kvc::save_layer(destination, 1), layer1);
    EXPECT_EQ(destination.tokens_seen(1), source.tokens_seen(1));
}

TEST(serialization_streams, caches_follow_one_another_in_a_stream) {
    const kvc::cache_config c = shape();
    const checked_type first = filled<checked_case>(c), second = other_destination(c);
    std::stringstream stream;
    kvc::save_cache(first, stream);
    kvc::save_cache(second, stream);
    checked_type a = checked_case::make(c), b = checked_case::make(c);
    kvc::load_cache(a, stream);
    kvc::load_cache(b, stream);
    EXPECT_EQ(kvc::save_cache(a), kvc::save_cache(first));
    EXPECT_EQ(kvc::save_cache(b), kvc::save_cache(second));
}

} // namespace
