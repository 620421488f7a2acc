#!/usr/bin/env bash
# Installs the Debian 12 packages kvc needs to build, test and benchmark.
# Idempotent and fast when everything is present: apt is only touched when a
# package is missing. Runs as root (CI) or through sudo.
#
#   scripts/install-deps.sh            # compiler, CMake, Ninja, xsimd, Eigen, GoogleTest, Google Benchmark,
#                                      # pybind11, numpy and pytest (the Python package and its tests)
#   CXX=clang++ scripts/install-deps.sh  # also clang
set -euo pipefail

packages=(
  build-essential g++ cmake ninja-build
  libxsimd-dev libeigen3-dev
  libgtest-dev googletest libbenchmark-dev
  python3
  python3-dev pybind11-dev python3-numpy python3-pytest # python/: the kvc package, built by the release phase
  python3-matplotlib # examples/python/compare_methods.py's plot, checked by python.pytest
  clang-14 libclang-rt-14-dev # scripts/test.sh's tsan and fuzz phases: ThreadSanitizer, libFuzzer
)
# clang only when it is the compiler asked for.
case "${CXX:-}" in
  *clang*) packages+=(clang) ;;
esac

installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

missing=()
for package in "${packages[@]}"; do
  installed "$package" || missing+=("$package")
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: this script knows Debian/Ubuntu (apt-get) only; install the equivalents by hand" >&2
  exit 1
fi

as_root=()
if ((EUID != 0)); then
  if command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: installing them needs root and sudo is not available; run as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
