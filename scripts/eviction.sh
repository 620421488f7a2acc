#!/usr/bin/env bash
# Regenerates docs/EVICTION.md: every eviction policy of the engine's registry
# at keep ratios 0.5, 0.25 and 0.125 on the kvref model, with
#   - the per-layer attention-output error on kvref's own keys, values and
#     queries (kvc-attention-error --eviction-sweep, rows stored in fp32 so
#     the error is eviction's alone), and
#   - next-token KL against full_cache and perplexity change (kvc-fidelity,
#     rows in fp16 as an engine would store them).
#
#   scripts/eviction.sh
#   EVICTION_WINDOWS=2 scripts/eviction.sh   # quicker and noisier
#
# Environment:
#   BUILD_DIR          build directory (default build/fidelity, shared with scripts/fidelity.sh)
#   EVICTION_MODEL     checkpoint (default models/kvref/model.bin; its eval.txt is the text)
#   EVICTION_WINDOWS   text windows per configuration (default 8)
#   EVICTION_DOC       report (default docs/EVICTION.md)
#   KVC_FIDELITY_SKIP_DEPS=1   do not run scripts/install-deps.sh
#   KVC_FIDELITY_NO_BUILD=1    use the tools already built in BUILD_DIR (any Release build with examples)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

build_dir=${BUILD_DIR:-build/fidelity}
model=${EVICTION_MODEL:-models/kvref/model.bin}
windows=${EVICTION_WINDOWS:-8}
doc=${EVICTION_DOC:-docs/EVICTION.md}

if [[ "${KVC_FIDELITY_SKIP_DEPS:-0}" != 1 ]]; then
  bash scripts/install-deps.sh
fi
if [[ ! -f "$model" ]]; then
  echo "eviction.sh: model $model not found (set EVICTION_MODEL)" >&2
  exit 1
fi

if [[ "${KVC_FIDELITY_NO_BUILD:-0}" != 1 ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON >/dev/null
  cmake --build "$build_dir" --target kvc_fidelity kvc_attention_error
fi
tools="$build_dir/examples/engine"

results="$build_dir/eviction"
rm -rf "$results"
mkdir -p "$results"
start=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)

echo "eviction.sh: attention-output error of every policy at 0.5, 0.25, 0.125 ($windows windows)"
"$tools/kvc-attention-error" --model "$model" --cache none:f32 --eviction-sweep --windows "$windows" \
  | tee "$results/attention_error.jsonl"

mapfile -t policies < <(python3 -c 'import json,sys
seen=[]
for line in open(sys.argv[1]):
    name=json.loads(line)["evict"].split(":")[0]
    if name not in seen: seen.append(name)
print("\n".join(seen))' "$results/attention_error.jsonl")
i=0
for policy in "${policies[@]}"; do
  for ratio in 0.5 0.25 0.125; do
    name=$(printf '%03d' "$i")
    echo "eviction.sh: KL of $policy:$ratio"
    "$tools/kvc-fidelity" --model "$model" --cache none:f16 --evict "$policy:$ratio" --windows "$windows" \
      --json "$results/$name.json" >/dev/null
    i=$((i + 1))
  done
done
"$tools/kvc-fidelity" --model "$model" --cache none:f16 --windows "$windows" --json "$results/fp16.json" >/dev/null
echo "eviction.sh: measured in $(($(date +%s) - start)) s"
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)

python3 scripts/eviction_report.py --results "$results" --doc "$doc" \
  --command "EVICTION_WINDOWS=$windows scripts/eviction.sh" --load "$load_before before, $load_after after"
echo "eviction.sh: wrote $doc"
