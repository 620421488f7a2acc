// Policy parameters at their limits (issue 19): budgets of SIZE_MAX tokens,
// sinks + window that wrap, an interval meaning "never", RoPE that does not
// fit the head, positions far apart, calibration tables of the wrong size.
// Each is either refused with kvc::error or behaves as its words say.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "../cache/cache_test_util.hpp"
#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/quantization/kvquant.hpp"

// The largest single request to operator new while `tracking` is set: the
// size of the biggest table a selector builds. (This executable replaces the
// global operator new; nothing else here depends on it.)
namespace {
bool tracking = false;
std::size_t largest = 0;
} // namespace

void* operator new(std::size_t bytes, const std::nothrow_t&) noexcept {
    if (tracking && bytes > largest) largest = bytes;
    return std::malloc(bytes ? bytes : 1);
}
// std::stable_sort's buffer comes from the nothrow form: both must pair with the free() below.
void* operator new(std::size_t bytes) {
    if (void* p = operator new(bytes, std::nothrow)) return p;
    throw std::bad_alloc();
}
// Out of line: inlined into std::allocator, GCC 12 pairs free() with the
// built-in meaning of operator new and warns (-Wmismatched-new-delete).
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

namespace evict = kvc::evict;
using kvc_test::error_of;

kvc::cache_config shape(std::size_t layers, std::size_t kv_heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads;
    c.head_dim = dim;
    return c;
}

// Issue 19, defect 3: target() converted ceil(double(SIZE_MAX)) = 2^64 back to size_t.
TEST(Budget, ABudgetOfSizeMaxTokensKeepsEverythingHeld) {
    const evict::budget b = evict::budget::absolute(SIZE_MAX, 4, 16);
    EXPECT_NO_THROW(b.validate());
    EXPECT_EQ(b.target(100, 100), 100u);
    EXPECT_EQ(b.target(7, 7), 7u);
    // Pyramid factors up to 2 - 1/beta scale it further past 2^64.
    const evict::budget pyramid = b.with_layers(evict::layer_allocation::pyramid(20.0));
    EXPECT_EQ(pyramid.target(50, 50, 0, 4), 50u);
    // What a byte budget buys arrives the same way.
    const evict::budget bytes = evict::budget::in_bytes(SIZE_MAX, 4, 16);
    EXPECT_EQ(bytes.target(60, 60, 0, 1, SIZE_MAX), 60u);
}

// Issue 19, defect 8: sinks = SIZE_MAX, window = 1 summed to 0 and passed.
TEST(Budget, SinksPlusWindowThatDoNotFitAreRejected) {
    const std::string absolute = error_of([] { evict::budget::absolute(10, SIZE_MAX, 1).validate(); });
    EXPECT_NE(absolute.find("evict::budget: expected sinks + window to fit in std::size_t, got 18446744073709551615 + 1"),
              std::string::npos)
        << absolute;
    // Ratio budgets add them too (target() keeps at least sinks + window).
    EXPECT_THROW(evict::budget::ratio(0.5, SIZE_MAX, 1).validate(), kvc::error);
    EXPECT_NO_THROW(evict::budget::ratio(0.5, SIZE_MAX - 1, 1).validate());
}

// The sinks are positions [first, first + sinks): with more sinks than
// int64 counts, first + sinks wrapped negative and no token was a sink.
TEST(Budget, EveryTokenInsideAHugeSinkCountIsProtected) {
    evict::budget b = evict::budget::ratio(0.5, std::size_t{1} << 63, 0);
    ASSERT_NO_THROW(b.validate());
    std::vector<std::int32_t> positions(10);
    std::vector<float> scores(10, 1.0f);
    for (std::size_t t = 0; t < 10; ++t) positions[t] = static_cast<std::int32_t>(100 + t);
    evict::head_candidates head;
    head.scores = scores.data();
    head.positions = positions.data();
    head.held = 10;
    head.target = 10;
    std::vector<char> chosen;
    EXPECT_EQ(evict::selection::protect(head, b, 100, 10, chosen), 10u);
    EXPECT_EQ(chosen, std::vector<char>(10, 1));
}

// Issue 19, defect 16 (part): absolute(0) and in_bytes(0) fell back to keep_ratio 1.
TEST(Budget, AbsoluteOrByteBudgetsOfZeroAreRejected) {
    EXPECT_NE(error_of([] { evict::budget::absolute(0); }).find("evict::budget::absolute: expected tokens >= 1"),
              std::string::npos);
    EXPECT_NE(error_of([] { evict::budget::in_bytes(0); }).find("evict::budget::in_bytes: expected bytes >= 1"),
              std::string::npos);
}

// What a byte budget buys per head, without multiplying heads by bytes per token.
TEST(Budget, TokensForBytesDividesWithoutWrapping) {
    const evict::budget b = evict::budget::in_bytes(1000);
    EXPECT_EQ(b.tokens_for_bytes(4, 10), 25u);             // 1000 / 40
    EXPECT_EQ(b.tokens_for_bytes(3, 7), 1000u / 21u);      // floor, as one division
    const evict::budget big = evict::budget::in_bytes(SIZE_MAX);
    EXPECT_EQ(big.tokens_for_bytes(std::size_t{1} << 40, std::size_t{1} << 40), 0u); // the product would wrap to 0
    EXPECT_EQ(big.tokens_for_bytes(std::size_t{1} << 32, std::size_t{1} << 16), SIZE_MAX >> 48);
}

