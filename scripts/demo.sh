#!/usr/bin/env bash
# The README's first command: installs what kvc needs (Debian 12), builds the
# demo in Release and runs it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF -DKVC_BUILD_EXAMPLES=ON >/dev/null
cmake --build build/demo --target kvc_demo
exec build/demo/examples/kvc_demo "$@"
