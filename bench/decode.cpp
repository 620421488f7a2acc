// bench/decode.cpp -- decode attention over kvc::full_cache, the baseline
// every compressed cache is measured against.
//
// What one iteration is. One decode step of one layer: cache.attend(layer, q,
// out) for every query head of the layer (8 KV heads, GQA group 1 or 4). It
// reads every stored key and value row of the layer once, so the bytes it must
// move are tokens x kv_heads x head_dim x 2 (K and V) x element size, which is
// what SetBytesProcessed reports and what `bw_fraction` compares with the
// single-thread read bandwidth main() measured.
//
// Cold caches, as in a real engine. Between two visits of the same layer an
// engine touches every other layer, so a layer's K/V is never in the CPU
// caches when its turn comes. The fixture therefore holds as many identical
// layers as needed for a working set of at least 128 MiB (4x the reference
// machine's 32 MiB L3; at least 2 layers, an even count) and the iterations
// walk through them round robin. At 1K tokens a layer is 2-8 MiB and would
// otherwise be served from L2/L3 and report more than the memory bandwidth.
// `kv_bytes` is the memory of one layer (cache.bytes() / layers, exact since
// every layer has the same shape) and `layers` says how many the fixture held.
// BM_full_decode_hot is the diagnostic opposite: 1K tokens, one layer attended
// every iteration, so K/V come from L2/L3 and the row shows the kernels'
// arithmetic ceiling (its bw_fraction may exceed 1).
//
// Two threads. The `threads:2` rows use Google Benchmark's own Threads(2):
// both threads attend on the same full_cache at once, thread 0 on layers 0, 2,
// 4, ... and thread 1 on layers 1, 3, 5, ... (full_cache allows concurrent
// calls on different layers). No per-iteration fork/join: the threads run
// independent streams of attend() calls, which is how two cores share decode
// work of a batch of sequences or of a layer's heads, and what bounds the
// aggregate bandwidth of two cores. Time is wall time; the reported time per
// iteration is wall time / (iterations of both threads), i.e. amortised per
// attend() call, and bytes/s and bw_fraction are the two threads' aggregate.
// bw_fraction stays relative to the *single-thread* read bandwidth, so a value
// above 1 means the second core bought bandwidth one core cannot reach.
//
// Instruction-set sweep. BM_isa_sweep repeats one shape (16K tokens, dim 128,
// GQA 4; fp16 is the project target, fp32 and bf16 for comparison) on every
// instruction set this CPU and build support, switched with
// kvc::set_active_arch and restored after. `vs_scalar` is the scalar
// reference's time per call, measured once per shape in this process (the
// fastest of at least 5 calls and 1 s, outside any timed loop), divided by
// this row's mean time per call (steady_clock around the timed loop).
//
// Setup (allocation, random fill) happens outside the timed loop and once per
// shape: the fixture is kept until a benchmark with another shape asks, so
// Google Benchmark's repeated calls of one benchmark (iteration estimation,
// repetitions, the threads:1 and threads:2 rows) reuse it. The cache reserves
// exactly `tokens` per layer before the fill, so it holds no spare capacity.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/kernels/arch.hpp"
#include "kvc/kernels/dispatch.hpp"
#include "kvc/view/kv_view.hpp"

namespace kvc_bench {
namespace {

constexpr std::size_t kv_heads = 8;
constexpr std::size_t min_working_set_bytes = std::size_t{128} << 20;
constexpr std::size_t fill_chunk_tokens = 256;

struct decode_shape {
    kvc::dtype storage = kvc::dtype::f16;
    std::size_t tokens = 0;
    std::size_t dim = 0;
    std::size_t group = 1; // query heads per KV head
    bool hot = false;      // one layer, visited every iteration: served from the CPU caches

    friend bool operator==(const decode_shape& a, const decode_shape& b) noexcept {
        return a.storage == b.storage && a.tokens == b.tokens && a.dim == b.dim && a.group == b.group &&
               a.hot == b.hot;
    }

    std::size_t query_heads() const noexcept { return kv_heads * group; }
    // The K and V bytes one attend() call over one layer must read.
    std::size_t read_bytes_per_call() const noexcept { return tokens * kv_heads * dim * 2 * kvc::size_of(storage); }

