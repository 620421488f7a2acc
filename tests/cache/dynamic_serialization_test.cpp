// Serialization of the run-time cache (kvc::dynamic_cache, kvc/registry.hpp):
// every method of the registry, alone and in compositions, saved mid-sequence
// and loaded into a fresh cache of the same spec, continues bit for bit as
// the original; a file from another composition or parameters, or damaged
// bytes, is refused with kvc::error and leaves the destination as it was.
// (The format and the static caches: serialization_test.cpp.)
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/all.hpp"
#include "kvc/registry.hpp"
#include "learnt_artifacts.hpp"

namespace {

kvc::cache_config shape() {
    return kvc_test::shape_of(2, 2, 4, 64);
}

// Every calibrated method's artifact, learnt from random rows (enough to
// build the caches; what they are worth is the fidelity tools' business).
const kvc::cache_options& options() {
    static const kvc::cache_options o = [] {
        kvc::cache_options out;
        out.artifacts = kvc_test::learnt_artifacts(shape(), 61);
        return out;
    }();
    return o;
}

kvc::dynamic_cache make(const std::string& spec) {
    return kvc::make_cache(shape(), spec, options());
}

// Every registry method once, as a spec that runs it: alone, mergers with
// an eviction to fold what it drops.
std::vector<std::string> every_method() {
    std::vector<std::string> specs;
    for (const kvc::method_info& m : kvc::methods())
        specs.push_back(m.family == kvc::method_family::merging ? "h2o:0.3 + " + m.name : m.name);
    return specs;
}

// Compositions whose pieces meet in one store or one layer's state.
const char* const compositions[] = {"q4_0 + snapkv:0.25",    "kivi:2 + h2o:0.5",  "k8v4 + pyramidkv:0.3 + cam",
                                    "gear + knorm:0.4",      "mixed:int8/int2 + tova:0.5",
                                    "hadamard:q4_0 + streaming:0.3 + compensation", "kvquant + expected_attention:0.5",
                                    "cq:c4b8 + chunkkv:0.4", "sparse:0.5 + adakv:0.3",
                                    "q8_0 + pca:32",         "kivi:2 + snapkv:0.3 + pca:32",
                                    "none:f16 + h2o:0.5 + think:0.5", "loki:32:0.25 + tova:0.5",
                                    "q4_0 + cskv:32:16"};

// The first part of a sequence: a 96-token prompt in two chunks and 20
// decode steps (schedules compress after the prompt), then an explicit
// compression, so the saved state holds evictions, merges and query rings.
void first_part(kvc::dynamic_cache& cache) {
    (void)kvc_test::prompt_then_decode(cache, shape(), 96, 48, 20, 5);
    cache.compress();
}

// The rest: 16 decode steps from where the cache is, every output.
std::vector<float> rest(kvc::dynamic_cache& cache) {
    const kvc::cache_config c = shape();
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    std::vector<float> all, out(qrow);
    for (std::size_t step = 0; step < 16; ++step)
        for (std::size_t l = 0; l < c.layers; ++l) {
            const auto seed = static_cast<std::uint32_t>(1000 + step * 7 + l);
            const std::vector<float> k = kvc_test::random_floats(row, seed), v = kvc_test::random_floats(row, seed + 1);
            const std::vector<float> q = kvc_test::random_floats(qrow, seed + 2);
            cache.append(l, kvc::kv_view<const float>(k.data(), 1, c.kv_heads, c.head_dim),
                         kvc::kv_view<const float>(v.data(), 1, c.kv_heads, c.head_dim), cache.next_position(l));
            cache.attend(l, q.data(), out.data());
            all.insert(all.end(), out.begin(), out.end());
        }
    return all;
}

// Tokens and positions of every head.
std::vector<std::int64_t> held(const kvc::dynamic_cache& cache) {
    std::vector<std::int64_t> out;
    for (std::size_t l = 0; l < shape().layers; ++l) {
        out.push_back(cache.tokens_seen(l));
        out.push_back(cache.next_position(l));
        for (std::size_t h = 0; h < shape().kv_heads; ++h) {
            const std::size_t n = cache.tokens(l, h);
            out.push_back(static_cast<std::int64_t>(n));
            const std::int32_t* p = cache.positions(l, h);
            out.insert(out.end(), p, p + n);
        }
    }
    return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Save `spec`'s cache mid-sequence, load it into a fresh cache of the same
// spec (whole, from memory and from a stream, and layer by layer), and
// continue all of them with the original: identical outputs, tokens and
// positions, and the loaded caches save to the same bytes.
void round_trip(const std::string& spec) {
    SCOPED_TRACE(spec);
    kvc::dynamic_cache original = make(spec);
    first_part(original);
    const std::vector<unsigned char> bytes = kvc::save_cache(original);

    kvc::dynamic_cache from_memory = make(spec);
    kvc::load_cache(from_memory, bytes.data(), bytes.size());
    std::stringstream stream;
    kvc::save_cache(original, stream);
    kvc::dynamic_cache from_stream = make(spec);
    kvc::load_cache(from_stream, stream);
    kvc::dynamic_cache by_layer = make(spec);
    for (std::size_t l = 0; l < shape().layers; ++l) {
        const std::vector<unsigned char> layer = kvc::save_layer(original, l);
        kvc::load_layer(by_layer, l, layer.data(), layer.size());
    }
    EXPECT_EQ(held(original), held(from_memory));
    EXPECT_TRUE(kvc::save_cache(from_memory) == bytes) << "a loaded cache saves to other bytes";
    EXPECT_TRUE(kvc::save_cache(from_stream) == bytes);
    EXPECT_TRUE(kvc::save_cache(by_layer) == bytes);

    const std::vector<float> want = rest(original);
    EXPECT_TRUE(same_bits(want, rest(from_memory))) << "outputs after a load from memory differ";
    EXPECT_TRUE(same_bits(want, rest(from_stream))) << "outputs after a load from a stream differ";
    EXPECT_TRUE(same_bits(want, rest(by_layer))) << "outputs after a layer-by-layer load differ";
    EXPECT_EQ(held(original), held(from_memory));
}

TEST(DynamicSerialization, EveryRegistryMethodContinuesBitForBitAfterALoad) {
    for (const std::string& spec : every_method()) round_trip(spec);
}

TEST(DynamicSerialization, CompositionsContinueBitForBitAfterALoad) {
    for (const char* spec : compositions) round_trip(spec);
}

// The run-time policies all share one type each, so the header names what
// they hold: a file of another codec, scorer, selector or merger is refused
// naming the family, as are another budget and another calibration; the
// destination is left as it was.
TEST(DynamicSerialization, AnotherCompositionIsRefusedNamingWhatDiffers) {
    kvc::dynamic_cache source = make("q4_0 + snapkv:0.25");
    first_part(source);
    const std::vector<unsigned char> bytes = kvc::save_cache(source);
    const struct {
        const char* spec;
        const char* named;
    } others[] = {{"q8_0 + snapkv:0.25", "quantization policy"},
                  {"q4_0 + h2o:0.25", "eviction policy"},
                  {"q4_0 + adakv:0.25", "eviction policy"},
                  {"q4_0 + snapkv:0.25 + compensation", "merging policy"},
                  {"q4_0 + snapkv:0.5", "keep.keep_ratio"},
                  {"q4_0", "eviction policy"},
                  {"none:f16", "eviction policy"}};
    for (const auto& other : others) {
        SCOPED_TRACE(other.spec);
        kvc::dynamic_cache destination = make(other.spec);
        first_part(destination);
        const std::vector<unsigned char> before = kvc::save_cache(destination);
        const std::string message =
            kvc_test::error_of([&] { kvc::load_cache(destination, bytes.data(), bytes.size()); });
        EXPECT_NE(std::string::npos, message.find(other.named)) << message;
        EXPECT_TRUE(kvc::save_cache(destination) == before) << "a refused load changed the cache";
    }
    // Two calibrations of one codec: the same types, other tables.
    kvc::cache_options other_calibration = options();
    for (kvc::calibration::tensor& t : other_calibration.artifacts["cq:c4b8"].tensors)
        if (t.name == "value_codebooks") t.values.front() += 1.0f;
    kvc::dynamic_cache calibrated = make("cq:c4b8");
    first_part(calibrated);
    const std::vector<unsigned char> cq_bytes = kvc::save_cache(calibrated);
    kvc::dynamic_cache recalibrated = kvc::make_cache(shape(), "cq:c4b8", other_calibration);
    const std::string message =
        kvc_test::error_of([&] { kvc::load_cache(recalibrated, cq_bytes.data(), cq_bytes.size()); });
    EXPECT_NE(std::string::npos, message.find("another calibration")) << message;
}

// A static cache's file and a run-time cache's differ (the run-time
// policies' identity and columns): each is refused by the other.
TEST(DynamicSerialization, StaticAndRunTimeFilesAreNotInterchangeable) {
    kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::q4_0, kvc::project::none> fixed(
        shape(), kvc::evict::snapkv(kvc::evict::budget::ratio(0.25)));
    (void)kvc_test::prompt_then_decode(fixed, shape(), 96, 48, 4, 5);
    kvc::dynamic_cache chosen = make("q4_0 + snapkv:0.25");
    first_part(chosen);
    const std::vector<unsigned char> static_bytes = kvc::save_cache(fixed), dynamic_bytes = kvc::save_cache(chosen);
    const std::vector<unsigned char> chosen_before = dynamic_bytes, fixed_before = static_bytes;
    EXPECT_THROW(kvc::load_cache(chosen, static_bytes.data(), static_bytes.size()), kvc::error);
    EXPECT_THROW(kvc::load_cache(fixed, dynamic_bytes.data(), dynamic_bytes.size()), kvc::error);
    EXPECT_TRUE(kvc::save_cache(chosen) == chosen_before);
    EXPECT_TRUE(kvc::save_cache(fixed) == fixed_before);
}

// Damaged bytes: a truncation at every length through the header and then
// every 241st, and a flipped bit in every 7th byte of the header and then
// every 241st, are refused with kvc::error and change nothing (the CRCs and
// the consistency checks of the held stores, reached through any_store).
TEST(DynamicSerialization, DamagedBytesAreRefusedAndChangeNothing) {
    for (const char* spec : {"kivi:2 + h2o:0.5", "pca", "loki"}) {
        SCOPED_TRACE(spec);
        kvc::dynamic_cache source = make(spec);
        first_part(source);
        const std::vector<unsigned char> bytes = kvc::save_cache(source);
        kvc::dynamic_cache destination = make(spec);
        const std::vector<unsigned char> before = kvc::save_cache(destination);
        for (std::size_t n = 0; n < bytes.size(); n += n < 600 ? 1 : 241) {
            EXPECT_THROW(kvc::load_cache(destination, bytes.data(), n), kvc::error) << n << " bytes";
            std::istringstream in(std::string(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n)));
            EXPECT_THROW(kvc::load_cache(destination, in), kvc::error) << n << " bytes from a stream";
        }
        for (std::size_t i = 0; i < bytes.size(); i += i < 600 ? 7 : 241) {
            std::vector<unsigned char> damaged = bytes;
            damaged[i] ^= 0x10;
            EXPECT_THROW(kvc::load_cache(destination, damaged.data(), damaged.size()), kvc::error) << "byte " << i;
        }
        EXPECT_TRUE(kvc::save_cache(destination) == before) << "a refused load changed the cache";
    }
}

} // namespace
