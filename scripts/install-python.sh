#!/usr/bin/env bash
# Builds kvc's Python package (python/, pybind11) and installs it for the
# python3 that has numpy -- Debian's /usr/bin/python3 on a fresh Debian 12:
#
#   scripts/install-python.sh     # then: python3 -c "import kvc; print(kvc.methods())"
#
# Steps: the Debian packages (scripts/install-deps.sh: pybind11-dev,
# python3-dev, python3-numpy, ...), a Release build of the module alone in
# build/python-package, and `cmake --install --component python` into the
# interpreter's site-packages (/usr/local/lib/python3.11/dist-packages).
# Environment: KVC_PYTHON_PREFIX=DIR installs into DIR/kvc instead (then
# PYTHONPATH=DIR); KVC_JOBS (parallel jobs, default 2); CXX.
# Without installing: PYTHONPATH=build/python-package/python after the build.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
"$(pwd)/scripts/install-deps.sh"

build=build/python-package
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DKVC_BUILD_PYTHON=ON -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF
      -DKVC_BUILD_EXAMPLES=OFF -DKVC_INSTALL=OFF)
if [[ -n "${KVC_PYTHON_PREFIX:-}" ]]; then args+=("-DKVC_PYTHON_INSTALL_DIR=$KVC_PYTHON_PREFIX"); fi
if [[ -n "${CXX:-}" ]]; then args+=("-DCMAKE_CXX_COMPILER=$CXX"); fi
cmake -S . -B "$build" "${args[@]}"
cmake --build "$build" --target kvc_python --parallel "${KVC_JOBS:-2}"
cmake --install "$build" --component python

python=$(sed -n 's/^Python3_EXECUTABLE:[A-Z]*=//p' "$build/CMakeCache.txt")
where=$(sed -n 's/^KVC_PYTHON_INSTALL_DIR:[A-Z]*=//p' "$build/CMakeCache.txt")
echo "install-python: kvc installed in $where/kvc for $python"
(cd / && PYTHONPATH="${KVC_PYTHON_PREFIX:-}" "$python" -c "import kvc; print('install-python: import kvc works,', len(kvc.methods()), 'methods')")