    std::string name() const {
        return std::string("dtype:") + kvc::name_of(storage) + "/tokens:" + std::to_string(tokens) +
               "/dim:" + std::to_string(dim) + "/group:" + std::to_string(group);
    }
};

// Cheap deterministic noise in [-1, 1): the fill of a 64K-token cache is a
// quarter of a billion floats, too many for <random>'s distributions.
class noise {
public:
    explicit noise(std::uint64_t seed) noexcept : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
    float next() noexcept {
        state_ ^= state_ << 13;
        state_ ^= state_ >> 7;
        state_ ^= state_ << 17;
        return static_cast<float>(static_cast<std::int32_t>(state_ >> 32)) * 0x1p-31f;
    }

private:
    std::uint64_t state_;
};

struct decode_fixture {
    decode_fixture(const decode_shape& s, const kvc::cache_config& config)
        : shape(s), layers(config.layers), cache(config) {}

    decode_shape shape;
    std::size_t layers;
    kvc::full_cache cache;
    std::vector<float> queries; // [query_heads][dim]
    std::size_t bytes_per_layer = 0;
};

std::unique_ptr<decode_fixture> build_fixture(const decode_shape& shape) {
    const std::size_t layer_bytes = shape.read_bytes_per_call();
    std::size_t layers = std::max<std::size_t>(2, (min_working_set_bytes + layer_bytes - 1) / layer_bytes);
    layers += layers % 2;
    if (shape.hot) layers = 1;

    kvc::cache_config config;
    config.layers = layers;
    config.kv_heads = kv_heads;
    config.query_heads = shape.query_heads();
    config.head_dim = shape.dim;
    config.storage = shape.storage;
    auto fixture = std::make_unique<decode_fixture>(shape, config);
    kvc::full_cache& cache = fixture->cache;
    cache.reserve(shape.tokens);

    noise rng(shape.tokens * 131 + shape.dim * 7 + shape.group);
    std::vector<float> keys(fill_chunk_tokens * kv_heads * shape.dim);
    std::vector<float> values(keys.size());
    for (std::size_t layer = 0; layer < layers; ++layer) {
        for (std::size_t t0 = 0; t0 < shape.tokens; t0 += fill_chunk_tokens) {
            const std::size_t count = std::min(fill_chunk_tokens, shape.tokens - t0);
            for (std::size_t i = 0; i < count * kv_heads * shape.dim; ++i) {
                keys[i] = rng.next();
                values[i] = rng.next();
            }
            const kvc::kv_view<const float> key_view(keys.data(), count, kv_heads, shape.dim);
            const kvc::kv_view<const float> value_view(values.data(), count, kv_heads, shape.dim);
            cache.append(layer, key_view, value_view, static_cast<std::int64_t>(t0));
        }
    }
    fixture->queries.resize(shape.query_heads() * shape.dim);
    for (float& q : fixture->queries) q = rng.next();
    fixture->bytes_per_layer = cache.bytes() / layers;
    return fixture;
}

// The fixture of the last shape asked for; built on first use, shared by the
// threads of one benchmark, dropped when another shape is asked for.
std::shared_ptr<const decode_fixture> fixture_for(const decode_shape& shape) {
    static std::mutex mutex;
    static std::shared_ptr<const decode_fixture> last;
    std::lock_guard<std::mutex> lock(mutex);
    if (last && last->shape == shape) return last;
    last.reset(); // free the previous cache before allocating the next
    last = build_fixture(shape);
    return last;
}

// Switches kvc's kernels for a scope.
class arch_scope {
public:
    explicit arch_scope(kvc::arch_id arch) : saved_(kvc::active_arch()) { kvc::set_active_arch(arch); }
    ~arch_scope() { kvc::set_active_arch(saved_); }
    arch_scope(const arch_scope&) = delete;
    arch_scope& operator=(const arch_scope&) = delete;

private:
    kvc::arch_id saved_;
};

// Seconds per attend() call of the scalar reference on this fixture's shape,
// measured once per shape per process: the fastest of at least 5 calls and
// 1 s, so that another process stealing the CPU cannot inflate vs_scalar.
double scalar_seconds_per_call(const decode_fixture& fixture) {
    static std::mutex mutex;
    static std::vector<std::pair<decode_shape, double>> measured;
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& entry : measured)
        if (entry.first == fixture.shape) return entry.second;

