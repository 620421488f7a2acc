// bench/read_bandwidth.cpp -- the machine's read bandwidth, the yardstick of
// every attention benchmark.
//
// Decode attention over an uncompressed cache reads every key and value row
// once and does little arithmetic per byte, so its ceiling is the rate at which
// one core can stream memory. We measure that ceiling with the fastest plain
// read loop we can write, over a buffer far larger than the caches (1 GiB vs
// 32 MiB of L3 on the reference machine), and report attention throughput as
// a fraction of it.
//
// The loops are integer sums: integer addition is associative, so the compiler
// vectorises them at -O3 without -ffast-math. Each is compiled three times,
// for baseline x86-64 (SSE2), AVX2 and AVX-512 (by target attribute, so the
// binary still runs anywhere; a variant runs only when kvc's CPU detection says
// the CPU has it), and in two shapes: one sequential stream, and two streams
// (the two halves of the buffer read in step), because the attention kernels
// alternate between a block of keys and a block of values and two streams can
// engage more of the hardware prefetcher. The fastest variant wins; a too-slow
// yardstick would flatter the attention numbers, so we take the best.
//
// The buffer comes from plain operator new (64-byte aligned), as the cache's
// own storage does through kvc's default memory resource, so both see the same
// kind of pages (no explicit huge pages for one and not the other).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/kernels/arch.hpp"

