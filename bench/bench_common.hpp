// bench/bench_common.hpp -- what kvc_bench's translation units share.
//
// main() measures the single-thread read bandwidth once, before any benchmark
// runs, and keeps it here; every attention benchmark divides its own bytes/s
// by it (counter `bw_fraction`). Benchmarks are registered from main() after
// that measurement rather than by static initialisers, so the order of
// registration (and of the output) is the order written in the register_*
// functions.
#pragma once

#include <cstddef>
#include <string>

namespace kvc_bench {

// Best single-thread read bandwidth measured at startup, bytes per second.
struct read_bandwidth_result {
    double bytes_per_second = 0.0;
    std::string kernel;        // which read loop won, e.g. "avx512 x2 streams"
    std::string variants;      // every loop tried and its best rate, for the report
    std::size_t buffer_bytes = 0;
};

const read_bandwidth_result& single_thread_read_bandwidth() noexcept;

// Measures the read bandwidth (best of `repetitions` passes over each read
// loop variant) and stores the result; called once from main().
void measure_single_thread_read_bandwidth(std::size_t buffer_bytes, int repetitions);

// buffer_bytes: the size measure_single_thread_read_bandwidth was given.
void register_read_bandwidth_benchmarks(std::size_t buffer_bytes);
void register_decode_benchmarks();
// Registered last: the same single-thread read measured again after every
// other benchmark, so the report can tell when the machine's memory bandwidth
// drifted during the run (it does on shared VMs) and bw_fraction with it.
void register_read_bandwidth_end_benchmark(std::size_t buffer_bytes);
void register_eviction_benchmarks();

} // namespace kvc_bench
