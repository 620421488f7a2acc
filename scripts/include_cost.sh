#!/usr/bin/env bash
# Compile-time cost of including a kvc header: wall seconds and the compiler's
# peak memory for a translation unit holding only `#include <header>` and an
# empty main, `g++ -std=c++17 -O2 -fsyntax-only`, the best of N runs (the
# minimum: other load on the machine only ever adds).
#
#   scripts/include_cost.sh                      # the umbrellas and the Eigen-based headers
#   scripts/include_cost.sh kvc/cache/full_cache.hpp kvc/policy/eviction/snapkv.hpp
#   RUNS=5 CXX=clang++ scripts/include_cost.sh
#
# Prints a Markdown table (docs/ENGINE.md, "Include cost", holds one).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cxx=${CXX:-g++}
runs=${RUNS:-3}
eigen=${EIGEN_INCLUDE:-/usr/include/eigen3}
if [ $# -eq 0 ]; then
  set -- kvc/kvc.hpp kvc/all.hpp kvc/cache/full_cache.hpp kvc/policy/eviction/snapkv.hpp \
         kvc/policy/eviction/expected_attention.hpp kvc/policy/eviction/leverage.hpp \
         kvc/policy/eviction/value_weighted.hpp kvc/policy/eviction/hash_evict.hpp \
         kvc/calibration/query_filters.hpp
fi
[ -x /usr/bin/time ] || { echo "include_cost.sh: needs GNU time (/usr/bin/time, Debian package 'time')" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "| header | seconds (min of $runs) | peak compiler memory, MB |"
echo "|---|---:|---:|"
for header in "$@"; do
  printf '#include <%s>\nint main() { return 0; }\n' "$header" > "$work/tu.cpp"
  best_s="" best_kb=""
  for _ in $(seq "$runs"); do
    /usr/bin/time -f '%e %M' -o "$work/time" "$cxx" -std=c++17 -O2 -fsyntax-only -I"$root/include" -I"$eigen" "$work/tu.cpp"
    read -r s kb < "$work/time"
    if [ -z "$best_s" ] || awk "BEGIN{exit !($s < $best_s)}"; then best_s=$s; fi
    if [ -z "$best_kb" ] || [ "$kb" -lt "$best_kb" ]; then best_kb=$kb; fi
  done
  printf '| `%s` | %s | %d |\n' "$header" "$best_s" $((best_kb / 1024))
done