namespace kvc_bench {
namespace {

using word = std::uint64_t;
using read_loop = word (*)(const word* data, std::size_t words) noexcept;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVC_BENCH_TARGET(isa) __attribute__((target(isa), noinline))
#else
#define KVC_BENCH_TARGET(isa) __attribute__((noinline))
#endif

// One stream: data[0], data[1], ...
#define KVC_BENCH_SUM_ONE_STREAM(name, attributes)                  \
    attributes word name(const word* data, std::size_t words) noexcept { \
        word sum = 0;                                                \
        for (std::size_t i = 0; i < words; ++i) sum += data[i];      \
        return sum;                                                  \
    }

// Two streams: the two halves of the buffer, read in step.
#define KVC_BENCH_SUM_TWO_STREAMS(name, attributes)                      \
    attributes word name(const word* data, std::size_t words) noexcept { \
        const std::size_t half = words / 2;                              \
        const word* second = data + half;                                \
        word a = 0, b = 0;                                               \
        for (std::size_t i = 0; i < half; ++i) {                         \
            a += data[i];                                                \
            b += second[i];                                              \
        }                                                                \
        for (std::size_t i = 2 * half; i < words; ++i) a += data[i];     \
        return a + b;                                                    \
    }

KVC_BENCH_SUM_ONE_STREAM(sum_one_stream_baseline, __attribute__((noinline)))
KVC_BENCH_SUM_TWO_STREAMS(sum_two_streams_baseline, __attribute__((noinline)))
#if defined(__x86_64__)
KVC_BENCH_SUM_ONE_STREAM(sum_one_stream_avx2, KVC_BENCH_TARGET("avx2"))
KVC_BENCH_SUM_TWO_STREAMS(sum_two_streams_avx2, KVC_BENCH_TARGET("avx2"))
KVC_BENCH_SUM_ONE_STREAM(sum_one_stream_avx512, KVC_BENCH_TARGET("avx512f,prefer-vector-width=512"))
KVC_BENCH_SUM_TWO_STREAMS(sum_two_streams_avx512, KVC_BENCH_TARGET("avx512f,prefer-vector-width=512"))
#endif

struct read_variant {
    const char* name;
    read_loop loop;
    bool available;
};

std::vector<read_variant> read_variants() {
    std::vector<read_variant> variants = {
        {"baseline x1 stream", &sum_one_stream_baseline, true},
        {"baseline x2 streams", &sum_two_streams_baseline, true},
    };
#if defined(__x86_64__)
    const kvc::cpu_features& cpu = kvc::cpu();
    variants.push_back({"avx2 x1 stream", &sum_one_stream_avx2, cpu.avx2});
    variants.push_back({"avx2 x2 streams", &sum_two_streams_avx2, cpu.avx2});
    variants.push_back({"avx512 x1 stream", &sum_one_stream_avx512, cpu.avx512});
    variants.push_back({"avx512 x2 streams", &sum_two_streams_avx512, cpu.avx512});
#endif
    return variants;
}

struct aligned_delete {
    void operator()(word* p) const noexcept { ::operator delete[](p, std::align_val_t{64}); }
};

// The buffer and the winning loop, kept for BM_read_bandwidth.
struct read_state {
    std::unique_ptr<word[], aligned_delete> buffer;
    std::size_t words = 0;
    read_loop best = nullptr;
    read_bandwidth_result result;
};

read_state& state() noexcept {
    static read_state s;
    return s;
}

double seconds_for_one_pass(read_loop loop, const word* data, std::size_t words) {
    const auto start = std::chrono::steady_clock::now();
    word sum = loop(data, words);
    benchmark::DoNotOptimize(sum);
    const auto stop = std::chrono::steady_clock::now();
    return std::chrono::duration<double>(stop - start).count();
}

void BM_read_bandwidth(benchmark::State& st) {
    const read_state& s = state();
    const std::size_t threads = static_cast<std::size_t>(st.threads());
    const std::size_t index = static_cast<std::size_t>(st.thread_index());
    // Each thread streams its own contiguous share of the buffer.
    const std::size_t share = s.words / threads;
    const word* data = s.buffer.get() + index * share;
    for (auto _ : st) {
        word sum = s.best(data, share);
        benchmark::DoNotOptimize(sum);
    }
    const double bytes = static_cast<double>(st.iterations()) * static_cast<double>(share * sizeof(word));
    st.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    st.counters["bw_fraction"] = benchmark::Counter(bytes / s.result.bytes_per_second, benchmark::Counter::kIsRate);
    st.SetLabel(s.result.kernel);
}

} // namespace

const read_bandwidth_result& single_thread_read_bandwidth() noexcept { return state().result; }

void measure_single_thread_read_bandwidth(std::size_t buffer_bytes, int repetitions) {
    read_state& s = state();
    s.words = buffer_bytes / sizeof(word);
    s.buffer.reset(static_cast<word*>(::operator new[](s.words * sizeof(word), std::align_val_t{64})));
    // Touch every page (and give the sums something to add) outside any timing.
    for (std::size_t i = 0; i < s.words; ++i) s.buffer[i] = i;

    double best_rate = 0.0;
    for (const read_variant& variant : read_variants()) {
        if (!variant.available) continue;
        seconds_for_one_pass(variant.loop, s.buffer.get(), s.words); // warm up: TLB, frequency
        double best_seconds = 1e30;
        for (int r = 0; r < repetitions; ++r)
            best_seconds = std::min(best_seconds, seconds_for_one_pass(variant.loop, s.buffer.get(), s.words));
        const double rate = static_cast<double>(s.words * sizeof(word)) / best_seconds;
        char line[96];
        std::snprintf(line, sizeof line, "%s%s %.2f GB/s", s.result.variants.empty() ? "" : "; ", variant.name,
                      rate / 1e9);
        s.result.variants += line;
        if (rate > best_rate) {
            best_rate = rate;
            s.best = variant.loop;
            s.result.kernel = variant.name;
        }
    }
    s.result.bytes_per_second = best_rate;
    s.result.buffer_bytes = s.words * sizeof(word);
}

void register_read_bandwidth_benchmarks(std::size_t buffer_bytes) {
    benchmark::RegisterBenchmark("BM_read_bandwidth", &BM_read_bandwidth)
        ->ArgName("MiB")
        ->Arg(static_cast<std::int64_t>(buffer_bytes >> 20))
        ->Threads(1)
        ->Threads(2)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
}

} // namespace kvc_bench
