#!/usr/bin/env bash
# Measures every KV cache configuration kvc offers on the kvref model against
# full_cache (fp32) and regenerates docs/FIDELITY.md with a table and a plot
# (docs/fidelity.png) of KL divergence against cache memory.
#
#   scripts/fidelity.sh                      # every configuration `kvc-fidelity --list` names
#   FIDELITY_WINDOWS=2 scripts/fidelity.sh   # quicker and noisier
#
# The configurations come from kvc's registry (kvc::methods(), src/registry.cpp)
# with the sweep values of examples/engine/cache_registry.hpp: a method added
# to the library is swept here without touching this script.
#
# Environment:
#   BUILD_DIR          build directory (default build/fidelity)
#   FIDELITY_MODEL     checkpoint (default models/kvref/model.bin; its eval.txt is the text)
#   FIDELITY_WINDOWS   text windows per configuration (default 8)
#   FIDELITY_DOC       report (default docs/FIDELITY.md)
#   FIDELITY_PLOT      its plot (default fidelity.png next to the report)
#   FIDELITY_ONLY      measure only the configurations matching this extended regex (grep -E), matched
#                      against each `kvc-fidelity --list` line with its tabs as spaces, e.g.
#                      "pca none:f16 none 0 none pca:32" (default: every configuration)
#   FIDELITY_REPORT    the script that writes the report and plot from the results, taking
#                      scripts/fidelity_report.py's arguments (default that one; scripts/projection.sh
#                      passes scripts/projection_report.py)
#   FIDELITY_COMMAND   how the report says it was made (default "FIDELITY_WINDOWS=N scripts/fidelity.sh")
#   KVC_FIDELITY_SKIP_DEPS=1   do not run scripts/install-deps.sh or install gnuplot
#   KVC_FIDELITY_NO_BUILD=1    use the kvc-fidelity already built in BUILD_DIR (any Release build with examples)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

build_dir=${BUILD_DIR:-build/fidelity}
model=${FIDELITY_MODEL:-models/kvref/model.bin}
windows=${FIDELITY_WINDOWS:-8}
doc=${FIDELITY_DOC:-docs/FIDELITY.md}
plot=${FIDELITY_PLOT:-"$(dirname "$doc")/fidelity.png"}
report=${FIDELITY_REPORT:-scripts/fidelity_report.py}
command=${FIDELITY_COMMAND:-"FIDELITY_WINDOWS=$windows scripts/fidelity.sh"}

as_root=()
if ((EUID != 0)) && command -v sudo >/dev/null 2>&1; then as_root=(sudo); fi
if [[ "${KVC_FIDELITY_SKIP_DEPS:-0}" != 1 ]]; then
  bash scripts/install-deps.sh
  if ! command -v gnuplot >/dev/null 2>&1; then
    echo "fidelity.sh: installing gnuplot-nox for the plot"
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get install -y -q --no-install-recommends gnuplot-nox ||
      { "${as_root[@]}" apt-get update -q && "${as_root[@]}" apt-get install -y -q --no-install-recommends gnuplot-nox; }
  fi
fi
for tool in cmake ninja python3 gnuplot; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fidelity.sh: '$tool' not found (Debian: scripts/install-deps.sh; apt-get install gnuplot-nox)" >&2
    exit 1
  fi
done
if [[ ! -f "$model" ]]; then
  echo "fidelity.sh: model $model not found (set FIDELITY_MODEL)" >&2
  exit 1
fi

if [[ "${KVC_FIDELITY_NO_BUILD:-0}" != 1 ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON >/dev/null
  cmake --build "$build_dir" --target kvc_fidelity
fi
fidelity="$build_dir/examples/engine/kvc-fidelity"

results="$build_dir/results"
rm -rf "$results"
mkdir -p "$results"
mapfile -t sweep < <("$fidelity" --list)
if [[ -n "${FIDELITY_ONLY:-}" ]]; then
  selected=()
  for line in "${sweep[@]}"; do
    if grep -Eq -- "$FIDELITY_ONLY" <<<"${line//$'\t'/ }"; then selected+=("$line"); fi
  done
  sweep=("${selected[@]}")
  if ((${#sweep[@]} == 0)); then
    echo "fidelity.sh: FIDELITY_ONLY='$FIDELITY_ONLY' matches no line of kvc-fidelity --list" >&2
    exit 1
  fi
fi
echo "fidelity.sh: ${#sweep[@]} configurations on $model, $windows windows each"
start=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
for i in "${!sweep[@]}"; do
  IFS=$'\t' read -r method cache evict every merge project <<<"${sweep[$i]}"
  name=$(printf '%03d' "$i")
  printf 'fidelity.sh: [%d/%d] %-12s --cache %s --evict %s --evict-every %s --merge %s --project %s\n' \
    "$((i + 1))" "${#sweep[@]}" "$method" "$cache" "$evict" "$every" "$merge" "$project"
  "$fidelity" --model "$model" --cache "$cache" --evict "$evict" --evict-every "$every" --merge "$merge" \
    --project "$project" --windows "$windows" \
    --json "$results/$name.json" --markdown >"$results/$name.md"
  sed 's/^/    /' "$results/$name.md"
done
echo "fidelity.sh: measured in $(($(date +%s) - start)) s"
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)

"$fidelity" --markdown-header >"$results/header.md"
python3 -B "$report" --results "$results" --doc "$doc" --plot "$plot" \
  --command "$command" --load "$load_before before, $load_after after"
echo "fidelity.sh: wrote $doc and $plot"
