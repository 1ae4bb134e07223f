#!/usr/bin/env bash
# `make peers` (or `mdi-llm bench --peers`, once): build the peer the benchmark compares the ring
# with: llama.cpp, as vendored in the llama-cpp-python source package on PyPI, with its RPC backend
# (GGML_RPC=ON). Idempotent; opt-in: `make test` never needs it. Puts llama-bench,
# llama-batched-bench and rpc-server in $MDI_LLM_CACHE/peers/bin (what `mdi-llm bench --peers` runs).
set -euo pipefail
PY=${PY:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${MDI_LLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mdi_llm_ros}/peers
say() { printf '[peers] %s\n' "$*" >&2; }

if [ -x "$OUT/bin/rpc-server" ] && [ -x "$OUT/bin/llama-bench" ] && [ -x "$OUT/bin/llama-batched-bench" ] \
    && [ "$(cat "$OUT/version" 2>/dev/null)" = "$VERSION" ]; then
  say "llama.cpp from llama-cpp-python $VERSION is built ($OUT/bin)"
  exit 0
fi
mkdir -p "$OUT/src"
sdist=$OUT/src/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$sdist" ]; then
  say "downloading the llama-cpp-python $VERSION source package (~75 MB)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$OUT/src"
fi
src=$OUT/src/llama_cpp_python-$VERSION
[ -d "$src" ] || tar -xzf "$sdist" -C "$OUT/src"
say "building its vendored llama.cpp with GGML_RPC=ON (several minutes on 2 cores)"
cmake -S "$src/vendor/llama.cpp" -B "$OUT/cmake" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log" >&2; say "configure failed (log: $OUT/configure.log)"; exit 1; }
# the RPC server's target is ggml-rpc-server in newer llama.cpp, rpc-server in older ones
rpc=$(grep -ho 'set(TARGET [a-z-]*rpc-server)' "$src/vendor/llama.cpp/tools/rpc/CMakeLists.txt" \
        "$src/vendor/llama.cpp/examples/rpc/CMakeLists.txt" 2>/dev/null | head -1 | sed 's/set(TARGET \(.*\))/\1/' || true)
cmake --build "$OUT/cmake" -j"$(nproc)" --target llama-bench llama-batched-bench "${rpc:-rpc-server}" \
  >"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log" >&2; say "build failed (log: $OUT/build.log)"; exit 1; }
mkdir -p "$OUT/bin"
for exe in llama-bench llama-batched-bench "${rpc:-rpc-server}"; do
  cp "$(find "$OUT/cmake" -type f -name "$exe" -perm -u+x | head -1)" "$OUT/bin/${exe#ggml-}"
done
echo "$VERSION" > "$OUT/version"
say "built: $OUT/bin/{llama-bench,llama-batched-bench,rpc-server}"
