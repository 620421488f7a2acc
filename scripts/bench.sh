#!/usr/bin/env bash
# Builds kvc_bench in Release, runs it, and regenerates docs/BENCHMARKS.md.
#
# Usage: scripts/bench.sh [kvc_bench arguments...]
#   scripts/bench.sh                                   # the whole suite (a few minutes on 2 cores)
#   scripts/bench.sh --benchmark_filter='dtype:f16'    # a subset (the report then covers only that)
#   scripts/bench.sh --benchmark_repetitions=5         # default 3; the report keeps the fastest
# Arguments go to kvc_bench unchanged: every Google Benchmark flag, and
# --kvc_read_buffer_mib=N (size of the read-bandwidth buffer, default 1024).
#
# Environment:
#   BUILD_DIR   build directory (default: build-bench)
#   BENCH_JSON  raw results (default: $BUILD_DIR/kvc_bench.json)
#   BENCH_DOC   generated report (default: docs/BENCHMARKS.md; set to "" to skip it)
#   KVC_BENCH_SKIP_DEPS=1  do not run scripts/install-deps.sh (it runs when present;
#                          it is idempotent and touches apt only for missing packages)
#
# Benchmarks need a quiet machine: the script prints the load average before
# and after, and the report records both.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

build_dir=${BUILD_DIR:-build-bench}
json=${BENCH_JSON:-$build_dir/kvc_bench.json}
doc=${BENCH_DOC-docs/BENCHMARKS.md}

if [[ "${KVC_BENCH_SKIP_DEPS:-0}" != 1 && -f scripts/install-deps.sh ]]; then
  bash scripts/install-deps.sh
fi
for tool in cmake ninja python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bench.sh: '$tool' not found; install the build dependencies (see scripts/install-deps.sh if present)" >&2
    exit 1
  fi
done

cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_BUILD_BENCH=ON
cmake --build "$build_dir" --target kvc_bench

# Which code was measured (read-only git queries; no index refresh).
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ "$revision" != unknown ]] && GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null | grep -q .; then
  revision+=" + uncommitted changes"
fi

mkdir -p "$(dirname "$json")"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench.sh: load average before: $load_before"

# JSON goes to the file (--benchmark_out_format=json); the console keeps the
# usual table to watch progress.
# Defaults first, so that the caller's flags override them: 3 repetitions of at
# least 0.2 s each, the report keeps the fastest (other processes only slow a
# run down).
bench=("$build_dir/bench/kvc_bench" "--benchmark_out=$json" --benchmark_out_format=json
       --benchmark_repetitions=3 --benchmark_min_time=0.2 "$@")
"${bench[@]}"

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench.sh: load average after: $load_after"
echo "bench.sh: results in $json"

if [[ -n "$doc" ]]; then
  printf -v command_line '%q ' scripts/bench.sh "$@"
  printf -v bench_line '%q ' "${bench[@]}"
  python3 scripts/bench_report.py "$json" "$doc" \
    --command "${command_line% }" --bench-command "${bench_line% }" \
    --load-before "$load_before" --load-after "$load_after" --revision "$revision"
  echo "bench.sh: wrote $doc"
fi