    arch_scope scalar(kvc::arch_id::scalar);
    std::vector<float> out(fixture.shape.query_heads() * fixture.shape.dim);
    fixture.cache.attend(0, fixture.queries.data(), out.data()); // warm-up
    std::size_t calls = 0, layer = 0;
    double total = 0.0, fastest = 1e30;
    while (calls < 5 || total < 1.0) {
        const auto start = std::chrono::steady_clock::now();
        fixture.cache.attend(layer, fixture.queries.data(), out.data());
        benchmark::DoNotOptimize(out.data());
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        fastest = std::min(fastest, seconds);
        total += seconds;
        layer = layer + 1 == fixture.layers ? 0 : layer + 1;
        ++calls;
    }
    measured.emplace_back(fixture.shape, fastest);
    return fastest;
}

// The timed loop: one attend() per iteration, this thread's layers round robin.
void attend_loop(benchmark::State& state, const decode_fixture& fixture, std::vector<float>& out) {
    const std::size_t stride = static_cast<std::size_t>(state.threads());
    const std::size_t first = static_cast<std::size_t>(state.thread_index()) % fixture.layers;
    std::size_t layer = first;
    for (auto _ : state) {
        fixture.cache.attend(layer, fixture.queries.data(), out.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
        layer += stride;
        if (layer >= fixture.layers) layer = first;
    }
}

void report(benchmark::State& state, const decode_fixture& fixture) {
    const double bytes = static_cast<double>(state.iterations()) *
                         static_cast<double>(fixture.shape.read_bytes_per_call());
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    // Summed over threads, then divided by the (wall) time: the aggregate fraction.
    state.counters["bw_fraction"] = benchmark::Counter(
        bytes / single_thread_read_bandwidth().bytes_per_second, benchmark::Counter::kIsRate);
    state.counters["kv_bytes"] = benchmark::Counter(static_cast<double>(fixture.bytes_per_layer),
                                                    benchmark::Counter::kAvgThreads, benchmark::Counter::kIs1024);
    state.counters["layers"] =
        benchmark::Counter(static_cast<double>(fixture.layers), benchmark::Counter::kAvgThreads);
    state.SetLabel(kvc::name_of(kvc::active_arch()));
}

void BM_full_decode(benchmark::State& state, decode_shape shape) {
    const std::shared_ptr<const decode_fixture> fixture = fixture_for(shape);
    std::vector<float> out(shape.query_heads() * shape.dim);
    attend_loop(state, *fixture, out);
    report(state, *fixture);
}

void BM_isa_sweep(benchmark::State& state, decode_shape shape, kvc::arch_id arch) {
    const std::shared_ptr<const decode_fixture> fixture = fixture_for(shape);
    const double scalar_seconds = scalar_seconds_per_call(*fixture);
    arch_scope scope(arch);
    std::vector<float> out(shape.query_heads() * shape.dim);
    const auto start = std::chrono::steady_clock::now();
    attend_loop(state, *fixture, out);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    report(state, *fixture);
    state.counters["vs_scalar"] = scalar_seconds / (seconds / static_cast<double>(state.iterations()));
}

} // namespace

void register_decode_benchmarks() {
    const kvc::dtype storages[] = {kvc::dtype::f32, kvc::dtype::f16, kvc::dtype::bf16};
    const std::size_t dims[] = {64, 128};
    const std::size_t groups[] = {1, 4};
    const std::size_t token_counts[] = {1024, 4096, 16384, 65536};

    for (kvc::dtype storage : storages)
        for (std::size_t dim : dims)
            for (std::size_t group : groups)
                for (std::size_t tokens : token_counts) {
                    const decode_shape shape{storage, tokens, dim, group};
                    benchmark::RegisterBenchmark(("BM_full_decode/" + shape.name()).c_str(), &BM_full_decode, shape)
                        ->Threads(1)
                        ->Threads(2)
                        ->UseRealTime()
                        ->Unit(benchmark::kMicrosecond);
                }

    // Diagnostic: the same call with the layer resident in L2/L3 (one layer,
    // every iteration), i.e. the kernels' arithmetic ceiling without DRAM. A
    // cold row far below its hot row is waiting for memory; a cold row close
    // to its hot row is bound by the arithmetic.
    for (kvc::dtype storage : storages)
        for (std::size_t dim : dims)
            for (std::size_t group : groups) {
                decode_shape shape{storage, 1024, dim, group};
                shape.hot = true;
                benchmark::RegisterBenchmark(("BM_full_decode_hot/" + shape.name()).c_str(), &BM_full_decode, shape)
                    ->UseRealTime()
                    ->Unit(benchmark::kMicrosecond);
            }

    kvc::arch_id archs[kvc::arch_count];
    const int arch_total = kvc::kernels::available_archs(archs);
    const kvc::dtype sweep_storages[] = {kvc::dtype::f16, kvc::dtype::f32, kvc::dtype::bf16};
    for (kvc::dtype storage : sweep_storages) {
        const decode_shape shape{storage, 16384, 128, 4};
        for (int i = 0; i < arch_total; ++i)
            benchmark::RegisterBenchmark(
                ("BM_isa_sweep/" + shape.name() + "/arch:" + kvc::name_of(archs[i])).c_str(), &BM_isa_sweep, shape,
                archs[i])
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
    }
}

} // namespace kvc_bench
