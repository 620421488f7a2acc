#!/usr/bin/env bash
# The README's first command: installs what kvc needs (Debian 12), builds the
# example engine in Release and runs the main demo: the kvref model (in
# models/kvref) continues a Python file with a compressed KV cache (fp16 rows,
# SnapKV keeping a quarter of the prompt) and the same run with the full fp32
# cache, side by side: memory, decode speed, attention time, and how often the
# two pick the same next token (KL between their next-token distributions).
#
# Any arguments replace the compressed configuration, e.g.
#   scripts/demo.sh --cache none:bf16 --evict knorm:0.125
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/demo --target kvc_engine
config=(--cache none:f16 --evict snapkv:0.25)
if (($# > 0)); then config=("$@"); fi
exec build/demo/examples/engine/kvc_engine --model models/kvref/model.bin \
  --prompt-file models/kvref/eval.txt --prompt-limit 512 --steps 256 --temperature 0.7 \
  "${config[@]}" --compare full:f32
