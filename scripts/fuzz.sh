#!/usr/bin/env bash
# Long runs of kvc's libFuzzer targets (tests/fuzz), one after another.
#
#   scripts/fuzz.sh                         # every target, 600 s each
#   KVC_FUZZ_SECONDS=3600 scripts/fuzz.sh artifact model
#   KVC_FUZZ_RUNS=1000000 scripts/fuzz.sh   # a number of executions instead of a time
#
# Builds build/fuzz-long as scripts/test.sh's fuzz phase builds build/fuzz (clang++-14,
# -fsanitize=fuzzer,address,undefined), then runs each target at nice 10 from
# its seed corpus (tests/fuzz/corpus/<target>) plus what earlier runs found
# (build/fuzz-long/corpus/<target>). A crash, sanitizer report or trap leaves its
# input in build/fuzz-long/findings/<target>/ and makes the script exit non-zero;
# the last lines print each target's executions and findings.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
dir="$root/build/fuzz-long" # not build/fuzz: test.sh configures that one differently and would start it afresh
seconds=${KVC_FUZZ_SECONDS:-600}
runs=${KVC_FUZZ_RUNS:-}
all_targets=(artifact tokenizer model cache_api cache_load parse_spec)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")

cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=Debug \
  "-DCMAKE_CXX_FLAGS_DEBUG=-g -O1" -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF \
  -DKVC_INSTALL=OFF -DKVC_BUILD_FUZZ=ON >/dev/null
cmake --build "$dir" --parallel "${KVC_JOBS:-2}" --target "${targets[@]/#/fuzz_}"

status=0
report=()
for target in "${targets[@]}"; do
  mkdir -p "$dir/corpus/$target" "$dir/findings/$target"
  log="$dir/findings/$target/run.log"
  limit=(-max_total_time="$seconds")
  max_len=4096
  [[ "$target" == cache_load ]] && max_len=32768 # a saved cache with its query ring is larger
  [[ "$target" == parse_spec ]] && max_len=16384 # a spec, and a saved cache after it (tests/fuzz/parse_spec_fuzz.cpp)
  [[ -n "$runs" ]] && limit=(-runs="$runs")
  echo "=== fuzz_$target (${limit[*]}), log: $log"
  if nice -n 10 "$dir/tests/fuzz/fuzz_$target" "${limit[@]}" -max_len="$max_len" -print_final_stats=1 \
    -artifact_prefix="$dir/findings/$target/" "$dir/corpus/$target" "$root/tests/fuzz/corpus/$target" \
    >"$log" 2>&1; then
    result=ok
  else
    result="FAILED (exit $?)"
    status=1
  fi
  executions=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
  findings=$(find "$dir/findings/$target" -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' |
    wc -l)
  report+=("$(printf 'fuzz_%-10s %s: %s executions, %s findings' "$target" "$result" "$executions" "$findings")")
done
printf '%s\n' "${report[@]}"
exit "$status"