// Issue 19, defect 5: interval = SIZE_MAX ("never") was added to the target and wrapped.
TEST(Schedule, DueComparesTheExcessOverTheTarget) {
    evict::schedule never;
    never.interval = SIZE_MAX;
    EXPECT_FALSE(never.due(1000, 10));
    EXPECT_FALSE(never.due(SIZE_MAX, 0));
    evict::schedule every4;
    every4.interval = 4;
    EXPECT_FALSE(every4.due(14, 10));
    EXPECT_TRUE(every4.due(15, 10));
    EXPECT_FALSE(every4.due(3, 10)); // under the target
    evict::schedule off;             // interval 0: no decode-time compression
    EXPECT_FALSE(off.due(1000, 0));
}

// Issue 19, defect 2: re-rotation decodes a key into a stack row of head_dim
// floats and rotates rotary_dims / 2 pairs of it.
TEST(Rerotation, RotaryDimsMustFitTheHead) {
    const kvc::cache_config c = shape(1, 1, 64);
    evict::knorm policy(evict::budget::ratio(0.5));
    policy.rerotate.enabled = true;
    policy.rerotate.rope.rotary_dims = 4096;
    const std::string message = error_of([&] { policy.validate(c); });
    EXPECT_NE(message.find("rotary_dims even and at most head_dim 64"), std::string::npos) << message;
    policy.rerotate.rope.rotary_dims = 33;
    EXPECT_THROW(policy.validate(c), kvc::error);
    policy.rerotate.rope.rotary_dims = 32;
    EXPECT_NO_THROW(policy.validate(c));
    policy.rerotate.rope.rotary_dims = 0; // all of head_dim
    EXPECT_NO_THROW(policy.validate(c));
    policy.rerotate.enabled = false; // not used: not checked
    policy.rerotate.rope.rotary_dims = 4096;
    EXPECT_NO_THROW(policy.validate(c));
}

// Issue 19, defect 15: ChunkKV sized its tables by the span of positions.
// 33 tokens, the last at position 10^6: the tables follow the 33 tokens.
TEST(ChunkKV, TablesFollowTheTokensHeldNotThePositionSpan) {
    std::vector<std::int32_t> positions(33);
    std::vector<float> scores(33, 0.1f);
    for (std::size_t t = 0; t < 32; ++t) positions[t] = static_cast<std::int32_t>(t);
    positions[32] = 1000000;
    for (std::size_t t = 12; t < 16; ++t) scores[t] = 5.0f; // chunk 3 of 4 positions
    const evict::budget b = evict::budget::absolute(7, 2, 1);
    evict::layer_candidates layer;
    layer.keep = &b;
    evict::head_candidates head;
    head.scores = scores.data();
    head.positions = positions.data();
    head.held = 33;
    head.target = 7;
    layer.heads = {head};
    evict::chunkkv selector;
    selector.chunk = 4;
    std::vector<std::vector<std::uint32_t>> keep;
    largest = 0;
    tracking = true;
    selector.select(layer, keep);
    tracking = false;
    // Sinks 0, 1 and the window (the token at 10^6), then the best chunk that fits: 12-15.
    ASSERT_EQ(keep.size(), 1u);
    EXPECT_EQ(keep[0], (std::vector<std::uint32_t>{0, 1, 12, 13, 14, 15, 32}));
    EXPECT_LE(largest, 33u * 64u) << "a table sized by the 250001 chunk ids the positions span";
}

// Issue 19, defect 16 (part): Q-Filters' table is read at (layer * kv_heads + head) * dim.
TEST(QFilter, AFilterTableOfTheWrongSizeIsRejected) {
    evict::score::qfilter q;
    q.layers = 1;
    q.kv_heads = 2;
    q.dim = 8;
    q.filters.assign(8, 1.0f); // one head's worth
    const std::string message = error_of([&] { q.validate(shape(1, 2, 8)); });
    EXPECT_NE(message.find("expected 16 filter values"), std::string::npos) << message;
    q.filters.assign(16, 1.0f);
    EXPECT_NO_THROW(q.validate(shape(1, 2, 8)));
    q.filters[3] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(q.validate(shape(1, 2, 8)), kvc::error);
}

// Issue 19, defect 16 (part): KVQuant's sink count was taken as given.
TEST(KVQuant, TheSinkCountIsBounded) {
    namespace cal = kvc::calibration;
    cal::artifact a;
    a.kind = "kvquant";
    a.tensors = {{"bits", {1}, {2.0f}},
                 {"outlier_fraction", {1}, {0.01f}},
                 {"key_lower", {1, 1, 8}, std::vector<float>(8, -1.0f)},
                 {"key_upper", {1, 1, 8}, std::vector<float>(8, 1.0f)},
                 {"key_codebook", {1, 4}, {-0.75f, -0.25f, 0.25f, 0.75f}},
                 {"value_codebook", {1, 4}, {-0.75f, -0.25f, 0.25f, 0.75f}}};
    const kvc::cache_config c = shape(1, 1, 8);
    const std::string message = error_of([&] { kvc::quant::kvquant(a, {}, std::size_t{1} << 40).validate(c); });
    EXPECT_NE(message.find("kvc::quant::kvquant: expected sink_tokens at most 1024"), std::string::npos) << message;
    EXPECT_NO_THROW(kvc::quant::kvquant(a, {}, 4).validate(c));
    EXPECT_NO_THROW(kvc::quant::kvquant(a, {}, 0).validate(c));
}

// LagKV adds its sinks to an int64 position: more than int32 positions hold is refused.
TEST(LagKV, ASinkCountBeyondThePositionRangeIsRejected) {
    evict::score::lagkv scorer;
    scorer.sinks = SIZE_MAX;
    EXPECT_THROW(scorer.validate(), kvc::error);
    scorer.sinks = 4;
    EXPECT_NO_THROW(scorer.validate());
}

} // namespace
