// bench/main.cpp -- kvc_bench's entry point.
//
// Order matters: the single-thread read bandwidth is measured first, on an
// otherwise idle process, and every attention benchmark reports its bytes/s as
// a fraction of it. Then the benchmarks are registered and run as usual; all
// Google Benchmark flags work (--benchmark_filter, --benchmark_format=json,
// --benchmark_out=..., --benchmark_repetitions, ...).
//
// Own flag (removed before Google Benchmark sees the arguments):
//   --kvc_read_buffer_mib=N   size of the read-bandwidth buffer (default 1024;
//                             keep it far above the last-level cache)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include <benchmark/benchmark.h>

#include "bench_common.hpp"
#include "kvc/kernels/arch.hpp"
#include "kvc/kernels/dispatch.hpp"

namespace {

constexpr int read_repetitions = 5;

std::string cpu_model() {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpuinfo, line)) {
        if (line.rfind("model name", 0) == 0) {
            const std::size_t colon = line.find(':');
            if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
        }
    }
    return "unknown";
}

std::string compiler() {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return "unknown";
#endif
}

// Takes --kvc_read_buffer_mib=N out of argv; returns the buffer size in bytes.
std::size_t take_read_buffer_flag(int& argc, char** argv) {
    static const char flag[] = "--kvc_read_buffer_mib=";
    std::size_t mib = 1024;
    int kept = 1;
    for (int i = 1; i < argc; ++i) {
        if (std::strncmp(argv[i], flag, sizeof(flag) - 1) == 0) {
            mib = std::strtoull(argv[i] + sizeof(flag) - 1, nullptr, 10);
            if (mib == 0) mib = 1;
        } else {
            argv[kept++] = argv[i];
        }
    }
    argc = kept;
    argv[argc] = nullptr;
    return mib << 20;
}

bool asks_for_list(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--benchmark_list_tests" || arg == "--benchmark_list_tests=true" ||
            arg == "--benchmark_list_tests=1")
            return true;
    }
    return false;
}

} // namespace

int main(int argc, char** argv) {
    const std::size_t read_buffer_bytes = take_read_buffer_flag(argc, argv);
    const bool listing_only = asks_for_list(argc, argv);
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

    // Listing the benchmarks needs no measurement (a 1 GiB pass set takes seconds).
    if (!listing_only) kvc_bench::measure_single_thread_read_bandwidth(read_buffer_bytes, read_repetitions);
    const kvc_bench::read_bandwidth_result& bandwidth = kvc_bench::single_thread_read_bandwidth();
    if (!listing_only)
        std::fprintf(stderr, "kvc_bench: single-thread read bandwidth %.2f GB/s (%s, %zu MiB buffer, best of %d)\n",
                     bandwidth.bytes_per_second / 1e9, bandwidth.kernel.c_str(), bandwidth.buffer_bytes >> 20,
                     read_repetitions);

    kvc::arch_id archs[kvc::arch_count];
    const int arch_total = kvc::kernels::available_archs(archs);
    std::string arch_list;
    for (int i = 0; i < arch_total; ++i) arch_list += std::string(i ? "," : "") + kvc::name_of(archs[i]);

    char rate[64];
    std::snprintf(rate, sizeof rate, "%.6e", bandwidth.bytes_per_second);
    benchmark::AddCustomContext("kvc_read_bandwidth_bytes_per_second", rate);
    benchmark::AddCustomContext("kvc_read_kernel", bandwidth.kernel);
    benchmark::AddCustomContext("kvc_read_variants", bandwidth.variants);
    benchmark::AddCustomContext("kvc_read_buffer_bytes", std::to_string(bandwidth.buffer_bytes));
    benchmark::AddCustomContext("kvc_default_arch", kvc::name_of(kvc::active_arch()));
    benchmark::AddCustomContext("kvc_available_archs", arch_list);
    benchmark::AddCustomContext("kvc_cpu_model", cpu_model());
    benchmark::AddCustomContext("kvc_compiler", compiler());

    kvc_bench::register_read_bandwidth_benchmarks(read_buffer_bytes);
    kvc_bench::register_decode_benchmarks();
    kvc_bench::register_eviction_benchmarks();
    kvc_bench::register_read_bandwidth_end_benchmark(read_buffer_bytes); // last: measures the drift
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
