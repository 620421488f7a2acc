#!/usr/bin/env bash
# kvc's full test run -- what CI runs (.ci/run) and what contributors run
# before sending a change:
#
#   scripts/test.sh                     # all phases
#   scripts/test.sh release sanitize    # only some phases
#   CXX=clang++ scripts/test.sh         # another compiler
#
# Phases (each its own build directory under build/):
#   release   C++17, Release: library, tests, benchmarks, examples and the Python package
#             (python/, its pytest suite as the ctest test python.pytest); whole ctest suite
#   sanitize  C++20, -O1 -g1 with AddressSanitizer + UndefinedBehaviorSanitizer: library and
#             tests; whole ctest suite but the packaging tests (self-contained headers,
#             consumer projects: KVC_PACKAGING_TESTS=OFF), which release runs
#
# The two language standards kvc supports are each built and tested in full
# once: C++17 optimised (release) and C++20 sanitized (sanitize). A separate
# optimised C++20 phase built and ran the same tests a third time, for a
# quarter of the run's time. -g1 keeps the
# line tables the sanitizers' reports need and drops the rest of the debug
# information (in every sanitized phase).
#   tsan      clang, -O1 -g1 with ThreadSanitizer: only the tests that run threads (the threading
#             contract for every cache type on a shared recycling_resource, full_cache's concurrency tests)
#   fuzz      clang++-14 -fsanitize=fuzzer,address,undefined: the libFuzzer targets of tests/fuzz only,
#             each run for a fixed number of executions (scripts/fuzz.sh runs them long)
#
# Stops at the first failure. The last line printed is "N passed, M failed":
# ctest's test counts over all phases, plus one failure for a failed
# configure or build step.
#
# Environment: CXX (compiler), KVC_JOBS (parallel jobs, default 2),
# KVC_CTEST_TIMEOUT (seconds per test, default 1800).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
jobs=${KVC_JOBS:-2}
test_timeout=${KVC_CTEST_TIMEOUT:-1800}
all_phases=(release sanitize tsan fuzz)
if (($# > 0)); then
  phases=("$@")
  for phase in "${phases[@]}"; do
    case " ${all_phases[*]} " in
      *" $phase "*) ;;
      *) echo "test.sh: unknown phase '$phase'; expected some of: ${all_phases[*]}" >&2; exit 2 ;;
    esac
  done
else
  phases=("${all_phases[@]}")
fi

# --- bookkeeping for the summary ------------------------------------------
run_start=$(date +%s)
tests_passed=0
tests_failed=0
summary=()
current=""
current_step=""
step_start=0

now() { date +%s; }
log() { printf '\n=== %s\n' "$*"; }

print_summary() {
  local status=$?
  set +e
  if [[ -n "$current" ]]; then
    # Interrupted inside a step (a configure, build or ctest failure).
    summary+=("$(printf '%-9s FAILED in %s after %ss' "$current" "$current_step" "$(($(now) - step_start))")")
    if [[ "$current_step" != ctest ]]; then tests_failed=$((tests_failed + 1)); fi
  fi
  echo
  echo "=== kvc test summary (${CXX:-default compiler}, $(($(now) - run_start))s total)"
  local line
  for line in "${summary[@]}"; do echo "  $line"; done
  if ((status != 0)) && ((tests_failed == 0)); then tests_failed=1; fi
  echo "$tests_passed passed, $tests_failed failed"
}
trap print_summary EXIT

# --- dependencies -----------------------------------------------------------
current="setup" current_step="install-deps" step_start=$(now)
"$root/scripts/install-deps.sh"
summary+=("$(printf '%-9s ok  %5ss  (install-deps)' setup "$(($(now) - step_start))")")
current=""

cmake_common=(-G Ninja -DKVC_BUILD_TESTS=ON)
if [[ -n "${CXX:-}" ]]; then
  cmake_common+=("-DCMAKE_CXX_COMPILER=$CXX")
fi
echo "test.sh: $(${CXX:-c++} --version | head -n 1); $(cmake --version | head -n 1); $(nproc) cores, -j$jobs"

# Benchmarks and examples are built in the release phase when the tree has them.
optional_dir() {
  if [[ -f "$root/$1/CMakeLists.txt" ]]; then echo ON; else echo OFF; fi
}

# configure <build dir> <cmake args...>: a build directory configured with
# other arguments (another compiler, other options) is started afresh.
configure() {
  local dir=$1
  shift
  local stamp="$dir/.kvc-configure-args" args="$*"
  if [[ -d "$dir" ]] && [[ ! -f "$stamp" || "$(cat "$stamp")" != "$args" ]]; then
    echo "test.sh: $dir was configured differently; starting it afresh"
    rm -rf "$dir"
  fi
  cmake -S "$root" -B "$dir" "$@"
  echo "$args" >"$stamp"
}

# run_phase <name> <env for ctest> -- <cmake args...>
# With phase_targets set, builds only those targets and runs only their tests.
phase_targets=()
run_phase() {
  local name=$1 dir="$root/build/$1"
  shift
  local -a ctest_env=()
  while [[ "$1" != -- ]]; do ctest_env+=("$1"); shift; done
  shift
  local phase_start t0 configure_s build_s ctest_s
  phase_start=$(now)
  current=$name

  current_step=configure step_start=$(now)
  log "$name: configure"
  configure "$dir" "${cmake_common[@]}" "$@"
  configure_s=$(($(now) - step_start))

  current_step=build step_start=$(now)
  log "$name: build (-j$jobs)"
  # Keep going past a failed target so one run shows every compile error;
  # the phase still fails.
  local -a targets=() ctest_filter=()
  if ((${#phase_targets[@]} > 0)); then
    targets=(--target "${phase_targets[@]}")
    ctest_filter=(-R "^($(IFS='|'; echo "${phase_targets[*]}"))\\.")
  fi
  cmake --build "$dir" --parallel "$jobs" "${targets[@]}" -- -k 0
  build_s=$(($(now) - step_start))

  current_step=ctest step_start=$(now)
  log "$name: ctest (-j$jobs)"
  local ctest_log="$dir/ctest.log" ctest_status=0
  env "${ctest_env[@]}" ctest --test-dir "$dir" --output-on-failure --no-tests=error -j "$jobs" "${ctest_filter[@]}" \
    --timeout "$test_timeout" 2>&1 | tee "$ctest_log" || ctest_status=$?
  ctest_s=$(($(now) - step_start))

  # "95% tests passed, 3 tests failed out of 57"
  local counts failed total
  counts=$(grep -Eo '[0-9]+ tests? failed out of [0-9]+' "$ctest_log" | tail -n 1 || true)
  if [[ -n "$counts" ]]; then
    failed=$(awk '{print $1}' <<<"$counts")
    total=$(awk '{print $NF}' <<<"$counts")
    tests_passed=$((tests_passed + total - failed))
    tests_failed=$((tests_failed + failed))
  elif ((ctest_status != 0)); then
    tests_failed=$((tests_failed + 1)) # ctest died before its summary
  fi
  if ((ctest_status != 0)); then
    exit "$ctest_status"
  fi
  summary+=("$(printf '%-9s ok  %5ss  (configure %ss, build %ss, ctest %ss: %s tests)' "$name" \
    "$(($(now) - phase_start))" "$configure_s" "$build_s" "$ctest_s" "${total:-0}")")
  current=""
}

for phase in "${phases[@]}"; do
  case "$phase" in
    release)
      run_phase release -- \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=17 \
        -DKVC_BUILD_BENCH="$(optional_dir bench)" -DKVC_BUILD_EXAMPLES="$(optional_dir examples)" \
        -DKVC_BUILD_PYTHON="$(optional_dir python)"
      ;;
    sanitize)
      run_phase sanitize \
        ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 -- \
        -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g1 -O1" -DCMAKE_CXX_STANDARD=20 \
        -DKVC_SANITIZE=address,undefined -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_PACKAGING_TESTS=OFF
      ;;
    tsan)
      # ThreadSanitizer needs clang's runtime (libclang-rt-14-dev) and every
      # object instrumented: the phase uses clang 14 whatever CXX says, and
      # builds only the tests that run threads (phase_targets).
      phase_targets=(engine_threading_test cache_full_cache_test)
      cmake_common_saved=("${cmake_common[@]}")
      cmake_common=(-G Ninja -DKVC_BUILD_TESTS=ON -DCMAKE_CXX_COMPILER=clang++-14)
      run_phase tsan TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 -- \
        -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g1 -O1" -DCMAKE_CXX_STANDARD=17 \
        -DKVC_SANITIZE=thread -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF
      cmake_common=("${cmake_common_saved[@]}")
      phase_targets=()
      ;;
    fuzz)
      # libFuzzer needs clang, whatever CXX says (the later -D wins). Only the
      # fuzz targets are built; each ctest test is one target's smoke run
      # (tests/fuzz/CMakeLists.txt: KVC_FUZZ_RUNS executions from its seed corpus).
      run_phase fuzz -- \
        -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g1 -O1" \
        -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF -DKVC_BUILD_FUZZ=ON
      ;;
  esac
done
